//! Image files: users' own folders (`class/name.png`) and the foolbox test fixtures
//! (`KIND_NN_LABEL.png`).

use std::path::{Path, PathBuf};

use image::DynamicImage;

use super::{Dataset, Pixels, format_err, io_err};
use crate::{EngineError, LabelId, Result};

/// Channel layout of the loaded images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorMode {
    /// Grey when the first image has no colour channels, RGB otherwise.
    #[default]
    Auto,
    Gray,
    Rgb,
}

/// How an image folder is turned into one dataset.
#[derive(Debug, Clone, Copy, Default)]
pub struct FolderOptions {
    pub color: ColorMode,
    /// Resize every image to (width, height) with a triangle filter. Without it all images must
    /// already share one size.
    pub size: Option<(u32, u32)>,
}

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// Loads `root/CLASS/IMAGE` files: classes are the subfolders in sorted (byte) order, labelled
/// 0, 1, …; images within a class in sorted file-name order. Files whose extension is not an
/// image format (png, jpg, jpeg, webp) and hidden entries are ignored.
pub fn image_folder(root: &Path, options: &FolderOptions) -> Result<Dataset> {
    let classes = sorted_entries(root, |p| p.is_dir())?;
    if classes.is_empty() {
        return Err(EngineError::InvalidInput(format!(
            "{}: no class subfolders (expected ROOT/CLASS/IMAGE.png)",
            root.display()
        )));
    }
    let mut files = Vec::new();
    let mut class_names = Vec::new();
    for (label, dir) in classes.iter().enumerate() {
        class_names.push(file_name(dir));
        for f in sorted_entries(dir, |p| p.is_file() && has_image_extension(p))? {
            files.push((f, LabelId(label as u32)));
        }
    }
    let name = file_name(root);
    decode_all(&name, &files, class_names, options)
}

/// Loads the foolbox fixtures `dir/{kind}_{NN}_{LABEL}.png` (kind: `cifar10`, `cifar100`,
/// `mnist`, `fashionMNIST`), ordered by NN, labelled by LABEL. Classes are named "0".."max label".
pub fn png_fixtures(dir: &Path, kind: &str) -> Result<Dataset> {
    let mut found: Vec<(usize, PathBuf, u32)> = Vec::new();
    for path in sorted_entries(dir, |p| p.is_file())? {
        let name = file_name(&path);
        let Some(rest) = name
            .strip_prefix(kind)
            .and_then(|r| r.strip_prefix('_'))
            .and_then(|r| r.strip_suffix(".png"))
        else {
            continue;
        };
        let parsed = rest
            .split_once('_')
            .and_then(|(nn, label)| Some((nn.parse().ok()?, label.parse().ok()?)));
        match parsed {
            Some((nn, label)) => found.push((nn, path, label)),
            None => {
                return Err(format_err(
                    &path,
                    "fixture name",
                    "expected KIND_NN_LABEL.png",
                ));
            }
        }
    }
    if found.is_empty() {
        return Err(EngineError::InvalidInput(format!(
            "{}: no {kind}_NN_LABEL.png files",
            dir.display()
        )));
    }
    found.sort_by_key(|f| f.0);
    let classes = found.iter().map(|f| f.2).max().unwrap_or(0) + 1;
    let files: Vec<_> = found.into_iter().map(|(_, p, l)| (p, LabelId(l))).collect();
    let names = (0..classes).map(|c| c.to_string()).collect();
    decode_all(kind, &files, names, &FolderOptions::default())
}

fn decode_all(
    name: &str,
    files: &[(PathBuf, LabelId)],
    class_names: Vec<String>,
    options: &FolderOptions,
) -> Result<Dataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::with_capacity(files.len());
    let mut shape: Option<[usize; 3]> = None;
    let mut color = options.color;
    for (path, label) in files {
        let img = decode(path)?;
        let img = match options.size {
            Some((w, h)) => img.resize_exact(w, h, image::imageops::FilterType::Triangle),
            None => img,
        };
        if color == ColorMode::Auto {
            color = if img.color().has_color() {
                ColorMode::Rgb
            } else {
                ColorMode::Gray
            };
        }
        let (channels, data) = match color {
            ColorMode::Gray => (1, img.to_luma8().into_raw()),
            _ => (3, planar_rgb(&img)),
        };
        let this = [channels, img.height() as usize, img.width() as usize];
        match shape {
            None => shape = Some(this),
            Some(s) if s != this => {
                return Err(format_err(
                    path,
                    "image",
                    format!(
                        "size {}×{} differs from the first image's {}×{}; pass a resize size",
                        this[2], this[1], s[2], s[1]
                    ),
                ));
            }
            Some(_) => {}
        }
        pixels.extend(data);
        labels.push(*label);
    }
    let shape = shape.ok_or_else(|| EngineError::InvalidInput(format!("{name}: no images")))?;
    Dataset::new(name, shape, Pixels::U8(pixels), labels, class_names)
}

fn decode(path: &Path) -> Result<DynamicImage> {
    image::ImageReader::open(path)
        .map_err(io_err(path))?
        .with_guessed_format()
        .map_err(io_err(path))?
        .decode()
        .map_err(|e| format_err(path, "image", e.to_string()))
}

/// RGB as three planes (C×H×W), the tensor layout.
fn planar_rgb(img: &DynamicImage) -> Vec<u8> {
    let rgb = img.to_rgb8();
    let hw = (rgb.width() * rgb.height()) as usize;
    let mut out = vec![0u8; 3 * hw];
    for (i, px) in rgb.pixels().enumerate() {
        for c in 0..3 {
            out[c * hw + i] = px.0[c];
        }
    }
    out
}

fn sorted_entries(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if !file_name(&path).starts_with('.') && keep(&path) {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| EXTENSIONS.contains(&e.as_str()))
}
