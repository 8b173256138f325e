//! The one weight-loading layer of the project.
//!
//! A [`Checkpoint`] opens safetensors (memory-mapped), zip-format PyTorch pickles (`.pt`, `.pth`,
//! `.bin`) and Lightning `.ckpt` files (state dict nested under `state_dict`), detected by content,
//! not by extension. [`Checkpoint::load`] builds a model through a `VarBuilder` that records every
//! tensor the model asks for; afterwards the request list is compared with the checkpoint (under an
//! optional name prefix) and any missing, wrongly shaped or unused tensor becomes ONE
//! [`EngineError::WeightMismatch`] that names them all. Missing tensors are handed to the model as
//! zeros while it is being built only so that one pass finds every problem; such a model is dropped,
//! never returned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::{EngineError, Result};

/// Names that PyTorch state dicts carry but no inference model reads.
pub const IGNORE_BN_COUNTERS: &str = "*num_batches_tracked";

/// How to turn checkpoint tensors into model weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of the model's weights (F16/BF16 checkpoint tensors are converted on load).
    pub dtype: DType,
    pub device: Device,
    /// Only tensors whose names start with this are offered to the model, with the prefix removed
    /// (e.g. `model.diffusion_model.` in an LDM checkpoint). Empty = the whole checkpoint.
    pub prefix: String,
    /// Patterns (`*` matches any run of characters) of names, relative to the prefix, that may stay
    /// unused without an error, e.g. BatchNorm counters or a head the model does not need.
    pub ignore_unused: Vec<String>,
}

impl LoadOptions {
    /// The whole checkpoint, nothing ignored.
    pub fn new(dtype: DType, device: &Device) -> Self {
        Self {
            dtype,
            device: device.clone(),
            prefix: String::new(),
            ignore_unused: Vec::new(),
        }
    }

    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    pub fn ignoring(mut self, pattern: impl Into<String>) -> Self {
        self.ignore_unused.push(pattern.into());
        self
    }
}

/// Where the tensors of a checkpoint live.
enum Store {
    Safetensors(MmapedSafetensors),
    Pth(candle_core::pickle::PthTensors),
    Memory(HashMap<String, Tensor>),
}

/// An opened checkpoint: its tensor names and shapes, tensors read on demand.
pub struct Checkpoint {
    path: PathBuf,
    store: Store,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("tensors", &self.shapes.len())
            .finish()
    }
}

/// What a file's first bytes say it is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Safetensors,
    Zip,
    LegacyPickle,
    Unknown,
}

fn sniff(path: &Path) -> Result<Kind> {
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let n = file.read(&mut head).map_err(|e| io_error(path, e))?;
    let head = &head[..n];
    Ok(if head.starts_with(b"PK\x03\x04") {
        Kind::Zip
    } else if head.first() == Some(&0x80) {
        Kind::LegacyPickle
    } else if n == 9 && head[8] == b'{' {
        Kind::Safetensors
    } else {
        Kind::Unknown
    })
}

