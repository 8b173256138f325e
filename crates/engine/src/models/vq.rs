//! The taming/LDM VQ autoencoder (`ldm.models.autoencoder.VQModelInterface` with taming's
//! `VectorQuantizer2`, legacy mode): `encoder`, `quant_conv`, `quantize.embedding`,
//! `post_quant_conv`, `decoder`. Weight names are the VQ model's `state_dict` names: pass
//! `vb.pp("first_stage_model")` for a `LatentDiffusion` checkpoint.
//!
//! As an [`Autoencoder`]: `encode` stops before quantisation (DiffGuard's LDM inversion starts
//! from `encode_first_stage`), `decode` quantises first (`decode_first_stage`) and does not clamp.
//!
//! The same network without a codebook (`n_embed = 0`) is the project's own continuous f=4
//! autoencoder for 28×28 images ([`VqConfig::fashion_mnist`]): LDM's first stage in miniature, with
//! LatentDiffusion's `scale_factor` applied on the way in and out so that the latents the
//! diffusion model sees have unit variance.

use candle_core::{D, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::layers::{
    Conv2d, GN_EPS_LDM, GroupNorm, Linear, apply, attention, conv2d, conv3x3, from_tokens,
    group_norm, to_tokens, upsample_nearest2x,
};
use crate::{Autoencoder, EngineError, Result};

/// `ddconfig` of the first stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdConfig {
    pub double_z: bool,
    pub z_channels: usize,
    pub resolution: usize,
    pub in_channels: usize,
    pub out_ch: usize,
    pub ch: usize,
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub attn_resolutions: Vec<usize>,
}

/// `first_stage_config.params` of a VQ first stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VqConfig {
    pub embed_dim: usize,
    /// Codebook rows; 0 = no codebook (a continuous autoencoder: `decode` uses the latent as is).
    pub n_embed: usize,
    pub ddconfig: DdConfig,
    /// LatentDiffusion's `scale_factor`: the diffusion model sees `scale_factor · encode(x)`.
    #[serde(default = "unit_scale")]
    pub scale_factor: f64,
}

fn unit_scale() -> f64 {
    1.0
}

impl VqConfig {
    /// cin256-v2's first stage: VQ f=4, 256×256 → 64×64×3, 8192 codes, no level attention.
    pub fn cin256_v2() -> Self {
        Self {
            embed_dim: 3,
            n_embed: 8192,
            ddconfig: DdConfig {
                double_z: false,
                z_channels: 3,
                resolution: 256,
                in_channels: 3,
                out_ch: 3,
                ch: 128,
                ch_mult: vec![1, 2, 4],
                num_res_blocks: 2,
                attn_resolutions: vec![],
            },
            scale_factor: 1.0,
        }
    }

    /// The tiny random model of the `vq_f4` golden (64×64 → 16×16×3, 64 codes).
    pub fn golden_tiny() -> Self {
        Self {
            embed_dim: 3,
            n_embed: 64,
            ddconfig: DdConfig {
                double_z: false,
                z_channels: 3,
                resolution: 64,
                in_channels: 3,
                out_ch: 3,
                ch: 32,
                ch_mult: vec![1, 2, 4],
                num_res_blocks: 1,
                attn_resolutions: vec![],
            },
            scale_factor: 1.0,
        }
    }

    /// The latents it makes, (channels, side): `embed_dim` channels at resolution / f.
    pub fn latent_shape(&self) -> (usize, usize) {
        let dd = &self.ddconfig;
        (
            self.embed_dim,
            dd.resolution >> dd.ch_mult.len().saturating_sub(1),
        )
    }

    /// The same autoencoder with `scale_factor` 1: latents as the encoder makes them (training, and
    /// measuring the scale factor itself).
    pub fn unscaled(&self) -> Self {
        Self {
            scale_factor: 1.0,
            ..self.clone()
        }
    }

    /// The project's own continuous autoencoder for 28×28 grey images: f=4 (28 → 14 → 7), 3 latent
    /// channels, widths 32/64/64 with one ResBlock per level (two in the decoder), attention only in
    /// the 7×7 middle block; no codebook. `scale_factor` is set from the training latents' standard
    /// deviation when training ends.
    pub fn fashion_mnist() -> Self {
        Self {
            embed_dim: 3,
            n_embed: 0,
            ddconfig: DdConfig {
                double_z: false,
                z_channels: 3,
                resolution: 28,
                in_channels: 1,
                out_ch: 1,
                ch: 32,
                ch_mult: vec![1, 2, 2],
                num_res_blocks: 1,
                attn_resolutions: vec![],
            },
            scale_factor: 1.0,
        }
    }
}

