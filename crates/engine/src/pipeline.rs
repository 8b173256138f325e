//! The end-to-end DiffGuard detector (spec §9) for the three recipes, written against the model
//! traits only.
//!
//! Pixel recipes (GDM, pixel-CFG): resize → DDIM inversion with adaptive early stop → images
//! grouped by equal denoising start index → guided (and, with `Reference::Unguided`, unguided)
//! DDIM sampling in one batch per group → resize back → similarity. Latent recipe (LDM): encode →
//! null-class inversion → masked CFG sampling → decode → similarity. All tensors stay on the input's
//! device; only per-image scalars (labels, early-stop metrics, scores) come back to the host.

use std::sync::Arc;

use candle_core::{D, DType, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::ddim::{cfg_eps, gdm_invert_step, guided_sample_step, ldm_step};
use crate::early_stop::{EarlyStop, group_by_start, start_index};
use crate::guidance::{CleanGrad, CutBox, dsg_mask};
use crate::model::{Autoencoder, Classifier, Denoiser, LabelId};
use crate::ops::resize::bilinear_resize;
use crate::recipe::{
    Distance, GdmRecipe, LdmRecipe, PixelCfgRecipe, Recipe, Reference, clean_grad,
};
use crate::schedule::SpacedSchedule;
use crate::similarity::{ImageSimilarity, l2_similarity, logits_l1_similarity, to_unit};
use crate::{EngineError, Result};

/// The networks a detector runs.
#[derive(Clone)]
pub struct Models {
    pub denoiser: Arc<dyn Denoiser>,
    /// The classifier under protection (labels, Clean Grad, Grad-CAM, logits-L1).
    pub classifier: Arc<dyn Classifier>,
    /// Required by the LDM recipe.
    pub autoencoder: Option<Arc<dyn Autoencoder>>,
    /// DISTS; required when the recipe scores or early-stops with it.
    pub dists: Option<Arc<dyn ImageSimilarity>>,
}

/// Network evaluations spent on one image (rows of batched calls count one each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Nfe {
    pub denoiser: usize,
    /// Classifier forward passes, Grad-CAM included (the ResNet's is analytic: one forward).
    pub classifier_forward: usize,
    /// Input-gradient passes (Clean Grad: one per cutout per guided step).
    pub classifier_backward: usize,
    pub dists: usize,
    pub autoencoder: usize,
}

/// Every similarity between the reference and the synthesis (higher = more in-distribution).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarities {
    pub dists: Option<f64>,
    pub l2: f64,
    pub logits_l1: f64,
}

/// The verdict material for one image.
#[derive(Debug, Clone)]
pub struct ImageResult {
    /// The recipe's similarity; higher = more in-distribution.
    pub score: f64,
    pub similarities: Similarities,
    /// The label the synthesis was guided towards.
    pub label: LabelId,
    /// Inversion step that triggered the early stop (or the last step); None for LDM.
    pub k_star: Option<usize>,
    /// Spaced index where the denoising started.
    pub start_index: usize,
    pub nfe: Nfe,
    /// Guided synthesis (C, H, W) in [-1,1] at the input size, not clamped.
    pub synthesis: Tensor,
    /// What it was compared with (the input or the unguided reconstruction), same layout.
    pub reference: Tensor,
    /// The inverted latent the synthesis started from (x_{k*+1} for pixel recipes).
    pub latent: Tensor,
}

/// How the guided rows' ε is formed at each sampling step.
enum EpsMode<'a> {
    /// Unconditional model; guidance comes from the classifier gradient only.
    Uncond,
    /// CFG with ω inside the optional mask (one mask row per guided image).
    Cfg {
        omega: f64,
        mask: Option<&'a Tensor>,
    },
}

