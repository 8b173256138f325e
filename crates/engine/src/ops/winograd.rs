//! Winograd F(2×2, 3×3) for stride-1 3×3 convolutions: each 2×2 output tile costs 16 instead of
//! 36 multiplications, done as 16 gemms `M[ξ] = U[ξ]·V[ξ]` over (Cout×Cin)·(Cin×tiles), with
//! U = G·g·Gᵀ (weights), V = Bᵀ·d·B (4×4 input tiles), Y = Aᵀ·M·A (Lavin & Gray, 2016).
//! The transforms use only ±1 and ½ coefficients, so the f32 error stays at a few ulp of the
//! direct sum (checked against candle's conv in the `ops_conv` tests).

use std::ops::Range;

use super::dense::{Mat, Parallelism, Real, gemm, with_scratch};

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

/// Four columns of length R as R rows of length 4.
#[inline(always)]
fn transpose<T: Copy, const R: usize>(cols: [[T; R]; 4]) -> [[T; 4]; R] {
    std::array::from_fn(|i| [cols[0][i], cols[1][i], cols[2][i], cols[3][i]])
}

/// Bᵀ·v for a length-4 column (Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1]).
#[inline(always)]
fn bt<T: Real>(d: [T; 4]) -> [T; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// Aᵀ·v for a length-4 column (Aᵀ = [1 1 1 0; 0 1 −1 −1]).
#[inline(always)]
fn at<T: Real>(m: [T; 4]) -> [T; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// V[ξ][ci][t − t0] = (Bᵀ·d·B)[ξ] for the 4×4 input patch d of each tile t of `tiles` (zero
/// outside the image).
fn transform_input<T: Real>(p: &Tiles, x: &[T], v: &mut [T], tiles: Range<usize>) {
    let zero = T::from_f64(0.0);
    let (tw, nt, t0) = (p.tw(), tiles.len(), tiles.start);
    let stride = p.cin * nt;
    for (ci, img) in x.chunks_exact(p.h * p.w).enumerate().take(p.cin) {
        for t in tiles.clone() {
            let (y0, x0) = (2 * (t / tw), 2 * (t % tw));
            let mut d = [[zero; 4]; 4];
            let interior =
                y0 >= p.pad && x0 >= p.pad && y0 + 4 <= p.h + p.pad && x0 + 4 <= p.w + p.pad;
            if interior {
                // Most tiles: four whole rows of the image, no padding to test per element.
                let origin = (y0 - p.pad) * p.w + (x0 - p.pad);
                for (i, row) in d.iter_mut().enumerate() {
                    let at = origin + i * p.w;
                    row.copy_from_slice(&img[at..at + 4]);
                }
            } else {
                for (i, row) in d.iter_mut().enumerate() {
                    let Some(iy) = (y0 + i).checked_sub(p.pad).filter(|&iy| iy < p.h) else {
                        continue;
                    };
                    for (j, v) in row.iter_mut().enumerate() {
                        if let Some(ix) = (x0 + j).checked_sub(p.pad).filter(|&ix| ix < p.w) {
                            *v = img[iy * p.w + ix];
                        }
                    }
                }
            }
            // Bᵀ·d column by column, then (·)·B row by row.
            let cols: [[T; 4]; 4] =
                std::array::from_fn(|c| bt([d[0][c], d[1][c], d[2][c], d[3][c]]));
            for (i, row) in transpose(cols).into_iter().enumerate() {
                for (j, val) in bt(row).into_iter().enumerate() {
                    v[(i * 4 + j) * stride + ci * nt + t - t0] = val;
                }
            }
        }
    }
}

/// y (+)= Aᵀ·M·A for each tile of `tiles`, cropped to the output size.
fn transform_output<T: Real>(
    p: &Tiles,
    m: &[T],
    y: &mut [T],
    accumulate: bool,
    tiles: Range<usize>,
) {
    let (tw, nt, t0) = (p.tw(), tiles.len(), tiles.start);
    let stride = p.cout * nt;
    for (co, out) in y.chunks_exact_mut(p.ho * p.wo).enumerate().take(p.cout) {
        for t in tiles.clone() {
            let (y0, x0) = (2 * (t / tw), 2 * (t % tw));
            let g = |xi: usize| m[xi * stride + co * nt + t - t0];
            // Aᵀ·M column by column, then (·)·A row by row.
            let cols: [[T; 2]; 4] =
                std::array::from_fn(|c| at([g(c), g(4 + c), g(8 + c), g(12 + c)]));
            for (i, row) in transpose(cols).into_iter().enumerate() {
                let oy = y0 + i;
                if oy >= p.ho {
                    continue;
                }
                for (j, val) in at(row).into_iter().enumerate() {
                    let ox = x0 + j;
                    if ox < p.wo {
                        let o = &mut out[oy * p.wo + ox];
                        *o = if accumulate { *o + val } else { val };
                    }
                }
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
            transform_input(p, x, v, tiles.clone());
            let (un, vn, mn) = (p.cout * p.cin, p.cin * nt, p.cout * nt);
            for xi in 0..16 {
                let um = Mat::rows(&u[xi * un..(xi + 1) * un], p.cin);
                let vm = Mat::rows(&v[xi * vn..(xi + 1) * vn], nt);
                gemm(
                    (p.cout, nt, p.cin),
                    &mut m[xi * mn..(xi + 1) * mn],
                    um,
                    vm,
                    false,
                    par,
                )?;
            }
            transform_output(p, m, y, accumulate, tiles);
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of tiles (uneven ones, and ones that split tile rows) give the whole-image result:
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
        let run = |block: usize| {
            let mut y = vec![0.5f32; p.cout * p.ho * p.wo];
            conv_blocks(&p, &u, &x, &mut y, true, Parallelism::None, block).unwrap();
            y
        };
        let whole = run(p.count());
        let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
        for block in [1, 4, 7, p.count() - 1, 10 * p.count()] {
            let blocked = run(block);
            let err = whole
                .iter()
                .zip(&blocked)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-6 * scale, "block {block}: {err} vs scale {scale}");
        }
    }
}
