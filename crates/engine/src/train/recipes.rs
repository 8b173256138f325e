//! The project's training recipes on Fashion-MNIST, shared by the `train_*` examples and the
//! `diffguard train` command: the class-conditional pixel DDPM, the small ResNet classifier, and
//! the latent variant (a continuous f=4 autoencoder, then a class-conditional DDPM on its 7×7×3
//! latents — the paper's LDM recipe in miniature).
//!
//! An output folder holds `checkpoint/` (resumable state), `model.safetensors` (EMA weights under
//! the model's own parameter names), `config.json` (the architecture) and `train-report.json`
//! (what the model card quotes: steps, batch, wall time, loss curve, accuracy).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

use super::checkpoint::{LossPoint, export_weights};
use super::data::{Augment, InMemoryDataset};
use super::objective::{
    AutoencoderObjective, ClassifierObjective, DiffusionObjective, LinearBetas, Objective, correct,
};
use super::trainer::{LrSchedule, RunOptions, StopReason, TrainConfig, Trainer};
use super::{AdamWParams, seeded_var_builder};
use crate::data::{Dataset, FashionSplit, PixelRange, Pixels, fashion_mnist};
use crate::models::pixel_unet::{PixelUNet, PixelUNetConfig};
use crate::models::resnet::{ResNet, ResNetConfig};
use crate::models::vq::{VqConfig, VqModel, check_latent_shape};
use crate::{Autoencoder, EngineError, LabelId, Result};

/// What every recipe run takes from the command line.
#[derive(Debug, Clone)]
pub struct RecipeArgs {
    pub out: PathBuf,
    /// The `fashion-mnist` folder (IDX gzip files).
    pub fashion_dir: PathBuf,
    pub seed: u64,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub budget: Option<Duration>,
    pub checkpoint_every: Duration,
    pub progress: bool,
    /// Train on only the first N training images (smoke runs).
    pub train_limit: Option<usize>,
    /// Evaluate on only the first N test images (smoke runs).
    pub test_limit: Option<usize>,
}

/// The summary written to `train-report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub model: String,
    pub parameters: usize,
    pub train_images: usize,
    pub batch: usize,
    pub step: u64,
    pub total_steps: u64,
    pub stopped_by: String,
    /// Summed over all resumed runs.
    pub wall_secs: f64,
    pub threads: usize,
    /// `cpu` or `cuda:N`: the device of the run that wrote this report.
    pub device: String,
    pub loss_log: Vec<LossPoint>,
    /// Fraction of the official 10k test images classified correctly by the exported (EMA)
    /// weights (classifier only).
    pub test_accuracy: Option<f64>,
    /// The same for the raw (non-averaged) weights.
    pub test_accuracy_raw: Option<f64>,
    /// Mean PSNR (dB, \[0,1\] scale) of the exported weights' reconstructions of the test images
    /// (autoencoder only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_recon_psnr: Option<f64>,
}

/// The `fashion-mnist` data folder: `$DIFFGUARD_DATA/fashion-mnist`, else the system package's.
pub fn default_fashion_dir() -> PathBuf {
    let own = crate::data::data_dir().join("fashion-mnist");
    if own.exists() {
        own
    } else {
        PathBuf::from("/usr/share/datasets/fashion-mnist")
    }
}

/// A loader dataset as the trainer's f32 store in `range`.
pub fn in_memory(ds: &Dataset, range: PixelRange) -> Result<InMemoryDataset> {
    let (scale, offset) = match range {
        PixelRange::ZeroOne => (1.0f32, 0.0f32),
        PixelRange::MinusOneOne => (2.0, -1.0),
    };
    let pixels: Vec<f32> = match ds.pixels() {
        Pixels::U8(v) => v
            .iter()
            .map(|&p| f32::from(p) / 255.0 * scale + offset)
            .collect(),
        Pixels::F32(v) => v.iter().map(|&p| p * scale + offset).collect(),
    };
    let [c, h, w] = ds.image_shape();
    let labels = ds.labels().iter().map(|l| l.0).collect();
    InMemoryDataset::new(pixels, labels, (c, h, w))
}

