//! Deterministic, resumable training of the project's own models (the small ResNet classifier and
//! the class-conditional pixel DDPM).
//!
//! Determinism rests on one rule: every random number comes from a `rand` RNG derived from
//! `(seed, purpose, index)` ([`rng`]). Parameter init, the batch order of each epoch and each
//! step's noise/timesteps/label dropout/augmentation are therefore functions of the seed and the
//! step number alone, so a checkpoint needs no RNG state and a resumed run replays exactly what an
//! uninterrupted one would have done. candle's own CPU RNG is never used (it cannot be seeded).
//!
//! - [`rng`]: derived RNGs.
//! - [`init`]: a `VarBuilder` backend that creates parameters from the seed.
//! - [`adamw`]: AdamW whose moments can be checkpointed.
//! - [`ema`]: exponential moving average of the weights.
//! - [`data`]: in-memory dataset, per-epoch shuffles, augmentation.
//! - [`objective`]: the ε-prediction diffusion loss, the autoencoder's reconstruction loss and the
//!   classifier cross-entropy.
//! - [`checkpoint`]: safetensors + JSON checkpoints and weight export.
//! - [`trainer`]: the loop (time budget, progress bar, periodic checkpoints).

pub mod adamw;
pub mod checkpoint;
pub mod data;
pub mod ema;
pub mod init;
pub mod objective;
pub mod recipes;
pub mod rng;
pub mod trainer;

pub use adamw::{AdamW, AdamWParams};
pub use data::{Augment, InMemoryDataset};
pub use ema::Ema;
pub use init::seeded_var_builder;
pub use objective::{
    AutoencoderObjective, ClassifierObjective, DiffusionObjective, LinearBetas, Objective,
};
pub use trainer::{LrSchedule, RunOptions, RunSummary, StopReason, TrainConfig, Trainer};
