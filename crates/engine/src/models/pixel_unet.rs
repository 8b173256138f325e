//! The project's own class-conditional pixel DDPM UNet for 28×28 grey images (Fashion-MNIST),
//! trained from scratch with classifier-free guidance in mind: the label table has
//! `num_classes + 1` rows and the last row is the null label.
//!
//! Design: the ADM skeleton of [`super::adm_unet`] (scale-shift norm, resampling inside the
//! ResBlocks, legacy multi-head attention), run on 28×28 directly — no padding to 32: the
//! resblock down-sampling is a 2×2 average pool, so the levels are 28 → 14 → 7 and the nearest ×2
//! upsampling returns exactly 7 → 14 → 28. Attention only at 7×7 (49 tokens), where it is cheap.
//! Weight names follow ADM (`time_embed.*`, `label_emb.weight`, `input_blocks.*`, ...).
//! ε-prediction, no learned variance.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::adm_unet::{AttentionBlock, ContextLayer, UNetModel, UNetSpec};
use crate::{Denoiser, EngineError, LabelId, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PixelUNetConfig {
    /// Side of the square input (must be divisible by 2^(levels-1)).
    pub image_size: usize,
    pub in_channels: usize,
    pub model_channels: usize,
    pub channel_mult: Vec<usize>,
    pub num_res_blocks: usize,
    /// Downsampling factors with self-attention.
    pub attention_ds: Vec<usize>,
    pub num_head_channels: usize,
    /// Real classes; the null label is `num_classes`.
    pub num_classes: usize,
}

impl PixelUNetConfig {
    /// The Fashion-MNIST model: 32/64/64 channels, 2 ResBlocks per level, attention at 7×7
    /// (1.92 M parameters). Measured on candle's CPU backend: ≈14 CPU-seconds per forward+backward
    /// at batch 32 (≈10.6 with `num_res_blocks: 1`, 1.37 M parameters); see the ignored
    /// `fashion_train_step_timing` probe in `tests/models_unet_pixel.rs`.
    pub fn fashion_mnist() -> Self {
        Self {
            image_size: 28,
            in_channels: 1,
            model_channels: 32,
            channel_mult: vec![1, 2, 2],
            num_res_blocks: 2,
            attention_ds: vec![4],
            num_head_channels: 32,
            num_classes: 10,
        }
    }

    /// The latent prior for [`crate::models::vq::VqConfig::fashion_mnist`]'s 7×7×3 latents: one
    /// level of 64 channels (7 is odd, so there is nothing to halve), two ResBlocks per stage,
    /// attention over the 49 positions. Measured on 2 threads of the project's CPU machine: 129
    /// training images/s (169 with one ResBlock; `train_diffusion --latent --profile`).
    pub fn fashion_mnist_latent() -> Self {
        Self {
            image_size: 7,
            in_channels: 3,
            model_channels: 64,
            channel_mult: vec![1],
            num_res_blocks: 2,
            attention_ds: vec![1],
            num_head_channels: 32,
            num_classes: 10,
        }
    }

    /// A two-level toy for gradient checks.
    pub fn tiny() -> Self {
        Self {
            image_size: 8,
            in_channels: 1,
            model_channels: 32,
            channel_mult: vec![1, 2],
            num_res_blocks: 1,
            attention_ds: vec![2],
            num_head_channels: 32,
            num_classes: 3,
        }
    }

    fn spec(&self) -> Result<UNetSpec> {
        let stride = 1usize << self.channel_mult.len().saturating_sub(1);
        if !self.image_size.is_multiple_of(stride) || self.num_head_channels == 0 {
            return Err(EngineError::Config(format!(
                "pixel UNet: image_size {} not divisible by {stride}, or zero head channels",
                self.image_size
            )));
        }
        Ok(UNetSpec {
            in_channels: self.in_channels,
            model_channels: self.model_channels,
            out_channels: self.in_channels,
            num_res_blocks: self.num_res_blocks,
            channel_mult: self.channel_mult.clone(),
            attention_ds: self.attention_ds.clone(),
            use_scale_shift_norm: true,
            resblock_updown: true,
            conv_resample: true,
            label_rows: Some(self.num_classes + 1),
        })
    }
}

/// Class-conditional ε-network with a null label.
#[derive(Debug)]
pub struct PixelUNet {
    config: PixelUNetConfig,
    net: UNetModel,
}

impl PixelUNet {
    /// Loads (or, from a `VarMap`-backed builder, initialises) the network.
    pub fn new(vb: VarBuilder, config: PixelUNetConfig) -> Result<Self> {
        let hc = config.num_head_channels;
        let factory = |vb: VarBuilder, ch: usize| -> Result<Box<dyn ContextLayer>> {
            Ok(Box::new(AttentionBlock::new(vb, ch, (ch / hc).max(1))?))
        };
        let net = UNetModel::new(vb, config.spec()?, &factory)?;
        Ok(Self { config, net })
    }

    pub fn config(&self) -> &PixelUNetConfig {
        &self.config
    }

    /// ε for `x` (B,C,H,W) at original timesteps `t`, one label per item (the null label allowed).
    pub fn forward(&self, x: &Tensor, t: &[u32], labels: &[u32]) -> Result<Tensor> {
        self.net.forward(x, t, Some(labels), None, None)
    }
}

impl Denoiser for PixelUNet {
    fn eps(&self, x_t: &Tensor, t: &[u32], labels: Option<&[LabelId]>) -> Result<Tensor> {
        let ids: Vec<u32> = match labels {
            Some(l) => l.iter().map(|l| l.0).collect(),
            None => vec![self.config.num_classes as u32; x_t.dim(0)?],
        };
        self.forward(x_t, t, &ids)
    }

    fn null_label(&self) -> Option<LabelId> {
        Some(LabelId(self.config.num_classes as u32))
    }

    fn num_classes(&self) -> usize {
        self.config.num_classes
    }
}
