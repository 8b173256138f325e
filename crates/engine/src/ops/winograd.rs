//! Winograd F(2×2, 3×3) for stride-1 3×3 convolutions: each 2×2 output tile costs 16 instead of
//! 36 multiplications, done as 16 gemms `M[ξ] = U[ξ]·V[ξ]` over (Cout×Cin)·(Cin×tiles), with
//! U = G·g·Gᵀ (weights), V = Bᵀ·d·B (4×4 input tiles), Y = Aᵀ·M·A (Lavin & Gray, 2016).
//! The transforms use only ±1 and ½ coefficients, so the f32 error stays at a few ulp of the
//! direct sum (checked against candle's conv in the `ops_conv` tests).

use std::ops::Range;

use super::dense::{Mat, Parallelism, Real, gemm_ld, simd_kernel, with_scratch};
use rayon::prelude::*;

/// Scratch bound for one block of tiles (input and product transforms together). The transforms
/// of a whole image are 4·(Cin + Cout)·H·W values — 805 MB for the 512 → 256-channel convs of
/// ADM-256's output blocks at 256², held for the thread's lifetime by the scratch slot — so the
/// tiles go through in blocks. 8 MiB keeps blocks of ≥ 128 tiles (a gemm width the kernel
/// still runs at full speed) up to 512 + 512 channels.
const SCRATCH_BYTES: usize = 8 << 20;
/// Narrowest block: below this the per-block gemm calls start to cost.
const MIN_BLOCK: usize = 64;

/// Output tiles of one image: `th × tw` tiles of 2×2 (the last row/column may hang over).
#[derive(Clone, Copy)]
pub(crate) struct Tiles {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Tiles {
    fn th(&self) -> usize {
        self.ho.div_ceil(2)
    }
    fn tw(&self) -> usize {
        self.wo.div_ceil(2)
    }
    fn count(&self) -> usize {
        self.th() * self.tw()
    }
}

/// U[ξ] = (G·g·Gᵀ)[ξ] for every (co, ci) of `w (Cout, Cin, 3, 3)`: 16 row-major Cout×Cin matrices.
pub(crate) fn transform_weights<T: Real>(w: &[T], cout: usize, cin: usize) -> Vec<T> {
    let half = T::from_f64(0.5);
    let n = cout * cin;
    let mut u = vec![T::from_f64(0.0); 16 * n];
    for (idx, g) in w.chunks_exact(9).enumerate().take(n) {
        // G·g (4×3), then (G·g)·Gᵀ (4×4); G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1].
        let mut gg = [[T::from_f64(0.0); 3]; 4];
        for c in 0..3 {
            let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
            gg[0][c] = a;
            gg[1][c] = half * (a + b + d);
            gg[2][c] = half * (a - b + d);
            gg[3][c] = d;
        }
        for (r, row) in gg.iter().enumerate() {
            let (a, b, d) = (row[0], row[1], row[2]);
            let out = [a, half * (a + b + d), half * (a - b + d), d];
            for (c, v) in out.into_iter().enumerate() {
                u[(r * 4 + c) * n + idx] = v;
            }
        }
    }
    u
}

/// The tiles of `tiles` by tile row: (tile row, first tile column, tile count, offset of the
/// first of them in the block).
fn tile_rows(tw: usize, tiles: Range<usize>) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let t0 = tiles.start;
    let rows = if tiles.is_empty() {
        0..0
    } else {
        t0 / tw..(tiles.end - 1) / tw + 1
    };
    rows.map(move |ty| {
        let k0 = (ty * tw).max(t0) - ty * tw;
        let k1 = ((ty + 1) * tw).min(tiles.end) - ty * tw;
        (ty, k0, k1 - k0, ty * tw + k0 - t0)
    })
}

