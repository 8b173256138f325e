//! Calibration hits its target rate on synthetic scores; the thresholds file round-trips and
//! refuses another detector's thresholds.

use diffguard_engine::eval::{self, ThresholdsFile};
use diffguard_engine::{EngineError, LabelId};

/// A fixed pseudo-random sequence in [0, 1) (an LCG), so cases are reproducible without `rand`.
fn uniform(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect()
}

#[test]
fn eval_global_threshold_hits_target() {
    // 1000 distinct scores: exactly 50 must fall below the threshold at 5%.
    let scores: Vec<f64> = uniform(1, 1000);
    let t = eval::threshold_at_false_reject_rate(&scores, 0.05).unwrap();
    assert_eq!(t.achieved_false_reject_rate, 0.05);
    assert_eq!(scores.iter().filter(|&&s| s < t.min_score).count(), 50);
    // 5000 scores at 1%: 50 rejected.
    let scores = uniform(2, 5000);
    let t = eval::threshold_at_false_reject_rate(&scores, 0.01).unwrap();
    assert_eq!(t.achieved_false_reject_rate, 0.01);
    // n not a multiple: 7% of 333 = 23.31 → 23 rejected, never more than the target.
    let t = eval::threshold_at_false_reject_rate(&uniform(3, 333), 0.07).unwrap();
    assert_eq!(t.achieved_false_reject_rate, 23.0 / 333.0);
    // All tied: nothing can be rejected without rejecting everything.
    let t = eval::threshold_at_false_reject_rate(&[0.3; 40], 0.05).unwrap();
    assert_eq!((t.min_score, t.achieved_false_reject_rate), (0.3, 0.0));
    assert!(eval::threshold_at_false_reject_rate(&scores, 1.0).is_err());
    assert!(eval::threshold_at_false_reject_rate(&[], 0.05).is_err());
    assert!(eval::threshold_at_false_reject_rate(&[0.1, f64::NAN], 0.05).is_err());
}

/// Class 0 scores in [1, 2), class 1 in [0, 1), class 2 (only 10 images) in [0.5, 1.5).
fn three_classes() -> (Vec<f64>, Vec<LabelId>) {
    let mut scores = Vec::new();
    let mut labels = Vec::new();
    for (label, offset, n) in [(0u32, 1.0, 1000), (1, 0.0, 600), (2, 0.5, 10)] {
        scores.extend(uniform(10 + u64::from(label), n).iter().map(|u| u + offset));
        labels.extend(std::iter::repeat_n(LabelId(label), n));
    }
    (scores, labels)
}

#[test]
fn eval_per_class_thresholds() {
    let (scores, labels) = three_classes();
    let file = eval::calibrate(&scores, &labels, 0.05, 50, "fp-A").unwrap();
    assert_eq!(file.global.samples, 1610);
    assert_eq!(file.global.achieved_false_reject_rate, 80.0 / 1610.0);
    let c0 = file.per_class[&0];
    let c1 = file.per_class[&1];
    let c2 = file.per_class[&2];
    assert_eq!(
        (c0.achieved_false_reject_rate, c0.uses_global),
        (0.05, false)
    );
    assert_eq!(
        (c1.achieved_false_reject_rate, c1.uses_global),
        (0.05, false)
    );
    assert!(c2.uses_global && c2.threshold == file.global.threshold);
    // The global threshold lands inside class 1's range: class 0 is never rejected by it.
    assert!(-file.global.threshold < 1.0);
    // The verdict rule reproduces each class's rate on its own validation scores.
    for (label, want) in [(0u32, 0.05), (1, 0.05)] {
        let own: Vec<f64> = scores
            .iter()
            .zip(&labels)
            .filter(|(_, l)| l.0 == label)
            .map(|(s, _)| *s)
            .collect();
        let flagged = own
            .iter()
            .filter(|&&s| file.is_ood(LabelId(label), s))
            .count();
        assert_eq!(flagged as f64 / own.len() as f64, want, "class {label}");
    }
    // An unseen label falls back to the global threshold.
    assert_eq!(file.threshold_for(LabelId(7)), file.global.threshold);
    assert!(eval::calibrate(&scores, &labels[1..], 0.05, 50, "fp").is_err());
}

#[test]
fn eval_thresholds_file_checks_fingerprint() {
    let (scores, labels) = three_classes();
    let file = eval::calibrate(&scores, &labels, 0.05, 50, "recipe:pixel-cfg@abc123").unwrap();
    let dir = std::env::temp_dir().join(format!("diffguard-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("thresholds.json");
    file.save(&path).unwrap();
    assert_eq!(
        ThresholdsFile::load(&path, "recipe:pixel-cfg@abc123").unwrap(),
        file
    );

    let err = ThresholdsFile::load(&path, "recipe:pixel-cfg@def456").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, EngineError::Config(_)), "{msg}");
    assert!(msg.contains("abc123") && msg.contains("def456"), "{msg}");

    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace("diffguard-thresholds/1", "diffguard-thresholds/9"),
    )
    .unwrap();
    let err = ThresholdsFile::load(&path, "recipe:pixel-cfg@abc123").unwrap_err();
    assert!(matches!(err, EngineError::Format { .. }), "{err}");
    std::fs::write(&path, "{ not json").unwrap();
    assert!(matches!(
        ThresholdsFile::load(&path, "x"),
        Err(EngineError::Format { .. })
    ));
    assert!(matches!(
        ThresholdsFile::load(&dir.join("missing.json"), "x"),
        Err(EngineError::Io { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}
