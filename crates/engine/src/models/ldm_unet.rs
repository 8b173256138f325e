//! CompVis latent-diffusion `openaimodel.UNetModel` with `SpatialTransformer` cross-attention, and
//! [`LdmDenoiser`] (UNet + [`ClassEmbedder`]) as a [`Denoiser`]. Weight names are the UNet's
//! `state_dict` names: pass `vb.pp("model.diffusion_model")` for a `LatentDiffusion` checkpoint.
//!
//! The encoder/middle/decoder skeleton is guided-diffusion's (openaimodel is a fork of it); this
//! module only adds the transformer and the LDM presets.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::adm_unet::{ContextLayer, UNetModel, UNetSpec};
use super::class_embedder::ClassEmbedder;
use super::layers::{
    GN_EPS_LDM, GroupNorm, LayerNorm, Linear, apply, attention, cast, from_tokens, group_norm,
    to_tokens,
};
use crate::{Denoiser, EngineError, LabelId, Result};

/// torch `nn.LayerNorm` default epsilon.
const LN_EPS: f64 = 1e-5;

/// `ldm.modules.attention.CrossAttention`: bias-free `to_q/to_k/to_v`, `to_out.0` with bias.
#[derive(Debug, Clone)]
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl CrossAttention {
    fn new(
        vb: VarBuilder,
        dim: usize,
        ctx_dim: usize,
        heads: usize,
        d_head: usize,
    ) -> Result<Self> {
        let inner = heads * d_head;
        Ok(Self {
            to_q: Linear::new(vb.pp("to_q"), dim, inner, false)?,
            to_k: Linear::new(vb.pp("to_k"), ctx_dim, inner, false)?,
            to_v: Linear::new(vb.pp("to_v"), ctx_dim, inner, false)?,
            to_out: Linear::new(vb.pp("to_out.0"), inner, dim, true)?,
            heads,
            scale: 1.0 / (d_head as f64).sqrt(),
        })
    }

    /// `x` (B,T,dim); `context` (B,S,ctx_dim) or None for self-attention.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, self.scale)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU feed-forward, pre-LayerNorm.
#[derive(Debug, Clone)]
struct TransformerBlock {
    attn1: CrossAttention,
    attn2: CrossAttention,
    norm1: LayerNorm,
    norm2: LayerNorm,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        d_head: usize,
        ctx_dim: usize,
    ) -> Result<Self> {
        let ff_inner = 4 * dim;
        Ok(Self {
            attn1: CrossAttention::new(vb.pp("attn1"), dim, dim, heads, d_head)?,
            attn2: CrossAttention::new(vb.pp("attn2"), dim, ctx_dim, heads, d_head)?,
            norm1: LayerNorm::new(vb.pp("norm1"), dim, LN_EPS)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, LN_EPS)?,
            norm3: LayerNorm::new(vb.pp("norm3"), dim, LN_EPS)?,
            ff_in: Linear::new(vb.pp("ff.net.0.proj"), dim, 2 * ff_inner, true)?,
            ff_out: Linear::new(vb.pp("ff.net.2"), ff_inner, dim, true)?,
        })
    }

    /// GEGLU: the projection's first half times GELU (erf form) of its second half.
    fn feed_forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.ff_in.forward(x)?;
        let half = p.dim(candle_core::D::Minus1)? / 2;
        let a = p.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = p.narrow(candle_core::D::Minus1, half, half)?.gelu_erf()?;
        self.ff_out.forward(&(a * gate)?)
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, context)? + &x)?;
        Ok((self.feed_forward(&self.norm3.forward(&x)?)? + &x)?)
    }
}

/// `SpatialTransformer`: GroupNorm (eps 1e-6), 1×1 `proj_in`, transformer blocks on the H·W tokens,
/// 1×1 `proj_out`, residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        d_head: usize,
        depth: usize,
        ctx_dim: usize,
    ) -> Result<Self> {
        let inner = heads * d_head;
        let blocks = (0..depth)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    heads,
                    d_head,
                    ctx_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(vb.pp("norm"), channels, GN_EPS_LDM)?,
            proj_in: Linear::conv2d_k1(vb.pp("proj_in"), channels, inner)?,
            blocks,
            proj_out: Linear::conv2d_k1(vb.pp("proj_out"), inner, channels)?,
        })
    }
}

impl ContextLayer for SpatialTransformer {
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut t = self.proj_in.forward(&to_tokens(&apply(&self.norm, x)?)?)?;
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let out = from_tokens(&self.proj_out.forward(&t)?, h, w)?;
        Ok((out + x)?)
    }
}

/// The `unet_config.params` of an LDM config that shape the network (spatial-transformer,
/// legacy head layout, no scale-shift norm, no resblock up/down: the cin256-v2 choices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LdmUNetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub model_channels: usize,
    /// Downsampling factors with a transformer (LDM configs list ds, not resolutions).
    pub attention_resolutions: Vec<usize>,
    pub num_res_blocks: usize,
    pub channel_mult: Vec<usize>,
    pub num_heads: usize,
    /// `num_head_channels` (None = -1).
    pub num_head_channels: Option<usize>,
    pub transformer_depth: usize,
    pub context_dim: usize,
}