/// V[ci][ξ][t − t0] = (Bᵀ·d·B)[ξ] for the 4×4 input patch d of each tile t of `tiles` (zero
/// outside the image). Works a tile row at a time on whole image rows, so that every loop runs
/// over consecutive tiles and vectorises: Bᵀ·(4 rows) as row arithmetic, then ·B across columns
/// (adjacent tiles overlap by two columns) into the 16 contiguous runs of the channel's V.
/// Channel-major, so that channels go to different threads when `par` asks for threads.
fn transform_input<T: Real>(
    p: &Tiles,
    x: &[T],
    v: &mut [T],
    tiles: Range<usize>,
    par: Parallelism,
) {
    let zero = T::from_f64(0.0);
    let (tw, nt) = (p.tw(), tiles.len());
    // Padded columns under a tile row: tile k covers 2k .. 2k + 4.
    let pw = 2 * tw + 2;
    let x = &x[..p.cin * p.h * p.w];
    per_channel(par, v, 16 * nt, x, p.h * p.w, |v, img| {
        let mut rows = vec![zero; 4 * pw];
        let mut tr = vec![zero; 4 * pw];
        for (ty, k0, n, off) in tile_rows(tw, tiles.clone()) {
            for (i, row) in rows.chunks_exact_mut(pw).enumerate() {
                row.fill(zero);
                let Some(iy) = (2 * ty + i).checked_sub(p.pad).filter(|&iy| iy < p.h) else {
                    continue;
                };
                // Image column ix sits at padded column ix + pad.
                let len = p.w.min(pw - p.pad);
                row[p.pad..p.pad + len].copy_from_slice(&img[iy * p.w..iy * p.w + len]);
            }
            let cols = 2 * k0..2 * (k0 + n) + 2;
            input_tile_row(&rows, &mut tr, pw, cols, v, nt, off);
        }
    });
}

/// `f(out chunk, input chunk)` for every channel, on the rayon pool unless `par` is `None`.
fn per_channel<T: Real, U: Real>(
    par: Parallelism,
    out: &mut [T],
    out_len: usize,
    input: &[U],
    in_len: usize,
    f: impl Fn(&mut [T], &[U]) + Sync,
) {
    if matches!(par, Parallelism::None) {
        let pairs = out
            .chunks_exact_mut(out_len)
            .zip(input.chunks_exact(in_len));
        pairs.for_each(|(o, i)| f(o, i));
    } else {
        let pairs = out
            .par_chunks_exact_mut(out_len)
            .zip(input.par_chunks_exact(in_len));
        pairs.for_each(|(o, i)| f(o, i));
    }
}

simd_kernel! {
    /// One tile row of one channel: `rows` the four padded image rows (`pw` each), `tr` scratch of
    /// the same size, `cols` the padded columns of the row's tiles; writes V[ξ][base + k].
    fn input_tile_row<T>(
        rows: &[T],
        tr: &mut [T],
        pw: usize,
        cols: Range<usize>,
        v: &mut [T],
        stride: usize,
        base: usize,
    ) {
        let r: [&[T]; 4] = std::array::from_fn(|i| &rows[i * pw + cols.start..i * pw + cols.end]);
        let (t0, rest) = tr.split_at_mut(pw);
        let (t1, rest) = rest.split_at_mut(pw);
        let (t2, t3) = rest.split_at_mut(pw);
        let len = cols.len();
        let (t0, t1, t2, t3) = (&mut t0[..len], &mut t1[..len], &mut t2[..len], &mut t3[..len]);
        // Bᵀ·d (Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]) for every column at once.
        for c in 0..len {
            let (a, b, d, e) = (r[0][c], r[1][c], r[2][c], r[3][c]);
            t0[c] = a - d;
            t1[c] = b + d;
            t2[c] = d - b;
            t3[c] = b - e;
        }
        let n = (len - 2) / 2;
        for (i, t) in [&*t0, &*t1, &*t2, &*t3].into_iter().enumerate() {
            let rest = &mut v[4 * i * stride + base..];
            let (o0, rest) = rest.split_at_mut(stride);
            let (o1, rest) = rest.split_at_mut(stride);
            let (o2, o3) = rest.split_at_mut(stride);
            let outs = o0[..n].iter_mut().zip(&mut o1[..n]).zip(&mut o2[..n]).zip(&mut o3[..n]);
            // (·)·B: tile k's columns are t[2k..2k + 4].
            let cols = t.chunks_exact(2).zip(t[2..].chunks_exact(2));
            for ((((o0, o1), o2), o3), (ab, cd)) in outs.zip(cols) {
                let (a, b, c, d) = (ab[0], ab[1], cd[0], cd[1]);
                *o0 = a - c;
                *o1 = b + c;
                *o2 = c - b;
                *o3 = b - d;
            }
        }
    }
}

