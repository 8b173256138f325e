//! Pooling with correct gradients.
//!
//! candle 0.11's `max_pool2d` scales its gradient by 1/(k·k) and refuses kernel ≠ stride in backward
//! (candle-notes §3), which breaks Clean Grad through a torchvision ResNet stem (k3 s2 p1). Two
//! implementations with the same semantics: on CPU (f32/f64) a custom op that records nothing and
//! re-finds each window's maximum in backward; elsewhere a composition of differentiable
//! primitives (cat, narrow, reshape, where_cond, sum) that runs on every device. The CPU op is ~10×
//! cheaper (the composition materialises k² shifted copies and their gradients).

use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Shape, Tensor, WithDType};

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
        out_len(h, k, s, p)?;
        out_len(w, k, s, p)?;
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            return Ok(x.contiguous()?.apply_op1(*self)?);
        }
        self.forward_composed(x)
    }

    /// The device-independent formulation (public so tests can hold the two against each other).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
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

impl MaxPool2d {
    /// Flat index (into `x`, NCHW contiguous) of the first maximum of every output window,
    /// PyTorch's choice: row-major scan, padding never wins, NaN wins.
    fn window_argmax<T: WithDType>(
        &self,
        x: &[T],
        dims: (usize, usize, usize, usize),
    ) -> Vec<usize> {
        let (n, c, h, w) = dims;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let mut out = Vec::with_capacity(n * c * oh * ow);
        for plane in 0..n * c {
            let base = plane * h * w;
            for oy in 0..oh {
                let (y0, y1) = ((oy * s).saturating_sub(p), (oy * s + k - p).min(h));
                for ox in 0..ow {
                    let (x0, x1) = ((ox * s).saturating_sub(p), (ox * s + k - p).min(w));
                    let mut best = base + y0 * w + x0;
                    for y in y0..y1 {
                        for xx in x0..x1 {
                            let i = base + y * w + xx;
                            let v = x[i];
                            #[allow(clippy::eq_op)] // v != v: NaN
                            if v > x[best] || v != v {
                                best = i;
                            }
                        }
                    }
                    out.push(best);
                }
            }
        }
        out
    }

    fn out_shape(&self, dims: (usize, usize, usize, usize)) -> (usize, usize, usize, usize) {
        let (n, c, h, w) = dims;
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        (n, c, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1)
    }

    fn grad_typed<T: WithDType>(&self, arg: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
        let x = arg.flatten_all()?.to_vec1::<T>()?;
        let g = grad.flatten_all()?.to_vec1::<T>()?;
        let mut gx = vec![T::zero(); x.len()];
        for (gi, src) in g.iter().zip(self.window_argmax(&x, arg.dims4()?)) {
            gx[src] += *gi;
        }
        Tensor::from_vec(gx, arg.shape(), arg.device())
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d-first-argmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("max pool expects a contiguous input")
        };
        let dims = layout.shape().dims4()?;
        let out = Shape::from(self.out_shape(dims));
        Ok(match storage {
            CpuStorage::F32(v) => {
                let x = &v[start..end];
                (
                    CpuStorage::F32(
                        self.window_argmax(x, dims)
                            .into_iter()
                            .map(|i| x[i])
                            .collect(),
                    ),
                    out,
                )
            }
            CpuStorage::F64(v) => {
                let x = &v[start..end];
                (
                    CpuStorage::F64(
                        self.window_argmax(x, dims)
                            .into_iter()
                            .map(|i| x[i])
                            .collect(),
                    ),
                    out,
                )
            }
            _ => candle_core::bail!("max pool custom op: only f32 and f64"),
        })
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(match arg.dtype() {
            DType::F32 => self.grad_typed::<f32>(arg, grad_res)?,
            DType::F64 => self.grad_typed::<f64>(arg, grad_res)?,
            other => candle_core::bail!("max pool custom op: unsupported dtype {other:?}"),
        }))
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
