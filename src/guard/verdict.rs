//! Verdict vocabulary: the per-instance outcome, its cache key, and the per-request record that
//! clients read back by id.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::detector::Score;

/// What the guard tells the client (header `diffguard-verdict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Scored; not OOD.
    InDistribution,
    /// Scored; OOD.
    Ood,
    /// Not scored yet; ask `/diffguard/v1/verdicts/{id}` later.
    Pending,
    /// Will not be scored (queue full, detector error, unreadable label, …).
    Unverified,
}

impl Verdict {
    /// Header/metric value.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::InDistribution => "in-distribution",
            Verdict::Ood => "ood",
            Verdict::Pending => "pending",
            Verdict::Unverified => "unverified",
        }
    }

    /// A request with several instances: any OOD wins, then pending, then unverified.
    pub fn combine(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
        let mut out = Verdict::InDistribution;
        for v in verdicts {
            out = match (out, v) {
                (Verdict::Ood, _) | (_, Verdict::Ood) => Verdict::Ood,
                (Verdict::Pending, _) | (_, Verdict::Pending) => Verdict::Pending,
                (Verdict::Unverified, _) | (_, Verdict::Unverified) => Verdict::Unverified,
                _ => Verdict::InDistribution,
            };
        }
        out
    }
}

/// A finished instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Outcome {
    /// The detector answered.
    Scored(Score),
    /// No score will come.
    Unverified {
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// The verdict this outcome gives.
    pub fn verdict(&self) -> Verdict {
        match self {
            Outcome::Scored(s) if s.is_ood() => Verdict::Ood,
            Outcome::Scored(_) => Verdict::InDistribution,
            Outcome::Unverified { .. } => Verdict::Unverified,
        }
    }
}

/// Cache key: blake3 over the image bytes, the label and the detector fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerdictKey(pub [u8; 32]);

/// Derives the verdict keys of one detector: blake3 keyed by a key derived once from the
/// fingerprint, over the image hash and the label. One 36-byte compression per key, where
/// hashing the fingerprint along with them took three.
#[derive(Debug, Clone)]
pub struct VerdictKeyer([u8; 32]);

impl VerdictKeyer {
    /// Keys for the detector with this fingerprint. The context string versions the derivation:
    /// keys stored by an older derivation (Redis) are then never read as current ones.
    pub fn new(fingerprint: &str) -> Self {
        Self(blake3::derive_key(
            "diffguard 2026-12 verdict key v2",
            fingerprint.as_bytes(),
        ))
    }

    /// The key of one image (hashed once per instance by the caller) and label.
    pub fn key(&self, image_hash: &blake3::Hash, label: u32) -> VerdictKey {
        let mut input = [0u8; 36];
        input[..32].copy_from_slice(image_hash.as_bytes());
        input[32..].copy_from_slice(&label.to_le_bytes());
        VerdictKey(*blake3::keyed_hash(&self.0, &input).as_bytes())
    }
}

impl VerdictKey {
    /// Derives one key; [`VerdictKeyer`] derives many for one detector.
    pub fn new(image_hash: &blake3::Hash, label: u32, fingerprint: &str) -> Self {
        VerdictKeyer::new(fingerprint).key(image_hash, label)
    }

    /// Lower-case hex, used in Redis keys.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Where an instance's verdict came from (header `diffguard-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheStatus {
    /// Found in a cache tier.
    Hit,
    /// Scored (or being scored) for this request.
    Miss,
}

impl CacheStatus {
    /// Header value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
        }
    }
}

/// One instance of a request as reported to clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// Verdict of this instance.
    pub verdict: Verdict,
    /// Label id in the detector's label space (absent when the label could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<u32>,
    /// Class name when the route has a label list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label_name: Option<String>,
    /// OOD score when scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// Threshold when scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// Why it is unverified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Cache hit or miss.
    pub cache: CacheStatus,
    /// The detector's diagnostics (e.g. `early_stop_step`), when scored.
    #[serde(default, skip_serializing_if = "super::detector::no_diagnostics")]
    pub diagnostics: super::detector::Diagnostics,
}

/// What `GET /diffguard/v1/verdicts/{id}` and the injected `"diffguard"` object carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictReport {
    /// Verdict id.
    pub id: Arc<str>,
    /// Route name.
    pub route: Arc<str>,
    /// Combined verdict.
    pub verdict: Verdict,
    /// Detector fingerprint.
    pub detector: Arc<str>,
    /// One entry per image in the request.
    pub instances: Vec<InstanceReport>,
}

impl VerdictReport {
    /// No instance is pending any more (the combined verdict alone cannot tell: OOD outranks
    /// pending).
    pub fn is_final(&self) -> bool {
        self.instances.iter().all(|i| i.verdict != Verdict::Pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_orders_ood_pending_unverified() {
        use Verdict::*;
        assert_eq!(
            Verdict::combine([InDistribution, InDistribution]),
            InDistribution
        );
        assert_eq!(Verdict::combine([InDistribution, Unverified]), Unverified);
        assert_eq!(Verdict::combine([Unverified, Pending]), Pending);
        assert_eq!(Verdict::combine([Pending, Ood, Unverified]), Ood);
    }

    #[test]
    fn key_depends_on_every_part() {
        let a = blake3::hash(b"img");
        let b = blake3::hash(b"img2");
        let k = VerdictKey::new(&a, 1, "fp");
        assert_eq!(k, VerdictKey::new(&a, 1, "fp"));
        assert_ne!(k, VerdictKey::new(&b, 1, "fp"));
        assert_ne!(k, VerdictKey::new(&a, 2, "fp"));
        assert_ne!(k, VerdictKey::new(&a, 1, "fp2"));
        assert_eq!(k.hex().len(), 64);
    }

    /// The key layout, rebuilt with blake3's streaming API: keyed by the fingerprint's derived
    /// key, over the 32-byte image hash then the label in little-endian. A change here changes
    /// every key in a shared Redis, so it is pinned.
    #[test]
    fn keyer_is_a_keyed_hash_of_image_hash_and_label() {
        let image = blake3::hash(b"img");
        let fp = "5134b5cb-fingerprint";
        let derived = blake3::Hasher::new_derive_key("diffguard 2026-12 verdict key v2")
            .update(fp.as_bytes())
            .finalize();
        let expected = blake3::Hasher::new_keyed(derived.as_bytes())
            .update(image.as_bytes())
            .update(&7u32.to_le_bytes())
            .finalize();
        let keyer = VerdictKeyer::new(fp);
        assert_eq!(keyer.key(&image, 7).0, *expected.as_bytes());
        assert_eq!(keyer.key(&image, 7), VerdictKey::new(&image, 7, fp));
        assert_ne!(
            keyer.key(&image, 7),
            VerdictKeyer::new("other").key(&image, 7)
        );
    }
}
