//! 2-D convolution with constant weights whose backward pass computes only the input gradient.
//!
//! candle 0.11.1's conv backward always computes the kernel gradient too (wasted when the
//! weights are constants, as in every gradient DiffGuard takes), computes the input gradient with
//! a direct-loop CPU `conv_transpose2d` (no gemm; slowest on the many-channel 1×1 convs that make
//! up most of a ResNet-50), and derives the output padding from the height alone, so non-square
//! inputs with different remainders modulo the stride fail. [`FrozenConv2d`] wraps the forward
//! conv in a custom op whose backward is the transposed convolution split into its s×s polyphase
//! components: for each output phase, one stride-1 gemm conv of the padded output gradient with
//! the matching flipped sub-kernel (no multiplications by inserted zeros), the phases then
//! interleaved. (Dilating the gradient with zeros instead costs s² times more; for a ResNet
//! stem at 224×224 that was 13 s of CPU for a batch of 8.)
//!
//! The custom op is used only where it pays and is safe: CPU tensors, a tracked input and weights
//! that are not `Var`s (training needs the kernel gradient and takes candle's own conv).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};

use crate::Result;

/// A conv2d (groups 1, dilation 1) with fixed weights and an optional bias.
#[derive(Debug, Clone)]
pub struct FrozenConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    padding: usize,
    stride: usize,
    /// Per phase (φh·stride + φw): the (C_in, C_out, Mh, Mw) flipped sub-kernel of the input
    /// gradient, None where the phase receives no kernel tap.
    phase_kernels: Vec<Option<Tensor>>,
}

/// One axis of the polyphase split: which kernel taps feed input positions i ≡ φ (mod s).
#[derive(Debug, Clone, Copy)]
struct AxisPhase {
    /// Number of taps M and the first output-gradient window index q_min.
    taps: usize,
    q_min: usize,
    /// Input positions in this phase.
    count: usize,
}

impl AxisPhase {
    fn new(phi: usize, len: usize, k: usize, s: usize, p: usize) -> Self {
        let r = (phi + p) % s;
        Self {
            taps: if r >= k { 0 } else { (k - r).div_ceil(s) },
            q_min: (phi + p) / s,
            count: if phi < len {
                (len - phi).div_ceil(s)
            } else {
                0
            },
        }
    }

    /// Kernel indices of the taps, flipped: tap j multiplies dy[q − M + 1 + j].
    fn kernel_indices(phi: usize, k: usize, s: usize, p: usize) -> Vec<u32> {
        let r = (phi + p) % s;
        let m = Self::new(phi, 1, k, s, p).taps;
        (0..m).map(|j| ((m - 1 - j) * s + r) as u32).collect()
    }
}

