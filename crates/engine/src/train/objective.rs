//! Training losses. The networks enter as closures so that the trainer does not depend on any
//! one architecture.

use candle_core::{D, Device, Tensor};
use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::{EngineError, LabelId, Result};

/// A scalar loss on one batch. `rng` is the step's derived RNG: everything random in the loss
/// must come from it (the resume guarantee depends on it).
pub trait Objective {
    fn loss(&self, x: &Tensor, labels: &[LabelId], rng: &mut StdRng) -> Result<Tensor>;
}

impl<T: Objective + ?Sized> Objective for Box<T> {
    fn loss(&self, x: &Tensor, labels: &[LabelId], rng: &mut StdRng) -> Result<Tensor> {
        (**self).loss(x, labels, rng)
    }
}

/// ᾱ_t of the DDPM linear β schedule, in f64.
#[derive(Debug, Clone)]
pub struct LinearBetas {
    alpha_bar: Vec<f64>,
}

impl LinearBetas {
    pub fn new(beta_start: f64, beta_end: f64, steps: usize) -> Result<Self> {
        let ok = steps >= 2 && 0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0;
        if !ok {
            return Err(EngineError::Config(format!(
                "linear betas need 0 < start ≤ end < 1 and ≥ 2 steps, got {beta_start}, {beta_end}, {steps}"
            )));
        }
        Ok(Self {
            alpha_bar: cumprod(beta_start, beta_end, steps),
        })
    }

    /// The DDPM schedule: β from 1e-4 to 0.02 over T = 1000.
    pub fn ddpm() -> Self {
        Self {
            alpha_bar: cumprod(1e-4, 0.02, 1000),
        }
    }

    pub fn steps(&self) -> usize {
        self.alpha_bar.len()
    }

    pub fn alpha_bar(&self) -> &[f64] {
        &self.alpha_bar
    }
}

fn cumprod(beta_start: f64, beta_end: f64, steps: usize) -> Vec<f64> {
    let mut prod = 1.0;
    (0..steps)
        .map(|i| {
            let beta = beta_start + (beta_end - beta_start) * i as f64 / (steps - 1) as f64;
            prod *= 1.0 - beta;
            prod
        })
        .collect()
}

/// A denoiser forward `(x_t, t, labels) -> ε̂` as the diffusion loss calls it.
pub trait EpsFn: Fn(&Tensor, &[u32], &[LabelId]) -> Result<Tensor> {}
impl<F: Fn(&Tensor, &[u32], &[LabelId]) -> Result<Tensor>> EpsFn for F {}

/// ε-prediction DDPM loss with uniform t and label dropout to the null label (for CFG).
///
/// `forward(x_t, t, labels)` is the denoiser; `labels` already contains the null label where
/// dropped. Data must be scaled to [-1, 1].
pub struct DiffusionObjective<F> {
    pub schedule: LinearBetas,
    pub null_label: LabelId,
    pub p_uncond: f64,
    pub forward: F,
}

/// What one diffusion step draws, in the order it draws it.
pub struct DiffusionDraw {
    pub t: Vec<u32>,
    pub labels: Vec<LabelId>,
    pub noise: Vec<f32>,
}

impl<F> DiffusionObjective<F> {
    pub fn draw(&self, labels: &[LabelId], numel: usize, rng: &mut StdRng) -> DiffusionDraw {
        let steps = self.schedule.steps() as u32;
        let t = labels.iter().map(|_| rng.random_range(0..steps)).collect();
        let labels = labels
            .iter()
            .map(|&l| {
                if rng.random::<f64>() < self.p_uncond {
                    self.null_label
                } else {
                    l
                }
            })
            .collect();
        let noise = (0..numel).map(|_| StandardNormal.sample(rng)).collect();
        DiffusionDraw { t, labels, noise }
    }

    /// x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, per batch item.
    pub fn noised(&self, x0: &Tensor, t: &[u32], eps: &Tensor) -> Result<Tensor> {
        let ab = |i: u32| self.schedule.alpha_bar[i as usize];
        let coef = |f: &dyn Fn(u32) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = t.iter().map(|&i| f(i) as f32).collect();
            Ok(Tensor::from_vec(v, (t.len(), 1, 1, 1), x0.device())?)
        };
        let a = coef(&|i| ab(i).sqrt())?;
        let s = coef(&|i| (1.0 - ab(i)).sqrt())?;
        Ok((x0.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?)
    }
}

