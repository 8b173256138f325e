//! Shared helpers for the engine's golden tests: locating and reading `../shared/goldens`.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::safetensors::SliceSafetensors;
use candle_core::{DType, Device, Tensor};

/// One golden's `case.safetensors`, read into memory. Tensors are fetched by name so that the BOOL
/// entries candle cannot convert do not spoil the others.
pub struct Case {
    name: String,
    bytes: Vec<u8>,
}

/// `<repo root>/../shared/goldens/<name>` if the goldens are present.
pub fn golden_dir(name: &str) -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("../shared/goldens").join(name);
    dir.is_dir().then_some(dir)
}

/// Loads `case.safetensors` of a golden, or prints a loud SKIPPED line and returns None.
pub fn case(name: &str) -> Option<Case> {
    let Some(dir) = golden_dir(name) else {
        eprintln!("SKIPPED: golden `{name}` not found under ../shared/goldens");
        return None;
    };
    let bytes = std::fs::read(dir.join("case.safetensors")).unwrap();
    Some(Case {
        name: name.to_string(),
        bytes,
    })
}

impl Case {
    pub fn get(&self, key: &str) -> Tensor {
        let st = SliceSafetensors::new(&self.bytes).unwrap();
        st.load(key, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {key}: {e}", self.name))
    }

    pub fn f64(&self, key: &str) -> Tensor {
        self.get(key).to_dtype(DType::F64).unwrap()
    }

    pub fn f32(&self, key: &str) -> Tensor {
        self.get(key).to_dtype(DType::F32).unwrap()
    }

    pub fn vec_f64(&self, key: &str) -> Vec<f64> {
        self.f64(key).flatten_all().unwrap().to_vec1().unwrap()
    }

    pub fn vec_i64(&self, key: &str) -> Vec<i64> {
        self.get(key).flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Raw bytes of a BOOL tensor (one byte per element).
    pub fn bools(&self, key: &str) -> Vec<bool> {
        let st = SliceSafetensors::new(&self.bytes).unwrap();
        let view = st.get(key).unwrap();
        view.data().iter().map(|&b| b != 0).collect()
    }
}

/// max |a − b|.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |t|.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// ‖a − b‖₂ / ‖b‖₂.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (num / den).sqrt()
}