/// The pixel-space plan shared by GDM and pixel-CFG.
struct PixelPlan {
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

/// DiffGuard on a recipe and a set of models.
pub struct DiffGuard {
    recipe: Recipe,
    models: Models,
    /// Cutout boxes per denoising step (counted from the first), replacing the seeded RNG; used to
    /// replay a reference run. The RNG is reset per image, so every image sees the same list.
    recorded_cutouts: Option<Vec<Vec<CutBox>>>,
}

impl DiffGuard {
    /// Validates the recipe against the models it needs.
    pub fn new(recipe: Recipe, models: Models) -> Result<Self> {
        recipe.validate()?;
        if recipe.needs_dists() && models.dists.is_none() {
            return Err(EngineError::Config(
                "the recipe uses DISTS but no DISTS model was given".into(),
            ));
        }
        let conditional = models.denoiser.null_label().is_some();
        match &recipe {
            Recipe::Ldm(_) if models.autoencoder.is_none() => {
                return Err(EngineError::Config(
                    "the LDM recipe needs an autoencoder".into(),
                ));
            }
            Recipe::Ldm(_) | Recipe::PixelCfg(_) if !conditional => {
                return Err(EngineError::Config(
                    "classifier-free guidance needs a conditional denoiser with a null label"
                        .into(),
                ));
            }
            _ => {}
        }
        Ok(Self {
            recipe,
            models,
            recorded_cutouts: None,
        })
    }

    /// Replays recorded cutouts (one list of boxes per denoising step) instead of drawing them.
    pub fn with_recorded_cutouts(mut self, boxes: Vec<Vec<CutBox>>) -> Self {
        self.recorded_cutouts = Some(boxes);
        self
    }

    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    fn reference(&self) -> Reference {
        match &self.recipe {
            Recipe::Gdm(r) => r.reference,
            Recipe::Ldm(r) => r.reference,
            Recipe::PixelCfg(r) => r.reference,
        }
    }

    /// Scores a batch of images (N, C, H, W) in [-1,1] at the recipe's input size. `labels` are the
    /// classifier's predictions if already known (e.g. from the upstream response); otherwise the
    /// classifier is run.
    pub fn score(&self, x: &Tensor, labels: Option<&[LabelId]>) -> Result<Vec<ImageResult>> {
        let (n, _, h, w) = x.dims4()?;
        let input_size = match &self.recipe {
            Recipe::Gdm(r) => r.input_size,
            Recipe::Ldm(r) => r.input_size,
            Recipe::PixelCfg(r) => r.input_size,
        };
        if (h, w) != (input_size, input_size) {
            return Err(EngineError::InvalidInput(format!(
                "images are {h}x{w}, the recipe expects {input_size}x{input_size}"
            )));
        }
        let x = x.to_dtype(DType::F32)?;
        let x01 = to_unit(&x)?;
        // The input's logits are needed to predict the label or to score logits-L1 against the
        // input; a GDM run with known labels skips this pass.
        let input_logits = if labels.is_none() || self.reference() == Reference::Input {
            Some(self.models.classifier.forward(&x01)?.logits)
        } else {
            None
        };
        let labels = match labels {
            Some(l) if l.len() == n => l.to_vec(),
            Some(l) => {
                return Err(EngineError::InvalidInput(format!(
                    "{} labels for {n} images",
                    l.len()
                )));
            }
            None => argmax(input_logits.as_ref().ok_or_else(|| {
                EngineError::InvalidInput("no labels and no classifier logits".into())
            })?)?,
        };
        let num_classes = self.models.classifier.num_classes();
        if let Some(bad) = labels.iter().find(|l| l.0 as usize >= num_classes) {
            return Err(EngineError::InvalidInput(format!(
                "label {} outside the classifier's {num_classes} classes",
                bad.0
            )));
        }
        match &self.recipe {
            Recipe::Gdm(r) => self.run_pixel(&gdm_plan(r)?, &x, &x01, input_logits, &labels),
            Recipe::PixelCfg(r) => {
                self.run_pixel(&pixel_cfg_plan(r)?, &x, &x01, input_logits, &labels)
            }
            Recipe::Ldm(r) => self.run_ldm(r, &x, &x01, input_logits, &labels),
        }
    }

