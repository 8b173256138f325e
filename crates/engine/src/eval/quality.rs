//! Quality of a class-conditional diffusion prior, measured with the engine's own DDIM steps (the
//! ones DiffGuard runs), not with a trainer's sampler:
//!
//! - [`sample`]: class-conditional DDIM (η = 0) with classifier-free guidance, x̂0 clipped as in
//!   guided-diffusion's `clip_denoised` — the samples a classifier should recognise;
//! - [`reconstruct`]: unconditional DDIM inversion of real images for `depth` spaced steps (the
//!   pipeline's inversion) and unguided sampling back — how faithfully the prior returns an
//!   in-distribution image, which is what DiffGuard's in-distribution scores rest on.

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::ddim::{cfg_eps, gdm_invert_step, guided_sample_step};
use crate::schedule::SpacedSchedule;
use crate::{Denoiser, EngineError, LabelId, Result};

/// ᾱ as the one-value slices the DDIM steps take.
fn one(a: f64) -> [f64; 1] {
    [a]
}

/// Seeded N(0, 1) noise of `shape` (candle's CPU RNG cannot be seeded).
pub fn seeded_noise(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Ok(Tensor::from_vec(v, shape, device)?)
}

/// ε with classifier-free guidance at `scale` (1 = plain conditional), both branches in one
/// batch.
fn guided_eps(
    den: &dyn Denoiser,
    x: &Tensor,
    t: u32,
    labels: &[LabelId],
    scale: f64,
) -> Result<Tensor> {
    let null = den.null_label().ok_or_else(|| {
        EngineError::Config("classifier-free guidance needs a model with a null label".into())
    })?;
    let b = labels.len();
    let both: Vec<LabelId> = labels.iter().copied().chain((0..b).map(|_| null)).collect();
    let eps = den.eps(&Tensor::cat(&[x, x], 0)?, &vec![t; 2 * b], Some(&both))?;
    cfg_eps(&eps.narrow(0, b, b)?, &eps.narrow(0, 0, b)?, scale, None)
}

/// Class-conditional samples, shape (labels, C, H, W), from seeded noise. `clip` clamps x̂0 to
/// [-1, 1] at every step (pixel priors); a latent prior's samples are unbounded.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    den: &dyn Denoiser,
    sched: &SpacedSchedule,
    labels: &[LabelId],
    chw: [usize; 3],
    scale: f64,
    seed: u64,
    clip: bool,
    device: &Device,
) -> Result<Tensor> {
    let mut x = seeded_noise(&[labels.len(), chw[0], chw[1], chw[2]], seed, device)?;
    for j in (0..sched.len()).rev() {
        let eps = guided_eps(den, &x, sched.timestep(j)?, labels, scale)?;
        let (a, prev) = (one(sched.alpha_bar(j)?), one(sched.alpha_bar_prev(j)?));
        x = guided_sample_step(&x, &eps, None, &a, &prev, clip)?;
    }
    Ok(x)
}

/// Inverts `x0` (in [-1, 1], taken as the spaced level 0 like the pipeline's inversion)
/// unconditionally for `depth` spaced steps, then samples back to level 0 without guidance;
/// returns the reconstruction. `depth` ≤ len − 1: the last level is pure noise. `clip` as in
/// [`sample`] (the first inversion step never clips, like the pipeline's).
pub fn reconstruct(
    den: &dyn Denoiser,
    sched: &SpacedSchedule,
    x0: &Tensor,
    depth: usize,
    clip: bool,
) -> Result<Tensor> {
    if depth == 0 || depth >= sched.len() {
        return Err(EngineError::InvalidInput(format!(
            "inversion depth {depth} outside 1..={}",
            sched.len() - 1
        )));
    }
    let b = x0.dim(0)?;
    let mut x = x0.clone();
    for j in 0..depth {
        let eps = den.eps(&x, &vec![sched.timestep(j)?; b], None)?;
        let (a, next) = (one(sched.alpha_bar(j)?), one(sched.alpha_bar_next(j)?));
        x = gdm_invert_step(&x, &eps, &a, &next, clip && j > 0)?;
    }
    for j in (1..=depth).rev() {
        let eps = den.eps(&x, &vec![sched.timestep(j)?; b], None)?;
        let (a, prev) = (one(sched.alpha_bar(j)?), one(sched.alpha_bar_prev(j)?));
        x = guided_sample_step(&x, &eps, None, &a, &prev, clip)?;
    }
    Ok(x)
}