impl<F: EpsFn> Objective for DiffusionObjective<F> {
    fn loss(&self, x0: &Tensor, labels: &[LabelId], rng: &mut StdRng) -> Result<Tensor> {
        let draw = self.draw(labels, x0.elem_count(), rng);
        let eps = Tensor::from_vec(draw.noise, x0.shape(), x0.device())?;
        let x_t = self.noised(x0, &draw.t, &eps)?;
        let pred = (self.forward)(&x_t, &draw.t, &draw.labels)?;
        Ok(candle_nn::loss::mse(&pred, &eps)?)
    }
}

/// Reconstruction loss of an autoencoder: MSE between the input and its reconstruction, plus
/// `latent_weight` × the latent's mean square. The penalty only keeps the latent from drifting to
/// an arbitrary scale (LDM's KL-f first stages carry a small KL term for the same reason); the
/// diffusion model's unit variance comes from the scale factor measured after training.
///
/// `forward(x) = (reconstruction, latent)`.
pub struct AutoencoderObjective<F> {
    pub latent_weight: f64,
    pub forward: F,
}

impl<F> Objective for AutoencoderObjective<F>
where
    F: Fn(&Tensor) -> Result<(Tensor, Tensor)>,
{
    fn loss(&self, x: &Tensor, _labels: &[LabelId], _rng: &mut StdRng) -> Result<Tensor> {
        let (recon, z) = (self.forward)(x)?;
        let rec = candle_nn::loss::mse(&recon, x)?;
        Ok((rec + (z.sqr()?.mean_all()? * self.latent_weight)?)?)
    }
}

/// Cross-entropy for a classifier; `forward` must run the network in training mode
/// (BatchNorm on batch statistics, updating its running statistics).
pub struct ClassifierObjective<F> {
    pub forward: F,
}

impl<F> Objective for ClassifierObjective<F>
where
    F: Fn(&Tensor) -> Result<Tensor>,
{
    fn loss(&self, x: &Tensor, labels: &[LabelId], _rng: &mut StdRng) -> Result<Tensor> {
        let logits = (self.forward)(x)?;
        let target = label_tensor(labels, x.device())?;
        Ok(candle_nn::loss::cross_entropy(&logits, &target)?)
    }
}

pub fn label_tensor(labels: &[LabelId], device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = labels.iter().map(|l| l.0).collect();
    Ok(Tensor::from_vec(v, labels.len(), device)?)
}

/// Number of rows of `logits` (N, K) whose arg-max equals the label.
pub fn correct(logits: &Tensor, labels: &[LabelId]) -> Result<usize> {
    let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| **p == l.0).count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::rng::{Purpose, derived};

    #[test]
    fn ddpm_alpha_bar_matches_closed_form_ends() {
        let s = LinearBetas::ddpm();
        let g = LinearBetas::new(1e-4, 0.02, 1000).unwrap();
        assert_eq!(s.steps(), 1000);
        assert!((s.alpha_bar()[0] - (1.0 - 1e-4)).abs() < 1e-15);
        // Known value of the DDPM schedule: ᾱ_999 ≈ 4.04e-5 (reference implementations).
        assert!(
            (s.alpha_bar()[999] - 4.035e-5).abs() < 1e-7,
            "{}",
            s.alpha_bar()[999]
        );
        for (a, b) in s.alpha_bar().iter().zip(g.alpha_bar()) {
            assert!((a - b).abs() < 1e-15);
        }
    }

    #[test]
    fn label_dropout_rate_is_close_to_p() {
        let obj = DiffusionObjective {
            schedule: LinearBetas::ddpm(),
            null_label: LabelId(10),
            p_uncond: 0.1,
            forward: (),
        };
        let labels = vec![LabelId(3); 20_000];
        let d = obj.draw(&labels, 4, &mut derived(1, Purpose::Step(0)));
        let dropped = d.labels.iter().filter(|l| l.0 == 10).count() as f64 / 20_000.0;
        // Binomial sd at n=20000, p=0.1 is 0.0021; 5 sd.
        assert!((dropped - 0.1).abs() < 0.011, "{dropped}");
        assert!(d.t.iter().all(|&t| t < 1000));
        assert!(d.t.iter().any(|&t| t < 10) && d.t.iter().any(|&t| t > 990));
    }

    #[test]
    fn noised_at_t0_is_nearly_x0() {
        let obj = DiffusionObjective {
            schedule: LinearBetas::ddpm(),
            null_label: LabelId(10),
            p_uncond: 0.0,
            forward: (),
        };
        let dev = Device::Cpu;
        let x0 = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let eps = Tensor::ones((1, 1, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let xt: Vec<f32> = obj
            .noised(&x0, &[0], &eps)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = ((1.0f64 - 1e-4).sqrt() + 1e-4f64.sqrt()) as f32;
        assert!(xt.iter().all(|v| (v - want).abs() < 1e-6));
    }
}
