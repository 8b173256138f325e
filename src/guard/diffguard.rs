//! The DiffGuard detector: the engine's pipeline, loaded from a model bundle, behind the guard's
//! [`Detector`] seam. This is the only module of the guard that talks to the engine; it passes
//! pixels and labels in and gets numbers out, never tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use diffguard_engine::LabelId;
use diffguard_engine::bundle::{Bundle, DEFAULT_BUNDLE, RawImage, device_from_name};
use diffguard_engine::pipeline::ImageResult;

use super::detector::{Detector, DetectorError, Job, Score};
use crate::config::DetectorConfig;

/// `detector.settings` key naming the bundle folder.
pub const BUNDLE_KEY: &str = "bundle";
/// `detector.settings` key naming the device (`cpu` by default, `cuda:N` with `--features cuda`).
pub const DEVICE_KEY: &str = "device";
/// Environment variable naming the bundle folder when the config does not.
pub const BUNDLE_ENV: &str = "DIFFGUARD_BUNDLE";

/// The bundle folder: `detector.settings.bundle`, else `$DIFFGUARD_BUNDLE`, else the project's own
/// Fashion-MNIST bundle in the source tree.
pub fn bundle_dir(cfg: &DetectorConfig) -> Result<PathBuf, DetectorError> {
    match cfg.settings.get(BUNDLE_KEY) {
        Some(serde_json::Value::String(dir)) => return Ok(PathBuf::from(dir)),
        Some(other) => {
            return Err(DetectorError::Unavailable(format!(
                "detector.settings.{BUNDLE_KEY} must be a path string, got {other}"
            )));
        }
        None => {}
    }
    Ok(default_bundle_dir())
}

/// `$DIFFGUARD_BUNDLE`, else the project's own Fashion-MNIST bundle in the source tree
/// ([`DEFAULT_BUNDLE`]).
pub fn default_bundle_dir() -> PathBuf {
    match std::env::var_os(BUNDLE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_BUNDLE),
    }
}

/// The configured device name (`cpu` unless `detector.settings.device` says otherwise).
pub fn device_name(cfg: &DetectorConfig) -> Result<String, DetectorError> {
    match cfg.settings.get(DEVICE_KEY) {
        None => Ok("cpu".into()),
        Some(serde_json::Value::String(d)) => Ok(d.clone()),
        Some(other) => Err(DetectorError::Unavailable(format!(
            "detector.settings.{DEVICE_KEY} must be a string such as \"cpu\" or \"cuda:0\", got {other}"
        ))),
    }
}

/// DiffGuard on the project's pixel recipe.
pub struct DiffGuardDetector {
    bundle: Bundle,
    /// Detector fingerprint plus the thresholds in force: new thresholds, new cache keys.
    fingerprint: String,
}

impl DiffGuardDetector {
    /// Loads the bundle on `device` (`cpu`, `cuda:N`); the label space must match the configured
    /// one.
    pub fn open(dir: &Path, device: &str, num_classes: u32) -> Result<Self, DetectorError> {
        let unavailable = |e: diffguard_engine::EngineError| {
            DetectorError::Unavailable(format!("model bundle {}: {e}", dir.display()))
        };
        let device = device_from_name(device).map_err(unavailable)?;
        let bundle = Bundle::open(dir, &device).map_err(unavailable)?;
        let classes = bundle.manifest.labels.len();
        if classes != num_classes as usize {
            return Err(DetectorError::Unavailable(format!(
                "model bundle {} has {classes} classes but detector.num_classes is {num_classes}",
                dir.display()
            )));
        }
        if bundle.thresholds.is_none() {
            tracing::warn!(
                bundle = %dir.display(),
                "model bundle is not calibrated: no verdict will be OOD until `diffguard calibrate` writes thresholds"
            );
        }
        let thresholds = serde_json::to_string(&bundle.thresholds).unwrap_or_default();
        let fingerprint = blake3::hash(format!("{}\0{thresholds}", bundle.fingerprint).as_bytes())
            .to_hex()
            .to_string();
        Ok(Self {
            bundle,
            fingerprint,
        })
    }

    fn threshold(&self, label: LabelId) -> f32 {
        // Uncalibrated: nothing is OOD (documented in the start-up warning).
        self.bundle
            .thresholds
            .as_ref()
            .map_or(f32::INFINITY, |t| t.threshold_for(label) as f32)
    }

    fn to_score(&self, result: ImageResult) -> Score {
        let mut diagnostics = BTreeMap::new();
        diagnostics.insert("similarity".into(), result.score);
        diagnostics.insert("logits_l1".into(), result.similarities.logits_l1);
        diagnostics.insert("l2".into(), result.similarities.l2);
        diagnostics.insert("start_index".into(), result.start_index as f64);
        diagnostics.insert("denoiser_evals".into(), result.nfe.denoiser as f64);
        if let Some(k) = result.k_star {
            diagnostics.insert("early_stop_step".into(), k as f64);
        }
        Score {
            score: -result.score as f32,
            threshold: self.threshold(result.label),
            diagnostics: diagnostics.into(),
        }
    }
}

impl Detector for DiffGuardDetector {
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn score(&self, jobs: &[Job]) -> Vec<Result<Score, DetectorError>> {
        let images: Vec<RawImage<'_>> = jobs
            .iter()
            .map(|j| RawImage {
                width: j.image.width,
                height: j.image.height,
                channels: j.image.channels,
                pixels: &j.image.pixels,
            })
            .collect();
        let labels: Vec<LabelId> = jobs.iter().map(|j| LabelId(j.label)).collect();
        self.bundle
            .score_images(&images, &labels)
            .into_iter()
            .map(|r| match r {
                Ok(result) => Ok(self.to_score(result)),
                Err(diffguard_engine::EngineError::InvalidInput(m)) => {
                    Err(DetectorError::InvalidInput(m))
                }
                Err(e) => Err(DetectorError::Engine(e.to_string())),
            })
            .collect()
    }
}
