//! Lightning-style `.ckpt` files: a zip-format PyTorch pickle whose top level holds training
//! metadata and a nested `state_dict` with several sub-models and an EMA copy (the LDM layout).
//! No PyTorch here, so the file is written byte by byte in `torch.save`'s format (pickle
//! protocol 2, one stored zip member per storage), which is what `torch.save` emits.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use diffguard_engine::models::load::{Checkpoint, LoadOptions};

// ---- a minimal pickle writer -----------------------------------------------------------------

#[derive(Default)]
struct Pickle {
    out: Vec<u8>,
    storages: Vec<Vec<u8>>,
}

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }
    fn text(&mut self, s: &str) -> &mut Self {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }
    fn int(&mut self, v: i32) -> &mut Self {
        self.out.push(b'J');
        self.op(&v.to_le_bytes())
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn int_tuple(&mut self, vals: &[usize]) -> &mut Self {
        self.op(b"(");
        for &v in vals {
            self.int(v as i32);
        }
        self.op(b"t")
    }
    /// `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`.
    fn tensor(&mut self, storage: &str, shape: &[usize], data: Vec<u8>, numel: usize) -> &mut Self {
        let key = self.storages.len().to_string();
        self.storages.push(data);
        let mut stride = vec![1; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * shape[i + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
        self.text("storage")
            .global("torch", storage)
            .text(&key)
            .text("cpu")
            .int(numel as i32);
        self.op(b"tQ")
            .int(0)
            .int_tuple(shape)
            .int_tuple(&stride)
            .op(&[0x89]);
        self.global("collections", "OrderedDict")
            .op(b")R")
            .op(b"tR")
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// IEEE half bits of a value that is exactly representable (zero or a normal half).
fn f16_bits(v: f32) -> u16 {
    if v == 0.0 {
        return 0;
    }
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32 - 127 + 15;
    assert!(
        (1..31).contains(&exp) && b & 0x1fff == 0,
        "{v} is not an exact half"
    );
    sign | ((exp as u16) << 10) | ((b >> 13) & 0x3ff) as u16
}

// ---- a minimal stored-zip writer -------------------------------------------------------------

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    for (name, data) in entries {
        let offset = out.len() as u32;
        let common = |buf: &mut Vec<u8>| {
            for v in [20u16, 0, 0, 0, 0x21] {
                buf.extend_from_slice(&v.to_le_bytes()); // version, flags, stored, time, date
            }
            for v in [crc32(data), data.len() as u32, data.len() as u32] {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes()); // extra length
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        common(&mut central);
        central.extend_from_slice(&[0; 8]); // comment len, disk, internal attr, external attr…
        central.extend_from_slice(&[0; 2]); // …external attr (4 bytes total with the 2 above)
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_offset, cd_size) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let n = entries.len() as u16;
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&cd_size.to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

// ---- the checkpoint and the model ------------------------------------------------------------

#[derive(Debug)]
struct Tiny {
    conv: candle_nn::Conv2d,
    fc: candle_nn::Linear,
}

impl Tiny {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv: candle_nn::conv2d(1, 2, 3, Default::default(), vb.pp("body.conv"))?,
            fc: candle_nn::linear(2, 3, vb.pp("fc"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.conv.forward(x).unwrap().mean((2, 3)).unwrap();
        self.fc.forward(&h).unwrap()
    }
}

/// name → (shape, values); values are multiples of 1/8 so F16 storage is exact.
fn tiny_weights() -> BTreeMap<&'static str, (Vec<usize>, Vec<f32>)> {
    let ramp = |n: usize, k: f32| (0..n).map(|i| (i as f32 - k) / 8.0).collect::<Vec<f32>>();
    BTreeMap::from([
        ("body.conv.weight", (vec![2, 1, 3, 3], ramp(18, 9.0))),
        ("body.conv.bias", (vec![2], ramp(2, 1.0))),
        ("fc.weight", (vec![3, 2], ramp(6, 2.0))),
        ("fc.bias", (vec![3], ramp(3, 0.0))),
    ])
}

/// {'epoch': 7, 'global_step': 1200, 'pytorch-lightning_version': '1.9.5',
///  'state_dict': OrderedDict(model.diffusion_model.* (conv weight as F16), model_ema.*,
///  first_stage_model.*), 'lr_schedulers': []}
fn lightning_ckpt() -> Vec<u8> {
    let mut p = Pickle::default();
    p.op(&[0x80, 2]).op(b"}(");
    p.text("epoch").int(7).text("global_step").int(1200);
    p.text("pytorch-lightning_version").text("1.9.5");
    p.text("state_dict")
        .global("collections", "OrderedDict")
        .op(b")R(");
    for (name, (shape, vals)) in tiny_weights() {
        p.text(&format!("model.diffusion_model.{name}"));
        if name == "body.conv.weight" {
            let bytes = vals
                .iter()
                .flat_map(|v| f16_bits(*v).to_le_bytes())
                .collect();
            p.tensor("HalfStorage", &shape, bytes, vals.len());
        } else {
            p.tensor("FloatStorage", &shape, f32_bytes(&vals), vals.len());
        }
    }
    p.text("model_ema.decay")
        .tensor("FloatStorage", &[], f32_bytes(&[0.9999]), 1);
    p.text("model_ema.diffusion_modelfcbias")
        .tensor("FloatStorage", &[3], f32_bytes(&[0.0; 3]), 3);
    p.text("first_stage_model.quant_conv.bias").tensor(
        "FloatStorage",
        &[3],
        f32_bytes(&[1.0; 3]),
        3,
    );
    p.op(b"u").text("lr_schedulers").op(b"]").op(b"u.");
    let mut entries = vec![("archive/data.pkl".to_string(), p.out.clone())];
    for (i, s) in p.storages.into_iter().enumerate() {
        entries.push((format!("archive/data/{i}"), s));
    }
    entries.push(("archive/version".into(), b"3\n".to_vec()));
    zip(&entries)
}

/// Each test writes its own file: the pickle reader reads tensors lazily from the path, so a
/// file shared between concurrently running tests could be rewritten under a reader.
fn write_ckpt(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("models_cnn_pickle_{test}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("last.ckpt");
    std::fs::write(&path, lightning_ckpt()).unwrap();
    path
}

#[test]
fn nested_state_dict_loads_with_a_prefix() {
    let ck = Checkpoint::open(write_ckpt("nested")).unwrap();
    assert_eq!(ck.shapes().len(), 7, "{:?}", ck.shapes());
    let opts = LoadOptions::new(DType::F32, &Device::Cpu).with_prefix("model.diffusion_model.");
    let model = ck.load(&opts, Tiny::new).unwrap();

    let reference: std::collections::HashMap<String, Tensor> = tiny_weights()
        .into_iter()
        .map(|(n, (s, v))| (n.to_string(), Tensor::from_vec(v, s, &Device::Cpu).unwrap()))
        .collect();
    let want = Tiny::new(VarBuilder::from_tensors(
        reference,
        DType::F32,
        &Device::Cpu,
    ))
    .unwrap();
    let x = Tensor::from_vec(
        (0..25).map(|i| i as f32 / 25.0).collect(),
        (1, 1, 5, 5),
        &Device::Cpu,
    )
    .unwrap();
    let diff = (model.forward(&x) - want.forward(&x))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(
        diff.to_scalar::<f32>().unwrap(),
        0.0,
        "weights changed on the way through the pickle"
    );
}

#[test]
fn unprefixed_load_names_the_other_submodels() {
    let ck = Checkpoint::open(write_ckpt("unprefixed")).unwrap();
    let opts = LoadOptions::new(DType::F32, &Device::Cpu);
    let err = ck.load(&opts, Tiny::new).unwrap_err().to_string();
    assert!(
        err.contains("4 missing: body.conv.bias, body.conv.weight, fc.bias, fc.weight"),
        "{err}"
    );
    assert!(
        err.contains("7 unexpected (unused): first_stage_model.quant_conv.bias"),
        "{err}"
    );
    // Ignoring the EMA copy and the other sub-models leaves only the missing names.
    let opts = opts
        .ignoring("model_ema.*")
        .ignoring("first_stage_model.*")
        .ignoring("model.*");
    let err = ck.load(&opts, Tiny::new).unwrap_err().to_string();
    assert!(!err.contains("unexpected"), "{err}");
}

#[test]
fn a_pickle_without_tensors_is_a_clear_error() {
    // What `torch.save({'epoch': 1})` (or a whole pickled module, as candle reads it) gives.
    let mut p = Pickle::default();
    p.op(&[0x80, 2]).op(b"}(").text("epoch").int(1).op(b"u.");
    let bytes = zip(&[
        ("archive/data.pkl".to_string(), p.out.clone()),
        ("archive/version".into(), b"3\n".to_vec()),
    ]);
    let dir = std::env::temp_dir().join(format!("models_cnn_pickle_empty_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("empty.pth");
    std::fs::write(&path, bytes).unwrap();
    let err = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("no tensors at the top level and no readable `state_dict`"),
        "{err}"
    );
}

#[test]
fn pickle_writer_self_check() {
    // The zip CRC must be the standard one, or the reader would reject the archive for a reason
    // unrelated to the loader under test.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(f16_bits(-0.125), 0xB000);
}
