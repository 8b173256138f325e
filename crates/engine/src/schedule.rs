//! Noise schedules and timestep respacing (spec §2).
//!
//! Everything is kept in f64 on the host: the schedules are tiny and the step functions in
//! [`crate::ddim`] turn each coefficient into a scalar at use, as the reference code does.

use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// A β schedule over the original timesteps 0..T−1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BetaSchedule {
    /// guided-diffusion "linear": β = linspace(1e-4·1000/T, 0.02·1000/T, T) (numpy linspace).
    AdmLinear,
    /// latent-diffusion "linear": β = linspace(√start, √end, T)² (torch linspace, f64).
    LdmSqrtLinear { start: f64, end: f64 },
}

impl BetaSchedule {
    /// The cin256-v2 values (0.0015 → 0.0195).
    pub const LDM_CIN256: BetaSchedule = BetaSchedule::LdmSqrtLinear {
        start: 0.0015,
        end: 0.0195,
    };

    /// β_t for t = 0..num_timesteps−1.
    pub fn betas(&self, num_timesteps: usize) -> Result<Vec<f64>> {
        if num_timesteps < 2 {
            return Err(EngineError::Config(format!(
                "a noise schedule needs at least 2 timesteps, got {num_timesteps}"
            )));
        }
        Ok(match *self {
            BetaSchedule::AdmLinear => {
                let scale = 1000.0 / num_timesteps as f64;
                numpy_linspace(scale * 1e-4, scale * 0.02, num_timesteps)
            }
            BetaSchedule::LdmSqrtLinear { start, end } => {
                torch_linspace(start.sqrt(), end.sqrt(), num_timesteps)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
        })
    }
}

/// numpy's linspace: start + i·step, with the last value pinned to `end`.
fn numpy_linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    let step = (end - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = end;
    v
}

/// torch's CPU linspace fills the first half from `start` and the second half from `end`, which
/// differs from numpy in the last bits; the LDM golden was produced by torch.
fn torch_linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    let step = (end - start) / (n - 1) as f64;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f64
            } else {
                end - step * (n - 1 - i) as f64
            }
        })
        .collect()
}

/// ᾱ\[t\] = Π_{s≤t} (1 − β_s), accumulated left to right like numpy's cumprod.
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// How the sampling timesteps are picked from the original 0..T−1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Respacing {
    /// guided-diffusion "ddimN": the smallest integer stride k with len(range(0, T, k)) == N.
    Ddim { steps: usize },
    /// latent-diffusion "uniform" in DiffGuard's copy: c = T div S, τ_i = c·i + 1, a trailing T dropped.
    LdmUniform { steps: usize },
}

impl Respacing {
    /// The original timesteps used, ascending.
    pub fn timesteps(&self, num_timesteps: usize) -> Result<Vec<u32>> {
        match *self {
            Respacing::Ddim { steps } => ddim_timesteps(num_timesteps, steps),
            Respacing::LdmUniform { steps } => ldm_uniform_timesteps(num_timesteps, steps),
        }
    }
}

fn ddim_timesteps(num_timesteps: usize, steps: usize) -> Result<Vec<u32>> {
    (1..num_timesteps)
        .find(|&k| num_timesteps.div_ceil(k) == steps)
        .map(|k| (0..num_timesteps).step_by(k).map(|t| t as u32).collect())
        .ok_or_else(|| {
            EngineError::Config(format!(
                "cannot create exactly {steps} steps with an integer stride over {num_timesteps}"
            ))
        })
}

fn ldm_uniform_timesteps(num_timesteps: usize, steps: usize) -> Result<Vec<u32>> {
    if steps == 0 || steps > num_timesteps {
        return Err(EngineError::Config(format!(
            "DDIM steps must be in 1..={num_timesteps}, got {steps}"
        )));
    }
    let c = num_timesteps / steps;
    let mut ts: Vec<u32> = (0..num_timesteps)
        .step_by(c)
        .map(|t| (t + 1) as u32)
        .collect();
    if ts.last() == Some(&(num_timesteps as u32)) {
        ts.pop();
    }
    Ok(ts)
}

