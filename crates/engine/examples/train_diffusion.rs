//! Trains the class-conditional pixel DDPM on Fashion-MNIST, or with `--latent AE_DIR` the latent
//! DDPM on the 7×7×3 latents of an autoencoder from `train_autoencoder` (resumable; kill it and
//! rerun the same command to continue).
//!
//! ```text
//! cargo run --release -p diffguard-engine --example train_diffusion -- --out models/fmnist-ddpm \
//!     --budget-mins 170 [--steps 40000] [--batch 64] [--lr 2e-4] [--seed 0] [--channels 32] \
//!     [--res-blocks 2] [--mult 1,2,2] [--limit N] [--no-progress] [--latent models/fmnist-ae]
//! cargo run --release -p diffguard-engine --example train_diffusion -- --out /tmp/p \
//!     --profile 16,32,64 [--profile-steps 5] [--latent [AE_DIR]]
//! ```
//!
//! With `--latent` the UNet defaults are the latent preset (64 channels, one 7×7 level, 2 blocks);
//! `--profile` with a bare `--latent` times steps on N(0, 1) latents, no autoencoder needed.

#[path = "train_common/args.rs"]
mod args;

use std::path::PathBuf;

use diffguard_engine::models::pixel_unet::PixelUNetConfig;
use diffguard_engine::train::recipes::{
    profile_diffusion, profile_latent_diffusion, train_diffusion, train_latent_diffusion,
};

fn main() {
    args::main_with(run);
}

fn run() -> Result<(), String> {
    let flags = args::Flags::parse()?;
    let args = flags.recipe(40_000, 64, 2e-4)?;
    let latent = flags.has("latent");
    let ae_dir = Some(flags.get("latent", String::new())?)
        .filter(|d| latent && !d.is_empty())
        .map(PathBuf::from);
    let (kind, mut unet) = if latent {
        ("latent", PixelUNetConfig::fashion_mnist_latent())
    } else {
        ("pixel", PixelUNetConfig::fashion_mnist())
    };
    unet.model_channels = flags.get("channels", unet.model_channels)?;
    unet.num_res_blocks = flags.get("res-blocks", unet.num_res_blocks)?;
    unet.channel_mult = flags.list("mult", &unet.channel_mult)?;
    unet.num_head_channels = unet.num_head_channels.min(unet.model_channels);
    if flags.has("profile") {
        let batches = flags.list("profile", &[16, 32, 64])?;
        let steps = flags.get("profile-steps", 5u64)?;
        let timings = if latent {
            profile_latent_diffusion(&args, ae_dir.as_deref(), &unet, &batches, steps)
        } else {
            profile_diffusion(&args, &unet, &batches, steps)
        }
        .map_err(|e| e.to_string())?;
        args::print_timings(&format!("{kind} DDPM {unet:?}"), &timings);
        return Ok(());
    }
    let report = match (latent, &ae_dir) {
        (false, _) => train_diffusion(&args, &unet),
        (true, Some(dir)) => train_latent_diffusion(&args, dir, &unet),
        (true, None) => return Err("--latent AE_DIR: the trained autoencoder's folder".into()),
    }
    .map_err(|e| e.to_string())?;
    println!(
        "{} params, step {}/{} ({}), {:.0} s total; weights in {}",
        report.parameters,
        report.step,
        report.total_steps,
        report.stopped_by,
        report.wall_secs,
        args.out.join("model.safetensors").display()
    );
    Ok(())
}
