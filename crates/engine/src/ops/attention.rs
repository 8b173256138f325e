//! Fused scaled-dot-product attention softmax(s·QKᵀ)V for the CPU, forward and backward, with every
//! gemm on explicit contiguous row-major views. Composing it from candle ops is both slow (the
//! score matrix and softmax sub-ops all stay alive for backward) and unsafe: candle's CPU matmul
//! returns wrong numbers for a non-contiguous batched left operand (upstream issue #3744,
//! candle-notes §3). Queries are processed in row blocks, so the score matrix held at once is
//! `ROWS × Tk` per thread, never `Tq × Tk` for the whole batch.

use super::dense::{
    Mat, Parallelism, Real, by_dtype, contiguous, dot_by, fast_path, for_each_item, gemm,
    simd_kernel, sum_by, with_scratch,
};
use candle_core::{CpuStorage, CustomOp3, D, Layout, Result, Shape, Tensor, bail};

/// Query rows per block (measured: 128–256 keep a block's scores in L2 at Tk ≤ 1024).
const ROWS: usize = 128;

/// softmax(scale·Q·Kᵀ)·V for `q (..., Tq, D)`, `k (..., Tk, D)`, `v (..., Tk, Dv)` with the same
/// leading (batch, head) dims. Differentiable in q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if !fast_path(&q) {
        let s = (q.matmul(&k.t()?.contiguous()?)? * scale)?;
        return candle_nn::ops::softmax(&s, D::Minus1)?.matmul(&v);
    }
    q.apply_op3(&k, &v, Attention { scale })
}

/// Sizes of one attention: `batch` independent (Tq×D, Tk×D, Tk×Dv) problems.
#[derive(Clone, Copy, Debug)]
struct Dims {
    batch: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
}

impl Dims {
    fn new(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        let r = q.len();
        if r < 2
            || k.len() != r
            || v.len() != r
            || q[..r - 2] != k[..r - 2]
            || k[..r - 2] != v[..r - 2]
        {
            bail!(
                "attention: q {q:?}, k {k:?}, v {v:?} must be (..., T, D) with equal leading dims"
            )
        }
        if q[r - 1] != k[r - 1] || k[r - 2] != v[r - 2] {
            bail!("attention: q {q:?} / k {k:?} feature dims or k / v {v:?} lengths differ")
        }
        Ok(Self {
            batch: q[..r - 2].iter().product(),
            tq: q[r - 2],
            tk: k[r - 2],
            d: q[r - 1],
            dv: v[r - 1],
        })
    }
}

/// One batch item's operands.
struct Item<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
}

impl<'a, T> Item<'a, T> {
    fn of(d: &Dims, i: usize, q: &'a [T], k: &'a [T], v: &'a [T]) -> Self {
        Self {
            q: &q[i * d.tq * d.d..(i + 1) * d.tq * d.d],
            k: &k[i * d.tk * d.d..(i + 1) * d.tk * d.d],
            v: &v[i * d.tk * d.dv..(i + 1) * d.tk * d.dv],
        }
    }
}

/// `p (rows × tk) = softmax(scale · q_rows · kᵀ)` row-wise.
fn probabilities<T: Real>(
    d: &Dims,
    it: &Item<'_, T>,
    r0: usize,
    p: &mut [T],
    scale: T,
    par: Parallelism,
) -> Result<()> {
    let rows = p.len() / d.tk.max(1);
    let q = Mat::rows(&it.q[r0 * d.d..(r0 + rows) * d.d], d.d);
    gemm(
        (rows, d.tk, d.d),
        p,
        q,
        Mat::rows(it.k, d.d).t(),
        false,
        par,
    )?;
    softmax_rows(p, d.tk, scale);
    Ok(())
}

/// Query row blocks `(start, rows)`.
fn blocks(tq: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..tq).step_by(ROWS).map(move |r0| (r0, ROWS.min(tq - r0)))
}

