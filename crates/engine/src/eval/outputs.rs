//! Running the protected classifier over a dataset, and every logit/feature baseline on the
//! result — the inputs `eval` and `calibrate` need.

use std::collections::BTreeMap;

use candle_core::{D, Device, Tensor};

use super::baselines::{Knn, Vim, energy, max_logit, msp};
use crate::data::{Dataset, PixelRange};
use crate::{Classifier, EngineError, LabelId, Result};

/// The classifier's outputs on a whole dataset, in dataset order.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// (N, classes)
    pub logits: Tensor,
    /// (N, D) penultimate features.
    pub penultimate: Tensor,
    /// Arg-max of the logits: the label the guard would see.
    pub predicted: Vec<LabelId>,
}

/// Runs `classifier` on `data` in batches of `batch` images ([0,1] inputs; grey images are
/// repeated to 3 channels, the [`Classifier`] contract).
pub fn collect_outputs(
    classifier: &dyn Classifier,
    data: &Dataset,
    batch: usize,
    device: &Device,
) -> Result<Outputs> {
    if batch == 0 || data.is_empty() {
        return Err(EngineError::InvalidInput(
            "collect_outputs: empty dataset or zero batch size".into(),
        ));
    }
    let data = if data.image_shape()[0] == 3 {
        data.clone()
    } else {
        data.to_rgb()?
    };
    let indices: Vec<usize> = (0..data.len()).collect();
    let mut logits = Vec::new();
    let mut features = Vec::new();
    for chunk in indices.chunks(batch) {
        let x = data.batch_tensor(chunk, PixelRange::ZeroOne, device)?;
        let out = classifier.forward(&x)?;
        logits.push(out.logits);
        features.push(out.penultimate);
    }
    let logits = Tensor::cat(&logits, 0)?;
    let predicted = logits
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(LabelId)
        .collect();
    Ok(Outputs {
        logits,
        penultimate: Tensor::cat(&features, 0)?,
        predicted,
    })
}

/// The feature-based baselines, fitted on training outputs.
#[derive(Debug, Clone)]
pub struct FittedBaselines {
    pub knn: Knn,
    /// Absent when the classifier's fc layer was not supplied.
    pub vim: Option<Vim>,
}

impl FittedBaselines {
    /// KNN with bank = the training penultimate features; ViM when `fc` = (weight, bias) is given.
    pub fn fit(
        train: &Outputs,
        k: usize,
        fc: Option<(&Tensor, &Tensor)>,
        vim_dim: usize,
    ) -> Result<Self> {
        let vim = match fc {
            Some((w, b)) => Some(Vim::fit(&train.penultimate, w, b, vim_dim)?),
            None => None,
        };
        Ok(Self {
            knn: Knn::fit(&train.penultimate, k)?,
            vim,
        })
    }

    /// Every baseline's scores on `outputs`, keyed by the names used in the paper's tables.
    pub fn score_all(&self, outputs: &Outputs) -> Result<BTreeMap<&'static str, Vec<f64>>> {
        let mut scores = BTreeMap::new();
        scores.insert("MSP", msp(&outputs.logits)?);
        scores.insert("EBO", energy(&outputs.logits)?);
        scores.insert("MLS", max_logit(&outputs.logits)?);
        scores.insert("KNN", self.knn.score(&outputs.penultimate)?);
        if let Some(vim) = &self.vim {
            scores.insert("ViM", vim.score(&outputs.penultimate)?);
        }
        Ok(scores)
    }
}
