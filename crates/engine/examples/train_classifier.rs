//! Trains the small ResNet classifier on Fashion-MNIST train (55k) and reports its accuracy on
//! the official 10k test images (resumable; rerun the same command to continue).
//!
//! ```text
//! cargo run --release -p diffguard-engine --example train_classifier -- --out models/fmnist-resnet \
//!     --budget-mins 60 [--steps 8000] [--batch 128] [--lr 2e-3] [--seed 0] \
//!     [--widths 32,64,128] [--layers 2,2,2] [--limit N] [--no-progress]
//! cargo run --release -p diffguard-engine --example train_classifier -- --out /tmp/p \
//!     --profile 64,128,256 [--profile-steps 5]
//! ```

#[path = "train_common/args.rs"]
mod args;

use diffguard_engine::train::recipes::{fashion_resnet, profile_classifier, train_classifier};

fn main() {
    args::main_with(run);
}

fn run() -> Result<(), String> {
    let flags = args::Flags::parse()?;
    let args = flags.recipe(8_000, 128, 2e-3)?;
    let net = fashion_resnet(
        flags.list("widths", &[32, 64, 128])?,
        flags.list("layers", &[2, 2, 2])?,
    );
    if flags.has("profile") {
        let batches = flags.list("profile", &[64, 128, 256])?;
        let steps = flags.get("profile-steps", 5u64)?;
        let timings =
            profile_classifier(&args, &net, &batches, steps).map_err(|e| e.to_string())?;
        let title = format!("ResNet widths {:?} layers {:?}", net.widths, net.layers);
        args::print_timings(&title, &timings);
        return Ok(());
    }
    let report = train_classifier(&args, &net).map_err(|e| e.to_string())?;
    println!(
        "{} params, step {}/{} ({}), {:.0} s total, test accuracy {:.4} (EMA) / {:.4} (raw); weights in {}",
        report.parameters,
        report.step,
        report.total_steps,
        report.stopped_by,
        report.wall_secs,
        report.test_accuracy.unwrap_or(f64::NAN),
        report.test_accuracy_raw.unwrap_or(f64::NAN),
        args.out.join("model.safetensors").display()
    );
    Ok(())
}
