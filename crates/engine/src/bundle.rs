//! A detector bundle: one folder holding the project's own models, the recipe that runs them and
//! (optionally) calibrated thresholds, described by `bundle.json`. It is what `diffguard serve`
//! loads by default and what `diffguard train` / `calibrate` write.
//!
//! ```text
//! models/fashion-mnist/
//!   bundle.json            names, architectures, recipe, file names
//!   classifier.safetensors the classifier under protection (small ResNet)
//!   diffusion.safetensors  the class-conditional pixel DDPM (EMA weights)
//!   thresholds.json        from `diffguard calibrate`, stamped with the detector fingerprint
//! ```
//!
//! A latent bundle (the default, [`DEFAULT_BUNDLE`]) adds an `autoencoder` entry (the project's
//! continuous f=4 autoencoder) and runs the `ldm` recipe: its denoiser is the same
//! class-conditional UNet on the autoencoder's latents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::eval::calibrate::ThresholdsFile;
use crate::models::diffusers;
use crate::models::load::{Checkpoint, LoadOptions};
use crate::models::pixel_unet::{PixelUNet, PixelUNetConfig};
use crate::models::resnet::{ResNet, ResNetConfig};
use crate::models::vq::{VqConfig, VqModel, check_latent_shape};
use crate::ops::resize::bilinear_resize;
use crate::pipeline::{DiffGuard, ImageResult, Models};
use crate::recipe::{Recipe, fingerprint};
use crate::{EngineError, LabelId, Result};

/// The manifest file inside a bundle folder.
pub const MANIFEST: &str = "bundle.json";

/// The project's default bundle, relative to the workspace root: every network in it was trained
/// by the project's Rust trainer (`models/README.md`). `diffguard serve`, the demo, the example
/// upstream and the engine's examples load it unless told otherwise.
pub const DEFAULT_BUNDLE: &str = "models/fashion-mnist-latent";

/// `bundle.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Short name shown in logs and reports.
    pub name: String,
    /// Class names, index = label id.
    pub labels: Vec<String>,
    pub classifier: ClassifierEntry,
    pub denoiser: DenoiserEntry,
    /// The first stage of a latent bundle; absent for a pixel prior.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoencoder: Option<AutoencoderEntry>,
    pub recipe: Recipe,
    /// Thresholds file relative to the bundle; absent until calibrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierEntry {
    pub weights: String,
    pub resnet: ResNetConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenoiserEntry {
    pub weights: String,
    pub pixel_unet: PixelUNetConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoencoderEntry {
    pub weights: String,
    pub vq: VqConfig,
}

impl Manifest {
    /// Reads and parses `dir/bundle.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| EngineError::Format {
            path: path.display().to_string(),
            what: "bundle manifest",
            detail: e.to_string(),
        })
    }

    /// Writes `dir/bundle.json` (pretty, so reviews can diff it).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| EngineError::Config(format!("bundle manifest: {e}")))?;
        std::fs::write(&path, text + "\n").map_err(|source| EngineError::Io {
            path: path.display().to_string(),
            source,
        })
    }
}

impl Manifest {
    /// A tiny 10-class bundle (two-stage small ResNet, two-level pixel UNet) whose recipe runs
    /// `ddim_steps` DDIM steps, `ddim_steps − early_stop_steps` of them inverted: fast enough for
    /// tests and smoke runs on untrained weights (see [`write_untrained`]).
    pub fn tiny(ddim_steps: usize, early_stop_steps: usize) -> Self {
        Self {
            name: "tiny".into(),
            labels: (0..10).map(|i| format!("class{i}")).collect(),
            classifier: ClassifierEntry {
                weights: "classifier.safetensors".into(),
                resnet: ResNetConfig::small(
                    1,
                    vec![8, 16],
                    vec![1, 1],
                    10,
                    vec![0.286],
                    vec![0.353],
                ),
            },
            denoiser: DenoiserEntry {
                weights: "diffusion.safetensors".into(),
                pixel_unet: PixelUNetConfig {
                    image_size: 28,
                    in_channels: 1,
                    model_channels: 32,
                    channel_mult: vec![1, 2],
                    num_res_blocks: 1,
                    attention_ds: vec![2],
                    num_head_channels: 32,
                    num_classes: 10,
                },
            },
            autoencoder: None,
            recipe: Recipe::PixelCfg(crate::recipe::PixelCfgRecipe {
                ddim_steps,
                early_stop_steps,
                ..Default::default()
            }),
            thresholds: None,
        }
    }

