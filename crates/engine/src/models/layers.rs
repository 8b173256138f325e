//! Building blocks shared by the diffusion-side networks (ADM UNet, LDM UNet, VQ autoencoder, the
//! pixel UNet). Every piece here is written so that it (a) loads the official checkpoint names through
//! a `VarBuilder` and (b) keeps correct gradients in candle 0.11.1:
//! - matmuls always see contiguous 2-D or contiguous batched operands (candle's CPU gemm folds give
//!   silently wrong results for some non-contiguous / stride-0 batched left operands);
//! - softmax is `candle_nn::ops::softmax` (the `softmax_last_dim` fast path has no backward);
//! - LayerNorm is composed from primitives (the fused one drops gradients and rejects f64);
//! - nearest upsampling and 2×2 average pooling are reshapes/broadcasts (candle's
//!   `upsample_nearest2d` backward overwrites instead of accumulating).

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops;

use crate::Result;

/// Groups of every GroupNorm in these architectures (`normalization()` / `Normalize()`).
pub const NORM_GROUPS: usize = 32;
/// Epsilon of guided-diffusion's `GroupNorm32` and of openaimodel's ResBlocks (torch default).
pub const GN_EPS_ADM: f64 = 1e-5;
/// Epsilon of the taming/LDM `Normalize()` (VQ autoencoder and LDM SpatialTransformer).
pub const GN_EPS_LDM: f64 = 1e-6;

/// Sinusoidal timestep embedding as `guided_diffusion.nn.timestep_embedding` (also LDM's): order
/// [cos, sin], frequencies exp(-ln(10000)·i/half), computed in f32 like the reference so that the
/// rounding of the large arguments (t up to 999 rad) matches.
pub fn timestep_embedding(t: &[u32], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let log_max = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_max * i as f32) / half as f32).exp())
        .collect();
    let mut data = Vec::with_capacity(t.len() * dim);
    for &ti in t {
        let args = freqs.iter().map(|f| ti as f32 * f);
        data.extend(args.clone().map(f32::cos));
        data.extend(args.map(f32::sin));
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (t.len(), dim), device)?)
}

/// x·sigmoid(x) with a backward for every dtype (the project's fused CPU op; candle's elsewhere).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(ops::activation::silu(x)?)
}

/// GroupNorm (official `weight`/`bias` names) on the project's fused CPU kernel, which also fuses
/// the SiLU that follows almost every norm in these networks; candle's GroupNorm on other devices
/// and for half types (statistics in f32 like guided-diffusion's `GroupNorm32`).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// GroupNorm followed by SiLU, in one pass on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    /// `SiLU((GN(x)·γ + β)·(1 + scale) + shift)` with `scale_shift (B, 2C)` = `[scale | shift]`,
    /// in one pass on the CPU (the scale-shift ResBlock's `out_layers` up to the convolution).
    pub fn forward_modulated_silu(&self, x: &Tensor, scale_shift: &Tensor) -> Result<Tensor> {
        self.in_compute_dtype(x, |xs, g, b| {
            let ss = cast(scale_shift, xs.dtype())?;
            Ok(ops::norm::group_norm_modulated(
                xs,
                self.groups,
                g,
                b,
                &ss,
                self.eps,
                true,
            )?)
        })
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        self.in_compute_dtype(x, |xs, g, b| {
            Ok(ops::norm::group_norm(
                xs,
                self.groups,
                g,
                b,
                self.eps,
                silu,
            )?)
        })
    }

    /// `f(x, γ, β)` with all three in the statistics' dtype, the result back in x's.
    fn in_compute_dtype(
        &self,
        x: &Tensor,
        f: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let xs = cast(x, compute_dtype(dtype))?;
        let (g, b) = (
            cast(&self.gamma, xs.dtype())?,
            cast(&self.beta, xs.dtype())?,
        );
        cast(&f(&xs, &g, &b)?, dtype)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.run(x, false)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// GroupNorm with 32 groups.
pub fn group_norm(vb: VarBuilder, channels: usize, eps: f64) -> Result<GroupNorm> {
    let gamma = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
    let beta = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
    Ok(GroupNorm {
        gamma,
        beta,
        groups: NORM_GROUPS,
        eps,
    })
}

/// A convolution (official `weight`/`bias` names, groups 1) on the project's im2col/Winograd CPU
/// kernel; candle's conv (cuDNN on GPUs) elsewhere.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        ops::conv::conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
    }
}

