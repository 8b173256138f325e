//! Fashion-MNIST (the in-distribution set) and its fixed splits.
//!
//! The official files hold 60,000 training and 10,000 test images. The project splits them as
//! - **train**: 55,000 images of the official training file, for fitting models and the KNN bank;
//! - **validation**: the other 5,000 — exactly [`VALIDATION_PER_CLASS`] per class, the first ones
//!   of each class in the order of [`super::hash_order`] with seed [`SPLIT_SEED`] — used only to
//!   calibrate thresholds;
//! - **test**: the official 10,000 test images, used only for evaluation.
//!
//! Images keep their order from the official file inside each split.

use std::path::Path;

use super::split::classes_in_hash_order;
use super::{Dataset, Pixels, format_err, read_idx};
use crate::{LabelId, Result};

/// Class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Seed of the train/validation split. Changing it changes every calibrated threshold.
pub const SPLIT_SEED: u64 = 20_230_601;

/// Validation images per class (10 classes → 5,000).
pub const VALIDATION_PER_CLASS: usize = 500;

/// Which of the fixed splits to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FashionSplit {
    /// 55,000 images for training.
    Train,
    /// 5,000 images for calibration.
    Validation,
    /// The official 10,000 test images, for evaluation only.
    Test,
}

/// Loads one split from `dir` (the `fashion-mnist` folder of the data directory).
pub fn fashion_mnist(dir: &Path, split: FashionSplit) -> Result<Dataset> {
    let prefix = match split {
        FashionSplit::Train | FashionSplit::Validation => "train",
        FashionSplit::Test => "t10k",
    };
    let all = load_pair(dir, prefix)?;
    let name = match split {
        FashionSplit::Train => "fashion-mnist/train",
        FashionSplit::Validation => "fashion-mnist/validation",
        FashionSplit::Test => "fashion-mnist/test",
    };
    match split {
        FashionSplit::Test => Ok(all.with_name(name)),
        FashionSplit::Train | FashionSplit::Validation => {
            let (train, validation) = fashion_mnist_split_indices(all.labels());
            let keep = if split == FashionSplit::Train {
                train
            } else {
                validation
            };
            Ok(all.select(&keep)?.with_name(name))
        }
    }
}

/// The (train, validation) indices into the official training file, each sorted ascending.
pub fn fashion_mnist_split_indices(labels: &[LabelId]) -> (Vec<usize>, Vec<usize>) {
    let mut in_validation = vec![false; labels.len()];
    for members in classes_in_hash_order(labels, SPLIT_SEED).values() {
        for &i in members.iter().take(VALIDATION_PER_CLASS) {
            in_validation[i] = true;
        }
    }
    (0..labels.len()).partition(|&i| !in_validation[i])
}

/// Reads `{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz` as one dataset.
fn load_pair(dir: &Path, prefix: &str) -> Result<Dataset> {
    let images_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
    let labels_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
    let (dims, pixels) = read_idx(&images_path, 3)?;
    let (ldims, labels) = read_idx(&labels_path, 1)?;
    if dims[1..] != [28, 28] {
        return Err(format_err(
            &images_path,
            "Fashion-MNIST images",
            format!("image size {}×{}, expected 28×28", dims[1], dims[2]),
        ));
    }
    if ldims[0] != dims[0] {
        return Err(format_err(
            &labels_path,
            "Fashion-MNIST labels",
            format!("{} labels for {} images", ldims[0], dims[0]),
        ));
    }
    if let Some(bad) = labels
        .iter()
        .find(|&&l| usize::from(l) >= FASHION_MNIST_CLASSES.len())
    {
        return Err(format_err(
            &labels_path,
            "Fashion-MNIST labels",
            format!("label {bad} outside 0..=9"),
        ));
    }
    Dataset::new(
        format!("fashion-mnist/{prefix}"),
        [1, 28, 28],
        Pixels::U8(pixels),
        labels.into_iter().map(|l| LabelId(u32::from(l))).collect(),
        FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    )
}
