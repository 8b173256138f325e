//! CompVis LDM `ClassEmbedder` (`cond_stage_model.embedding.weight`): a class id becomes the
//! cross-attention context (B, 1, D). In cin256-v2 the table has 1001 rows and row 1000 is the
//! null class DiffGuard uses for unconditional predictions (`LDMWrapper.get_uc_and_c`).

use candle_core::Tensor;
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::layers::{apply, label_tensor};
use crate::{EngineError, LabelId, Result};

/// `ClassEmbedder(n_classes, embed_dim)`; the null class is the last row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassEmbedderConfig {
    pub n_classes: usize,
    pub embed_dim: usize,
}

impl ClassEmbedderConfig {
    /// cin256-v2: 1000 ImageNet classes + null, 512-d context.
    pub fn cin256_v2() -> Self {
        Self {
            n_classes: 1001,
            embed_dim: 512,
        }
    }

    /// The `class_embedder` golden.
    pub fn golden_tiny() -> Self {
        Self {
            n_classes: 1001,
            embed_dim: 64,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClassEmbedder {
    config: ClassEmbedderConfig,
    embedding: Embedding,
}

impl ClassEmbedder {
    /// `vb` points at `cond_stage_model`.
    pub fn new(vb: VarBuilder, config: ClassEmbedderConfig) -> Result<Self> {
        if config.n_classes < 2 {
            return Err(EngineError::Config(
                "class embedder needs at least one class and the null row".into(),
            ));
        }
        let embedding =
            candle_nn::embedding(config.n_classes, config.embed_dim, vb.pp("embedding"))?;
        Ok(Self { config, embedding })
    }

    pub fn config(&self) -> &ClassEmbedderConfig {
        &self.config
    }

    /// The null ("no class") label: the last row (1000 in cin256-v2).
    pub fn null_label(&self) -> LabelId {
        LabelId((self.config.n_classes - 1) as u32)
    }

    /// Context (B, 1, embed_dim) for the given labels; any row including the null one is valid.
    pub fn forward(&self, labels: &[LabelId]) -> Result<Tensor> {
        if let Some(bad) = labels
            .iter()
            .find(|l| l.0 as usize >= self.config.n_classes)
        {
            return Err(EngineError::InvalidInput(format!(
                "label {} out of range for {} embedder rows",
                bad.0, self.config.n_classes
            )));
        }
        let ids: Vec<u32> = labels.iter().map(|l| l.0).collect();
        let ids = label_tensor(&ids, self.embedding.embeddings().device())?;
        let e = apply(&self.embedding, &ids)?;
        Ok(e.unsqueeze(1)?)
    }
}
