//! CPU building blocks shared by the fast custom ops (conv, norm, activation, attention):
//! typed access to contiguous storage, a bounds-checked call into the `gemm` crate, the thread
//! policy, and run-time SIMD dispatch for element-wise loops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, WithDType, bail};
pub(crate) use gemm::Parallelism;

/// The float types the kernels run on: f32 for speed, f64 for finite-difference gradient checks.
pub(crate) trait Real: WithDType {
    /// `exp`; the f32 version is a polynomial LLVM can vectorise (std's `expf` is a scalar libm
    /// call and dominates SiLU/softmax otherwise). f64 keeps libm: it only serves gradient checks.
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn max(self, other: Self) -> Self;
    /// The logistic function 1/(1+e^-x).
    #[inline(always)]
    fn sigmoid(self) -> Self {
        let one = Self::from_f64(1.0);
        one / (one + (Self::from_f64(0.0) - self).exp())
    }
}

impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        f32::max(self, other)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        f64::max(self, other)
    }
}

/// Σ f(x) over xs with 16 independent accumulators, so the loop vectorises (a single running sum
/// is a serial dependency chain LLVM may not reorder).
#[inline(always)]
pub(crate) fn sum_by<T: Real>(xs: &[T], f: impl Fn(T) -> T) -> T {
    let zero = T::from_f64(0.0);
    let mut acc = [zero; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    let tail = tail.iter().fold(zero, |s, &x| s + f(x));
    acc.iter().fold(tail, |s, &x| s + x)
}

/// Σ f(a, b) over the pairs of two equally long slices, vectorisable like [`sum_by`].
#[inline(always)]
pub(crate) fn dot_by<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let zero = T::from_f64(0.0);
    let mut acc = [zero; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(zero, |s, (&x, &y)| s + f(x, y));
    for (ca, cb) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += f(x, y);
        }
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

/// Element-wise kernels run in chunks of this many elements: big enough to amortise a rayon
/// task, small enough that 1M-element maps split across threads.
pub(crate) const MAP_CHUNK: usize = 1 << 15;

/// Runs `f(start, chunk)` over `MAP_CHUNK`-sized pieces of `out`, in parallel when more than one
/// thread is configured (`f` should call a [`simd_kernel`]).
pub(crate) fn par_map<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    use rayon::prelude::*;
    if out.len() <= MAP_CHUNK || num_threads() == 1 {
        return f(0, out);
    }
    out.par_chunks_mut(MAP_CHUNK)
        .enumerate()
        .for_each(|(i, c)| f(i * MAP_CHUNK, c));
}

/// Branch-free `exp` for f32 (Cephes `expf` polynomial on a range-reduced argument), relative
/// error about 2e-7 over the whole range; inputs below -87.3 flush towards 0, above 88.3 saturate.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    // Round to nearest by the 1.5·2²³ trick: after adding MAGIC the integer n sits in the low
    // mantissa bits of t, so 2ⁿ is built from t's bits with integer adds and a shift. No f32→i32
    // cast: LLVM scalarises Rust's saturating `as` (one vcvttss2si per lane in the disassembly).
    const MAGIC: f32 = 12_582_912.0;
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // bits(t) = bits(MAGIC) + n and bits(MAGIC) << 23 overflows to 0, so this is (n + 127) << 23;
    // n ∈ [-126, 127] keeps the exponent field valid.
    let scale = f32::from_bits(t.to_bits().wrapping_add(127).wrapping_shl(23));
    e * scale
}

/// Defines a generic kernel `fn name<T: Real>(args) -> R` whose body is compiled three times
/// (AVX-512, AVX2+FMA, baseline) and picked at run time: the crate targets baseline x86-64 (SSE2),
/// and LLVM only vectorises `exp`/FMA-heavy loops well with the wider units. The body lives in an
/// `#[inline(always)]` function called directly from each `#[target_feature]` wrapper, so it is
/// always compiled with that wrapper's features (a closure passed to a wrapper may stay out of line).
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$T:ident>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: $crate::ops::dense::Real>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn kernel<$T: $crate::ops::dense::Real>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx512<$T: $crate::ops::dense::Real>($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<$T: $crate::ops::dense::Real>($($arg: $ty),*) $(-> $ret)? {
                    kernel($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU was just checked to support the enabled features.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}
pub(crate) use simd_kernel;

/// The data of a contiguous CPU tensor (offset applied). The op wrappers make every operand
/// contiguous before applying the op, so anything else is a bug in the wrapper.
pub(crate) fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let data = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!(
            "fast CPU op expects contiguous operands, got strides {:?}",
            l.stride()
        ),
    }
}

