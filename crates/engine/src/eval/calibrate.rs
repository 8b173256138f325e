//! Thresholds at a target in-distribution false-reject rate, set on validation scores, and the
//! thresholds file the proxy loads.
//!
//! Scores here are the engine's (higher = in-distribution). The file stores thresholds on the
//! guard's OOD score, `ood_score = −score`, with the rule "OOD iff ood_score > threshold"
//! (DESIGN §4), so the proxy compares without knowing the engine's sign; [`ThresholdsFile::is_ood`]
//! applies that rule to an engine score.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{EngineError, LabelId, Result};

/// The file format tag; bumped on incompatible changes.
pub const THRESHOLDS_FORMAT: &str = "diffguard-thresholds/1";

/// Classes with fewer validation images than this use the global threshold.
pub const DEFAULT_MIN_PER_CLASS: usize = 50;

/// The default target false-reject rate.
pub const DEFAULT_FALSE_REJECT_RATE: f64 = 0.05;

const SCORE_RULE: &str = "ood_score = -similarity; OOD iff ood_score > threshold";

/// A threshold on engine scores: accept (in-distribution) iff score ≥ `min_score`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub min_score: f64,
    /// Fraction of the calibration scores below `min_score`.
    pub achieved_false_reject_rate: f64,
    pub samples: usize,
}

/// The highest threshold whose false-reject rate on `scores` does not exceed `target`: the
/// ⌊target·n⌋-th smallest score (0-based). Ties can only lower the achieved rate.
pub fn threshold_at_false_reject_rate(scores: &[f64], target: f64) -> Result<Threshold> {
    if !(0.0..1.0).contains(&target) {
        return Err(EngineError::InvalidInput(format!(
            "target false-reject rate {target} is not in [0, 1)"
        )));
    }
    if scores.is_empty() || scores.iter().any(|s| !s.is_finite()) {
        return Err(EngineError::InvalidInput(
            "calibration needs a non-empty set of finite scores".into(),
        ));
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    // The tiny slack keeps e.g. 0.05·100 = 5.000000000000001 from rounding to 4.
    let k = ((target * n as f64) + 1e-9).floor() as usize;
    let min_score = sorted[k.min(n - 1)];
    Ok(Threshold {
        min_score,
        achieved_false_reject_rate: false_reject_rate(scores, min_score),
        samples: n,
    })
}

fn false_reject_rate(scores: &[f64], min_score: f64) -> f64 {
    scores.iter().filter(|&&s| s < min_score).count() as f64 / scores.len() as f64
}

/// One class's entry in the thresholds file.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClassThreshold {
    /// On the OOD score: OOD iff −score > threshold.
    pub threshold: f64,
    /// Measured on this class's validation images with this threshold.
    pub achieved_false_reject_rate: f64,
    pub samples: usize,
    /// True when the class had too few images and uses the global threshold.
    pub uses_global: bool,
}

/// The calibrated thresholds of one detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdsFile {
    pub format: String,
    /// The detector (recipe + weights) the thresholds belong to.
    pub detector_fingerprint: String,
    pub score_rule: String,
    pub target_false_reject_rate: f64,
    pub global: ClassThreshold,
    /// Keyed by the classifier's predicted label.
    pub per_class: BTreeMap<u32, ClassThreshold>,
}

/// Calibrates a global threshold and one per predicted class on validation `scores` (engine
/// convention) of in-distribution images with the classifier's `predicted` labels.
pub fn calibrate(
    scores: &[f64],
    predicted: &[LabelId],
    target: f64,
    min_per_class: usize,
    detector_fingerprint: &str,
) -> Result<ThresholdsFile> {
    if scores.len() != predicted.len() {
        return Err(EngineError::InvalidInput(format!(
            "{} scores but {} labels",
            scores.len(),
            predicted.len()
        )));
    }
    let global = threshold_at_false_reject_rate(scores, target)?;
    let mut by_class: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for (&s, l) in scores.iter().zip(predicted) {
        by_class.entry(l.0).or_default().push(s);
    }
    let mut per_class = BTreeMap::new();
    for (label, class_scores) in by_class {
        let entry = if class_scores.len() >= min_per_class.max(1) {
            let t = threshold_at_false_reject_rate(&class_scores, target)?;
            entry(t.min_score, &class_scores, false)
        } else {
            entry(global.min_score, &class_scores, true)
        };
        per_class.insert(label, entry);
    }
    Ok(ThresholdsFile {
        format: THRESHOLDS_FORMAT.into(),
        detector_fingerprint: detector_fingerprint.into(),
        score_rule: SCORE_RULE.into(),
        target_false_reject_rate: target,
        global: entry(global.min_score, scores, false),
        per_class,
    })
}

fn entry(min_score: f64, scores: &[f64], uses_global: bool) -> ClassThreshold {
    ClassThreshold {
        threshold: -min_score,
        achieved_false_reject_rate: false_reject_rate(scores, min_score),
        samples: scores.len(),
        uses_global,
    }
}

impl ThresholdsFile {
    /// The OOD-score threshold for a predicted label (the global one for unseen labels).
    pub fn threshold_for(&self, label: LabelId) -> f64 {
        self.per_class
            .get(&label.0)
            .unwrap_or(&self.global)
            .threshold
    }

    /// The verdict for an engine score (higher = in-distribution) of an image predicted `label`.
    pub fn is_ood(&self, label: LabelId, score: f64) -> bool {
        -score > self.threshold_for(label)
    }

    /// Writes the file as JSON (via a temporary file, so a reader never sees half a file).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| EngineError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| EngineError::Config(format!("serializing thresholds: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads a thresholds file and checks that it was calibrated for `expected_fingerprint`.
    pub fn load(path: &Path, expected_fingerprint: &str) -> Result<Self> {
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|source| EngineError::Io {
            path: shown.clone(),
            source,
        })?;
        let file: ThresholdsFile =
            serde_json::from_slice(&text).map_err(|e| EngineError::Format {
                path: shown.clone(),
                what: "thresholds file",
                detail: e.to_string(),
            })?;
        if file.format != THRESHOLDS_FORMAT {
            return Err(EngineError::Format {
                path: shown,
                what: "thresholds file",
                detail: format!("format {:?}, expected {THRESHOLDS_FORMAT:?}", file.format),
            });
        }
        if file.detector_fingerprint != expected_fingerprint {
            return Err(EngineError::Config(format!(
                "{shown} was calibrated for detector {}, but the configured detector is {}; \
                 run `diffguard calibrate` for this detector",
                file.detector_fingerprint, expected_fingerprint
            )));
        }
        Ok(file)
    }
}
