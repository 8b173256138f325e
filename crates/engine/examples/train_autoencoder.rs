//! Trains the project's continuous f=4 autoencoder (28×28 → 7×7×3) on Fashion-MNIST, the first
//! stage of the latent prior (resumable; kill it and rerun the same command to continue).
//!
//! ```text
//! cargo run --release -p diffguard-engine --example train_autoencoder -- --out models/fmnist-ae \
//!     --budget-mins 30 [--steps 3000] [--batch 32] [--lr 1e-3] [--seed 0] [--channels 32] \
//!     [--res-blocks 1] [--mult 1,2,2] [--limit N] [--test-limit N] [--no-progress]
//! cargo run --release -p diffguard-engine --example train_autoencoder -- --out /tmp/p \
//!     --profile 32,64 [--profile-steps 5]
//! ```

#[path = "train_common/args.rs"]
mod args;

use diffguard_engine::models::vq::VqConfig;
use diffguard_engine::train::recipes::{profile_autoencoder, train_autoencoder};

fn main() {
    args::main_with(run);
}

fn run() -> Result<(), String> {
    let flags = args::Flags::parse()?;
    let args = flags.recipe(3_000, 32, 1e-3)?;
    let mut vq = VqConfig::fashion_mnist();
    vq.ddconfig.ch = flags.get("channels", vq.ddconfig.ch)?;
    vq.ddconfig.num_res_blocks = flags.get("res-blocks", vq.ddconfig.num_res_blocks)?;
    vq.ddconfig.ch_mult = flags.list("mult", &vq.ddconfig.ch_mult)?;
    if flags.has("profile") {
        let batches = flags.list("profile", &[32, 64])?;
        let steps = flags.get("profile-steps", 5u64)?;
        let timings =
            profile_autoencoder(&args, &vq, &batches, steps).map_err(|e| e.to_string())?;
        args::print_timings(&format!("autoencoder {:?}", vq.ddconfig), &timings);
        return Ok(());
    }
    let report = train_autoencoder(&args, &vq).map_err(|e| e.to_string())?;
    println!(
        "{} params, step {}/{} ({}), {:.0} s total, test reconstruction {:.2} dB; weights in {}",
        report.parameters,
        report.step,
        report.total_steps,
        report.stopped_by,
        report.wall_secs,
        report.test_recon_psnr.unwrap_or(f64::NAN),
        args.out.join("model.safetensors").display()
    );
    Ok(())
}
