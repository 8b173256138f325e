//! The dense layer op against candle's matmul + broadcast add (forward, every gradient), against
//! finite differences, and its promise: frozen weights get no gradient work.

mod ops_common;

use candle_core::{DType, Result, Tensor, Var};
use diffguard_engine::ops::linear::linear;
use ops_common::{autograd, check_grads, randn, rel_err};

/// (rows, cin, cout): batch 1 and 7, channels 3 and 65, nothing a multiple of a block size.
const CASES: &[(usize, usize, usize)] = &[(1, 3, 65), (7, 65, 3), (13, 17, 9), (2, 1, 5)];

fn reference(t: &[Tensor]) -> Result<Tensor> {
    t[0].matmul(&t[1].t()?)?.broadcast_add(&t[2])
}

fn operands(case: usize, dtype: DType) -> [Tensor; 3] {
    let (rows, cin, cout) = CASES[case];
    let seed = 800 + 10 * case as u64;
    [
        randn(seed, &[rows, cin], dtype),
        randn(seed + 1, &[cout, cin], dtype),
        randn(seed + 2, &[cout], dtype),
    ]
}

fn ours(t: &[Tensor]) -> Result<Tensor> {
    linear(&t[0], &t[1], Some(&t[2]))
}

/// f32: a K ≤ 65 dot product summed in another order than candle's: a few ulp of the output
/// scale; a wrong index gives O(1).
#[test]
fn forward_matches_candle() {
    for case in 0..CASES.len() {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-13)] {
            let t = operands(case, dtype);
            let err = rel_err(&ours(&t).unwrap(), &reference(&t).unwrap());
            assert!(err <= tol, "case {case} {dtype:?}: rel err {err}");
            let no_bias = linear(&t[0], &t[1], None).unwrap();
            let err = rel_err(&no_bias, &t[0].matmul(&t[1].t().unwrap()).unwrap());
            assert!(
                err <= tol,
                "case {case} {dtype:?} without bias: rel err {err}"
            );
        }
    }
}

#[test]
fn gradients_match_candle_everywhere() {
    for case in 0..CASES.len() {
        let t = operands(case, DType::F64);
        let g = autograd(&ours, &t, 7);
        let r = autograd(&reference, &t, 7);
        for (name, (g, r)) in ["dx", "dw", "db"].iter().zip(g.iter().zip(&r)) {
            let err = rel_err(g, r);
            assert!(err <= 1e-12, "case {case} {name}: rel err {err}");
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for case in 0..CASES.len() {
        check_grads(&ours, &operands(case, DType::F64), 20);
    }
}

/// With only x a `Var`, the backward keeps x's gradient and nothing else; candle's composition
/// also keeps a weight-sized one and a full-size one for the broadcast bias.
#[test]
fn frozen_weights_get_no_gradient_work() {
    let [x, w, b] = operands(1, DType::F64);
    let xv = Var::from_tensor(&x).unwrap();
    let count = |y: Tensor| y.sum_all().unwrap().backward().unwrap().get_ids().count();
    let kept = count(linear(xv.as_tensor(), &w, Some(&b)).unwrap());
    let candle = count(reference(&[xv.as_tensor().clone(), w, b]).unwrap());
    assert_eq!(kept, 1, "gradients kept: {kept}");
    assert!(candle >= kept + 2, "candle's composition kept {candle}");
}

#[test]
fn rejects_mismatched_shapes() {
    let [x, w, b] = operands(2, DType::F32);
    let err = linear(&x, &w.t().unwrap(), Some(&b)).unwrap_err();
    assert!(err.to_string().contains("linear"), "{err}");
    assert!(linear(&x, &w, Some(&x)).is_err());
}
