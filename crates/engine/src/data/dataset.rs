//! The common in-memory dataset: N images of one shape C×H×W plus a label per image.

use candle_core::{Device, Tensor};

use crate::{EngineError, LabelId, Result};

/// Pixel storage, row-major N×C×H×W.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// 8-bit values, 0..=255 ↦ [0,1]. Every real loader produces this.
    U8(Vec<u8>),
    /// Values already in [0,1] (synthetic or processed data).
    F32(Vec<f32>),
}

impl Pixels {
    fn len(&self) -> usize {
        match self {
            Pixels::U8(v) => v.len(),
            Pixels::F32(v) => v.len(),
        }
    }
}

/// The value range a tensor is produced in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelRange {
    /// [0,1]: the classifier's input convention.
    ZeroOne,
    /// [-1,1]: the diffusion models' convention.
    MinusOneOne,
}

/// N images of shape C×H×W with one label each.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    name: String,
    shape: [usize; 3],
    pixels: Pixels,
    labels: Vec<LabelId>,
    class_names: Vec<String>,
}

impl Dataset {
    /// Checks that the pixel count is `labels.len() · C·H·W`, f32 pixels lie in [0,1] and every
    /// label names a class.
    pub fn new(
        name: impl Into<String>,
        shape: [usize; 3],
        pixels: Pixels,
        labels: Vec<LabelId>,
        class_names: Vec<String>,
    ) -> Result<Self> {
        let name = name.into();
        let per_image: usize = shape.iter().product();
        if per_image == 0 {
            return Err(EngineError::InvalidInput(format!(
                "dataset {name}: empty image shape {shape:?}"
            )));
        }
        if pixels.len() != labels.len() * per_image {
            return Err(EngineError::InvalidInput(format!(
                "dataset {name}: {} pixel values for {} images of shape {shape:?}",
                pixels.len(),
                labels.len()
            )));
        }
        if let Pixels::F32(v) = &pixels
            && let Some(bad) = v.iter().find(|p| !(0.0..=1.0).contains(*p))
        {
            return Err(EngineError::InvalidInput(format!(
                "dataset {name}: pixel value {bad} outside [0,1]"
            )));
        }
        if let Some(bad) = labels.iter().find(|l| l.0 as usize >= class_names.len()) {
            return Err(EngineError::InvalidInput(format!(
                "dataset {name}: label {} but only {} classes",
                bad.0,
                class_names.len()
            )));
        }
        Ok(Self {
            name,
            shape,
            pixels,
            labels,
            class_names,
        })
    }

    /// The same dataset under another name.
    pub fn with_name(self, name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..self
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// C, H, W of every image.
    pub fn image_shape(&self) -> [usize; 3] {
        self.shape
    }

    pub fn labels(&self) -> &[LabelId] {
        &self.labels
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn pixels(&self) -> &Pixels {
        &self.pixels
    }

    fn per_image(&self) -> usize {
        self.shape.iter().product()
    }

    /// Pixel (c, y, x) of image `i` in [0,1], or `None` when out of range.
    pub fn pixel(&self, i: usize, c: usize, y: usize, x: usize) -> Option<f32> {
        let [ch, h, w] = self.shape;
        if i >= self.len() || c >= ch || y >= h || x >= w {
            return None;
        }
        let at = i * self.per_image() + (c * h + y) * w + x;
        Some(match &self.pixels {
            Pixels::U8(v) => f32::from(v[at]) / 255.0,
            Pixels::F32(v) => v[at],
        })
    }

    /// The raw 8-bit pixels of image `i` (C·H·W values), when stored as u8.
    pub fn image_u8(&self, i: usize) -> Option<&[u8]> {
        match &self.pixels {
            Pixels::U8(v) if i < self.len() => {
                Some(&v[i * self.per_image()..(i + 1) * self.per_image()])
            }
            _ => None,
        }
    }

    /// The images at `indices` (in that order), as a new dataset.
    pub fn select(&self, indices: &[usize]) -> Result<Dataset> {
        let n = self.per_image();
        if let Some(bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(EngineError::InvalidInput(format!(
                "dataset {}: index {bad} out of {} images",
                self.name,
                self.len()
            )));
        }
        let pixels = match &self.pixels {
            Pixels::U8(v) => Pixels::U8(gather(v, indices, n)),
            Pixels::F32(v) => Pixels::F32(gather(v, indices, n)),
        };
        Ok(Dataset {
            name: self.name.clone(),
            shape: self.shape,
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            class_names: self.class_names.clone(),
        })
    }

    /// A seeded stratified subset of `n` images (all when `n ≥ len`), in original order; see
    /// [`super::stratified_subset`].
    pub fn stratified(&self, n: usize, seed: u64) -> Result<Dataset> {
        self.select(&super::stratified_subset(&self.labels, n, seed))
    }

    /// Same images with the single grey channel repeated three times (for RGB classifiers).
    /// A dataset that already has 3 channels is returned unchanged.
    pub fn to_rgb(&self) -> Result<Dataset> {
        match self.shape[0] {
            3 => Ok(self.clone()),
            1 => {
                let pixels = match &self.pixels {
                    Pixels::U8(v) => Pixels::U8(repeat_channel(v, self.per_image())),
                    Pixels::F32(v) => Pixels::F32(repeat_channel(v, self.per_image())),
                };
                Ok(Dataset {
                    shape: [3, self.shape[1], self.shape[2]],
                    pixels,
                    ..self.clone()
                })
            }
            c => Err(EngineError::InvalidInput(format!(
                "dataset {}: cannot make RGB from {c} channels",
                self.name
            ))),
        }
    }

    /// All images as an f32 tensor (N, C, H, W) in `range`.
    pub fn to_tensor(&self, range: PixelRange, device: &Device) -> Result<Tensor> {
        let all: Vec<usize> = (0..self.len()).collect();
        self.batch_tensor(&all, range, device)
    }

    /// The images at `indices` as an f32 tensor (len, C, H, W) in `range`.
    pub fn batch_tensor(
        &self,
        indices: &[usize],
        range: PixelRange,
        device: &Device,
    ) -> Result<Tensor> {
        let n = self.per_image();
        if let Some(bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(EngineError::InvalidInput(format!(
                "dataset {}: index {bad} out of {} images",
                self.name,
                self.len()
            )));
        }
        let (scale, offset) = match range {
            PixelRange::ZeroOne => (1.0f32, 0.0f32),
            PixelRange::MinusOneOne => (2.0, -1.0),
        };
        let mut out = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            let span = i * n..(i + 1) * n;
            match &self.pixels {
                Pixels::U8(v) => out.extend(
                    v[span]
                        .iter()
                        .map(|&p| f32::from(p) / 255.0 * scale + offset),
                ),
                Pixels::F32(v) => out.extend(v[span].iter().map(|&p| p * scale + offset)),
            }
        }
        let [c, h, w] = self.shape;
        Ok(Tensor::from_vec(out, (indices.len(), c, h, w), device)?)
    }
}

fn gather<T: Copy>(v: &[T], indices: &[usize], n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(indices.len() * n);
    for &i in indices {
        out.extend_from_slice(&v[i * n..(i + 1) * n]);
    }
    out
}

fn repeat_channel<T: Copy>(v: &[T], n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len() * 3);
    for image in v.chunks_exact(n) {
        for _ in 0..3 {
            out.extend_from_slice(image);
        }
    }
    out
}
