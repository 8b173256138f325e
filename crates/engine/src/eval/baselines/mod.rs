//! Post-hoc OOD baselines on a classifier's outputs, as OpenOOD formulates them. Every score is
//! f64, higher = more in-distribution.

mod knn;
mod logit;
mod vim;

pub use knn::Knn;
pub use logit::{energy, max_logit, msp};
pub use vim::Vim;

use candle_core::{DType, Tensor};

use crate::{EngineError, Result};

/// A 2-D tensor's rows in f64, checking the rank.
pub(crate) fn rows_f64(t: &Tensor, what: &str) -> Result<Vec<Vec<f64>>> {
    if t.rank() != 2 {
        return Err(EngineError::InvalidInput(format!(
            "{what}: expected (N, D), got shape {:?}",
            t.dims()
        )));
    }
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}
