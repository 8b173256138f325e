//! Fast 2-D convolution (NCHW, groups 1) for the CPU: im2col + the `gemm` crate, with a backward
//! that computes only the gradients somebody tracks (input grad as col2im of Wᵀ·dY, weight grad as
//! dY·colsᵀ), both through gemm. candle's own CPU conv is ~6× slower forward and its backward
//! uses a direct-loop `conv_transpose2d` (candle-notes §3–§4). On other devices (CUDA) and dtypes
//! [`conv2d`] calls candle's conv, so GPUs keep candle's/cuDNN kernels.

use super::dense::{
    Mat, Parallelism, Real, by_dtype as dispatch, contiguous, fast_path, for_each_item, gemm,
    num_threads, with_scratch,
};
use super::winograd;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// `x (B,Cin,H,W) ⊛ w (Cout,Cin,kh,kw) + b (Cout)` with symmetric zero padding `pad`.
/// Differentiable in all three arguments; drop-in for `x.conv2d(w, pad, stride, 1, 1)` + bias.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    if stride == 0 {
        bail!("conv2d: stride must be at least 1")
    }
    if !fast_path(x) {
        let y = x.conv2d(w, pad, stride, 1, 1)?;
        return match b {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        };
    }
    let op = Conv2d { stride, pad };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// Below this many input or output channels a 3×3 conv uses im2col rather than Winograd.
const WINOGRAD_MIN_CHANNELS: usize = 16;
/// Fewest 2×2 output tiles (over the batch) that pay for the weight transform: it writes 16 values
/// per (cout, cin) pair on every call, which at the 4² and 2² levels of ADM-256 (1024 channels,
/// 1–4 tiles at batch 1) cost more than the convolution. From 64 tiles up it is amortised:
/// ADM-256's UNet at 64² −28 % forward time and half the peak, LDM −7 %, nets whose smallest
/// level still has ≥ 64 tiles unchanged (`bench_networks`, 1 thread, thresholds 1 / 16 / 64 /
/// 256 / 1024 / ∞ compared).
const WINOGRAD_MIN_TILES: usize = 64;

