//! Fused GroupNorm(+SiLU) against candle's GroupNorm (forward, all gradients) and finite differences.

mod ops_common;

use candle_core::{DType, Module, Result, Tensor, Var};
use diffguard_engine::ops::norm::{group_norm, group_norm_modulated};
use ops_common::{autograd, check_grads, randn, rel_err};

/// (dims of x, groups)
const CASES: &[(&[usize], usize)] = &[
    (&[1, 3, 5, 7], 3),
    (&[7, 65, 3, 3], 5),
    (&[2, 6, 4, 5], 1),
    (&[3, 8, 9], 4),
    (&[2, 4, 1, 1], 2),
];
const EPS: f64 = 1e-5;

fn reference(x: &Tensor, groups: usize, g: &Tensor, b: &Tensor, silu: bool) -> Result<Tensor> {
    let gn = candle_nn::GroupNorm::new(g.clone(), b.clone(), x.dim(1)?, groups, EPS)?;
    let y = gn.forward(x)?;
    if silu { y.silu() } else { Ok(y) }
}

fn operands(case: usize, dtype: DType) -> [Tensor; 3] {
    let (dims, _) = CASES[case];
    let seed = 100 + case as u64 * 10;
    // Offset and scale the input so the mean/variance removal is actually exercised.
    let x = (randn(seed, dims, dtype) * 3.0).unwrap() + 1.5;
    [
        x.unwrap(),
        randn(seed + 1, &[dims[1]], dtype),
        randn(seed + 2, &[dims[1]], dtype),
    ]
}

/// f32 outputs are O(1) after normalisation; the mean/variance sums over ≤ 585 elements in a
/// different order than candle's, plus SiLU's polynomial exp (≤ 2e-7 relative), keep the
/// difference near 1e-6; 1e-5 leaves margin while a wrong channel/group mapping gives O(1).
const F32_TOL: f64 = 1e-5;
const F64_TOL: f64 = 1e-11;

#[test]
fn forward_matches_candle() {
    for (i, &(_, groups)) in CASES.iter().enumerate() {
        for silu in [false, true] {
            for (dtype, tol) in [(DType::F32, F32_TOL), (DType::F64, F64_TOL)] {
                let [x, g, b] = operands(i, dtype);
                let ours = group_norm(&x, groups, &g, &b, EPS, silu).unwrap();
                let theirs = reference(&x, groups, &g, &b, silu).unwrap();
                let err = rel_err(&ours, &theirs);
                assert!(err <= tol, "case {i} silu {silu} {dtype:?}: rel err {err}");
            }
        }
    }
}

