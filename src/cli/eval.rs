//! `diffguard eval`: every detector on Fashion-MNIST test vs MNIST, Animal-MNIST and any image
//! folders, written as results.json, results.md, roc.png and report.html.

use std::path::PathBuf;

use clap::Args;
use diffguard_engine::data::data_dir;
use diffguard_engine::eval::report::write_outputs;
use diffguard_engine::eval::run::{EvalConfig, evaluate};

/// Flags of `diffguard eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    /// Bundle folder (bundle.json + weights); defaults to the project's
    /// models/fashion-mnist-latent.
    #[arg(long, env = "DIFFGUARD_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// Data folder filled by scripts/fetch-data.sh (fashion-mnist/, mnist/, animal-mnist/).
    #[arg(long, env = "DIFFGUARD_DATA")]
    pub data: Option<PathBuf>,
    /// Output folder; it also holds scores.jsonl, the per-image cache a rerun resumes from.
    #[arg(long, env = "DIFFGUARD_EVAL_OUT", default_value = "eval-out")]
    pub out: PathBuf,
    /// Images per test set: a seeded stratified subset.
    #[arg(long, env = "DIFFGUARD_EVAL_PER_SET", default_value_t = 1000)]
    pub per_set: usize,
    /// Evaluate every image of every set (overrides --per-set).
    #[arg(long, env = "DIFFGUARD_EVAL_ALL")]
    pub all: bool,
    /// Validation images for the cascade thresholds (with --all: the whole 5k split).
    #[arg(long, env = "DIFFGUARD_EVAL_VAL_SIZE", default_value_t = 1000)]
    pub val_size: usize,
    /// Training images whose penultimate features form the KNN bank and fit ViM.
    #[arg(long, env = "DIFFGUARD_EVAL_BANK", default_value_t = 10_000)]
    pub bank: usize,
    /// Seed of the stratified subsets.
    #[arg(long, env = "DIFFGUARD_EVAL_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Extra OOD set: an image folder laid out ROOT/CLASS/IMAGE (repeatable).
    #[arg(
        long = "ood-folder",
        env = "DIFFGUARD_EVAL_OOD_FOLDERS",
        value_delimiter = ','
    )]
    pub ood_folders: Vec<PathBuf>,
    /// DiffGuard variants: recipe, dsg (the Grad-CAM mask toggled), clean-grad, aes (early stop
    /// toggled); comma-separated; default: all that apply.
    #[arg(long, env = "DIFFGUARD_EVAL_VARIANTS", value_delimiter = ',')]
    pub variants: Vec<String>,
    /// Images per DiffGuard batch.
    #[arg(long, env = "DIFFGUARD_EVAL_BATCH", default_value_t = 32)]
    pub batch: usize,
    /// Gallery images per end (most / least in-distribution) per set in report.html.
    #[arg(long, env = "DIFFGUARD_EVAL_GALLERY", default_value_t = 4)]
    pub gallery: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, env = "DIFFGUARD_DEVICE", default_value = "cpu")]
    pub device: String,
}

/// Runs the evaluation and writes the output folder; prints the Markdown table.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let bundle_dir = args.bundle.clone().unwrap_or_else(super::default_bundle);
    let bundle = super::open_bundle_uncalibrated(&bundle_dir, &args.device)?;
    let mut cfg = EvalConfig::new(args.data.clone().unwrap_or_else(data_dir));
    cfg.per_set = super::subset_size(args.per_set, args.all);
    cfg.val_size = super::subset_size(args.val_size, args.all);
    cfg.bank_size = args.bank;
    cfg.seed = args.seed;
    cfg.ood_folders = args.ood_folders.clone();
    cfg.variants = args.variants.clone();
    cfg.batch_size = args.batch;
    cfg.gallery_per_end = args.gallery;
    std::fs::create_dir_all(&args.out)?;
    let results = evaluate(&bundle, &cfg, &args.out.join("scores.jsonl"))?;
    let command: Vec<String> = std::env::args().collect();
    write_outputs(&results, &args.out, &command.join(" "))?;
    println!("{}", results.table()?.to_markdown());
    println!(
        "wrote {}/{{results.json,results.md,roc.png,report.html}} ({} DiffGuard scores computed, {} from the cache)",
        args.out.display(),
        results.cache.computed,
        results.cache.cached
    );
    Ok(())
}
