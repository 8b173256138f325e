//! ResNet: parity with the official-code golden (`goldens/resnet`) and input gradients against
//! central finite differences in f64.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use diffguard_engine::models::resnet::{BlockKind, ResNet, ResNetConfig};
use diffguard_engine::{Classifier, LabelId};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};

fn golden_dir(name: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/goldens")
        .join(name);
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: golden folder {} is absent", dir.display());
        None
    }
}

/// max |a − b| / max |b|: the goldens' `max_rel_to_max` measure.
fn rel_to_max(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn labels_of(t: &Tensor) -> Vec<LabelId> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| LabelId(v as u32))
        .collect()
}

fn golden_config() -> ResNetConfig {
    ResNetConfig::torchvision(BlockKind::Bottleneck, vec![1, 1, 1, 1], 10)
}

/// Runs every golden check at `dtype`; `factor` scales the reference's own f32-vs-f64 error.
fn check_golden(dtype: DType, factor: f64) {
    let Some(dir) = golden_dir("resnet") else {
        return;
    };
    let dev = Device::Cpu;
    let model = ResNet::load(
        &dir.join("weights.safetensors"),
        &golden_config(),
        dtype,
        &dev,
    )
    .unwrap();
    let case = candle_core::safetensors::load(dir.join("case.safetensors"), &dev).unwrap();
    let x = case["image01"].to_dtype(dtype).unwrap();
    let out = model.forward(&x).unwrap();

    // Observed float64-vs-float32 differences of the reference (config.json tolerances_observed):
    // logits 3.1e-6, features 1.5e-6, input gradient 7.1e-7 (all max_rel_to_max). Our f32 run
    // differs from PyTorch's by round-off of the same order, so allow `factor` times that.
    let e = rel_to_max(&out.logits, &case["logits"]);
    eprintln!("{dtype:?} rel-to-max errors: logits {e:.2e}");
    assert!(e < 3.2e-6 * factor, "{dtype:?} logits rel err {e}");
    let e = rel_to_max(&out.penultimate, &case["penultimate"]);
    eprintln!("  penultimate {e:.2e}");
    assert!(e < 1.5e-6 * factor, "{dtype:?} penultimate rel err {e}");
    let e = rel_to_max(&out.features, &case["layer4"]);
    eprintln!("  layer4 {e:.2e}");
    assert!(e < 1.5e-6 * factor, "{dtype:?} layer4 rel err {e}");
    let pred: Vec<u32> = out.logits.argmax(1).unwrap().to_vec1().unwrap();
    let want: Vec<u32> = labels_of(&case["pred"]).iter().map(|l| l.0).collect();
    assert_eq!(pred, want);

    let grad = model
        .log_prob_input_grad(&x, &labels_of(&case["labels"]))
        .unwrap();
    let e = rel_to_max(&grad, &case["input_grad"]);
    eprintln!("  input_grad {e:.2e}");
    assert!(e < 7.1e-7 * factor, "{dtype:?} input_grad rel err {e}");

    // The golden CAM equals the analytic formula bit for bit in the reference, so the error is
    // that of the layer4 activations it is made from.
    let cam = model.grad_cam(&x, &labels_of(&case["pred"])).unwrap();
    let e = rel_to_max(&cam, &case["cam.lowres_relu"]);
    eprintln!("  cam {e:.2e}");
    assert!(e < 1.5e-6 * factor, "{dtype:?} cam rel err {e}");
}

#[test]
fn golden_parity_f32() {
    check_golden(DType::F32, 5.0);
}

#[test]
fn golden_parity_f64() {
    // In f64 our result is closer to the exact value than the f32 reference is, so the distance
    // to the reference is about the reference's own f32 error.
    check_golden(DType::F64, 3.0);
}

/// Deterministic random weights (candle's CPU RNG cannot be seeded): N(0, 2/fan_in) convs,
/// BN close to identity with positive variances.
struct Seeded;

impl SimpleBackend for Seeded {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let seed = name
            .bytes()
            .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        let mut rng = StdRng::seed_from_u64(seed);
        let n = s.elem_count();
        let fan_in = s.dims().iter().skip(1).product::<usize>().max(1) as f64;
        let normal = Normal::new(0.0, 1.0).unwrap();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                if name.ends_with("running_var") {
                    rng.random_range(0.5..1.5)
                } else if name.ends_with("bn1.weight")
                    || name.ends_with("bn2.weight")
                    || name.ends_with("bn3.weight")
                {
                    1.0 + 0.2 * normal.sample(&mut rng)
                } else if s.rank() == 1 {
                    0.1 * normal.sample(&mut rng)
                } else {
                    normal.sample(&mut rng) * (2.0 / fan_in).sqrt()
                }
            })
            .collect();
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn seeded_model(cfg: &ResNetConfig) -> ResNet {
    ResNet::new(
        VarBuilder::from_backend(Box::new(Seeded), DType::F64, Device::Cpu),
        cfg,
    )
    .unwrap()
}

