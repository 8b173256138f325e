//! OOD metrics in f64, exactly as scikit-learn computes them in DiffGuard's `ood_tester/metrics.py`
//! (spec §8.3): in-distribution (InD) is the positive class, and a higher score means more
//! in-distribution.
//!
//! Ranking is tie-aware: samples with equal scores enter the curves together, as one threshold, so
//! a tie between an InD and an OOD sample counts one half in the AUROC (Mann–Whitney). Scores stay
//! in f64 end to end — in f32 a saturated MSP turns thousands of distinct scores into ties.

use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// The four numbers of the paper's tables, as fractions (not percent).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OodMetrics {
    pub auroc: f64,
    pub fpr_at_95: f64,
    pub aupr_in: f64,
    pub aupr_out: f64,
}

/// An ROC curve with InD positive: `fpr[i]`, `tpr[i]` when accepting scores ≥ `thresholds[i]`.
/// Starts at (0, 0) with threshold +∞, like `sklearn.metrics.roc_curve`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Roc {
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
    pub thresholds: Vec<f64>,
}

/// Cumulative counts at each distinct score, highest first (sklearn's `_binary_clf_curve`).
struct Counts {
    tps: Vec<f64>,
    fps: Vec<f64>,
    thresholds: Vec<f64>,
}

fn check(what: &str, scores: &[f64]) -> Result<()> {
    if scores.is_empty() {
        return Err(EngineError::InvalidInput(format!("{what}: no scores")));
    }
    if let Some(i) = scores.iter().position(|s| s.is_nan()) {
        return Err(EngineError::InvalidInput(format!(
            "{what}: score {i} is NaN"
        )));
    }
    Ok(())
}

fn counts(pos: &[f64], neg: &[f64]) -> Counts {
    let mut all: Vec<(f64, bool)> = pos
        .iter()
        .map(|&s| (s, true))
        .chain(neg.iter().map(|&s| (s, false)))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut c = Counts {
        tps: Vec::new(),
        fps: Vec::new(),
        thresholds: Vec::new(),
    };
    let (mut tp, mut fp) = (0.0, 0.0);
    for (i, &(s, is_pos)) in all.iter().enumerate() {
        if is_pos {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        // -0.0 and 0.0 are one threshold, as in numpy.
        let last_of_tie = all.get(i + 1).is_none_or(|next| next.0 != s);
        if last_of_tie {
            c.tps.push(tp);
            c.fps.push(fp);
            c.thresholds.push(s);
        }
    }
    c
}

/// The ROC curve (InD positive) with sklearn's `drop_intermediate=True`: points in the middle of a
/// straight segment are dropped. The area is unaffected; FPR@95 is read from this curve, as the
/// reference code does.
pub fn roc_curve(ind: &[f64], ood: &[f64]) -> Result<Roc> {
    check("in-distribution", ind)?;
    check("OOD", ood)?;
    let c = counts(ind, ood);
    let n = c.tps.len();
    let keep: Vec<usize> = (0..n)
        .filter(|&i| {
            i == 0
                || i + 1 == n
                || c.fps[i - 1] - 2.0 * c.fps[i] + c.fps[i + 1] != 0.0
                || c.tps[i - 1] - 2.0 * c.tps[i] + c.tps[i + 1] != 0.0
        })
        .collect();
    let (p, q) = (c.tps[n - 1], c.fps[n - 1]);
    let mut roc = Roc {
        fpr: vec![0.0],
        tpr: vec![0.0],
        thresholds: vec![f64::INFINITY],
    };
    for i in keep {
        roc.fpr.push(c.fps[i] / q);
        roc.tpr.push(c.tps[i] / p);
        roc.thresholds.push(c.thresholds[i]);
    }
    Ok(roc)
}

/// Trapezoidal area under y(x) for x sorted ascending.
pub(crate) fn trapezoid(x: &[f64], y: &[f64]) -> f64 {
    x.windows(2)
        .zip(y.windows(2))
        .map(|(x, y)| (x[1] - x[0]) * (y[0] + y[1]) / 2.0)
        .sum()
}

/// Area under the ROC curve, InD positive.
pub fn auroc(ind: &[f64], ood: &[f64]) -> Result<f64> {
    let roc = roc_curve(ind, ood)?;
    Ok(trapezoid(&roc.fpr, &roc.tpr))
}

/// The FPR (fraction of OOD accepted) at the first ROC point whose TPR reaches `tpr` (0.95 for
/// FPR@95).
pub fn fpr_at_tpr(ind: &[f64], ood: &[f64], tpr: f64) -> Result<f64> {
    let roc = roc_curve(ind, ood)?;
    let i = roc
        .tpr
        .iter()
        .position(|&t| t >= tpr)
        .ok_or_else(|| EngineError::InvalidInput(format!("TPR {tpr} is never reached")))?;
    Ok(roc.fpr[i])
}

/// Area under the precision–recall curve for `pos` as the positive class (higher score =
/// positive): `sklearn.metrics.auc(recall, precision)` over `precision_recall_curve`, i.e. the
/// trapezoidal rule with the (recall 0, precision 1) end point, not average precision.
pub fn aupr(pos: &[f64], neg: &[f64]) -> Result<f64> {
    check("positive", pos)?;
    check("negative", neg)?;
    let c = counts(pos, neg);
    let p = c.tps[c.tps.len() - 1];
    let mut recall = vec![0.0];
    let mut precision = vec![1.0];
    for (&tp, &fp) in c.tps.iter().zip(&c.fps) {
        recall.push(tp / p);
        precision.push(tp / (tp + fp));
    }
    Ok(trapezoid(&recall, &precision))
}

/// AUROC, FPR@95, AUPR-In (InD positive) and AUPR-Out (OOD positive on the negated score, which
/// ranks like the reference's `1 − score` without its rounding).
pub fn ood_metrics(ind: &[f64], ood: &[f64]) -> Result<OodMetrics> {
    let neg = |v: &[f64]| v.iter().map(|s| -s).collect::<Vec<f64>>();
    Ok(OodMetrics {
        auroc: auroc(ind, ood)?,
        fpr_at_95: fpr_at_tpr(ind, ood, 0.95)?,
        aupr_in: aupr(ind, ood)?,
        aupr_out: aupr(&neg(ood), &neg(ind))?,
    })
}
