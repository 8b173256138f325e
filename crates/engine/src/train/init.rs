//! A `VarBuilder` backend that creates missing parameters in a `VarMap` from the training seed.
//!
//! `VarBuilder::from_varmap` initialises through candle's CPU RNG, which cannot be seeded, so two
//! runs with the same seed would start from different weights. This backend honours the same
//! `candle_nn::Init` hints but draws from an RNG derived from `(seed, parameter name)`: the
//! initial value of a parameter does not depend on the order in which the model asks for them.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::init::{Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use super::rng::{Purpose, derived};

/// A `VarBuilder` over `varmap` whose new parameters are initialised from `seed`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    fn init_values(&self, shape: &Shape, init: Init, name: &str) -> Vec<f32> {
        let n = shape.elem_count();
        let mut rng = derived(self.seed, Purpose::Init(name));
        let uniform = |rng: &mut rand::rngs::StdRng, lo: f64, up: f64| {
            (0..n)
                .map(|_| rng.random_range(lo..up) as f32)
                .collect::<Vec<_>>()
        };
        let normal = |rng: &mut rand::rngs::StdRng, mean: f64, std: f64| {
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    (mean + std * z) as f32
                })
                .collect::<Vec<_>>()
        };
        match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } if up > lo => uniform(&mut rng, lo, up),
            Init::Uniform { lo, .. } => vec![lo as f32; n],
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        uniform(&mut rng, -bound, bound)
                    }
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                }
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }
        let values = self.init_values(&s, h, name);
        let tensor = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        match data.get(name) {
            Some(var) => var.as_tensor().to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Module;

    fn values(seed: u64) -> Vec<f32> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
        let lin = candle_nn::linear(64, 32, vb.pp("fc")).unwrap();
        let x = Tensor::ones((1, 64), DType::F32, &Device::Cpu).unwrap();
        lin.forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn init_is_a_function_of_the_seed() {
        assert_eq!(values(1), values(1));
        assert_ne!(values(1), values(2));
    }

    #[test]
    fn hints_give_the_stated_distributions() {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 3, DType::F32, &Device::Cpu);
        let _ = candle_nn::linear(100, 50, vb.pp("fc")).unwrap();
        let get = |n: &str| -> Vec<f32> {
            vm.data().lock().unwrap()[n]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // candle's linear: weight Kaiming-normal, gain sqrt(2), fan_in 100 -> std sqrt(2/100).
        let w = get("fc.weight");
        let n = w.len() as f64;
        let mean = w.iter().map(|v| *v as f64).sum::<f64>() / n;
        let std = (w.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let want = (2.0f64 / 100.0).sqrt();
        // 5000 draws: the sample std has sd want/sqrt(2n) = 1%; allow 5%.
        assert!((std / want - 1.0).abs() < 0.05, "std {std} vs {want}");
        // bias: uniform in ±1/sqrt(fan_in).
        let b = get("fc.bias");
        assert!(b.iter().all(|v| v.abs() <= 0.1));
        assert!(b.iter().any(|v| v.abs() > 0.05));
    }
}
