//! The deployable cascade and the threshold-envelope oracle on cases with known answers.

use diffguard_engine::eval::{self, Cascade};

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
fn eval_cascade_thresholds_from_validation_quantiles() {
    let val: Vec<f64> = (0..100).map(f64::from).collect();
    let c = Cascade::fit(&val, &val, 0.01, 0.5).unwrap();
    // numpy linear quantiles of 0..99: 0.99 and 49.5.
    assert_eq!((c.lo, c.hi), (0.99, 49.5));
    assert!(!c.needs_diffguard(50.0) && !c.needs_diffguard(0.5) && c.needs_diffguard(10.0));
    assert!(c.score_one(60.0, None).is_ok());
    assert!(
        c.score_one(10.0, None).is_err(),
        "the band needs a DiffGuard score"
    );
    assert!(Cascade::fit(&val, &val, 0.6, 0.5).is_err());
}

#[test]
fn eval_cascade_beats_both_components() {
    // The baseline is right about its confident images but confuses two OOD images with two
    // InD ones in its band, where DiffGuard is right; DiffGuard alone fails on the rest.
    let val_b = [0.0, 8.0];
    let val_d = [0.0, 10.0];
    let c = Cascade::fit(&val_b, &val_d, 0.0, 1.0).unwrap();
    assert_eq!((c.lo, c.hi), (0.0, 8.0));
    let (ind_b, ind_d) = ([10.0, 9.0, 5.0, 4.0], [0.0, 0.0, 8.0, 9.0]);
    let (ood_b, ood_d) = ([6.0, 5.5, -10.0, -11.0], [1.0, 2.0, 9.5, 9.5]);
    // Baseline alone: 12 of 16 pairs; DiffGuard alone: 4 of 16.
    assert_eq!(eval::auroc(&ind_b, &ood_b).unwrap(), 0.75);
    assert_eq!(eval::auroc(&ind_d, &ood_d).unwrap(), 0.25);
    let ind = c.score(&ind_b, &ind_d).unwrap();
    let ood = c.score(&ood_b, &ood_d).unwrap();
    assert_eq!(eval::auroc(&ind, &ood).unwrap(), 1.0);
    // Tiers: confident accepts above the band, the band above confident rejects.
    assert!(ind[0] > 2.0 && (1.0..2.0).contains(&ind[2]) && ood[2] < 1.0);
}

#[test]
fn eval_envelope_complementary_detectors() {
    // A catches OOD set X (low a), B catches OOD set Y (low b); each alone is at chance on the
    // union, the AND rule separates everything.
    let ind_a = [5.0, 6.0, 7.0, 8.0];
    let ind_b = [5.0, 6.0, 7.0, 8.0];
    let ood_a = [0.0, 1.0, 10.0, 11.0];
    let ood_b = [10.0, 11.0, 0.0, 1.0];
    assert_eq!(eval::auroc(&ind_a, &ood_a).unwrap(), 0.5);
    let env = eval::threshold_envelope(&ind_a, &ind_b, &ood_a, &ood_b, 1000).unwrap();
    assert_eq!((env.auroc, env.fpr_at_95), (1.0, 0.0));
    assert_eq!((env.fpr[0], env.tpr[0]), (0.0, 0.0));
    assert_eq!(
        (*env.fpr.last().unwrap(), *env.tpr.last().unwrap()),
        (1.0, 1.0)
    );
}

#[test]
fn eval_envelope_dominates_and_reduces_to_one_detector() {
    let (n_ind, n_ood) = (300, 200);
    let noise = uniform(5, 2 * (n_ind + n_ood));
    let ind_a: Vec<f64> = noise[..n_ind].iter().map(|u| u + 0.3).collect();
    let ood_a: Vec<f64> = noise[n_ind..n_ind + n_ood].to_vec();
    let ind_b: Vec<f64> = noise[n_ind + n_ood..2 * n_ind + n_ood]
        .iter()
        .zip(&ind_a)
        .map(|(u, a)| 0.5 * u + 0.5 * a + 0.1)
        .collect();
    let ood_b: Vec<f64> = noise[2 * n_ind + n_ood..]
        .iter()
        .zip(&ood_a)
        .map(|(u, a)| 0.5 * u + 0.5 * a)
        .collect();
    let a = eval::ood_metrics(&ind_a, &ood_a).unwrap();
    let b = eval::ood_metrics(&ind_b, &ood_b).unwrap();
    let env = eval::threshold_envelope(&ind_a, &ind_b, &ood_a, &ood_b, 10_000).unwrap();
    // Envelope vs a component: areas of f64 sums over ≤ 500 points, 1e-12 slack for rounding.
    assert!(
        env.auroc >= a.auroc.max(b.auroc) - 1e-12,
        "{} {a:?} {b:?}",
        env.auroc
    );
    assert!(env.fpr_at_95 <= a.fpr_at_95.min(b.fpr_at_95));
    assert!(env.tpr.windows(2).all(|w| w[0] <= w[1]));

    // A constant second detector adds nothing: the envelope is A's own ROC (distinct scores).
    let flat_ind = vec![0.0; n_ind];
    let flat_ood = vec![0.0; n_ood];
    let alone = eval::threshold_envelope(&ind_a, &flat_ind, &ood_a, &flat_ood, 10_000).unwrap();
    assert!(
        (alone.auroc - a.auroc).abs() <= 1e-12,
        "{} vs {}",
        alone.auroc,
        a.auroc
    );
    assert_eq!(alone.fpr_at_95, a.fpr_at_95);

    // A coarse grid is a subset of thresholds: never better than the full grid, still a curve.
    let coarse = eval::threshold_envelope(&ind_a, &ind_b, &ood_a, &ood_b, 20).unwrap();
    assert!(coarse.auroc <= env.auroc + 1e-12 && coarse.auroc > 0.5);
    assert_eq!(*coarse.tpr.last().unwrap(), 1.0);
    assert!(eval::threshold_envelope(&ind_a, &ind_b[1..], &ood_a, &ood_b, 10).is_err());
}
