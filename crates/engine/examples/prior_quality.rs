//! The three quality numbers of a bundle's diffusion prior (models/README.md), measured with the
//! engine's own DDIM: (a) the bundle classifier's accuracy on class-conditional CFG samples, per
//! class; (b) reconstruction error of unconditional DDIM inversion + sampling on held-out test
//! images, at the recipe's inversion depth and deeper; (c) a sample grid PNG (one row per class).
//!
//! A latent bundle (`ldm` recipe + autoencoder) samples and inverts in latent space, without x̂0
//! clipping, and decodes; (b) then also prints the autoencoder's own reconstruction, the floor
//! the prior cannot beat.
//!
//! ```text
//! cargo run --release -p diffguard-engine --example prior_quality -- \
//!     [--bundle models/fashion-mnist-latent] [--per-class 20] [--steps 25] [--scale 3] \
//!     [--recon 200] [--depths 12,19] [--grid models/fashion-mnist-latent/samples.png] [--seed 0] \
//!     [--device cpu|cuda:N]
//! ```

// Shared with the train_* examples; this one needs only the flag parsing.
#[allow(dead_code)]
#[path = "train_common/args.rs"]
mod args;

use std::path::PathBuf;

use candle_core::{D, Tensor};
use diffguard_engine::bundle::{Bundle, device_from_name};
use diffguard_engine::data::{FashionSplit, PixelRange, fashion_mnist};
use diffguard_engine::eval::quality::{mse_psnr, reconstruct, sample};
use diffguard_engine::recipe::Recipe;
use diffguard_engine::schedule::SpacedSchedule;
use diffguard_engine::similarity::to_unit;
use diffguard_engine::train::recipes::default_fashion_dir;
use diffguard_engine::{Autoencoder, Classifier, LabelId};

type Res<T> = Result<T, String>;

fn main() {
    args::main_with(run);
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn run() -> Res<()> {
    let flags = args::Flags::parse()?;
    let dir: PathBuf = flags.get(
        "bundle",
        PathBuf::from(diffguard_engine::bundle::DEFAULT_BUNDLE),
    )?;
    let device = device_from_name(&flags.get("device", String::from("cpu"))?).map_err(err)?;
    let bundle = Bundle::open_uncalibrated(&dir, &device).map_err(err)?;
    let prior = Prior::of(&bundle)?;
    let steps = flags.get("steps", 25usize)?;
    let sched = prior.schedule(steps)?;
    println!("bundle {} · DDIM-{steps}", dir.display());
    sample_accuracy(&flags, &bundle, &prior, &sched)?;
    reconstruction(&flags, &bundle, &prior)?;
    Ok(())
}

/// What the measurements need from the bundle's recipe: the schedule, the recipe's own DDIM
/// length and inversion depth, and whether the prior lives in pixel or latent space.
struct Prior<'a> {
    beta: diffguard_engine::schedule::BetaSchedule,
    diffusion_steps: usize,
    ddim_steps: usize,
    /// Spaced steps the recipe inverts.
    depth: usize,
    latent: Option<&'a dyn Autoencoder>,
}

impl<'a> Prior<'a> {
    fn of(bundle: &'a Bundle) -> Res<Self> {
        match (&bundle.manifest.recipe, &bundle.autoencoder) {
            (Recipe::PixelCfg(r), None) => Ok(Self {
                beta: r.beta_schedule,
                diffusion_steps: r.diffusion_steps,
                ddim_steps: r.ddim_steps,
                depth: r.ddim_steps - r.early_stop_steps,
                latent: None,
            }),
            (Recipe::Ldm(r), Some(ae)) => Ok(Self {
                beta: r.beta_schedule,
                diffusion_steps: r.diffusion_steps,
                ddim_steps: r.ddim_steps,
                // The last level is pure noise: a full inversion is measured one level short.
                depth: r
                    .inversion_steps
                    .unwrap_or(r.ddim_steps)
                    .min(r.ddim_steps - 1),
                latent: Some(ae.as_ref()),
            }),
            _ => Err(
                "prior_quality measures the project's own bundles: pixel-cfg (pixel prior) \
                      or ldm with an autoencoder (latent prior)"
                    .into(),
            ),
        }
    }

