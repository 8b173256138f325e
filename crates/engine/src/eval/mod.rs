//! OOD evaluation: metrics, baseline detectors, threshold calibration and the combination of
//! DiffGuard with a baseline.
//!
//! Convention everywhere in this module: a score is **higher = more in-distribution** (InD), the
//! engine's similarity convention; the guard negates it into an OOD score at its edge.
//!
//! - [`metrics`]: AUROC, FPR@95, AUPR-In/Out in f64 with tie-aware ranking (spec §8.3).
//! - [`baselines`]: MSP, energy, max-logit, KNN on penultimate features, ViM (OpenOOD's
//!   formulations) from classifier outputs.
//! - [`calibrate`]: global and per-class thresholds at a target false-reject rate, and the
//!   fingerprinted thresholds file the proxy loads.
//! - [`combine`]: the deployable cascade and the paper's threshold-envelope oracle (spec §8.4).
//! - [`outputs`]: the classifier run over a dataset, and all baselines scored on its outputs.
//! - [`table`]: the results table in the paper's layout (Markdown, JSON).
//! - [`run`]: the evaluation runner (`diffguard eval`), with [`variants`] of the recipe and the
//!   per-image score [`cache`] that makes runs resumable; [`report`] writes its output folder.
//! - [`calibration`]: the calibration runner (`diffguard calibrate`).
//! - [`quality`]: sample accuracy and inversion faithfulness of a diffusion prior.

pub mod baselines;
pub mod cache;
pub mod calibrate;
pub mod calibration;
pub mod combine;
pub mod metrics;
pub mod outputs;
pub mod quality;
pub mod report;
pub mod run;
pub mod table;
pub mod variants;

pub use baselines::{Knn, Vim, energy, max_logit, msp};
pub use calibrate::{
    ClassThreshold, Threshold, ThresholdsFile, calibrate, threshold_at_false_reject_rate,
};
pub use combine::{Cascade, Envelope, threshold_envelope};
pub use metrics::{OodMetrics, Roc, aupr, auroc, fpr_at_tpr, ood_metrics, roc_curve};
pub use outputs::{FittedBaselines, Outputs, collect_outputs};
pub use table::{ResultsTable, TableRow};
