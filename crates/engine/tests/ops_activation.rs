//! SiLU against candle's SiLU and finite differences.

mod ops_common;

use candle_core::DType;
use diffguard_engine::ops::activation::silu;
use ops_common::{autograd, check_grads, randn, rel_err};

#[test]
fn forward_matches_candle() {
    // Large enough (> one parallel chunk) to exercise the threaded path and its chunk offsets,
    // scaled so both tails of the sigmoid (|x| up to ~40) are hit.
    for dims in [&[7, 65, 9, 11][..], &[3, 5], &[40_000]] {
        let x = (randn(1, dims, DType::F32) * 8.0).unwrap();
        // Polynomial exp: ≤ 2e-7 relative per element vs libm; the output scale is ≥ 1, so a
        // relative-to-max error of 1e-6 is a faithful bound.
        let err = rel_err(&silu(&x).unwrap(), &x.silu().unwrap());
        assert!(err <= 1e-6, "{dims:?}: rel err {err}");
        let x64 = x.to_dtype(DType::F64).unwrap();
        let err = rel_err(&silu(&x64).unwrap(), &x64.silu().unwrap());
        assert!(err <= 1e-15, "{dims:?} f64: rel err {err}");
    }
}

#[test]
fn extreme_inputs_stay_finite() {
    let x = candle_core::Tensor::new(
        &[-1e4f32, -100.0, -88.0, 0.0, 88.0, 100.0, 1e4],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let y: Vec<f32> = silu(&x).unwrap().to_vec1().unwrap();
    let r: Vec<f32> = x.silu().unwrap().to_vec1().unwrap();
    for (a, b) in y.iter().zip(&r) {
        assert!(
            a.is_finite() && (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{a} vs {b}"
        );
    }
}

#[test]
fn gradient_matches_candle_and_finite_differences() {
    for dims in [&[7, 65, 9, 11][..], &[3, 5]] {
        let x = (randn(2, dims, DType::F64) * 4.0).unwrap();
        let ours = autograd(&|t| silu(&t[0]), std::slice::from_ref(&x), 5);
        let theirs = autograd(&|t| t[0].silu(), std::slice::from_ref(&x), 5);
        assert!(rel_err(&ours[0], &theirs[0]) <= 1e-13);
        check_grads(&|t| silu(&t[0]), &[x], 30);
    }
}
