//! The latent recipe (LDM): encode, null-class inversion at the target timestep, masked CFG
//! sampling, decode.

use candle_core::Tensor;

use super::{DiffGuard, EpsMode, ImageResult, Nfe, pick};
use crate::ddim::{cfg_eps, ldm_step};
use crate::guidance::dsg_mask;
use crate::model::LabelId;
use crate::recipe::{LdmRecipe, Reference};
use crate::schedule::SpacedSchedule;
use crate::{EngineError, Result};

impl DiffGuard {
    /// Runs the LDM recipe on images `x` (\[-1,1\], input size) with their labels.
    pub(super) fn run_ldm(
        &self,
        r: &LdmRecipe,
        x: &Tensor,
        x01: &Tensor,
        input_logits: Option<Tensor>,
        labels: &[LabelId],
    ) -> Result<Vec<ImageResult>> {
        let n = x.dim(0)?;
        let ae = self
            .models
            .autoencoder
            .as_ref()
            .ok_or_else(|| EngineError::Config("the LDM recipe needs an autoencoder".into()))?;
        let s = SpacedSchedule::ldm(r.beta_schedule, r.diffusion_steps, r.ddim_steps)?;
        let mut cost = Nfe {
            classifier_forward: usize::from(input_logits.is_some()),
            autoencoder: 2,
            ..Nfe::default()
        };
        let mut z = ae.encode(x)?;
        let (_, zc, zh, zw) = z.dims4()?;
        let mask = if r.use_cam {
            cost.classifier_forward += 1;
            let m = dsg_mask(
                self.models.classifier.as_ref(),
                x01,
                labels,
                (zh, zw),
                zc,
                r.cam_cut,
            )?;
            Some(m.latent)
        } else {
            None
        };
        let null = self.null_label()?;
        let depth = r.inversion_steps.unwrap_or(s.len());
        for i in 0..depth {
            let t = s.timestep(i)?;
            // CFG between the null label and the inversion's own condition is a no-op when that
            // condition is the null label, so it only costs a second pass for a labelled inversion.
            let eps = if r.diffuse_guidance_scale == 1.0 || r.unconditional_diffuse {
                cost.denoiser += 1;
                let cond = if r.unconditional_diffuse {
                    None
                } else {
                    Some(labels)
                };
                self.models.denoiser.eps(&z, &vec![t; n], cond)?
            } else {
                cost.denoiser += 2;
                let mut cond = vec![null; n];
                cond.extend_from_slice(labels);
                let all = self.models.denoiser.eps(
                    &Tensor::cat(&[&z, &z], 0)?,
                    &vec![t; 2 * n],
                    Some(&cond),
                )?;
                cfg_eps(
                    &all.narrow(0, 0, n)?,
                    &all.narrow(0, n, n)?,
                    r.diffuse_guidance_scale,
                    None,
                )?
            };
            z = ldm_step(&z, &eps, &[s.alpha_bar_prev(i)?], &[s.alpha_bar(i)?])?;
        }
        let with_unguided = r.reference == Reference::Unguided;
        let mut batch = if with_unguided {
            Tensor::cat(&[&z, &z], 0)?
        } else {
            z.clone()
        };
        let mode = EpsMode::Cfg {
            omega: r.denoise_guidance_scale,
            mask: mask.as_ref(),
        };
        for i in (0..depth).rev() {
            let (eps, rows) = self.sampling_eps(&batch, n, s.timestep(i)?, labels, &mode)?;
            cost.denoiser += rows / n;
            batch = ldm_step(&batch, &eps, &[s.alpha_bar(i)?], &[s.alpha_bar_prev(i)?])?;
        }
        let decoded = ae.decode(&batch)?.clamp(-1f32, 1f32)?;
        if with_unguided {
            cost.autoencoder += 1;
        }
        let synth = decoded.narrow(0, 0, n)?;
        let (refs, reference_logits) = if with_unguided {
            (decoded.narrow(0, n, n)?, None)
        } else {
            (x.clone(), input_logits.as_ref())
        };
        let mut nfe = vec![cost; n];
        let sims = self.similarities(&refs, &synth, reference_logits, &mut nfe)?;
        (0..n)
            .map(|i| {
                Ok(ImageResult {
                    score: pick(r.distance, &sims[i]),
                    similarities: sims[i],
                    label: labels[i],
                    k_star: None,
                    start_index: depth - 1,
                    nfe: nfe[i],
                    synthesis: synth.get(i)?,
                    reference: refs.get(i)?,
                    latent: z.get(i)?,
                })
            })
            .collect()
    }
}