    /// The DDIM schedule at `steps`: the pixel recipe's respacing, or LDM's "uniform + 1".
    fn schedule(&self, steps: usize) -> Res<SpacedSchedule> {
        let s = match self.latent {
            None => SpacedSchedule::gdm(self.beta, self.diffusion_steps, steps),
            Some(_) => SpacedSchedule::ldm(self.beta, self.diffusion_steps, steps),
        };
        s.map_err(err)
    }

    fn clip(&self) -> bool {
        self.latent.is_none()
    }

    fn encode(&self, x: &Tensor) -> Res<Tensor> {
        match self.latent {
            None => Ok(x.clone()),
            Some(ae) => ae.encode(x).map_err(err),
        }
    }

    /// Back to images in [-1, 1].
    fn decode(&self, z: Tensor) -> Res<Tensor> {
        match self.latent {
            None => Ok(z),
            Some(ae) => ae
                .decode(&z)
                .and_then(|x| Ok(x.clamp(-1f32, 1f32)?))
                .map_err(err),
        }
    }
}

/// Samples `per-class` images of every class, classifies them, prints per-class accuracy and
/// optionally writes the grid.
fn sample_accuracy(
    flags: &args::Flags,
    bundle: &Bundle,
    prior: &Prior,
    sched: &SpacedSchedule,
) -> Res<()> {
    let per_class = flags.get("per-class", 20usize)?;
    let scale = flags.get("scale", 3.0f64)?;
    let seed = flags.get("seed", 0u64)?;
    let cfg = &bundle.manifest.denoiser.pixel_unet;
    let chw = [cfg.in_channels, cfg.image_size, cfg.image_size];
    let classes = cfg.num_classes;
    let started = std::time::Instant::now();
    let mut rows = Vec::with_capacity(classes);
    let mut correct = Vec::with_capacity(classes);
    for c in 0..classes {
        let labels = vec![LabelId(c as u32); per_class];
        let x = sample(
            bundle.denoiser.as_ref(),
            sched,
            &labels,
            chw,
            scale,
            seed + c as u64,
            prior.clip(),
            &bundle.device,
        )
        .map_err(err)?;
        let x01 = to_unit(&prior.decode(x)?).map_err(err)?;
        let pred = predictions(bundle, &x01)?;
        correct.push(pred.iter().filter(|&&p| p == c as u32).count());
        rows.push(x01);
    }
    println!(
        "\n(a) classifier accuracy on DDIM-{} CFG-{scale} samples ({per_class} per class, {:.0} s)",
        sched.len(),
        started.elapsed().as_secs_f64()
    );
    println!("| class | label | accuracy |\n|---|---|---|");
    for (c, n) in correct.iter().enumerate() {
        let name = &bundle.manifest.labels[c];
        println!(
            "| {c} | {name} | {:.1} % |",
            100.0 * *n as f64 / per_class as f64
        );
    }
    let total: usize = correct.iter().sum();
    println!(
        "| all | | **{:.1} %** |",
        100.0 * total as f64 / (per_class * classes) as f64
    );
    if flags.has("grid") {
        let path: PathBuf = flags.get("grid", PathBuf::from("samples.png"))?;
        write_grid(&rows, per_class.min(10), &path)?;
        println!("grid: {}", path.display());
    }
    Ok(())
}

/// The bundle classifier's label for each image of `x01` (\[0, 1\]).
fn predictions(bundle: &Bundle, x01: &Tensor) -> Res<Vec<u32>> {
    let logits = bundle.classifier.forward(x01).map_err(err)?.logits;
    logits
        .argmax(D::Minus1)
        .and_then(|p| p.to_vec1())
        .map_err(err)
}