    /// [`Self::tiny`] as a latent bundle: the project's f=4 autoencoder layout (28 → 7×7×3) and a
    /// one-level latent UNet, run by the `ldm` recipe with `ddim_steps` DDIM steps (linear β, no
    /// DSG mask, logits-L1 against the input).
    pub fn tiny_latent(ddim_steps: usize) -> Self {
        let mut m = Self::tiny(ddim_steps, 0);
        m.name = "tiny-latent".into();
        m.denoiser.pixel_unet = PixelUNetConfig {
            model_channels: 32,
            num_res_blocks: 1,
            ..PixelUNetConfig::fashion_mnist_latent()
        };
        m.autoencoder = Some(AutoencoderEntry {
            weights: "autoencoder.safetensors".into(),
            vq: VqConfig::fashion_mnist(),
        });
        m.recipe = Recipe::Ldm(crate::recipe::LdmRecipe::own_latent(ddim_steps, 28));
        m
    }
}

/// A loaded bundle: the runnable detector, its fingerprint and its thresholds.
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub detector: DiffGuard,
    pub classifier: Arc<ResNet>,
    /// The diffusion prior (also inside `detector`), for measuring it on its own.
    pub denoiser: Arc<PixelUNet>,
    /// The latent bundle's first stage (also inside `detector`).
    pub autoencoder: Option<Arc<VqModel>>,
    /// Recipe + weight hashes: what a thresholds file must be stamped with.
    pub fingerprint: String,
    /// blake3 of each network's weights file, by role.
    weight_hashes: Vec<(&'static str, String)>,
    pub thresholds: Option<ThresholdsFile>,
    /// Where the models run.
    pub device: Device,
}

impl Bundle {
    /// Loads every model of the bundle on `device`, checking each checkpoint against its
    /// architecture, and the thresholds file against the detector fingerprint.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Self::load(dir, device, true)
    }

    /// [`Self::open`] without reading the thresholds file: what `calibrate` needs, since the old
    /// thresholds may belong to weights that have since been retrained.
    pub fn open_uncalibrated(dir: &Path, device: &Device) -> Result<Self> {
        Self::load(dir, device, false)
    }

    fn load(dir: &Path, device: &Device, with_thresholds: bool) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        if manifest.labels.len() != manifest.classifier.resnet.num_classes {
            return Err(EngineError::Config(format!(
                "{}: {} labels but the classifier has {} classes",
                dir.join(MANIFEST).display(),
                manifest.labels.len(),
                manifest.classifier.resnet.num_classes
            )));
        }
        let (classifier, classifier_path) = classifier_of(dir, &manifest, device)?;
        let classifier = Arc::new(classifier);
        let opts = LoadOptions::new(DType::F32, device);
        let (denoiser, denoiser_path) = denoiser_of(dir, &manifest, &opts)?;
        let denoiser = Arc::new(denoiser);
        let mut hashes = vec![
            ("classifier", hash_file(&classifier_path)?),
            ("denoiser", hash_file(&denoiser_path)?),
        ];
        let autoencoder = match &manifest.autoencoder {
            Some(entry) => {
                check_latent_shape(&entry.vq, &manifest.denoiser.pixel_unet).map_err(|m| {
                    EngineError::Config(format!("{}: {m}", dir.join(MANIFEST).display()))
                })?;
                let path = dir.join(&entry.weights);
                let vq = Checkpoint::open(&path)?
                    .load(&opts, |vb| VqModel::new(vb, entry.vq.clone()))?;
                hashes.push(("autoencoder", hash_file(&path)?));
                Some(Arc::new(vq))
            }
            None => None,
        };
        let fingerprint = fingerprint_of(&manifest.recipe, &hashes)?;
        let thresholds = match &manifest.thresholds {
            Some(file) if with_thresholds => {
                Some(ThresholdsFile::load(&dir.join(file), &fingerprint)?)
            }
            _ => None,
        };
        let models = Models {
            denoiser: denoiser.clone(),
            classifier: classifier.clone(),
            autoencoder: autoencoder
                .clone()
                .map(|a| a as Arc<dyn crate::Autoencoder>),
            dists: None,
        };
        let detector = DiffGuard::new(manifest.recipe.clone(), models)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            detector,
            classifier,
            denoiser,
            autoencoder,
            fingerprint,
            weight_hashes: hashes,
            thresholds,
            device: device.clone(),
        })
    }
}

