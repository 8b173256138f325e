//! SiLU (x·σ(x)) as a vectorised, multi-threaded CPU op with its backward. candle's unary SiLU
//! calls scalar libm `exp` on one thread (1.5 ms vs PyTorch's 0.22 ms for 1M elements,
//! candle-notes §4). Other devices and dtypes use candle's op.

use super::dense::{Real, by_dtype, contiguous, fast_path, par_map, simd_kernel};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// x·σ(x), differentiable.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if !fast_path(x) {
        return x.silu();
    }
    x.contiguous()?.apply_op1(Silu)
}

/// d silu(z)/dz = σ(z)·(1 + z·(1 − σ(z))).
#[inline(always)]
pub(crate) fn silu_grad<T: Real>(z: T) -> T {
    let one = T::from_f64(1.0);
    let s = z.sigmoid();
    s * (one + z * (one - s))
}

simd_kernel! {
    fn silu_in_place<T>(xs: &mut [T]) {
        for v in xs.iter_mut() {
            *v *= v.sigmoid();
        }
    }
}

simd_kernel! {
    fn silu_backward<T>(dy_to_dx: &mut [T], x: &[T]) {
        for (d, &z) in dy_to_dx.iter_mut().zip(x) {
            *d *= silu_grad(z);
        }
    }
}

struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "fast-silu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T]) -> Result<Vec<T>> {
            let mut y = x.to_vec();
            par_map(&mut y, |_, c| silu_in_place(c));
            Ok(y)
        }
        let shape = l.shape().clone();
        by_dtype(
            s,
            shape,
            || run::<f32>(contiguous(s, l)?),
            || run::<f64>(contiguous(s, l)?),
        )
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &SiluGrad)?))
    }
}

/// `(x, dY) -> dY·silu'(x)`.
struct SiluGrad;

impl CustomOp2 for SiluGrad {
    fn name(&self) -> &'static str {
        "fast-silu-grad"
    }
    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sdy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(x: &[T], dy: &[T]) -> Result<Vec<T>> {
            let mut dx = dy.to_vec();
            par_map(&mut dx, |start, c| silu_backward(c, &x[start..]));
            Ok(dx)
        }
        if lx.dims() != ldy.dims() {
            candle_core::bail!("silu grad: x {:?} vs dY {:?}", lx.dims(), ldy.dims())
        }
        let shape = lx.shape().clone();
        by_dtype(
            sx,
            shape,
            || run::<f32>(contiguous(sx, lx)?, contiguous(sdy, ldy)?),
            || run::<f64>(contiguous(sx, lx)?, contiguous(sdy, ldy)?),
        )
    }
}
