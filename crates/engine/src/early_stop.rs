//! Adaptive early stop (spec §6) and the bookkeeping that follows from it (k*, start index, batching
//! of images whose trajectories have equal length).

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::similarity::{ImageSimilarity, psnr_code};
use crate::{EngineError, Result};

/// Stop thresholds. A negative threshold disables its metric (the reference uses −1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EarlyStop {
    /// Stop when PSNR (code units, see [`psnr_code`]) falls below this (48.5).
    pub psnr: f64,
    /// Stop when the DISTS similarity falls below this (0.38).
    pub dists: f64,
}

impl EarlyStop {
    /// Both metrics off: the inversion always runs its full length.
    pub const OFF: EarlyStop = EarlyStop {
        psnr: -1.0,
        dists: -1.0,
    };

    pub fn psnr_enabled(&self) -> bool {
        self.psnr >= 0.0
    }

    pub fn dists_enabled(&self) -> bool {
        self.dists >= 0.0
    }

    pub fn enabled(&self) -> bool {
        self.psnr_enabled() || self.dists_enabled()
    }

    /// The OR rule for one image.
    pub fn fires(&self, psnr: f64, dists_sim: Option<f64>) -> bool {
        let by_psnr = self.psnr_enabled() && psnr < self.psnr;
        let by_dists = self.dists_enabled() && dists_sim.is_some_and(|d| d < self.dists);
        by_psnr || by_dists
    }

    /// Evaluates the rule for a batch of noised images `x_next` against the inputs `x0` (both in
    /// \[-1,1\]). DISTS sees the unclamped images mapped by ·½+½, as in the reference.
    pub fn check(
        &self,
        x_next: &Tensor,
        x0: &Tensor,
        dists: Option<&dyn ImageSimilarity>,
    ) -> Result<StopCheck> {
        let psnr = psnr_code(x_next, x0)?;
        let dists_sim = match (self.dists_enabled(), dists) {
            (false, _) => None,
            (true, Some(d)) => {
                Some(d.similarity(&x_next.affine(0.5, 0.5)?, &x0.affine(0.5, 0.5)?)?)
            }
            (true, None) => {
                return Err(EngineError::Config(
                    "the DISTS early-stop threshold is set but no DISTS model was given".into(),
                ));
            }
        };
        let stop = (0..psnr.len())
            .map(|i| self.fires(psnr[i], dists_sim.as_ref().map(|d| d[i])))
            .collect();
        Ok(StopCheck {
            psnr,
            dists_sim,
            stop,
        })
    }
}

/// The early-stop metrics of one inversion step.
#[derive(Debug, Clone, PartialEq)]
pub struct StopCheck {
    pub psnr: Vec<f64>,
    pub dists_sim: Option<Vec<f64>>,
    pub stop: Vec<bool>,
}

/// Spaced index where denoising starts for an image whose inversion stopped at step k* (latent at
/// level k*+1), in a schedule of `n` steps: n − 1 − max(0, n − k* − d) with d = `forback_skip_diff`.
/// d = 3 (exp6.1) gives k* + 2: one more step than the latent's level.
pub fn start_index(k_star: usize, n: usize, forback_skip_diff: usize) -> usize {
    let skip = n.saturating_sub(k_star + forback_skip_diff);
    n.saturating_sub(1 + skip)
}

/// Batch indices grouped by equal start index (ascending), so that each group runs its denoising
/// trajectory as one batch.
pub fn group_by_start(starts: &[usize]) -> Vec<(usize, Vec<usize>)> {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &s) in starts.iter().enumerate() {
        groups.entry(s).or_default().push(i);
    }
    groups.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_index_rule() {
        // Spec §4.1: ddim100, forback 3 → k* + 2; never past the last index.
        assert_eq!(start_index(57, 100, 3), 59);
        assert_eq!(start_index(89, 100, 3), 91);
        assert_eq!(start_index(98, 100, 3), 99);
        // Golden pipeline_gdm (ddim20): k* = 8 → 10, k* = 7 → 9.
        assert_eq!(start_index(8, 20, 3), 10);
        assert_eq!(start_index(7, 20, 3), 9);
        // d = 2: start exactly at the latent's level k* + 1.
        assert_eq!(start_index(29, 50, 2), 30);
    }

    #[test]
    fn or_rule_and_disabling() {
        let both = EarlyStop {
            psnr: 48.5,
            dists: 0.38,
        };
        assert!(both.fires(48.4, Some(0.9)));
        assert!(both.fires(60.0, Some(0.37)));
        assert!(!both.fires(48.5, Some(0.38)));
        let psnr_only = EarlyStop {
            psnr: 48.5,
            dists: -1.0,
        };
        assert!(!psnr_only.fires(50.0, Some(0.0)));
        assert!(!EarlyStop::OFF.fires(0.0, Some(0.0)));
        assert!(!EarlyStop::OFF.enabled());
    }

    #[test]
    fn grouping() {
        let g = group_by_start(&[10, 9, 10, 3]);
        assert_eq!(g, vec![(3, vec![3]), (9, vec![1]), (10, vec![0, 2])]);
    }
}