#[test]
fn gradients_match_candle_everywhere() {
    for (i, &(_, groups)) in CASES.iter().enumerate() {
        for silu in [false, true] {
            let ops = operands(i, DType::F64);
            let ours = autograd(
                &|t| group_norm(&t[0], groups, &t[1], &t[2], EPS, silu),
                &ops,
                3,
            );
            let theirs = autograd(&|t| reference(&t[0], groups, &t[1], &t[2], silu), &ops, 3);
            for (name, (o, t)) in ["dx", "dgamma", "dbeta"]
                .iter()
                .zip(ours.iter().zip(&theirs))
            {
                let err = rel_err(o, t);
                assert!(err <= 1e-9, "case {i} silu {silu} {name}: rel err {err}");
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (i, &(_, groups)) in CASES.iter().enumerate() {
        for silu in [false, true] {
            let ops = operands(i, DType::F64);
            check_grads(
                &|t| group_norm(&t[0], groups, &t[1], &t[2], EPS, silu),
                &ops,
                12,
            );
        }
    }
}

#[test]
fn rejects_channels_not_divisible_by_groups() {
    let [x, g, b] = operands(1, DType::F32);
    assert!(group_norm(&x, 4, &g, &b, EPS, false).is_err());
}

/// The scale-shift ResBlock's composition in candle ops: GN, × (1 + scale), + shift, SiLU.
fn modulated_reference(t: &[Tensor], groups: usize, silu: bool) -> Result<Tensor> {
    let (b, c) = (t[0].dim(0)?, t[0].dim(1)?);
    let mut bcast = t[0].dims().to_vec();
    bcast[2..].fill(1);
    let scale = (t[3].narrow(1, 0, c)?.reshape(bcast.as_slice())? + 1.0)?;
    let shift = t[3].narrow(1, c, c)?.reshape(bcast.as_slice())?;
    assert_eq!(t[3].dims(), [b, 2 * c]);
    let y = reference(&t[0], groups, &t[1], &t[2], false)?
        .broadcast_mul(&scale)?
        .broadcast_add(&shift)?;
    if silu { y.silu() } else { Ok(y) }
}

fn modulated_operands(case: usize, dtype: DType) -> [Tensor; 4] {
    let [x, g, b] = operands(case, dtype);
    let (n, c) = (x.dim(0).unwrap(), x.dim(1).unwrap());
    let ss = (randn(500 + case as u64, &[n, 2 * c], dtype) * 0.5).unwrap();
    [x, g, b, ss]
}

fn modulated(t: &[Tensor], groups: usize, silu: bool) -> Result<Tensor> {
    group_norm_modulated(&t[0], groups, &t[1], &t[2], &t[3], EPS, silu)
}

#[test]
fn modulated_forward_matches_candle() {
    for (i, &(_, groups)) in CASES.iter().enumerate() {
        for silu in [false, true] {
            for (dtype, tol) in [(DType::F32, F32_TOL), (DType::F64, F64_TOL)] {
                let ops = modulated_operands(i, dtype);
                let err = rel_err(
                    &modulated(&ops, groups, silu).unwrap(),
                    &modulated_reference(&ops, groups, silu).unwrap(),
                );
                assert!(err <= tol, "case {i} silu {silu} {dtype:?}: rel err {err}");
            }
        }
    }
}

#[test]
fn modulated_gradients_match_candle_everywhere() {
    for (i, &(_, groups)) in CASES.iter().enumerate() {
        for silu in [false, true] {
            let ops = modulated_operands(i, DType::F64);
            let ours = autograd(&|t| modulated(t, groups, silu), &ops, 3);
            let theirs = autograd(&|t| modulated_reference(t, groups, silu), &ops, 3);
            for (name, (o, t)) in ["dx", "dgamma", "dbeta", "dscale_shift"]
                .iter()
                .zip(ours.iter().zip(&theirs))
            {
                let err = rel_err(o, t);
                assert!(err <= 1e-9, "case {i} silu {silu} {name}: rel err {err}");
            }
        }
    }
}

#[test]
fn modulated_gradients_match_finite_differences() {
    for (i, &(_, groups)) in CASES.iter().enumerate() {
        for silu in [false, true] {
            let ops = modulated_operands(i, DType::F64);
            check_grads(&|t| modulated(t, groups, silu), &ops, 12);
        }
    }
}

/// Frozen parameters get no gradient work: with only x a `Var`, the backward keeps x's gradient
/// and nothing else. candle's composition also keeps one for each broadcast constant operand,
/// full-size, until the backward returns.
#[test]
fn modulated_constant_modulation_gets_no_gradient() {
    let [x, g, b, ss] = modulated_operands(1, DType::F64);
    let xv = Var::from_tensor(&x).unwrap();
    let count = |y: Tensor| y.sum_all().unwrap().backward().unwrap().get_ids().count();
    let ours = count(group_norm_modulated(xv.as_tensor(), 5, &g, &b, &ss, EPS, true).unwrap());
    let candle = count(modulated_reference(&[xv.as_tensor().clone(), g, b, ss], 5, true).unwrap());
    // Every node's gradient is removed once passed on; a `Var`'s is kept: x's alone.
    assert_eq!(ours, 1, "gradients kept: {ours}");
    assert!(candle > ours + 1, "candle's composition kept {candle}");
}

#[test]
fn modulated_rejects_a_wrong_modulation_shape() {
    let [x, g, b, ss] = modulated_operands(1, DType::F32);
    let short = ss.narrow(1, 0, 10).unwrap();
    let err = group_norm_modulated(&x, 5, &g, &b, &short, EPS, true).unwrap_err();
    assert!(err.to_string().contains("scale/shift"), "{err}");
}
