//! Winograd F(2×2, 3×3) for stride-1 3×3 convolutions: each 2×2 output tile costs 16 instead of
//! 36 multiplications, done as 16 gemms `M[ξ] = U[ξ]·V[ξ]` over (Cout×Cin)·(Cin×tiles), with
//! U = G·g·Gᵀ (weights), V = Bᵀ·d·B (4×4 input tiles), Y = Aᵀ·M·A (Lavin & Gray, 2016).
//! The transforms use only ±1 and ½ coefficients, so the f32 error stays at a few ulp of the
//! direct sum (checked against candle's conv in the `ops_conv` tests).

use super::dense::{Mat, Parallelism, Real, gemm, with_scratch};

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

/// V[ξ][ci][t] = (Bᵀ·d·B)[ξ] for the 4×4 input patch d of tile t (zero outside the image).
fn transform_input<T: Real>(p: &Tiles, x: &[T], v: &mut [T]) {
    let zero = T::from_f64(0.0);
    let (tw, nt) = (p.tw(), p.count());
    let stride = p.cin * nt;
    for (ci, img) in x.chunks_exact(p.h * p.w).enumerate().take(p.cin) {
        for t in 0..nt {
            let (y0, x0) = (2 * (t / tw), 2 * (t % tw));
            let mut d = [[zero; 4]; 4];
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
            // Bᵀ·d column by column, then (·)·B row by row.
            let cols: [[T; 4]; 4] =
                std::array::from_fn(|c| bt([d[0][c], d[1][c], d[2][c], d[3][c]]));
            for (i, row) in transpose(cols).into_iter().enumerate() {
                for (j, val) in bt(row).into_iter().enumerate() {
                    v[(i * 4 + j) * stride + ci * nt + t] = val;
                }
            }
        }
    }
}

/// y (+)= Aᵀ·M·A per tile, cropped to the output size.
fn transform_output<T: Real>(p: &Tiles, m: &[T], y: &mut [T], accumulate: bool) {
    let (tw, nt) = (p.tw(), p.count());
    let stride = p.cout * nt;
    for (co, out) in y.chunks_exact_mut(p.ho * p.wo).enumerate().take(p.cout) {
        for t in 0..nt {
            let (y0, x0) = (2 * (t / tw), 2 * (t % tw));
            let g = |xi: usize| m[xi * stride + co * nt + t];
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
    let nt = p.count();
    let (vlen, mlen) = (16 * p.cin * nt, 16 * p.cout * nt);
    with_scratch(vlen + mlen, |buf: &mut [T]| {
        let (v, m) = buf.split_at_mut(vlen);
        transform_input(p, x, v);
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
        transform_output(p, m, y, accumulate);
        Ok(())
    })
}
