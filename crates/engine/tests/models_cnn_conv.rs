//! FrozenConv2d: forward equals candle's conv, input gradient equals central finite differences
//! (f64) on odd, non-square sizes for every geometry a ResNet uses.

use candle_core::{DType, Device, Tensor, Var};
use diffguard_engine::ops::conv::FrozenConv2d;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// (kernel, stride, padding): the 7×7 stem, strided and plain 3×3, 1×1 projections, and odd
/// cases of the polyphase split (stride 3, kernel smaller than the stride, no padding).
const GEOMETRIES: [(usize, usize, usize); 8] = [
    (7, 2, 3),
    (3, 2, 1),
    (3, 1, 1),
    (1, 2, 0),
    (1, 1, 0),
    (2, 3, 0),
    (3, 2, 0),
    (5, 3, 2),
];

#[test]
fn forward_matches_candle_conv() {
    let x = random(&[2, 3, 11, 9], 1);
    for (i, (k, s, p)) in GEOMETRIES.into_iter().enumerate() {
        let w = random(&[4, 3, k, k], 10 + i as u64);
        let b = random(&[4], 20 + i as u64);
        let conv = FrozenConv2d::new(w.clone(), Some(b.clone()), p, s).unwrap();
        let want = x
            .conv2d(&w, p, s, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        // Tracked input: the custom-op path.
        let var = Var::from_tensor(&x).unwrap();
        for got in [
            conv.forward(var.as_tensor()).unwrap(),
            conv.forward(&x).unwrap(),
        ] {
            let d = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(d, 0.0, "k{k} s{s} p{p}");
        }
    }
}

#[test]
fn input_gradient_matches_finite_differences() {
    // Odd, non-square input: both axes leave different remainders modulo the stride, the case
    // candle's own conv backward fails on.
    let shape = [2, 3, 11, 8];
    let x = random(&shape, 2);
    let data = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for (i, (k, s, p)) in GEOMETRIES.into_iter().enumerate() {
        let conv = FrozenConv2d::new(random(&[4, 3, k, k], 30 + i as u64), None, p, s).unwrap();
        let out_shape = conv.forward(&x).unwrap().shape().clone();
        let r = random(out_shape.dims(), 40 + i as u64);
        let loss = |t: &Tensor| conv.forward(t).unwrap().mul(&r).unwrap().sum_all().unwrap();
        let var = Var::from_tensor(&x).unwrap();
        let grads = loss(var.as_tensor()).backward().unwrap();
        let auto = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-4;
        for j in 0..data.len() {
            let at = |delta: f64| {
                let mut d = data.clone();
                d[j] += delta;
                loss(&Tensor::from_vec(d, &shape, &Device::Cpu).unwrap())
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            // The loss is linear in x: central FD is exact up to round-off (~1e-12 here).
            assert!(
                (fd - auto[j]).abs() < 1e-9,
                "k{k} s{s} p{p} coord {j}: {} vs FD {fd}",
                auto[j]
            );
        }
    }
}

#[test]
fn trainable_weights_keep_their_gradient() {
    // A Var weight must take candle's conv so that training still gets ∂L/∂W.
    let w = Var::from_tensor(&random(&[2, 1, 3, 3], 5)).unwrap();
    let conv = FrozenConv2d::new(w.as_tensor().clone(), None, 1, 1).unwrap();
    let x = Var::from_tensor(&random(&[1, 1, 5, 5], 6)).unwrap();
    let grads = conv
        .forward(x.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(w.as_tensor()).is_some());
    assert!(grads.get(x.as_tensor()).is_some());
    assert_eq!(w.dtype(), DType::F64);
}
