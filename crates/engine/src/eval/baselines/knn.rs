//! Deep nearest neighbours (Sun et al. 2022, OpenOOD's `KNNPostprocessor`): the score is minus the
//! squared L2 distance from the L2-normalised penultimate feature to its k-th nearest neighbour in
//! a bank of normalised training features.

use candle_core::{D, DType, Tensor};

use crate::{EngineError, Result};

/// Queries per matrix product: bounds the (chunk × bank) distance matrix in memory.
const CHUNK: usize = 256;

/// A fitted KNN detector: the normalised feature bank.
#[derive(Debug, Clone)]
pub struct Knn {
    /// Normalised bank, transposed to (D, N) and contiguous for the product.
    bank_t: Tensor,
    /// Squared norms of the normalised bank rows (1 up to the 1e-10 guard).
    bank_sq: Vec<f64>,
    k: usize,
}

/// x / (‖x‖₂ + 1e-10) per row, OpenOOD's normaliser.
fn normalize(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-10)?;
    Ok(x.broadcast_div(&norm)?)
}

impl Knn {
    /// OpenOOD's default neighbour count.
    pub const DEFAULT_K: usize = 50;

    /// Builds the bank from training features (N, D).
    pub fn fit(train_features: &Tensor, k: usize) -> Result<Self> {
        if train_features.rank() != 2 {
            return Err(EngineError::InvalidInput(format!(
                "KNN bank: expected (N, D) features, got {:?}",
                train_features.dims()
            )));
        }
        let n = train_features.dim(0)?;
        if k == 0 || k > n {
            return Err(EngineError::InvalidInput(format!(
                "KNN: k = {k} with a bank of {n} features"
            )));
        }
        let bank = normalize(train_features)?;
        let bank_sq = bank
            .sqr()?
            .sum(D::Minus1)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok(Self {
            bank_t: bank.t()?.contiguous()?,
            bank_sq,
            k,
        })
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Scores features (M, D): −(squared distance to the k-th nearest bank feature).
    pub fn score(&self, features: &Tensor) -> Result<Vec<f64>> {
        let dims = features.dims();
        if dims.len() != 2 || dims[1] != self.bank_t.dim(0)? {
            return Err(EngineError::InvalidInput(format!(
                "KNN: features of shape {dims:?} for a bank of dimension {}",
                self.bank_t.dim(0)?
            )));
        }
        let q = normalize(features)?;
        let mut out = Vec::with_capacity(dims[0]);
        for start in (0..dims[0]).step_by(CHUNK) {
            let len = CHUNK.min(dims[0] - start);
            let chunk = q.narrow(0, start, len)?.contiguous()?;
            let q_sq = chunk.sqr()?.sum(D::Minus1)?.to_vec1::<f32>()?;
            let dots = chunk
                .matmul(&self.bank_t)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut scratch = Vec::with_capacity(self.bank_sq.len());
            for (row, qs) in dots.chunks_exact(self.bank_sq.len()).zip(q_sq) {
                out.push(-self.kth_distance(row, f64::from(qs), &mut scratch));
            }
        }
        Ok(out)
    }

    /// The k-th smallest ‖q − b‖² = ‖q‖² + ‖b‖² − 2 q·b (faiss's flat L2 index computes the same).
    fn kth_distance(&self, dots: &[f32], q_sq: f64, scratch: &mut Vec<f64>) -> f64 {
        scratch.clear();
        scratch.extend(
            dots.iter()
                .zip(&self.bank_sq)
                .map(|(&dot, b_sq)| (q_sq + b_sq - 2.0 * f64::from(dot)).max(0.0)),
        );
        let (_, kth, _) = scratch.select_nth_unstable_by(self.k - 1, f64::total_cmp);
        *kth
    }
}
