//! Pixel-space recipes (GDM, pixel-CFG): DDIM inversion with adaptive early stop, then guided
//! (and optionally unguided) DDIM sampling per group of images with equal start index.

use candle_core::Tensor;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{DiffGuard, EpsMode, ImageResult, Nfe, add_nfe, index_tensor, pick, stack_rows};
use crate::ddim::{gdm_invert_step, guided_sample_step};
use crate::early_stop::{EarlyStop, group_by_start, start_index};
use crate::guidance::{CleanGrad, dsg_mask};
use crate::model::LabelId;
use crate::ops::resize::bilinear_resize;
use crate::recipe::{GdmRecipe, PixelCfgRecipe, Reference, clean_grad};
use crate::schedule::SpacedSchedule;
use crate::{EngineError, Result};

/// The pixel-space plan shared by GDM and pixel-CFG.
pub(super) struct PixelPlan {
    schedule: SpacedSchedule,
    max_inversion: usize,
    early_stop: EarlyStop,
    forback_skip_diff: usize,
    clip: bool,
    cfg: Option<(f64, Option<f64>)>,
    clean_grad: Option<CleanGrad>,
    input_size: usize,
    image_size: usize,
    reference: Reference,
    seed: u64,
}

impl DiffGuard {
    /// Runs a pixel-space plan on images `x` (\[-1,1\], input size) with their labels.
    pub(super) fn run_pixel(
        &self,
        plan: &PixelPlan,
        x: &Tensor,
        x01: &Tensor,
        input_logits: Option<Tensor>,
        labels: &[LabelId],
    ) -> Result<Vec<ImageResult>> {
        let n = x.dim(0)?;
        let mut nfe = vec![
            Nfe {
                classifier_forward: usize::from(input_logits.is_some()),
                ..Nfe::default()
            };
            n
        ];
        let x0 = bilinear_resize(x, plan.image_size, plan.image_size)?;
        let (z, k_star) = self.invert_pixel(plan, &x0, &mut nfe)?;
        let mask = match plan.cfg {
            Some((_, Some(cut))) => {
                for c in nfe.iter_mut() {
                    c.classifier_forward += 1;
                }
                let hw = (plan.image_size, plan.image_size);
                Some(
                    dsg_mask(
                        self.models.classifier.as_ref(),
                        x01,
                        labels,
                        hw,
                        x0.dim(1)?,
                        cut,
                    )?
                    .latent,
                )
            }
            _ => None,
        };
        let n_steps = plan.schedule.len();
        let starts: Vec<usize> = k_star
            .iter()
            .map(|&k| start_index(k, n_steps, plan.forback_skip_diff))
            .collect();
        let mut synth: Vec<Option<Tensor>> = vec![None; n];
        let mut refs: Vec<Option<Tensor>> = vec![None; n];
        for (start, idx) in group_by_start(&starts) {
            let ids = index_tensor(&idx, x.device())?;
            let group_labels: Vec<LabelId> = idx.iter().map(|&i| labels[i]).collect();
            let group_mask = mask.as_ref().map(|m| m.index_select(&ids, 0)).transpose()?;
            let mode = match plan.cfg {
                Some((omega, _)) => EpsMode::Cfg {
                    omega,
                    mask: group_mask.as_ref(),
                },
                None => EpsMode::Uncond,
            };
            let z_g = z.index_select(&ids, 0)?;
            let (guided, unguided, cost) =
                self.sample_pixel(plan, &z_g, start, &group_labels, &mode)?;
            let guided = bilinear_resize(&guided, plan.input_size, plan.input_size)?;
            let reference = match unguided {
                Some(u) => bilinear_resize(&u, plan.input_size, plan.input_size)?,
                None => x.index_select(&ids, 0)?,
            };
            for (row, &i) in idx.iter().enumerate() {
                synth[i] = Some(guided.get(row)?);
                refs[i] = Some(reference.get(row)?);
                add_nfe(&mut nfe[i], &cost);
            }
        }
        let synth = stack_rows(synth)?;
        let refs = stack_rows(refs)?;
        let reference_logits = match plan.reference {
            Reference::Input => input_logits.as_ref(),
            Reference::Unguided => None,
        };
        let sims = self.similarities(&refs, &synth, reference_logits, &mut nfe)?;
        (0..n)
            .map(|i| {
                Ok(ImageResult {
                    score: pick(self.recipe.distance(), &sims[i]),
                    similarities: sims[i],
                    label: labels[i],
                    k_star: Some(k_star[i]),
                    start_index: starts[i],
                    nfe: nfe[i],
                    synthesis: synth.get(i)?,
                    reference: refs.get(i)?,
                    latent: z.get(i)?,
                })
            })
            .collect()
    }