fn forward<T: Real>(d: &Dims, q: &[T], k: &[T], v: &[T], scale: T) -> Result<Vec<T>> {
    let mut out = vec![T::from_f64(0.0); d.batch * d.tq * d.dv];
    if d.tk == 0 {
        return Ok(out);
    }
    for_each_item(&mut out, d.batch, |i, out, par| {
        let it = Item::of(d, i, q, k, v);
        with_scratch(ROWS.min(d.tq) * d.tk, |p: &mut [T]| {
            for (r0, rows) in blocks(d.tq) {
                let p = &mut p[..rows * d.tk];
                probabilities(d, &it, r0, p, scale, par)?;
                let o = &mut out[r0 * d.dv..(r0 + rows) * d.dv];
                gemm(
                    (rows, d.dv, d.tk),
                    o,
                    Mat::rows(p, d.tk),
                    Mat::rows(it.v, d.dv),
                    false,
                    par,
                )?;
            }
            Ok(())
        })
    })?;
    Ok(out)
}

/// Per item, `[dQ (Tq·D) | dK (Tk·D) | dV (Tk·Dv)]`. With P = softmax(s·QKᵀ):
/// dV = Pᵀ·dO, dP = dO·Vᵀ, dS = s·P ⊙ (dP − rowsum(dP ⊙ P)), dQ = dS·K, dK = dSᵀ·Q.
fn backward<T: Real>(d: &Dims, q: &[T], k: &[T], v: &[T], dout: &[T], scale: T) -> Result<Vec<T>> {
    let per_item = d.tq * d.d + d.tk * (d.d + d.dv);
    let mut grads = vec![T::from_f64(0.0); d.batch * per_item];
    if d.tk == 0 {
        return Ok(grads);
    }
    for_each_item(&mut grads, d.batch, |i, g, par| {
        let it = Item::of(d, i, q, k, v);
        let dout = &dout[i * d.tq * d.dv..(i + 1) * d.tq * d.dv];
        let (dq, rest) = g.split_at_mut(d.tq * d.d);
        let (dk, dv) = rest.split_at_mut(d.tk * d.d);
        with_scratch(2 * ROWS.min(d.tq) * d.tk, |buf: &mut [T]| {
            let (p, dp) = buf.split_at_mut(ROWS.min(d.tq) * d.tk);
            for (b, (r0, rows)) in blocks(d.tq).enumerate() {
                let (p, dp) = (&mut p[..rows * d.tk], &mut dp[..rows * d.tk]);
                probabilities(d, &it, r0, p, scale, par)?;
                let d_o = Mat::rows(&dout[r0 * d.dv..(r0 + rows) * d.dv], d.dv);
                gemm(
                    (d.tk, d.dv, rows),
                    dv,
                    Mat::rows(p, d.tk).t(),
                    d_o,
                    b > 0,
                    par,
                )?;
                gemm(
                    (rows, d.tk, d.dv),
                    dp,
                    d_o,
                    Mat::rows(it.v, d.dv).t(),
                    false,
                    par,
                )?;
                score_grad(p, dp, d.tk, scale);
                let ds = Mat::rows(&*p, d.tk);
                let dq = &mut dq[r0 * d.d..(r0 + rows) * d.d];
                gemm((rows, d.d, d.tk), dq, ds, Mat::rows(it.k, d.d), false, par)?;
                let q_rows = Mat::rows(&it.q[r0 * d.d..(r0 + rows) * d.d], d.d);
                gemm((d.tk, d.d, rows), dk, ds.t(), q_rows, b > 0, par)?;
            }
            Ok(())
        })
    })?;
    Ok(grads)
}