/// Threads candle (and the rayon global pool) use; `RAYON_NUM_THREADS` controls it.
pub(crate) fn num_threads() -> usize {
    candle_core::utils::get_num_threads().max(1)
}

/// How `gemm` should parallelise when the caller is not already running one task per thread.
pub(crate) fn gemm_parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// A read-only strided matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major matrix whose rows are `ld` elements apart.
    pub fn rows(data: &'a [T], ld: usize) -> Self {
        Self {
            data,
            rs: ld,
            cs: 1,
        }
    }
    /// The transposed view of the same data (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        if last >= self.data.len() {
            bail!(
                "gemm {what}: {rows}x{cols} view exceeds its {} elements",
                self.data.len()
            )
        }
        Ok(())
    }
}

/// `dst (m×n, row-major, contiguous) = a (m×k) · b (k×n)`, or `+=` when `accumulate`.
pub(crate) fn gemm<T: WithDType>(
    mnk: (usize, usize, usize),
    dst: &mut [T],
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    par: Parallelism,
) -> Result<()> {
    gemm_ld(mnk, dst, mnk.1, a, b, accumulate, par)
}

/// [`gemm`] into a `dst` whose rows are `ld ≥ n` elements apart.
pub(crate) fn gemm_ld<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    ld: usize,
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    accumulate: bool,
    par: Parallelism,
) -> Result<()> {
    if ld < n || (m > 0 && dst.len() < (m - 1) * ld + n) {
        bail!(
            "gemm dst: {m}x{n} (rows {ld} apart) exceeds its {} elements",
            dst.len()
        )
    }
    a.check(m, k, "lhs")?;
    b.check(k, n, "rhs")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(ld).take(m) {
                row[..n].fill(T::from_f64(0.0));
            }
        }
        return Ok(());
    }
    let one = T::from_f64(1.0);
    // SAFETY: every index the kernel touches was bounds-checked above; dst does not alias a or b
    // (it is a unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            one,
            one,
            false,
            false,
            false,
            par,
        )
    }
    Ok(())
}

/// Splits `data` into `items` equal chunks and runs `f(index, chunk)` on each: one rayon task per
/// item when there are at least as many items as threads (`f` then gets `Parallelism::None` for
/// its gemm calls), otherwise items in sequence with `gemm` spreading each over the threads.
pub(crate) fn for_each_item<T: Send>(
    data: &mut [T],
    items: usize,
    f: impl Fn(usize, &mut [T], Parallelism) -> Result<()> + Sync,
) -> Result<()> {
    use rayon::prelude::*;
    if items == 0 {
        return Ok(());
    }
    let chunk = data.len() / items;
    let threads = num_threads();
    if threads > 1 && items >= threads && chunk > 0 {
        data.par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(i, c)| f(i, c, Parallelism::None))
    } else if chunk == 0 {
        (0..items).try_for_each(|i| f(i, &mut [], gemm_parallelism(threads)))
    } else {
        data.chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(i, c)| f(i, c, gemm_parallelism(threads)))
    }
}

/// Runs the f32 or f64 kernel according to the storage's dtype and wraps the result.
pub(crate) fn by_dtype(
    s: &CpuStorage,
    shape: Shape,
    f32_fn: impl FnOnce() -> Result<Vec<f32>>,
    f64_fn: impl FnOnce() -> Result<Vec<f64>>,
) -> Result<(CpuStorage, Shape)> {
    let storage = match s {
        CpuStorage::F32(_) => CpuStorage::F32(f32_fn()?),
        CpuStorage::F64(_) => CpuStorage::F64(f64_fn()?),
        other => bail!("fast CPU ops support f32/f64, got {:?}", other.dtype()),
    };
    Ok((storage, shape))
}

/// Whether the fast CPU kernels apply: a CPU tensor of f32 or f64. Everything else (CUDA,
/// half precision) goes to candle's own ops.
pub(crate) fn fast_path(t: &candle_core::Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// A per-thread scratch buffer reused across calls (im2col and score matrices are megabytes;
/// allocating and page-faulting them on every call costs as much as filling them). Taken out of the slot while in use,
/// so re-entrant use (rayon work stealing) just allocates.
pub(crate) fn with_scratch<T: Real, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    use std::any::Any;
    use std::cell::RefCell;
    thread_local! {
        static SLOT: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }
    let mut buf: Vec<T> = SLOT
        .with(|s| s.borrow_mut().take())
        .and_then(|b| b.downcast::<Vec<T>>().ok())
        .map(|b| *b)
        .unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, T::from_f64(0.0));
    }
    let r = f(&mut buf[..len]);
    SLOT.with(|s| *s.borrow_mut() = Some(Box::new(buf)));
    r
}
