//! The UNets' ×2 resampling as CPU ops: nearest upsampling and 2×2 average pooling, each the
//! other's adjoint (up to the ¼), so each one's backward is the other's forward. candle composes
//! them from a broadcast and from two means; the broadcast's backward is a generic strided
//! reduction and each node adds a gradient buffer, which made the resampling ResBlocks' backward
//! cost more than their forward. Other devices and dtypes use those compositions.

use super::dense::{MAP_CHUNK, Real, by_dtype, contiguous, fast_path};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Nearest-neighbour ×2 upsampling of `x (B, C, H, W)` to `(B, C, 2H, 2W)`; its backward sums
/// the four copies (candle's `upsample_nearest2d` overwrites instead).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !fast_path(x) {
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, 2 * h, 2 * w));
    }
    x.contiguous()?.apply_op1(Resample2x {
        up: true,
        scale: 1.0,
        out: (2 * h, 2 * w),
    })
}

/// 2×2 / stride-2 average pooling of `x (B, C, H, W)` (`F.avg_pool2d(x, 2)`: an odd last row or
/// column is dropped, as in torch's floor mode).
pub fn avg_pool2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !fast_path(x) {
        let x = x.narrow(2, 0, h / 2 * 2)?.narrow(3, 0, w / 2 * 2)?;
        return x.reshape((b, c, h / 2, 2, w / 2, 2))?.mean(5)?.mean(3);
    }
    x.contiguous()?.apply_op1(Resample2x {
        up: false,
        scale: 0.25,
        out: (h / 2, w / 2),
    })
}

/// `up`: every value, times `scale`, into a 2×2 block of an `out`-sized plane (rows or columns
/// past the blocks are zero); otherwise every 2×2 block's sum, times `scale`, into one value.
#[derive(Clone, Copy)]
struct Resample2x {
    up: bool,
    scale: f64,
    out: (usize, usize),
}

impl Resample2x {
    fn run<T: Real>(&self, x: &[T], (h, w): (usize, usize)) -> Vec<T> {
        let (oh, ow) = self.out;
        let planes = x.len() / (h * w).max(1);
        let mut y = vec![T::from_f64(0.0); planes * oh * ow];
        if oh * ow == 0 || h * w == 0 {
            return y;
        }
        let s = T::from_f64(self.scale);
        // Tasks of whole output rows, about MAP_CHUNK elements each.
        let rows_per_task = (MAP_CHUNK / ow).max(1);
        y.par_chunks_mut(rows_per_task * ow)
            .enumerate()
            .for_each(|(task, chunk)| {
                for (i, out_row) in chunk.chunks_mut(ow).enumerate() {
                    let row = task * rows_per_task + i;
                    let (plane, oy) = (row / oh, row % oh);
                    let src = &x[plane * h * w..(plane + 1) * h * w];
                    if self.up {
                        // Past the 2h rows the blocks cover, the row stays zero.
                        if let Some(row) = src.chunks_exact(w).nth(oy / 2) {
                            up_row(row, s, out_row);
                        }
                    } else {
                        let (a, b) = src[2 * oy * w..(2 * oy + 2) * w].split_at(w);
                        pool_row(a, b, s, out_row);
                    }
                }
            });
        y
    }
}

/// One output row of the upsampling: `src[j]·s` twice for each source column (zero past `2w`).
fn up_row<T: Real>(src: &[T], s: T, out: &mut [T]) {
    for (pair, &v) in out.chunks_exact_mut(2).zip(src) {
        pair[0] = v * s;
        pair[1] = v * s;
    }
}

/// One output row of the pooling: the 2×2 sums of rows `a`, `b`, times `s`.
fn pool_row<T: Real>(a: &[T], b: &[T], s: T, out: &mut [T]) {
    let pairs = a.chunks_exact(2).zip(b.chunks_exact(2));
    for (o, (a, b)) in out.iter_mut().zip(pairs) {
        *o = (a[0] + a[1] + b[0] + b[1]) * s;
    }
}

impl CustomOp1 for Resample2x {
    fn name(&self) -> &'static str {
        if self.up {
            "fast-upsample-nearest2x"
        } else {
            "fast-avg-pool2x"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Ok((b, c, h, w)) = l.shape().dims4() else {
            bail!("resample2x: input must be (B, C, H, W), got {:?}", l.dims())
        };
        let (oh, ow) = self.out;
        // The block grid must fit the input (pool) or the output (up).
        let (gh, gw) = if self.up { (h, w) } else { (oh, ow) };
        let (bh, bw) = if self.up { (oh, ow) } else { (h, w) };
        if 2 * gh > bh || 2 * gw > bw || bh > 2 * gh + 1 || bw > 2 * gw + 1 {
            bail!("resample2x: {h}×{w} does not map to {oh}×{ow}")
        }
        let shape = Shape::from((b, c, oh, ow));
        by_dtype(
            s,
            shape,
            || Ok(self.run::<f32>(contiguous(s, l)?, (h, w))),
            || Ok(self.run::<f64>(contiguous(s, l)?, (h, w))),
        )
    }

    /// The adjoint: pooling's gradient is the upsampled gradient times ¼ (zero on a dropped odd
    /// row or column), upsampling's is the 2×2 sum of the gradient.
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let adjoint = Resample2x {
            up: !self.up,
            scale: self.scale,
            out: (h, w),
        };
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&adjoint)?))
    }
}
