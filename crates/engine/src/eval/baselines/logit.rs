//! Scores computed from the logits alone: MSP, energy and max-logit.

use candle_core::Tensor;

use super::rows_f64;
use crate::Result;

/// Maximum softmax probability (Hendrycks & Gimpel), returned as **ln MSP** (≤ 0).
///
/// The logarithm ranks exactly like MSP but does not saturate: for a confident classifier MSP is
/// 1 − ε with ε far below f64's resolution near 1, so every confident image would tie at 1.0 and
/// the AUROC would be decided by tie-breaking. ln MSP = −ln(1 + Σ_{j≠max} e^{l_j − l_max}) keeps
/// ε through `ln_1p`.
pub fn msp(logits: &Tensor) -> Result<Vec<f64>> {
    Ok(rows_f64(logits, "MSP logits")?
        .iter()
        .map(|row| {
            let (argmax, max) = argmax(row);
            let rest: f64 = row
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != argmax)
                .map(|(_, &l)| (l - max).exp())
                .sum();
            -rest.ln_1p()
        })
        .collect())
}

/// Energy score with temperature 1 (Liu et al.): logsumexp of the logits (the negative free
/// energy), computed stably in f64.
pub fn energy(logits: &Tensor) -> Result<Vec<f64>> {
    Ok(rows_f64(logits, "energy logits")?
        .iter()
        .map(|row| logsumexp(row))
        .collect())
}

/// Maximum logit (Hendrycks et al., "MLS").
pub fn max_logit(logits: &Tensor) -> Result<Vec<f64>> {
    Ok(rows_f64(logits, "max-logit logits")?
        .iter()
        .map(|row| argmax(row).1)
        .collect())
}

/// Index and value of the largest entry (the first one on ties).
fn argmax(row: &[f64]) -> (usize, f64) {
    row.iter()
        .copied()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, v)| {
            if v > best.1 { (i, v) } else { best }
        })
}

pub(crate) fn logsumexp(row: &[f64]) -> f64 {
    let max = argmax(row).1;
    if !max.is_finite() {
        return max;
    }
    max + row.iter().map(|&l| (l - max).exp()).sum::<f64>().ln()
}
