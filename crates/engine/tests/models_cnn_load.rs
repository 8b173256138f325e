//! Weight loading: purpose-built good and bad safetensors files written here, one model shape.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use diffguard_engine::EngineError;
use diffguard_engine::models::load::{Checkpoint, IGNORE_BN_COUNTERS, LoadOptions, glob_match};

/// A two-layer model with the naming pattern of the real ones (nested prefixes, conv + linear).
#[derive(Debug)]
struct Tiny {
    conv: candle_nn::Conv2d,
    fc: candle_nn::Linear,
}

impl Tiny {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv: candle_nn::conv2d(1, 2, 3, Default::default(), vb.pp("body").pp("conv"))?,
            fc: candle_nn::linear(2, 3, vb.pp("fc"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv.forward(x).unwrap().mean((2, 3)).unwrap();
        self.fc.forward(&h).unwrap()
    }
}

fn ramp(shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) / 8.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn good_tensors(prefix: &str, dtype: DType) -> HashMap<String, Tensor> {
    [
        ("body.conv.weight", vec![2, 1, 3, 3]),
        ("body.conv.bias", vec![2]),
        ("fc.weight", vec![3, 2]),
        ("fc.bias", vec![3]),
    ]
    .into_iter()
    .map(|(n, s)| (format!("{prefix}{n}"), ramp(&s, dtype)))
    .collect()
}

fn write(name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("models_cnn_load_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

fn opts() -> LoadOptions {
    LoadOptions::new(DType::F32, &Device::Cpu)
}

fn mismatch_detail(err: EngineError) -> String {
    match err {
        EngineError::WeightMismatch { detail, .. } => detail,
        other => panic!("expected WeightMismatch, got {other}"),
    }
}

#[test]
fn exact_checkpoint_loads_and_computes() {
    let path = write("good.safetensors", &good_tensors("", DType::F32));
    let ck = Checkpoint::open(&path).unwrap();
    let model = ck.load(&opts(), Tiny::new).unwrap();
    let x = ramp(&[1, 1, 4, 4], DType::F32);
    // Same computation from the raw tensors: the loader must hand over the file's values unchanged.
    let direct = Tiny::new(VarBuilder::from_tensors(
        good_tensors("", DType::F32),
        DType::F32,
        &Device::Cpu,
    ))
    .unwrap();
    let diff = (model.forward(&x) - direct.forward(&x))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn every_problem_is_listed_in_one_error() {
    let mut t = good_tensors("", DType::F32);
    t.remove("fc.bias");
    t.remove("body.conv.bias");
    t.insert("fc.weight".into(), ramp(&[3, 5], DType::F32));
    t.insert("body.extra.weight".into(), ramp(&[4], DType::F32));
    let path = write("bad.safetensors", &t);
    let err = Checkpoint::open(&path)
        .unwrap()
        .load(&opts(), Tiny::new)
        .unwrap_err();
    let detail = mismatch_detail(err);
    assert!(
        detail.contains("2 missing: body.conv.bias, fc.bias"),
        "{detail}"
    );
    assert!(
        detail.contains("fc.weight (model [3, 2], checkpoint [3, 5])"),
        "{detail}"
    );
    assert!(
        detail.contains("unexpected (unused): body.extra.weight"),
        "{detail}"
    );

    let (model, m) = Checkpoint::open(&path).unwrap().compare(&opts(), Tiny::new);
    assert!(model.is_none());
    assert_eq!(m.missing, ["body.conv.bias", "fc.bias"]);
    assert_eq!(m.unexpected, ["body.extra.weight"]);
    assert_eq!(
        m.wrong_shape,
        [("fc.weight".to_string(), vec![3, 2], vec![3, 5])]
    );
}

#[test]
fn prefix_selects_one_submodel_and_ignores_the_rest() {
    // Lightning LDM layout: several models and an EMA copy side by side.
    let mut t = good_tensors("model.diffusion_model.", DType::F32);
    t.extend(good_tensors("first_stage_model.", DType::F32));
    t.extend(good_tensors("model_ema.diffusion_model", DType::F32));
    t.insert(
        "model.diffusion_model.bn.num_batches_tracked".into(),
        ramp(&[1], DType::F32),
    );
    let path = write("ldm_like.safetensors", &t);
    let ck = Checkpoint::open(&path).unwrap();

    let o = opts().with_prefix("model.diffusion_model.");
    let detail = mismatch_detail(ck.load(&o, Tiny::new).unwrap_err());
    assert!(
        detail.contains("1 unexpected (unused): model.diffusion_model.bn.num_batches_tracked"),
        "{detail}"
    );
    ck.load(&o.ignoring(IGNORE_BN_COUNTERS), Tiny::new).unwrap();
    ck.load(&opts().with_prefix("first_stage_model."), Tiny::new)
        .unwrap();

    let detail = mismatch_detail(
        ck.load(&opts().with_prefix("cond_stage_model."), Tiny::new)
            .unwrap_err(),
    );
    assert!(
        detail.starts_with("4 missing: cond_stage_model.body.conv.bias"),
        "{detail}"
    );
}

#[test]
fn half_precision_checkpoints_are_converted() {
    let want = Tiny::new(VarBuilder::from_tensors(
        good_tensors("", DType::F32),
        DType::F64,
        &Device::Cpu,
    ))
    .unwrap();
    let x = ramp(&[1, 1, 4, 4], DType::F64);
    for stored in [DType::F16, DType::BF16] {
        let path = write(
            &format!("half_{stored:?}.safetensors"),
            &good_tensors("", stored),
        );
        let ck = Checkpoint::open(&path).unwrap();
        // The ramp values are multiples of 1/8 below 2: exact in F16 and BF16.
        let m = ck
            .load(&LoadOptions::new(DType::F64, &Device::Cpu), Tiny::new)
            .unwrap();
        let y = m.forward(&x);
        assert_eq!(y.dtype(), DType::F64);
        let diff = (y - want.forward(&x))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0);
        let bf = ck
            .load(&LoadOptions::new(DType::BF16, &Device::Cpu), Tiny::new)
            .unwrap();
        // candle's CPU matmul has no BF16 kernel, so only the stored dtype is checked here.
        assert_eq!(bf.fc.weight().dtype(), DType::BF16);
    }
}

#[test]
fn wrong_formats_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("models_cnn_load_fmt_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let legacy = dir.join("legacy.pth");
    std::fs::write(
        &legacy,
        [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20],
    )
    .unwrap();
    let e = Checkpoint::open(&legacy).unwrap_err().to_string();
    assert!(e.contains("legacy"), "{e}");
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"hello, this is not a checkpoint").unwrap();
    let e = Checkpoint::open(&junk).unwrap_err().to_string();
    assert!(e.contains("neither safetensors nor"), "{e}");
    let e = Checkpoint::open(dir.join("absent.safetensors")).unwrap_err();
    assert!(matches!(e, EngineError::Io { .. }), "{e}");
}

#[test]
fn glob_patterns() {
    assert!(glob_match(
        "*num_batches_tracked",
        "layer1.0.bn1.num_batches_tracked"
    ));
    assert!(glob_match("model_ema.*", "model_ema.decay"));
    assert!(glob_match("a*b*c", "a_x_b_y_c"));
    assert!(!glob_match("a*b*c", "a_x_b_y_d"));
    assert!(!glob_match("fc.weight", "fc.weights"));
    assert!(glob_match("*", ""));
}
