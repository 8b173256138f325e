//! OpenAI guided-diffusion `UNetModel` (ADM), loading the bare `UNetModel.state_dict()` names
//! (`time_embed.0.weight`, `input_blocks.1.0.in_layers.0.weight`, ...).
//!
//! The encoder/middle/decoder skeleton ([`UNetModel`]) is shared with CompVis' `openaimodel`
//! (which is a fork of this code): the LDM UNet and the project's pixel UNet plug their own
//! attention layer into it through an [`AttnFactory`].

use candle_core::{Device, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::layers::{
    Conv2d, GN_EPS_ADM, GroupNorm, Linear, ResBlock, Resample, apply, cast, conv2d, conv3x3,
    from_tokens, group_norm, label_tensor, qkv_attention_legacy, silu, timestep_embedding,
    to_tokens, upsample_nearest2x,
};
use crate::{Denoiser, EngineError, LabelId, Result};

/// An attention-like layer of the UNet: sees the feature map and, for cross-attention, a context.
pub trait ContextLayer: Send + Sync + std::fmt::Debug {
    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor>;
}

/// Builds the attention layer at a level with `channels` channels from its `VarBuilder` prefix.
pub type AttnFactory<'a> = dyn Fn(VarBuilder, usize) -> Result<Box<dyn ContextLayer>> + 'a;

/// guided-diffusion's `AttentionBlock` with `QKVAttentionLegacy` (`use_new_attention_order=False`):
/// `norm`, `qkv` (conv1d k=1), `proj_out` (conv1d k=1), residual.
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    norm: GroupNorm,
    qkv: Linear,
    proj_out: Linear,
    heads: usize,
}

impl AttentionBlock {
    pub fn new(vb: VarBuilder, channels: usize, heads: usize) -> Result<Self> {
        if heads == 0 || !channels.is_multiple_of(heads) {
            return Err(EngineError::Config(format!(
                "attention: {channels} channels not divisible into {heads} heads"
            )));
        }
        Ok(Self {
            norm: group_norm(vb.pp("norm"), channels, GN_EPS_ADM)?,
            qkv: Linear::conv1d_k1(vb.pp("qkv"), channels, 3 * channels)?,
            proj_out: Linear::conv1d_k1(vb.pp("proj_out"), channels, channels)?,
            heads,
        })
    }
}

impl ContextLayer for AttentionBlock {
    fn forward(&self, x: &Tensor, _context: Option<&Tensor>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let tokens = to_tokens(&apply(&self.norm, x)?)?;
        let a = qkv_attention_legacy(&self.qkv.forward(&tokens)?, self.heads)?;
        let out = from_tokens(&self.proj_out.forward(&a)?, h, w)?;
        Ok((x + out)?)
    }
}

/// One element of a `TimestepEmbedSequential`.
#[derive(Debug)]
enum Layer {
    /// The input convolution or a strided-conv `Downsample` (`op`).
    Conv(Conv2d),
    /// Average-pool `Downsample` (conv_resample = False).
    Pool,
    /// Nearest `Upsample`, with its `conv` when conv_resample.
    Up(Option<Conv2d>),
    Res(Box<ResBlock>),
    Attn(Box<dyn ContextLayer>),
}

impl Layer {
    fn forward(&self, x: &Tensor, emb: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Layer::Conv(c) => apply(c, x),
            Layer::Pool => super::layers::avg_pool2x(x),
            Layer::Up(conv) => {
                let up = upsample_nearest2x(x)?;
                match conv {
                    Some(c) => apply(c, &up),
                    None => Ok(up),
                }
            }
            Layer::Res(r) => r.forward(x, emb),
            Layer::Attn(a) => a.forward(x, context),
        }
    }
}

type Block = Vec<Layer>;

fn run_block(block: &Block, x: &Tensor, emb: &Tensor, ctx: Option<&Tensor>) -> Result<Tensor> {
    block
        .iter()
        .try_fold(x.clone(), |h, layer| layer.forward(&h, emb, ctx))
}

/// The architecture switches of the shared openai UNet skeleton.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UNetSpec {
    pub in_channels: usize,
    pub model_channels: usize,
    pub out_channels: usize,
    pub num_res_blocks: usize,
    pub channel_mult: Vec<usize>,
    /// Downsampling factors (1, 2, 4, ...) that get an attention layer.
    pub attention_ds: Vec<usize>,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    /// Strided-conv down / conv-after-nearest up (otherwise pooling / bare nearest).
    pub conv_resample: bool,
    /// Rows of `label_emb` (None: no label embedding).
    pub label_rows: Option<usize>,
}

