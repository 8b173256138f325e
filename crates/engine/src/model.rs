//! The traits the DiffGuard algorithm is written against. No concrete architecture appears in the
//! algorithm modules; the networks in [`crate::models`] implement these.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::Result;

/// A class index in a model's label space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LabelId(pub u32);

/// An ε-prediction diffusion network.
pub trait Denoiser: Send + Sync {
    /// Predicted noise ε for `x_t` (N,C,H,W) at the ORIGINAL integer timesteps `t` (one per batch
    /// item). `labels = None` means unconditional; a conditional model then uses its null label.
    /// Returns only the ε channels (a learn-sigma model drops its variance channels).
    fn eps(&self, x_t: &Tensor, t: &[u32], labels: Option<&[LabelId]>) -> Result<Tensor>;

    /// The label that means "no class" (classifier-free guidance), if the model is conditional.
    fn null_label(&self) -> Option<LabelId>;

    /// Number of real classes (0 for an unconditional model).
    fn num_classes(&self) -> usize;
}

/// What a classifier forward pass exposes.
#[derive(Debug, Clone)]
pub struct ClassifierOutput {
    /// Raw logits (N, num_classes).
    pub logits: Tensor,
    /// Penultimate features (N, D): the flattened global average pool.
    pub penultimate: Tensor,
    /// Last convolutional activation map (N, C, h, w): the Grad-CAM layer.
    pub features: Tensor,
}

/// The classifier under protection. Inputs are images in [0,1] (N,3,H,W); any normalisation is
/// inside the model.
pub trait Classifier: Send + Sync {
    /// Logits, penultimate features and the last activation map.
    fn forward(&self, x01: &Tensor) -> Result<ClassifierOutput>;

    /// ∂/∂x01 of Σ_i log_softmax(f(x01_i))[labels_i] (Clean Grad's loss), same shape as `x01`.
    fn log_prob_input_grad(&self, x01: &Tensor, labels: &[LabelId]) -> Result<Tensor>;

    /// Grad-CAM at the last activation map for the raw logit of `labels`: ReLU(Σ_c w_c A_c) with
    /// w_c = mean_hw ∂z_y/∂A_c, shape (N, h, w), not normalised (spec §7 step 1).
    fn grad_cam(&self, x01: &Tensor, labels: &[LabelId]) -> Result<Tensor>;

    /// Number of classes.
    fn num_classes(&self) -> usize;
}

/// The first stage of a latent recipe.
pub trait Autoencoder: Send + Sync {
    /// Image in [-1,1] → latent, before any quantisation (the LDM inversion start).
    fn encode(&self, x: &Tensor) -> Result<Tensor>;
    /// Latent → image in [-1,1] (not clamped), quantising first where the model has a codebook.
    fn decode(&self, z: &Tensor) -> Result<Tensor>;
}
