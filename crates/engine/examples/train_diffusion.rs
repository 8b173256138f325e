//! Trains the class-conditional pixel DDPM on Fashion-MNIST (resumable; kill it and rerun the
//! same command to continue).
//!
//! ```text
//! cargo run --release -p diffguard-engine --example train_diffusion -- --out models/fmnist-ddpm \
//!     --budget-mins 170 [--steps 40000] [--batch 64] [--lr 2e-4] [--seed 0] [--channels 32] \
//!     [--res-blocks 2] [--mult 1,2,2] [--limit N] [--no-progress]
//! cargo run --release -p diffguard-engine --example train_diffusion -- --out /tmp/p \
//!     --profile 16,32,64 [--profile-steps 5]
//! ```

#[path = "train_common/args.rs"]
mod args;

use diffguard_engine::models::pixel_unet::PixelUNetConfig;
use diffguard_engine::train::recipes::{profile_diffusion, train_diffusion};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let flags = args::Flags::parse()?;
    let args = flags.recipe(40_000, 64, 2e-4)?;
    let mut unet = PixelUNetConfig::fashion_mnist();
    unet.model_channels = flags.get("channels", unet.model_channels)?;
    unet.num_res_blocks = flags.get("res-blocks", unet.num_res_blocks)?;
    unet.channel_mult = flags.list("mult", &unet.channel_mult)?;
    unet.num_head_channels = unet.num_head_channels.min(unet.model_channels);
    if flags.has("profile") {
        let batches = flags.list("profile", &[16, 32, 64])?;
        let steps = flags.get("profile-steps", 5u64)?;
        let timings =
            profile_diffusion(&args, &unet, &batches, steps).map_err(|e| e.to_string())?;
        println!(
            "pixel DDPM {unet:?}, {} threads",
            candle_core::utils::get_num_threads()
        );
        for t in timings {
            println!(
                "batch {:4}: {:.3} s/step wall, {:.1} images/s, {:.3} CPU-s/step",
                t.batch,
                t.secs_per_step,
                t.images_per_sec,
                t.cpu_secs_per_step.unwrap_or(f64::NAN)
            );
        }
        return Ok(());
    }
    let report = train_diffusion(&args, &unet).map_err(|e| e.to_string())?;
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