/// `ResnetBlock` without timestep embedding (temb_channels = 0), dropout 0.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        let nin_shortcut = if cin == cout {
            None
        } else {
            Some(conv2d(vb.pp("nin_shortcut"), cin, cout, 1, 1, 0)?)
        };
        Ok(Self {
            norm1: group_norm(vb.pp("norm1"), cin, GN_EPS_LDM)?,
            conv1: conv3x3(vb.pp("conv1"), cin, cout)?,
            norm2: group_norm(vb.pp("norm2"), cout, GN_EPS_LDM)?,
            conv2: conv3x3(vb.pp("conv2"), cout, cout)?,
            nin_shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Reassigned, not shadowed, so each stage is freed once the next exists (see ResBlock).
        let mut h = apply(&self.conv1, &self.norm1.forward_silu(x)?)?;
        h = apply(&self.conv2, &self.norm2.forward_silu(&h)?)?;
        let skip = match &self.nin_shortcut {
            Some(c) => apply(c, x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}

/// `AttnBlock`: single-head self-attention with 1×1-conv q, k, v, proj_out; scale C^-½.
#[derive(Debug, Clone)]
struct AttnBlock {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    proj_out: Linear,
    scale: f64,
}

impl AttnBlock {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            norm: group_norm(vb.pp("norm"), c, GN_EPS_LDM)?,
            q: Linear::conv2d_k1(vb.pp("q"), c, c)?,
            k: Linear::conv2d_k1(vb.pp("k"), c, c)?,
            v: Linear::conv2d_k1(vb.pp("v"), c, c)?,
            proj_out: Linear::conv2d_k1(vb.pp("proj_out"), c, c)?,
            scale: 1.0 / (c as f64).sqrt(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let t = to_tokens(&apply(&self.norm, x)?)?;
        let (q, k, v) = (
            self.q.forward(&t)?,
            self.k.forward(&t)?,
            self.v.forward(&t)?,
        );
        let a = attention(&q, &k, &v, 1, self.scale)?;
        Ok((x + from_tokens(&self.proj_out.forward(&a)?, h, w)?)?)
    }
}

/// One resolution level: its ResnetBlocks (each optionally followed by an AttnBlock) and its
/// resampling convolution.
#[derive(Debug, Clone)]
struct Level {
    blocks: Vec<(ResnetBlock, Option<AttnBlock>)>,
    resample: Option<Conv2d>,
}

impl Level {
    fn run_blocks(&self, mut h: Tensor) -> Result<Tensor> {
        for (block, attn) in &self.blocks {
            h = block.forward(&h)?;
            if let Some(a) = attn {
                h = a.forward(&h)?;
            }
        }
        Ok(h)
    }
}

/// `mid.block_1`, `mid.attn_1`, `mid.block_2` (present even with no level attention).
#[derive(Debug, Clone)]
struct Mid {
    block_1: ResnetBlock,
    attn_1: AttnBlock,
    block_2: ResnetBlock,
}

impl Mid {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            block_1: ResnetBlock::new(vb.pp("block_1"), c, c)?,
            attn_1: AttnBlock::new(vb.pp("attn_1"), c)?,
            block_2: ResnetBlock::new(vb.pp("block_2"), c, c)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.block_1.forward(x)?;
        self.block_2.forward(&self.attn_1.forward(&h)?)
    }
}

fn level_blocks(
    vb: VarBuilder,
    n: usize,
    mut cin: usize,
    cout: usize,
    attn: bool,
) -> Result<Vec<(ResnetBlock, Option<AttnBlock>)>> {
    let mut blocks = Vec::with_capacity(n);
    for i in 0..n {
        let block = ResnetBlock::new(vb.pp("block").pp(i), cin, cout)?;
        let a = if attn {
            Some(AttnBlock::new(vb.pp("attn").pp(i), cout)?)
        } else {
            None
        };
        blocks.push((block, a));
        cin = cout;
    }
    Ok(blocks)
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<Level>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &DdConfig) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let mut res = cfg.resolution;
        let mut cin = cfg.ch;
        let mut down = Vec::with_capacity(levels);
        for (i, &mult) in cfg.ch_mult.iter().enumerate() {
            let vbl = vb.pp("down").pp(i);
            let cout = cfg.ch * mult;
            let attn = cfg.attn_resolutions.contains(&res);
            let blocks = level_blocks(vbl.clone(), cfg.num_res_blocks, cin, cout, attn)?;
            cin = cout;
            let resample = if i + 1 != levels {
                res /= 2;
                Some(conv2d(vbl.pp("downsample.conv"), cin, cin, 3, 2, 0)?)
            } else {
                None
            };
            down.push(Level { blocks, resample });
        }
        let z_out = cfg.z_channels * if cfg.double_z { 2 } else { 1 };
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.in_channels, cfg.ch)?,
            down,
            mid: Mid::new(vb.pp("mid"), cin)?,
            norm_out: group_norm(vb.pp("norm_out"), cin, GN_EPS_LDM)?,
            conv_out: conv3x3(vb.pp("conv_out"), cin, z_out)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = apply(&self.conv_in, x)?;
        for level in &self.down {
            h = level.run_blocks(h)?;
            if let Some(conv) = &level.resample {
                // taming's Downsample pads right/bottom by one zero, then a 3×3 stride-2 conv.
                let padded = h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                h = apply(conv, &padded)?;
            }
        }
        let h = self.mid.forward(&h)?;
        apply(&self.conv_out, &self.norm_out.forward_silu(&h)?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    /// Indexed like `decoder.up.{i}`: level 0 is the finest, run last.
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &DdConfig) -> Result<Self> {
        let levels = cfg.ch_mult.len();
        let mut cin = cfg.ch * cfg.ch_mult[levels - 1];
        let mut res = cfg.resolution >> (levels - 1);
        let conv_in = conv3x3(vb.pp("conv_in"), cfg.z_channels, cin)?;
        let mid = Mid::new(vb.pp("mid"), cin)?;
        let mut up: Vec<Level> = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let vbl = vb.pp("up").pp(i);
            let cout = cfg.ch * cfg.ch_mult[i];
            let attn = cfg.attn_resolutions.contains(&res);
            let blocks = level_blocks(vbl.clone(), cfg.num_res_blocks + 1, cin, cout, attn)?;
            cin = cout;
            let resample = if i != 0 {
                res *= 2;
                Some(conv3x3(vbl.pp("upsample.conv"), cin, cin)?)
            } else {
                None
            };
            up.push(Level { blocks, resample });
        }
        up.reverse();
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: group_norm(vb.pp("norm_out"), cin, GN_EPS_LDM)?,
            conv_out: conv3x3(vb.pp("conv_out"), cin, cfg.out_ch)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&apply(&self.conv_in, z)?)?;
        for level in self.up.iter().rev() {
            h = level.run_blocks(h)?;
            if let Some(conv) = &level.resample {
                h = apply(conv, &upsample_nearest2x(&h)?)?;
            }
        }
        apply(&self.conv_out, &self.norm_out.forward_silu(&h)?)
    }
}