impl Bundle {
    /// The fingerprint of `recipe` run on this bundle's networks (evaluation variants).
    pub fn fingerprint_for(&self, recipe: &Recipe) -> Result<String> {
        fingerprint_of(recipe, &self.weight_hashes)
    }
}

fn fingerprint_of(recipe: &Recipe, hashes: &[(&'static str, String)]) -> Result<String> {
    let named: Vec<(&str, &str)> = hashes.iter().map(|(k, h)| (*k, h.as_str())).collect();
    fingerprint(recipe, &named)
}

/// The bundle's classifier alone, f32 on `device` (e.g. to serve it as a model), with the path of
/// its weights.
pub fn open_classifier(dir: &Path, device: &Device) -> Result<(ResNet, PathBuf)> {
    classifier_of(dir, &Manifest::read(dir)?, device)
}

fn classifier_of(dir: &Path, manifest: &Manifest, device: &Device) -> Result<(ResNet, PathBuf)> {
    let path = dir.join(&manifest.classifier.weights);
    let net = ResNet::load(&path, &manifest.classifier.resnet, DType::F32, device)?;
    Ok((net, path))
}

/// Decoded pixels as a client sent them: row-major, `channels` interleaved bytes per pixel.
#[derive(Debug, Clone, Copy)]
pub struct RawImage<'a> {
    pub width: u32,
    pub height: u32,
    /// 1 (gray) or 3 (RGB).
    pub channels: u8,
    pub pixels: &'a [u8],
}

impl Bundle {
    /// Scores client images against the labels the classifier predicted. Each image is brought to
    /// the model's channels (luma for gray models) and input size (bilinear), then all valid images
    /// run as one batch. One result per image, in order; a bad image fails alone.
    pub fn score_images(
        &self,
        images: &[RawImage<'_>],
        labels: &[LabelId],
    ) -> Vec<Result<ImageResult>> {
        if images.len() != labels.len() {
            let msg = format!("{} images but {} labels", images.len(), labels.len());
            return images
                .iter()
                .map(|_| Err(EngineError::InvalidInput(msg.clone())))
                .collect();
        }
        let prepared: Vec<Result<Tensor>> = images.iter().map(|im| self.prepare(im)).collect();
        let ok: Vec<usize> = (0..images.len()).filter(|&i| prepared[i].is_ok()).collect();
        let batch = self.score_prepared(&prepared, &ok, labels);
        let mut batch = match batch {
            Ok(results) => results.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => {
                let msg = e.to_string();
                ok.iter()
                    .map(|_| Err(EngineError::InvalidInput(msg.clone())))
                    .collect()
            }
        }
        .into_iter();
        prepared
            .into_iter()
            .map(|p| match p {
                Ok(_) => batch.next().unwrap_or_else(|| {
                    Err(EngineError::InvalidInput(
                        "engine returned too few results".into(),
                    ))
                }),
                Err(e) => Err(e),
            })
            .collect()
    }

    fn score_prepared(
        &self,
        prepared: &[Result<Tensor>],
        ok: &[usize],
        labels: &[LabelId],
    ) -> Result<Vec<ImageResult>> {
        if ok.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Tensor> = ok
            .iter()
            .filter_map(|&i| prepared[i].as_ref().ok().cloned())
            .collect();
        let x = Tensor::cat(&rows, 0)?;
        let labels: Vec<LabelId> = ok.iter().map(|&i| labels[i]).collect();
        self.detector.score(&x, Some(&labels))
    }

    /// One image → (1, C, S, S) in [-1,1] on the classifier's device.
    fn prepare(&self, im: &RawImage<'_>) -> Result<Tensor> {
        let (w, h, c) = (im.width as usize, im.height as usize, im.channels as usize);
        if w == 0 || h == 0 || !matches!(c, 1 | 3) || im.pixels.len() != w * h * c {
            return Err(EngineError::InvalidInput(format!(
                "image {w}x{h} with {c} channels and {} bytes: need 1 or 3 channels and w*h*c bytes",
                im.pixels.len()
            )));
        }
        let want_c = self.manifest.classifier.resnet.in_channels;
        let size = self.manifest.recipe.input_size();
        let device = &self.device;
        let hwc = Tensor::from_vec(im.pixels.to_vec(), (h, w, c), device)?.to_dtype(DType::F32)?;
        let chw = hwc.permute((2, 0, 1))?.contiguous()?;
        let chw = match (c, want_c) {
            (3, 1) => {
                // ITU-R BT.601 luma, as PIL's convert("L") does.
                let coeff = Tensor::new(&[0.299f32, 0.587, 0.114], device)?.reshape((3, 1, 1))?;
                chw.broadcast_mul(&coeff)?.sum_keepdim(0)?
            }
            (1, 3) => chw.repeat((3, 1, 1))?,
            _ => chw,
        };
        let x = (chw.unsqueeze(0)? / 127.5)? - 1.0;
        bilinear_resize(&x?, size, size)
    }
}

/// Parses a device name from configuration: `cpu`, `cuda` or `cuda:N`. A CUDA name in a build
/// without the `cuda` feature is a clear error rather than a silent CPU fallback.
pub fn device_from_name(name: &str) -> Result<Device> {
    let ordinal = match name.trim() {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                EngineError::Config(format!(
                    "unknown device `{other}` (expected cpu, cuda or cuda:N)"
                ))
            })?,
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(EngineError::Config(format!(
            "device `{name}` needs a build with `--features cuda` and an NVIDIA GPU"
        )));
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// The name [`device_from_name`] takes for `device`: `cpu`, `cuda:N` (or `metal:N`).
pub fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        candle_core::DeviceLocation::Cpu => "cpu".into(),
    }
}