fn train_set(args: &RecipeArgs, range: PixelRange) -> Result<InMemoryDataset> {
    let ds = in_memory(
        &fashion_mnist(&args.fashion_dir, FashionSplit::Train)?,
        range,
    )?;
    Ok(match args.train_limit {
        Some(n) => ds.truncate(n),
        None => ds,
    })
}

/// The first CUDA GPU in a `--features cuda` build (when one is present), else the CPU.
pub fn training_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        Ok(Device::cuda_if_available(0)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(Device::Cpu)
    }
}

fn run_options(args: &RecipeArgs) -> RunOptions {
    RunOptions {
        budget: args.budget,
        checkpoint_dir: Some(args.out.join("checkpoint")),
        checkpoint_every: args.checkpoint_every,
        stop_at_step: None,
        progress: args.progress,
    }
}

fn parameter_count(varmap: &VarMap) -> usize {
    varmap.all_vars().iter().map(|v| v.elem_count()).sum()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| EngineError::Format {
        path: path.display().to_string(),
        what: "JSON",
        detail: e.to_string(),
    })?;
    std::fs::write(path, bytes).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Training settings of the pixel DDPM (DDPM/ADM defaults scaled to a small model).
pub fn diffusion_config(args: &RecipeArgs) -> TrainConfig {
    TrainConfig {
        seed: args.seed,
        batch_size: args.batch,
        total_steps: args.steps,
        optimizer: AdamWParams {
            lr: args.lr,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            ..AdamWParams::default()
        },
        lr_schedule: LrSchedule::Warmup { warmup: 500 },
        ema_decay: 0.999,
        // Left-right flips keep a garment's class; shifts would teach off-centre garments.
        augment: Augment {
            hflip: true,
            max_shift: 0,
            fill: -1.0,
        },
        log_every: 50,
    }
}

/// The pixel DDPM objective: ε-MSE, T = 1000 linear β, 10% label dropout to the null label.
pub fn diffusion_objective(model: PixelUNet) -> DiffusionObjective<impl super::objective::EpsFn> {
    let null = model.config().num_classes as u32;
    DiffusionObjective {
        schedule: LinearBetas::ddpm(),
        null_label: LabelId(null),
        p_uncond: 0.1,
        forward: move |x: &Tensor, t: &[u32], labels: &[LabelId]| {
            let ids: Vec<u32> = labels.iter().map(|l| l.0).collect();
            model.forward(x, t, &ids)
        },
    }
}

fn diffusion_trainer(
    cfg: TrainConfig,
    unet: &PixelUNetConfig,
    data: InMemoryDataset,
    opts: RunOptions,
) -> Result<(Trainer<impl Objective + use<>>, usize)> {
    let device = training_device()?;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, cfg.seed, DType::F32, &device);
    let model = PixelUNet::new(vb, unet.clone())?;
    let params = parameter_count(&vm);
    let objective = diffusion_objective(model);
    let t = Trainer::new(vm, cfg, opts, data, objective, device)?;
    Ok((t, params))
}

/// Trains (or resumes) the pixel DDPM into `args.out`.
pub fn train_diffusion(args: &RecipeArgs, unet: &PixelUNetConfig) -> Result<TrainReport> {
    let data = train_set(args, PixelRange::MinusOneOne)?;
    run_diffusion("pixel-ddpm", args, diffusion_config(args), unet, data)
}

/// Trains a denoiser on `data` and writes the output folder (both priors).
fn run_diffusion(
    model: &str,
    args: &RecipeArgs,
    cfg: TrainConfig,
    unet: &PixelUNetConfig,
    data: InMemoryDataset,
) -> Result<TrainReport> {
    let n = data.len();
    let (mut trainer, parameters) = diffusion_trainer(cfg, unet, data, run_options(args))?;
    let summary = trainer.run()?;
    export_weights(&args.out.join("model.safetensors"), trainer.ema_weights())?;
    write_json(&args.out.join("config.json"), unet)?;
    let report = report(model, &trainer, parameters, n, summary.stop, [None, None]);
    write_json(&args.out.join("train-report.json"), &report)?;
    Ok(report)
}