/// A respaced schedule indexed by the spaced index j (0 = least noisy).
///
/// Conventions follow the two reference code bases: guided-diffusion re-derives β for the spaced
/// process and takes ᾱ_prev(0) = 1 and ᾱ_next(last) = 0; latent-diffusion's DDIM sampler takes
/// ᾱ_prev(0) = ᾱ\[0\] of the original schedule and float32 ᾱ values.
#[derive(Debug, Clone, PartialEq)]
pub struct SpacedSchedule {
    timesteps: Vec<u32>,
    alphas_cumprod: Vec<f64>,
    alphas_cumprod_prev: Vec<f64>,
    alphas_cumprod_next: Vec<f64>,
}

impl SpacedSchedule {
    /// The guided-diffusion `SpacedDiffusion` arrays for a "ddimN" respacing.
    pub fn gdm(betas: BetaSchedule, num_timesteps: usize, steps: usize) -> Result<Self> {
        let full = alphas_cumprod(&betas.betas(num_timesteps)?);
        let timesteps = Respacing::Ddim { steps }.timesteps(num_timesteps)?;
        // SpacedDiffusion rebuilds β from ratios of consecutive kept ᾱ and takes the cumprod again.
        let mut last = 1.0;
        let spaced_betas: Vec<f64> = timesteps
            .iter()
            .map(|&t| {
                let ac = full[t as usize];
                let b = 1.0 - ac / last;
                last = ac;
                b
            })
            .collect();
        let ac = alphas_cumprod(&spaced_betas);
        let prev = std::iter::once(1.0).chain(ac[..ac.len() - 1].iter().copied());
        let next = ac[1..].iter().copied().chain(std::iter::once(0.0));
        Ok(Self {
            timesteps,
            alphas_cumprod_prev: prev.collect(),
            alphas_cumprod_next: next.collect(),
            alphas_cumprod: ac,
        })
    }

    /// The latent-diffusion DDIM sampler parameters for `steps` "uniform" steps (η = 0).
    pub fn ldm(betas: BetaSchedule, num_timesteps: usize, steps: usize) -> Result<Self> {
        // LatentDiffusion registers ᾱ as a float32 buffer; the sampler reads that buffer.
        let full: Vec<f64> = alphas_cumprod(&betas.betas(num_timesteps)?)
            .into_iter()
            .map(|a| a as f32 as f64)
            .collect();
        let timesteps = Respacing::LdmUniform { steps }.timesteps(num_timesteps)?;
        let ac: Vec<f64> = timesteps.iter().map(|&t| full[t as usize]).collect();
        let prev = std::iter::once(full[0]).chain(ac[..ac.len() - 1].iter().copied());
        let next = ac[1..].iter().copied().chain(std::iter::once(0.0));
        Ok(Self {
            timesteps,
            alphas_cumprod_prev: prev.collect(),
            alphas_cumprod_next: next.collect(),
            alphas_cumprod: ac,
        })
    }

    /// Number of spaced steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Never true for a constructed schedule; present for API completeness.
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// The original timestep τ_j the network is called with.
    pub fn timestep(&self, j: usize) -> Result<u32> {
        self.check(j)?;
        Ok(self.timesteps[j])
    }

    /// All original timesteps, ascending.
    pub fn timesteps(&self) -> &[u32] {
        &self.timesteps
    }

    /// ᾱ_j.
    pub fn alpha_bar(&self, j: usize) -> Result<f64> {
        self.check(j)?;
        Ok(self.alphas_cumprod[j])
    }

    /// ᾱ of the next less noisy level (1 for GDM j = 0, ᾱ\[0\] for LDM j = 0).
    pub fn alpha_bar_prev(&self, j: usize) -> Result<f64> {
        self.check(j)?;
        Ok(self.alphas_cumprod_prev[j])
    }

