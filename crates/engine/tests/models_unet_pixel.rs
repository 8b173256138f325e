//! The project's pixel UNet: shapes, the null-label path, determinism, batch consistency and
//! finite-difference gradient checks (training back-propagates through it).

mod models_unet_common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use diffguard_engine::models::pixel_unet::{PixelUNet, PixelUNetConfig};
use diffguard_engine::{Denoiser, LabelId};
use models_unet_common::{BATCH_TOL, assert_close};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

fn randn(rng: &mut StdRng, shape: &[usize], std: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let d = Normal::new(0.0, std).unwrap();
    let v: Vec<f64> = (0..n).map(|_| d.sample(rng)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A model whose every parameter is redrawn from a seeded RNG (candle's CPU RNG cannot be seeded):
/// weights N(0, 1/fan_in), biases N(0, 0.1²), norm scales 1 + N(0, 0.1²).
fn seeded_model(cfg: PixelUNetConfig, dtype: DType, seed: u64) -> (PixelUNet, VarMap) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    let model = PixelUNet::new(vb, cfg).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let value = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            randn(&mut rng, &dims, 1.0 / (fan_in as f64).sqrt(), dtype)
        } else if name.ends_with("weight") {
            (randn(&mut rng, &dims, 0.1, dtype) + 1.0).unwrap()
        } else {
            randn(&mut rng, &dims, 0.1, dtype)
        };
        var.set(&value).unwrap();
    }
    drop(data);
    (model, varmap)
}

#[test]
fn fashion_preset_shape_size_null_label_and_determinism() {
    let cfg = PixelUNetConfig::fashion_mnist();
    let (model, varmap) = seeded_model(cfg, DType::F32, 1);
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    eprintln!("fashion_mnist pixel UNet: {params} parameters");
    assert!(
        (1_000_000..=3_000_000).contains(&params),
        "{params} parameters"
    );
    assert_eq!(model.null_label(), Some(LabelId(10)));
    assert_eq!(model.num_classes(), 10);

    let mut rng = StdRng::seed_from_u64(2);
    let x = randn(&mut rng, &[3, 1, 28, 28], 1.0, DType::F32);
    let t = [5, 500, 999];
    let labels = [LabelId(0), LabelId(9), LabelId(10)];
    let eps = model.eps(&x, &t, Some(&labels)).unwrap();
    assert_eq!(eps.dims(), &[3, 1, 28, 28]);

    // Determinism: bit-identical repeats.
    let again = model.eps(&x, &t, Some(&labels)).unwrap();
    let diff = (&eps - &again).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

    // None = the null label for every item; a real label gives a different output.
    let uncond = model.eps(&x, &t, None).unwrap();
    let null = model.eps(&x, &t, Some(&[LabelId(10); 3])).unwrap();
    let d_null = (&uncond - &null).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(d_null.to_scalar::<f32>().unwrap(), 0.0);
    let d_label = (&uncond - &eps).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d_label.to_scalar::<f32>().unwrap() > 1e-4);

    // Out-of-range labels are refused, not wrapped.
    assert!(model.eps(&x, &t, Some(&[LabelId(11); 3])).is_err());
    assert!(model.eps(&x, &t[..2], None).is_err());
}

#[test]
fn batch_equals_per_item() {
    let (model, _vm) = seeded_model(PixelUNetConfig::fashion_mnist(), DType::F32, 3);
    let mut rng = StdRng::seed_from_u64(4);
    let x = randn(&mut rng, &[4, 1, 28, 28], 1.0, DType::F32);
    let t = [1, 250, 600, 999];
    let labels = [3, 10, 0, 7];
    let full = model.forward(&x, &t, &labels).unwrap();
    let items: Vec<Tensor> = (0..4)
        .map(|i| {
            model
                .forward(&x.narrow(0, i, 1).unwrap(), &t[i..=i], &labels[i..=i])
                .unwrap()
        })
        .collect();
    let joined = Tensor::cat(&items, 0).unwrap();
    assert_close("batch vs items", &full, &joined, BATCH_TOL);
}

/// loss(x, θ) = Σ ε(x)·r, a generic scalar whose gradient exercises every path.
fn loss(model: &PixelUNet, x: &Tensor, r: &Tensor) -> Tensor {
    let eps = model.forward(x, &[7, 900], &[1, 3]).unwrap();
    (eps * r).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_scalar::<f64>().unwrap()
}