/// `VectorQuantizer2` (legacy, no remap): nearest codebook row by squared Euclidean distance,
/// computed as ‖z‖² + ‖e‖² − 2·z·e like the reference so that ties break the same way.
#[derive(Debug, Clone)]
pub struct VectorQuantizer {
    codebook: Tensor,
}

impl VectorQuantizer {
    fn new(vb: VarBuilder, n_embed: usize, dim: usize) -> Result<Self> {
        let init = candle_nn::Init::Uniform {
            lo: -1.0 / n_embed as f64,
            up: 1.0 / n_embed as f64,
        };
        let codebook = vb.get_with_hints((n_embed, dim), "embedding.weight", init)?;
        Ok(Self { codebook })
    }

    /// z (B,C,H,W) → (codebook vectors (B,C,H,W), indices (B,H,W) U32).
    pub fn quantize(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c, h, w) = z.dims4()?;
        if c != self.codebook.dim(1)? {
            return Err(EngineError::InvalidInput(format!(
                "latent has {c} channels, codebook vectors have {}",
                self.codebook.dim(1)?
            )));
        }
        let flat = to_tokens(z)?.reshape((b * h * w, c))?;
        let z2 = flat.sqr()?.sum_keepdim(1)?;
        let e2 = self.codebook.sqr()?.sum(1)?.unsqueeze(0)?;
        let cross = flat.matmul(&self.codebook.t()?)?;
        let dist = z2.broadcast_add(&e2)?.broadcast_sub(&(cross * 2.0)?)?;
        let idx = dist.argmin(D::Minus1)?;
        let q = self
            .codebook
            .index_select(&idx, 0)?
            .reshape((b, h * w, c))?;
        Ok((from_tokens(&q, h, w)?, idx.reshape((b, h, w))?))
    }
}