/// One row per class, `cols` samples each, grey PNG.
fn write_grid(rows: &[Tensor], cols: usize, path: &std::path::Path) -> Res<()> {
    let row_imgs: Vec<Tensor> = rows
        .iter()
        .map(|r| {
            // (N,1,H,W) → first `cols` side by side: (H, cols·W)
            let r = r.narrow(0, 0, cols)?.squeeze(1)?;
            let (n, h, w) = r.dims3()?;
            r.transpose(0, 1)?.reshape((h, n * w))
        })
        .collect::<candle_core::Result<_>>()
        .map_err(err)?;
    let grid = Tensor::cat(&row_imgs, 0).map_err(err)?;
    let (h, w) = grid.dims2().map_err(err)?;
    let px: Vec<u8> = (grid * 255.0)
        .and_then(|g| g.clamp(0f32, 255f32))
        .and_then(|g| g.round())
        .and_then(|g| g.flatten_all())
        .and_then(|g| g.to_vec1::<f32>())
        .map_err(err)?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    image::GrayImage::from_raw(w as u32, h as u32, px)
        .ok_or("grid buffer size mismatch")?
        .save(path)
        .map_err(err)
}

/// Inversion + reconstruction on a stratified subset of the test split, at several depths of the
/// bundle recipe's own schedule.
fn reconstruction(flags: &args::Flags, bundle: &Bundle, prior: &Prior) -> Res<()> {
    let n = flags.get("recon", 200usize)?;
    let sched = prior.schedule(prior.ddim_steps)?;
    // The recipe's own inversion depth, and for the pixel prior the deepest level too, which shows
    // the prior's own faithfulness.
    let mut depths = flags.list("depths", &[prior.depth, prior.ddim_steps - 1])?;
    depths.dedup();
    let test = fashion_mnist(&default_fashion_dir(), FashionSplit::Test)
        .and_then(|d| d.stratified(n, 0))
        .map_err(err)?;
    let x0 = test
        .to_tensor(PixelRange::MinusOneOne, &bundle.device)
        .map_err(err)?;
    println!(
        "\n(b) DDIM-{} inversion + reconstruction, {} test images (unconditional, no guidance)",
        prior.ddim_steps,
        test.len()
    );
    println!(
        "| depth (steps) | timestep | MSE [-1,1] mean | PSNR mean | PSNR median |\n|---|---|---|---|---|"
    );
    if prior.latent.is_some() {
        let r = prior.decode(prior.encode(&x0)?)?;
        let errs = mse_psnr(&r, &x0).map_err(err)?;
        print_errors("autoencoder only", "-", &errs);
        // The ceiling of (a): how much the classifier still recognises after the first stage.
        let acc = |x: &Tensor| -> Res<f64> {
            let pred = predictions(bundle, &to_unit(x).map_err(err)?)?;
            let right = pred
                .iter()
                .zip(test.labels())
                .filter(|(p, l)| **p == l.0)
                .count();
            Ok(100.0 * right as f64 / pred.len().max(1) as f64)
        };
        println!(
            "(classifier accuracy on these test images {:.1} %, on their autoencoder reconstructions {:.1} %)",
            acc(&x0)?,
            acc(&r)?
        );
    }
    for depth in depths.into_iter().filter(|&d| d < sched.len()) {
        let mut errs = Vec::with_capacity(test.len());
        for start in (0..test.len()).step_by(50) {
            let len = 50.min(test.len() - start);
            let x = x0.narrow(0, start, len).map_err(err)?;
            let z = prior.encode(&x)?;
            let r = reconstruct(bundle.denoiser.as_ref(), &sched, &z, depth, prior.clip())
                .map_err(err)?;
            errs.extend(mse_psnr(&prior.decode(r)?, &x).map_err(err)?);
        }
        let t = sched.timestep(depth).map_err(err)?;
        print_errors(&depth.to_string(), &t.to_string(), &errs);
    }
    Ok(())
}

/// One table row: mean MSE, mean and median PSNR.
fn print_errors(depth: &str, timestep: &str, errs: &[(f64, f64)]) {
    let mean = |f: fn(&(f64, f64)) -> f64| errs.iter().map(f).sum::<f64>() / errs.len() as f64;
    let mut psnr: Vec<f64> = errs.iter().map(|e| e.1).collect();
    psnr.sort_by(f64::total_cmp);
    println!(
        "| {depth} | {timestep} | {:.5} | {:.2} dB | {:.2} dB |",
        mean(|e| e.0),
        mean(|e| e.1),
        psnr[psnr.len() / 2]
    );
}
