//! VGG16 + DISTS: parity with piq 0.7.0 (`goldens/vgg_dists`) and the identity property.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use diffguard_engine::models::vgg::{Dists, l2_pool_kernel};

fn golden_dir(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/goldens")
        .join(name);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: golden folder {} is absent", dir.display());
        None
    }
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

struct Golden {
    case: std::collections::HashMap<String, Tensor>,
    dir: PathBuf,
}

fn golden() -> Option<Golden> {
    let dir = golden_dir("vgg_dists")?;
    let case = candle_core::safetensors::load(dir.join("case.safetensors"), &Device::Cpu).unwrap();
    Some(Golden { case, dir })
}

fn check_parity(dtype: DType, tol: f64) {
    let Some(g) = golden() else { return };
    let dists = Dists::load(&g.dir.join("weights.safetensors"), dtype, &Device::Cpu).unwrap();
    // Features once per image batch: the VGG pass dominates the test time.
    let fx = dists.features(&g.case["x"]).unwrap();
    let fy = dists.features(&g.case["y"]).unwrap();
    let fu = dists.features(&g.case["x_unclamped"]).unwrap();

    let sim = dists.similarity_features(&fx, &fy).unwrap();
    let e_sim = max_abs_diff(&sim, &vec_f64(&g.case["dists_sim"]));
    let loss: Vec<f64> = sim.iter().map(|s| 1.0 - s).collect();
    let e_loss = max_abs_diff(&loss, &vec_f64(&g.case["dists_loss"]));

    let terms = dists.stage_terms_features(&fx, &fy).unwrap();
    let flat: Vec<f64> = terms
        .iter()
        .flat_map(|st| st.iter().flat_map(|p| p.iter().copied()))
        .collect();
    let e_stage = max_abs_diff(&flat, &vec_f64(&g.case["per_stage_alpha_s1_beta_s2"]));

    let unclamped = dists.similarity_features(&fu, &fx).unwrap();
    let loss_u: Vec<f64> = unclamped.iter().map(|s| 1.0 - s).collect();
    let e_unc = max_abs_diff(&loss_u, &vec_f64(&g.case["dists_loss_unclamped_vs_x"]));

    eprintln!(
        "{dtype:?}: |Δsim| {e_sim:.2e}, |Δloss| {e_loss:.2e}, |Δstage| {e_stage:.2e}, |Δunclamped| {e_unc:.2e}"
    );
    for (what, e) in [
        ("sim", e_sim),
        ("loss", e_loss),
        ("per-stage", e_stage),
        ("unclamped", e_unc),
    ] {
        assert!(e < tol, "{dtype:?} {what}: max abs diff {e}");
    }
}

#[test]
fn golden_parity_f32() {
    // The reference's float64-vs-float32 difference is 4.6e-9 (config.json), but the golden
    // values are stored as f32 (ulp 3e-8..6e-8 for values in [0.5, 1)) and our f32 convs round
    // differently from PyTorch's; measured here ≤ 9.5e-8 (the unclamped case), bound about 2×.
    check_parity(DType::F32, 2e-7);
}

#[test]
fn golden_parity_f64() {
    // In f64 the differences left are the reference's f32 round-off (4.6e-9) and the f32
    // storage of its outputs (≤ 6e-8); measured ≤ 4.8e-8.
    check_parity(DType::F64, 2e-7);
}

#[test]
fn l2_pool_kernel_is_piqs_hann_filter() {
    let Some(g) = golden() else { return };
    let want = vec_f64(&g.case["l2pool_kernel"]);
    assert_eq!(vec_f64(&l2_pool_kernel(&Device::Cpu).unwrap()), want);
}

#[test]
fn identical_images_are_fully_similar_and_batches_broadcast() {
    let Some(g) = golden() else { return };
    let dists = Dists::load(&g.dir.join("weights.safetensors"), DType::F32, &Device::Cpu).unwrap();
    let (x, y) = (&g.case["x"], &g.case["y"]);
    // S1 = S2 = 1 for identical inputs (S2 up to the round-off of E[a²] − μ² against
    // E[(a − μ)²] in f64), so the similarity is Σα + Σβ, which the golden normalised to 1 before
    // rounding the weights to f16 (their sum is 1 − 1.8e-7).
    let w =
        candle_core::safetensors::load(g.dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    let total: f64 = ["alpha", "beta"]
        .iter()
        .map(|k| vec_f64(&w[*k]).iter().sum::<f64>())
        .sum();
    let fx = dists.features(x).unwrap();
    let same = dists.similarity_features(&fx, &fx).unwrap();
    for s in &same {
        assert!(
            (s - total).abs() < 1e-9,
            "self-similarity {s} vs Σα+Σβ {total}"
        );
        assert!((s - 1.0).abs() < 1e-6, "self-similarity {s}");
    }
    let first = x.narrow(0, 0, 1).unwrap();
    let one_vs_many = dists.similarity(&first, y).unwrap();
    let pairwise = dists
        .similarity(&Tensor::cat(&[&first, &first], 0).unwrap(), y)
        .unwrap();
    assert_eq!(one_vs_many.len(), 2);
    assert!(max_abs_diff(&one_vs_many, &pairwise) < 1e-12);
}

#[test]
fn rejects_mismatched_inputs() {
    let Some(g) = golden() else { return };
    let dists = Dists::load(&g.dir.join("weights.safetensors"), DType::F32, &Device::Cpu).unwrap();
    let a = Tensor::zeros((2, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros((3, 3, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(dists.similarity(&a, &b).is_err());
    let c = Tensor::zeros((2, 3, 16, 18), DType::F32, &Device::Cpu).unwrap();
    assert!(dists.similarity(&a, &c).is_err());
    let grey = Tensor::zeros((2, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
    assert!(dists.similarity(&grey, &grey).is_err());
}
