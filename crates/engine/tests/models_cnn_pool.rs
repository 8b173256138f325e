//! Max pool: forward against a direct loop, gradient against central finite differences (f64) and
//! against PyTorch's tie rule (first maximum of the window in row-major order, padding excluded).

use candle_core::{DType, Device, Tensor, Var};
use diffguard_engine::ops::pool::MaxPool2d;
use rand::{Rng, SeedableRng, rngs::StdRng};

/// Direct PyTorch-semantics max pool: output values and, per output, the flat index of the first
/// maximum of its window (padding never wins).
fn reference(
    x: &[f64],
    (n, c, h, w): (usize, usize, usize, usize),
    p: MaxPool2d,
) -> (Vec<f64>, Vec<usize>) {
    let oh = (h + 2 * p.padding - p.kernel) / p.stride + 1;
    let ow = (w + 2 * p.padding - p.kernel) / p.stride + 1;
    let (mut vals, mut argm) = (Vec::new(), Vec::new());
    for plane in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut best = (f64::NEG_INFINITY, usize::MAX);
                for dy in 0..p.kernel {
                    for dx in 0..p.kernel {
                        let y = (oy * p.stride + dy) as isize - p.padding as isize;
                        let xx = (ox * p.stride + dx) as isize - p.padding as isize;
                        if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                            continue;
                        }
                        let idx = plane * h * w + y as usize * w + xx as usize;
                        if x[idx] > best.0 {
                            best = (x[idx], idx);
                        }
                    }
                }
                vals.push(best.0);
                argm.push(best.1);
            }
        }
    }
    (vals, argm)
}

/// The CPU custom op and the device-independent composition must agree in everything.
fn pool(geo: MaxPool2d, composed: bool, x: &Tensor) -> Tensor {
    if composed {
        geo.forward_composed(x)
    } else {
        geo.forward(x)
    }
    .unwrap()
}

fn random(len: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
}

const GEOMETRIES: [MaxPool2d; 4] = [
    MaxPool2d::RESNET_STEM,
    MaxPool2d {
        kernel: 2,
        stride: 2,
        padding: 0,
    },
    MaxPool2d {
        kernel: 3,
        stride: 1,
        padding: 1,
    },
    MaxPool2d {
        kernel: 3,
        stride: 3,
        padding: 0,
    },
];

#[test]
fn forward_matches_direct_loop_on_odd_sizes() {
    let dims = (2, 3, 7, 9);
    let data = random(2 * 3 * 7 * 9, 1);
    let x = Tensor::from_vec(data.clone(), dims, &Device::Cpu).unwrap();
    for geo in GEOMETRIES {
        let got = geo
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let (want, _) = reference(&data, dims, geo);
        assert_eq!(got, want, "{geo:?}");
    }
}

#[test]
fn forward_works_in_f32() {
    let dims = (1, 2, 5, 5);
    let data = random(50, 2);
    let x = Tensor::from_vec(data.clone(), dims, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let got = MaxPool2d::RESNET_STEM
        .forward(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (want, _) = reference(&data, dims, MaxPool2d::RESNET_STEM);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(*g, *w as f32);
    }
}

/// Σ out ⊙ r, whose gradient w.r.t. x routes r to each window's argmax.
fn loss(x: &Tensor, r: &Tensor, geo: MaxPool2d, composed: bool) -> Tensor {
    pool(geo, composed, x).mul(r).unwrap().sum_all().unwrap()
}

#[test]
fn gradient_matches_central_finite_differences() {
    let dims = (2, 2, 7, 9);
    let len = 2 * 2 * 7 * 9;
    let data = random(len, 3);
    // The step must stay below half the smallest gap between two inputs, or FD would cross a kink.
    let mut sorted = data.clone();
    sorted.sort_by(f64::total_cmp);
    let min_gap = sorted
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(f64::INFINITY, f64::min);
    let eps = (min_gap / 4.0).min(1e-6);
    assert!(
        eps > 1e-12,
        "inputs too close for a finite-difference check"
    );
    for (geo, composed) in GEOMETRIES.into_iter().flat_map(|g| [(g, false), (g, true)]) {
        let x = Var::from_vec(data.clone(), dims, &Device::Cpu).unwrap();
        let out_shape = geo.forward(x.as_tensor()).unwrap().shape().clone();
        let r =
            Tensor::from_vec(random(out_shape.elem_count(), 4), out_shape, &Device::Cpu).unwrap();
        let grads = loss(x.as_tensor(), &r, geo, composed).backward().unwrap();
        let auto = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in 0..len {
            let at = |delta: f64| {
                let mut d = data.clone();
                d[i] += delta;
                let t = Tensor::from_vec(d, dims, &Device::Cpu).unwrap();
                loss(&t, &r, geo, composed).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            // The loss is piecewise linear, so central FD is exact up to round-off of O(1e-16/eps).
            assert!(
                (fd - auto[i]).abs() < 1e-7,
                "{geo:?} coord {i}: autograd {} vs FD {fd}",
                auto[i]
            );
        }
    }
}

#[test]
fn ties_route_the_gradient_like_pytorch() {
    // All-zero windows (what a ReLU produces) are the common tie; PyTorch sends the whole
    // gradient to the first in-bounds element, not to every tied element.
    let dims = (1, 1, 6, 5);
    let mut data = vec![0.0; 30];
    data[7] = 1.0;
    data[8] = 1.0;
    for (geo, composed) in GEOMETRIES.into_iter().flat_map(|g| [(g, false), (g, true)]) {
        let x = Var::from_vec(data.clone(), dims, &Device::Cpu).unwrap();
        let out = pool(geo, composed, x.as_tensor());
        let grads = out.sum_all().unwrap().backward().unwrap();
        let got = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let (_, argm) = reference(&data, dims, geo);
        let mut want = vec![0.0; 30];
        for a in argm {
            want[a] += 1.0;
        }
        assert_eq!(got, want, "{geo:?} composed {composed}");
    }
}

#[test]
fn rejects_bad_geometry() {
    let x = Tensor::zeros((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(
        MaxPool2d {
            kernel: 2,
            stride: 2,
            padding: 2
        }
        .forward(&x)
        .is_err()
    );
    assert!(
        MaxPool2d {
            kernel: 7,
            stride: 1,
            padding: 0
        }
        .forward(&x)
        .is_err()
    );
}
