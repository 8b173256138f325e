//! The evaluation runner behind `diffguard eval`: one bundle, Fashion-MNIST test as
//! in-distribution, MNIST, Animal-MNIST and any image folders as OOD, every detector on the same
//! classifier outputs — the baselines, DiffGuard under each variant, the cascades and the
//! evaluation-only envelope oracles — with metrics, speed and a gallery for the report.
//!
//! DiffGuard scores go through [`ScoreCache`], so a rerun (or a resumed run) only computes what
//! is missing. Baselines are recomputed: they cost one classifier pass per image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::baselines::{Knn, Vim, energy, max_logit, msp};
use super::cache::{CachedScore, ScoreCache};
use super::combine::{Cascade, DEFAULT_CASCADE_QUANTILES, threshold_envelope};
use super::metrics::{OodMetrics, ood_metrics, roc_curve};
use super::table::ResultsTable;
use super::variants::{Variant, variants};
use crate::bundle::Bundle;
use crate::data::{
    ColorMode, Dataset, FashionSplit, FolderOptions, PixelRange, animal_mnist, fashion_mnist,
    image_folder, mnist, stratified_subset,
};
use crate::model::Classifier;
use crate::pipeline::{DiffGuard, ImageResult};
use crate::{EngineError, LabelId, Result};

/// The in-distribution test set's name in tables and the cache.
pub const IND_SET: &str = "fashion-mnist/test";
/// The validation split the cascade (and calibration) thresholds come from.
pub const VAL_SET: &str = "fashion-mnist/validation";
/// Grid size of the envelope oracle per detector (distinct scores are thinned to this).
const ENVELOPE_GRID: usize = 400;

/// What to evaluate and how much of it.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    /// The data folder (`fashion-mnist/`, `mnist/`, `animal-mnist/`).
    pub data_dir: PathBuf,
    /// Images per test set (stratified, seeded); `None` = every image.
    pub per_set: Option<usize>,
    /// Validation images for the cascade thresholds; `None` = the whole 5k split.
    pub val_size: Option<usize>,
    /// Training images whose features form the KNN bank and fit ViM.
    pub bank_size: usize,
    pub knn_k: usize,
    pub seed: u64,
    /// Extra OOD sets: `ROOT/CLASS/IMAGE` folders.
    pub ood_folders: Vec<PathBuf>,
    /// DiffGuard variant ids (see [`super::variants::VARIANT_IDS`]); empty = all that apply.
    pub variants: Vec<String>,
    /// Images per DiffGuard call.
    pub batch_size: usize,
    /// Gallery images per end (most and least in-distribution) per set.
    pub gallery_per_end: usize,
    /// Show progress bars (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

impl EvalConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            per_set: Some(1000),
            val_size: Some(1000),
            bank_size: 10_000,
            knn_k: Knn::DEFAULT_K,
            seed: 0,
            ood_folders: Vec::new(),
            variants: Vec::new(),
            batch_size: 32,
            gallery_per_end: 4,
            progress: true,
        }
    }
}

/// A seeded subset of one dataset; `indices` are into the full dataset (the cache key).
pub struct EvalSet {
    pub name: String,
    pub data: Dataset,
    pub indices: Vec<usize>,
}

impl EvalSet {
    pub fn subset(name: &str, full: &Dataset, n: Option<usize>, seed: u64) -> Result<Self> {
        let indices = match n {
            Some(n) => stratified_subset(full.labels(), n, seed),
            None => (0..full.len()).collect(),
        };
        Ok(Self {
            name: name.into(),
            data: full.select(&indices)?,
            indices,
        })
    }
}

/// One classifier pass over a set.
pub struct ClassifierOutputs {
    /// (N, C) and (N, D), f32 on the CPU.
    pub logits: Tensor,
    pub penultimate: Tensor,
    pub predicted: Vec<LabelId>,
    pub seconds: f64,
}

/// What kind of row a detector is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    Baseline,
    DiffGuard,
    /// Deployable: thresholds from the validation split.
    Cascade,
    /// Picks thresholds on the test labels: evaluation only.
    Oracle,
}