fn report<O: Objective>(
    model: &str,
    trainer: &Trainer<O>,
    parameters: usize,
    train_images: usize,
    stop: StopReason,
    accuracy: [Option<f64>; 2],
) -> TrainReport {
    let state = trainer.state();
    let cfg = trainer.config();
    TrainReport {
        model: model.into(),
        parameters,
        train_images,
        batch: cfg.batch_size,
        step: state.step,
        total_steps: cfg.total_steps,
        stopped_by: format!("{stop:?}"),
        wall_secs: state.elapsed_secs,
        threads: candle_core::utils::get_num_threads(),
        device: crate::bundle::device_label(trainer.device()),
        loss_log: state.loss_log.clone(),
        test_accuracy: accuracy[0],
        test_accuracy_raw: accuracy[1],
        test_recon_psnr: None,
    }
}

/// Seconds per optimiser step at one batch size.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub batch: usize,
    pub secs_per_step: f64,
    pub images_per_sec: f64,
    /// CPU seconds (all threads) per step: unlike wall time, stable on a loaded machine.
    pub cpu_secs_per_step: Option<f64>,
}

/// CPU time of this process (user + system) from `/proc/self/stat`, where there is one.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // Linux reports in USER_HZ, 100 on every mainstream architecture.
    Some(ticks / 100.0)
}

/// Times `steps` training steps (after one warm-up step) for each batch size, with trainers
/// `make` builds on `data` from `args` at that batch size.
pub fn profile<O: Objective>(
    args: &RecipeArgs,
    data: &InMemoryDataset,
    batches: &[usize],
    steps: u64,
    mut make: impl FnMut(&RecipeArgs, InMemoryDataset) -> Result<Trainer<O>>,
) -> Result<Vec<StepTiming>> {
    batches
        .iter()
        .map(|&b| {
            let a = RecipeArgs {
                batch: b,
                ..args.clone()
            };
            let mut t = make(&a, data.clone())?;
            t.train_step()?;
            let (start, cpu0) = (Instant::now(), process_cpu_secs());
            for _ in 0..steps {
                t.train_step()?;
            }
            let n = steps.max(1) as f64;
            let s = start.elapsed().as_secs_f64() / n;
            let cpu = process_cpu_secs().zip(cpu0).map(|(b, a)| (b - a) / n);
            Ok(StepTiming {
                batch: b,
                secs_per_step: s,
                images_per_sec: b as f64 / s,
                cpu_secs_per_step: cpu,
            })
        })
        .collect()
}

/// Items for two steps of the largest batch.
fn profile_len(batches: &[usize]) -> usize {
    batches.iter().copied().max().unwrap_or(1).max(1) * 2
}

/// Enough real training images for two steps of the largest batch.
fn profile_set(args: &RecipeArgs, range: PixelRange, batches: &[usize]) -> Result<InMemoryDataset> {
    Ok(train_set(args, range)?.truncate(profile_len(batches)))
}

/// Step timings of the pixel DDPM on (a prefix of) the real training set.
pub fn profile_diffusion(
    args: &RecipeArgs,
    unet: &PixelUNetConfig,
    batches: &[usize],
    steps: u64,
) -> Result<Vec<StepTiming>> {
    let data = profile_set(args, PixelRange::MinusOneOne, batches)?;
    profile(args, &data, batches, steps, |a, d| {
        let opts = RunOptions::default();
        Ok(diffusion_trainer(diffusion_config(a), unet, d, opts)?.0)
    })
}

/// Loads weights exported by a recipe into a builder for the model's constructor.
pub fn load_exported(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = candle_core::safetensors::load(path, device)?;
    Ok(VarBuilder::from_tensors(tensors, DType::F32, device))
}

/// The Fashion-MNIST classifier: a BasicBlock ResNet with a 3×3 stem, one stage per width
/// (stages after the first halve the resolution), FMNIST mean/std normalisation inside.
pub fn fashion_resnet(widths: Vec<usize>, layers: Vec<usize>) -> ResNetConfig {
    ResNetConfig::small(1, widths, layers, 10, vec![0.2860], vec![0.3530])
}

