//! Deterministic DDIM steps (η = 0): inversion (spec §3) and sampling (spec §4).
//!
//! Pure tensor functions: the network outputs ε (and the classifier gradient g) come in as
//! arguments. Every ᾱ argument is a slice holding one value for the whole batch or one value per
//! batch item, so images at different spaced indices can share a batch. Coefficients are computed
//! in f64 on the host and applied as scalars (or one (B,1,1,1) tensor), the way guided-diffusion
//! casts its float64 schedule at use.

use candle_core::{Device, Tensor};

use crate::{EngineError, Result};

/// One coefficient per batch item (or one for all), applied to a (B, ...) tensor.
fn scale_by(x: &Tensor, coef: &[f64]) -> Result<Tensor> {
    match coef {
        [c] => Ok(x.affine(*c, 0.0)?),
        _ => {
            let b = x.dim(0)?;
            if coef.len() != b {
                return Err(EngineError::InvalidInput(format!(
                    "{} coefficients for a batch of {b}",
                    coef.len()
                )));
            }
            let mut shape = vec![1usize; x.rank()];
            shape[0] = b;
            let c = coef_tensor(coef, &shape, x.device())?.to_dtype(x.dtype())?;
            Ok(x.broadcast_mul(&c)?)
        }
    }
}

fn coef_tensor(coef: &[f64], shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(coef.to_vec(), shape, dev)?)
}

fn map(a: &[f64], f: impl Fn(f64) -> f64) -> Vec<f64> {
    a.iter().map(|&v| f(v)).collect()
}

/// x̂0 = x/√ᾱ − √(1/ᾱ − 1)·ε (guided-diffusion's `_predict_xstart_from_eps`).
pub fn pred_x0(x: &Tensor, eps: &Tensor, abar: &[f64]) -> Result<Tensor> {
    let a = scale_by(x, &map(abar, |a| (1.0 / a).sqrt()))?;
    let b = scale_by(eps, &map(abar, |a| (1.0 / a - 1.0).sqrt()))?;
    Ok((a - b)?)
}

/// ε = (x/√ᾱ − x̂0)/√(1/ᾱ − 1) (guided-diffusion's `_predict_eps_from_xstart`).
pub fn eps_from_x0(x: &Tensor, x0: &Tensor, abar: &[f64]) -> Result<Tensor> {
    let num = (scale_by(x, &map(abar, |a| (1.0 / a).sqrt()))? - x0)?;
    scale_by(&num, &map(abar, |a| 1.0 / (1.0 / a - 1.0).sqrt()))
}

/// √ᾱ_to·x̂0 + √(1 − ᾱ_to)·ε: the deterministic DDIM move to the level ᾱ_to.
pub fn to_level(x0: &Tensor, eps: &Tensor, abar_to: &[f64]) -> Result<Tensor> {
    let a = scale_by(x0, &map(abar_to, f64::sqrt))?;
    let b = scale_by(eps, &map(abar_to, |a| (1.0 - a).sqrt()))?;
    Ok((a + b)?)
}

/// ε re-derived from the clamped x̂0 (guided-diffusion's `clip_denoised=True`).
pub fn clipped_eps(x: &Tensor, eps: &Tensor, abar: &[f64]) -> Result<Tensor> {
    let x0 = pred_x0(x, eps, abar)?.clamp(-1f32, 1f32)?;
    eps_from_x0(x, &x0, abar)
}

/// GDM inversion step (§3.1): x_j at ᾱ_j → x_{j+1} at ᾱ_next. With `clip` (every step but the
/// first in the reference) ε is re-derived from the clamped x̂0 before the move.
pub fn gdm_invert_step(
    x: &Tensor,
    eps: &Tensor,
    abar: &[f64],
    abar_next: &[f64],
    clip: bool,
) -> Result<Tensor> {
    let eps = if clip {
        clipped_eps(x, eps, abar)?
    } else {
        eps.clone()
    };
    let x0 = pred_x0(x, &eps, abar)?;
    to_level(&x0, &eps, abar_next)
}

/// latent-diffusion's DDIM move from level ᾱ_from to ᾱ_to with a fixed ε:
/// √ᾱ_to·(x − √(1−ᾱ_from)·ε)/√ᾱ_from + √(1−ᾱ_to)·ε. The LDM inversion (§3.2) calls it with
/// (a_{i−1} → a_i) and ε evaluated at τ_i; the LDM sampler (§4.2) with (a_i → a_{i−1}).
pub fn ldm_step(x: &Tensor, eps: &Tensor, abar_from: &[f64], abar_to: &[f64]) -> Result<Tensor> {
    let shifted = (x - scale_by(eps, &map(abar_from, |a| (1.0 - a).sqrt()))?)?;
    let x0 = scale_by(&shifted, &map(abar_from, |a| 1.0 / a.sqrt()))?;
    to_level(&x0, eps, abar_to)
}

/// Classifier-guided DDIM sampling step (§4.1) from ᾱ_j to ᾱ_prev.
///
/// `eps` is the network's ε (already CFG-mixed where the recipe uses CFG); with `clip` it is
/// re-derived from the clamped x̂0 first. `grad` is the classifier gradient g (scale included;
/// `None` = unguided): ε̂ = ε_c − √(1−ᾱ_j)·g, x0' = x̂0(ε̂) NOT re-clipped, out = √ᾱ_prev·x0' +
/// √(1−ᾱ_prev)·ε(x0'). At ᾱ_prev = 1 the output is x0'.
pub fn guided_sample_step(
    x: &Tensor,
    eps: &Tensor,
    grad: Option<&Tensor>,
    abar: &[f64],
    abar_prev: &[f64],
    clip: bool,
) -> Result<Tensor> {
    let mut eps = if clip {
        clipped_eps(x, eps, abar)?
    } else {
        eps.clone()
    };
    if let Some(g) = grad {
        eps = (eps - scale_by(g, &map(abar, |a| (1.0 - a).sqrt()))?)?;
    }
    let x0 = pred_x0(x, &eps, abar)?;
    // guided-diffusion re-derives ε from x0' once more before the move; identical in exact
    // arithmetic, kept for float parity.
    let eps = eps_from_x0(x, &x0, abar)?;
    to_level(&x0, &eps, abar_prev)
}

/// Classifier-free guidance with an optional binary mask (§4.2, DSG):
/// ε̃ = M ⊙ \[ε_u + ω(ε_y − ε_u)\] + (1 − M) ⊙ ε_u. `mask` is u8 {0,1}, broadcastable to ε.
pub fn cfg_eps(
    eps_uncond: &Tensor,
    eps_cond: &Tensor,
    omega: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let guided = (eps_uncond + (eps_cond - eps_uncond)?.affine(omega, 0.0)?)?;
    match mask {
        None => Ok(guided),
        Some(m) => Ok(m
            .broadcast_as(guided.shape())?
            .where_cond(&guided, eps_uncond)?),
    }
}