/// One row of the results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectorResult {
    pub name: String,
    pub kind: DetectorKind,
    /// Detector fingerprint (DiffGuard variants only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Per OOD set, in [`EvalResults::ood_sets`] order. Oracle rows have no AUPR (NaN → null).
    pub metrics: Vec<OodMetrics>,
    pub average: OodMetrics,
    pub images_per_second: f64,
    /// Network evaluations per image, all networks together.
    pub nfe_per_image: f64,
    /// Per OOD set: the ROC (or the envelope) as (fpr, tpr) points, for the plot.
    #[serde(skip)]
    pub curves: Vec<(Vec<f64>, Vec<f64>)>,
}

/// One gallery entry: an image with its synthesis, for the report.
#[derive(Debug, Clone)]
pub struct GalleryItem {
    pub set: String,
    pub index: usize,
    pub score: f64,
    pub label: String,
    /// True for the most in-distribution end of the set.
    pub top: bool,
    /// (C, H, W) in [-1, 1].
    pub input: Tensor,
    pub synthesis: Tensor,
    pub reference: Tensor,
}

/// How much DiffGuard work the run did versus found in the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    pub computed: usize,
    pub cached: usize,
}

/// Everything an evaluation produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResults {
    pub bundle: String,
    pub bundle_fingerprint: String,
    pub ind_set: String,
    pub ood_sets: Vec<String>,
    /// Images evaluated per set (in-distribution first).
    pub set_sizes: BTreeMap<String, usize>,
    pub validation_images: usize,
    pub bank_images: usize,
    pub seed: u64,
    pub detectors: Vec<DetectorResult>,
    pub cache: CacheStats,
    #[serde(skip)]
    pub gallery: Vec<GalleryItem>,
}

impl EvalResults {
    /// The paper-layout table (percent, best per column in bold).
    pub fn table(&self) -> Result<ResultsTable> {
        let mut t = ResultsTable::new(self.ood_sets.clone());
        for d in &self.detectors {
            t.push(d.name.clone(), d.metrics.clone())?;
        }
        Ok(t)
    }
}