fn random_image(shape: (usize, usize, usize, usize), seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..shape.0 * shape.1 * shape.2 * shape.3)
        .map(|_| rng.random::<f64>())
        .collect()
}

/// Autograd input gradient vs central finite differences of Σ log_softmax[label] at every pixel.
fn check_fd(model: &ResNet, shape: (usize, usize, usize, usize), labels: &[LabelId]) {
    let data = random_image(shape, 11);
    let x = Tensor::from_vec(data.clone(), shape, &Device::Cpu).unwrap();
    let grad = model
        .log_prob_input_grad(&x, labels)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let loss = |d: Vec<f64>| {
        let t = Tensor::from_vec(d, shape, &Device::Cpu).unwrap();
        let logits = model.forward(&t).unwrap().logits;
        let lp = candle_nn::ops::log_softmax(&logits, 1)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        lp.iter()
            .zip(labels)
            .map(|(row, l)| row[l.0 as usize])
            .sum::<f64>()
    };
    let eps = 1e-6;
    let scale = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert!(scale > 1e-6, "gradient vanished");
    for i in (0..data.len()).step_by(7) {
        let (mut up, mut down) = (data.clone(), data.clone());
        up[i] += eps;
        down[i] -= eps;
        let fd = (loss(up) - loss(down)) / (2.0 * eps);
        // Central FD error is O(eps²·f''') ≈ 1e-12 plus round-off 1e-16/eps ≈ 1e-10; a ReLU or
        // max-pool kink inside ±eps would show as an O(1) error instead.
        assert!(
            (fd - grad[i]).abs() < 1e-7 * scale.max(1.0),
            "pixel {i}: autograd {} vs FD {fd}",
            grad[i]
        );
    }
}

#[test]
fn imagenet_stem_input_gradient_matches_finite_differences() {
    // Odd input size so the k3 s2 p1 pool sees both padded borders.
    let mut cfg = ResNetConfig::torchvision(BlockKind::Bottleneck, vec![1, 1], 5);
    cfg.stem_width = 8;
    cfg.widths = vec![4, 8];
    check_fd(
        &seeded_model(&cfg),
        (2, 3, 19, 21),
        &[LabelId(1), LabelId(4)],
    );
}

#[test]
fn small_resnet_input_gradient_matches_finite_differences() {
    let cfg = ResNetConfig::small(1, vec![4, 8], vec![1, 1], 10, vec![0.2860], vec![0.3530]);
    let model = seeded_model(&cfg);
    let x = Tensor::zeros((3, 1, 28, 28), DType::F64, &Device::Cpu).unwrap();
    let out = model.forward(&x).unwrap();
    assert_eq!(out.logits.dims(), [3, 10]);
    assert_eq!(out.penultimate.dims(), [3, 8]);
    assert_eq!(out.features.dims(), [3, 8, 14, 14]);
    check_fd(&model, (1, 1, 12, 12), &[LabelId(7)]);
}

#[test]
fn grad_cam_equals_the_gradient_definition() {
    // Grad-CAM from its definition (weights = spatial mean of ∂z_y/∂A) by finite differences
    // through the head, against the analytic fc shortcut.
    let cfg = ResNetConfig::small(3, vec![4, 8], vec![1, 1], 6, vec![0.5; 3], vec![0.25; 3]);
    let model = seeded_model(&cfg);
    let x = Tensor::from_vec(
        random_image((1, 3, 16, 16), 5),
        (1, 3, 16, 16),
        &Device::Cpu,
    )
    .unwrap();
    let cam = model.grad_cam(&x, &[LabelId(2)]).unwrap();
    let a = model.forward(&x).unwrap().features;
    let (_, c, h, w) = a.dims4().unwrap();
    let head = |feat: &Tensor| {
        let pooled = feat.mean((2, 3)).unwrap();
        let logits = candle_core::Module::forward(&linear_of(&model), &pooled).unwrap();
        logits.to_vec2::<f64>().unwrap()[0][2]
    };
    let base = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut weights = vec![0.0; c];
    for (ch, wgt) in weights.iter_mut().enumerate() {
        let mut grad_sum = 0.0;
        for p in 0..h * w {
            let i = ch * h * w + p;
            let mut up = base.clone();
            up[i] += 1e-4;
            let mut down = base.clone();
            down[i] -= 1e-4;
            let t = |v| Tensor::from_vec(v, (1, c, h, w), &Device::Cpu).unwrap();
            grad_sum += (head(&t(up)) - head(&t(down))) / 2e-4;
        }
        *wgt = grad_sum / (h * w) as f64;
    }
    let want: Vec<f64> = (0..h * w)
        .map(|p| {
            (0..c)
                .map(|ch| weights[ch] * base[ch * h * w + p])
                .sum::<f64>()
                .max(0.0)
        })
        .collect();
    let got = cam.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for (g, w) in got.iter().zip(&want) {
        // The head is linear, so FD is exact up to round-off (~1e-12 here).
        assert!((g - w).abs() < 1e-9, "cam {g} vs definition {w}");
    }
}

