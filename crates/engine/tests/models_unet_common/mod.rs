//! Shared helpers for the `models_unet_*` golden tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

/// `../shared/goldens/<name>` relative to the repository root, or None (with a loud SKIPPED line).
pub fn golden_dir(name: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("../shared/goldens").join(name);
    if dir.join("case.safetensors").is_file() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: golden {} not found at {}", name, dir.display());
        None
    }
}

pub fn weights(dir: &std::path::Path, dtype: DType) -> VarBuilder<'static> {
    unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("weights.safetensors")], dtype, &Device::Cpu)
            .unwrap()
    }
}

pub fn case(dir: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("case.safetensors"), &Device::Cpu).unwrap()
}

/// An I64 tensor as u32 values.
pub fn ints(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| u32::try_from(v).unwrap())
        .collect()
}

/// (max |a-b|, max |b|).
pub fn max_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let m = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    (d.to_scalar::<f64>().unwrap(), m.to_scalar::<f64>().unwrap())
}

/// Asserts max|a-b| ≤ rel · max|b|, printing the numbers.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, rel: f64) {
    let (d, m) = max_diff(a, b);
    eprintln!(
        "{what}: max_abs {d:.3e}, max|ref| {m:.3e}, rel {:.3e} (limit {rel:.1e})",
        d / m
    );
    assert!(d <= rel * m, "{what}: max_abs {d:e} > {rel:e} * {m:e}");
}

/// Batch-vs-single-item consistency limit (relative to max|out|). candle's CPU batched-matmul
/// fold bug shows up as O(1) errors; legitimate differences come only from gemm/conv blocking
/// changing with the batch size (≈1e-6 relative observed on the pixel UNet at B=4), so 1e-5.
pub const BATCH_TOL: f64 = 1e-5;
