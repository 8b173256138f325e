//! Offline commands of the `diffguard` binary, one module each: [`eval`] and [`calibrate`] measure
//! and tune the detector on the engine's bundle and data loaders; [`models`] lists (and with the
//! `fetch` feature downloads) the weight files a recipe needs; [`train`] runs the training recipes.
//! The proxy is not involved.

pub mod calibrate;
pub mod eval;
#[cfg(feature = "fetch")]
pub mod fetch;
pub mod models;
pub mod train;

use std::path::{Path, PathBuf};

use diffguard_engine::bundle::{Bundle, device_from_name};

/// The default bundle, as the guard resolves it (`$DIFFGUARD_BUNDLE` is also read by clap).
fn default_bundle() -> PathBuf {
    crate::guard::diffguard::default_bundle_dir()
}

/// `--per-set N` / `--all` → the subset size (`None` = every image).
fn subset_size(n: usize, all: bool) -> Option<usize> {
    (!all).then_some(n)
}

/// Opens the bundle without its thresholds file: measuring and calibrating need only the
/// detector, and its thresholds are stale exactly when the weights or recipe just changed.
fn open_bundle_uncalibrated(dir: &Path, device: &str) -> anyhow::Result<Bundle> {
    let device = device_from_name(device)?;
    Bundle::open_uncalibrated(dir, &device)
        .map_err(|e| anyhow::anyhow!("cannot open the bundle {}: {e}", dir.display()))
}