    fn run_pixel(
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

    /// ε for a sampling batch whose first `g` rows are guided. Returns ε and the number of network
    /// rows evaluated.
    fn sampling_eps(
        &self,
        batch: &Tensor,
        g: usize,
        t: u32,
        labels: &[LabelId],
        mode: &EpsMode,
    ) -> Result<(Tensor, usize)> {
        let rows = batch.dim(0)?;
        match mode {
            EpsMode::Uncond => Ok((self.models.denoiser.eps(batch, &vec![t; rows], None)?, rows)),
            EpsMode::Cfg { omega, mask } => {
                let null = self.null_label()?;
                let input = Tensor::cat(&[batch, &batch.narrow(0, 0, g)?], 0)?;
                let mut cond = vec![null; rows];
                cond.extend_from_slice(labels);
                let all = self
                    .models
                    .denoiser
                    .eps(&input, &vec![t; rows + g], Some(&cond))?;
                let eps_u = all.narrow(0, 0, rows)?;
                let eps_y = all.narrow(0, rows, g)?;
                let guided = cfg_eps(&eps_u.narrow(0, 0, g)?, &eps_y, *omega, *mask)?;
                let eps = if rows > g {
                    Tensor::cat(&[&guided, &eps_u.narrow(0, g, rows - g)?], 0)?
                } else {
                    guided
                };
                Ok((eps, rows + g))
            }
        }
    }

    fn null_label(&self) -> Result<LabelId> {
        self.models.denoiser.null_label().ok_or_else(|| {
            EngineError::Config("classifier-free guidance needs a null label".into())
        })
    }

    fn run_ldm(
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
        for i in 0..s.len() {
            let t = s.timestep(i)?;
            let eps = if r.diffuse_guidance_scale == 1.0 {
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
        for i in (0..s.len()).rev() {
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
                    start_index: s.len() - 1,
                    nfe: nfe[i],
                    synthesis: synth.get(i)?,
                    reference: refs.get(i)?,
                    latent: z.get(i)?,
                })
            })
            .collect()
    }

    /// DISTS (if available), L2 and logits-L1 between the clamped [0,1] views. `reference_logits`
    /// saves a classifier pass when the reference is the input.
    fn similarities(
        &self,
        reference: &Tensor,
        synthesis: &Tensor,
        reference_logits: Option<&Tensor>,
        nfe: &mut [Nfe],
    ) -> Result<Vec<Similarities>> {
        let r01 = to_unit(reference)?;
        let s01 = to_unit(synthesis)?;
        let clf = &self.models.classifier;
        let ref_logits = match reference_logits {
            Some(l) => l.clone(),
            None => {
                nfe.iter_mut().for_each(|c| c.classifier_forward += 1);
                clf.forward(&r01)?.logits
            }
        };
        nfe.iter_mut().for_each(|c| c.classifier_forward += 1);
        let syn_logits = clf.forward(&s01)?.logits;
        let logits = logits_l1_similarity(&ref_logits, &syn_logits)?;
        let l2 = l2_similarity(&r01, &s01)?;
        let dists = match &self.models.dists {
            Some(d) => {
                nfe.iter_mut().for_each(|c| c.dists += 1);
                Some(d.similarity(&r01, &s01)?)
            }
            None => None,
        };
        Ok((0..l2.len())
            .map(|i| Similarities {
                dists: dists.as_ref().map(|d| d[i]),
                l2: l2[i],
                logits_l1: logits[i],
            })
            .collect())
    }
}

fn gdm_plan(r: &GdmRecipe) -> Result<PixelPlan> {
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

fn pixel_cfg_plan(r: &PixelCfgRecipe) -> Result<PixelPlan> {
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

fn pick(distance: Distance, s: &Similarities) -> f64 {
    match distance {
        // DiffGuard::new refuses a DISTS recipe without a DISTS model.
        Distance::Dists => s.dists.unwrap_or(f64::NAN),
        Distance::L2 => s.l2,
        Distance::LogitsL1 => s.logits_l1,
    }
}

fn add_nfe(total: &mut Nfe, c: &Nfe) {
    total.denoiser += c.denoiser;
    total.classifier_forward += c.classifier_forward;
    total.classifier_backward += c.classifier_backward;
    total.dists += c.dists;
    total.autoencoder += c.autoencoder;
}

fn argmax(logits: &Tensor) -> Result<Vec<LabelId>> {
    let idx: Vec<u32> = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?;
    Ok(idx.into_iter().map(LabelId).collect())
}

fn index_tensor(idx: &[usize], dev: &candle_core::Device) -> Result<Tensor> {
    let v: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    Ok(Tensor::new(v, dev)?)
}

/// Stacks per-image rows that every code path has filled.
fn stack_rows(rows: Vec<Option<Tensor>>) -> Result<Tensor> {
    let rows: Vec<Tensor> = rows
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| EngineError::InvalidInput(format!("image {i} produced no output")))
        })
        .collect::<Result<_>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}