/// Convolution with `kernel`×`kernel`, the given stride and padding, official `weight`/`bias`
/// names. No zero initialisation: from-scratch training uses Kaiming init like candle's.
pub fn conv2d(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
    let weight = vb.get_with_hints((cout, cin, kernel, kernel), "weight", init)?;
    let bound = 1.0 / ((cin * kernel * kernel) as f64).sqrt();
    let bias = vb.get_with_hints(
        cout,
        "bias",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    Ok(Conv2d {
        weight,
        bias: Some(bias),
        stride,
        padding,
    })
}

/// A 3×3 same-padding convolution, the most common one.
pub fn conv3x3(vb: VarBuilder, cin: usize, cout: usize) -> Result<Conv2d> {
    conv2d(vb, cin, cout, 3, 1, 1)
}

/// A dense layer over the last axis that never hands candle a non-contiguous or broadcast batched
/// left operand: the input is flattened to a contiguous 2-D matrix first. Also stands in for the
/// official 1×1 `conv1d`/`conv2d` projections (weights (out,in,1) / (out,in,1,1)) applied to tokens.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn load(vb: VarBuilder, shape: Vec<usize>, bias: bool) -> Result<Self> {
        let (cout, cin) = (shape[0], shape[1]);
        // Kept in the checkpoint's shape (no copy at load); viewed as (cout, cin) per call.
        let weight = vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bias = if bias {
            let bound = 1.0 / (cin as f64).sqrt();
            let init = Init::Uniform {
                lo: -bound,
                up: bound,
            };
            Some(vb.get_with_hints(cout, "bias", init)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `nn.Linear(cin, cout, bias)`.
    pub fn new(vb: VarBuilder, cin: usize, cout: usize, bias: bool) -> Result<Self> {
        Self::load(vb, vec![cout, cin], bias)
    }

    /// `conv_nd(1, cin, cout, 1)`: weight (cout, cin, 1).
    pub fn conv1d_k1(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Self::load(vb, vec![cout, cin, 1], true)
    }

    /// `nn.Conv2d(cin, cout, 1)`: weight (cout, cin, 1, 1).
    pub fn conv2d_k1(vb: VarBuilder, cin: usize, cout: usize) -> Result<Self> {
        Self::load(vb, vec![cout, cin, 1, 1], true)
    }

    /// Applies the layer to the last axis of `x` (any rank ≥ 1).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let cin = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / cin.max(1);
        let flat = x.contiguous()?.reshape((rows, cin))?;
        let cout = self.weight.dim(0)?;
        let w = self.weight.reshape((cout, cin))?;
        let y = ops::linear::linear(&flat, &w, self.bias.as_ref())?;
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = cout;
        }
        Ok(y.reshape(out_dims)?)
    }
}

/// LayerNorm over the last axis (torch eps 1e-5), composed from primitives so gradients flow and
/// f64 works.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x_in: &Tensor) -> Result<Tensor> {
        let x = &cast(x_in, compute_dtype(x_in.dtype()))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = cast(&xc.broadcast_div(&(var + self.eps)?.sqrt()?)?, x_in.dtype())?;
        Ok(xn.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }
}

/// (B,C,H,W) → contiguous (B, H·W, C) token sequence.
pub fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?)
}

/// (B, H·W, C) → contiguous (B,C,H,W).
pub fn from_tokens(t: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = t.dims3()?;
    Ok(t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?)
}

/// Multi-head scaled dot-product attention on head-major inputs: q (B,T,H·d), k and v (B,S,H·d),
/// head h owning channels h·d..(h+1)·d (the layout of LDM's `rearrange('b n (h d) -> (b h) n d')`
/// and of the legacy ADM heads after the split in [`qkv_attention_legacy`]). Softmax over keys in
/// the working dtype; output (B,T,H·d).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, t, hd) = q.dims3()?;
    let s = k.dim(1)?;
    let d = hd / heads;
    let split = |x: &Tensor, n: usize| -> Result<Tensor> {
        Ok(x.reshape((b, n, heads, d))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * heads, n, d))?)
    };
    let (qh, kh, vh) = (split(q, t)?, split(k, s)?, split(v, s)?);
    let out = if matches!(q.dtype(), DType::F32 | DType::F64) {
        ops::attention::attention(&qh, &kh, &vh, scale)?
    } else {
        let kt = kh.transpose(1, 2)?.contiguous()?;
        let logits = (qh.matmul(&kt)? * scale)?;
        // Half-precision runs take the softmax in f32, like the references' `softmax(w.float())`.
        let weights =
            candle_nn::ops::softmax(&cast(&logits, compute_dtype(q.dtype()))?, D::Minus1)?;
        cast(&weights, q.dtype())?.contiguous()?.matmul(&vh)?
    };
    Ok(out
        .reshape((b, heads, t, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, t, hd))?)
}

