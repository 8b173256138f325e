//! The training set in memory, the per-epoch batch order and light augmentation.

use candle_core::{Device, Tensor};
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::rng::{Purpose, derived};
use crate::{EngineError, LabelId, Result};

/// Images (N, C, H, W) as f32 in the range the model trains on, with one label each.
#[derive(Debug, Clone)]
pub struct InMemoryDataset {
    pixels: Vec<f32>,
    labels: Vec<u32>,
    chw: (usize, usize, usize),
}

impl InMemoryDataset {
    pub fn new(pixels: Vec<f32>, labels: Vec<u32>, chw: (usize, usize, usize)) -> Result<Self> {
        let per = chw.0 * chw.1 * chw.2;
        if per == 0 || labels.is_empty() || pixels.len() != labels.len() * per {
            return Err(EngineError::InvalidInput(format!(
                "dataset of {} labels and {} values does not fit images of {chw:?}",
                labels.len(),
                pixels.len()
            )));
        }
        Ok(Self {
            pixels,
            labels,
            chw,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn chw(&self) -> (usize, usize, usize) {
        self.chw
    }

    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The first `n` items (for quick runs and tests).
    pub fn truncate(mut self, n: usize) -> Self {
        let per = self.chw.0 * self.chw.1 * self.chw.2;
        let n = n.min(self.len()).max(1);
        self.labels.truncate(n);
        self.pixels.truncate(n * per);
        self
    }

    /// The images followed by their left-right mirror images (same labels): a fixed flip
    /// augmentation for data that is transformed once before training (latents).
    pub fn with_mirrors(&self) -> Self {
        let (c, h, w) = self.chw;
        let mut pixels = self.pixels.clone();
        pixels.extend(
            self.pixels
                .chunks_exact(w)
                .flat_map(|row| row.iter().rev().copied()),
        );
        let mut labels = self.labels.clone();
        labels.extend_from_slice(&self.labels);
        debug_assert_eq!(pixels.len(), labels.len() * c * h * w);
        Self {
            pixels,
            labels,
            chw: self.chw,
        }
    }

    /// Gathers `indices` into an (B, C, H, W) tensor, augmenting each image with `rng`.
    pub fn batch(
        &self,
        indices: &[usize],
        augment: &Augment,
        rng: &mut StdRng,
        device: &Device,
    ) -> Result<(Tensor, Vec<LabelId>)> {
        let (c, h, w) = self.chw;
        let per = c * h * w;
        let mut out = Vec::with_capacity(indices.len() * per);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let img = self.pixels.get(i * per..(i + 1) * per).ok_or_else(|| {
                EngineError::InvalidInput(format!("index {i} outside dataset of {}", self.len()))
            })?;
            augment.apply(img, self.chw, rng, &mut out);
            labels.push(LabelId(self.labels[i]));
        }
        Ok((
            Tensor::from_vec(out, (indices.len(), c, h, w), device)?,
            labels,
        ))
    }
}

/// Random horizontal flip and random translation by up to `max_shift` pixels (zero fill: the
/// background of Fashion-MNIST/MNIST is 0 in [0,1], `fill` lets [-1,1] data use -1).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Augment {
    pub hflip: bool,
    pub max_shift: usize,
    pub fill: f32,
}

impl Augment {
    pub fn none() -> Self {
        Self::default()
    }

    fn apply(&self, img: &[f32], chw: (usize, usize, usize), rng: &mut StdRng, out: &mut Vec<f32>) {
        // Always draw the same numbers so the stream does not depend on which options are on.
        let flip = rng.random::<bool>() && self.hflip;
        let s = self.max_shift as i64;
        let (dy, dx) = (rng.random_range(-s..=s), rng.random_range(-s..=s));
        let (c, h, w) = chw;
        for ch in 0..c {
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let (sy, sx0) = (y - dy, x - dx);
                    let sx = if flip { w as i64 - 1 - sx0 } else { sx0 };
                    let v = if (0..h as i64).contains(&sy) && (0..w as i64).contains(&sx) {
                        img[ch * h * w + sy as usize * w + sx as usize]
                    } else {
                        self.fill
                    };
                    out.push(v);
                }
            }
        }
    }
}