/// The openai UNet skeleton: `time_embed`, optional `label_emb`, `input_blocks`, `middle_block`,
/// `output_blocks`, `out`.
#[derive(Debug)]
pub struct UNetModel {
    spec: UNetSpec,
    time_embed: (Linear, Linear),
    label_emb: Option<Embedding>,
    input_blocks: Vec<Block>,
    middle_block: Block,
    output_blocks: Vec<Block>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    dtype: candle_core::DType,
    device: Device,
}

struct Builder<'a> {
    spec: &'a UNetSpec,
    emb_dim: usize,
    attn: &'a AttnFactory<'a>,
}

impl Builder<'_> {
    fn res(&self, vb: VarBuilder, cin: usize, cout: usize, rs: Resample) -> Result<Layer> {
        let ss = self.spec.use_scale_shift_norm;
        Ok(Layer::Res(Box::new(ResBlock::new(
            vb,
            cin,
            self.emb_dim,
            cout,
            ss,
            rs,
        )?)))
    }

    fn down(&self, vb: VarBuilder, ch: usize) -> Result<Layer> {
        if self.spec.resblock_updown {
            self.res(vb, ch, ch, Resample::Down)
        } else if self.spec.conv_resample {
            Ok(Layer::Conv(conv2d(vb.pp("op"), ch, ch, 3, 2, 1)?))
        } else {
            Ok(Layer::Pool)
        }
    }

    fn up(&self, vb: VarBuilder, ch: usize) -> Result<Layer> {
        if self.spec.resblock_updown {
            self.res(vb, ch, ch, Resample::Up)
        } else if self.spec.conv_resample {
            Ok(Layer::Up(Some(conv3x3(vb.pp("conv"), ch, ch)?)))
        } else {
            Ok(Layer::Up(None))
        }
    }

    fn attn(&self, vb: VarBuilder, ch: usize) -> Result<Layer> {
        Ok(Layer::Attn((self.attn)(vb, ch)?))
    }
}

impl UNetModel {
    pub fn new(vb: VarBuilder, spec: UNetSpec, attn: &AttnFactory) -> Result<Self> {
        let levels = spec.channel_mult.len();
        if levels == 0
            || !spec
                .model_channels
                .is_multiple_of(super::layers::NORM_GROUPS)
        {
            return Err(EngineError::Config(format!(
                "UNet needs ≥1 level and model_channels divisible by 32, got {:?} / {}",
                spec.channel_mult, spec.model_channels
            )));
        }
        let mc = spec.model_channels;
        let emb_dim = 4 * mc;
        let b = Builder {
            spec: &spec,
            emb_dim,
            attn,
        };
        let time_embed = (
            Linear::new(vb.pp("time_embed.0"), mc, emb_dim, true)?,
            Linear::new(vb.pp("time_embed.2"), emb_dim, emb_dim, true)?,
        );
        let label_emb = match spec.label_rows {
            Some(n) => Some(candle_nn::embedding(n, emb_dim, vb.pp("label_emb"))?),
            None => None,
        };

        let vbi = vb.pp("input_blocks");
        let mut ch = spec.channel_mult[0] * mc;
        let input_ch = ch;
        let mut input_blocks: Vec<Block> = vec![vec![Layer::Conv(conv3x3(
            vbi.pp(0).pp(0),
            spec.in_channels,
            ch,
        )?)]];
        let mut chans = vec![ch];
        let mut ds = 1;
        for (level, &mult) in spec.channel_mult.iter().enumerate() {
            for _ in 0..spec.num_res_blocks {
                let vbb = vbi.pp(input_blocks.len());
                let mut block = vec![b.res(vbb.pp(0), ch, mult * mc, Resample::Keep)?];
                ch = mult * mc;
                if spec.attention_ds.contains(&ds) {
                    block.push(b.attn(vbb.pp(1), ch)?);
                }
                input_blocks.push(block);
                chans.push(ch);
            }
            if level + 1 != levels {
                let vbb = vbi.pp(input_blocks.len());
                input_blocks.push(vec![b.down(vbb.pp(0), ch)?]);
                chans.push(ch);
                ds *= 2;
            }
        }

        let vbm = vb.pp("middle_block");
        let middle_block = vec![
            b.res(vbm.pp(0), ch, ch, Resample::Keep)?,
            b.attn(vbm.pp(1), ch)?,
            b.res(vbm.pp(2), ch, ch, Resample::Keep)?,
        ];

        let vbo = vb.pp("output_blocks");
        let mut output_blocks: Vec<Block> = Vec::new();
        for (level, &mult) in spec.channel_mult.iter().enumerate().rev() {
            for i in 0..=spec.num_res_blocks {
                let vbb = vbo.pp(output_blocks.len());
                let ich = chans.pop().ok_or_else(|| {
                    EngineError::Config("UNet skip-channel bookkeeping underflow".into())
                })?;
                let mut block = vec![b.res(vbb.pp(0), ch + ich, mult * mc, Resample::Keep)?];
                ch = mult * mc;
                if spec.attention_ds.contains(&ds) {
                    block.push(b.attn(vbb.pp(1), ch)?);
                }
                if level > 0 && i == spec.num_res_blocks {
                    block.push(b.up(vbb.pp(block.len()), ch)?);
                    ds /= 2;
                }
                output_blocks.push(block);
            }
        }

        Ok(Self {
            time_embed,
            label_emb,
            input_blocks,
            middle_block,
            output_blocks,
            out_norm: group_norm(vb.pp("out.0"), ch, GN_EPS_ADM)?,
            out_conv: conv3x3(vb.pp("out.2"), input_ch, spec.out_channels)?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            spec,
        })
    }