/// guided-diffusion's `QKVAttentionLegacy` on a token-major qkv (B,T,3·C): the channel axis is laid
/// out per head as [q_h, k_h, v_h] (each C/heads wide). Scale 1/√d (the reference splits it as
/// d^-¼ on q and on k, identical up to rounding).
pub fn qkv_attention_legacy(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c3) = qkv.dims3()?;
    let d = c3 / (3 * heads);
    let per_head = qkv.reshape((b, t, heads, 3, d))?;
    let part =
        |i: usize| -> Result<Tensor> { Ok(per_head.narrow(3, i, 1)?.reshape((b, t, heads * d))?) };
    attention(
        &part(0)?,
        &part(1)?,
        &part(2)?,
        heads,
        1.0 / (d as f64).sqrt(),
    )
}

/// Nearest-neighbour ×2 upsampling (its backward sums the four copies, unlike candle's
/// `upsample_nearest2d`).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    Ok(ops::resample2x::upsample_nearest2x(x)?)
}

/// 2×2 / stride-2 average pooling (`F.avg_pool2d(x, 2)`; odd trailing rows/columns are dropped
/// like torch's floor mode).
pub fn avg_pool2x(x: &Tensor) -> Result<Tensor> {
    Ok(ops::resample2x::avg_pool2x(x)?)
}

/// Labels as a U32 index tensor.
pub fn label_tensor(labels: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(labels.to_vec(), labels.len(), device)?)
}

/// Applies a candle module (convolution, GroupNorm) and maps its error.
pub fn apply<M: Module>(m: &M, x: &Tensor) -> Result<Tensor> {
    Ok(m.forward(x)?)
}

/// The dtype statistics and softmax are computed in: f32 for half types, else unchanged.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

/// Casts `x` to `dtype` if needed (weights and activations share the VarBuilder dtype).
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        Ok(x.clone())
    } else {
        Ok(x.to_dtype(dtype)?)
    }
}

/// Whether a [`ResBlock`] resamples inside itself (`resblock_updown`): nearest ×2 up, or 2×2
/// average-pool down, applied to both the residual branch (after the first norm+SiLU) and the skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    Keep,
    Up,
    Down,
}

impl Resample {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Resample::Keep => Ok(x.clone()),
            Resample::Up => upsample_nearest2x(x),
            Resample::Down => avg_pool2x(x),
        }
    }
}

/// The timestep-conditioned residual block shared by guided-diffusion's and openaimodel's UNets
/// (`ResBlock`: `in_layers`, `emb_layers`, `out_layers`, `skip_connection` with dropout 0).
#[derive(Debug, Clone)]
pub struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb_proj: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    skip: Option<Conv2d>,
    resample: Resample,
    scale_shift: bool,
}

impl ResBlock {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        emb_dim: usize,
        cout: usize,
        scale_shift: bool,
        resample: Resample,
    ) -> Result<Self> {
        let emb_out = if scale_shift { 2 * cout } else { cout };
        let skip = if cin == cout {
            None
        } else {
            Some(conv2d(vb.pp("skip_connection"), cin, cout, 1, 1, 0)?)
        };
        Ok(Self {
            in_norm: group_norm(vb.pp("in_layers.0"), cin, GN_EPS_ADM)?,
            in_conv: conv3x3(vb.pp("in_layers.2"), cin, cout)?,
            emb_proj: Linear::new(vb.pp("emb_layers.1"), emb_dim, emb_out, true)?,
            out_norm: group_norm(vb.pp("out_layers.0"), cout, GN_EPS_ADM)?,
            out_conv: conv3x3(vb.pp("out_layers.3"), cout, cout)?,
            skip,
            resample,
            scale_shift,
        })
    }

    /// `x` (B,cin,H,W), `emb` (B,emb_dim) → (B,cout,H',W').
    ///
    /// `h` is reassigned, not shadowed, at every stage: a shadowed tensor lives to the end of the
    /// function, and at ADM-256's 256² level each stage is 64–128 MB, so shadowing kept ≈7 of them
    /// alive at once where PyTorch frees each as soon as the next exists.
    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let e = self.emb_proj.forward(&silu(emb)?)?;
        let mut h = self.in_norm.forward_silu(x)?;
        h = self.resample.apply(&h)?;
        h = apply(&self.in_conv, &h)?;
        if self.scale_shift {
            h = self.out_norm.forward_modulated_silu(&h, &e)?;
        } else {
            h = h.broadcast_add(&e.reshape((e.dim(0)?, e.dim(1)?, 1, 1))?)?;
            h = self.out_norm.forward_silu(&h)?;
        }
        h = apply(&self.out_conv, &h)?;
        let x = self.resample.apply(x)?;
        let skip = match &self.skip {
            Some(conv) => apply(conv, &x)?,
            None => x,
        };
        Ok((skip + h)?)
    }
}
