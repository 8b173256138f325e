//! The end-to-end DiffGuard detector (spec §9) for the three recipes, written against the model
//! traits only.
//!
//! Pixel recipes (GDM, pixel-CFG): resize → DDIM inversion with adaptive early stop → images
//! grouped by equal denoising start index → guided (and, with `Reference::Unguided`, unguided)
//! DDIM sampling in one batch per group → resize back → similarity. Latent recipe (LDM): encode →
//! null-class inversion → masked CFG sampling → decode → similarity. All tensors stay on the input's
//! device; only per-image scalars (labels, early-stop metrics, scores) come back to the host.
//!
//! Usage (models are anything implementing the traits of [`crate::model`]):
//! ```text
//! let det = DiffGuard::new(Recipe::preset("ldm")?, Models { denoiser, classifier,
//!                          autoencoder: Some(vq), dists: Some(dists) })?;
//! let results = det.score(&images_pm1, None)?;   // or Some(&labels) from the upstream
//! results[i].score                               // higher = more in-distribution
//! ```
//! Batching: pass any number of images; the pixel recipes run the inversion as one batch (stopped
//! images leave it) and then one sampling batch per distinct start index. Clean Grad sends
//! 8 × (images in the group) crops through one classifier input-gradient call per step; callers
//! bound the batch size to fit memory.

mod latent;
mod pixel;

use std::sync::Arc;

use candle_core::{D, DType, Tensor};

use self::pixel::{gdm_plan, pixel_cfg_plan};
use crate::ddim::cfg_eps;
use crate::guidance::CutBox;
use crate::model::{Autoencoder, Classifier, Denoiser, LabelId};
use crate::recipe::{Distance, Recipe, Reference};
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
    /// Guided synthesis (C, H, W) in \[-1,1\] at the input size, not clamped.
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

    /// The same networks under another recipe (evaluation variants, e.g. without the DSG mask).
    pub fn with_recipe(&self, recipe: Recipe) -> Result<Self> {
        Self::new(recipe, self.models.clone())
    }

    fn reference(&self) -> Reference {
        match &self.recipe {
            Recipe::Gdm(r) => r.reference,
            Recipe::Ldm(r) => r.reference,
            Recipe::PixelCfg(r) => r.reference,
        }
    }

    /// Scores a batch of images (N, C, H, W) in \[-1,1\] at the recipe's input size. `labels` are the
    /// classifier's predictions if already known (e.g. from the upstream response); otherwise the
    /// classifier is run.
    pub fn score(&self, x: &Tensor, labels: Option<&[LabelId]>) -> Result<Vec<ImageResult>> {
        let (n, _, h, w) = x.dims4()?;
        let input_size = self.recipe.input_size();
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
    /// DISTS (if available), L2 and logits-L1 between the clamped \[0,1\] views. `reference_logits`
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