fn io_error(path: &Path, source: std::io::Error) -> EngineError {
    EngineError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn format_error(path: &Path, what: &'static str, detail: impl fmt::Display) -> EngineError {
    EngineError::Format {
        path: path.display().to_string(),
        what,
        detail: detail.to_string(),
    }
}

impl Checkpoint {
    /// Opens a safetensors file or a PyTorch zip pickle. For a pickle whose top level holds no
    /// tensors, the state dict under the `state_dict` key (Lightning) is used.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match sniff(path)? {
            Kind::Safetensors => Self::open_safetensors(path),
            Kind::Zip => {
                let top = Self::open_pth(path, None)?;
                if !top.shapes.is_empty() {
                    return Ok(top);
                }
                let nested = Self::open_pth(path, Some("state_dict")).map_err(|e| {
                    let cause = match e {
                        EngineError::Format { detail, .. } => detail,
                        other => other.to_string(),
                    };
                    format_error(
                        path,
                        "PyTorch checkpoint",
                        format!(
                            "no tensors at the top level and no readable `state_dict` entry \
                             (a whole pickled module? save its state_dict instead): {cause}"
                        ),
                    )
                })?;
                if nested.shapes.is_empty() {
                    return Err(format_error(path, "PyTorch checkpoint", "no tensors found"));
                }
                Ok(nested)
            }
            Kind::LegacyPickle => Err(format_error(
                path,
                "PyTorch checkpoint",
                "legacy (pre-1.6, non-zip) pickle format; re-save it with torch.save or convert \
                 it to safetensors",
            )),
            Kind::Unknown => Err(format_error(
                path,
                "checkpoint",
                "neither safetensors nor a PyTorch zip archive",
            )),
        }
    }

    /// Opens a PyTorch zip pickle and takes the state dict stored under `key` (None = top level).
    pub fn open_pth(path: impl AsRef<Path>, key: Option<&str>) -> Result<Self> {
        let path = path.as_ref();
        let pth = candle_core::pickle::PthTensors::new(path, key)
            .map_err(|e| format_error(path, "PyTorch checkpoint", e))?;
        let shapes = pth
            .tensor_infos()
            .iter()
            .map(|(name, info)| (name.clone(), info.layout.dims().to_vec()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            store: Store::Pth(pth),
            shapes,
        })
    }

    fn open_safetensors(path: &Path) -> Result<Self> {
        // SAFETY: the mapping is only read; like every mmap-based loader we rely on the file not
        // being truncated while it is open.
        let st = unsafe { MmapedSafetensors::new(path) }
            .map_err(|e| format_error(path, "safetensors", e))?;
        let shapes = st
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            store: Store::Safetensors(st),
            shapes,
        })
    }

    /// A checkpoint held in memory (tests, converted weights); `label` names it in errors.
    pub fn from_tensors(label: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        let shapes = tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.dims().to_vec()))
            .collect();
        Self {
            path: label.into(),
            store: Store::Memory(tensors),
            shapes,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name with its shape, sorted by name.
    pub fn shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    /// Reads one tensor by its full name, converted to `dtype` on `device`.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let raw = match &self.store {
            Store::Safetensors(st) => st.load(name, device)?,
            Store::Pth(pth) => pth.get(name)?.ok_or_else(|| self.missing(name))?,
            Store::Memory(map) => map.get(name).cloned().ok_or_else(|| self.missing(name))?,
        };
        Ok(raw.to_device(device)?.to_dtype(dtype)?)
    }

    fn missing(&self, name: &str) -> EngineError {
        EngineError::WeightMismatch {
            path: self.path.display().to_string(),
            detail: format!("missing tensor {name}"),
        }
    }

    /// Builds a model from this checkpoint and verifies that the model used exactly the tensors
    /// under `opts.prefix` (minus `opts.ignore_unused`), each with the shape the model expects.
    pub fn load<M, E, F>(&self, opts: &LoadOptions, build: F) -> Result<M>
    where
        F: for<'a> FnOnce(VarBuilder<'a>) -> std::result::Result<M, E>,
        E: Into<EngineError>,
    {
        let (built, mismatch) = self.build_and_compare(opts, build);
        // A build that failed for its own reason (an unreadable tensor, say) stops before asking
        // for the rest, which would then show up as "unused": report the cause, not the symptom.
        if built.is_err() && mismatch.missing.is_empty() && mismatch.wrong_shape.is_empty() {
            return built;
        }
        if !mismatch.is_empty() {
            return Err(EngineError::WeightMismatch {
                path: self.path.display().to_string(),
                detail: mismatch.to_string(),
            });
        }
        built
    }

    /// Like [`Checkpoint::load`] but returns the comparison instead of failing on it (for listing
    /// what a checkpoint lacks); the model is returned only when the comparison is clean.
    pub fn compare<M, E, F>(&self, opts: &LoadOptions, build: F) -> (Option<M>, Mismatch)
    where
        F: for<'a> FnOnce(VarBuilder<'a>) -> std::result::Result<M, E>,
        E: Into<EngineError>,
    {
        let (built, mismatch) = self.build_and_compare(opts, build);
        let model = if mismatch.is_empty() {
            built.ok()
        } else {
            None
        };
        (model, mismatch)
    }

    fn build_and_compare<M, E, F>(&self, opts: &LoadOptions, build: F) -> (Result<M>, Mismatch)
    where
        F: for<'a> FnOnce(VarBuilder<'a>) -> std::result::Result<M, E>,
        E: Into<EngineError>,
    {
        let recorder = Recorder::default();
        let backend = RecordingBackend {
            checkpoint: self,
            prefix: &opts.prefix,
            recorder: &recorder,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), opts.dtype, opts.device.clone());
        let built = build(vb).map_err(Into::into);
        let record = match recorder.0.into_inner() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mismatch = self.mismatch(opts, record);
        (built, mismatch)
    }

    fn mismatch(&self, opts: &LoadOptions, record: Record) -> Mismatch {
        let unexpected = self
            .shapes
            .keys()
            .filter_map(|full| {
                full.strip_prefix(opts.prefix.as_str())
                    .map(|rel| (full, rel))
            })
            .filter(|(_, rel)| !record.used.contains(*rel))
            .filter(|(_, rel)| !opts.ignore_unused.iter().any(|p| glob_match(p, rel)))
            .map(|(full, _)| full.clone())
            .collect();
        Mismatch {
            missing: record.missing.into_iter().collect(),
            unexpected,
            wrong_shape: record
                .wrong_shape
                .into_iter()
                .map(|(name, (want, have))| (name, want, have))
                .collect(),
        }
    }
}