/// Training settings of the classifier: AdamW with warm-up and cosine decay, flips and ±2 px
/// shifts (the usual Fashion-MNIST augmentation).
pub fn classifier_config(args: &RecipeArgs) -> TrainConfig {
    TrainConfig {
        seed: args.seed,
        batch_size: args.batch,
        total_steps: args.steps,
        optimizer: AdamWParams {
            lr: args.lr,
            weight_decay: 0.05,
            max_grad_norm: None,
            ..AdamWParams::default()
        },
        lr_schedule: LrSchedule::WarmupCosine {
            warmup: 200,
            min_ratio: 0.01,
        },
        ema_decay: 0.998,
        augment: Augment {
            hflip: true,
            max_shift: 2,
            fill: 0.0,
        },
        log_every: 50,
    }
}

fn classifier_trainer(
    args: &RecipeArgs,
    net: &ResNetConfig,
    data: InMemoryDataset,
    opts: RunOptions,
) -> Result<(Trainer<impl Objective + use<>>, usize)> {
    let device = training_device()?;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, args.seed, DType::F32, &device);
    let model = ResNet::new(vb, net)?;
    let params = parameter_count(&vm);
    let objective = ClassifierObjective {
        forward: move |x: &Tensor| Ok(model.forward_t(x, true)?.logits),
    };
    let t = Trainer::new(vm, classifier_config(args), opts, data, objective, device)?;
    Ok((t, params))
}

/// Test-set accuracy of `weights` (eval-mode BatchNorm).
pub fn classifier_accuracy(
    weights: &std::collections::BTreeMap<String, Tensor>,
    net: &ResNetConfig,
    test: &Dataset,
) -> Result<f64> {
    let device = weights
        .values()
        .next()
        .map_or(Device::Cpu, |t| t.device().clone());
    let map = weights
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let model = ResNet::new(VarBuilder::from_tensors(map, DType::F32, &device), net)?;
    let mut right = 0;
    let all: Vec<usize> = (0..test.len()).collect();
    for chunk in all.chunks(500) {
        let x = test.batch_tensor(chunk, PixelRange::ZeroOne, &device)?;
        let labels: Vec<LabelId> = chunk.iter().map(|&i| test.labels()[i]).collect();
        right += correct(&model.forward_t(&x, false)?.logits, &labels)?;
    }
    Ok(right as f64 / test.len().max(1) as f64)
}

/// Trains (or resumes) the classifier into `args.out` and measures it on the test split.
pub fn train_classifier(args: &RecipeArgs, net: &ResNetConfig) -> Result<TrainReport> {
    let data = train_set(args, PixelRange::ZeroOne)?;
    let n = data.len();
    let (mut trainer, parameters) = classifier_trainer(args, net, data, run_options(args))?;
    let summary = trainer.run()?;
    export_weights(&args.out.join("model.safetensors"), trainer.ema_weights())?;
    write_json(&args.out.join("config.json"), net)?;
    let mut test = fashion_mnist(&args.fashion_dir, FashionSplit::Test)?;
    if let Some(n) = args.test_limit {
        let keep: Vec<usize> = (0..n.min(test.len())).collect();
        test = test.select(&keep)?;
    }
    let acc = [
        Some(classifier_accuracy(trainer.ema_weights(), net, &test)?),
        Some(classifier_accuracy(&trainer.raw_weights()?, net, &test)?),
    ];
    let report = report("resnet", &trainer, parameters, n, summary.stop, acc);
    write_json(&args.out.join("train-report.json"), &report)?;
    Ok(report)
}

/// Step timings of the classifier on (a prefix of) the real training set.
pub fn profile_classifier(
    args: &RecipeArgs,
    net: &ResNetConfig,
    batches: &[usize],
    steps: u64,
) -> Result<Vec<StepTiming>> {
    let data = profile_set(args, PixelRange::ZeroOne, batches)?;
    profile(args, &data, batches, steps, |a, d| {
        Ok(classifier_trainer(a, net, d, RunOptions::default())?.0)
    })
}

/// Training settings of the autoencoder: the pixel DDPM's (AdamW, grad clip, EMA 0.999, flips)
/// with a cosine decay after the warm-up, since its runs have a fixed length.
pub fn autoencoder_config(args: &RecipeArgs) -> TrainConfig {
    TrainConfig {
        lr_schedule: LrSchedule::WarmupCosine {
            warmup: 200,
            min_ratio: 0.05,
        },
        ..diffusion_config(args)
    }
}

