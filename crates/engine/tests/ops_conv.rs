//! The fast conv2d against candle's conv2d (forward, and every gradient) and against finite
//! differences, over shapes that are not multiples of any block size.

mod ops_common;

use candle_core::{DType, Result, Tensor};
use diffguard_engine::ops::conv::conv2d;
use ops_common::{autograd, check_grads, randn, rel_err};

/// (batch, cin, cout, h, w, k, stride, pad). Stride-1 3×3 cases with ≥ 16 channels both ways and
/// ≥ 64 output tiles over the batch run the Winograd path (odd output sizes, so the 2×2 tiles
/// overhang the image: cases 1 and 2); the others im2col (the last case: channels enough, tiles
/// too few).
type Case = (usize, usize, usize, usize, usize, usize, usize, usize);
const CASES: &[Case] = &[
    (1, 3, 65, 7, 9, 3, 1, 1),
    (2, 17, 65, 15, 17, 3, 1, 1),
    (1, 65, 16, 17, 18, 3, 1, 0),
    (7, 65, 3, 5, 7, 3, 1, 1),
    (2, 5, 6, 9, 7, 3, 2, 1),
    (1, 4, 3, 8, 8, 3, 2, 1),
    (3, 4, 5, 6, 5, 3, 1, 0),
    (2, 65, 7, 5, 3, 1, 1, 0),
    (3, 6, 4, 7, 9, 1, 2, 0),
    (1, 3, 4, 4, 5, 3, 1, 2),
    // 5×5: im2col forward and col2im input grad, including stride 2.
    (2, 3, 4, 7, 6, 5, 1, 2),
    (2, 3, 4, 7, 9, 5, 2, 1),
    (1, 16, 17, 5, 6, 3, 1, 1),
];

fn reference(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    x.conv2d(w, pad, stride, 1, 1)?
        .broadcast_add(&b.reshape((1, (), 1, 1))?)
}

fn operands(case: usize, dtype: DType) -> (Tensor, Tensor, Tensor) {
    let (b, cin, cout, h, w, k, _, _) = CASES[case];
    let seed = case as u64 * 10;
    (
        randn(seed, &[b, cin, h, w], dtype),
        randn(seed + 1, &[cout, cin, k, k], dtype),
        randn(seed + 2, &[cout], dtype),
    )
}

/// f32: our gemm sums the K = cin·k·k products in a different order than candle's conv; the
/// rounding difference grows like √K·2⁻²⁴ relative to the output scale (≈1.5e-6 at K = 585,
/// worst case K·2⁻²⁴ ≈ 3.5e-5). 2e-5 sits between the two; a wrong tap gives O(1).
const F32_TOL: f64 = 2e-5;
/// f64: the same reasoning with 2⁻⁵³ gives ≈1e-13 worst case.
const F64_TOL: f64 = 1e-12;

#[test]
fn forward_matches_candle() {
    for (i, &(.., stride, pad)) in CASES.iter().enumerate() {
        for (dtype, tol) in [(DType::F32, F32_TOL), (DType::F64, F64_TOL)] {
            let (x, w, b) = operands(i, dtype);
            let ours = conv2d(&x, &w, Some(&b), stride, pad).unwrap();
            let theirs = reference(&x, &w, &b, stride, pad).unwrap();
            let err = rel_err(&ours, &theirs);
            assert!(err <= tol, "case {i} {dtype:?}: rel err {err}");
            let no_bias = conv2d(&x, &w, None, stride, pad).unwrap();
            let err = rel_err(&no_bias, &x.conv2d(&w, pad, stride, 1, 1).unwrap());
            assert!(err <= tol, "case {i} {dtype:?} without bias: rel err {err}");
        }
    }
}

#[test]
fn non_contiguous_input_is_handled() {
    let (x, w, b) = operands(0, DType::F32);
    let xt = x.transpose(2, 3).unwrap();
    let ours = conv2d(&xt, &w, Some(&b), 1, 1).unwrap();
    let theirs = reference(&xt.contiguous().unwrap(), &w, &b, 1, 1).unwrap();
    assert!(rel_err(&ours, &theirs) <= F32_TOL);
}

#[test]
fn gradients_match_candle_everywhere() {
    // candle's conv backward is a different algorithm (direct-loop conv_transpose2d); agreeing at
    // every coordinate in f64 is a full-tensor check that complements the sampled finite differences.
    for (i, &(.., stride, pad)) in CASES.iter().enumerate() {
        let (x, w, b) = operands(i, DType::F64);
        let ours = autograd(
            &|t| conv2d(&t[0], &t[1], Some(&t[2]), stride, pad),
            &[x.clone(), w.clone(), b.clone()],
            7,
        );
        let theirs = autograd(
            &|t| reference(&t[0], &t[1], &t[2], stride, pad),
            &[x, w, b],
            7,
        );
        for (name, (o, t)) in ["dx", "dw", "db"].iter().zip(ours.iter().zip(&theirs)) {
            let err = rel_err(o, t);
            assert!(err <= F64_TOL, "case {i} {name}: rel err {err}");
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (i, &(.., stride, pad)) in CASES.iter().enumerate() {
        let (x, w, b) = operands(i, DType::F64);
        check_grads(
            &|t| conv2d(&t[0], &t[1], Some(&t[2]), stride, pad),
            &[x, w, b],
            12,
        );
    }
}

#[test]
fn frozen_weights_get_no_gradient_work() {
    // Clean Grad differentiates w.r.t. the image only: the weight is a plain tensor, so the op must
    // still give the right input gradient and no gradient entry for the weight.
    let case = 4;
    let (.., stride, pad) = CASES[case];
    let (x, w, b) = operands(case, DType::F64);
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    let y = conv2d(xv.as_tensor(), &w, Some(&b), stride, pad).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none());
    let xr = candle_core::Var::from_tensor(&x).unwrap();
    let yr = reference(xr.as_tensor(), &w, &b, stride, pad).unwrap();
    let gr = yr.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let err = rel_err(
        grads.get(xv.as_tensor()).unwrap(),
        gr.get(xr.as_tensor()).unwrap(),
    );
    assert!(err <= F64_TOL, "rel err {err}");
}

#[test]
fn strided_gradient_with_uneven_remainders() {
    // H and W leave different remainders modulo the stride ((7+2−5) mod 2 = 0, (6+2−5) mod 2 = 1).
    // candle 0.11.1's own conv2d backward fails here with a shape mismatch (its conv_transpose2d
    // output padding does not fit both dims), so only finite differences can judge ours.
    let dims = [2, 3, 7, 6];
    let ops = [
        randn(500, &dims, DType::F64),
        randn(501, &[4, 3, 5, 5], DType::F64),
        randn(502, &[4], DType::F64),
    ];
    check_grads(&|t| conv2d(&t[0], &t[1], Some(&t[2]), 2, 1), &ops, 20);
    let y = conv2d(&ops[0], &ops[1], Some(&ops[2]), 2, 1).unwrap();
    let r = reference(&ops[0], &ops[1], &ops[2], 2, 1).unwrap();
    assert!(rel_err(&y, &r) <= F64_TOL);
}