/// blake3 of a file's bytes, hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// The denoiser and the file its weights came from: a checkpoint file under the manifest's
/// architecture, or a diffusers `UNet2DModel` folder, whose own `config.json` must describe that
/// same architecture (the manifest stays the one statement of what the bundle runs).
fn denoiser_of(
    dir: &Path,
    manifest: &Manifest,
    opts: &LoadOptions,
) -> Result<(PixelUNet, PathBuf)> {
    let path = dir.join(&manifest.denoiser.weights);
    let declared = &manifest.denoiser.pixel_unet;
    if !diffusers::is_model_folder(&path) {
        let unet =
            Checkpoint::open(&path)?.load(opts, |vb| PixelUNet::new(vb, declared.clone()))?;
        return Ok((unet, path));
    }
    let unet = diffusers::load_declared(&path, declared, opts.dtype, &opts.device)?;
    Ok((unet, path.join(diffusers::WEIGHTS_FILE)))
}

/// Writes a bundle whose networks carry freshly initialised (untrained, seeded) weights: what
/// tests use to exercise loading and the full pipeline without a trained model.
pub fn write_untrained(dir: &Path, manifest: &Manifest, seed: u64) -> Result<()> {
    use crate::train::init::seeded_var_builder;
    use candle_nn::VarMap;
    std::fs::create_dir_all(dir).map_err(|source| EngineError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let device = Device::Cpu;
    let vars = VarMap::new();
    ResNet::new(
        seeded_var_builder(&vars, seed, DType::F32, &device),
        &manifest.classifier.resnet,
    )?;
    vars.save(dir.join(&manifest.classifier.weights))?;
    let vars = VarMap::new();
    PixelUNet::new(
        seeded_var_builder(&vars, seed, DType::F32, &device),
        manifest.denoiser.pixel_unet.clone(),
    )?;
    vars.save(dir.join(&manifest.denoiser.weights))?;
    if let Some(entry) = &manifest.autoencoder {
        let vars = VarMap::new();
        VqModel::new(
            seeded_var_builder(&vars, seed, DType::F32, &device),
            entry.vq.clone(),
        )?;
        vars.save(dir.join(&entry.weights))?;
    }
    manifest.write(dir)
}
