//! Pooling with correct gradients.
//!
//! candle 0.11's `max_pool2d` scales its gradient by 1/(k·k) and refuses kernel ≠ stride in backward
//! (candle-notes §3), which breaks Clean Grad through a torchvision ResNet stem (k3 s2 p1). This max
//! pool is built from differentiable primitives only (cat, narrow, reshape, where_cond, sum), so its
//! backward is candle's own autograd and it runs on every device.

use candle_core::{D, DType, Tensor};

use crate::{EngineError, Result};

/// Geometry of a 2-D max pool (square kernel, same stride and padding on both axes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool2d {
    /// The torchvision ResNet stem pool.
    pub const RESNET_STEM: Self = Self {
        kernel: 3,
        stride: 2,
        padding: 1,
    };

    /// Max pool of `x` (N,C,H,W), floor output size, −∞ padding: PyTorch's `F.max_pool2d`.
    ///
    /// The gradient goes to the first maximum of each window in row-major order, which is the
    /// element PyTorch picks, so ties (e.g. all-zero windows after a ReLU) are routed identically.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        if k == 0 || s == 0 || 2 * p > k {
            return Err(EngineError::InvalidInput(format!(
                "max pool needs kernel ≥ 1, stride ≥ 1 and padding ≤ kernel/2, got k{k} s{s} p{p}"
            )));
        }
        let (_, _, h, w) = x.dims4()?;
        let oh = out_len(h, k, s, p)?;
        let ow = out_len(w, k, s, p)?;
        let padded = pad_neg_inf(x, 2, p, (k - 1 + oh * s).saturating_sub(h + p))?;
        let padded = pad_neg_inf(&padded, 3, p, (k - 1 + ow * s).saturating_sub(w + p))?;
        let mut windows = Vec::with_capacity(k * k);
        for di in 0..k {
            let rows = strided_take(&padded, 2, di, oh, s)?;
            for dj in 0..k {
                windows.push(strided_take(&rows, 3, dj, ow, s)?);
            }
        }
        // (N,C,k·k,oh,ow), window offsets in row-major order.
        let stacked = Tensor::stack(&windows, 2)?;
        let first_max = stacked.detach().argmax_keepdim(2)?;
        let offsets =
            Tensor::arange(0u32, (k * k) as u32, x.device())?.reshape((1, 1, k * k, 1, 1))?;
        let selected = first_max.broadcast_eq(&offsets)?;
        // where_cond rather than a 0/1 product: −∞ · 0 would be NaN.
        let zeros = stacked.zeros_like()?;
        Ok(selected.where_cond(&stacked, &zeros)?.sum(2)?)
    }
}

fn out_len(n: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if n + 2 * p < k {
        return Err(EngineError::InvalidInput(format!(
            "max pool kernel {k} does not fit an input of size {n} with padding {p}"
        )));
    }
    Ok((n + 2 * p - k) / s + 1)
}

/// Pads `dim` with `before` and `after` slices of −∞ (the identity of max).
fn pad_neg_inf(x: &Tensor, dim: usize, before: usize, after: usize) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(3);
    let mut shape = x.dims().to_vec();
    if before > 0 {
        shape[dim] = before;
        parts.push(neg_inf(&shape, x)?);
    }
    parts.push(x.clone());
    if after > 0 {
        shape[dim] = after;
        parts.push(neg_inf(&shape, x)?);
    }
    Ok(Tensor::cat(&parts, dim)?)
}

fn neg_inf(shape: &[usize], like: &Tensor) -> Result<Tensor> {
    let t = Tensor::full(f64::NEG_INFINITY, shape.to_vec(), like.device())?;
    Ok(if like.dtype() == DType::F64 {
        t
    } else {
        t.to_dtype(like.dtype())?
    })
}

/// Elements `start, start + step, …` (`count` of them) along `dim`; needs
/// `start + count·step ≤ len(dim)`, which the padding above guarantees.
fn strided_take(x: &Tensor, dim: usize, start: usize, count: usize, step: usize) -> Result<Tensor> {
    let span = x.narrow(dim, start, count * step)?;
    if step == 1 {
        return Ok(span);
    }
    let mut split = x.dims().to_vec();
    split[dim] = count;
    split.insert(dim + 1, step);
    let picked = span.reshape(split)?.narrow(dim + 1, 0, 1)?;
    Ok(picked.squeeze(dim + 1)?)
}

/// Convenience for the common case; see [`MaxPool2d::forward`].
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
    MaxPool2d {
        kernel,
        stride,
        padding,
    }
    .forward(x)
}

/// Global average pool (N,C,H,W) → (N,C).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.flatten_from(2)?.mean(D::Minus1)?)
}