/// Shapes of one convolution.
#[derive(Clone, Copy, Debug)]
struct Geom {
    batch: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], w: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let (&[batch, cin, h, wi], &[cout, cin_w, kh, kw]) = (x, w) else {
            bail!("conv2d: expected 4-D input and weight, got {x:?} and {w:?}")
        };
        if cin != cin_w {
            bail!("conv2d: input has {cin} channels, weight expects {cin_w} (groups must be 1)")
        }
        if h + 2 * pad < kh || wi + 2 * pad < kw || kh == 0 || kw == 0 {
            bail!("conv2d: kernel {kh}x{kw} larger than padded input {h}x{wi} (pad {pad})")
        }
        Ok(Self {
            batch,
            cin,
            h,
            w: wi,
            cout,
            kh,
            kw,
            stride,
            pad,
            ho: (h + 2 * pad - kh) / stride + 1,
            wo: (wi + 2 * pad - kw) / stride + 1,
        })
    }
    /// Rows of the im2col matrix (= columns of the flattened weight).
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    /// Output pixels per image.
    fn n(&self) -> usize {
        self.ho * self.wo
    }
    fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    fn out_len(&self) -> usize {
        self.cout * self.n()
    }
    /// The Winograd F(2×2, 3×3) plan when this conv is 3×3 with stride 1, wide enough and has
    /// enough tiles: its tile transforms cost O(C) per tile against the gemm's O(Cin·Cout), so
    /// with few channels (the 3-channel stem, measured 2.4× slower than im2col) im2col wins, and
    /// its weight transform needs [`WINOGRAD_MIN_TILES`] tiles to pay for itself.
    fn winograd(&self) -> Option<winograd::Tiles> {
        let wide = self.cin.min(self.cout) >= WINOGRAD_MIN_CHANNELS;
        let tiles = self.batch * self.ho.div_ceil(2) * self.wo.div_ceil(2);
        let pays = wide && tiles >= WINOGRAD_MIN_TILES;
        (self.kh == 3 && self.kw == 3 && self.stride == 1 && pays).then_some(winograd::Tiles {
            cin: self.cin,
            cout: self.cout,
            h: self.h,
            w: self.w,
            pad: self.pad,
            ho: self.ho,
            wo: self.wo,
        })
    }
    /// The conv whose output is this conv's input gradient (stride 1, square kernel, pad < k):
    /// dY ⊛ flip(W)ᵀ with padding k−1−p maps (Cout, Ho, Wo) back to (Cin, H, W).
    fn transposed(&self) -> Option<Self> {
        (self.stride == 1 && self.kh == self.kw && self.pad < self.kh).then_some(Self {
            batch: self.batch,
            cin: self.cout,
            h: self.ho,
            w: self.wo,
            cout: self.cin,
            kh: self.kh,
            kw: self.kw,
            stride: 1,
            pad: self.kh - 1 - self.pad,
            ho: self.h,
            wo: self.w,
        })
    }
    /// A 1×1 stride-1 unpadded conv is a plain matmul on the image itself: no im2col needed.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Output indices `o` in `lo..hi` whose input index `o*stride + k - pad` lies in `0..len`.
    fn valid(&self, k: usize, len: usize, out_len: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = self.pad.saturating_sub(k).div_ceil(s);
        let hi = if len + self.pad > k {
            ((len - 1 + self.pad - k) / s + 1).min(out_len)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// Visits every (im2col row segment, input row segment) pair of one channel: for kernel tap
/// (ky, kx) and output row oy, calls `f(col_row, input_row, ox_lo, ox_hi, ix_lo)` where
/// `col_row` indexes the `wo`-long segment of the column matrix and `input_row` the `w`-long input
/// row (None when the tap falls into the padding). Shared by im2col and its adjoint col2im so the
/// index arithmetic exists once.
fn for_each_tap(g: &Geom, mut f: impl FnMut(usize, Option<usize>, usize, usize, usize)) {
    let (ky_n, kx_n) = (g.kh, g.kw);
    for ky in 0..ky_n {
        let (oy_lo, oy_hi) = g.valid(ky, g.h, g.ho);
        for kx in 0..kx_n {
            let row = (ky * kx_n + kx) * g.n();
            let (ox_lo, ox_hi) = g.valid(kx, g.w, g.wo);
            let ix_lo = (ox_lo * g.stride + kx).saturating_sub(g.pad);
            for oy in 0..g.ho {
                let input = (oy_lo..oy_hi)
                    .contains(&oy)
                    .then(|| (oy * g.stride + ky - g.pad) * g.w);
                f(row + oy * g.wo, input, ox_lo, ox_hi, ix_lo);
            }
        }
    }
}

/// Runs `f(ci, rows_of_ci)` over the per-channel blocks of a column matrix, in parallel when the
/// caller is not already one task per thread.
fn per_channel<T: Send>(
    data: &mut [T],
    block: usize,
    par: Parallelism,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    if block == 0 {
        return;
    }
    match par {
        Parallelism::None => data
            .chunks_mut(block)
            .enumerate()
            .for_each(|(c, d)| f(c, d)),
        _ => data
            .par_chunks_mut(block)
            .enumerate()
            .for_each(|(c, d)| f(c, d)),
    }
}

/// Unfolds one image `x (Cin,H,W)` into `cols (Cin·kh·kw, Ho·Wo)`.
fn im2col<T: Real>(g: &Geom, x: &[T], cols: &mut [T], par: Parallelism) {
    let zero = T::from_f64(0.0);
    let s = g.stride;
    per_channel(cols, g.kh * g.kw * g.n(), par, |ci, cols| {
        for_each_tap(g, |at, input, lo, hi, ix| {
            let d = &mut cols[at..at + g.wo];
            let Some(start) = input else {
                d.fill(zero);
                return;
            };
            let src = &x[ci * g.h * g.w + start..][..g.w];
            d[..lo].fill(zero);
            d[hi..].fill(zero);
            if s == 1 {
                d[lo..hi].copy_from_slice(&src[ix..ix + (hi - lo)]);
            } else {
                for (v, &x) in d[lo..hi].iter_mut().zip(src[ix..].iter().step_by(s)) {
                    *v = x;
                }
            }
        })
    });
}

/// The adjoint of [`im2col`]: scatter-adds `cols` back into the image gradient `dx (Cin,H,W)`.
fn col2im<T: Real>(g: &Geom, cols: &[T], dx: &mut [T], par: Parallelism) {
    let s = g.stride;
    let block = g.kh * g.kw * g.n();
    per_channel(dx, g.h * g.w, par, |ci, dx| {
        dx.fill(T::from_f64(0.0));
        let cols = &cols[ci * block..(ci + 1) * block];
        for_each_tap(g, |at, input, lo, hi, ix| {
            let Some(start) = input else { return };
            let src = &cols[at + lo..at + hi];
            let dst = &mut dx[start..start + g.w];
            if s == 1 {
                for (d, &v) in dst[ix..ix + src.len()].iter_mut().zip(src) {
                    *d += v;
                }
            } else {
                for (d, &v) in dst[ix..].iter_mut().step_by(s).zip(src) {
                    *d += v;
                }
            }
        })
    });
}

/// The column matrix of image `x` as a gemm operand: the image itself for pointwise convs,
/// otherwise im2col into scratch.
fn with_cols<T: Real, R>(
    g: &Geom,
    x: &[T],
    par: Parallelism,
    f: impl FnOnce(Mat<'_, T>) -> Result<R>,
) -> Result<R> {
    if g.pointwise() {
        return f(Mat::rows(x, g.n()));
    }
    with_scratch(g.k() * g.n(), |cols| {
        im2col(g, x, cols, par);
        f(Mat::rows(cols, g.n()))
    })
}

fn forward<T: Real>(g: &Geom, x: &[T], w: &[T], bias: Option<&[T]>) -> Result<Vec<T>> {
    let mut out = vec![T::from_f64(0.0); g.batch * g.out_len()];
    let wino = g
        .winograd()
        .map(|t| (t, winograd::transform_weights(w, g.cout, g.cin)));
    for_each_item(&mut out, g.batch, |i, y, par| {
        if let Some(bias) = bias {
            for (row, &b) in y.chunks_mut(g.n()).zip(bias) {
                row.fill(b);
            }
        }
        let x = &x[i * g.in_len()..(i + 1) * g.in_len()];
        if let Some((tiles, u)) = &wino {
            return winograd::conv_image(tiles, u, x, y, bias.is_some(), par);
        }
        with_cols(g, x, par, |cols| {
            let wm = Mat::rows(w, g.k());
            gemm((g.cout, g.n(), g.k()), y, wm, cols, bias.is_some(), par)
        })
    })?;
    Ok(out)
}

/// The input gradient. For stride 1 it is itself a stride-1 conv of dY with the flipped,
/// in/out-swapped kernel and padding k−1−p, which takes the Winograd forward when that applies;
/// otherwise dx = col2im(Wᵀ · dY) per image.
fn input_grad<T: Real>(g: &Geom, dy: &[T], w: &[T]) -> Result<Vec<T>> {
    if let Some(gt) = g.transposed().filter(|gt| gt.winograd().is_some()) {
        let taps = g.kh * g.kw;
        let mut wf = vec![T::from_f64(0.0); w.len()];
        for (co, ci, t) in (0..g.cout)
            .flat_map(|co| (0..g.cin).flat_map(move |ci| (0..taps).map(move |t| (co, ci, t))))
        {
            wf[(ci * g.cout + co) * taps + (taps - 1 - t)] = w[(co * g.cin + ci) * taps + t];
        }
        return forward(&gt, dy, &wf, None);
    }
    let mut dx = vec![T::from_f64(0.0); g.batch * g.in_len()];
    let wt = Mat::rows(w, g.k()).t();
    for_each_item(&mut dx, g.batch, |i, dx, par| {
        let dy = Mat::rows(&dy[i * g.out_len()..(i + 1) * g.out_len()], g.n());
        if g.pointwise() {
            return gemm((g.cin, g.n(), g.cout), dx, wt, dy, false, par);
        }
        with_scratch(g.k() * g.n(), |cols: &mut [T]| {
            gemm((g.k(), g.n(), g.cout), cols, wt, dy, false, par)?;
            col2im(g, cols, dx, par);
            Ok(())
        })
    })?;
    Ok(dx)
}

/// dW = Σ_b dY_b · cols_bᵀ. Each thread sums its share of the batch into its own buffer; the
/// partial sums are added at the end (one gemm per image either way).
fn weight_grad<T: Real>(g: &Geom, x: &[T], dy: &[T]) -> Result<Vec<T>> {
    let wlen = g.cout * g.k();
    let parts = num_threads().min(g.batch).max(1);
    let mut partial = vec![T::from_f64(0.0); parts * wlen];
    for_each_item(&mut partial, parts, |p, dw, par| {
        for (step, i) in (p..g.batch).step_by(parts).enumerate() {
            let x = &x[i * g.in_len()..(i + 1) * g.in_len()];
            let dy = Mat::rows(&dy[i * g.out_len()..(i + 1) * g.out_len()], g.n());
            with_cols(g, x, par, |cols| {
                gemm((g.cout, g.k(), g.n()), dw, dy, cols.t(), step > 0, par)
            })?;
        }
        Ok(())
    })?;
    let (first, rest) = partial.split_at_mut(wlen);
    for part in rest.chunks(wlen) {
        for (a, b) in first.iter_mut().zip(part) {
            *a += *b;
        }
    }
    partial.truncate(wlen);
    Ok(partial)
}

/// The forward op, on `(x, w)` or `(x, w, bias)`.
#[derive(Clone, Copy)]
struct Conv2d {
    stride: usize,
    pad: usize,
}

impl Conv2d {
    fn fwd(
        &self,
        (sx, lx): (&CpuStorage, &Layout),
        (sw, lw): (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(lx.dims(), lw.dims(), self.stride, self.pad)?;
        if let Some((_, lb)) = bias
            && lb.dims() != [g.cout]
        {
            bail!("conv2d: bias shape {:?}, expected [{}]", lb.dims(), g.cout)
        }
        fn run<T: Real>(
            g: &Geom,
            sx: (&CpuStorage, &Layout),
            sw: (&CpuStorage, &Layout),
            b: Option<(&CpuStorage, &Layout)>,
        ) -> Result<Vec<T>> {
            let bias = b.map(|(s, l)| contiguous::<T>(s, l)).transpose()?;
            forward(g, contiguous(sx.0, sx.1)?, contiguous(sw.0, sw.1)?, bias)
        }
        let shape = Shape::from((g.batch, g.cout, g.ho, g.wo));
        dispatch(
            sx,
            shape,
            || run::<f32>(&g, (sx, lx), (sw, lw), bias),
            || run::<f64>(&g, (sx, lx), (sw, lw), bias),
        )
    }

    /// Gradients of x and w, each only when it is tracked (frozen weights cost nothing).
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (_, _, h, wi) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(
                w,
                &InputGrad {
                    op: *self,
                    h,
                    w: wi,
                },
            )?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(x.apply_op2_no_bwd(&dy, &WeightGrad { op: *self, kh, kw })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "fast-conv2d"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), None)
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(x, w, dy)
    }
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "fast-conv2d-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = self.grads(x, w, dy)?;
        let db = if b.track_op() {
            Some(dy.sum((0, 2, 3))?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `(dY, w) -> dx`; the input size is not recoverable from dY when stride > 1, so it is carried.
struct InputGrad {
    op: Conv2d,
    h: usize,
    w: usize,
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "fast-conv2d-input-grad"
    }
    fn cpu_fwd(
        &self,
        sdy: &CpuStorage,
        ldy: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let &[batch, _, ho, wo] = ldy.dims() else {
            bail!("conv2d input grad: dY must be 4-D, got {:?}", ldy.dims())
        };
        let wd = lw.dims();
        let x_dims = [batch, wd.get(1).copied().unwrap_or(0), self.h, self.w];
        let g = Geom::new(&x_dims, wd, self.op.stride, self.op.pad)?;
        if (g.ho, g.wo, g.cout) != (ho, wo, ldy.dims()[1]) {
            bail!(
                "conv2d input grad: dY {:?} does not match {g:?}",
                ldy.dims()
            )
        }
        let shape = Shape::from(x_dims.to_vec());
        dispatch(
            sdy,
            shape,
            || input_grad::<f32>(&g, contiguous(sdy, ldy)?, contiguous(sw, lw)?),
            || input_grad::<f64>(&g, contiguous(sdy, ldy)?, contiguous(sw, lw)?),
        )
    }
}

/// `(x, dY) -> dW`.
struct WeightGrad {
    op: Conv2d,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "fast-conv2d-weight-grad"
    }
    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sdy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let &[_, cout, ho, wo] = ldy.dims() else {
            bail!("conv2d weight grad: dY must be 4-D, got {:?}", ldy.dims())
        };
        let cin = lx.dims().get(1).copied().unwrap_or(0);
        let w_dims = [cout, cin, self.kh, self.kw];
        let g = Geom::new(lx.dims(), &w_dims, self.op.stride, self.op.pad)?;
        if (g.ho, g.wo) != (ho, wo) {
            bail!(
                "conv2d weight grad: dY {:?} does not match {g:?}",
                ldy.dims()
            )
        }
        let shape = Shape::from(w_dims.to_vec());
        dispatch(
            sx,
            shape,
            || weight_grad::<f32>(&g, contiguous(sx, lx)?, contiguous(sdy, ldy)?),
            || weight_grad::<f64>(&g, contiguous(sx, lx)?, contiguous(sdy, ldy)?),
        )
    }
}
