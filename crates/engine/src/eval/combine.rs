//! Combining DiffGuard with a cheap baseline (spec §8.4).
//!
//! - [`Cascade`]: deployable. The baseline decides where it is confident (thresholds are
//!   quantiles of its in-distribution *validation* scores) and DiffGuard decides the rest, so the
//!   expensive DiffGuard only runs on the uncertain band.
//! - [`threshold_envelope`]: the paper's evaluation protocol, an **oracle**: over every pair of
//!   thresholds, accept iff both detectors accept (AND rule), and keep the best TPR at each FPR.
//!   It picks thresholds on the test labels, so it measures complementarity, not a deployable
//!   detector.

use serde::{Deserialize, Serialize};

use super::metrics::trapezoid;
use crate::{EngineError, Result};

/// A baseline-first cascade. All scores: higher = in-distribution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Cascade {
    /// Baseline score at or below which the image is rejected without DiffGuard.
    pub lo: f64,
    /// Baseline score at or above which the image is accepted without DiffGuard.
    pub hi: f64,
    /// Centre and scale (median, IQR) of the in-distribution validation scores, used only to
    /// squash each score into its tier.
    baseline_ref: (f64, f64),
    diffguard_ref: (f64, f64),
}

/// Default quantiles of the baseline's InD validation scores: below the 1% quantile the baseline
/// rejects on its own, above the median it accepts on its own.
pub const DEFAULT_CASCADE_QUANTILES: (f64, f64) = (0.01, 0.5);

/// numpy's default (linear) quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos - pos.floor());
    match sorted.get(i + 1) {
        Some(next) if frac > 0.0 => sorted[i] + frac * (next - sorted[i]),
        _ => sorted[i],
    }
}

fn sorted_finite(scores: &[f64], what: &str) -> Result<Vec<f64>> {
    if scores.is_empty() || scores.iter().any(|s| !s.is_finite()) {
        return Err(EngineError::InvalidInput(format!(
            "{what}: need a non-empty set of finite scores"
        )));
    }
    let mut v = scores.to_vec();
    v.sort_by(f64::total_cmp);
    Ok(v)
}

fn reference(sorted: &[f64]) -> (f64, f64) {
    let iqr = quantile(sorted, 0.75) - quantile(sorted, 0.25);
    (quantile(sorted, 0.5), if iqr > 0.0 { iqr } else { 1.0 })
}

/// A strictly increasing map of ℝ onto (0, 1), keeping order where a logistic would saturate.
fn squash(s: f64, (centre, scale): (f64, f64)) -> f64 {
    0.5 + ((s - centre) / scale).atan() / std::f64::consts::PI
}

impl Cascade {
    /// Sets the baseline's thresholds at quantiles `q_lo` < `q_hi` of its in-distribution
    /// validation scores; `diffguard_val` (same images) only fixes DiffGuard's scale.
    pub fn fit(baseline_val: &[f64], diffguard_val: &[f64], q_lo: f64, q_hi: f64) -> Result<Self> {
        if !(0.0 <= q_lo && q_lo < q_hi && q_hi <= 1.0) {
            return Err(EngineError::InvalidInput(format!(
                "cascade quantiles must satisfy 0 ≤ q_lo < q_hi ≤ 1, got {q_lo}, {q_hi}"
            )));
        }
        let b = sorted_finite(baseline_val, "cascade baseline validation scores")?;
        let d = sorted_finite(diffguard_val, "cascade DiffGuard validation scores")?;
        Ok(Self {
            lo: quantile(&b, q_lo),
            hi: quantile(&b, q_hi),
            baseline_ref: reference(&b),
            diffguard_ref: reference(&d),
        })
    }

    /// Whether the image's baseline score falls in the band where DiffGuard must run.
    pub fn needs_diffguard(&self, baseline: f64) -> bool {
        self.lo < baseline && baseline < self.hi
    }

    /// One combined score: confident accepts in (2, 3) ordered by the baseline, the uncertain band
    /// in (1, 2) ordered by DiffGuard, confident rejects in (0, 1) ordered by the baseline.
    /// `diffguard` may be `None` exactly when [`Self::needs_diffguard`] is false.
    pub fn score_one(&self, baseline: f64, diffguard: Option<f64>) -> Result<f64> {
        if baseline.is_nan() {
            return Err(EngineError::InvalidInput(
                "cascade: NaN baseline score".into(),
            ));
        }
        if baseline >= self.hi {
            return Ok(2.0 + squash(baseline, self.baseline_ref));
        }
        if baseline <= self.lo {
            return Ok(squash(baseline, self.baseline_ref));
        }
        match diffguard {
            Some(d) if !d.is_nan() => Ok(1.0 + squash(d, self.diffguard_ref)),
            _ => Err(EngineError::InvalidInput(
                "cascade: the baseline is unsure and no DiffGuard score was given".into(),
            )),
        }
    }

    /// [`Self::score_one`] over paired score vectors (evaluation, where both are computed).
    pub fn score(&self, baseline: &[f64], diffguard: &[f64]) -> Result<Vec<f64>> {
        if baseline.len() != diffguard.len() {
            return Err(EngineError::InvalidInput(format!(
                "cascade: {} baseline scores but {} DiffGuard scores",
                baseline.len(),
                diffguard.len()
            )));
        }
        baseline
            .iter()
            .zip(diffguard)
            .map(|(&b, &d)| self.score_one(b, Some(d)))
            .collect()
    }
}