simd_kernel! {
    /// Each `tk`-long row of `p` becomes softmax(scale · row).
    fn softmax_rows<T>(p: &mut [T], tk: usize, scale: T) {
        for row in p.chunks_mut(tk) {
            let max = row.iter().fold(row[0], |m, &x| Real::max(m, x));
            for x in row.iter_mut() {
                *x = ((*x - max) * scale).exp();
            }
            let inv = T::from_f64(1.0) / sum_by(row, |x| x);
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    }
}

simd_kernel! {
    /// Overwrites `p` with dS = s·P ⊙ (dP − rowsum(dP ⊙ P)), row by row.
    fn score_grad<T>(p: &mut [T], dp: &[T], tk: usize, scale: T) {
        for (p, dp) in p.chunks_mut(tk).zip(dp.chunks(tk)) {
            let dot = dot_by(p, dp, |a, b| a * b);
            for (p, &dp) in p.iter_mut().zip(dp) {
                *p = scale * *p * (dp - dot);
            }
        }
    }
}

struct Attention {
    scale: f64,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fast-attention"
    }
    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = Dims::new(lq.dims(), lk.dims(), lv.dims())?;
        let mut out_dims = lq.dims().to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = d.dv;
        }
        let s = self.scale;
        by_dtype(
            sq,
            Shape::from(out_dims),
            || {
                forward::<f32>(
                    &d,
                    contiguous(sq, lq)?,
                    contiguous(sk, lk)?,
                    contiguous(sv, lv)?,
                    s as f32,
                )
            },
            || {
                forward::<f64>(
                    &d,
                    contiguous(sq, lq)?,
                    contiguous(sk, lk)?,
                    contiguous(sv, lv)?,
                    s,
                )
            },
        )
    }
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A custom op takes at most three operands, so dO travels stacked under v along the token
        // axis (a copy of Tk·Dv + Tq·Dv values, small next to the Tq·Tk work).
        let dout = dout.contiguous()?;
        let grads = q.apply_op3_no_bwd(
            k,
            &Tensor::cat(&[v, &dout], D::Minus2)?,
            &AttentionGrad { scale: self.scale },
        )?;
        let d = Dims::new(q.dims(), k.dims(), v.dims())?;
        let grads = grads.reshape((d.batch, ()))?;
        let part = |start: usize, len: usize, like: &Tensor| -> Result<Option<Tensor>> {
            if !like.track_op() {
                return Ok(None);
            }
            // Contiguous, so a later candle matmul backward never sees a strided batched lhs.
            Ok(Some(
                grads
                    .narrow(1, start, len)?
                    .contiguous()?
                    .reshape(like.shape())?,
            ))
        };
        let (nq, nk) = (d.tq * d.d, d.tk * d.d);
        Ok((
            part(0, nq, q)?,
            part(nq, nk, k)?,
            part(nq + nk, d.tk * d.dv, v)?,
        ))
    }
}

/// `(q, k, [v ; dO] stacked along the token axis) -> per item [dQ | dK | dV]` flattened.
struct AttentionGrad {
    scale: f64,
}

impl CustomOp3 for AttentionGrad {
    fn name(&self) -> &'static str {
        "fast-attention-grad"
    }
    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        svo: &CpuStorage,
        lvo: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: Real>(d: &Dims, q: &[T], k: &[T], vo: &[T], scale: T) -> Result<Vec<T>> {
            // Split the stacked [v ; dO] back into its two batched operands.
            let (mut v, mut dout) = (
                Vec::with_capacity(d.batch * d.tk * d.dv),
                Vec::with_capacity(d.batch * d.tq * d.dv),
            );
            for item in vo.chunks(d.dv * (d.tk + d.tq)) {
                let (a, b) = item.split_at(d.tk * d.dv);
                v.extend_from_slice(a);
                dout.extend_from_slice(b);
            }
            backward(d, q, k, &v, &dout, scale)
        }
        let (q, k, vo) = (lq.dims(), lk.dims(), lvo.dims());
        let r = vo.len();
        if r < 2 || r != q.len() {
            bail!("attention grad: bad stacked operand {vo:?}")
        }
        let mut v_dims = vo.to_vec();
        v_dims[r - 2] = k[r - 2];
        let d = Dims::new(q, k, &v_dims)?;
        if vo[r - 2] != d.tk + d.tq {
            bail!("attention grad: stacked operand {vo:?} is not [v ; dO] for q {q:?}")
        }
        let n = d.batch * (d.tq * d.d + d.tk * (d.d + d.dv));
        let s = self.scale;
        by_dtype(
            sq,
            Shape::from(n),
            || {
                run::<f32>(
                    &d,
                    contiguous(sq, lq)?,
                    contiguous(sk, lk)?,
                    contiguous(svo, lvo)?,
                    s as f32,
                )
            },
            || {
                run::<f64>(
                    &d,
                    contiguous(sq, lq)?,
                    contiguous(sk, lk)?,
                    contiguous(svo, lvo)?,
                    s,
                )
            },
        )
    }
}