/// Weight of the latent's mean square in the autoencoder loss: small enough that it costs
/// ≪ 0.1 dB of reconstruction, large enough to pin the latent's scale.
pub const LATENT_PENALTY: f64 = 1e-4;

fn autoencoder_trainer(
    args: &RecipeArgs,
    vq: &VqConfig,
    data: InMemoryDataset,
    opts: RunOptions,
) -> Result<(Trainer<impl Objective + use<>>, usize)> {
    if vq.n_embed != 0 {
        return Err(EngineError::Config(
            "the autoencoder recipe trains continuous autoencoders only (n_embed = 0)".into(),
        ));
    }
    let device = training_device()?;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, args.seed, DType::F32, &device);
    let model = VqModel::new(vb, vq.unscaled())?;
    let params = parameter_count(&vm);
    let objective = AutoencoderObjective {
        latent_weight: LATENT_PENALTY,
        forward: move |x: &Tensor| {
            let z = model.encode_unscaled(x)?;
            Ok((model.decode_quantized(&z)?, z))
        },
    };
    let t = Trainer::new(vm, autoencoder_config(args), opts, data, objective, device)?;
    Ok((t, params))
}

/// The first `first` images of `ds` pushed through `f` in chunks of 500 on `device`, one result
/// per chunk.
fn map_dataset<T>(
    ds: &InMemoryDataset,
    first: usize,
    device: &Device,
    mut f: impl FnMut(&Tensor) -> Result<T>,
) -> Result<Vec<T>> {
    let all: Vec<usize> = (0..ds.len().min(first)).collect();
    let mut rng = super::rng::derived(0, super::rng::Purpose::Step(0));
    all.chunks(500)
        .map(|idx| {
            let (x, _) = ds.batch(idx, &Augment::none(), &mut rng, device)?;
            f(&x)
        })
        .collect()
}

/// Training images whose latents set the autoencoder's scale factor.
const SCALE_SAMPLE: usize = 5_000;

/// Loads an autoencoder written by [`train_autoencoder`] (`config.json` + `model.safetensors`).
pub fn load_autoencoder(dir: &Path, device: &Device) -> Result<VqModel> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let config: VqConfig = serde_json::from_str(&text).map_err(|e| EngineError::Format {
        path: path.display().to_string(),
        what: "autoencoder config",
        detail: e.to_string(),
    })?;
    VqModel::new(
        load_exported(&dir.join("model.safetensors"), device)?,
        config,
    )
}

/// Trains (or resumes) the continuous autoencoder into `args.out`. At the end it sets the
/// config's `scale_factor` to 1/σ of the training latents (LDM's rule for its KL first stages)
/// and measures the reconstruction PSNR on the test split.
pub fn train_autoencoder(args: &RecipeArgs, vq: &VqConfig) -> Result<TrainReport> {
    let data = train_set(args, PixelRange::MinusOneOne)?;
    let n = data.len();
    let (mut trainer, parameters) = autoencoder_trainer(args, vq, data, run_options(args))?;
    let summary = trainer.run()?;
    let weights = args.out.join("model.safetensors");
    export_weights(&weights, trainer.ema_weights())?;
    let device = trainer.device().clone();
    let model = VqModel::new(load_exported(&weights, &device)?, vq.unscaled())?;
    let z = map_dataset(trainer.data(), SCALE_SAMPLE, &device, |x| model.encode(x))?;
    let std = Tensor::cat(&z, 0)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .var(0)?
        .sqrt()?;
    let config = VqConfig {
        scale_factor: 1.0 / std.to_scalar::<f64>()?,
        ..vq.unscaled()
    };
    write_json(&args.out.join("config.json"), &config)?;
    let test = in_memory(
        &fashion_mnist(&args.fashion_dir, FashionSplit::Test)?,
        PixelRange::MinusOneOne,
    )?;
    let psnr: Vec<f64> = map_dataset(&test, args.test_limit.unwrap_or(2_000), &device, |x| {
        let r = model.decode(&model.encode(x)?)?.clamp(-1f32, 1f32)?;
        crate::eval::quality::mse_psnr(&r, x)
    })?
    .into_iter()
    .flatten()
    .map(|(_, p)| p)
    .collect();
    let mut report = report(
        "autoencoder",
        &trainer,
        parameters,
        n,
        summary.stop,
        [None, None],
    );
    report.test_recon_psnr = Some(psnr.iter().sum::<f64>() / psnr.len().max(1) as f64);
    write_json(&args.out.join("train-report.json"), &report)?;
    Ok(report)
}