    /// ᾱ of the next noisier level (0 after the last).
    pub fn alpha_bar_next(&self, j: usize) -> Result<f64> {
        self.check(j)?;
        Ok(self.alphas_cumprod_next[j])
    }

    /// The whole ᾱ_j array.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// The whole ᾱ_prev array.
    pub fn alphas_cumprod_prev(&self) -> &[f64] {
        &self.alphas_cumprod_prev
    }

    /// The whole ᾱ_next array.
    pub fn alphas_cumprod_next(&self) -> &[f64] {
        &self.alphas_cumprod_next
    }

    fn check(&self, j: usize) -> Result<()> {
        if j < self.timesteps.len() {
            Ok(())
        } else {
            Err(EngineError::InvalidInput(format!(
                "spaced index {j} outside a {}-step schedule",
                self.timesteps.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_alpha_bar_values() {
        // Spec §2.1 quotes six significant digits.
        let ac = alphas_cumprod(&BetaSchedule::AdmLinear.betas(1000).unwrap());
        for (t, want) in [
            (0, 0.9999),
            (10, 0.997807),
            (100, 0.895142),
            (300, 0.394011),
            (500, 0.077797),
            (600, 0.025567),
            (700, 0.006868),
        ] {
            assert!((ac[t] - want).abs() < 1e-6, "abar[{t}] = {}", ac[t]);
        }
        assert!((ac[900] - 2.70e-4).abs() < 1e-6);
        assert!((ac[990] - 4.8e-5).abs() < 1e-6);
        let ldm = alphas_cumprod(&BetaSchedule::LDM_CIN256.betas(1000).unwrap());
        for (t, want) in [(0, 0.9985), (1, 0.996994), (41, 0.932358)] {
            assert!((ldm[t] - want).abs() < 1e-6, "ldm abar[{t}] = {}", ldm[t]);
        }
        assert!((ldm[961] - 2.95e-4).abs() < 1e-6);
    }

    #[test]
    fn respacing_lists() {
        let d100 = Respacing::Ddim { steps: 100 }.timesteps(1000).unwrap();
        assert_eq!(d100.len(), 100);
        assert_eq!((d100[0], d100[1], d100[99]), (0, 10, 990));
        let d250 = Respacing::Ddim { steps: 250 }.timesteps(1000).unwrap();
        assert_eq!((d250[1], d250[249]), (4, 996));
        let u25 = Respacing::LdmUniform { steps: 25 }.timesteps(1000).unwrap();
        assert_eq!(u25, (0..25).map(|i| 40 * i + 1).collect::<Vec<u32>>());
        // 1000 div 3 = 333 gives 0,333,666,999 → +1 → a trailing 1000 that is dropped.
        let u3 = Respacing::LdmUniform { steps: 3 }.timesteps(1000).unwrap();
        assert_eq!(u3, vec![1, 334, 667]);
        assert!(Respacing::Ddim { steps: 1000 }.timesteps(1000).is_ok());
        // ceil(1000/k) jumps from 1000 (k=1) to 500 (k=2): no integer stride gives 999.
        assert!(Respacing::Ddim { steps: 999 }.timesteps(1000).is_err());
    }

    #[test]
    fn spaced_conventions() {
        let g = SpacedSchedule::gdm(BetaSchedule::AdmLinear, 1000, 100).unwrap();
        assert_eq!(g.alpha_bar_prev(0).unwrap(), 1.0);
        assert_eq!(g.alpha_bar_next(99).unwrap(), 0.0);
        assert_eq!(g.alpha_bar_prev(5).unwrap(), g.alpha_bar(4).unwrap());
        assert_eq!(g.timestep(89).unwrap(), 890);
        assert!(g.alpha_bar(100).is_err());
        let l = SpacedSchedule::ldm(BetaSchedule::LDM_CIN256, 1000, 25).unwrap();
        assert!((l.alpha_bar_prev(0).unwrap() - 0.9985).abs() < 1e-7);
        assert_eq!(l.timestep(24).unwrap(), 961);
    }
}
