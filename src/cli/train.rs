//! `diffguard train classifier|diffusion|autoencoder`: the engine's training recipes on Fashion-MNIST as a
//! user command (deterministic for a seed, resumable: kill it and rerun the same command, time
//! budget, progress bar). The same recipes back the `train_*` examples of the engine crate.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use diffguard_engine::models::pixel_unet::PixelUNetConfig;
use diffguard_engine::models::vq::VqConfig;
use diffguard_engine::train::recipes::{
    RecipeArgs, TrainReport, default_fashion_dir, fashion_resnet, train_autoencoder,
    train_classifier, train_diffusion, train_latent_diffusion,
};

/// Which model to train.
#[derive(Debug, Clone, Subcommand)]
pub enum TrainCommand {
    /// The small ResNet classifier (cross-entropy, flips and ±2 px shifts, EMA).
    Classifier {
        #[command(flatten)]
        common: CommonArgs,
        /// Base width per stage (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [16, 32, 64])]
        widths: Vec<usize>,
        /// BasicBlocks per stage (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [2, 2, 2])]
        layers: Vec<usize>,
    },
    /// The class-conditional DDPM prior (ε-MSE, 10% label dropout to the null label, EMA): in
    /// pixel space, or with `--latent` on an autoencoder's latents.
    Diffusion {
        #[command(flatten)]
        common: CommonArgs,
        /// Train the latent prior on the latents of this autoencoder (a `train autoencoder`
        /// output folder) instead of the pixel prior.
        #[arg(long)]
        latent: Option<PathBuf>,
        /// Channels of the first level [pixel: 32, latent: 64].
        #[arg(long)]
        channels: Option<usize>,
        /// Res blocks per level [pixel: 1, latent: 2].
        #[arg(long)]
        res_blocks: Option<usize>,
        /// Channel multiplier per level, comma-separated [pixel: 1,2,2, latent: 1].
        #[arg(long, value_delimiter = ',')]
        mult: Option<Vec<usize>>,
    },
    /// The continuous f=4 autoencoder of the latent prior (28×28 → 7×7×3; MSE + a small latent
    /// penalty, EMA); sets its latent scale factor and reports the test reconstruction PSNR.
    Autoencoder {
        #[command(flatten)]
        common: CommonArgs,
        /// Channels of the first level.
        #[arg(long, default_value_t = 32)]
        channels: usize,
        /// ResBlocks per level (the decoder runs one more).
        #[arg(long, default_value_t = 1)]
        res_blocks: usize,
        /// Channel multiplier per level, comma-separated (two halvings: f=4).
        #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 2])]
        mult: Vec<usize>,
    },
}

/// Flags every recipe takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Output folder: checkpoint/ (resume state), model.safetensors, config.json,
    /// train-report.json. Rerunning with the same folder and settings resumes.
    #[arg(long, env = "DIFFGUARD_TRAIN_OUT")]
    pub out: PathBuf,
    /// The fashion-mnist data folder; default $DIFFGUARD_DATA/fashion-mnist.
    #[arg(long, env = "DIFFGUARD_TRAIN_FASHION")]
    pub fashion: Option<PathBuf>,
    /// Seed of initialisation, shuffles, augmentation and noise.
    #[arg(long, env = "DIFFGUARD_TRAIN_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Optimiser steps in total (the only setting a resume may change); default per model.
    #[arg(long, env = "DIFFGUARD_TRAIN_STEPS")]
    pub steps: Option<u64>,
    /// Images per step; default per model.
    #[arg(long, env = "DIFFGUARD_TRAIN_BATCH")]
    pub batch: Option<usize>,
    /// Peak learning rate; default per model.
    #[arg(long, env = "DIFFGUARD_TRAIN_LR")]
    pub lr: Option<f64>,
    /// Stop (with a checkpoint) after this many minutes; 0 = no budget.
    #[arg(long, env = "DIFFGUARD_TRAIN_BUDGET_MINS", default_value_t = 0.0)]
    pub budget_mins: f64,
    /// Minutes between checkpoints.
    #[arg(long, env = "DIFFGUARD_TRAIN_CHECKPOINT_MINS", default_value_t = 5.0)]
    pub checkpoint_mins: f64,
    /// No progress bar (logs only).
    #[arg(long, env = "DIFFGUARD_TRAIN_NO_PROGRESS")]
    pub no_progress: bool,
    /// Train on the first N training images only (smoke runs).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Evaluate on the first N test images only (smoke runs).
    #[arg(long)]
    pub test_limit: Option<usize>,
}

