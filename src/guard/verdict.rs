//! Verdict vocabulary: the per-instance outcome, its cache key, and the per-request record that
//! clients read back by id.

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

impl VerdictKey {
    /// Derives the key; the image hash is computed once per instance by the caller.
    pub fn new(image_hash: &blake3::Hash, label: u32, fingerprint: &str) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(image_hash.as_bytes());
        h.update(&label.to_le_bytes());
        h.update(fingerprint.as_bytes());
        VerdictKey(*h.finalize().as_bytes())
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
    pub id: String,
    /// Route name.
    pub route: String,
    /// Combined verdict.
    pub verdict: Verdict,
    /// Detector fingerprint.
    pub detector: String,
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
}
