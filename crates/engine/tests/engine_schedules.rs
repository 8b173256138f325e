//! Schedules and respacings against `goldens/schedules` (guided-diffusion / latent-diffusion code).

mod engine_common;

use diffguard_engine::schedule::{BetaSchedule, Respacing, SpacedSchedule, alphas_cumprod};

/// Relative tolerance: the float64 formulas are the reference's, but torch's vectorised linspace
/// and cumprod may round the last bit differently (observed: 1–2 ulp in `ldm.betas`, which cumprod carries on).
fn assert_close(what: &str, got: &[f64], want: &[f64], rel_tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel_tol * w.abs(),
            "{what}[{i}]: got {g}, want {w}"
        );
    }
}

#[test]
fn gdm_schedules_match_guided_diffusion() {
    let Some(case) = engine_common::case("schedules") else {
        return;
    };
    let betas = BetaSchedule::AdmLinear.betas(1000).unwrap();
    // Same float64 formulas in the same order: only last-bit differences are acceptable.
    assert_close("gdm.betas", &betas, &case.vec_f64("gdm.betas"), 1e-15);
    let ac = alphas_cumprod(&betas);
    assert_close("gdm.ac", &ac, &case.vec_f64("gdm.alphas_cumprod"), 1e-14);
    for steps in [100usize, 20, 250, 25] {
        let key = |k: &str| format!("gdm.ddim{steps}.{k}");
        let s = SpacedSchedule::gdm(BetaSchedule::AdmLinear, 1000, steps).unwrap();
        let ts: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(ts, case.vec_i64(&key("timesteps")), "ddim{steps} timesteps");
        assert_close(
            &key("ac"),
            s.alphas_cumprod(),
            &case.vec_f64(&key("alphas_cumprod")),
            1e-14,
        );
        assert_close(
            &key("prev"),
            s.alphas_cumprod_prev(),
            &case.vec_f64(&key("alphas_cumprod_prev")),
            1e-14,
        );
        assert_close(
            &key("next"),
            s.alphas_cumprod_next(),
            &case.vec_f64(&key("alphas_cumprod_next")),
            1e-14,
        );
        let s1m: Vec<f64> = s
            .alphas_cumprod()
            .iter()
            .map(|a| (1.0 - a).sqrt())
            .collect();
        assert_close(
            &key("sqrt1m"),
            &s1m,
            &case.vec_f64(&key("sqrt_one_minus_alphas_cumprod")),
            1e-14,
        );
    }
}

#[test]
fn ldm_schedules_match_latent_diffusion() {
    let Some(case) = engine_common::case("schedules") else {
        return;
    };
    let betas = BetaSchedule::LDM_CIN256.betas(1000).unwrap();
    assert_close("ldm.betas", &betas, &case.vec_f64("ldm.betas"), 1e-15);
    let ac = alphas_cumprod(&betas);
    assert_close("ldm.ac", &ac, &case.vec_f64("ldm.alphas_cumprod"), 1e-14);
    for steps in [25usize, 5, 4] {
        let key = |k: &str| format!("ldm.uniform{steps}.{k}");
        let s = SpacedSchedule::ldm(BetaSchedule::LDM_CIN256, 1000, steps).unwrap();
        let ts: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
        assert_eq!(
            ts,
            case.vec_i64(&key("timesteps")),
            "uniform{steps} timesteps"
        );
        // The sampler's a_i / a_prev are float32 values taken from the float32 ᾱ buffer: exact.
        assert_close(
            &key("a"),
            s.alphas_cumprod(),
            &case.vec_f64(&key("ddim_alphas")),
            0.0,
        );
        assert_close(
            &key("a_prev"),
            s.alphas_cumprod_prev(),
            &case.vec_f64(&key("ddim_alphas_prev")),
            0.0,
        );
    }
    let t25 = Respacing::LdmUniform { steps: 25 }.timesteps(1000).unwrap();
    assert_eq!((t25[0], t25[1], t25[24]), (1, 41, 961));
}
