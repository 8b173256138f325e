//! Per-image speed of the whole DiffGuard pipeline (issue 2) on the project's own bundle, per
//! recipe variant: images/s, network evaluations per image and peak memory, plus every image's
//! score so that `scripts/torch_pipeline.py` (the same computation in PyTorch, structured like
//! the official code) can be checked against it. `scripts/bench_pipeline_vs_torch.sh` runs both
//! in one go and writes the ratio table.
//!
//! `cargo run --release -p diffguard-engine --example bench_pipeline --
//!     [--bundle DIR] [--images 64] [--batch 32] [--reps 3] [--threads 1]
//!     [--variants recipe,aes,clean-grad,aes+clean-grad] [--jsonl PATH] [--device cpu|cuda:N]`
//!
//! The images are the first `--images` of the Fashion-MNIST test split (`$DIFFGUARD_DATA`, see
//! `scripts/fetch-data.sh`), scored against the labels the classifier predicts, `--batch` at a
//! time, as the guard's batcher would. Every (variant, threads) runs in a fresh child process
//! (rayon's pool size is fixed at first use, and the peak-RSS reading must not see memory an
//! earlier case left behind). Per case: one warm-up batch, then `--reps` timed passes over all
//! images; reported are the medians of process CPU time and wall time per image.
//!
//! `--device cuda` (a `--features cuda` build) runs the detector on the GPU; wall time is then the
//! figure that counts (scores come back to the host at the end of every batch, which waits for
//! the GPU), and the JSONL scores can be held against a CPU run of the same images.

#[path = "bench_common/child.rs"]
mod child;
#[path = "bench_common/cli.rs"]
mod cli;
#[path = "bench_common/clock.rs"]
mod clock;
#[path = "bench_common/rss.rs"]
mod rss;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use child::{append_line, run_child};
use cli::{flag_value, median};
use clock::cpu_ns;
use diffguard_engine::bundle::{Bundle, device_from_name};
use diffguard_engine::data::{FashionSplit, PixelRange, data_dir, fashion_mnist};
use diffguard_engine::eval::variants::variant;
use diffguard_engine::pipeline::{DiffGuard, ImageResult};
use diffguard_engine::recipe::Recipe;
use rss::{peak_delta_mib, reset_peak_rss, status_kib};

type Res<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn arg<'a>(args: &'a [String], flag: &str, default: &'a str) -> &'a str {
    flag_value(args, flag).unwrap_or(default)
}

fn default_bundle() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(diffguard_engine::bundle::DEFAULT_BUNDLE)
}

/// `a+b`: variant `b` applied on top of variant `a` (e.g. `aes+clean-grad`, the paper's GDM
/// combination of adaptive early stop and Clean Grad).
fn combined_variant(base: &Recipe, id: &str) -> Res<(Recipe, String)> {
    let mut recipe = base.clone();
    let mut names = Vec::new();
    for part in id.split('+') {
        let v = variant(&recipe, part)?
            .ok_or_else(|| format!("variant {part} does not apply to this bundle's recipe"))?;
        recipe = v.recipe;
        names.push(v.name);
    }
    let name = names.join(" + ").replace(" + DiffGuard + ", " + ");
    Ok((recipe, name))
}

/// One timed pass over all images, `batch` at a time.
fn pass(det: &DiffGuard, x: &Tensor, batch: usize) -> Res<Vec<ImageResult>> {
    let n = x.dim(0)?;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(batch) {
        let len = batch.min(n - start);
        out.extend(det.score(&x.narrow(0, start, len)?, None)?);
    }
    Ok(out)
}

fn mean_of(results: &[ImageResult], f: impl Fn(&ImageResult) -> usize) -> f64 {
    results.iter().map(&f).sum::<usize>() as f64 / results.len().max(1) as f64
}

