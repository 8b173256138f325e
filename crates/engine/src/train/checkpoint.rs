//! Checkpoints: one safetensors file (parameters, Adam moments, EMA) and one JSON state.
//!
//! Both files are written to a temporary name and renamed, tensors first; the JSON carries the
//! blake3 of the tensor file, so a kill between the two renames is detected on load instead of
//! silently pairing new tensors with an old step counter.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::adamw::AdamW;
use super::ema::{Ema, snapshot};
use crate::{EngineError, Result};

pub const TENSORS_FILE: &str = "checkpoint.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Mean training loss over a window of steps ending at `step`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct LossPoint {
    pub step: u64,
    pub loss: f32,
}

/// Everything but the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps completed; the next step to run.
    pub step: u64,
    pub seed: u64,
    /// Wall time spent training, summed over all runs.
    pub elapsed_secs: f64,
    pub loss_log: Vec<LossPoint>,
    /// Sum and count of the losses since the last point of `loss_log` (so that a point that
    /// spans an interruption is the same as in an uninterrupted run).
    #[serde(default)]
    pub loss_window: (f64, u64),
    /// The run's configuration, checked for compatibility on resume.
    pub config: serde_json::Value,
    /// blake3 of the tensor file written with this state.
    pub tensors_blake3: String,
}

fn io_err(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

fn hash_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, e))?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// Writes `tensors` to `path` atomically (temp file + rename).
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let tmp = tmp_path(path);
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Writes a checkpoint of the run into `dir` (created if needed).
pub fn save(
    dir: &Path,
    varmap: &VarMap,
    adamw: &AdamW,
    ema: &Ema,
    state: &mut TrainState,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = snapshot(varmap)?
        .into_iter()
        .map(|(n, t)| (format!("param/{n}"), t))
        .collect();
    tensors.extend(adamw.state_tensors());
    tensors.extend(ema.state_tensors());
    let tpath = dir.join(TENSORS_FILE);
    save_tensors(&tpath, &tensors)?;
    state.tensors_blake3 = hash_file(&tpath)?;
    let spath = dir.join(STATE_FILE);
    let json = serde_json::to_vec_pretty(state).map_err(|e| EngineError::Format {
        path: spath.display().to_string(),
        what: "training state",
        detail: e.to_string(),
    })?;
    let tmp = tmp_path(&spath);
    std::fs::write(&tmp, json).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &spath).map_err(|e| io_err(&spath, e))
}

/// A checkpoint read back from disk.
pub struct Loaded {
    pub state: TrainState,
    pub tensors: HashMap<String, Tensor>,
}

/// Reads the checkpoint in `dir`, or `None` when the folder holds none.
pub fn load(dir: &Path, device: &Device) -> Result<Option<Loaded>> {
    let spath = dir.join(STATE_FILE);
    if !spath.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(&spath).map_err(|e| io_err(&spath, e))?;
    let state: TrainState = serde_json::from_slice(&bytes).map_err(|e| EngineError::Format {
        path: spath.display().to_string(),
        what: "training state",
        detail: e.to_string(),
    })?;
    let tpath = dir.join(TENSORS_FILE);
    let hash = hash_file(&tpath)?;
    if hash != state.tensors_blake3 {
        return Err(EngineError::Format {
            path: tpath.display().to_string(),
            what: "checkpoint",
            detail: format!(
                "tensor file hash {hash} differs from the one recorded in {STATE_FILE} ({}); \
                 the run was probably killed while saving",
                state.tensors_blake3
            ),
        });
    }
    let tensors = candle_core::safetensors::load(&tpath, device)?;
    Ok(Some(Loaded { state, tensors }))
}

/// Sets every variable of `varmap` from `param/<name>`; all of them must be present.
pub fn restore_params(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| EngineError::Config("VarMap lock poisoned".into()))?;
    let mut bad = Vec::new();
    for (name, var) in data.iter() {
        match tensors.get(&format!("param/{name}")) {
            Some(t) if t.shape() == var.shape() => var.set(t)?,
            _ => bad.push(name.clone()),
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        bad.sort();
        Err(EngineError::WeightMismatch {
            path: "<checkpoint parameters>".into(),
            detail: format!("missing or misshapen: {}", bad.join(", ")),
        })
    }
}

/// Writes `weights` under their plain parameter names, loadable with
/// `VarBuilder::from_mmaped_safetensors` by the same model code.
pub fn export_weights(path: &Path, weights: &BTreeMap<String, Tensor>) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    let map: HashMap<String, Tensor> = weights.clone().into_iter().collect();
    save_tensors(path, &map)
}
