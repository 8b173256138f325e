//! OOD metrics against hand-computed cases and against scikit-learn.

use diffguard_engine::eval::{self, OodMetrics};

/// Both sides are f64 and differ only in summation order (≤ a few hundred terms of size ≤ 1):
/// agreement to 1e-12 leaves a margin of ~1000 over the accumulated rounding.
const TOL: f64 = 1e-12;

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= TOL, "{what}: {a} vs {b}");
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    ind: Vec<f64>,
    ood: Vec<f64>,
    expected: OodMetrics,
}

#[derive(serde::Deserialize)]
struct Reference {
    sklearn_version: String,
    cases: Vec<Case>,
}

#[test]
fn eval_metrics_match_sklearn() {
    // Vectors and values written by scripts/sklearn_reference.py (scikit-learn, the library of
    // DiffGuard's ood_tester/metrics.py).
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/sklearn_reference.json"
    );
    let reference: Reference = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    assert!(
        reference.cases.len() >= 6,
        "sklearn {}",
        reference.sklearn_version
    );
    for case in &reference.cases {
        let got = eval::ood_metrics(&case.ind, &case.ood).unwrap();
        let e = case.expected;
        close(got.auroc, e.auroc, &format!("{} AUROC", case.name));
        close(got.fpr_at_95, e.fpr_at_95, &format!("{} FPR@95", case.name));
        close(got.aupr_in, e.aupr_in, &format!("{} AUPR-In", case.name));
        close(got.aupr_out, e.aupr_out, &format!("{} AUPR-Out", case.name));
    }
}

#[test]
fn eval_metrics_hand_computed() {
    // Perfect separation.
    let m = eval::ood_metrics(&[0.9, 0.8, 0.7], &[0.1, 0.2]).unwrap();
    assert_eq!(
        (m.auroc, m.fpr_at_95, m.aupr_in, m.aupr_out),
        (1.0, 0.0, 1.0, 1.0)
    );

    // InD {1, .5}, OOD {.5, 0}: pairs 1>.5, 1>0, .5=.5 (½), .5>0 → 3.5/4.
    // ROC (0,0) (0,.5) (.5,1) (1,1): TPR first ≥ .95 at FPR .5.
    // PR (InD +): (r 0, p 1) (.5, 1) (1, 2/3) (1, 1/2) → .5 + .5·(1 + 2/3)/2 = 11/12.
    let m = eval::ood_metrics(&[1.0, 0.5], &[0.5, 0.0]).unwrap();
    close(m.auroc, 0.875, "tiny AUROC");
    close(m.fpr_at_95, 0.5, "tiny FPR@95");
    close(m.aupr_in, 11.0 / 12.0, "tiny AUPR-In");
    close(m.aupr_out, 11.0 / 12.0, "tiny AUPR-Out (mirror image)");

    // Everything tied: one threshold, the diagonal, AUROC ½, FPR@95 = 1; PR (0,1)→(1,2/3) = 5/6.
    let m = eval::ood_metrics(&[0.5, 0.5], &[0.5]).unwrap();
    close(m.auroc, 0.5, "all-tied AUROC");
    close(m.fpr_at_95, 1.0, "all-tied FPR@95");
    close(m.aupr_in, 5.0 / 6.0, "all-tied AUPR-In");

    // sklearn's drop_intermediate: 18 InD at 10, then {InD, OOD} at 5, {InD, OOD} at 4, 18 OOD
    // at 0. Points (0,.9) (.05,.95) (.1,1) are collinear, the middle one is dropped, so the first
    // point with TPR ≥ .95 is (.1, 1): FPR@95 = 0.1, not 0.05.
    let ind: Vec<f64> = [vec![10.0; 18], vec![5.0, 4.0]].concat();
    let ood: Vec<f64> = [vec![5.0, 4.0], vec![0.0; 18]].concat();
    close(
        eval::fpr_at_tpr(&ind, &ood, 0.95).unwrap(),
        0.1,
        "collinear FPR@95",
    );
    let roc = eval::roc_curve(&ind, &ood).unwrap();
    assert_eq!(roc.fpr, [0.0, 0.0, 0.1, 1.0]);
    assert_eq!(roc.tpr, [0.0, 0.9, 1.0, 1.0]);
    assert_eq!(roc.thresholds[0], f64::INFINITY);
}

/// Tie-aware Mann–Whitney by brute force: P(ind > ood) + ½ P(ind = ood).
fn mann_whitney(ind: &[f64], ood: &[f64]) -> f64 {
    let mut s = 0.0;
    for a in ind {
        for b in ood {
            s += if a > b {
                1.0
            } else if a == b {
                0.5
            } else {
                0.0
            };
        }
    }
    s / (ind.len() * ood.len()) as f64
}

#[test]
fn eval_auroc_is_tie_aware_mann_whitney() {
    // Small integers → many ties, from a fixed LCG so the case is reproducible.
    let mut state = 12345u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % 7) as f64
    };
    let ind: Vec<f64> = (0..300).map(|_| next() + 1.0).collect();
    let ood: Vec<f64> = (0..200).map(|_| next()).collect();
    let a = eval::auroc(&ind, &ood).unwrap();
    close(a, mann_whitney(&ind, &ood), "AUROC vs Mann–Whitney");
    close(a + eval::auroc(&ood, &ind).unwrap(), 1.0, "AUROC symmetry");
    // The two AUPRs exchange roles when the classes and the sign swap.
    let neg = |v: &[f64]| v.iter().map(|x| -x).collect::<Vec<_>>();
    let m = eval::ood_metrics(&ind, &ood).unwrap();
    let swapped = eval::ood_metrics(&neg(&ood), &neg(&ind)).unwrap();
    close(m.aupr_in, swapped.aupr_out, "AUPR swap");
}

#[test]
fn eval_metrics_reject_bad_input() {
    assert!(eval::ood_metrics(&[], &[0.1]).is_err());
    assert!(eval::ood_metrics(&[0.1], &[]).is_err());
    assert!(eval::ood_metrics(&[0.1, f64::NAN], &[0.0]).is_err());
    // Infinite scores are legitimate (ln MSP can underflow to −∞) and rank normally.
    close(
        eval::auroc(&[f64::INFINITY], &[f64::NEG_INFINITY]).unwrap(),
        1.0,
        "infinite",
    );
}

#[test]
fn eval_results_table_markdown() {
    let m = |auroc, fpr_at_95| OodMetrics {
        auroc,
        fpr_at_95,
        aupr_in: 0.5,
        aupr_out: 0.5,
    };
    let mut table = eval::ResultsTable::new(vec!["MNIST".into(), "Animal".into()]);
    table.push("MSP", vec![m(0.9, 0.4), m(0.8, 0.6)]).unwrap();
    table
        .push("DiffGuard", vec![m(0.95, 0.5), m(0.7, 0.3)])
        .unwrap();
    assert!(table.push("bad", vec![m(0.5, 0.5)]).is_err());
    let avg = eval::ResultsTable::average(&table.rows[1]);
    close(avg.auroc, 0.825, "average AUROC");
    close(avg.fpr_at_95, 0.4, "average FPR@95");
    let want = "\
| Method | MNIST AUROC↑ / FPR@95↓ | Animal AUROC↑ / FPR@95↓ | Average AUROC↑ / FPR@95↓ |
|---|---|---|---|
| MSP | 90.00 / **40.00** | **80.00** / 60.00 | **85.00** / 50.00 |
| DiffGuard | **95.00** / 50.00 | 70.00 / **30.00** | 82.50 / **40.00** |
";
    assert_eq!(table.to_markdown(), want);
}