impl FrozenConv2d {
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
        stride: usize,
    ) -> Result<Self> {
        let (_, _, kh, kw) = weight.dims4()?;
        if stride == 0 {
            return Err(crate::EngineError::InvalidInput(
                "conv stride must be ≥ 1".into(),
            ));
        }
        let transposed = weight.detach().transpose(0, 1)?.contiguous()?;
        let mut phase_kernels = Vec::with_capacity(stride * stride);
        for phi_h in 0..stride {
            for phi_w in 0..stride {
                let ih = AxisPhase::kernel_indices(phi_h, kh, stride, padding);
                let iw = AxisPhase::kernel_indices(phi_w, kw, stride, padding);
                phase_kernels.push(if ih.is_empty() || iw.is_empty() {
                    None
                } else {
                    let sel = |v: Vec<u32>| Tensor::from_vec(v.clone(), v.len(), weight.device());
                    let k = transposed
                        .index_select(&sel(ih)?, 2)?
                        .index_select(&sel(iw)?, 3)?;
                    Some(k.contiguous()?)
                });
            }
        }
        Ok(Self {
            weight,
            bias,
            padding,
            stride,
            phase_kernels,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let custom = x.device().is_cpu()
            && x.track_op()
            && !self.weight.track_op()
            && matches!(x.dtype(), DType::F32 | DType::F64);
        if custom {
            // The bias is added inside the op: a broadcast add outside would make candle
            // reduce a bias gradient nobody needs.
            return Ok(x.contiguous()?.apply_op1(self.clone())?);
        }
        let y = plain_conv(x, &self.weight, self.padding, self.stride)?;
        Ok(add_bias(y, self.bias.as_ref())?)
    }

    /// ∂L/∂x from ∂L/∂y for an input of spatial size `hw`: the s×s phases of the input,
    /// interleaved (position (a·s + φh, b·s + φw) comes from phase (φh, φw) at (a, b)).
    fn input_grad(&self, grad_y: &Tensor, hw: (usize, usize)) -> candle_core::Result<Tensor> {
        let s = self.stride;
        let (n, _, _, _) = grad_y.dims4()?;
        let cin = self.weight.dim(1)?;
        if s == 1 {
            return self.phase_grad(grad_y, (0, 0), hw);
        }
        let (ch, cw) = (hw.0.div_ceil(s), hw.1.div_ceil(s));
        let mut rows = Vec::with_capacity(s);
        for phi_h in 0..s {
            let mut cols = Vec::with_capacity(s);
            for phi_w in 0..s {
                let g = self.phase_grad(grad_y, (phi_h, phi_w), hw)?;
                let (_, _, gh, gw) = g.dims4()?;
                cols.push(
                    g.pad_with_zeros(2, 0, ch - gh)?
                        .pad_with_zeros(3, 0, cw - gw)?,
                );
            }
            rows.push(Tensor::stack(&cols, 4)?.reshape((n, cin, ch, cw * s))?);
        }
        let full = Tensor::stack(&rows, 3)?.reshape((n, cin, ch * s, cw * s))?;
        full.narrow(2, 0, hw.0)?.narrow(3, 0, hw.1)
    }

    /// The input gradient at positions ≡ (φh, φw) (mod stride), (N, C_in, count_h, count_w).
    fn phase_grad(
        &self,
        grad_y: &Tensor,
        phi: (usize, usize),
        hw: (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (s, p) = (self.stride, self.padding);
        let (n, _, ho, wo) = grad_y.dims4()?;
        let (_, cin, kh, kw) = self.weight.dims4()?;
        let ah = AxisPhase::new(phi.0, hw.0, kh, s, p);
        let aw = AxisPhase::new(phi.1, hw.1, kw, s, p);
        let kernel = match &self.phase_kernels[phi.0 * s + phi.1] {
            Some(k) if ah.count > 0 && aw.count > 0 => k,
            _ => {
                return Tensor::zeros(
                    (n, cin, ah.count, aw.count),
                    grad_y.dtype(),
                    grad_y.device(),
                );
            }
        };
        // Window q covers dy[q − M + 1 ..= q]: pad M − 1 in front, and behind as far as the last
        // window of this phase reaches past the end of dy.
        let back = |a: &AxisPhase, len: usize| (a.q_min + a.count).saturating_sub(len);
        let padded = grad_y
            .pad_with_zeros(2, ah.taps - 1, back(&ah, ho))?
            .pad_with_zeros(3, aw.taps - 1, back(&aw, wo))?;
        let g = padded.conv2d(kernel, 0, 1, 1, 1)?;
        g.narrow(2, ah.q_min, ah.count)?
            .narrow(3, aw.q_min, aw.count)
    }
}

fn add_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(y),
    }
}

/// candle's conv, except that a strided conv whose H and W leave different remainders modulo the
/// stride runs at stride 1 and is subsampled, because candle's backward fails on it (it takes the
/// output padding of both axes from the height).
pub fn plain_conv(x: &Tensor, weight: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let p = padding;
    let fits = h + 2 * p >= kh && w + 2 * p >= kw;
    if stride == 1 || !fits || (h + 2 * p - kh) % stride == (w + 2 * p - kw) % stride {
        return Ok(x.conv2d(weight, p, stride, 1, 1)?);
    }
    let full = x.conv2d(weight, p, 1, 1, 1)?;
    let every = |len: usize| {
        let idx: Vec<u32> = (0..len).step_by(stride).map(|i| i as u32).collect();
        Tensor::new(idx.as_slice(), x.device())
    };
    let full = full.index_select(&every(full.dim(2)?)?, 2)?;
    Ok(full.index_select(&every(full.dim(3)?)?, 3)?)
}

fn tensor_from_cpu(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Tensor> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("frozen conv expects a contiguous input")
    };
    let shape = layout.shape().clone();
    match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], shape, &candle_core::Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], shape, &candle_core::Device::Cpu),
        _ => candle_core::bail!("frozen conv: only f32 and f64 inputs"),
    }
}

impl CustomOp1 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        // The input is copied into a fresh, untracked tensor so candle's own (gemm) conv runs.
        let x = tensor_from_cpu(storage, layout)?;
        let y = x.conv2d(&self.weight.detach(), self.padding, self.stride, 1, 1)?;
        let y = add_bias(y, self.bias.as_ref().map(Tensor::detach).as_ref())?.contiguous()?;
        let (st, l) = y.storage_and_layout();
        match (&*st, l.contiguous_offsets()) {
            (Storage::Cpu(c), Some((0, end))) if end == l.shape().elem_count() => {
                Ok((c.clone(), l.shape().clone()))
            }
            _ => candle_core::bail!("frozen conv: unexpected output storage"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        Ok(Some(self.input_grad(grad_res, (h, w))?))
    }
}
