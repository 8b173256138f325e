//! DiffGuard engine: the algorithm of `diffguard-spec.md` on candle. Knows nothing of HTTP.
//!
//! Layout (one concept per module):
//! - [`model`]: the traits the algorithm is written against (`Denoiser`, `Classifier`, `Autoencoder`).
//! - [`schedule`]: noise schedules and timestep respacing (spec §2).
//! - [`ddim`]: DDIM inversion and sampling steps (spec §3, §4).
//! - [`guidance`]: classifier guidance with Clean Grad, CFG with the DSG mask (spec §4, §5, §7).
//! - [`early_stop`]: adaptive early stop (spec §6).
//! - [`similarity`]: DISTS, logits-L1, L2, PSNR (spec §8).
//! - [`recipe`]: named, serializable presets (spec §10) and the detector fingerprint.
//! - [`pipeline`]: the end-to-end GDM / LDM / pixel-CFG detectors.
//! - [`models`]: the networks (UNets, VQ autoencoder, ResNet, VGG16) and weight loading.
//! - [`ops`]: differentiable tensor ops candle lacks or gets wrong.
//! - [`data`]: real dataset loaders (Fashion-MNIST, MNIST, Animal-MNIST, image folders).
//! - [`eval`]: OOD metrics and baseline detectors.
//! - [`malloc`]: the process-wide allocator setting the networks run fastest with.

pub mod bundle;
pub mod data;
pub mod ddim;
pub mod early_stop;
pub mod error;
pub mod eval;
pub mod guidance;
pub mod malloc;
pub mod model;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod recipe;
pub mod schedule;
pub mod similarity;
pub mod train;

pub use error::{EngineError, Result};
pub use model::{Autoencoder, Classifier, ClassifierOutput, Denoiser, LabelId};