    /// GDM-style inversion with adaptive early stop. Stopped images leave the batch; returns the
    /// latents x_{k*+1} (in input order) and k*.
    fn invert_pixel(
        &self,
        plan: &PixelPlan,
        x0: &Tensor,
        nfe: &mut [Nfe],
    ) -> Result<(Tensor, Vec<usize>)> {
        let n = x0.dim(0)?;
        let s = &plan.schedule;
        let mut active: Vec<usize> = (0..n).collect();
        let mut x_cur = x0.clone();
        let mut x0_active = x0.clone();
        let mut z: Vec<Option<Tensor>> = vec![None; n];
        let mut k_star = vec![plan.max_inversion - 1; n];
        let dists = self.models.dists.as_deref();
        for j in 0..plan.max_inversion {
            let t = vec![s.timestep(j)?; active.len()];
            let eps = self.models.denoiser.eps(&x_cur, &t, None)?;
            let a = [s.alpha_bar(j)?];
            let a_next = [s.alpha_bar_next(j)?];
            let x_next = gdm_invert_step(&x_cur, &eps, &a, &a_next, plan.clip && j > 0)?;
            for &i in &active {
                nfe[i].denoiser += 1;
            }
            if !plan.early_stop.enabled() {
                x_cur = x_next;
                continue;
            }
            let check = plan.early_stop.check(&x_next, &x0_active, dists)?;
            if check.dists_sim.is_some() {
                for &i in &active {
                    nfe[i].dists += 1;
                }
            }
            let mut keep = Vec::with_capacity(active.len());
            for (row, &i) in active.iter().enumerate() {
                if check.stop[row] {
                    z[i] = Some(x_next.get(row)?);
                    k_star[i] = j;
                } else {
                    keep.push(row);
                }
            }
            if keep.is_empty() {
                active.clear();
                break;
            }
            if keep.len() < active.len() {
                let ids = index_tensor(&keep, x0.device())?;
                x_cur = x_next.index_select(&ids, 0)?;
                x0_active = x0_active.index_select(&ids, 0)?;
                active = keep.iter().map(|&r| active[r]).collect();
            } else {
                x_cur = x_next;
            }
        }
        for (row, &i) in active.iter().enumerate() {
            z[i] = Some(x_cur.get(row)?);
        }
        Ok((stack_rows(z)?, k_star))
    }

    /// DDIM sampling from spaced index `start` down to 0 for one group: the guided rows and, when
    /// the reference is the unguided reconstruction, the same latents without guidance in the same
    /// batch. Returns (guided, unguided, per-image cost).
    fn sample_pixel(
        &self,
        plan: &PixelPlan,
        z: &Tensor,
        start: usize,
        labels: &[LabelId],
        mode: &EpsMode,
    ) -> Result<(Tensor, Option<Tensor>, Nfe)> {
        let g = z.dim(0)?;
        let with_unguided = plan.reference == Reference::Unguided;
        let mut batch = if with_unguided {
            Tensor::cat(&[z, z], 0)?
        } else {
            z.clone()
        };
        let s = &plan.schedule;
        let mut rng = StdRng::seed_from_u64(plan.seed);
        let mut cost = Nfe::default();
        let (_, _, h, w) = z.dims4()?;
        for (step, j) in (0..=start).rev().enumerate() {
            let t = s.timestep(j)?;
            let a = [s.alpha_bar(j)?];
            let a_prev = [s.alpha_bar_prev(j)?];
            let (eps, rows) = self.sampling_eps(&batch, g, t, labels, mode)?;
            cost.denoiser += rows / g;
            let grad = match &plan.clean_grad {
                None => None,
                Some(cg) => {
                    let boxes = match (&cg.cutouts, &self.recorded_cutouts) {
                        (None, _) => Vec::new(),
                        (Some(_), Some(rec)) => rec.get(step).cloned().ok_or_else(|| {
                            EngineError::InvalidInput(format!(
                                "no recorded cutouts for step {step}"
                            ))
                        })?,
                        (Some(spec), None) => spec.draw(&mut rng, (h, w))?,
                    };
                    let crops = boxes.len().max(1);
                    cost.classifier_backward += crops;
                    let xg = batch.narrow(0, 0, g)?;
                    let eg = eps.narrow(0, 0, g)?;
                    let gg = cg.gradient(
                        self.models.classifier.as_ref(),
                        &xg,
                        &eg,
                        &a,
                        labels,
                        &boxes,
                    )?;
                    Some(if with_unguided {
                        Tensor::cat(&[&gg, &gg.zeros_like()?], 0)?
                    } else {
                        gg
                    })
                }
            };
            batch = guided_sample_step(&batch, &eps, grad.as_ref(), &a, &a_prev, plan.clip)?;
        }
        let guided = batch.narrow(0, 0, g)?;
        let unguided = with_unguided.then(|| batch.narrow(0, g, g)).transpose()?;
        Ok((guided, unguided, cost))
    }
}

pub(super) fn gdm_plan(r: &GdmRecipe) -> Result<PixelPlan> {
    Ok(PixelPlan {
        schedule: SpacedSchedule::gdm(r.beta_schedule, r.diffusion_steps, r.ddim_steps)?,
        max_inversion: r.ddim_steps - r.early_stop_steps,
        early_stop: r.early_stop,
        forback_skip_diff: r.forback_skip_diff,
        clip: r.clip_denoised,
        cfg: None,
        clean_grad: Some(clean_grad(
            r.classifier_scale,
            r.cutouts_num,
            r.cutouts_size,
            r.cut_pow,
            r.no_x0_hat,
        )),
        input_size: r.input_size,
        image_size: r.image_size,
        reference: r.reference,
        seed: r.seed,
    })
}

pub(super) fn pixel_cfg_plan(r: &PixelCfgRecipe) -> Result<PixelPlan> {
    Ok(PixelPlan {
        schedule: SpacedSchedule::gdm(r.beta_schedule, r.diffusion_steps, r.ddim_steps)?,
        max_inversion: r.ddim_steps - r.early_stop_steps,
        early_stop: r.early_stop,
        forback_skip_diff: r.forback_skip_diff,
        clip: r.clip_denoised,
        cfg: Some((r.guidance_scale, r.use_cam.then_some(r.cam_cut))),
        clean_grad: (r.classifier_scale != 0.0).then(|| {
            clean_grad(
                r.classifier_scale,
                r.cutouts_num,
                r.cutouts_size,
                r.cut_pow,
                r.no_x0_hat,
            )
        }),
        input_size: r.input_size,
        image_size: r.image_size,
        reference: r.reference,
        seed: r.seed,
    })
}