pub(crate) fn progress(show: bool, len: usize, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

/// Brings a dataset to the classifier's channel count.
fn to_channels(d: Dataset, channels: usize) -> Result<Dataset> {
    match (d.image_shape()[0], channels) {
        (1, 3) => d.to_rgb(),
        (c, want) if c == want => Ok(d),
        (c, want) => Err(EngineError::InvalidInput(format!(
            "dataset {} has {c} channels, the classifier wants {want}",
            d.name()
        ))),
    }
}

/// Runs the classifier over `set` in batches.
pub fn classify(
    classifier: &dyn Classifier,
    set: &Dataset,
    batch: usize,
    device: &Device,
) -> Result<ClassifierOutputs> {
    let start = Instant::now();
    let (mut logits, mut feats) = (Vec::new(), Vec::new());
    let all: Vec<usize> = (0..set.len()).collect();
    for chunk in all.chunks(batch.max(1)) {
        let x = set.batch_tensor(chunk, PixelRange::ZeroOne, device)?;
        let out = classifier.forward(&x)?;
        logits.push(out.logits.to_device(&Device::Cpu)?);
        feats.push(out.penultimate.to_device(&Device::Cpu)?);
    }
    let logits = Tensor::cat(&logits, 0)?.to_dtype(DType::F32)?;
    let penultimate = Tensor::cat(&feats, 0)?.to_dtype(DType::F32)?;
    let predicted = logits
        .argmax(1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(LabelId)
        .collect();
    Ok(ClassifierOutputs {
        logits,
        penultimate,
        predicted,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A DiffGuard detector with the fingerprint its cached scores are keyed by.
pub struct ScoredDetector {
    pub detector: DiffGuard,
    pub fingerprint: String,
    /// Where the bundle's networks live.
    pub device: Device,
}

/// The variant's detector and fingerprint on the bundle's networks.
pub fn detector_for(bundle: &Bundle, v: &Variant) -> Result<ScoredDetector> {
    Ok(ScoredDetector {
        detector: bundle.detector.with_recipe(v.recipe.clone())?,
        fingerprint: bundle.fingerprint_for(&v.recipe)?,
        device: bundle.device.clone(),
    })
}

/// DiffGuard scores of every image of `set`, from the cache where present, computing the rest
/// in batches (guided by `labels`, the classifier's predictions) and appending them to the cache.
pub fn diffguard_scores(
    d: &ScoredDetector,
    set: &EvalSet,
    labels: &[LabelId],
    cache: &mut ScoreCache,
    batch: usize,
    bar: &ProgressBar,
    stats: &mut CacheStats,
) -> Result<Vec<CachedScore>> {
    let missing: Vec<usize> = (0..set.indices.len())
        .filter(|&i| {
            cache
                .get(&d.fingerprint, &set.name, set.indices[i])
                .is_none()
        })
        .collect();
    stats.cached += set.indices.len() - missing.len();
    bar.inc((set.indices.len() - missing.len()) as u64);
    for chunk in missing.chunks(batch.max(1)) {
        let start = Instant::now();
        let x = set
            .data
            .batch_tensor(chunk, PixelRange::MinusOneOne, &d.device)?;
        let chunk_labels: Vec<LabelId> = chunk.iter().map(|&i| labels[i]).collect();
        let results = d.detector.score(&x, Some(&chunk_labels))?;
        let seconds = start.elapsed().as_secs_f64() / chunk.len() as f64;
        let entries = chunk
            .iter()
            .zip(&results)
            .map(|(&i, r)| entry(d, set, i, r, seconds))
            .collect();
        cache.insert(entries)?;
        stats.computed += chunk.len();
        bar.inc(chunk.len() as u64);
    }
    (0..set.indices.len())
        .map(|i| {
            cache
                .get(&d.fingerprint, &set.name, set.indices[i])
                .cloned()
                .ok_or_else(|| EngineError::InvalidInput("score cache lost an entry".into()))
        })
        .collect()
}

fn entry(
    d: &ScoredDetector,
    set: &EvalSet,
    i: usize,
    r: &ImageResult,
    seconds: f64,
) -> CachedScore {
    let n = r.nfe;
    CachedScore {
        detector: d.fingerprint.clone(),
        dataset: set.name.clone(),
        index: set.indices[i],
        score: r.score,
        label: r.label.0,
        nfe: n.denoiser + n.classifier_forward + n.classifier_backward + n.dists + n.autoencoder,
        nfe_denoiser: n.denoiser,
        seconds,
    }
}

/// Loads the in-distribution test subset and every OOD subset, in the classifier's channels.
pub fn load_test_sets(cfg: &EvalConfig, channels: usize, size: usize) -> Result<Vec<EvalSet>> {
    let d = &cfg.data_dir;
    let mut sets = vec![(
        IND_SET.to_string(),
        fashion_mnist(&d.join("fashion-mnist"), FashionSplit::Test)?,
    )];
    sets.push(("mnist".into(), mnist(&d.join("mnist").join("digits"))?));
    sets.push((
        "animal-mnist".into(),
        animal_mnist(&d.join("animal-mnist"))?,
    ));
    let color = if channels == 1 {
        ColorMode::Gray
    } else {
        ColorMode::Rgb
    };
    for folder in &cfg.ood_folders {
        let opts = FolderOptions {
            color,
            size: Some((size as u32, size as u32)),
        };
        let data = image_folder(folder, &opts)?;
        sets.push((folder_name(folder, &sets), data));
    }
    sets.into_iter()
        .map(|(name, full)| {
            let full = to_channels(full, channels)?;
            EvalSet::subset(&name, &full, cfg.per_set, cfg.seed)
        })
        .collect()
}

/// A folder's set name: its last component, made unique among the sets so far.
fn folder_name(folder: &Path, sets: &[(String, Dataset)]) -> String {
    let base = folder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "folder".into());
    let mut name = format!("folder:{base}");
    let mut k = 2;
    while sets.iter().any(|(n, _)| *n == name) {
        name = format!("folder:{base}-{k}");
        k += 1;
    }
    name
}

/// The fc layer's weight and bias, read from the classifier checkpoint (ViM needs them).
fn fc_params(bundle: &Bundle) -> Result<(Tensor, Tensor)> {
    let path = bundle.dir.join(&bundle.manifest.classifier.weights);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::Format {
                path: path.display().to_string(),
                what: "classifier checkpoint",
                detail: format!("no tensor `{name}` (ViM needs the fc layer)"),
            })
    };
    Ok((
        get("fc.weight")?.to_dtype(DType::F32)?,
        get("fc.bias")?.to_dtype(DType::F32)?,
    ))
}

/// One baseline's scores per set (InD first), and its extra scoring seconds.
struct BaselineScores {
    name: &'static str,
    per_set: Vec<Vec<f64>>,
    val: Vec<f64>,
    seconds: f64,
}

fn baseline_scores(
    outputs: &[ClassifierOutputs],
    val: &ClassifierOutputs,
    knn: &Knn,
    vim: &Vim,
) -> Result<Vec<BaselineScores>> {
    type ScoreFn<'a> = Box<dyn Fn(&ClassifierOutputs) -> Result<Vec<f64>> + 'a>;
    let fns: Vec<(&'static str, ScoreFn)> = vec![
        ("MSP", Box::new(|o: &ClassifierOutputs| msp(&o.logits))),
        ("EBO", Box::new(|o: &ClassifierOutputs| energy(&o.logits))),
        (
            "MLS",
            Box::new(|o: &ClassifierOutputs| max_logit(&o.logits)),
        ),
        (
            "KNN",
            Box::new(|o: &ClassifierOutputs| knn.score(&o.penultimate)),
        ),
        (
            "ViM",
            Box::new(|o: &ClassifierOutputs| vim.score(&o.penultimate)),
        ),
    ];
    fns.into_iter()
        .map(|(name, f)| {
            let start = Instant::now();
            let per_set = outputs.iter().map(&f).collect::<Result<Vec<_>>>()?;
            let seconds = start.elapsed().as_secs_f64();
            Ok(BaselineScores {
                name,
                val: f(val)?,
                per_set,
                seconds,
            })
        })
        .collect()
}

/// Per OOD set: metrics, and the (fpr, tpr) curve.
type MetricRow = (Vec<OodMetrics>, Vec<(Vec<f64>, Vec<f64>)>);

/// Metrics of `ind` against each OOD score vector, with the ROC curves.
fn metric_row(ind: &[f64], oods: &[Vec<f64>]) -> Result<MetricRow> {
    let mut metrics = Vec::new();
    let mut curves = Vec::new();
    for ood in oods {
        metrics.push(ood_metrics(ind, ood)?);
        let roc = roc_curve(ind, ood)?;
        curves.push((roc.fpr, roc.tpr));
    }
    Ok((metrics, curves))
}

fn row(
    name: String,
    kind: DetectorKind,
    fingerprint: Option<String>,
    (metrics, curves): MetricRow,
    images_per_second: f64,
    nfe_per_image: f64,
) -> DetectorResult {
    let average = ResultsTable::average(&super::table::TableRow {
        detector: name.clone(),
        metrics: metrics.clone(),
    });
    DetectorResult {
        name,
        kind,
        fingerprint,
        metrics,
        average,
        images_per_second,
        nfe_per_image,
        curves,
    }
}

/// DiffGuard scores of one variant on every test set and the validation set.
struct VariantScores {
    name: String,
    fingerprint: String,
    per_set: Vec<Vec<CachedScore>>,
    val: Vec<CachedScore>,
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 { 0.0 } else { s / n as f64 }
}

/// Runs the whole evaluation. `cache_path` holds the per-image DiffGuard scores (resumable).
pub fn evaluate(bundle: &Bundle, cfg: &EvalConfig, cache_path: &Path) -> Result<EvalResults> {
    let channels = bundle.manifest.classifier.resnet.in_channels;
    let size = bundle.manifest.recipe.input_size();
    let sets = load_test_sets(cfg, channels, size)?;
    let fashion = cfg.data_dir.join("fashion-mnist");
    let val_full = to_channels(fashion_mnist(&fashion, FashionSplit::Validation)?, channels)?;
    let val = EvalSet::subset(VAL_SET, &val_full, cfg.val_size, cfg.seed)?;
    let train_full = to_channels(fashion_mnist(&fashion, FashionSplit::Train)?, channels)?;
    let bank = EvalSet::subset(
        "fashion-mnist/train",
        &train_full,
        Some(cfg.bank_size),
        cfg.seed,
    )?;

    let classifier: &dyn Classifier = bundle.classifier.as_ref();
    let dev = &bundle.device;
    let batch = cfg.batch_size.max(1);
    let outputs = sets
        .iter()
        .map(|s| classify(classifier, &s.data, batch, dev))
        .collect::<Result<Vec<_>>>()?;
    let val_out = classify(classifier, &val.data, batch, dev)?;
    let bank_out = classify(classifier, &bank.data, batch, dev)?;

    let knn = Knn::fit(&bank_out.penultimate, cfg.knn_k.min(bank.data.len()))?;
    let (w, b) = fc_params(bundle)?;
    let dim = bank_out.penultimate.dim(1)?;
    let vim = Vim::fit(&bank_out.penultimate, &w, &b, Vim::default_dim(dim).max(1))?;
    let baselines = baseline_scores(&outputs, &val_out, &knn, &vim)?;

    let total_images: usize = sets.iter().map(|s| s.data.len()).sum();
    let classify_seconds: f64 = outputs.iter().map(|o| o.seconds).sum();
    let mut detectors = Vec::new();
    for b in &baselines {
        let (ind, oods) = b.per_set.split_first().ok_or_else(no_sets)?;
        let secs = classify_seconds + b.seconds;
        detectors.push(row(
            b.name.into(),
            DetectorKind::Baseline,
            None,
            metric_row(ind, oods)?,
            total_images as f64 / secs.max(1e-12),
            1.0,
        ));
    }

    let mut cache = ScoreCache::open(cache_path)?;
    let mut stats = CacheStats::default();
    let vs = variants(bundle.detector.recipe(), &cfg.variants)?;
    let mut scored = Vec::new();
    for v in &vs {
        let d = detector_for(bundle, v)?;
        // Only the bundle's own recipe is needed on the validation split (cascade thresholds).
        let with_val = v.id == "recipe";
        let n = total_images + if with_val { val.data.len() } else { 0 };
        let bar = progress(cfg.progress, n, &v.name);
        let mut per_set = Vec::new();
        for (s, o) in sets.iter().zip(&outputs) {
            per_set.push(diffguard_scores(
                &d,
                s,
                &o.predicted,
                &mut cache,
                batch,
                &bar,
                &mut stats,
            )?);
        }
        let val_scores = if with_val {
            diffguard_scores(
                &d,
                &val,
                &val_out.predicted,
                &mut cache,
                batch,
                &bar,
                &mut stats,
            )?
        } else {
            Vec::new()
        };
        bar.finish_and_clear();
        let all = per_set.iter().flatten();
        let secs: f64 = all.clone().map(|e| e.seconds).sum();
        let nfe = mean(all.map(|e| e.nfe as f64));
        let scores: Vec<Vec<f64>> = per_set
            .iter()
            .map(|s| s.iter().map(|e| e.score).collect())
            .collect();
        let (ind, oods) = scores.split_first().ok_or_else(no_sets)?;
        detectors.push(row(
            v.name.clone(),
            DetectorKind::DiffGuard,
            Some(d.fingerprint.clone()),
            metric_row(ind, oods)?,
            total_images as f64 / secs.max(1e-12),
            nfe,
        ));
        scored.push(VariantScores {
            name: v.name.clone(),
            fingerprint: d.fingerprint,
            per_set,
            val: val_scores,
        });
    }

    let primary = scored.first().ok_or_else(no_sets)?;
    detectors.extend(combinations(
        primary,
        &baselines,
        classify_seconds,
        total_images,
    )?);
    let gallery = gallery(bundle, &vs[0], &sets, &outputs, &primary.per_set, cfg)?;

    Ok(EvalResults {
        bundle: bundle.manifest.name.clone(),
        bundle_fingerprint: bundle.fingerprint.clone(),
        ind_set: IND_SET.into(),
        ood_sets: sets[1..].iter().map(|s| s.name.clone()).collect(),
        set_sizes: sets
            .iter()
            .map(|s| (s.name.clone(), s.data.len()))
            .collect(),
        validation_images: val.data.len(),
        bank_images: bank.data.len(),
        seed: cfg.seed,
        detectors,
        cache: stats,
        gallery,
    })
}

fn no_sets() -> EngineError {
    EngineError::InvalidInput("evaluation has no data sets".into())
}

/// The cascade (deployable) and the envelope (oracle) of the primary DiffGuard with each baseline.
fn combinations(
    dg: &VariantScores,
    baselines: &[BaselineScores],
    classify_seconds: f64,
    total_images: usize,
) -> Result<Vec<DetectorResult>> {
    let dg_scores: Vec<Vec<f64>> = dg
        .per_set
        .iter()
        .map(|s| s.iter().map(|e| e.score).collect())
        .collect();
    let dg_val: Vec<f64> = dg.val.iter().map(|e| e.score).collect();
    let all = || dg.per_set.iter().flatten();
    let dg_secs_per_image = mean(all().map(|e| e.seconds));
    let dg_nfe = mean(all().map(|e| e.nfe as f64));
    let (q_lo, q_hi) = DEFAULT_CASCADE_QUANTILES;
    let mut rows = Vec::new();
    for b in baselines {
        let cascade = Cascade::fit(&b.val, &dg_val, q_lo, q_hi)?;
        let combined = b
            .per_set
            .iter()
            .zip(&dg_scores)
            .map(|(bs, ds)| cascade.score(bs, ds))
            .collect::<Result<Vec<_>>>()?;
        // DiffGuard only runs on the baseline's uncertain band: charge it for those images.
        let routed = b
            .per_set
            .iter()
            .flatten()
            .filter(|&&s| cascade.needs_diffguard(s))
            .count() as f64
            / total_images.max(1) as f64;
        let secs = classify_seconds + b.seconds + routed * dg_secs_per_image * total_images as f64;
        let (ind, oods) = combined.split_first().ok_or_else(no_sets)?;
        rows.push(row(
            format!(
                "{} → {} cascade ({:.0}% routed)",
                b.name,
                dg.name,
                100.0 * routed
            ),
            DetectorKind::Cascade,
            Some(dg.fingerprint.clone()),
            metric_row(ind, oods)?,
            total_images as f64 / secs.max(1e-12),
            1.0 + routed * dg_nfe,
        ));
    }
    for b in baselines {
        let (b_ind, b_oods) = b.per_set.split_first().ok_or_else(no_sets)?;
        let (d_ind, d_oods) = dg_scores.split_first().ok_or_else(no_sets)?;
        let mut metrics = Vec::new();
        let mut curves = Vec::new();
        for (b_ood, d_ood) in b_oods.iter().zip(d_oods) {
            let env = threshold_envelope(d_ind, b_ind, d_ood, b_ood, ENVELOPE_GRID)?;
            metrics.push(OodMetrics {
                auroc: env.auroc,
                fpr_at_95: env.fpr_at_95,
                aupr_in: f64::NAN,
                aupr_out: f64::NAN,
            });
            curves.push((env.fpr, env.tpr));
        }
        rows.push(row(
            format!("{}+{} (envelope oracle, eval-only)", dg.name, b.name),
            DetectorKind::Oracle,
            Some(dg.fingerprint.clone()),
            (metrics, curves),
            f64::NAN,
            1.0 + dg_nfe,
        ));
    }
    Ok(rows)
}

/// Per set, the `gallery_per_end` most and least in-distribution images under the bundle's
/// recipe, re-run to get their synthesis (seeded per image, so it is the scored one).
fn gallery(
    bundle: &Bundle,
    v: &Variant,
    sets: &[EvalSet],
    outputs: &[ClassifierOutputs],
    scores: &[Vec<CachedScore>],
    cfg: &EvalConfig,
) -> Result<Vec<GalleryItem>> {
    let d = detector_for(bundle, v)?;
    let mut items = Vec::new();
    for ((set, out), sc) in sets.iter().zip(outputs).zip(scores) {
        let mut order: Vec<usize> = (0..sc.len()).collect();
        order.sort_by(|&a, &b| sc[b].score.total_cmp(&sc[a].score));
        let k = cfg.gallery_per_end.min(order.len() / 2);
        let picks: Vec<(usize, bool)> = order[..k]
            .iter()
            .map(|&i| (i, true))
            .chain(order[order.len() - k..].iter().rev().map(|&i| (i, false)))
            .collect();
        if picks.is_empty() {
            continue;
        }
        let idx: Vec<usize> = picks.iter().map(|p| p.0).collect();
        let x = set
            .data
            .batch_tensor(&idx, PixelRange::MinusOneOne, &d.device)?;
        let labels: Vec<LabelId> = idx.iter().map(|&i| out.predicted[i]).collect();
        let results = d.detector.score(&x, Some(&labels))?;
        for (j, ((i, top), r)) in picks.iter().zip(&results).enumerate() {
            let label = bundle
                .manifest
                .labels
                .get(r.label.0 as usize)
                .cloned()
                .unwrap_or_else(|| r.label.0.to_string());
            items.push(GalleryItem {
                set: set.name.clone(),
                index: set.indices[*i],
                score: sc[*i].score,
                label,
                top: *top,
                input: x.get(j)?,
                synthesis: r.synthesis.clone(),
                reference: r.reference.clone(),
            });
        }
    }
    Ok(items)
}