fn child(args: &[String], variant_id: &str, threads: &str) -> Res<String> {
    let bundle_dir = flag_value(args, "--bundle").map_or_else(default_bundle, PathBuf::from);
    let images: usize = arg(args, "--images", "64").parse()?;
    let batch: usize = arg(args, "--batch", "32").parse()?;
    let reps: usize = arg(args, "--reps", "3").parse::<usize>()?.max(1);
    let device_name = arg(args, "--device", "cpu");
    let device = device_from_name(device_name)?;
    let bundle = Bundle::open_uncalibrated(&bundle_dir, &device)?;
    let (recipe, name) = combined_variant(&bundle.manifest.recipe, variant_id)?;
    let det = bundle.detector.with_recipe(recipe.clone())?;
    let test = fashion_mnist(&data_dir().join("fashion-mnist"), FashionSplit::Test)?;
    let idx: Vec<usize> = (0..images.min(test.len())).collect();
    let x = test.batch_tensor(&idx, PixelRange::MinusOneOne, &device)?;
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
    let peak_ok = reset_peak_rss();
    let base_kib = status_kib("VmRSS:");
    let t_warm = Instant::now();
    pass(&det, &x.narrow(0, 0, batch.min(idx.len()))?, batch)?;
    let warm_s = t_warm.elapsed().as_secs_f64();
    let (mut wall, mut cpu) = (vec![], vec![]);
    let mut results = Vec::new();
    for _ in 0..reps {
        let (t0, c0) = (Instant::now(), cpu_ns());
        results = pass(&det, &x, batch)?;
        cpu.push((cpu_ns() - c0) as f64 / 1e6 / idx.len() as f64);
        wall.push(t0.elapsed().as_secs_f64() * 1e3 / idx.len() as f64);
    }
    let peak = peak_delta_mib(peak_ok, base_kib);
    let scores: Vec<f64> = results.iter().map(|r| r.score).collect();
    let k_star: Vec<Option<usize>> = results.iter().map(|r| r.k_star).collect();
    let labels: Vec<u32> = results.iter().map(|r| r.label.0).collect();
    let line = serde_json::json!({
        "impl": "ours",
        "structure": "batched",
        "variant": variant_id,
        "name": name,
        "threads": threads.parse::<usize>()?,
        "device": device_name,
        "images": idx.len(),
        "batch": batch,
        "reps": reps,
        "cpu_ms_per_image": median(&mut cpu),
        "wall_ms_per_image": median(&mut wall),
        "warmup_s": warm_s,
        "peak_delta_mib": peak,
        "nfe": {
            "denoiser": mean_of(&results, |r| r.nfe.denoiser),
            "classifier_forward": mean_of(&results, |r| r.nfe.classifier_forward),
            "classifier_backward": mean_of(&results, |r| r.nfe.classifier_backward),
        },
        "recipe": recipe,
        "labels": labels,
        "k_star": k_star,
        "scores": scores,
    });
    Ok(line.to_string())
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Ok(case) = std::env::var("BENCH_PIPELINE_CHILD") {
        // As the diffguard binary runs the detector.
        diffguard_engine::malloc::keep_large_buffers();
        let (variant_id, threads) = case
            .split_once(':')
            .ok_or_else(|| format!("bad child case {case}"))?;
        println!("{}", child(&args, variant_id, threads)?);
        return Ok(());
    }
    let variants = arg(&args, "--variants", "recipe,aes,clean-grad,aes+clean-grad");
    let threads = arg(&args, "--threads", "1");
    let jsonl = flag_value(&args, "--jsonl");
    println!(
        "DiffGuard pipeline, f32 on {}, engine. ms/img = median over passes of process CPU (wall) \
         time per image; nfe = network rows per image (denoiser / classifier fwd / bwd)",
        arg(&args, "--device", "cpu")
    );
    println!(
        "| variant | thr | images | batch | cpu ms/img | wall ms/img | img/s (cpu) | nfe | peak MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for v in variants.split(',').filter(|s| !s.is_empty()) {
        for thr in threads.split(',').filter(|s| !s.is_empty()) {
            let (line, j) = run_child(
                &args[1..],
                "BENCH_PIPELINE_CHILD",
                &format!("{v}:{thr}"),
                thr,
            )?;
            let num = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
            let nfe = |k: &str| j["nfe"][k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {} | {thr} | {} | {} | {:.1} | {:.1} | {:.2} | {:.1} / {:.1} / {:.1} | {} |",
                j["name"].as_str().unwrap_or(v),
                j["images"],
                j["batch"],
                num("cpu_ms_per_image"),
                num("wall_ms_per_image"),
                1e3 / num("cpu_ms_per_image"),
                nfe("denoiser"),
                nfe("classifier_forward"),
                nfe("classifier_backward"),
                j["peak_delta_mib"]
                    .as_f64()
                    .map_or("n/a".into(), |m| format!("{m:.1}")),
            );
            if let Some(path) = jsonl {
                append_line(path, &line)?;
            }
        }
    }
    Ok(())
}
