//! A model-free detector: scores the classifier's own logits as they came back in the upstream
//! answer (`detector.kind = "logits"`). No network runs and nothing is loaded, so the guard
//! starts in milliseconds in a few megabytes, and every verdict is available when the upstream
//! answers. It is the classic confidence baseline (energy, max-logit, max-softmax; OpenOOD's EBO,
//! MLS, MSP): a cheap first line for classifiers whose responses carry their scores, and the way
//! to run the proxy without models at all. (On the project's own Fashion-MNIST evaluation energy
//! beats the shipped DiffGuard recipe; the paper reports the reverse at ImageNet scale.)
//!
//! Settings (`[detector.settings]`): `method` = `energy` (default) | `max-logit` | `msp`;
//! `temperature` (energy, default 1); `threshold` (required): OOD when the score is above it.
//! Scores follow the guard's convention, higher = more out-of-distribution:
//! energy `−T·logsumexp(z/T)`, max-logit `−max z`, msp `−max softmax(z)`.

use super::detector::{Detector, DetectorError, Job, Score};
use crate::config::DetectorConfig;

/// `detector.kind` of this detector.
pub const KIND: &str = "logits";

/// Which confidence the score is made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Free energy (Liu et al. 2020).
    Energy,
    /// The largest logit (Hendrycks et al. 2022).
    MaxLogit,
    /// The largest softmax probability (Hendrycks & Gimpel 2017).
    Msp,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Energy => "energy",
            Method::MaxLogit => "max-logit",
            Method::Msp => "msp",
        }
    }
}

/// The logit-confidence detector.
#[derive(Debug, Clone)]
pub struct LogitsDetector {
    method: Method,
    temperature: f64,
    threshold: f32,
}

impl LogitsDetector {
    /// Reads `detector.settings`; every error names the key at fault.
    pub fn from_config(cfg: &DetectorConfig) -> Result<Self, DetectorError> {
        let bad = |key: &str, why: &str| {
            DetectorError::Unavailable(format!("detector.settings.{key} {why}"))
        };
        let method = match cfg.settings.get("method").map(|v| v.as_str()) {
            None | Some(Some("energy")) => Method::Energy,
            Some(Some("max-logit")) => Method::MaxLogit,
            Some(Some("msp")) => Method::Msp,
            Some(_) => {
                return Err(bad(
                    "method",
                    "must be \"energy\", \"max-logit\" or \"msp\"",
                ));
            }
        };
        let number = |key: &str| cfg.settings.get(key).map(|v| v.as_f64());
        let temperature = match number("temperature") {
            None => 1.0,
            Some(Some(t)) if t > 0.0 && t.is_finite() => t,
            Some(_) => return Err(bad("temperature", "must be a positive number")),
        };
        let threshold = match number("threshold") {
            Some(Some(t)) if t.is_finite() => t as f32,
            Some(_) => return Err(bad("threshold", "must be a finite number")),
            None => {
                return Err(bad(
                    "threshold",
                    "is required: OOD when the score is above it (see docs: higher = more OOD)",
                ));
            }
        };
        Ok(Self {
            method,
            temperature,
            threshold,
        })
    }

    /// The OOD score of one logit vector (higher = more out-of-distribution).
    pub fn score_logits(&self, logits: &[f32]) -> Result<f64, DetectorError> {
        if logits.is_empty() || logits.iter().any(|v| !v.is_finite()) {
            return Err(DetectorError::InvalidInput(
                "the upstream scores are empty or not finite".into(),
            ));
        }
        let z: Vec<f64> = logits.iter().map(|&v| f64::from(v)).collect();
        let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Ok(match self.method {
            Method::MaxLogit => -max,
            Method::Energy => {
                let t = self.temperature;
                -t * (max / t + z.iter().map(|v| ((v - max) / t).exp()).sum::<f64>().ln())
            }
            Method::Msp => -1.0 / z.iter().map(|v| (v - max).exp()).sum::<f64>(),
        })
    }
}

impl Detector for LogitsDetector {
    fn fingerprint(&self) -> String {
        format!(
            "{KIND}:{}:t={}:thr={}",
            self.method.name(),
            self.temperature,
            self.threshold
        )
    }

