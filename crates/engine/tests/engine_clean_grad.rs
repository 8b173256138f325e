//! Clean Grad (spec §5) with the cutouts recorded in `goldens/pipeline_gdm`, on a linear-softmax
//! classifier whose loss can be written out in plain f64 loops: the gather/scatter of the cutouts,
//! the ½ chain factor and the scale are checked against central finite differences.

mod engine_common;

use candle_core::{D, DType, Device, Tensor};
use diffguard_engine::guidance::{CleanGrad, CutBox, CutoutSpec, blended_input};
use diffguard_engine::model::{Classifier, ClassifierOutput, LabelId};
use diffguard_engine::schedule::{BetaSchedule, SpacedSchedule};
use diffguard_engine::{EngineError, Result};
use engine_common::max_abs_diff;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SIDE: usize = 28;
const CLASSES: usize = 10;
const DIM: usize = 3 * SIDE * SIDE;

/// logits = W·vec(x) + b; ∂ log_softmax[y] / ∂x = W[y] − Σ_c p_c W[c].
struct LinearSoftmax {
    w: Vec<f64>,
    b: Vec<f64>,
}

impl LinearSoftmax {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        Self {
            w: (0..CLASSES * DIM)
                .map(|_| (rng.random::<f64>() - 0.5) * 0.05)
                .collect(),
            b: (0..CLASSES).map(|_| rng.random::<f64>() - 0.5).collect(),
        }
    }

    fn w_tensor(&self, dev: &Device) -> Tensor {
        Tensor::from_vec(self.w.clone(), (CLASSES, DIM), dev).unwrap()
    }

    /// The plain-loop log_softmax(f(v))[y] used by the finite differences.
    fn log_prob(&self, v: &[f64], y: usize) -> f64 {
        let logits: Vec<f64> = (0..CLASSES)
            .map(|c| self.b[c] + (0..DIM).map(|d| self.w[c * DIM + d] * v[d]).sum::<f64>())
            .collect();
        let m = logits.iter().cloned().fold(f64::MIN, f64::max);
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        logits[y] - lse
    }
}

impl Classifier for LinearSoftmax {
    fn forward(&self, x01: &Tensor) -> Result<ClassifierOutput> {
        let n = x01.dim(0)?;
        let flat = x01.reshape((n, DIM))?.to_dtype(DType::F64)?;
        let b = Tensor::from_vec(self.b.clone(), (1, CLASSES), x01.device())?;
        let logits = flat
            .matmul(&self.w_tensor(x01.device()).t()?)?
            .broadcast_add(&b)?;
        Ok(ClassifierOutput {
            logits,
            penultimate: flat,
            features: x01.clone(),
        })
    }

    fn log_prob_input_grad(&self, x01: &Tensor, labels: &[LabelId]) -> Result<Tensor> {
        let n = x01.dim(0)?;
        let logits = self.forward(x01)?.logits;
        let p = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let mut onehot = vec![0f64; n * CLASSES];
        for (i, y) in labels.iter().enumerate() {
            onehot[i * CLASSES + y.0 as usize] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, (n, CLASSES), x01.device())?;
        let g = (onehot - p)?.matmul(&self.w_tensor(x01.device()))?;
        Ok(g.reshape(x01.shape())?)
    }

    fn grad_cam(&self, _x01: &Tensor, _labels: &[LabelId]) -> Result<Tensor> {
        Err(EngineError::InvalidInput("no Grad-CAM layer".into()))
    }

    fn num_classes(&self) -> usize {
        CLASSES
    }
}

/// Σ_k log_softmax(f(nearest(crop_k((x̃+1)/2))))[y] for one 3×32×32 image, by index arithmetic.
fn loss(clf: &LinearSoftmax, xt: &[f64], boxes: &[CutBox], y: usize) -> f64 {
    let full = 32;
    boxes
        .iter()
        .map(|bx| {
            let scale = bx.size as f32 / SIDE as f32;
            let src = |d: usize| ((d as f32 * scale).floor() as usize).min(bx.size - 1);
            let mut v = vec![0f64; DIM];
            for c in 0..3 {
                for h in 0..SIDE {
                    for w in 0..SIDE {
                        let (sh, sw) = (bx.oy + src(h), bx.ox + src(w));
                        v[(c * SIDE + h) * SIDE + w] =
                            (xt[(c * full + sh) * full + sw] + 1.0) / 2.0;
                    }
                }
            }
            clf.log_prob(&v, y)
        })
        .sum()
}