    pub fn spec(&self) -> &UNetSpec {
        &self.spec
    }

    /// `time_embed(timestep_embedding(t))` (+ `label_emb(y)`), (B, 4·model_channels).
    pub fn embed(&self, t: &[u32], labels: Option<&[u32]>) -> Result<Tensor> {
        let temb = timestep_embedding(t, self.spec.model_channels, &self.device)?;
        let temb = cast(&temb, self.dtype)?;
        let h = silu(&self.time_embed.0.forward(&temb)?)?;
        let emb = self.time_embed.1.forward(&h)?;
        match (&self.label_emb, labels) {
            (Some(table), Some(y)) => {
                let rows = table.embeddings().dim(0)?;
                if let Some(bad) = y.iter().find(|&&l| l as usize >= rows) {
                    return Err(EngineError::InvalidInput(format!(
                        "label {bad} out of range for a {rows}-row label embedding"
                    )));
                }
                let ids = label_tensor(y, &self.device)?;
                Ok((emb + apply(table, &ids)?)?)
            }
            (Some(_), None) => Err(EngineError::InvalidInput(
                "class-conditional UNet called without labels".into(),
            )),
            (None, _) => Ok(emb),
        }
    }

    /// Full forward: `x` (B,C,H,W), original integer timesteps, labels for a class-conditional
    /// model, `context` (B,S,D) for cross-attention. When `trace` is given, every input block's,
    /// the middle block's and every output block's output is pushed in that order.
    pub fn forward(
        &self,
        x: &Tensor,
        t: &[u32],
        labels: Option<&[u32]>,
        context: Option<&Tensor>,
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let bsz = x.dim(0)?;
        if t.len() != bsz || labels.is_some_and(|y| y.len() != bsz) {
            return Err(EngineError::InvalidInput(format!(
                "batch of {bsz} with {} timesteps / {:?} labels",
                t.len(),
                labels.map(<[u32]>::len)
            )));
        }
        let emb = self.embed(t, labels)?;
        let mut record = |h: &Tensor| {
            if let Some(tr) = trace.as_deref_mut() {
                tr.push(h.clone());
            }
        };
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        let mut h = cast(x, self.dtype)?;
        for block in &self.input_blocks {
            h = run_block(block, &h, &emb, context)?;
            record(&h);
            hs.push(h.clone());
        }
        h = run_block(&self.middle_block, &h, &emb, context)?;
        record(&h);
        for block in &self.output_blocks {
            let skip = hs.pop().ok_or_else(|| {
                EngineError::Config("UNet skip stack underflow in forward".into())
            })?;
            // The concatenation replaces `h` and the skip is dropped before the block runs, so
            // neither stays alive beside the block's activations (as in PyTorch).
            h = Tensor::cat(&[&h, &skip], 1)?;
            drop(skip);
            h = run_block(block, &h, &emb, context)?;
            record(&h);
        }
        let h = self.out_norm.forward_silu(&h)?;
        apply(&self.out_conv, &h)
    }
}

/// `guided_diffusion.script_util.create_model` arguments (the ones that shape the network).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmUNetConfig {
    pub image_size: usize,
    pub in_channels: usize,
    pub num_channels: usize,
    pub num_res_blocks: usize,
    pub channel_mult: Vec<usize>,
    /// Feature-map resolutions with attention (e.g. [32, 16, 8]); ds = image_size / r.
    pub attention_resolutions: Vec<usize>,
    pub num_heads: usize,
    /// `num_head_channels` (None = -1: use `num_heads`).
    pub num_head_channels: Option<usize>,
    pub learn_sigma: bool,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    /// `class_cond`: a 1000-row `label_emb`.
    pub class_cond: bool,
}

