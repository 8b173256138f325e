//! ViM, Virtual-logit Matching (Wang et al. 2022), as OpenOOD's `VIMPostprocessor` computes it:
//! - origin u = −pinv(W)·b, the point the fc maps to all-zero logits (least squares);
//! - principal subspace: the top `dim` eigenvectors of the uncentred covariance of the training
//!   features around u; its orthogonal complement NS is where "unexplained" energy lives;
//! - virtual logit ‖(x − u)·NS‖ · α, with α = mean max-logit / mean ‖(x − u)·NS‖ over training;
//! - score = logsumexp(logits) − virtual logit, logits recomputed from the features as W x + b.
//!
//! Linear algebra in f64 with `nalgebra` (SVD for the pseudo-inverse, symmetric eigensolver).

use candle_core::Tensor;
use nalgebra::{DMatrix, DVector, SymmetricEigen};

use super::logit::logsumexp;
use super::rows_f64;
use crate::{EngineError, Result};

/// A fitted ViM detector.
#[derive(Debug, Clone)]
pub struct Vim {
    /// fc weight (C, D) and bias (C).
    w: DMatrix<f64>,
    b: DVector<f64>,
    /// Origin of the feature space, u = −pinv(W) b.
    u: DVector<f64>,
    /// Basis of the residual (non-principal) subspace, (D, D − dim).
    ns: DMatrix<f64>,
    alpha: f64,
}

fn matrix(rows: Vec<Vec<f64>>, cols: usize) -> DMatrix<f64> {
    DMatrix::from_row_iterator(rows.len(), cols, rows.into_iter().flatten())
}

impl Vim {
    /// A principal dimension when none is configured: half the feature dimension, as OpenOOD's
    /// CIFAR setting (256 of ResNet-18's 512).
    pub fn default_dim(feature_dim: usize) -> usize {
        feature_dim / 2
    }

    /// Fits on training features (N, D) with the classifier's fc weight (C, D) and bias (C), keeping
    /// a principal subspace of `dim` < D dimensions.
    pub fn fit(
        train_features: &Tensor,
        fc_weight: &Tensor,
        fc_bias: &Tensor,
        dim: usize,
    ) -> Result<Self> {
        let w_rows = rows_f64(fc_weight, "ViM fc weight")?;
        let (c, d) = (w_rows.len(), w_rows.first().map_or(0, Vec::len));
        let b = fc_bias
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        if b.len() != c || c == 0 || dim == 0 || dim >= d {
            return Err(EngineError::InvalidInput(format!(
                "ViM: fc weight {c}×{d}, bias {}, principal dim {dim} (need 0 < dim < {d})",
                b.len()
            )));
        }
        let w = matrix(w_rows, d);
        let b = DVector::from_vec(b);
        let svd = w.clone().svd(true, true);
        // numpy's pinv cutoff: 1e-15 · largest singular value.
        let cutoff = 1e-15 * svd.singular_values.max();
        let pinv = svd.pseudo_inverse(cutoff).map_err(|e| {
            EngineError::InvalidInput(format!("ViM: pseudo-inverse of the fc weight: {e}"))
        })?;
        let u = -(pinv * &b);

        let x = centred(train_features, &u, "ViM training features")?;
        let n = x.nrows() as f64;
        let cov = (x.transpose() * &x) / n;
        let eig = SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
        let ns_cols: Vec<DVector<f64>> = order[dim..]
            .iter()
            .map(|&i| eig.eigenvectors.column(i).into_owned())
            .collect();
        let ns = DMatrix::from_columns(&ns_cols);

        let vlogit_mean = (&x * &ns).row_iter().map(|r| r.norm()).sum::<f64>() / n;
        // Training logits W x_raw + b = W (x_raw − u) + (W u + b).
        let logits = &x * w.transpose();
        let offset = &w * &u + &b;
        let max_logit_mean = logits
            .row_iter()
            .map(|r| {
                r.iter()
                    .zip(offset.iter())
                    .map(|(l, o)| l + o)
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .sum::<f64>()
            / n;
        if vlogit_mean.is_nan() || vlogit_mean <= 0.0 {
            return Err(EngineError::InvalidInput(
                "ViM: training features have no energy outside the principal subspace".into(),
            ));
        }
        Ok(Self {
            w,
            b,
            u,
            ns,
            alpha: max_logit_mean / vlogit_mean,
        })
    }

    /// The scale α of the virtual logit.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// The feature-space origin u = −pinv(W) b.
    pub fn origin(&self) -> &[f64] {
        self.u.as_slice()
    }

    /// Scores features (M, D): logsumexp(W x + b) − α ‖(x − u) NS‖.
    pub fn score(&self, features: &Tensor) -> Result<Vec<f64>> {
        let raw = rows_f64(features, "ViM features")?;
        if raw.first().is_some_and(|r| r.len() != self.u.len()) {
            return Err(EngineError::InvalidInput(format!(
                "ViM: features of dimension {} for a detector of dimension {}",
                raw[0].len(),
                self.u.len()
            )));
        }
        let x_raw = matrix(raw, self.u.len());
        let logits = &x_raw * self.w.transpose();
        let x = DMatrix::from_fn(x_raw.nrows(), x_raw.ncols(), |i, j| {
            x_raw[(i, j)] - self.u[j]
        });
        let residual = &x * &self.ns;
        Ok((0..x.nrows())
            .map(|i| {
                let l: Vec<f64> = logits
                    .row(i)
                    .iter()
                    .zip(self.b.iter())
                    .map(|(l, b)| l + b)
                    .collect();
                logsumexp(&l) - self.alpha * residual.row(i).norm()
            })
            .collect())
    }
}

/// Features (N, D) minus u, as a matrix.
fn centred(features: &Tensor, u: &DVector<f64>, what: &str) -> Result<DMatrix<f64>> {
    let rows = rows_f64(features, what)?;
    if rows.is_empty() || rows[0].len() != u.len() {
        return Err(EngineError::InvalidInput(format!(
            "{what}: {} rows of dimension {:?}, expected dimension {}",
            rows.len(),
            rows.first().map(Vec::len),
            u.len()
        )));
    }
    let x = matrix(rows, u.len());
    Ok(DMatrix::from_fn(x.nrows(), x.ncols(), |i, j| {
        x[(i, j)] - u[j]
    }))
}