#[test]
fn clean_grad_with_recorded_boxes_matches_finite_differences() {
    let Some(case) = engine_common::case("pipeline_gdm") else {
        return;
    };
    let dev = Device::Cpu;
    let clf = LinearSoftmax::new(11);
    let sched = SpacedSchedule::gdm(BetaSchedule::AdmLinear, 1000, 20).unwrap();
    let js = case.vec_i64("img0.den.j");
    let boxes_all = case.vec_i64("img0.cut.boxes");
    let x_in = case.f64("img0.den.x_in");
    let y = case.vec_i64("pred")[0] as usize;
    let mut rng = StdRng::seed_from_u64(3);
    let cg = CleanGrad {
        scale: 3.0,
        blend: true,
        cutouts: Some(CutoutSpec {
            num: 8,
            size: SIDE,
            cut_pow: 1.0,
        }),
    };
    for k in [0usize, 5] {
        let boxes: Vec<CutBox> = (0..8)
            .map(|i| {
                let r = &boxes_all[(k * 8 + i) * 3..(k * 8 + i) * 3 + 3];
                CutBox {
                    size: r[0] as usize,
                    ox: r[1] as usize,
                    oy: r[2] as usize,
                }
            })
            .collect();
        let x = x_in.narrow(0, k, 1).unwrap();
        let eps_v: Vec<f64> = (0..3 * 32 * 32)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect();
        let eps = Tensor::from_vec(eps_v, (1, 3, 32, 32), &dev).unwrap();
        let abar = [sched.alpha_bar(js[k] as usize).unwrap()];
        let g = cg
            .gradient(&clf, &x, &eps, &abar, &[LabelId(y as u32)], &boxes)
            .unwrap();
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let xt: Vec<f64> = blended_input(&x, &eps, &abar, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut checked_nonzero = 0;
        for i in (0..xt.len()).step_by(23) {
            let (mut p, mut m) = (xt.clone(), xt.clone());
            let h = 1e-5;
            p[i] += h;
            m[i] -= h;
            let fd = 3.0 * (loss(&clf, &p, &boxes, y) - loss(&clf, &m, &boxes, y)) / (2.0 * h);
            // f64 central differences of a smooth loss: truncation O(h²) ≈ 1e-10, cancellation
            // ≈ 1e-16·|L|/h ≈ 1e-10.
            assert!(
                (fd - g[i]).abs() <= 1e-7 + 1e-6 * fd.abs(),
                "step {k} coord {i}: fd {fd} vs {}",
                g[i]
            );
            if fd.abs() > 1e-4 {
                checked_nonzero += 1;
            }
        }
        assert!(checked_nonzero > 20, "the check must see real gradients");
    }
}

#[test]
fn blend_follows_the_noise_level() {
    let dev = Device::Cpu;
    let x = Tensor::new(&[[[[0.4f64]]], [[[-0.2]]]], &dev).unwrap();
    let eps = Tensor::new(&[[[[0.3f64]]], [[[0.7]]]], &dev).unwrap();
    let abar = [0.9, 0.2];
    let got: Vec<f64> = blended_input(&x, &eps, &abar, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, (&xv, &ev)) in [0.4, -0.2].iter().zip(&[0.3, 0.7]).enumerate() {
        let a: f64 = abar[i];
        let x0 = (xv - (1.0 - a).sqrt() * ev) / a.sqrt();
        let gamma = (1.0 - a).sqrt();
        let want = gamma * x0 + (1.0 - gamma) * xv;
        assert!((got[i] - want).abs() < 1e-12, "item {i}");
    }
    let plain = blended_input(&x, &eps, &abar, false).unwrap();
    assert_eq!(max_abs_diff(&plain, &x), 0.0);
}

#[test]
fn seeded_cutouts_are_reproducible_and_in_range() {
    let spec = CutoutSpec {
        num: 8,
        size: 224,
        cut_pow: 1.0,
    };
    let draw = || {
        spec.draw(&mut StdRng::seed_from_u64(100), (256, 256))
            .unwrap()
    };
    let (a, b) = (draw(), draw());
    assert_eq!(a, b);
    for bx in &a {
        assert!((224..256).contains(&bx.size));
        assert!(bx.ox + bx.size <= 256 && bx.oy + bx.size <= 256);
    }
    assert!(a.windows(2).any(|w| w[0] != w[1]));
}