impl AdmUNetConfig {
    /// `256x256_diffusion_uncond.pt` (spec §1.1).
    pub fn imagenet256_uncond() -> Self {
        Self {
            image_size: 256,
            in_channels: 3,
            num_channels: 256,
            num_res_blocks: 2,
            channel_mult: vec![1, 1, 2, 2, 4, 4],
            attention_resolutions: vec![32, 16, 8],
            num_heads: 4,
            num_head_channels: Some(64),
            learn_sigma: true,
            use_scale_shift_norm: true,
            resblock_updown: true,
            class_cond: false,
        }
    }

    /// The tiny random model of the `adm_unet` golden.
    pub fn golden_tiny(class_cond: bool) -> Self {
        Self {
            image_size: 32,
            in_channels: 3,
            num_channels: 32,
            num_res_blocks: 1,
            channel_mult: vec![1, 2, 2],
            attention_resolutions: vec![16, 8],
            num_heads: 4,
            num_head_channels: Some(8),
            learn_sigma: true,
            use_scale_shift_norm: true,
            resblock_updown: true,
            class_cond,
        }
    }

    fn spec(&self) -> Result<UNetSpec> {
        let mut attention_ds = Vec::new();
        for &r in &self.attention_resolutions {
            if r == 0 || !self.image_size.is_multiple_of(r) {
                return Err(EngineError::Config(format!(
                    "attention resolution {r} does not divide image_size {}",
                    self.image_size
                )));
            }
            attention_ds.push(self.image_size / r);
        }
        Ok(UNetSpec {
            in_channels: self.in_channels,
            model_channels: self.num_channels,
            out_channels: self.in_channels * if self.learn_sigma { 2 } else { 1 },
            num_res_blocks: self.num_res_blocks,
            channel_mult: self.channel_mult.clone(),
            attention_ds,
            use_scale_shift_norm: self.use_scale_shift_norm,
            resblock_updown: self.resblock_updown,
            conv_resample: true,
            label_rows: self.class_cond.then_some(1000),
        })
    }

    /// Heads of an attention layer with `ch` channels (`num_head_channels` wins over `num_heads`).
    pub fn heads(&self, ch: usize) -> usize {
        match self.num_head_channels {
            Some(hc) if hc > 0 => ch / hc,
            _ => self.num_heads,
        }
    }
}

/// The ADM diffusion network as a [`Denoiser`].
#[derive(Debug)]
pub struct AdmUNet {
    config: AdmUNetConfig,
    net: UNetModel,
}

impl AdmUNet {
    pub fn new(vb: VarBuilder, config: AdmUNetConfig) -> Result<Self> {
        let factory = |vb: VarBuilder, ch: usize| -> Result<Box<dyn ContextLayer>> {
            Ok(Box::new(AttentionBlock::new(vb, ch, config.heads(ch))?))
        };
        let net = UNetModel::new(vb, config.spec()?, &factory)?;
        Ok(Self { config, net })
    }

    pub fn config(&self) -> &AdmUNetConfig {
        &self.config
    }

    /// The raw network output (B, 3 or 6, H, W): ε and, with learn_sigma, the variance values.
    pub fn forward(&self, x: &Tensor, t: &[u32], labels: Option<&[u32]>) -> Result<Tensor> {
        self.net.forward(x, t, labels, None, None)
    }

    /// The underlying skeleton (block-by-block tracing for debugging).
    pub fn unet(&self) -> &UNetModel {
        &self.net
    }
}

impl Denoiser for AdmUNet {
    fn eps(&self, x_t: &Tensor, t: &[u32], labels: Option<&[LabelId]>) -> Result<Tensor> {
        let ids: Option<Vec<u32>> = if self.config.class_cond {
            let l = labels.ok_or_else(|| {
                EngineError::InvalidInput("class-conditional ADM has no null label".into())
            })?;
            Some(l.iter().map(|l| l.0).collect())
        } else {
            None
        };
        let out = self.forward(x_t, t, ids.as_deref())?;
        Ok(out.narrow(1, 0, self.config.in_channels)?)
    }

    fn null_label(&self) -> Option<LabelId> {
        None
    }

    fn num_classes(&self) -> usize {
        if self.config.class_cond { 1000 } else { 0 }
    }
}