/// The latent prior's training settings: the pixel DDPM's without random flips. A flipped latent
/// is not the latent of the flipped image (the encoder's down-sampling pads one side only), so the
/// mirrored images are encoded into the training set instead.
pub fn latent_diffusion_config(args: &RecipeArgs) -> TrainConfig {
    TrainConfig {
        augment: Augment::none(),
        ..diffusion_config(args)
    }
}

/// The training images and their mirrors, encoded once by the autoencoder in `ae_dir` (scaled
/// latents, what the latent DDPM models).
pub fn encoded_train_set(args: &RecipeArgs, ae_dir: &Path) -> Result<InMemoryDataset> {
    let device = training_device()?;
    encode_train_set(args, &load_autoencoder(ae_dir, &device)?, &device)
}

fn encode_train_set(args: &RecipeArgs, ae: &VqModel, device: &Device) -> Result<InMemoryDataset> {
    let images = train_set(args, PixelRange::MinusOneOne)?.with_mirrors();
    let z = Tensor::cat(
        &map_dataset(&images, images.len(), device, |x| ae.encode(x))?,
        0,
    )?;
    let (_, c, h, w) = z.dims4()?;
    let values = z.flatten_all()?.to_vec1::<f32>()?;
    InMemoryDataset::new(values, images.labels().to_vec(), (c, h, w))
}

/// Trains (or resumes) the class-conditional latent DDPM on the latents of the autoencoder in
/// `ae_dir` into `args.out`. A UNet that does not take those latents is refused before the
/// training set is encoded.
pub fn train_latent_diffusion(
    args: &RecipeArgs,
    ae_dir: &Path,
    unet: &PixelUNetConfig,
) -> Result<TrainReport> {
    let device = training_device()?;
    let ae = load_autoencoder(ae_dir, &device)?;
    check_latent_shape(ae.config(), unet).map_err(EngineError::Config)?;
    let data = encode_train_set(args, &ae, &device)?;
    run_diffusion(
        "latent-ddpm",
        args,
        latent_diffusion_config(args),
        unet,
        data,
    )
}

/// Step timings of the autoencoder on (a prefix of) the real training set.
pub fn profile_autoencoder(
    args: &RecipeArgs,
    vq: &VqConfig,
    batches: &[usize],
    steps: u64,
) -> Result<Vec<StepTiming>> {
    let data = profile_set(args, PixelRange::MinusOneOne, batches)?;
    profile(args, &data, batches, steps, |a, d| {
        Ok(autoencoder_trainer(a, vq, d, RunOptions::default())?.0)
    })
}

/// Step timings of the latent DDPM. Without an autoencoder the latents are seeded N(0, 1) values
/// of the UNet's input shape: a step's cost does not depend on the values.
pub fn profile_latent_diffusion(
    args: &RecipeArgs,
    ae_dir: Option<&Path>,
    unet: &PixelUNetConfig,
    batches: &[usize],
    steps: u64,
) -> Result<Vec<StepTiming>> {
    let largest = profile_len(batches);
    let data = match ae_dir {
        Some(dir) => encoded_train_set(
            &RecipeArgs {
                train_limit: Some(largest),
                ..args.clone()
            },
            dir,
        )?,
        None => {
            let (c, s) = (unet.in_channels, unet.image_size);
            let z = crate::eval::quality::seeded_noise(
                &[largest * c * s * s],
                args.seed,
                &Device::Cpu,
            )?;
            let labels = (0..largest)
                .map(|i| (i % unet.num_classes.max(1)) as u32)
                .collect();
            InMemoryDataset::new(z.to_vec1()?, labels, (c, s, s))?
        }
    };
    profile(args, &data, batches, steps, |a, d| {
        let opts = RunOptions::default();
        Ok(diffusion_trainer(latent_diffusion_config(a), unet, d, opts)?.0)
    })
}
