//! The dense layer `y = x·Wᵀ + b` over the rows of a 2-D `x`, as one op whose backward computes
//! the gradient of an operand only when that operand tracks one. Composed from candle's matmul and
//! broadcast add, the backward always computes W's gradient and a full-size one for the broadcast
//! bias, and keeps both until it returns: with frozen weights, 200 MiB of the ADM-256 UNet's
//! input-gradient peak at 64² were such gradients, for its attention projections alone.
//! Other devices and dtypes use that composition.

use super::dense::{
    Mat, Real, by_dtype, contiguous, fast_path, gemm, gemm_parallelism, num_threads,
};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

/// `x (rows, cin) · w (cout, cin)ᵀ + b (cout)`, differentiable in all three.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (_, cin) = x.dims2()?;
    let (cout, win) = w.dims2()?;
    if win != cin || b.is_some_and(|b| b.dims() != [cout]) {
        bail!(
            "linear: x {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            w.dims(),
            b.map(Tensor::dims)
        )
    }
    if !fast_path(x) {
        let y = x.matmul(&w.t()?)?;
        return match b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        };
    }
    let zeros;
    let b = match b {
        Some(b) => b,
        None => {
            zeros = Tensor::zeros(cout, x.dtype(), x.device())?;
            &zeros
        }
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Linear)
}

struct Linear;

impl Linear {
    fn forward<T: Real>(
        x: &[T],
        w: &[T],
        b: &[T],
        (rows, cin, cout): (usize, usize, usize),
    ) -> Result<Vec<T>> {
        let mut y: Vec<T> = b.iter().copied().cycle().take(rows * cout).collect();
        let wt = Mat::rows(w, cin).t();
        let par = gemm_parallelism(num_threads());
        gemm((rows, cout, cin), &mut y, Mat::rows(x, cin), wt, true, par)?;
        Ok(y)
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fast-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cin) = lx.shape().dims2()?;
        let cout = lw.dims()[0];
        let dims = (rows, cin, cout);
        by_dtype(
            sx,
            Shape::from((rows, cout)),
            || {
                Self::forward::<f32>(
                    contiguous(sx, lx)?,
                    contiguous(sw, lw)?,
                    contiguous(sb, lb)?,
                    dims,
                )
            },
            || {
                Self::forward::<f64>(
                    contiguous(sx, lx)?,
                    contiguous(sw, lw)?,
                    contiguous(sb, lb)?,
                    dims,
                )
            },
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Contiguous 2-D operands only: candle's matmul is wrong for non-contiguous batched ones.
        let dy = dy.contiguous()?;
        let dx = x.track_op().then(|| dy.matmul(w)).transpose()?;
        let dw = w
            .track_op()
            .then(|| dy.t()?.contiguous()?.matmul(x))
            .transpose()?;
        let db = b.track_op().then(|| dy.sum(0)).transpose()?;
        Ok((dx, dw, db))
    }
}
