//! Similarity scores between two images (spec §6, §8). Convention: higher = more similar = more
//! in-distribution. Every function returns one value per batch item.

use candle_core::{DType, Tensor};

use crate::model::Classifier;
use crate::{EngineError, Result};

/// A learned perceptual similarity between two batches of images in \[0,1\] (DISTS implements it:
/// 1 − DISTS distance). Inputs are not clamped by the caller where the spec says so (early stop).
pub trait ImageSimilarity: Send + Sync {
    /// One similarity per batch item, higher = more similar.
    fn similarity(&self, a01: &Tensor, b01: &Tensor) -> Result<Vec<f64>>;
}

fn check_pair(a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() {
        return Err(EngineError::InvalidInput(format!(
            "cannot compare images of shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    Ok(())
}

/// Per-item mean of (a − b)² over all non-batch axes.
fn mse(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    check_pair(a, b)?;
    let n = a.dim(0)?;
    let d = (a - b)?.sqr()?.reshape((n, ()))?.mean(1)?;
    Ok(d.to_dtype(DType::F64)?.to_vec1()?)
}

/// The reference code's PSNR: 20·log10(255/√MSE) on data in \[-1,1\] without rescaling ("code
/// units": paper dB + 42.11). Identical images give +∞.
pub fn psnr_code(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    Ok(mse(a, b)?
        .into_iter()
        .map(|m| 20.0 * (255.0 / m.sqrt()).log10())
        .collect())
}

/// The MSE in \[-1,1\] units at which [`psnr_code`] equals `psnr` (48.5 ⇔ 0.9186).
pub fn mse_at_psnr_code(psnr: f64) -> f64 {
    (255.0 / 10f64.powf(psnr / 20.0)).powi(2)
}

/// −‖a − b‖₂ over C, H, W.
pub fn l2_similarity(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    check_pair(a, b)?;
    let n = a.dim(0)?;
    let s = (a - b)?.sqr()?.reshape((n, ()))?.sum(1)?.sqrt()?;
    Ok(s.to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|v| -v)
        .collect())
}

/// −Σ_c |logits_a − logits_b| (the CIFAR-10 "logits" distance).
pub fn logits_l1_similarity(logits_a: &Tensor, logits_b: &Tensor) -> Result<Vec<f64>> {
    check_pair(logits_a, logits_b)?;
    let n = logits_a.dim(0)?;
    let s = (logits_a - logits_b)?.abs()?.reshape((n, ()))?.sum(1)?;
    Ok(s.to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|v| -v)
        .collect())
}

/// −‖a − b‖₂ as an [`ImageSimilarity`].
#[derive(Debug, Clone, Copy, Default)]
pub struct L2Similarity;

impl ImageSimilarity for L2Similarity {
    fn similarity(&self, a01: &Tensor, b01: &Tensor) -> Result<Vec<f64>> {
        l2_similarity(a01, b01)
    }
}

/// Logits-L1 through a classifier, as an [`ImageSimilarity`].
pub struct LogitsL1Similarity<'a> {
    pub classifier: &'a dyn Classifier,
}

impl ImageSimilarity for LogitsL1Similarity<'_> {
    fn similarity(&self, a01: &Tensor, b01: &Tensor) -> Result<Vec<f64>> {
        let la = self.classifier.forward(a01)?.logits;
        let lb = self.classifier.forward(b01)?.logits;
        logits_l1_similarity(&la, &lb)
    }
}

/// clamp((x + 1)/2, 0, 1): the \[0,1\] view every classifier and DISTS call sees.
pub fn to_unit(x: &Tensor) -> Result<Tensor> {
    Ok(x.affine(0.5, 0.5)?.clamp(0f32, 1f32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn psnr_threshold_mapping() {
        // Spec §6: 48.5 code units ⇔ MSE 0.9186 on [-1,1] data.
        assert!((mse_at_psnr_code(48.5) - 0.9186).abs() < 1e-4);
        let a = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let b = (a.ones_like().unwrap() * 0.9186f64.sqrt()).unwrap();
        let p = psnr_code(&a, &b).unwrap()[0];
        assert!((p - 48.5).abs() < 1e-3, "psnr {p}");
    }

    #[test]
    fn distances_are_negated() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &dev).unwrap();
        let b = Tensor::new(&[[1f32, 0., 6.], [0., 0., 0.]], &dev).unwrap();
        assert_eq!(logits_l1_similarity(&a, &b).unwrap(), vec![-5.0, 0.0]);
        let l2 = l2_similarity(&a, &b).unwrap();
        assert!((l2[0] + 13f64.sqrt()).abs() < 1e-6 && l2[1] == 0.0);
    }
}
