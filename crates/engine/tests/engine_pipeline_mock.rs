//! The pixel-space detectors (GDM, pixel-CFG) on small analytic models: the pipeline's result for
//! each image must equal (a) a hand-written single-image loop built from the step functions and
//! (b) the pipeline run on that image alone — which checks the early-stop bookkeeping, the start
//! index, the grouping of equal trajectories, the guided/unguided batch and the per-image RNG reset.

use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor};
use diffguard_engine::ddim::{cfg_eps, gdm_invert_step, guided_sample_step};
use diffguard_engine::early_stop::{EarlyStop, start_index};
use diffguard_engine::guidance::dsg_mask;
use diffguard_engine::model::{Classifier, ClassifierOutput, Denoiser, LabelId};
use diffguard_engine::ops::resize::bilinear_resize;
use diffguard_engine::pipeline::{DiffGuard, ImageResult, Models};
use diffguard_engine::recipe::{Distance, GdmRecipe, PixelCfgRecipe, Recipe, Reference};
use diffguard_engine::schedule::{BetaSchedule, SpacedSchedule};
use diffguard_engine::similarity::{ImageSimilarity, psnr_code, to_unit};
use diffguard_engine::{EngineError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CLASSES: usize = 4;

/// ε = (0.2 + 0.6·t/1000)·x + 0.05·(label + 1) (label-free when unconditional or null).
struct AnalyticUnet {
    conditional: bool,
}

impl Denoiser for AnalyticUnet {
    fn eps(&self, x: &Tensor, t: &[u32], labels: Option<&[LabelId]>) -> Result<Tensor> {
        let n = x.dim(0)?;
        let scale: Vec<f32> = t.iter().map(|&t| 0.2 + 0.6 * t as f32 / 1000.0).collect();
        let bias: Vec<f32> = (0..n)
            .map(|i| match labels {
                Some(l) if self.conditional && l[i].0 < CLASSES as u32 => {
                    0.05 * (l[i].0 + 1) as f32
                }
                _ => 0.0,
            })
            .collect();
        let s = Tensor::from_vec(scale, (n, 1, 1, 1), x.device())?;
        let b = Tensor::from_vec(bias, (n, 1, 1, 1), x.device())?;
        Ok(x.broadcast_mul(&s)?.broadcast_add(&b)?)
    }
    fn null_label(&self) -> Option<LabelId> {
        self.conditional.then_some(LabelId(CLASSES as u32))
    }
    fn num_classes(&self) -> usize {
        if self.conditional { CLASSES } else { 0 }
    }
}

/// A linear softmax classifier on 3×S×S images; Grad-CAM = ReLU of a class-weighted channel sum of
/// the 2×2 average-pooled input.
struct LinearClassifier {
    w: Tensor,
    side: usize,
}

impl LinearClassifier {
    fn new(side: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(5);
        let d = 3 * side * side;
        let w: Vec<f32> = (0..CLASSES * d)
            .map(|_| (rng.random::<f32>() - 0.5) * 0.3)
            .collect();
        Self {
            w: Tensor::from_vec(w, (CLASSES, d), &Device::Cpu).unwrap(),
            side,
        }
    }
}

impl Classifier for LinearClassifier {
    fn forward(&self, x01: &Tensor) -> Result<ClassifierOutput> {
        let n = x01.dim(0)?;
        let flat = x01.reshape((n, ()))?;
        let logits = flat.matmul(&self.w.t()?)?;
        Ok(ClassifierOutput {
            logits,
            penultimate: flat,
            features: x01.clone(),
        })
    }
    fn log_prob_input_grad(&self, x01: &Tensor, labels: &[LabelId]) -> Result<Tensor> {
        if x01.dim(2)? != self.side {
            return Err(EngineError::InvalidInput(
                "wrong classifier input size".into(),
            ));
        }
        let n = x01.dim(0)?;
        let p = candle_nn::ops::softmax(&self.forward(x01)?.logits, D::Minus1)?;
        let mut onehot = vec![0f32; n * CLASSES];
        for (i, y) in labels.iter().enumerate() {
            onehot[i * CLASSES + y.0 as usize] = 1.0;
        }
        let onehot = Tensor::from_vec(onehot, (n, CLASSES), x01.device())?;
        Ok((onehot - p)?.matmul(&self.w)?.reshape(x01.shape())?)
    }
    fn grad_cam(&self, x01: &Tensor, labels: &[LabelId]) -> Result<Tensor> {
        let (n, _, h, _) = x01.dims4()?;
        let pooled = x01.avg_pool2d(h / 2)?;
        let rows: Vec<Tensor> = (0..n)
            .map(|i| {
                let c = labels[i].0 as f64;
                let w = Tensor::new(&[1.0f32, -0.5 + 0.3 * c as f32, 0.7], x01.device())?
                    .reshape((3, 1, 1))?;
                pooled.get(i)?.broadcast_mul(&w)?.sum(0)?.relu()
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
    fn num_classes(&self) -> usize {
        CLASSES
    }
}

/// 1 − mean |a − b|.
struct MeanAbsSimilarity;

impl ImageSimilarity for MeanAbsSimilarity {
    fn similarity(&self, a01: &Tensor, b01: &Tensor) -> Result<Vec<f64>> {
        let n = a01.dim(0)?;
        let d: Vec<f32> = (a01 - b01)?.abs()?.reshape((n, ()))?.mean(1)?.to_vec1()?;
        Ok(d.into_iter().map(|v| 1.0 - v as f64).collect())
    }
}

/// Three 3×8×8 images in [-1,1] with amplitudes 0.15, 0.45 and 0.9 around different means, so their
/// PSNR trajectories differ.
fn images() -> Tensor {
    let mut rng = StdRng::seed_from_u64(21);
    let rows: Vec<Tensor> = [(0.15f32, 0.1f32), (0.45, -0.2), (0.9, 0.0)]
        .iter()
        .map(|&(amp, mean)| {
            let v: Vec<f32> = (0..3 * 64)
                .map(|_| mean + amp * (rng.random::<f32>() * 2.0 - 1.0))
                .collect();
            Tensor::from_vec(v, (3, 8, 8), &Device::Cpu).unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

fn close(a: &Tensor, b: &Tensor, tol: f64) -> bool {
    let d: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    (d as f64) <= tol
}

/// Batched and single-image runs agree: batching and grouping never mix images.
fn assert_batch_equals_singles(
    det: &DiffGuard,
    x: &Tensor,
    labels: Option<&[LabelId]>,
    batch: &[ImageResult],
) {
    for (i, r) in batch.iter().enumerate() {
        let label = labels.map(|l| &l[i..i + 1]);
        let alone = &det.score(&x.narrow(0, i, 1).unwrap(), label).unwrap()[0];
        assert_eq!(
            (alone.k_star, alone.start_index, alone.label),
            (r.k_star, r.start_index, r.label)
        );
        assert!(
            (alone.score - r.score).abs() <= 1e-5,
            "image {i}: {} vs {}",
            alone.score,
            r.score
        );
        // Same float32 arithmetic on different batch shapes: only gemm blocking can differ.
        assert!(
            close(&alone.synthesis, &r.synthesis, 1e-5),
            "image {i} synthesis"
        );
        assert_eq!(alone.nfe, r.nfe);
    }
}

#[test]
fn gdm_pipeline_matches_a_hand_written_loop() {
    let x = images();
    let unet = AnalyticUnet { conditional: false };
    let clf = LinearClassifier::new(8);
    let sched = SpacedSchedule::gdm(BetaSchedule::AdmLinear, 1000, 20).unwrap();
    // PSNR trajectories by hand, to place the threshold between the images' curves.
    let x0 = bilinear_resize(&x, 10, 10).unwrap();
    let mut traj = vec![];
    let mut xj = x0.clone();
    for j in 0..18 {
        let t = vec![sched.timestep(j).unwrap(); 3];
        let eps = unet.eps(&xj, &t, None).unwrap();
        let a = [sched.alpha_bar(j).unwrap()];
        let an = [sched.alpha_bar_next(j).unwrap()];
        xj = gdm_invert_step(&xj, &eps, &a, &an, j > 0).unwrap();
        traj.push((xj.clone(), psnr_code(&xj, &x0).unwrap()));
    }
    let threshold = traj[6].1[1];
    let k_star: Vec<usize> = (0..3)
        .map(|i| {
            traj.iter()
                .position(|(_, p)| p[i] < threshold)
                .unwrap_or(17)
        })
        .collect();
    assert!(
        k_star[0] != k_star[1] && k_star[1] != k_star[2],
        "k* {k_star:?} must differ"
    );

    let recipe = GdmRecipe {
        ddim_steps: 20,
        early_stop_steps: 2,
        early_stop: EarlyStop {
            psnr: threshold,
            dists: -1.0,
        },
        cutouts_num: 4,
        cutouts_size: 8,
        input_size: 8,
        image_size: 10,
        ..GdmRecipe::default()
    };
    let models = Models {
        denoiser: Arc::new(AnalyticUnet { conditional: false }),
        classifier: Arc::new(LinearClassifier::new(8)),
        autoencoder: None,
        dists: Some(Arc::new(MeanAbsSimilarity)),
    };
    let det = DiffGuard::new(Recipe::Gdm(recipe.clone()), models).unwrap();
    let out = det.score(&x, None).unwrap();
    let cg = diffguard_engine::guidance::CleanGrad {
        scale: 3.0,
        blend: true,
        cutouts: Some(diffguard_engine::guidance::CutoutSpec {
            num: 4,
            size: 8,
            cut_pow: 1.0,
        }),
    };
    let preds = clf
        .forward(&to_unit(&x).unwrap())
        .unwrap()
        .logits
        .argmax(D::Minus1)
        .unwrap();
    let preds: Vec<u32> = preds.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
    for (i, r) in out.iter().enumerate() {
        assert_eq!(r.k_star, Some(k_star[i]), "image {i}");
        let start = start_index(k_star[i], 20, 3);
        assert_eq!(r.start_index, start);
        assert_eq!(r.start_index, k_star[i] + 2);
        assert_eq!(r.label, LabelId(preds[i]));
        // Hand-written guided and unguided loops from z = x_{k*+1}, RNG reset for the image.
        let z = traj[k_star[i]].0.narrow(0, i, 1).unwrap();
        let mut rng = StdRng::seed_from_u64(100);
        let (mut g, mut u) = (z.clone(), z);
        for j in (0..=start).rev() {
            let t = [sched.timestep(j).unwrap()];
            let a = [sched.alpha_bar(j).unwrap()];
            let ap = [sched.alpha_bar_prev(j).unwrap()];
            let eps_g = unet.eps(&g, &t, None).unwrap();
            let boxes = cg.cutouts.unwrap().draw(&mut rng, (10, 10)).unwrap();
            let grad = cg
                .gradient(&clf, &g, &eps_g, &a, &[r.label], &boxes)
                .unwrap();
            g = guided_sample_step(&g, &eps_g, Some(&grad), &a, &ap, true).unwrap();
            let eps_u = unet.eps(&u, &t, None).unwrap();
            u = guided_sample_step(&u, &eps_u, None, &a, &ap, true).unwrap();
        }
        let g = bilinear_resize(&g, 8, 8).unwrap().get(0).unwrap();
        let u = bilinear_resize(&u, 8, 8).unwrap().get(0).unwrap();
        assert!(close(&r.synthesis, &g, 1e-5), "image {i} guided");
        assert!(close(&r.reference, &u, 1e-5), "image {i} unguided");
        assert!(!close(&g, &u, 1e-3), "guidance must change the synthesis");
        let want = MeanAbsSimilarity
            .similarity(
                &to_unit(&u.unsqueeze(0).unwrap()).unwrap(),
                &to_unit(&g.unsqueeze(0).unwrap()).unwrap(),
            )
            .unwrap()[0];
        assert!((r.score - want).abs() <= 1e-6);
        // k*+1 inversion rows, (start+1) × 2 sampling rows, one PSNR check per inversion step.
        assert_eq!(r.nfe.denoiser, k_star[i] + 1 + 2 * (start + 1));
        assert_eq!(r.nfe.classifier_backward, 4 * (start + 1));
        // Prediction, unguided reference, synthesis (logits-L1 is always reported).
        assert_eq!(r.nfe.classifier_forward, 3);
    }
    assert_batch_equals_singles(&det, &x, None, &out);
    // Labels from the upstream: the input's own classifier pass is skipped (the unguided branch is
    // the reference), and the results are those of the predicted labels.
    let known: Vec<LabelId> = out.iter().map(|r| r.label).collect();
    let again = det.score(&x, Some(&known)).unwrap();
    for (a, r) in again.iter().zip(&out) {
        assert_eq!(a.nfe.classifier_forward, 2);
        assert!((a.score - r.score).abs() <= 1e-6);
    }
}

#[test]
fn pixel_cfg_pipeline_matches_a_hand_written_loop() {
    let x = images();
    let recipe = PixelCfgRecipe {
        ddim_steps: 20,
        early_stop_steps: 8,
        cam_cut: 0.2,
        input_size: 8,
        image_size: 8,
        cutouts_size: 8,
        ..PixelCfgRecipe::default()
    };
    let models = Models {
        denoiser: Arc::new(AnalyticUnet { conditional: true }),
        classifier: Arc::new(LinearClassifier::new(8)),
        autoencoder: None,
        dists: None,
    };
    let det = DiffGuard::new(Recipe::PixelCfg(recipe), models).unwrap();
    let labels = [LabelId(0), LabelId(3), LabelId(1)];
    let out = det.score(&x, Some(&labels)).unwrap();
    let unet = AnalyticUnet { conditional: true };
    let clf = LinearClassifier::new(8);
    let sched = SpacedSchedule::gdm(BetaSchedule::AdmLinear, 1000, 20).unwrap();
    let mask = dsg_mask(&clf, &to_unit(&x).unwrap(), &labels, (8, 8), 3, 0.2)
        .unwrap()
        .latent;
    let mask_sum: f32 = mask
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        mask_sum > 0.0 && mask_sum < (3 * 3 * 64) as f32,
        "the mask must be partial"
    );
    for (i, r) in out.iter().enumerate() {
        // No early stop: 12 inversion steps, latent at level 12, sampling starts there (d = 2).
        assert_eq!((r.k_star, r.start_index), (Some(11), 12));
        let null = [LabelId(CLASSES as u32)];
        let mut z = x.narrow(0, i, 1).unwrap();
        for j in 0..12 {
            let t = [sched.timestep(j).unwrap()];
            let eps = unet.eps(&z, &t, Some(&null)).unwrap();
            let (a, an) = (
                [sched.alpha_bar(j).unwrap()],
                [sched.alpha_bar_next(j).unwrap()],
            );
            z = gdm_invert_step(&z, &eps, &a, &an, j > 0).unwrap();
        }
        let m = mask.narrow(0, i, 1).unwrap();
        for j in (0..=12).rev() {
            let t = [sched.timestep(j).unwrap()];
            let eu = unet.eps(&z, &t, Some(&null)).unwrap();
            let ey = unet.eps(&z, &t, Some(&labels[i..i + 1])).unwrap();
            let eps = cfg_eps(&eu, &ey, 3.0, Some(&m)).unwrap();
            let (a, ap) = (
                [sched.alpha_bar(j).unwrap()],
                [sched.alpha_bar_prev(j).unwrap()],
            );
            z = guided_sample_step(&z, &eps, None, &a, &ap, true).unwrap();
        }
        assert!(close(&r.synthesis, &z.get(0).unwrap(), 1e-5), "image {i}");
        assert!(close(&r.reference, &x.get(i).unwrap(), 0.0));
        let lx = clf
            .forward(&to_unit(&x.narrow(0, i, 1).unwrap()).unwrap())
            .unwrap()
            .logits;
        let lz = clf.forward(&to_unit(&z).unwrap()).unwrap().logits;
        let want: f32 = (lx - lz)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((r.score + want as f64).abs() <= 1e-5, "image {i} score");
        assert_eq!(r.nfe.denoiser, 12 + 2 * 13);
    }
    assert_batch_equals_singles(&det, &x, Some(&labels), &out);
}

#[test]
fn detector_refuses_missing_models_and_bad_inputs() {
    let models = Models {
        denoiser: Arc::new(AnalyticUnet { conditional: false }),
        classifier: Arc::new(LinearClassifier::new(8)),
        autoencoder: None,
        dists: None,
    };
    // GDM scores with DISTS by default.
    assert!(DiffGuard::new(Recipe::preset("gdm").unwrap(), models.clone()).is_err());
    // CFG needs a null label; LDM needs an autoencoder.
    assert!(DiffGuard::new(Recipe::preset("pixel-cfg").unwrap(), models.clone()).is_err());
    assert!(DiffGuard::new(Recipe::preset("ldm").unwrap(), models.clone()).is_err());
    let recipe = GdmRecipe {
        distance: Distance::L2,
        early_stop: EarlyStop::OFF,
        reference: Reference::Input,
        ddim_steps: 10,
        early_stop_steps: 5,
        cutouts_size: 8,
        input_size: 8,
        image_size: 8,
        ..GdmRecipe::default()
    };
    let det = DiffGuard::new(Recipe::Gdm(recipe), models).unwrap();
    let x = images();
    assert!(
        det.score(&x.narrow(2, 0, 6).unwrap(), None).is_err(),
        "wrong size"
    );
    assert!(det.score(&x, Some(&[LabelId(0)])).is_err(), "label count");
    assert!(
        det.score(&x, Some(&[LabelId(0), LabelId(9), LabelId(1)]))
            .is_err(),
        "label range"
    );
    assert_eq!(det.score(&x, None).unwrap().len(), 3);
}