/// The difference between what a model asked for and what a checkpoint holds. Names are full
/// checkpoint names (prefix included).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mismatch {
    /// Requested by the model, absent from the checkpoint.
    pub missing: Vec<String>,
    /// Present under the prefix, never requested, not ignored.
    pub unexpected: Vec<String>,
    /// (name, shape the model expects, shape in the checkpoint).
    pub wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl Mismatch {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.wrong_shape.is_empty()
    }
}

/// Lists longer than this are cut in messages: a checkpoint for the wrong architecture would
/// otherwise print thousands of names.
const MAX_LISTED: usize = 64;

fn write_list<T>(
    f: &mut fmt::Formatter<'_>,
    title: &str,
    items: &[T],
    show: impl Fn(&T) -> String,
) -> fmt::Result {
    if items.is_empty() {
        return Ok(());
    }
    write!(f, "{} {title}: ", items.len())?;
    let shown: Vec<String> = items.iter().take(MAX_LISTED).map(show).collect();
    write!(f, "{}", shown.join(", "))?;
    if items.len() > MAX_LISTED {
        write!(f, ", … ({} more)", items.len() - MAX_LISTED)?;
    }
    write!(f, "; ")
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_list(f, "missing", &self.missing, String::clone)?;
        write_list(f, "wrong shape", &self.wrong_shape, |(n, want, got)| {
            format!("{n} (model {want:?}, checkpoint {got:?})")
        })?;
        write_list(f, "unexpected (unused)", &self.unexpected, String::clone)
    }
}

#[derive(Default)]
struct Record {
    used: BTreeSet<String>,
    missing: BTreeSet<String>,
    wrong_shape: BTreeMap<String, (Vec<usize>, Vec<usize>)>,
}

#[derive(Default)]
struct Recorder(Mutex<Record>);

impl Recorder {
    fn with<R>(&self, f: impl FnOnce(&mut Record) -> R) -> R {
        match self.0.lock() {
            Ok(mut r) => f(&mut r),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }
}

struct RecordingBackend<'a> {
    checkpoint: &'a Checkpoint,
    prefix: &'a str,
    recorder: &'a Recorder,
}

impl RecordingBackend<'_> {
    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
}

impl SimpleBackend for RecordingBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let full = self.full(name);
        let problem = match self.checkpoint.shapes.get(&full) {
            None => {
                self.recorder.with(|r| r.missing.insert(full.clone()));
                true
            }
            Some(have) if have.as_slice() != s.dims() => {
                let entry = (s.dims().to_vec(), have.clone());
                self.recorder
                    .with(|r| r.wrong_shape.insert(full.clone(), entry));
                true
            }
            Some(_) => false,
        };
        self.recorder.with(|r| r.used.insert(name.to_string()));
        if problem {
            // Stand-in so the build can go on and report every problem at once; the model
            // is discarded because the mismatch is non-empty. A zero-stride view, so checking a
            // full-size architecture against the wrong file allocates nothing.
            return Tensor::zeros((), dtype, dev)?.broadcast_as(s);
        }
        self.checkpoint
            .tensor(&full, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let full = self.full(name);
        self.recorder.with(|r| r.used.insert(name.to_string()));
        if !self.checkpoint.shapes.contains_key(&full) {
            self.recorder.with(|r| r.missing.insert(full.clone()));
            return Err(candle_core::Error::CannotFindTensor { path: full });
        }
        self.checkpoint
            .tensor(&full, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.checkpoint.shapes.contains_key(&self.full(name))
    }
}

/// `*` matches any (possibly empty) run of characters; everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Greedy match with backtracking to the last star: linear in practice for name patterns.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}