/// Central differences in f64 on a tiny config: input gradient and some parameter gradients
/// (including the label table row used and an attention weight).
#[test]
fn gradients_match_finite_differences_f64() {
    let (model, varmap) = seeded_model(PixelUNetConfig::tiny(), DType::F64, 5);
    let mut rng = StdRng::seed_from_u64(6);
    let x = Var::from_tensor(&randn(&mut rng, &[2, 1, 8, 8], 1.0, DType::F64)).unwrap();
    let r = randn(&mut rng, &[2, 1, 8, 8], 1.0, DType::F64);
    let grads = loss(&model, x.as_tensor(), &r).backward().unwrap();
    let h = 1e-5;
    // f64 central differences: truncation O(h²) ≈ 1e-10 and rounding ≈ 1e-16/h ≈ 1e-11 relative
    // to the loss scale; 1e-6 relative (floor 1e-8) leaves margin without hiding real errors.
    let check = |what: &str, analytic: f64, plus: f64, minus: f64| {
        let numeric = (plus - minus) / (2.0 * h);
        let err = (analytic - numeric).abs();
        assert!(
            err <= 1e-6 * numeric.abs().max(analytic.abs()) + 1e-8,
            "{what}: analytic {analytic}, numeric {numeric}"
        );
    };

    let gx = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let x0 = x
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for &i in &[0usize, 9, 27, 63, 64, 100, 127] {
        let eval = |delta: f64| {
            let mut v = x0.clone();
            v[i] += delta;
            let xt = Tensor::from_vec(v, (2, 1, 8, 8), &Device::Cpu).unwrap();
            scalar(&loss(&model, &xt, &r))
        };
        check(&format!("dL/dx[{i}]"), gx[i], eval(h), eval(-h));
    }

    let data = varmap.data().lock().unwrap();
    let params = [
        ("label_emb.weight", 3 * 128 + 5),
        ("time_embed.0.weight", 17),
        ("input_blocks.0.0.weight", 4),
        ("input_blocks.2.0.in_layers.2.weight", 100),
        ("input_blocks.3.1.qkv.weight", 1000),
        ("middle_block.1.proj_out.bias", 3),
        ("output_blocks.1.0.emb_layers.1.weight", 50),
        ("out.2.bias", 0),
    ];
    for (name, idx) in params {
        let var = data
            .get(name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let base = orig.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, orig.shape(), &Device::Cpu).unwrap())
                .unwrap();
            scalar(&loss(&model, x.as_tensor(), &r))
        };
        let (p, m) = (eval(h), eval(-h));
        var.set(&orig).unwrap();
        check(&format!("dL/d{name}[{idx}]"), g[idx], p, m);
    }
}

/// Training-cost probe for the Fashion-MNIST preset (run with `-- --ignored --nocapture`):
/// one forward+backward of the ε-MSE loss at batch 32.
#[test]
#[ignore]
fn fashion_train_step_timing() {
    // PIXEL_RES_BLOCKS=1 probes the lighter variant a trainer may pick through the config.
    let mut cfg = PixelUNetConfig::fashion_mnist();
    if let Some(n) = std::env::var("PIXEL_RES_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.num_res_blocks = n;
    }
    let (model, varmap) = seeded_model(cfg, DType::F32, 7);
    let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    eprintln!("{params} parameters");
    let mut rng = StdRng::seed_from_u64(8);
    let x = randn(&mut rng, &[32, 1, 28, 28], 1.0, DType::F32);
    let target = randn(&mut rng, &[32, 1, 28, 28], 1.0, DType::F32);
    let t: Vec<u32> = (0..32).map(|i| i * 31).collect();
    let labels: Vec<u32> = (0..32).map(|i| i % 11).collect();
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let eps = model.forward(&x, &t, &labels).unwrap();
        let fwd = start.elapsed();
        let loss = (eps - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        let grads = loss.backward().unwrap();
        let n = varmap
            .all_vars()
            .iter()
            .filter(|v| grads.get(v.as_tensor()).is_some())
            .count();
        eprintln!(
            "batch 32: forward {fwd:?}, forward+backward {:?} ({n} params with grads)",
            start.elapsed()
        );
    }
}

/// The PyTorch twin (`scripts/torch_twin.py`, which reproduces the official ADM goldens) and the
/// Rust networks agree on the same weights: what the twin trains on a GPU means the same in Rust.
/// Fixture: `scripts/torch_twin.py parity --out crates/engine/tests/data/torch_twin_parity.safetensors`.
#[test]
fn torch_twin_parity() {
    use diffguard_engine::models::resnet::{ResNet, ResNetConfig};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/torch_twin_parity.safetensors");
    let all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(all.clone(), DType::F32, &Device::Cpu);
    let unet_cfg = PixelUNetConfig {
        channel_mult: vec![1, 1],
        ..PixelUNetConfig::tiny()
    };
    let unet = PixelUNet::new(vb.pp("unet"), unet_cfg).unwrap();
    let ints = |name: &str| -> Vec<u32> {
        let v = all[name].to_vec1::<i64>().unwrap();
        v.into_iter().map(|i| i as u32).collect()
    };
    let eps = unet
        .forward(&all["case.x"], &ints("case.t"), &ints("case.y"))
        .unwrap();
    // Both float32, same weights: only summation order differs (≈1e-6 of the output scale
    // measured); 1e-4 of the scale is the golden tests' bound.
    assert_close("pixel UNet vs torch twin", &eps, &all["case.eps"], 1e-4);

    let res_cfg = ResNetConfig::small(1, vec![8, 16], vec![1, 1], 3, vec![0.25], vec![0.5]);
    let resnet = ResNet::new(vb.pp("resnet"), &res_cfg).unwrap();
    let out = resnet.forward_t(&all["case.image"], false).unwrap();
    assert_close(
        "small ResNet vs torch twin",
        &out.logits,
        &all["case.logits"],
        1e-4,
    );
}
