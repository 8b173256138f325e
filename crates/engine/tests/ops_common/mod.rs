//! Shared helpers for the `ops_*` kernel tests: seeded random tensors, a comparison against a
//! reference op, and a central-finite-difference gradient check in f64.
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::StandardNormal;

/// A seeded N(0,1) tensor (candle's CPU RNG cannot be seeded).
pub fn randn(seed: u64, dims: &[usize], dtype: DType) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.sample(StandardNormal)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let diff: f64 = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f64 = b.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    diff / scale.max(1e-30)
}

/// Gradients of `L = Σ f(inputs) ⊙ R` (R a fixed random weight, so every output matters
/// differently) with respect to every input, through candle's autograd.
pub fn autograd(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    seed: u64,
) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let r = randn(seed, y.dims(), y.dtype());
    let loss = (y * r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    ts.iter()
        .map(|t| grads.get(t).expect("input has no gradient").clone())
        .collect()
}

fn loss_f64(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], seed: u64) -> f64 {
    let y = f(inputs).unwrap();
    let r = randn(seed, y.dims(), y.dtype());
    (y * r)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Checks the autograd gradient of every input (f64) against central finite differences at
/// `samples` coordinates per input (all of them when the input is smaller).
///
/// Tolerance: |g - fd| ≤ 1e-6·(1 + |fd|). With eps = 1e-5 the central difference is off by
/// O(eps²·f''') ≈ 1e-10 plus round-off ≈ 1e-16·|L|/eps ≈ 1e-9 for |L| ≲ 1e2, so 1e-6 leaves
/// three orders of margin while a wrong gradient (a missing term, a transposed index) is off by O(1).
pub fn check_grads(f: &dyn Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor], samples: usize) {
    const EPS: f64 = 1e-5;
    let seed = 1234;
    let grads = autograd(f, inputs, seed);
    let mut rng = StdRng::seed_from_u64(99);
    for (which, (input, grad)) in inputs.iter().zip(&grads).enumerate() {
        assert_eq!(input.dtype(), DType::F64, "gradient checks run in f64");
        let flat: Vec<f64> = input.flatten_all().unwrap().to_vec1().unwrap();
        let g: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();
        let coords: Vec<usize> = if flat.len() <= samples {
            (0..flat.len()).collect()
        } else {
            (0..samples)
                .map(|_| rng.random_range(0..flat.len()))
                .collect()
        };
        for i in coords {
            let eval = |delta: f64| {
                let mut v = flat.clone();
                v[i] += delta;
                let mut args = inputs.to_vec();
                args[which] = Tensor::from_vec(v, input.dims(), &Device::Cpu).unwrap();
                loss_f64(f, &args, seed)
            };
            let fd = (eval(EPS) - eval(-EPS)) / (2.0 * EPS);
            assert!(
                (g[i] - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
                "input {which} coord {i}: autograd {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}
