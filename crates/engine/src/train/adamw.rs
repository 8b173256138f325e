//! AdamW with checkpointable state.
//!
//! candle_nn's `AdamW` keeps its moments and step counter in private fields, so a checkpoint
//! could not restore them and a resumed run would restart Adam's bias correction from zero: not
//! an exact resume. This is the same update rule (same formula, same order of f32 operations as
//! candle_nn 0.11.1) with named, exportable state, plus two training conveniences: weight decay
//! only on rank ≥ 2 tensors (conv/linear weights, not biases or norm scales) and optional
//! global-norm gradient clipping.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;

use crate::{EngineError, Result};

/// Hyper-parameters of [`AdamW`].
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Rescale the gradients so that their global L2 norm is at most this.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: None,
        }
    }
}

/// Names in a `VarMap` that are statistics, not trainable parameters (BatchNorm running stats).
pub fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean") || name.ends_with("running_var")
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// AdamW over the trainable variables of a `VarMap`, in name order.
pub struct AdamW {
    slots: Vec<Slot>,
    t: u64,
    params: AdamWParams,
}

impl AdamW {
    /// Optimises every non-buffer variable of `varmap`.
    pub fn from_varmap(varmap: &VarMap, params: AdamWParams) -> Result<Self> {
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| EngineError::Config("VarMap lock poisoned".into()))?
            .iter()
            .filter(|(n, v)| !is_buffer(n) && v.dtype().is_float())
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Self::from_named(named, params)
    }

    fn from_named(named: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let slots = named
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                let decay = var.rank() >= 2;
                Ok(Slot {
                    name,
                    var,
                    m,
                    v,
                    decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            t: 0,
            params,
        })
    }

    pub fn params(&self) -> &AdamWParams {
        &self.params
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Number of updates applied so far (Adam's bias-correction counter).
    pub fn steps_taken(&self) -> u64 {
        self.t
    }

    /// One update from `grads`; returns the global gradient norm before clipping when clipping
    /// is on (computing it costs a device sync per tensor, so it is skipped otherwise).
    pub fn step(&mut self, grads: &GradStore) -> Result<Option<f64>> {
        let norm = match self.params.max_grad_norm {
            Some(_) => Some(self.grad_norm(grads)?),
            None => None,
        };
        let clip = match (self.params.max_grad_norm, norm) {
            (Some(max), Some(n)) if n > max => max / (n + 1e-6),
            _ => 1.0,
        };
        self.t += 1;
        let p = self.params;
        let t = i32::try_from(self.t)
            .map_err(|_| EngineError::Config("too many optimiser steps".into()))?;
        let scale_m = 1.0 / (1.0 - p.beta1.powi(t));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(t));
        for slot in &mut self.slots {
            let Some(g) = grads.get(&slot.var) else {
                continue;
            };
            let g = if clip < 1.0 {
                (g.detach() * clip)?
            } else {
                g.detach()
            };
            let next_m = ((&slot.m * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let next_v = ((&slot.v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let m_hat = (&next_m * scale_m)?;
            let v_hat = (&next_v * scale_v)?;
            let wd = if slot.decay { p.weight_decay } else { 0.0 };
            let theta = (slot.var.as_tensor().detach() * (1.0 - p.lr * wd))?;
            let adjusted = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
            slot.var.set(&(theta - (adjusted * p.lr)?)?)?;
            slot.m = next_m;
            slot.v = next_v;
        }
        Ok(norm)
    }

    fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sum = 0f64;
        for slot in &self.slots {
            if let Some(g) = grads.get(&slot.var) {
                sum += g
                    .sqr()?
                    .sum_all()?
                    .to_dtype(candle_core::DType::F64)?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sum.sqrt())
    }

    /// The moments, named `adam_m/<param>` and `adam_v/<param>`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("adam_m/{}", s.name), s.m.clone()),
                    (format!("adam_v/{}", s.name), s.v.clone()),
                ]
            })
            .collect()
    }

    /// Restores the moments written by [`Self::state_tensors`] and the step counter.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        let mut missing = Vec::new();
        for slot in &mut self.slots {
            let m = tensors.get(&format!("adam_m/{}", slot.name));
            let v = tensors.get(&format!("adam_v/{}", slot.name));
            match (m, v) {
                (Some(m), Some(v)) if m.shape() == slot.var.shape() && v.shape() == m.shape() => {
                    slot.m = m.clone();
                    slot.v = v.clone();
                }
                _ => missing.push(slot.name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(EngineError::WeightMismatch {
                path: "<checkpoint optimiser state>".into(),
                detail: format!("missing or misshapen moments for {}", missing.join(", ")),
            });
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// On decayed tensors, the update must equal candle_nn's AdamW bit for bit (same formula).
    #[test]
    fn matches_candle_adamw_on_a_matrix() {
        use candle_nn::Optimizer;
        let dev = Device::Cpu;
        let w0 = Tensor::from_vec(
            (0..12).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(),
            (3, 4),
            &dev,
        )
        .unwrap();
        let x = Tensor::from_vec(
            (0..8).map(|i| (i as f32 * 0.11).cos()).collect::<Vec<_>>(),
            (4, 2),
            &dev,
        )
        .unwrap();
        let ours_var = Var::from_tensor(&w0.copy().unwrap()).unwrap();
        let theirs_var = Var::from_tensor(&w0.copy().unwrap()).unwrap();
        let params = AdamWParams::default();
        let mut ours = AdamW::from_named(vec![("w".into(), ours_var.clone())], params).unwrap();
        let mut theirs =
            candle_nn::AdamW::new(vec![theirs_var.clone()], candle_nn::ParamsAdamW::default())
                .unwrap();
        for _ in 0..5 {
            let l1 = ours_var
                .as_tensor()
                .matmul(&x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            ours.step(&l1.backward().unwrap()).unwrap();
            let l2 = theirs_var
                .as_tensor()
                .matmul(&x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            theirs.backward_step(&l2).unwrap();
        }
        let a: Vec<f32> = ours_var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = theirs_var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(ours.steps_taken(), 5);
        let _ = DType::F32;
    }

    #[test]
    fn clipping_rescales_the_gradient_to_the_max_norm() {
        // grad of Σw² at w = (3, 4) is (6, 8), norm 10. Clipped to 1 it must act exactly like
        // the loss Σw²/10 without clipping (up to the 1e-6 guard in the clip factor).
        let dev = Device::Cpu;
        let run = |clip: Option<f64>, scale: f64| {
            let var = Var::from_tensor(&Tensor::new(&[[3f32, 4.]], &dev).unwrap()).unwrap();
            let params = AdamWParams {
                max_grad_norm: clip,
                ..AdamWParams::default()
            };
            let mut opt = AdamW::from_named(vec![("w".into(), var.clone())], params).unwrap();
            let loss = (var.as_tensor().sqr().unwrap().sum_all().unwrap() * scale).unwrap();
            let norm = opt.step(&loss.backward().unwrap()).unwrap();
            let m: Vec<f32> = opt.state_tensors()[0]
                .1
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (norm, m)
        };
        let (norm, clipped) = run(Some(1.0), 1.0);
        let (none, scaled) = run(None, 0.1);
        assert!((norm.unwrap() - 10.0).abs() < 1e-5, "{norm:?}");
        assert_eq!(none, None);
        for (a, b) in clipped.iter().zip(&scaled) {
            assert!(
                (a - b).abs() < 1e-6 * b.abs().max(1e-3),
                "{clipped:?} vs {scaled:?}"
            );
        }
        assert!(
            (clipped[0] - 0.06).abs() < 1e-6,
            "m = (1-β1)·g·clip = 0.1·6/10"
        );
    }
}