impl LdmUNetConfig {
    /// `cin256-v2` (spec §1.1): 64×64×3 latents, 512-d class context.
    pub fn cin256_v2() -> Self {
        Self {
            image_size: 64,
            in_channels: 3,
            out_channels: 3,
            model_channels: 192,
            attention_resolutions: vec![8, 4, 2],
            num_res_blocks: 2,
            channel_mult: vec![1, 2, 3, 5],
            num_heads: 1,
            num_head_channels: None,
            transformer_depth: 1,
            context_dim: 512,
        }
    }

    /// The tiny random model of the `ldm_unet` golden.
    pub fn golden_tiny() -> Self {
        Self {
            image_size: 16,
            in_channels: 3,
            out_channels: 3,
            model_channels: 32,
            attention_resolutions: vec![2],
            num_res_blocks: 1,
            channel_mult: vec![1, 2],
            num_heads: 1,
            num_head_channels: None,
            transformer_depth: 1,
            context_dim: 64,
        }
    }

    /// (heads, dim_head) at `ch` channels with openaimodel's `legacy=True` rule:
    /// dim_head = ch / heads for spatial transformers.
    pub fn heads(&self, ch: usize) -> Result<(usize, usize)> {
        let heads = match self.num_head_channels {
            Some(hc) if hc > 0 => ch / hc,
            _ => self.num_heads,
        };
        if heads == 0 || !ch.is_multiple_of(heads) {
            return Err(EngineError::Config(format!(
                "transformer: {ch} channels not divisible into {heads} heads"
            )));
        }
        Ok((heads, ch / heads))
    }

    fn spec(&self) -> UNetSpec {
        UNetSpec {
            in_channels: self.in_channels,
            model_channels: self.model_channels,
            out_channels: self.out_channels,
            num_res_blocks: self.num_res_blocks,
            channel_mult: self.channel_mult.clone(),
            attention_ds: self.attention_resolutions.clone(),
            use_scale_shift_norm: false,
            resblock_updown: false,
            conv_resample: true,
            label_rows: None,
        }
    }
}

/// The LDM diffusion UNet: ε(z_t, t, context).
#[derive(Debug)]
pub struct LdmUNet {
    config: LdmUNetConfig,
    net: UNetModel,
}

impl LdmUNet {
    /// `vb` points at the UNet (`model.diffusion_model` in a LatentDiffusion checkpoint).
    pub fn new(vb: VarBuilder, config: LdmUNetConfig) -> Result<Self> {
        let factory = |vb: VarBuilder, ch: usize| -> Result<Box<dyn ContextLayer>> {
            let (heads, d_head) = config.heads(ch)?;
            let depth = config.transformer_depth;
            Ok(Box::new(SpatialTransformer::new(
                vb,
                ch,
                heads,
                d_head,
                depth,
                config.context_dim,
            )?))
        };
        let net = UNetModel::new(vb, config.spec(), &factory)?;
        Ok(Self { config, net })
    }

    pub fn config(&self) -> &LdmUNetConfig {
        &self.config
    }

    /// `diffusion_model(z, t, context=context)`: z (B,C,h,w), context (B,S,context_dim).
    pub fn forward(&self, z: &Tensor, t: &[u32], context: &Tensor) -> Result<Tensor> {
        let (b, _, d) = context.dims3()?;
        if b != z.dim(0)? || d != self.config.context_dim {
            return Err(EngineError::InvalidInput(format!(
                "context {:?} for a batch of {} and context_dim {}",
                context.dims(),
                z.dim(0)?,
                self.config.context_dim
            )));
        }
        let ctx = cast(context, z.dtype())?;
        self.net.forward(z, t, None, Some(&ctx), None)
    }
}

/// The LDM ε-network with its class embedder: labels → context → UNet. `None` labels mean the
/// null class for every item (DiffGuard's unconditional inversion).
#[derive(Debug)]
pub struct LdmDenoiser {
    unet: LdmUNet,
    embedder: ClassEmbedder,
}

impl LdmDenoiser {
    pub fn new(unet: LdmUNet, embedder: ClassEmbedder) -> Result<Self> {
        let (u, e) = (unet.config.context_dim, embedder.config().embed_dim);
        if u != e {
            return Err(EngineError::Config(format!(
                "UNet context_dim {u} != class embedder embed_dim {e}"
            )));
        }
        Ok(Self { unet, embedder })
    }

    pub fn unet(&self) -> &LdmUNet {
        &self.unet
    }

    pub fn embedder(&self) -> &ClassEmbedder {
        &self.embedder
    }
}

impl Denoiser for LdmDenoiser {
    fn eps(&self, x_t: &Tensor, t: &[u32], labels: Option<&[LabelId]>) -> Result<Tensor> {
        let null = vec![self.embedder.null_label(); x_t.dim(0)?];
        let context = self.embedder.forward(labels.unwrap_or(&null))?;
        self.unet.forward(x_t, t, &context)
    }

    fn null_label(&self) -> Option<LabelId> {
        Some(self.embedder.null_label())
    }

    fn num_classes(&self) -> usize {
        self.embedder.config().n_classes - 1
    }
}
