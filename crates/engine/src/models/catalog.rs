//! Which weight files each recipe needs, where they are looked for, and whether what is found fits.
//!
//! [`catalog`] lists, per recipe preset, the files with their role, accepted names, format, the
//! tensor prefixes inside them and the published download locations (spec §1.1). [`SearchPaths`]
//! is the lookup order, all offline: explicit per-role paths, then directories (a bundle folder,
//! the models directory `$DIFFGUARD_MODELS` or `~/.cache/diffguard`), then the Hugging Face cache
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`). [`check`] runs the
//! lookup and, when asked, opens every found file and compares it with the preset architecture.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Serialize;

use crate::bundle::Manifest;
use crate::models::adm_unet::{AdmUNet, AdmUNetConfig};
use crate::models::class_embedder::{ClassEmbedder, ClassEmbedderConfig};
use crate::models::diffusers;
use crate::models::ldm_unet::{LdmUNet, LdmUNetConfig};
use crate::models::load::{Checkpoint, IGNORE_BN_COUNTERS, LoadOptions, Mismatch};
use crate::models::pixel_unet::{PixelUNet, PixelUNetConfig};
use crate::models::resnet::{ResNet, ResNetConfig};
use crate::models::vgg::{DISTS_CHANNELS, Vgg16Features, VggConfig};
use crate::models::vq::{VqConfig, VqModel};
use crate::{EngineError, Result};

/// The catalogs: the paper's recipes with their published checkpoints, and the project's own
/// bundle (whatever recipe its `bundle.json` runs; `pixel-cfg` is accepted for it, as that
/// recipe only runs from a bundle).
pub const RECIPES: [&str; 3] = ["gdm", "ldm", BUNDLE];

/// The catalog of the project's bundle folder.
pub const BUNDLE: &str = "bundle";

fn names(n: &[&'static str]) -> Vec<Cow<'static, str>> {
    n.iter().map(|&n| Cow::Borrowed(n)).collect()
}

/// How a file is stored (all detected by content when opened; this is what the publisher ships).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// Zip-format `torch.save(state_dict)`.
    TorchZip,
    /// PyTorch Lightning checkpoint: the state dict under `state_dict`.
    LightningCkpt,
    Safetensors,
    /// The project's `bundle.json`.
    BundleManifest,
}

impl Format {
    pub fn describe(self) -> &'static str {
        match self {
            Format::TorchZip => "PyTorch zip pickle",
            Format::LightningCkpt => "Lightning .ckpt",
            Format::Safetensors => "safetensors",
            Format::BundleManifest => "bundle.json",
        }
    }
}

/// The architecture a part of a file is checked against.
#[derive(Debug, Clone, PartialEq)]
pub enum Arch {
    AdmUNet(AdmUNetConfig),
    LdmUNet(LdmUNetConfig),
    ClassEmbedder(ClassEmbedderConfig),
    Vq(VqConfig),
    ResNet(ResNetConfig),
    PixelUNet(PixelUNetConfig),
    /// torchvision VGG16 `features.*`.
    Vgg16Features,
    /// piq's DISTS `alpha` / `beta`, (1, 1475, 1, 1) each.
    DistsAlphaBeta,
    /// The classifier described by the `bundle.json` next to the file.
    BundleClassifier,
    /// The class-conditional DDPM described by the `bundle.json` next to the file.
    BundleDenoiser,
    /// The file is a bundle manifest; checking = parsing it.
    Manifest,
    /// The weights of a diffusers `UNet2DModel` folder, which must load as this pixel UNet.
    DiffusersUNet(PixelUNetConfig),
}

/// One model inside a file: its tensors live under `prefix`.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub name: &'static str,
    pub prefix: &'static str,
    /// Patterns (relative to the prefix) that may stay unused, e.g. a classifier head DISTS skips.
    pub ignore: Vec<&'static str>,
    pub arch: Arch,
}

/// Where a file can be obtained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Source {
    /// The file itself, over HTTPS.
    Url { url: &'static str },
    /// A member of a zip archive published at `url`.
    ZipMember {
        url: &'static str,
        member: &'static str,
    },
    /// A Hugging Face Hub repository file (also looked up in the local HF cache).
    HuggingFace {
        repo: &'static str,
        file: &'static str,
        /// What differs from the publisher's own file, if anything.
        note: &'static str,
    },
    /// Not downloadable: produced or shipped by this project.
    Project { how: &'static str },
}

impl Source {
    /// One line for a table or a log.
    pub fn describe(&self) -> String {
        match self {
            Source::Url { url } => (*url).to_string(),
            Source::ZipMember { url, member } => format!("{url} (unzip {member})"),
            Source::HuggingFace { repo, file, .. } => {
                format!("https://huggingface.co/{repo}/resolve/main/{file}")
            }
            Source::Project { how } => (*how).to_string(),
        }
    }
}

/// A weight file a recipe needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFile {
    /// Stable key, also the key of explicit paths (`--file ROLE=PATH`).
    pub role: &'static str,
    pub what: &'static str,
    /// Paths relative to a search directory, preferred first; the first is where `fetch` writes.
    /// A bundle's names come from its `bundle.json`, hence owned names are allowed.
    pub names: Vec<Cow<'static, str>>,
    pub format: Format,
    pub parts: Vec<Part>,
    pub sources: Vec<Source>,
}

impl ModelFile {
    /// The Hugging Face mirrors of this file.
    pub fn hf_files(&self) -> impl Iterator<Item = (&'static str, &'static str)> + '_ {
        self.sources.iter().filter_map(|s| match s {
            Source::HuggingFace { repo, file, .. } => Some((*repo, *file)),
            _ => None,
        })
    }
}

const ADM_URL: &str =
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt";
const LDM_ZIP_URL: &str = "https://ommer-lab.com/files/latent-diffusion/cin.zip";
const LDM_CKPT_URL: &str = "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt";
const RESNET50_URL: &str = "https://download.pytorch.org/models/resnet50-0676ba61.pth";
const VGG16_URL: &str = "https://download.pytorch.org/models/vgg16-397923af.pth";
const DISTS_URL: &str =
    "https://github.com/photosynthesis-team/piq/releases/download/v0.4.1/dists_weights.pt";

fn adm_256_uncond() -> ModelFile {
    ModelFile {
        role: "diffusion",
        what: "OpenAI guided-diffusion ADM UNet, 256x256 unconditional",
        names: names(&[
            "256x256_diffusion_uncond.pt",
            "256x256_diffusion_uncond.safetensors",
        ]),
        format: Format::TorchZip,
        parts: vec![Part {
            name: "unet",
            prefix: "",
            ignore: vec![],
            arch: Arch::AdmUNet(AdmUNetConfig::imagenet256_uncond()),
        }],
        sources: vec![Source::Url { url: ADM_URL }],
    }
}

fn ldm_cin256_v2() -> ModelFile {
    ModelFile {
        role: "diffusion",
        what: "CompVis LDM cin256-v2 (UNet + VQ-f4 first stage + class embedder)",
        names: names(&[
            "cin256-v2/model.ckpt",
            "ldm/cin256-v2/model.ckpt",
            "cin256-v2.ckpt",
            "cin256-v2.safetensors",
        ]),
        format: Format::LightningCkpt,
        parts: vec![
            Part {
                name: "unet",
                prefix: "model.diffusion_model.",
                ignore: vec![],
                arch: Arch::LdmUNet(LdmUNetConfig::cin256_v2()),
            },
            Part {
                name: "first stage",
                prefix: "first_stage_model.",
                ignore: vec![],
                arch: Arch::Vq(VqConfig::cin256_v2()),
            },
            Part {
                name: "class embedder",
                prefix: "cond_stage_model.",
                ignore: vec![],
                arch: Arch::ClassEmbedder(ClassEmbedderConfig::cin256_v2()),
            },
        ],
        sources: vec![
            Source::ZipMember {
                url: LDM_ZIP_URL,
                member: "model.ckpt",
            },
            Source::Url { url: LDM_CKPT_URL },
        ],
    }
}

fn resnet50() -> ModelFile {
    ModelFile {
        role: "classifier",
        what: "torchvision ResNet-50 ImageNet V1 (76.1% top-1)",
        names: names(&[
            "resnet50-0676ba61.pth",
            "resnet50-0676ba61.safetensors",
            "imagenet_res50_acc76.10.pth",
        ]),
        format: Format::TorchZip,
        parts: vec![Part {
            name: "resnet50",
            prefix: "",
            ignore: vec![IGNORE_BN_COUNTERS],
            arch: Arch::ResNet(ResNetConfig::resnet50(1000)),
        }],
        sources: vec![
            Source::Url { url: RESNET50_URL },
            Source::HuggingFace {
                repo: "timm/resnet50.tv_in1k",
                file: "model.safetensors",
                note: "timm's copy of the torchvision V1 weights (same tensor names; a different \
                       file, so a different detector fingerprint)",
            },
        ],
    }
}

fn vgg16() -> ModelFile {
    ModelFile {
        role: "dists-vgg16",
        what: "torchvision VGG16 ImageNet (DISTS features)",
        names: names(&["vgg16-397923af.pth", "vgg16-397923af.safetensors"]),
        format: Format::TorchZip,
        parts: vec![Part {
            name: "vgg16 features",
            prefix: "",
            // torchvision's head, and timm's names for the same head.
            ignore: vec!["classifier.*", "pre_logits.*", "head.*"],
            arch: Arch::Vgg16Features,
        }],
        sources: vec![
            Source::Url { url: VGG16_URL },
            Source::HuggingFace {
                repo: "timm/vgg16.tv_in1k",
                file: "model.safetensors",
                note: "timm's copy of the torchvision weights (same `features.*` names)",
            },
        ],
    }
}

fn dists_weights() -> ModelFile {
    ModelFile {
        role: "dists-weights",
        what: "piq DISTS alpha/beta (release v0.4.1)",
        names: names(&["dists_weights.pt", "dists_weights.safetensors"]),
        format: Format::TorchZip,
        parts: vec![Part {
            name: "alpha/beta",
            prefix: "",
            ignore: vec![],
            arch: Arch::DistsAlphaBeta,
        }],
        sources: vec![Source::Url { url: DISTS_URL }],
    }
}

/// The default bundle's folder name inside a models directory (`$DIFFGUARD_MODELS/<this>/...`),
/// the last component of [`crate::bundle::DEFAULT_BUNDLE`].
pub const BUNDLE_FOLDER: &str = "fashion-mnist-latent";

const BUNDLE_HOW: &str = "ships with the project in models/; rebuild it with `diffguard train` \
                          (no public download)";

/// The files of a bundle folder. With the folder and its `bundle.json` read, the file names and
/// architectures are the manifest's own (a latent bundle's autoencoder is listed, a diffusers
/// folder as the denoiser is checked through its own loader); without them, the standard names,
/// and each network is checked against the `bundle.json` next to it.
pub fn bundle_catalog(bundle: Option<(&Path, &Manifest)>) -> Vec<ModelFile> {
    let manifest = bundle.map(|(_, m)| m);
    let diffusers_denoiser = bundle.and_then(|(dir, m)| {
        let folder = dir.join(&m.denoiser.weights);
        diffusers::is_model_folder(&folder).then(|| {
            (
                format!("{}/{}", m.denoiser.weights, diffusers::WEIGHTS_FILE),
                Arch::DiffusersUNet(m.denoiser.pixel_unet.clone()),
            )
        })
    });
    let entry = |role, what, name: Option<&String>, standard: &'static str, arch| ModelFile {
        role,
        what,
        names: {
            let name = name.map_or(standard, String::as_str);
            vec![
                Cow::Owned(name.to_string()),
                Cow::Owned(format!("{BUNDLE_FOLDER}/{name}")),
            ]
        },
        format: if role == "bundle" {
            Format::BundleManifest
        } else {
            Format::Safetensors
        },
        parts: vec![Part {
            name: role,
            prefix: "",
            ignore: vec![IGNORE_BN_COUNTERS],
            arch,
        }],
        sources: vec![Source::Project { how: BUNDLE_HOW }],
    };
    let mut files = vec![
        entry(
            "bundle",
            "bundle manifest (architectures, recipe, labels)",
            None,
            crate::bundle::MANIFEST,
            Arch::Manifest,
        ),
        entry(
            "classifier",
            "the project's small ResNet (Fashion-MNIST)",
            manifest.map(|m| &m.classifier.weights),
            "classifier.safetensors",
            manifest.map_or(Arch::BundleClassifier, |m| {
                Arch::ResNet(m.classifier.resnet.clone())
            }),
        ),
        match diffusers_denoiser {
            Some((name, arch)) => entry(
                "denoiser",
                "a diffusers UNet2DModel folder (the pixel UNet's family)",
                Some(&name),
                diffusers::WEIGHTS_FILE,
                arch,
            ),
            None => entry(
                "denoiser",
                "the project's class-conditional DDPM (pixel or latent)",
                manifest.map(|m| &m.denoiser.weights),
                "diffusion.safetensors",
                manifest.map_or(Arch::BundleDenoiser, |m| {
                    Arch::PixelUNet(m.denoiser.pixel_unet.clone())
                }),
            ),
        },
    ];
    if let Some(ae) = manifest.and_then(|m| m.autoencoder.as_ref()) {
        files.push(entry(
            "autoencoder",
            "the project's f=4 autoencoder (latent bundles)",
            Some(&ae.weights),
            "autoencoder.safetensors",
            Arch::Vq(ae.vq.clone()),
        ));
    }
    files
}

/// The weight files of a recipe preset (`gdm`, `ldm`, `pixel-cfg`).
pub fn catalog(recipe: &str) -> Result<Vec<ModelFile>> {
    let dists = || [vgg16(), dists_weights()];
    match recipe {
        "gdm" => Ok([vec![adm_256_uncond(), resnet50()], dists().to_vec()].concat()),
        "ldm" => Ok([vec![ldm_cin256_v2(), resnet50()], dists().to_vec()].concat()),
        BUNDLE | "pixel-cfg" => Ok(bundle_catalog(None)),
        other => Err(EngineError::Config(format!(
            "unknown recipe `{other}` (expected one of {})",
            RECIPES.join(", ")
        ))),
    }
}

/// Where a lookup looks, in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchPaths {
    /// role → file, from the config or the command line; wins over everything else.
    pub explicit: BTreeMap<String, PathBuf>,
    /// Directories searched with each file's relative names, in order.
    pub dirs: Vec<PathBuf>,
    /// The Hugging Face hub cache (`.../hub`), if one is configured or exists.
    pub hf_cache: Option<PathBuf>,
}

/// Models directory variable.
pub const MODELS_ENV: &str = "DIFFGUARD_MODELS";

impl SearchPaths {
    /// The default order from environment variables (`var` is `std::env::var_os` outside tests):
    /// `extra_dirs` first (e.g. a bundle folder), then `$DIFFGUARD_MODELS` or
    /// `$HOME/.cache/diffguard`, then the HF cache.
    pub fn from_env(
        explicit: BTreeMap<String, PathBuf>,
        extra_dirs: Vec<PathBuf>,
        var: impl Fn(&str) -> Option<OsString>,
    ) -> Self {
        let set = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let home_cache = set("HOME").map(|h| h.join(".cache"));
        let mut dirs = extra_dirs;
        if let Some(d) =
            set(MODELS_ENV).or_else(|| home_cache.as_ref().map(|c| c.join("diffguard")))
        {
            dirs.push(d);
        }
        let hf_cache = set("HF_HUB_CACHE")
            .or_else(|| set("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| home_cache.map(|c| c.join("huggingface").join("hub")));
        Self {
            explicit,
            dirs,
            hf_cache,
        }
    }

    /// The models directory: where `fetch` writes (the last plain directory).
    pub fn models_dir(&self) -> Option<&Path> {
        self.dirs.last().map(PathBuf::as_path)
    }
}

/// How a file was found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Via {
    Explicit,
    Directory { dir: PathBuf },
    HuggingFace { repo: String },
}

/// The result of a lookup: the path found (if any) and every path tried, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lookup {
    pub found: Option<(PathBuf, Via)>,
    pub tried: Vec<PathBuf>,
}

/// Finds `file` without touching the network. An explicit path is final: if it does not exist the
/// file is missing, so a typo in a config is not papered over by another copy.
pub fn locate(file: &ModelFile, paths: &SearchPaths) -> Lookup {
    let mut tried = Vec::new();
    if let Some(p) = paths.explicit.get(file.role) {
        tried.push(p.clone());
        let found = p.is_file().then(|| (p.clone(), Via::Explicit));
        return Lookup { found, tried };
    }
    for dir in &paths.dirs {
        for name in &file.names {
            let p = dir.join(name.as_ref());
            tried.push(p.clone());
            if p.is_file() {
                let via = Via::Directory { dir: dir.clone() };
                return Lookup {
                    found: Some((p, via)),
                    tried,
                };
            }
        }
    }
    if let Some(hub) = &paths.hf_cache {
        for (repo, name) in file.hf_files() {
            if let Some(p) = hf_cached(hub, repo, name, &mut tried) {
                let via = Via::HuggingFace { repo: repo.into() };
                return Lookup {
                    found: Some((p, via)),
                    tried,
                };
            }
        }
    }
    Lookup { found: None, tried }
}

/// `hub/models--ORG--NAME/snapshots/REV/FILE`: the revision `refs/main` names first, then the
/// other snapshots in name order (a cache filled by a pinned revision has no `refs/main`).
fn hf_cached(hub: &Path, repo: &str, file: &str, tried: &mut Vec<PathBuf>) -> Option<PathBuf> {
    let root = hub.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = root.join("snapshots");
    let main = std::fs::read_to_string(root.join("refs").join("main"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && !s.contains(['/', '\\']) && s != "..");
    let mut revs: Vec<String> = main.iter().cloned().collect();
    if let Ok(entries) = std::fs::read_dir(&snapshots) {
        let mut others: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| Some(n) != main.as_ref())
            .collect();
        others.sort();
        revs.extend(others);
    }
    if revs.is_empty() {
        tried.push(snapshots.join("*").join(file));
        return None;
    }
    revs.into_iter().find_map(|rev| {
        let p = snapshots.join(rev).join(file);
        tried.push(p.clone());
        // The cache stores snapshot files as symlinks into blobs/; a dangling one is missing.
        p.is_file().then_some(p)
    })
}

/// One tensor whose shape differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WrongShape {
    pub name: String,
    pub model: Vec<usize>,
    pub checkpoint: Vec<usize>,
}

/// What one part of a file lacks or has in excess.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartMismatch {
    pub part: String,
    pub prefix: String,
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    pub wrong_shape: Vec<WrongShape>,
    /// The same lists as one line (names cut after a few dozen).
    pub summary: String,
}

impl PartMismatch {
    fn new(part: &Part, m: Mismatch) -> Self {
        Self {
            part: part.name.into(),
            prefix: part.prefix.into(),
            summary: m.to_string(),
            missing: m.missing,
            unexpected: m.unexpected,
            wrong_shape: m
                .wrong_shape
                .into_iter()
                .map(|(name, model, checkpoint)| WrongShape {
                    name,
                    model,
                    checkpoint,
                })
                .collect(),
        }
    }
}

/// The outcome of opening a found file and comparing it with its architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Verification {
    Ok,
    Mismatch {
        parts: Vec<PartMismatch>,
    },
    /// Not a readable checkpoint (or manifest) at all.
    Unreadable {
        error: String,
    },
}

/// Opens `path` (by content, whatever its extension) and checks every part of `file` against its
/// architecture. Reads every tensor a clean part uses, so a truncated file is caught too.
pub fn verify(file: &ModelFile, path: &Path) -> Verification {
    if let Some(Arch::DiffusersUNet(declared)) = file.parts.first().map(|p| &p.arch) {
        return verify_diffusers(path, declared);
    }
    if file.parts.iter().any(|p| p.arch == Arch::Manifest) {
        return match path.parent().map(Manifest::read) {
            Some(Ok(_)) => Verification::Ok,
            Some(Err(e)) => Verification::Unreadable {
                error: e.to_string(),
            },
            None => Verification::Unreadable {
                error: "no parent folder".into(),
            },
        };
    }
    let ck = match Checkpoint::open(path) {
        Ok(ck) => ck,
        Err(e) => {
            return Verification::Unreadable {
                error: e.to_string(),
            };
        }
    };
    let mut mismatched = Vec::new();
    for part in &file.parts {
        match verify_part(&ck, part, path) {
            Ok(None) => {}
            Ok(Some(m)) => mismatched.push(m),
            Err(e) => {
                return Verification::Unreadable {
                    error: e.to_string(),
                };
            }
        }
    }
    if mismatched.is_empty() {
        Verification::Ok
    } else {
        Verification::Mismatch { parts: mismatched }
    }
}

fn verify_part(ck: &Checkpoint, part: &Part, path: &Path) -> Result<Option<PartMismatch>> {
    let mut opts = LoadOptions::new(DType::F32, &Device::Cpu).with_prefix(part.prefix);
    for pattern in &part.ignore {
        opts = opts.ignoring(*pattern);
    }
    let arch = resolve_bundle_arch(&part.arch, path)?;
    let build = |vb: VarBuilder<'_>| -> Result<()> {
        match &arch {
            Arch::AdmUNet(c) => AdmUNet::new(vb, c.clone()).map(drop),
            Arch::LdmUNet(c) => LdmUNet::new(vb, c.clone()).map(drop),
            Arch::ClassEmbedder(c) => ClassEmbedder::new(vb, c.clone()).map(drop),
            Arch::Vq(c) => VqModel::new(vb, c.clone()).map(drop),
            Arch::ResNet(c) => ResNet::new(vb, c).map(drop),
            Arch::PixelUNet(c) => PixelUNet::new(vb, c.clone()).map(drop),
            Arch::Vgg16Features => Vgg16Features::new(vb, &VggConfig::default()).map(drop),
            Arch::DistsAlphaBeta => {
                let shape = (1, DISTS_CHANNELS.iter().sum::<usize>(), 1, 1);
                vb.get(shape, "alpha")?;
                vb.get(shape, "beta")?;
                Ok(())
            }
            Arch::BundleClassifier
            | Arch::BundleDenoiser
            | Arch::Manifest
            | Arch::DiffusersUNet(_) => Err(EngineError::Config(
                "no architecture to check against".into(),
            )),
        }
    };
    let (built, mismatch) = ck.compare(&opts, build);
    if !mismatch.is_empty() {
        return Ok(Some(PartMismatch::new(part, mismatch)));
    }
    if built.is_none() {
        // Names and shapes fit but the build failed (a tensor could not be read: truncated
        // file?); `load` repeats it to surface the error itself.
        ck.load(&opts, build)?;
    }
    Ok(None)
}

/// A diffusers folder is checked by loading it as the bundle would: its `config.json` must
/// translate to the declared pixel UNet and its tensors must all be used.
fn verify_diffusers(weights: &Path, declared: &PixelUNetConfig) -> Verification {
    let folder = weights.parent().unwrap_or(Path::new("."));
    match diffusers::load_declared(folder, declared, DType::F32, &Device::Cpu) {
        Ok(_) => Verification::Ok,
        Err(e) => Verification::Unreadable {
            error: e.to_string(),
        },
    }
}

/// A bundle's networks are described by the `bundle.json` next to the weights.
fn resolve_bundle_arch(arch: &Arch, path: &Path) -> Result<Arch> {
    if !matches!(arch, Arch::BundleClassifier | Arch::BundleDenoiser) {
        return Ok(arch.clone());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let manifest = Manifest::read(dir)?;
    Ok(match arch {
        Arch::BundleClassifier => Arch::ResNet(manifest.classifier.resnet),
        _ => Arch::PixelUNet(manifest.denoiser.pixel_unet),
    })
}

/// Status of one required file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Found, not verified.
    Found,
    Missing,
    /// Found and verified.
    Ok,
    Mismatch,
    Unreadable,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Found => "found",
            Status::Missing => "missing",
            Status::Ok => "ok",
            Status::Mismatch => "mismatch",
            Status::Unreadable => "unreadable",
        }
    }
}

/// Everything known about one required file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileReport {
    pub role: String,
    pub what: String,
    pub names: Vec<String>,
    pub format: Format,
    /// (part, tensor prefix) pairs inside the file.
    pub prefixes: Vec<(String, String)>,
    pub status: Status,
    pub path: Option<PathBuf>,
    pub via: Option<Via>,
    pub tried: Vec<PathBuf>,
    pub sources: Vec<Source>,
    pub verification: Option<Verification>,
}

impl FileReport {
    /// Whether the file is present and (if verified) usable.
    pub fn usable(&self) -> bool {
        matches!(self.status, Status::Found | Status::Ok)
    }
}

/// Looks up every file of `files` and, with `verify_found`, checks each one found.
pub fn check(files: &[ModelFile], paths: &SearchPaths, verify_found: bool) -> Vec<FileReport> {
    files
        .iter()
        .map(|file| {
            let lookup = locate(file, paths);
            let verification = match (&lookup.found, verify_found) {
                (Some((path, _)), true) => Some(verify(file, path)),
                _ => None,
            };
            let status = match (&lookup.found, &verification) {
                (None, _) => Status::Missing,
                (Some(_), None) => Status::Found,
                (Some(_), Some(Verification::Ok)) => Status::Ok,
                (Some(_), Some(Verification::Mismatch { .. })) => Status::Mismatch,
                (Some(_), Some(Verification::Unreadable { .. })) => Status::Unreadable,
            };
            let (path, via) = lookup
                .found
                .map_or((None, None), |(p, v)| (Some(p), Some(v)));
            FileReport {
                role: file.role.into(),
                what: file.what.into(),
                names: file.names.iter().map(|n| n.to_string()).collect(),
                format: file.format,
                prefixes: file
                    .parts
                    .iter()
                    .map(|p| (p.name.to_string(), p.prefix.to_string()))
                    .collect(),
                status,
                path,
                via,
                tried: lookup.tried,
                sources: file.sources.clone(),
                verification,
            }
        })
        .collect()
}