/// Per-image mean squared error and PSNR (dB, on the [0, 1] scale) between two [-1, 1] batches.
pub fn mse_psnr(a: &Tensor, b: &Tensor) -> Result<Vec<(f64, f64)>> {
    let d = (a - b)?.to_dtype(DType::F64)?;
    let mse: Vec<f64> = d.sqr()?.flatten_from(1)?.mean(1)?.to_vec1()?;
    // [-1,1] differences are twice the [0,1] ones: mse01 = mse / 4.
    Ok(mse
        .into_iter()
        .map(|m| (m, 10.0 * (4.0 / m.max(1e-20)).log10()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::BetaSchedule;

    /// A prior that knows the data is always the constant image c: ε = (x − √ᾱ c)/√(1−ᾱ).
    /// DDIM with this exact ε is exact, so inversion + sampling returns c, and every sample is c.
    struct Constant {
        c: f32,
        abar: Vec<f64>,
    }

    impl Denoiser for Constant {
        fn eps(&self, x: &Tensor, t: &[u32], _: Option<&[LabelId]>) -> Result<Tensor> {
            let a = self.abar[t[0] as usize];
            Ok(((x - (a.sqrt() * self.c as f64))? / (1.0 - a).sqrt())?)
        }
        fn null_label(&self) -> Option<LabelId> {
            Some(LabelId(2))
        }
        fn num_classes(&self) -> usize {
            2
        }
    }

    fn setup() -> (Constant, SpacedSchedule) {
        let betas = BetaSchedule::AdmLinear.betas(1000).unwrap();
        let abar = crate::schedule::alphas_cumprod(&betas);
        let sched = SpacedSchedule::gdm(BetaSchedule::AdmLinear, 1000, 20).unwrap();
        (Constant { c: 0.25, abar }, sched)
    }

    #[test]
    fn an_exact_prior_samples_and_reconstructs_its_data() {
        let (den, sched) = setup();
        let dev = Device::Cpu;
        let labels = [LabelId(0), LabelId(1)];
        let s = sample(&den, &sched, &labels, [1, 4, 4], 3.0, 1, true, &dev).unwrap();
        let want = Tensor::full(0.25f32, (2, 1, 4, 4), &dev).unwrap();
        let err = mse_psnr(&s, &want).unwrap();
        // Exact in real arithmetic; f32 rounding over 20 steps stays far below 1e-8.
        assert!(err.iter().all(|(m, _)| *m < 1e-8), "{err:?}");
        // The unclipped (latent) path must be exact too: the constant is inside [-1, 1], so clipping
        // never acts and both paths compute the same DDIM.
        for clip in [true, false] {
            for depth in [1, 8, 19] {
                let r = reconstruct(&den, &sched, &want, depth, clip).unwrap();
                let err = mse_psnr(&r, &want).unwrap();
                assert!(err.iter().all(|(m, _)| *m < 1e-8), "depth {depth}: {err:?}");
            }
        }
        let s = sample(&den, &sched, &labels, [1, 4, 4], 3.0, 1, false, &dev).unwrap();
        assert!(mse_psnr(&s, &want).unwrap().iter().all(|(m, _)| *m < 1e-8));
        assert!(reconstruct(&den, &sched, &want, 20, true).is_err());
    }

    #[test]
    fn psnr_is_on_the_unit_scale() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev).unwrap();
        let b = Tensor::full(0.2f32, (1, 1, 2, 2), &dev).unwrap();
        let [(m, p)] = mse_psnr(&a, &b).unwrap()[..] else {
            panic!()
        };
        // 0.2 in [-1,1] is 0.1 in [0,1]: PSNR = 20 dB. f32 holds 0.2 as 0.2 + 3e-9, which moves
        // the MSE by ≈1.2e-9 and the PSNR by ≈1.3e-7 dB.
        assert!(
            (m - 0.04).abs() < 1e-8 && (p - 20.0).abs() < 1e-6,
            "{m} {p}"
        );
    }
}