/// The upper envelope ROC of the AND rule over a threshold grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub auroc: f64,
    pub fpr_at_95: f64,
    /// The envelope, from (0, 0) to (1, 1), FPR ascending, TPR non-decreasing.
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
}

/// Descending distinct thresholds of `scores`, thinned to at most `max_grid` by rank, then −∞
/// ("accept all"). Each score's rank: the first grid index whose threshold it reaches.
fn grid_ranks(scores: &[f64], max_grid: usize) -> (usize, Vec<usize>) {
    let mut grid = scores.to_vec();
    grid.sort_by(|a, b| b.total_cmp(a));
    grid.dedup();
    if grid.len() > max_grid {
        let step = grid.len() as f64 / max_grid as f64;
        grid = (0..max_grid)
            .map(|i| grid[((i as f64 * step) as usize).min(grid.len() - 1)])
            .collect();
        grid.dedup();
    }
    grid.push(f64::NEG_INFINITY);
    let ranks = scores
        .iter()
        .map(|s| grid.partition_point(|g| g > s))
        .collect();
    (grid.len(), ranks)
}

/// The threshold-envelope oracle for detectors A and B (spec §8.4): for every pair of thresholds
/// (θa, θb) from each detector's grid (all distinct scores, thinned to `max_grid` if more), an
/// image is accepted iff a ≥ θa and b ≥ θb; the result is the best TPR reachable at each FPR
/// (a non-decreasing staircase) and its AUROC and FPR@95. Because either grid contains "accept
/// all", each detector's own ROC points are among the candidates, so with distinct scores the
/// envelope's AUROC is at least each detector's and its FPR@95 at most each detector's.
///
/// Ties: where a detector's ROC has a diagonal segment (a tie between InD and OOD scores), the
/// staircase through its end points falls below that diagonal, so the envelope can then score a
/// little under the tied detector's tie-aware AUROC.
pub fn threshold_envelope(
    a_ind: &[f64],
    b_ind: &[f64],
    a_ood: &[f64],
    b_ood: &[f64],
    max_grid: usize,
) -> Result<Envelope> {
    if a_ind.len() != b_ind.len() || a_ood.len() != b_ood.len() {
        return Err(EngineError::InvalidInput(
            "envelope: each detector needs a score for every image".into(),
        ));
    }
    let all = [a_ind, b_ind, a_ood, b_ood];
    if a_ind.is_empty() || a_ood.is_empty() || all.iter().any(|v| v.iter().any(|s| s.is_nan())) {
        return Err(EngineError::InvalidInput(
            "envelope: need non-empty InD and OOD sets without NaN".into(),
        ));
    }
    if max_grid == 0 {
        return Err(EngineError::InvalidInput("envelope: empty grid".into()));
    }
    let (n_ind, n_ood) = (a_ind.len(), a_ood.len());
    let joined = |x: &[f64], y: &[f64]| x.iter().chain(y).copied().collect::<Vec<_>>();
    let (ga, ra) = grid_ranks(&joined(a_ind, a_ood), max_grid);
    let (gb, rb) = grid_ranks(&joined(b_ind, b_ood), max_grid);

    // Images bucketed by A-rank; as θa loosens they enter histograms over B-rank.
    let mut by_a: Vec<Vec<usize>> = vec![Vec::new(); ga];
    for (i, &r) in ra.iter().enumerate() {
        by_a[r].push(i);
    }
    let mut hist_ind = vec![0usize; gb];
    let mut hist_ood = vec![0usize; gb];
    // best[k] = most InD accepted with exactly k OOD accepted.
    let mut best: Vec<Option<usize>> = vec![None; n_ood + 1];
    best[0] = Some(0);
    for bucket in &by_a {
        for &i in bucket {
            if i < n_ind {
                hist_ind[rb[i]] += 1;
            } else {
                hist_ood[rb[i]] += 1;
            }
        }
        let (mut tp, mut fp) = (0, 0);
        for l in 0..gb {
            tp += hist_ind[l];
            fp += hist_ood[l];
            if best[fp].is_none_or(|t| tp > t) {
                best[fp] = Some(tp);
            }
        }
    }

    let mut env = Envelope {
        auroc: 0.0,
        fpr_at_95: 1.0,
        fpr: vec![0.0],
        tpr: vec![0.0],
    };
    // The achievable staircase: from one best point to the next, FPR grows first (the extra OOD
    // images are accepted) and TPR only then. Joining the best points by diagonals instead would
    // credit operating points no threshold pair reaches and overstate even a single detector.
    let mut running = 0;
    for (k, t) in best.iter().enumerate() {
        if let Some(t) = *t {
            let fpr = k as f64 / n_ood as f64;
            if t > running && k > 0 {
                env.fpr.push(fpr);
                env.tpr.push(running as f64 / n_ind as f64);
            }
            running = running.max(t);
            env.fpr.push(fpr);
            env.tpr.push(running as f64 / n_ind as f64);
        }
    }
    env.auroc = trapezoid(&env.fpr, &env.tpr);
    if let Some(i) = env.tpr.iter().position(|&t| t >= 0.95) {
        env.fpr_at_95 = env.fpr[i];
    }
    Ok(env)
}
