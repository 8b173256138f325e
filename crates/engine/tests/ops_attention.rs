//! Fused attention against a contiguous candle composition and finite differences.

mod ops_common;

use candle_core::{D, DType, Result, Tensor};
use diffguard_engine::ops::attention::attention;
use ops_common::{autograd, check_grads, randn, rel_err};

/// (leading dims, Tq, Tk, D, Dv); Tq > 128 crosses a query row block.
const CASES: &[(&[usize], usize, usize, usize, usize)] = &[
    (&[1], 5, 7, 3, 4),
    (&[7], 9, 9, 8, 8),
    (&[2, 3], 4, 6, 5, 2),
    (&[2], 131, 65, 16, 16),
];

/// Every operand made contiguous, so candle's matmul bug (#3744) cannot affect the reference.
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let s = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    candle_nn::ops::softmax(&s, D::Minus1)?
        .contiguous()?
        .matmul(&v.contiguous()?)
}

fn operands(case: usize, dtype: DType) -> [Tensor; 3] {
    let (lead, tq, tk, d, dv) = CASES[case];
    let dims = |t: usize, f: usize| [lead, &[t, f]].concat();
    let seed = 300 + case as u64 * 10;
    [
        randn(seed, &dims(tq, d), dtype),
        randn(seed + 1, &dims(tk, d), dtype),
        randn(seed + 2, &dims(tk, dv), dtype),
    ]
}

fn scale(case: usize) -> f64 {
    1.0 / (CASES[case].3 as f64).sqrt()
}

/// f32: scores sum D ≤ 16 products, softmax uses a polynomial exp (≤ 2e-7 relative), the output
/// sums Tk ≤ 65 weighted values in a different order: ≈1e-6 relative; 1e-5 leaves margin.
const F32_TOL: f64 = 1e-5;

#[test]
fn forward_matches_candle() {
    for i in 0..CASES.len() {
        for (dtype, tol) in [(DType::F32, F32_TOL), (DType::F64, 1e-12)] {
            let [q, k, v] = operands(i, dtype);
            let err = rel_err(
                &attention(&q, &k, &v, scale(i)).unwrap(),
                &reference(&q, &k, &v, scale(i)).unwrap(),
            );
            assert!(err <= tol, "case {i} {dtype:?}: rel err {err}");
        }
    }
}

#[test]
fn non_contiguous_batched_operands_are_safe() {
    // The shape that breaks candle's CPU matmul: a transposed (non-contiguous) batched lhs.
    let [q, k, v] = operands(1, DType::F32);
    let qt = q
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    assert!(!qt.is_contiguous());
    let err = rel_err(
        &attention(&qt, &k, &v, 0.5).unwrap(),
        &reference(&q, &k, &v, 0.5).unwrap(),
    );
    assert!(err <= F32_TOL, "rel err {err}");
}

#[test]
fn gradients_match_candle_and_finite_differences() {
    for i in 0..CASES.len() {
        let ops = operands(i, DType::F64);
        let s = scale(i);
        let ours = autograd(&|t| attention(&t[0], &t[1], &t[2], s), &ops, 9);
        let theirs = autograd(&|t| reference(&t[0], &t[1], &t[2], s), &ops, 9);
        for (name, (o, t)) in ["dq", "dk", "dv"].iter().zip(ours.iter().zip(&theirs)) {
            let err = rel_err(o, t);
            assert!(err <= 1e-11, "case {i} {name}: rel err {err}");
        }
        check_grads(&|t| attention(&t[0], &t[1], &t[2], s), &ops, 12);
    }
}