/// y (+)= Aᵀ·M·A for each tile of `tiles`, cropped to the output size, from M[co][ξ][t − t0]. A
/// channel's M[ξ] are contiguous over all its tiles, so the arithmetic runs over the whole block
/// at once (tile rows are short at these image sizes: 14 tiles at 28²); only the placement goes
/// row by row. Channels go to different threads when `par` asks for threads.
fn transform_output<T: Real>(
    p: &Tiles,
    m: &[T],
    y: &mut [T],
    accumulate: bool,
    tiles: Range<usize>,
    par: Parallelism,
) {
    let zero = T::from_f64(0.0);
    let (tw, nt) = (p.tw(), tiles.len());
    let y = &mut y[..p.cout * p.ho * p.wo];
    per_channel(par, y, p.ho * p.wo, m, 16 * nt, |out, m| {
        let mut scratch = vec![zero; 12 * nt];
        let (s, q) = scratch.split_at_mut(8 * nt);
        output_tiles(m, nt, s, q);
        let q: [&[T]; 4] = std::array::from_fn(|i| &q[i * nt..(i + 1) * nt]);
        for (ty, k0, n, off) in tile_rows(tw, tiles.clone()) {
            let x0 = 2 * k0;
            let width = (2 * n).min(p.wo - x0);
            for i in 0..2 {
                let oy = 2 * ty + i;
                if oy >= p.ho {
                    continue;
                }
                let (even, odd) = (&q[2 * i][off..off + n], &q[2 * i + 1][off..off + n]);
                let dst = &mut out[oy * p.wo + x0..oy * p.wo + x0 + width];
                let mut pairs = dst.chunks_exact_mut(2);
                for ((d, &e), &o) in (&mut pairs).zip(even).zip(odd) {
                    if accumulate {
                        d[0] += e;
                        d[1] += o;
                    } else {
                        d[0] = e;
                        d[1] = o;
                    }
                }
                // An odd output width: the last tile's right column hangs over.
                if let [last] = pairs.into_remainder() {
                    let e = even[width / 2];
                    *last = if accumulate { *last + e } else { e };
                }
            }
        }
    });
}

simd_kernel! {
    /// Aᵀ·M·A (Aᵀ = [1 1 1 0; 0 1 −1 −1]) of one channel's `n` tiles, M[ξ] at `m[ξ·n + k]`: the
    /// 2×2 outputs into `q = [y00 | y01 | y10 | y11]` (n each), through `s` (8n: the column sums
    /// Aᵀ·M).
    fn output_tiles<T>(m: &[T], n: usize, s: &mut [T], q: &mut [T]) {
        let g = |xi: usize| &m[xi * n..(xi + 1) * n];
        let (s0, s1) = s.split_at_mut(4 * n);
        for c in 0..4 {
            let (a, b, d, e) = (g(c), g(4 + c), g(8 + c), g(12 + c));
            let rows = s0[c * n..(c + 1) * n].iter_mut().zip(&mut s1[c * n..(c + 1) * n]);
            for ((s0, s1), (((&a, &b), &d), &e)) in rows.zip(a.iter().zip(b).zip(d).zip(e)) {
                *s0 = a + b + d;
                *s1 = b - d - e;
            }
        }
        let (q0, rest) = q.split_at_mut(n);
        let (q1, rest) = rest.split_at_mut(n);
        let (q2, q3) = rest.split_at_mut(n);
        for (s, (even, odd)) in [(&*s0, (q0, q1)), (&*s1, (q2, q3))] {
            let (c0, c1, c2, c3) = (&s[..n], &s[n..2 * n], &s[2 * n..3 * n], &s[3 * n..4 * n]);
            let cols = c0.iter().zip(c1).zip(c2).zip(c3);
            for ((e, o), (((&a, &b), &d), &f)) in even.iter_mut().zip(odd.iter_mut()).zip(cols) {
                *e = a + b + d;
                *o = b - d - f;
            }
        }
    }
}