/// Which items step `k` trains on: epochs are seeded shuffles, the last partial batch of an
/// epoch is dropped so that every step has the same batch size.
#[derive(Debug, Clone)]
pub struct BatchOrder {
    n: usize,
    batch: usize,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl BatchOrder {
    pub fn new(n: usize, batch: usize, seed: u64) -> Result<Self> {
        if batch == 0 || batch > n {
            return Err(EngineError::Config(format!(
                "batch size {batch} must be between 1 and the dataset size {n}"
            )));
        }
        Ok(Self {
            n,
            batch,
            seed,
            cached: None,
        })
    }

    pub fn steps_per_epoch(&self) -> u64 {
        (self.n / self.batch) as u64
    }

    pub fn indices(&mut self, step: u64) -> &[usize] {
        let spe = self.steps_per_epoch();
        let (epoch, within) = (step / spe, (step % spe) as usize);
        if self.cached.as_ref().map(|c| c.0) != Some(epoch) {
            let mut perm: Vec<usize> = (0..self.n).collect();
            perm.shuffle(&mut derived(self.seed, Purpose::Epoch(epoch)));
            self.cached = Some((epoch, perm));
        }
        match &self.cached {
            Some((_, perm)) => &perm[within * self.batch..(within + 1) * self.batch],
            None => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_visits_each_item_at_most_once() {
        let mut order = BatchOrder::new(10, 3, 5).unwrap();
        assert_eq!(order.steps_per_epoch(), 3);
        let mut seen: Vec<usize> = (0..3).flat_map(|k| order.indices(k).to_vec()).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 9);
        let next_epoch = order.indices(3).to_vec();
        let mut again = BatchOrder::new(10, 3, 5).unwrap();
        assert_eq!(again.indices(3), next_epoch.as_slice());
    }

    #[test]
    fn mirrors_reverse_every_row_of_every_channel() {
        // 2 images of 2×2×3 holding 0..24; mirrors follow with the same labels.
        let ds = InMemoryDataset::new((0..24).map(|v| v as f32).collect(), vec![4, 7], (2, 2, 3))
            .unwrap();
        let m = ds.with_mirrors();
        assert_eq!(m.len(), 4);
        assert_eq!(m.labels(), &[4, 7, 4, 7]);
        let (x, _) = m
            .batch(
                &[2],
                &Augment::none(),
                &mut derived(0, Purpose::Step(0)),
                &Device::Cpu,
            )
            .unwrap();
        let got: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let want = [2., 1., 0., 5., 4., 3., 8., 7., 6., 11., 10., 9.];
        assert_eq!(got, want);
    }

    #[test]
    fn flip_and_shift_move_pixels_as_stated() {
        // A 1×3×3 image 0..9; find an rng draw that flips with zero shift by trying seeds.
        let img: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let aug = Augment {
            hflip: true,
            max_shift: 1,
            fill: -1.0,
        };
        let mut saw_flip = false;
        for seed in 0..200 {
            let mut out = Vec::new();
            aug.apply(
                &img,
                (1, 3, 3),
                &mut derived(seed, Purpose::Step(0)),
                &mut out,
            );
            if out == [2., 1., 0., 5., 4., 3., 8., 7., 6.] {
                saw_flip = true;
            }
            // Every output pixel is fill or a source pixel; a shift of ≤1 in y and x fills ≤5.
            assert!(out.iter().all(|v| *v == -1.0 || img.contains(v)));
            assert!(out.iter().filter(|v| **v == -1.0).count() <= 5);
        }
        assert!(saw_flip);
    }
}