    fn score(&self, jobs: &[Job]) -> Vec<Result<Score, DetectorError>> {
        jobs.iter()
            .map(|job| {
                let logits = job.logits.as_deref().ok_or_else(|| {
                    DetectorError::InvalidInput(
                        "the upstream answer carries no scores for this image; the logits \
                         detector needs a response adapter that keeps them (e.g. argmax of an \
                         array, KServe v1, OIP v2)"
                            .into(),
                    )
                })?;
                let score = self.score_logits(logits)?;
                Ok(Score {
                    score: score as f32,
                    threshold: self.threshold,
                    diagnostics: Default::default(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(settings: serde_json::Value) -> Result<LogitsDetector, DetectorError> {
        let cfg = DetectorConfig {
            kind: KIND.into(),
            settings: serde_json::from_value(settings).expect("settings map"),
            ..DetectorConfig::default()
        };
        LogitsDetector::from_config(&cfg)
    }

    #[test]
    fn scores_match_hand_computed_values() {
        let z = [2.0f32, 0.0, -1.0];
        // logsumexp(2, 0, -1) = ln(e² + 1 + e⁻¹) = 2.17586…; softmax max = e²/(e² + 1 + e⁻¹).
        let lse = (2f64.exp() + 1.0 + (-1f64).exp()).ln();
        let e = detector(serde_json::json!({"threshold": 0.0})).expect("energy");
        assert!((e.score_logits(&z).expect("score") + lse).abs() < 1e-12);
        let e2 = detector(serde_json::json!({"threshold": 0.0, "temperature": 2.0})).expect("T=2");
        let lse2 = 2.0 * (1f64.exp() + 1.0 + (-0.5f64).exp()).ln();
        assert!((e2.score_logits(&z).expect("score") + lse2).abs() < 1e-12);
        let m =
            detector(serde_json::json!({"threshold": 0.0, "method": "max-logit"})).expect("mls");
        assert_eq!(m.score_logits(&z).expect("score"), -2.0);
        let p = detector(serde_json::json!({"threshold": 0.0, "method": "msp"})).expect("msp");
        let msp = 2f64.exp() / (2f64.exp() + 1.0 + (-1f64).exp());
        assert!((p.score_logits(&z).expect("score") + msp).abs() < 1e-12);
    }

    #[test]
    fn a_confident_answer_scores_lower_than_a_flat_one() {
        let d = detector(serde_json::json!({"threshold": -5.0})).expect("energy");
        let confident = d.score_logits(&[12.0, 0.0, 0.0]).expect("score");
        let flat = d.score_logits(&[1.0, 1.0, 1.0]).expect("score");
        assert!(confident < -5.0 && flat > -5.0, "{confident} {flat}");
        // Large logits do not overflow (max-shifted logsumexp).
        assert!(d.score_logits(&[1e30, 0.0]).expect("score").is_finite());
    }

    #[test]
    fn settings_errors_name_the_key() {
        let err = |v| detector(v).expect_err("must fail").to_string();
        assert!(err(serde_json::json!({})).contains("detector.settings.threshold"));
        assert!(
            err(serde_json::json!({"threshold": 1, "method": "odin"}))
                .contains("detector.settings.method")
        );
        assert!(
            err(serde_json::json!({"threshold": 1, "temperature": 0}))
                .contains("detector.settings.temperature")
        );
        assert!(err(serde_json::json!({"threshold": "high"})).contains("threshold"));
    }

    #[test]
    fn jobs_without_scores_or_with_bad_ones_fail_alone() {
        let d = detector(serde_json::json!({"threshold": -1.0})).expect("energy");
        let image = std::sync::Arc::new(super::super::detector::Image {
            width: 1,
            height: 1,
            channels: 1,
            pixels: vec![0],
        });
        let job = |logits: Option<Vec<f32>>| Job {
            image: image.clone(),
            label: 0,
            logits,
        };
        let out = d.score(&[
            job(Some(vec![9.0, 0.0])),
            job(None),
            job(Some(vec![f32::NAN])),
        ]);
        assert!(out[0].as_ref().expect("scored").score < -1.0);
        assert!(matches!(out[1], Err(DetectorError::InvalidInput(_))));
        assert!(matches!(out[2], Err(DetectorError::InvalidInput(_))));
    }
}
