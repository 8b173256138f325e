//! The shipped classifier (`models/fashion-mnist`, the default bundle) loads and reaches the accuracy its training
//! report states, on a fixed subset of the Fashion-MNIST test split. Wrong, truncated or
//! mismatched weights fall to chance (~10%) and fail.

use std::path::PathBuf;

use candle_core::Device;
use diffguard_engine::data::{FashionSplit, fashion_mnist};
use diffguard_engine::models::resnet::ResNetConfig;
use diffguard_engine::train::recipes::{classifier_accuracy, default_fashion_dir};

/// Test images evaluated: the first 2,000 of the official test file (fixed, all 10 classes).
const SUBSET: usize = 2_000;

#[test]
fn shipped_classifier_reaches_its_stated_accuracy() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist");
    let fashion = default_fashion_dir();
    if !dir.join("classifier.safetensors").exists() || !fashion.exists() {
        eprintln!(
            "SKIPPED: no shipped classifier at {} or no Fashion-MNIST at {}",
            dir.display(),
            fashion.display()
        );
        return;
    }
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&read("bundle.json")).unwrap();
    let config: ResNetConfig =
        serde_json::from_value(manifest["classifier"]["resnet"].clone()).unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&read("classifier-report.json")).unwrap();
    let stated = report["test_accuracy"].as_f64().unwrap();
    let weights = candle_core::safetensors::load(dir.join("classifier.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let test = fashion_mnist(&fashion, FashionSplit::Test).unwrap();
    let test = test.select(&(0..SUBSET).collect::<Vec<_>>()).unwrap();
    let acc = classifier_accuracy(&weights, &config, &test).unwrap();
    // The subset's accuracy scatters around the full-set one with binomial sd
    // sqrt(p(1-p)/2000) ≈ 0.6% at p = 0.92; 3 sd.
    let sd = (stated * (1.0 - stated) / SUBSET as f64).sqrt();
    assert!(
        acc >= stated - 3.0 * sd,
        "accuracy {acc:.4} on {SUBSET} test images, the report states {stated:.4}"
    );
}
