//! The calibration runner behind `diffguard calibrate`: scores the Fashion-MNIST validation split
//! with the bundle's detector (cached per image, like the evaluation), sets global and per-class
//! thresholds at a target false-reject rate with [`super::calibrate::calibrate`], stamps them with
//! the bundle's fingerprint and, on request, points `bundle.json` at the file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::cache::ScoreCache;
use super::calibrate::{
    DEFAULT_FALSE_REJECT_RATE, DEFAULT_MIN_PER_CLASS, ThresholdsFile, calibrate,
};
use super::run::{CacheStats, EvalSet, VAL_SET, classify, detector_for, diffguard_scores};
use super::variants::variant;
use crate::bundle::{Bundle, Manifest};
use crate::data::{FashionSplit, fashion_mnist};
use crate::{EngineError, LabelId, Result};

/// What to calibrate on.
#[derive(Debug, Clone)]
pub struct CalibrationConfig {
    pub data_dir: PathBuf,
    /// Validation images (stratified, seeded); `None` = the whole 5k split.
    pub val_size: Option<usize>,
    pub seed: u64,
    pub target_false_reject_rate: f64,
    pub min_per_class: usize,
    pub batch_size: usize,
    pub progress: bool,
}

impl CalibrationConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            val_size: None,
            seed: 0,
            target_false_reject_rate: DEFAULT_FALSE_REJECT_RATE,
            min_per_class: DEFAULT_MIN_PER_CLASS,
            batch_size: 32,
            progress: true,
        }
    }
}

/// The thresholds and the validation scores they were set on.
pub struct Calibration {
    pub thresholds: ThresholdsFile,
    /// Engine scores (higher = in-distribution), in validation-subset order.
    pub scores: Vec<f64>,
    pub predicted: Vec<LabelId>,
    pub cache: CacheStats,
}

/// Scores the validation subset with the bundle's own recipe and calibrates on it.
pub fn calibrate_bundle(
    bundle: &Bundle,
    cfg: &CalibrationConfig,
    cache_path: &Path,
) -> Result<Calibration> {
    let channels = bundle.manifest.classifier.resnet.in_channels;
    let full = fashion_mnist(
        &cfg.data_dir.join("fashion-mnist"),
        FashionSplit::Validation,
    )?;
    let full = if channels == 3 { full.to_rgb()? } else { full };
    let val = EvalSet::subset(VAL_SET, &full, cfg.val_size, cfg.seed)?;
    let out = classify(
        bundle.classifier.as_ref(),
        &val.data,
        cfg.batch_size,
        &bundle.device,
    )?;
    let v = variant(bundle.detector.recipe(), "recipe")?
        .ok_or_else(|| EngineError::InvalidInput("no recipe variant".into()))?;
    let d = detector_for(bundle, &v)?;
    if d.fingerprint != bundle.fingerprint {
        return Err(EngineError::Config(format!(
            "detector fingerprint {} differs from the bundle's {}",
            d.fingerprint, bundle.fingerprint
        )));
    }
    let mut cache = ScoreCache::open(cache_path)?;
    let mut stats = CacheStats::default();
    let bar = super::run::progress(cfg.progress, val.data.len(), "calibration");
    let scored = diffguard_scores(
        &d,
        &val,
        &out.predicted,
        &mut cache,
        cfg.batch_size,
        &bar,
        &mut stats,
    )?;
    bar.finish_and_clear();
    let scores: Vec<f64> = scored.iter().map(|e| e.score).collect();
    let thresholds = calibrate(
        &scores,
        &out.predicted,
        cfg.target_false_reject_rate,
        cfg.min_per_class,
        &bundle.fingerprint,
    )?;
    Ok(Calibration {
        thresholds,
        scores,
        predicted: out.predicted,
        cache: stats,
    })
}

/// Points `dir/bundle.json`'s `thresholds` at `file` (relative to the bundle folder).
pub fn install_thresholds(dir: &Path, file: &str) -> Result<()> {
    let mut m = Manifest::read(dir)?;
    m.thresholds = Some(file.to_string());
    m.write(dir)
}

/// A human-readable summary of achieved rates, one line per class.
pub fn summary(t: &ThresholdsFile, class_names: &[String]) -> String {
    let mut s = format!(
        "target false-reject rate {:.2}%; global threshold {:.6} (OOD score), achieved {:.2}% on {} images\n",
        100.0 * t.target_false_reject_rate,
        t.global.threshold,
        100.0 * t.global.achieved_false_reject_rate,
        t.global.samples
    );
    for (label, c) in &t.per_class {
        let name = class_names.get(*label as usize).map_or("?", String::as_str);
        let _ = writeln!(
            s,
            "  {label:>3} {name:<14} threshold {:.6}  achieved {:6.2}%  on {:>5} images{}",
            c.threshold,
            100.0 * c.achieved_false_reject_rate,
            c.samples,
            if c.uses_global {
                "  (too few: global)"
            } else {
                ""
            }
        );
    }
    s
}
