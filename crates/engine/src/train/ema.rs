//! Exponential moving average of every variable in a `VarMap`, BatchNorm running statistics
//! included (so an EMA model is self-consistent when exported).

use std::collections::{BTreeMap, HashMap};

use candle_core::Tensor;
use candle_nn::VarMap;

use crate::{EngineError, Result};

/// Shadow copies of the weights, `ema = d·ema + (1−d)·w`.
pub struct Ema {
    decay: f64,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(varmap: &VarMap, decay: f64) -> Result<Self> {
        let shadow = snapshot(varmap)?
            .into_iter()
            .map(|(n, t)| Ok((n, t.copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// The decay used after `step` updates: warmed up as (1+k)/(10+k) so that early, random
    /// weights are forgotten quickly, capped at the configured decay.
    pub fn decay_at(&self, step: u64) -> f64 {
        let k = step as f64;
        self.decay.min((1.0 + k) / (10.0 + k))
    }

    /// Folds the current weights in; `step` is the number of optimiser updates so far.
    pub fn update(&mut self, varmap: &VarMap, step: u64) -> Result<()> {
        let d = self.decay_at(step);
        for (name, w) in snapshot(varmap)? {
            let next = match self.shadow.get(&name) {
                Some(s) => ((s * d)? + (w * (1.0 - d))?)?,
                None => w.copy()?,
            };
            self.shadow.insert(name, next);
        }
        Ok(())
    }

    /// The averaged weights under their parameter names.
    pub fn weights(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }

    /// Shadow tensors named `ema/<param>` for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow
            .iter()
            .map(|(n, t)| (format!("ema/{n}"), t.clone()))
            .collect()
    }

    /// Restores the shadows written by [`Self::state_tensors`]; every current one must be there.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut missing = Vec::new();
        for (name, t) in self.shadow.iter_mut() {
            match tensors.get(&format!("ema/{name}")) {
                Some(s) if s.shape() == t.shape() => *t = s.clone(),
                _ => missing.push(name.clone()),
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(EngineError::WeightMismatch {
                path: "<checkpoint EMA>".into(),
                detail: format!("missing or misshapen EMA for {}", missing.join(", ")),
            })
        }
    }
}

/// Detached views of every variable, in name order.
pub fn snapshot(varmap: &VarMap) -> Result<BTreeMap<String, Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| EngineError::Config("VarMap lock poisoned".into()))?;
    Ok(data
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn average_moves_toward_weights_with_warmed_up_decay() {
        let vm = VarMap::new();
        let w = vm
            .get(2, "w", candle_nn::init::ZERO, DType::F32, &Device::Cpu)
            .unwrap();
        let mut ema = Ema::new(&vm, 0.99).unwrap();
        vm.data().lock().unwrap()["w"]
            .set(&Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&vm, 0).unwrap();
        // decay at step 0 is min(0.99, 1/10) = 0.1, so the average is 0.9·w.
        let got: Vec<f32> = ema.weights()["w"].to_vec1().unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] - 1.8).abs() < 1e-6,
            "{got:?}"
        );
        assert_eq!(ema.decay_at(10_000), 0.99);
        let _ = w;
    }
}