/// The VQ first stage.
#[derive(Debug, Clone)]
pub struct VqModel {
    config: VqConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    /// None for a continuous autoencoder (`n_embed = 0`).
    quantize: Option<VectorQuantizer>,
}

impl VqModel {
    /// `vb` points at the VQ model (`first_stage_model` in a LatentDiffusion checkpoint).
    pub fn new(vb: VarBuilder, config: VqConfig) -> Result<Self> {
        let dd = &config.ddconfig;
        if dd.ch_mult.is_empty() || dd.double_z || dd.num_res_blocks == 0 {
            return Err(EngineError::Config(
                "VQ first stage needs ≥1 level, ≥1 ResBlock per level and double_z = false".into(),
            ));
        }
        if !(config.scale_factor.is_finite() && config.scale_factor > 0.0) {
            return Err(EngineError::Config(format!(
                "autoencoder scale_factor must be a positive number, got {}",
                config.scale_factor
            )));
        }
        let (zc, ed) = (dd.z_channels, config.embed_dim);
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), dd)?,
            decoder: Decoder::new(vb.pp("decoder"), dd)?,
            quant_conv: conv2d(vb.pp("quant_conv"), zc, ed, 1, 1, 0)?,
            post_quant_conv: conv2d(vb.pp("post_quant_conv"), ed, zc, 1, 1, 0)?,
            quantize: match config.n_embed {
                0 => None,
                n => Some(VectorQuantizer::new(vb.pp("quantize"), n, ed)?),
            },
            config,
        })
    }

    pub fn config(&self) -> &VqConfig {
        &self.config
    }

    /// The codebook; None for a continuous autoencoder.
    pub fn quantizer(&self) -> Option<&VectorQuantizer> {
        self.quantize.as_ref()
    }

    /// Encoder + `quant_conv`, without the scale factor: what the autoencoder's training loss sees.
    pub fn encode_unscaled(&self, x: &Tensor) -> Result<Tensor> {
        apply(&self.quant_conv, &self.encoder.forward(x)?)
    }

    /// Decoder applied to already-quantised latents (no codebook lookup).
    pub fn decode_quantized(&self, quant: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&apply(&self.post_quant_conv, quant)?)
    }
}

/// The denoiser must take the autoencoder's latents; the message names both shapes.
pub(crate) fn check_latent_shape(
    vq: &VqConfig,
    unet: &super::pixel_unet::PixelUNetConfig,
) -> std::result::Result<(), String> {
    let (c, side) = vq.latent_shape();
    if (c, side) != (unet.in_channels, unet.image_size) {
        return Err(format!(
            "the autoencoder makes {c}×{side}² latents but the denoiser takes {}×{}²",
            unet.in_channels, unet.image_size
        ));
    }
    Ok(())
}

impl Autoencoder for VqModel {
    fn encode(&self, x: &Tensor) -> Result<Tensor> {
        scaled(self.encode_unscaled(x)?, self.config.scale_factor)
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = scaled(z.clone(), 1.0 / self.config.scale_factor)?;
        match &self.quantize {
            Some(q) => self.decode_quantized(&q.quantize(&z)?.0),
            None => self.decode_quantized(&z),
        }
    }
}

/// `z · s`, skipping the multiply at 1 so that a VQ checkpoint's path stays bit-identical.
fn scaled(z: Tensor, s: f64) -> Result<Tensor> {
    if s == 1.0 { Ok(z) } else { Ok((z * s)?) }
}
