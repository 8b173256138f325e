//! The seam between the guard and any OOD detector: a narrow, synchronous trait with no HTTP and
//! no async. The scoring queue calls it on dedicated OS threads.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::DetectorConfig;

/// Decoded pixels, row-major, `channels` interleaved bytes per pixel (1 = gray, 3 = RGB).
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// 1 (gray) or 3 (RGB).
    pub channels: u8,
    /// `width * height * channels` bytes.
    pub pixels: Vec<u8>,
}

impl Image {
    /// Pixel values scaled to `[0, 1]`, same layout as `pixels`.
    pub fn to_f32(&self) -> Vec<f32> {
        self.pixels.iter().map(|&p| f32::from(p) / 255.0).collect()
    }
}

/// One image with the label the classifier predicted for it.
#[derive(Debug, Clone)]
pub struct Job {
    /// The image as the client sent it, decoded.
    pub image: Arc<Image>,
    /// Predicted label in the detector's label space.
    pub label: u32,
    /// The classifier's logits/scores when its response carried them.
    pub logits: Option<Vec<f32>>,
}

/// A detector's answer for one job. `score > threshold` means out-of-distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// OOD score, higher = more out-of-distribution.
    pub score: f32,
    /// Decision threshold for this label.
    pub threshold: f32,
    /// Free-form numbers worth tracing (similarity, …). `early_stop_step` is also recorded as the
    /// request span attribute `diffguard.early_stop_step`.
    #[serde(default)]
    pub diagnostics: Diagnostics,
}

/// A score's diagnostics, shared: a cached verdict hands the same map to every request's report.
pub type Diagnostics = Arc<BTreeMap<String, f64>>;

/// For `skip_serializing_if`.
pub fn no_diagnostics(d: &Diagnostics) -> bool {
    d.is_empty()
}

impl Score {
    /// The decision this score implies.
    pub fn is_ood(&self) -> bool {
        self.score > self.threshold
    }
}

/// Why a job got no score.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum DetectorError {
    /// The detector cannot score at all (e.g. no engine in this build).
    #[error("detector unavailable: {0}")]
    Unavailable(String),
    /// This job's input does not suit the detector (size, channels, label).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The engine failed on this job.
    #[error("engine error: {0}")]
    Engine(String),
}

/// An OOD detector. Implementations are called from dedicated threads, may block, and must return
/// exactly one result per job, in order.
pub trait Detector: Send + Sync {
    /// Identifies weights + recipe + thresholds; part of every cache key, so a new model never
    /// reuses old verdicts.
    fn fingerprint(&self) -> String;
    /// Models loaded and usable (`/readyz`).
    fn ready(&self) -> bool {
        true
    }
    /// Scores a micro-batch.
    fn score(&self, jobs: &[Job]) -> Vec<Result<Score, DetectorError>>;
}

/// Builds the detector named by `detector.kind`.
pub fn build_detector(cfg: &DetectorConfig) -> Result<Arc<dyn Detector>, DetectorError> {
    match cfg.kind.as_str() {
        "diffguard" => {
            let dir = super::diffguard::bundle_dir(cfg)?;
            let device = super::diffguard::device_name(cfg)?;
            Ok(Arc::new(super::diffguard::DiffGuardDetector::open(
                &dir,
                &device,
                cfg.num_classes,
            )?))
        }
        super::logits::KIND => Ok(Arc::new(super::logits::LogitsDetector::from_config(cfg)?)),
        other => Err(DetectorError::Unavailable(format!(
            "unknown detector.kind `{other}` (known: diffguard, {})",
            super::logits::KIND
        ))),
    }
}