impl CommonArgs {
    /// The recipe arguments, with the model's defaults where a flag was not given.
    fn recipe(&self, steps: u64, batch: usize, lr: f64) -> anyhow::Result<RecipeArgs> {
        let positive = |v: f64, key: &str| -> anyhow::Result<f64> {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                anyhow::bail!("--{key} must be a non-negative number of minutes, got {v}")
            }
        };
        let budget = positive(self.budget_mins, "budget-mins")?;
        let checkpoint = positive(self.checkpoint_mins, "checkpoint-mins")?;
        Ok(RecipeArgs {
            out: self.out.clone(),
            fashion_dir: self.fashion.clone().unwrap_or_else(default_fashion_dir),
            seed: self.seed,
            steps: self.steps.unwrap_or(steps),
            batch: self.batch.unwrap_or(batch),
            lr: self.lr.unwrap_or(lr),
            budget: (budget > 0.0).then(|| Duration::from_secs_f64(budget * 60.0)),
            checkpoint_every: Duration::from_secs_f64(checkpoint.max(0.1) * 60.0),
            progress: !self.no_progress,
            train_limit: self.limit,
            test_limit: self.test_limit,
        })
    }
}

/// Trains the chosen model and prints where its weights are.
pub fn run(cmd: TrainCommand) -> anyhow::Result<()> {
    let (report, out) = match cmd {
        TrainCommand::Classifier {
            common,
            widths,
            layers,
        } => {
            let args = common.recipe(8_000, 128, 2e-3)?;
            (
                train_classifier(&args, &fashion_resnet(widths, layers))?,
                args.out,
            )
        }
        TrainCommand::Diffusion {
            common,
            latent,
            channels,
            res_blocks,
            mult,
        } => {
            let args = common.recipe(40_000, 64, 2e-4)?;
            let base = match latent {
                Some(_) => PixelUNetConfig::fashion_mnist_latent(),
                None => PixelUNetConfig {
                    num_res_blocks: 1,
                    ..PixelUNetConfig::fashion_mnist()
                },
            };
            let channels = channels.unwrap_or(base.model_channels);
            let unet = PixelUNetConfig {
                model_channels: channels,
                num_res_blocks: res_blocks.unwrap_or(base.num_res_blocks),
                channel_mult: mult.unwrap_or_else(|| base.channel_mult.clone()),
                num_head_channels: channels.min(32),
                ..base
            };
            let report = match latent {
                Some(ae) => train_latent_diffusion(&args, &ae, &unet)?,
                None => train_diffusion(&args, &unet)?,
            };
            (report, args.out)
        }
        TrainCommand::Autoencoder {
            common,
            channels,
            res_blocks,
            mult,
        } => {
            let args = common.recipe(3_000, 32, 1e-3)?;
            let mut vq = VqConfig::fashion_mnist();
            vq.ddconfig.ch = channels;
            vq.ddconfig.num_res_blocks = res_blocks;
            vq.ddconfig.ch_mult = mult;
            (train_autoencoder(&args, &vq)?, args.out)
        }
    };
    print_report(&report, &out);
    Ok(())
}

fn print_report(r: &TrainReport, out: &std::path::Path) {
    println!(
        "{}: {} parameters, step {}/{} (stopped by {}), {:.0} s in total on {}",
        r.model, r.parameters, r.step, r.total_steps, r.stopped_by, r.wall_secs, r.device
    );
    if let Some(acc) = r.test_accuracy {
        println!("test accuracy {:.2} % (EMA weights)", 100.0 * acc);
    }
    if let Some(psnr) = r.test_recon_psnr {
        println!("test reconstruction {psnr:.2} dB PSNR (EMA weights)");
    }
    println!(
        "weights: {}  (copy into a bundle folder and run `diffguard calibrate --install`)",
        out.join("model.safetensors").display()
    );
}
