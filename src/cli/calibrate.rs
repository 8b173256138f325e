//! `diffguard calibrate`: global and per-class thresholds at a target false-reject rate on the
//! Fashion-MNIST validation split, stamped with the bundle's detector fingerprint.

use std::path::PathBuf;

use clap::Args;
use diffguard_engine::data::data_dir;
use diffguard_engine::eval::calibration::{
    CalibrationConfig, calibrate_bundle, install_thresholds, summary,
};

/// Flags of `diffguard calibrate`.
#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    /// Bundle folder (bundle.json + weights); defaults to the project's
    /// models/fashion-mnist-latent.
    #[arg(long, env = "DIFFGUARD_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// Data folder filled by scripts/fetch-data.sh.
    #[arg(long, env = "DIFFGUARD_DATA")]
    pub data: Option<PathBuf>,
    /// Thresholds file to write; default BUNDLE/thresholds.json.
    #[arg(long, env = "DIFFGUARD_CALIBRATE_OUT")]
    pub out: Option<PathBuf>,
    /// Validation images (seeded stratified subset of the 5k split).
    #[arg(long, env = "DIFFGUARD_CALIBRATE_PER_SET", default_value_t = 5000)]
    pub per_set: usize,
    /// Use the whole validation split (overrides --per-set).
    #[arg(long, env = "DIFFGUARD_CALIBRATE_ALL")]
    pub all: bool,
    /// Seed of the subset.
    #[arg(long, env = "DIFFGUARD_CALIBRATE_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Target in-distribution false-reject rate, a fraction (0.05 = 5%).
    #[arg(long, env = "DIFFGUARD_TARGET_FRR", default_value_t = 0.05)]
    pub target_frr: f64,
    /// Classes with fewer validation images than this use the global threshold.
    #[arg(long, env = "DIFFGUARD_CALIBRATE_MIN_PER_CLASS", default_value_t = 50)]
    pub min_per_class: usize,
    /// Point bundle.json's `thresholds` at the written file (it must lie inside the bundle).
    #[arg(long, env = "DIFFGUARD_CALIBRATE_INSTALL")]
    pub install: bool,
    /// Per-image score cache (resumable); default OUT with extension .scores.jsonl.
    #[arg(long, env = "DIFFGUARD_CALIBRATE_CACHE")]
    pub cache: Option<PathBuf>,
    /// Images per DiffGuard batch.
    #[arg(long, env = "DIFFGUARD_EVAL_BATCH", default_value_t = 32)]
    pub batch: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "DIFFGUARD_DEVICE", default_value = "cpu")]
    pub device: String,
}

/// Calibrates, writes the thresholds file and reports the achieved rates.
pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    let bundle_dir = args.bundle.clone().unwrap_or_else(super::default_bundle);
    // The old thresholds may belong to other weights; calibration must not depend on them.
    let bundle = super::open_bundle_uncalibrated(&bundle_dir, &args.device)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| bundle_dir.join("thresholds.json"));
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| out.with_extension("scores.jsonl"));
    let mut cfg = CalibrationConfig::new(args.data.clone().unwrap_or_else(data_dir));
    cfg.val_size = super::subset_size(args.per_set, args.all);
    cfg.seed = args.seed;
    cfg.target_false_reject_rate = args.target_frr;
    cfg.min_per_class = args.min_per_class;
    cfg.batch_size = args.batch;
    let cal = calibrate_bundle(&bundle, &cfg, &cache)?;
    cal.thresholds.save(&out)?;
    print!("{}", summary(&cal.thresholds, &bundle.manifest.labels));
    println!(
        "wrote {} for detector {}",
        out.display(),
        cal.thresholds.detector_fingerprint
    );
    if args.install {
        let rel = out.strip_prefix(&bundle_dir).map_err(|_| {
            anyhow::anyhow!(
                "--install needs the thresholds file inside the bundle folder {}",
                bundle_dir.display()
            )
        })?;
        install_thresholds(&bundle_dir, &rel.to_string_lossy())?;
        println!("bundle.json now points at {}", rel.display());
    }
    Ok(())
}