/// One image: `y (Cout, Ho, Wo) (+)= conv3×3(x (Cin, H, W))` given `u` from [`transform_weights`].
pub(crate) fn conv_image<T: Real>(
    p: &Tiles,
    u: &[T],
    x: &[T],
    y: &mut [T],
    accumulate: bool,
    par: Parallelism,
) -> candle_core::Result<()> {
    let per_tile = 16 * (p.cin + p.cout) * std::mem::size_of::<T>();
    let block = (SCRATCH_BYTES / per_tile).max(MIN_BLOCK);
    conv_blocks(p, u, x, y, accumulate, par, block)
}

/// [`conv_image`] with the tiles taken `block` at a time.
fn conv_blocks<T: Real>(
    p: &Tiles,
    u: &[T],
    x: &[T],
    y: &mut [T],
    accumulate: bool,
    par: Parallelism,
    block: usize,
) -> candle_core::Result<()> {
    let total = p.count();
    let block = block.clamp(1, total.max(1));
    with_scratch(16 * (p.cin + p.cout) * block, |buf: &mut [T]| {
        for t0 in (0..total).step_by(block) {
            let tiles = t0..(t0 + block).min(total);
            let nt = tiles.len();
            let (vlen, mlen) = (16 * p.cin * nt, 16 * p.cout * nt);
            let (v, rest) = buf.split_at_mut(vlen);
            let m = &mut rest[..mlen];
            transform_input(p, x, v, tiles.clone(), par);
            // V and M are channel-major: V[ξ] is the (Cin × nt) matrix whose rows are 16·nt apart.
            let un = p.cout * p.cin;
            for xi in 0..16 {
                let um = Mat::rows(&u[xi * un..(xi + 1) * un], p.cin);
                let vm = Mat::rows(&v[xi * nt..], 16 * nt);
                let dims = (p.cout, nt, p.cin);
                gemm_ld(dims, &mut m[xi * nt..], 16 * nt, um, vm, false, par)?;
            }
            transform_output(p, m, y, accumulate, tiles, par);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of tiles (uneven ones, and ones that split tile rows), and channels spread over
    /// threads, give the single-threaded whole-image result:
    /// each output column is the same K-reduction whatever the gemm's width, so up to the gemm
    /// kernel's choice of micro-tile, 1e-6 of the output scale.
    #[test]
    fn blocked_tiles_match_the_whole_image() {
        let p = Tiles {
            cin: 5,
            cout: 7,
            h: 11,
            w: 9,
            pad: 1,
            ho: 11,
            wo: 9,
        };
        let val = |i: usize| ((i * 7919) % 113) as f32 / 56.0 - 1.0;
        let w: Vec<f32> = (0..p.cout * p.cin * 9).map(val).collect();
        let x: Vec<f32> = (0..p.cin * p.h * p.w).map(|i| val(i + 31)).collect();
        let u = transform_weights(&w, p.cout, p.cin);
        let run = |block: usize, par: Parallelism| {
            let mut y = vec![0.5f32; p.cout * p.ho * p.wo];
            conv_blocks(&p, &u, &x, &mut y, true, par, block).unwrap();
            y
        };
        let whole = run(p.count(), Parallelism::None);
        let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
        let cases = [1, 4, 7, p.count() - 1, 10 * p.count()].map(|b| (b, Parallelism::None));
        // Channels on the rayon pool, whole image and in blocks.
        let threaded = [p.count(), 7].map(|b| (b, Parallelism::Rayon(2)));
        for (block, par) in cases.into_iter().chain(threaded) {
            let blocked = run(block, par);
            let err = whole
                .iter()
                .zip(&blocked)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-6 * scale, "block {block}: {err} vs scale {scale}");
        }
    }
}
