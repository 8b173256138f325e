//! The ×2 nearest upsampling and 2×2 average pooling ops against their candle compositions
//! (forward, gradient through candle's autograd) and against finite differences, on odd sizes
//! (the pooling drops a last odd row/column, whose gradient must be zero).

mod ops_common;

use candle_core::{DType, Result, Tensor};
use diffguard_engine::ops::resample2x::{avg_pool2x, upsample_nearest2x};
use ops_common::{autograd, check_grads, randn, rel_err};

const SHAPES: &[&[usize]] = &[&[1, 3, 5, 7], &[7, 65, 4, 6], &[2, 2, 3, 3], &[1, 1, 2, 9]];

fn up_reference(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

fn pool_reference(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let x = x.narrow(2, 0, h / 2 * 2)?.narrow(3, 0, w / 2 * 2)?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?.mean(5)?.mean(3)
}

type Op = fn(&Tensor) -> Result<Tensor>;
const OPS: [(&str, Op, Op); 2] = [
    ("upsample", upsample_nearest2x, up_reference),
    ("pool", avg_pool2x, pool_reference),
];

/// Copies and four-term sums: f32 differs from candle's order of summation by a few ulp.
#[test]
fn forward_matches_candle() {
    for (name, ours, theirs) in OPS {
        for (i, dims) in SHAPES.iter().enumerate() {
            for (dtype, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-14)] {
                let x = randn(700 + i as u64, dims, dtype);
                let err = rel_err(&ours(&x).unwrap(), &theirs(&x).unwrap());
                assert!(err <= tol, "{name} {dims:?} {dtype:?}: rel err {err}");
            }
        }
    }
}

#[test]
fn gradients_match_candle() {
    for (name, ours, theirs) in OPS {
        for (i, dims) in SHAPES.iter().enumerate() {
            let x = [randn(710 + i as u64, dims, DType::F64)];
            let g = autograd(&|t| ours(&t[0]), &x, 5);
            let r = autograd(&|t| theirs(&t[0]), &x, 5);
            let err = rel_err(&g[0], &r[0]);
            assert!(err <= 1e-14, "{name} {dims:?}: rel err {err}");
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    for (_, ours, _) in OPS {
        for (i, dims) in SHAPES.iter().enumerate() {
            let x = [randn(720 + i as u64, dims, DType::F64)];
            check_grads(&|t| ours(&t[0]), &x, 40);
        }
    }
}

/// Each op's backward is the other's forward: ⟨up(x), y⟩ = 4·⟨x, pool(y)⟩ on even sizes.
#[test]
fn up_and_pool_are_adjoint() {
    let x = randn(730, &[2, 3, 4, 5], DType::F64);
    let y = randn(731, &[2, 3, 8, 10], DType::F64);
    let dot = |a: &Tensor, b: &Tensor| -> f64 {
        (a * b).unwrap().sum_all().unwrap().to_scalar().unwrap()
    };
    let lhs = dot(&upsample_nearest2x(&x).unwrap(), &y);
    let rhs = 4.0 * dot(&x, &avg_pool2x(&y).unwrap());
    assert!(
        (lhs - rhs).abs() <= 1e-12 * lhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );
}

#[test]
fn rejects_a_non_image_input() {
    let x = randn(740, &[3, 4, 5], DType::F32);
    assert!(upsample_nearest2x(&x).is_err() && avg_pool2x(&x).is_err());
}
