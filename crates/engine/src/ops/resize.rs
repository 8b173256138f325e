//! Resizing (nearest, bilinear) with correct gradients.
//!
//! Both resizes are built from `index_select` gathers along H and W, whose backward (`index_add`)
//! accumulates correctly; candle's own `upsample_nearest2d` backward overwrites gradients and its
//! bilinear upsample has no backward at all (candle-notes §3).

use candle_core::{Device, Tensor};

use crate::{EngineError, Result};

/// PyTorch's legacy "nearest" source index: floor(dst · in/out) with the scale in float32.
pub fn nearest_indices(in_size: usize, out_size: usize) -> Vec<u32> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|d| ((d as f32 * scale).floor() as usize).min(in_size - 1) as u32)
        .collect()
}

/// A crop followed by a nearest resize, as one gather per spatial axis: out\[h, w\] =
/// `x[rows[h], cols[w]]`. Knows its own transpose so that gradients can be scattered back.
#[derive(Debug, Clone)]
pub struct NearestGather {
    rows: Tensor,
    cols: Tensor,
    in_h: usize,
    in_w: usize,
}

impl NearestGather {
    /// Plain nearest resize (in_h, in_w) → (out_h, out_w).
    pub fn resize(in_hw: (usize, usize), out_hw: (usize, usize), device: &Device) -> Result<Self> {
        Self::crop_resize(in_hw, (0, 0, in_hw.0, in_hw.1), out_hw, device)
    }

    /// Crop `x[.., oy..oy+h, ox..ox+w]` (given as (oy, ox, h, w)) then nearest-resize to `out_hw`.
    pub fn crop_resize(
        in_hw: (usize, usize),
        crop: (usize, usize, usize, usize),
        out_hw: (usize, usize),
        device: &Device,
    ) -> Result<Self> {
        let (in_h, in_w) = in_hw;
        let (oy, ox, h, w) = crop;
        if h == 0 || w == 0 || oy + h > in_h || ox + w > in_w || out_hw.0 == 0 || out_hw.1 == 0 {
            return Err(EngineError::InvalidInput(format!(
                "crop (oy {oy}, ox {ox}, {h}x{w}) → {out_hw:?} does not fit a {in_h}x{in_w} image"
            )));
        }
        let shift = |idx: Vec<u32>, off: usize| idx.into_iter().map(|i| i + off as u32).collect();
        let rows: Vec<u32> = shift(nearest_indices(h, out_hw.0), oy);
        let cols: Vec<u32> = shift(nearest_indices(w, out_hw.1), ox);
        Ok(Self {
            rows: Tensor::new(rows, device)?,
            cols: Tensor::new(cols, device)?,
            in_h,
            in_w,
        })
    }

    /// Applies the gather to (N, C, H, W).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.index_select(&self.rows, 2)?.index_select(&self.cols, 3)?)
    }

    /// The transpose of [`Self::forward`]: scatters `grad_out` (N, C, out_h, out_w) back onto an
    /// (N, C, in_h, in_w) zero tensor, summing where several outputs read the same input pixel.
    pub fn backward(&self, grad_out: &Tensor) -> Result<Tensor> {
        let (n, c, out_h, _) = grad_out.dims4()?;
        let (dtype, dev) = (grad_out.dtype(), grad_out.device());
        let wide = Tensor::zeros((n, c, out_h, self.in_w), dtype, dev)?.index_add(
            &self.cols,
            &grad_out.contiguous()?,
            3,
        )?;
        Ok(Tensor::zeros((n, c, self.in_h, self.in_w), dtype, dev)?
            .index_add(&self.rows, &wide, 2)?)
    }
}

/// Two-tap linear interpolation along one axis, align_corners = False, no antialias: source
/// coordinate (dst + ½)·in/out − ½ clamped below at 0, as torch's upsample_bilinear2d (and OpenCV's
/// INTER_LINEAR) compute it. Scale and weights in float32 like torch's CPU kernel for f32 input.
fn linear_taps(in_size: usize, out_size: usize) -> (Vec<u32>, Vec<u32>, Vec<f32>, Vec<f32>) {
    let scale = in_size as f32 / out_size as f32;
    let mut i0 = Vec::with_capacity(out_size);
    let mut i1 = Vec::with_capacity(out_size);
    let mut l0 = Vec::with_capacity(out_size);
    let mut l1 = Vec::with_capacity(out_size);
    for d in 0..out_size {
        let src = ((d as f32 + 0.5) * scale - 0.5).max(0.0);
        let lo = (src.floor() as usize).min(in_size - 1);
        let hi = (lo + 1).min(in_size - 1);
        let lambda = src - lo as f32;
        i0.push(lo as u32);
        i1.push(hi as u32);
        l0.push(1.0 - lambda);
        l1.push(lambda);
    }
    (i0, i1, l0, l1)
}

fn lerp_axis(x: &Tensor, axis: usize, out_size: usize) -> Result<Tensor> {
    let in_size = x.dim(axis)?;
    let (i0, i1, l0, l1) = linear_taps(in_size, out_size);
    let dev = x.device();
    let mut wshape = vec![1usize; x.rank()];
    wshape[axis] = out_size;
    let weight = |l: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(l, wshape.as_slice(), dev)?.to_dtype(x.dtype())?)
    };
    let a = x.index_select(&Tensor::new(i0, dev)?, axis)?;
    let b = x.index_select(&Tensor::new(i1, dev)?, axis)?;
    Ok((a.broadcast_mul(&weight(l0)?)? + b.broadcast_mul(&weight(l1)?)?)?)
}

/// Bilinear resize of (N, C, H, W) to (out_h, out_w): torch `F.interpolate(mode="bilinear",
/// align_corners=False)` / torchvision `Resize(antialias=False)` on tensors. Interpolates along W
/// first, then H, which is torch's grouping h0·(w0·a + w1·b) + h1·(w0·c + w1·d).
pub fn bilinear_resize(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    if out_h == 0 || out_w == 0 {
        return Err(EngineError::InvalidInput(format!(
            "cannot resize to {out_h}x{out_w}"
        )));
    }
    let along_w = lerp_axis(x, 3, out_w)?;
    lerp_axis(&along_w, 2, out_h)
}