/// The fc layer of `model` rebuilt from the same seeded weights (the model keeps it private).
fn linear_of(model: &ResNet) -> candle_nn::Linear {
    let vb = VarBuilder::from_backend(Box::new(Seeded), DType::F64, Device::Cpu);
    let dim = model.config().feature_dim();
    candle_nn::linear(dim, model.num_classes(), vb.pp("fc")).unwrap()
}

#[test]
fn rejects_bad_labels_and_channels() {
    let cfg = ResNetConfig::small(1, vec![4], vec![1], 3, vec![0.5], vec![0.5]);
    let model = seeded_model(&cfg);
    let x = Tensor::zeros((2, 1, 8, 8), DType::F64, &Device::Cpu).unwrap();
    assert!(model.log_prob_input_grad(&x, &[LabelId(0)]).is_err());
    assert!(model.grad_cam(&x, &[LabelId(0), LabelId(3)]).is_err());
    let rgb = Tensor::zeros((1, 3, 8, 8), DType::F64, &Device::Cpu).unwrap();
    assert!(model.forward(&rgb).is_err());
    // An f32 input to an f64 model is converted, and its gradient comes back in f32.
    let x32 = Tensor::ones((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        model
            .log_prob_input_grad(&x32, &[LabelId(1)])
            .unwrap()
            .dtype(),
        DType::F32
    );
    let mut bad = cfg.clone();
    bad.mean = vec![0.5, 0.5];
    assert!(
        ResNet::new(
            VarBuilder::from_backend(Box::new(Seeded), DType::F64, Device::Cpu),
            &bad
        )
        .is_err()
    );
}

#[test]
fn trainable_and_frozen_paths_agree() {
    // A VarMap-backed model (training: plain conv + BatchNorm, kernel gradients kept) and the
    // same weights as plain tensors (inference: BN folded into the conv, input-only backward).
    let cfg = ResNetConfig::torchvision(BlockKind::Basic, vec![1, 1], 4);
    let vm = candle_nn::VarMap::new();
    let trainable =
        ResNet::new(VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu), &cfg).unwrap();
    let mut plain = HashMap::new();
    for (name, var) in vm.data().lock().unwrap().iter() {
        // Non-trivial BN statistics and affine parameters, so that the fold is exercised.
        let fresh = Seeded
            .get(
                var.shape().clone(),
                name,
                candle_nn::Init::Const(0.0),
                DType::F64,
                &Device::Cpu,
            )
            .unwrap();
        var.set(&fresh).unwrap();
        plain.insert(name.clone(), fresh);
    }
    let frozen = ResNet::new(
        VarBuilder::from_tensors(plain, DType::F64, &Device::Cpu),
        &cfg,
    )
    .unwrap();
    let x = Tensor::from_vec(
        random_image((2, 3, 21, 21), 3),
        (2, 3, 21, 21),
        &Device::Cpu,
    )
    .unwrap();
    let labels = [LabelId(0), LabelId(3)];
    let (a, b) = (trainable.forward(&x).unwrap(), frozen.forward(&x).unwrap());
    // Folding reassociates f64 products: differences at the 1e-15 level, relative.
    assert!(rel_to_max(&a.logits, &b.logits) < 1e-12);
    assert!(rel_to_max(&a.features, &b.features) < 1e-12);
    let ga = trainable.log_prob_input_grad(&x, &labels).unwrap();
    let gb = frozen.log_prob_input_grad(&x, &labels).unwrap();
    assert!(rel_to_max(&ga, &gb) < 1e-12);

    // Training mode: batch statistics, gradients reach the weights; refused on constant weights.
    let logits = trainable.forward_t(&x, true).unwrap().logits;
    let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let w = vm.data().lock().unwrap()["layer2.0.conv1.weight"].clone();
    assert!(grads.get(w.as_tensor()).is_some());
    assert!(frozen.forward_t(&x, true).is_err());
}
