//! The shipped classifiers load and reach the accuracy their training reports state, on a fixed
//! subset of the Fashion-MNIST test split: the default bundle's (`models/fashion-mnist-latent`,
//! made by the Rust trainer on a GPU) and the pixel bundle's (`models/fashion-mnist`, trained by
//! the PyTorch twin); and the default bundle's autoencoder and prior do what their reports say.
//! Wrong, truncated or mismatched weights fall to chance (~10%) and fail.

use std::path::{Path, PathBuf};

use candle_core::Device;
use diffguard_engine::data::{FashionSplit, fashion_mnist};
use diffguard_engine::models::resnet::ResNetConfig;
use diffguard_engine::train::recipes::{classifier_accuracy, default_fashion_dir};

/// Test images evaluated: the first 2,000 of the official test file (fixed, all 10 classes).
const SUBSET: usize = 2_000;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// `weights` under `config` classify the test subset at least as well as `stated` (the full test
/// set's accuracy) allows: the subset's accuracy scatters around it with binomial sd
/// sqrt(p(1-p)/2000) ≈ 0.6% at p = 0.92; 3 sd.
fn reaches_stated_accuracy(weights: &Path, config: ResNetConfig, stated: f64) {
    let fashion = default_fashion_dir();
    if !weights.exists() || !fashion.exists() {
        eprintln!(
            "SKIPPED: no weights at {} or no Fashion-MNIST at {}",
            weights.display(),
            fashion.display()
        );
        return;
    }
    let weights = candle_core::safetensors::load(weights, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let test = fashion_mnist(&fashion, FashionSplit::Test).unwrap();
    let test = test.select(&(0..SUBSET).collect::<Vec<_>>()).unwrap();
    let acc = classifier_accuracy(&weights, &config, &test).unwrap();
    let sd = (stated * (1.0 - stated) / SUBSET as f64).sqrt();
    assert!(
        acc >= stated - 3.0 * sd,
        "accuracy {acc:.4} on {SUBSET} test images, the report states {stated:.4}"
    );
}

/// A bundle's classifier (`classifier.safetensors` under the architecture in `bundle.json`) against
/// its `classifier-report.json`; returns the report.
fn bundle_classifier_reaches_its_stated_accuracy(dir: &Path) -> serde_json::Value {
    let manifest = read_json(&dir.join("bundle.json"));
    let config = serde_json::from_value(manifest["classifier"]["resnet"].clone()).unwrap();
    let report = read_json(&dir.join("classifier-report.json"));
    let stated = report["test_accuracy"].as_f64().unwrap();
    reaches_stated_accuracy(&dir.join("classifier.safetensors"), config, stated);
    report
}

/// The pixel bundle's classifier (the PyTorch twin's).
#[test]
fn pixel_bundle_classifier_reaches_its_stated_accuracy() {
    bundle_classifier_reaches_its_stated_accuracy(&models().join("fashion-mnist"));
}

/// The default bundle's classifier: the Rust trainer's GPU run, at the 92 % target.
#[test]
fn default_bundle_classifier_reaches_its_stated_accuracy() {
    let dir = models()
        .join("..")
        .join(diffguard_engine::bundle::DEFAULT_BUNDLE);
    let report = bundle_classifier_reaches_its_stated_accuracy(&dir);
    assert_eq!(report["device"], "cuda:0", "trained on the GPU");
    let stated = report["test_accuracy"].as_f64().unwrap();
    assert!(stated >= 0.92, "the issue's target is 92 %, got {stated}");
}

/// The latent bundle's autoencoder (trained by the Rust trainer on CPU) reconstructs the first
/// 2,000 test images — the images its report measured — at the PSNR the report states. The same
/// weights and ops give the same number up to summation order (threads): 0.01 dB. Wrong weights
/// fall by many dB.
#[test]
fn shipped_latent_autoencoder_reconstructs_at_its_stated_psnr() {
    use diffguard_engine::Autoencoder;
    use diffguard_engine::bundle::Bundle;
    use diffguard_engine::data::PixelRange;
    use diffguard_engine::eval::quality::mse_psnr;

    let dir = models().join("fashion-mnist-latent");
    let fashion = default_fashion_dir();
    if !dir.join("bundle.json").exists() || !fashion.exists() {
        eprintln!(
            "SKIPPED: no latent bundle or no Fashion-MNIST at {}",
            fashion.display()
        );
        return;
    }
    let bundle = Bundle::open_uncalibrated(&dir, &Device::Cpu).unwrap();
    let ae = bundle
        .autoencoder
        .as_ref()
        .expect("the latent bundle has an autoencoder");
    let stated = read_json(&dir.join("autoencoder-report.json"))["test_recon_psnr"]
        .as_f64()
        .unwrap();
    let test = fashion_mnist(&fashion, FashionSplit::Test).unwrap();
    let mut psnr = Vec::with_capacity(SUBSET);
    for start in (0..SUBSET).step_by(500) {
        let idx: Vec<usize> = (start..start + 500).collect();
        let x = test
            .batch_tensor(&idx, PixelRange::MinusOneOne, &Device::Cpu)
            .unwrap();
        let r = ae
            .decode(&ae.encode(&x).unwrap())
            .unwrap()
            .clamp(-1f32, 1f32)
            .unwrap();
        psnr.extend(mse_psnr(&r, &x).unwrap().into_iter().map(|e| e.1));
    }
    let mean = psnr.iter().sum::<f64>() / psnr.len() as f64;
    assert!(
        (mean - stated).abs() < 0.01,
        "{mean:.4} dB on {SUBSET} test images, the report states {stated:.4}"
    );
}

/// The latent bundle's prior draws samples the classifier recognises: 10 per class (DDIM-25,
/// CFG ω = 3, seeded as `prior_quality` seeds them), decoded by the bundle's autoencoder. The model
/// card states 93.5 % on 20 per class; at p ≈ 0.93 the binomial sd on 100 samples is 2.6 %, so the
/// ≥ 80 % target sits 5 sd below. Untrained or mismatched weights give about chance (10 %).
#[test]
fn shipped_latent_prior_samples_are_recognised() {
    use candle_core::D;
    use diffguard_engine::bundle::Bundle;
    use diffguard_engine::eval::quality::sample;
    use diffguard_engine::schedule::{BetaSchedule, SpacedSchedule};
    use diffguard_engine::{Autoencoder, Classifier, LabelId};

    let dir = models().join("fashion-mnist-latent");
    if !dir.join("bundle.json").exists() {
        eprintln!("SKIPPED: no latent bundle at {}", dir.display());
        return;
    }
    let bundle = Bundle::open_uncalibrated(&dir, &Device::Cpu).unwrap();
    let ae = bundle.autoencoder.as_ref().unwrap();
    let sched = SpacedSchedule::ldm(BetaSchedule::AdmLinear, 1000, 25).unwrap();
    let per_class = 10;
    let mut right = 0;
    for c in 0..10u32 {
        let labels = vec![LabelId(c); per_class];
        let z = sample(
            bundle.denoiser.as_ref(),
            &sched,
            &labels,
            [3, 7, 7],
            3.0,
            u64::from(c),
            false,
            &Device::Cpu,
        )
        .unwrap();
        let x01 =
            ((ae.decode(&z).unwrap().clamp(-1f32, 1f32).unwrap() + 1.0).unwrap() / 2.0).unwrap();
        let pred: Vec<u32> = bundle
            .classifier
            .forward(&x01)
            .unwrap()
            .logits
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        right += pred.iter().filter(|&&p| p == c).count();
    }
    let acc = right as f64 / (10 * per_class) as f64;
    assert!(acc >= 0.8, "{acc:.3} of 100 latent samples recognised");
}
