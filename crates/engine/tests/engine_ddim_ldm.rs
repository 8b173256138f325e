//! LDM DDIM inversion and masked-CFG sampling steps replayed against `goldens/pipeline_ldm`:
//! every step is fed the recorded ε and the recorded input latent, so only the step arithmetic is
//! under test.

mod engine_common;

use diffguard_engine::ddim::{cfg_eps, ldm_step};
use diffguard_engine::schedule::{BetaSchedule, SpacedSchedule};
use engine_common::{max_abs, max_abs_diff};

/// Each replayed step is float32 arithmetic on identical inputs; the reference's own float32 vs
/// float64 run differs by 1.1e-5 on z_inverted after 5 steps (config tolerances_observed), so a
/// single step must agree to a few 1e-6 relative to the latent's magnitude.
const STEP_REL_TOL: f64 = 5e-6;

#[test]
fn ldm_inversion_steps_replay() {
    let Some(case) = engine_common::case("pipeline_ldm") else {
        return;
    };
    let sched = SpacedSchedule::ldm(BetaSchedule::LDM_CIN256, 1000, 5).unwrap();
    let ts: Vec<i64> = sched.timesteps().iter().map(|&t| t as i64).collect();
    assert_eq!(ts, case.vec_i64("inv.t"));
    let eps = case.f32("inv.eps");
    let latents = case.f32("inv.latents");
    let mut z = case.f32("prequant");
    for i in 0..sched.len() {
        let from = sched.alpha_bar_prev(i).unwrap();
        let to = sched.alpha_bar(i).unwrap();
        let got = ldm_step(&z, &eps.get(i).unwrap(), &[from], &[to]).unwrap();
        let want = latents.get(i).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(
            err <= STEP_REL_TOL * max_abs(&want),
            "inversion step {i}: max abs err {err}"
        );
        z = want;
    }
    assert!(max_abs_diff(&z, &case.f32("z_inverted")) == 0.0);
}

#[test]
fn ldm_masked_cfg_steps_replay() {
    let Some(case) = engine_common::case("pipeline_ldm") else {
        return;
    };
    let sched = SpacedSchedule::ldm(BetaSchedule::LDM_CIN256, 1000, 5).unwrap();
    let den_t = case.vec_i64("den.t");
    let mask = case.get("cam.mask_latent");
    let (x_in, e_null, e_cond, latents) = (
        case.f32("den.x_in"),
        case.f32("den.eps_null"),
        case.f32("den.eps_cond"),
        case.f32("den.latents"),
    );
    let n = sched.len();
    for (k, &t) in den_t.iter().enumerate() {
        let i = n - 1 - k;
        assert_eq!(sched.timestep(i).unwrap() as i64, t);
        let eps = cfg_eps(
            &e_null.get(k).unwrap(),
            &e_cond.get(k).unwrap(),
            10.0,
            Some(&mask),
        )
        .unwrap();
        let got = ldm_step(
            &x_in.get(k).unwrap(),
            &eps,
            &[sched.alpha_bar(i).unwrap()],
            &[sched.alpha_bar_prev(i).unwrap()],
        )
        .unwrap();
        let want = latents.get(k).unwrap();
        let err = max_abs_diff(&got, &want);
        assert!(
            err <= STEP_REL_TOL * max_abs(&want),
            "sampling step {k} (t={t}): max abs err {err}, max |z| {}",
            max_abs(&want)
        );
    }
    // The mask must matter in this golden: with it off the steps would differ.
    let unmasked = cfg_eps(&e_null.get(0).unwrap(), &e_cond.get(0).unwrap(), 10.0, None).unwrap();
    let masked = cfg_eps(
        &e_null.get(0).unwrap(),
        &e_cond.get(0).unwrap(),
        10.0,
        Some(&mask),
    )
    .unwrap();
    assert!(max_abs_diff(&unmasked, &masked) > 1e-3);
}

#[test]
fn per_item_coefficients_equal_separate_calls() {
    let Some(case) = engine_common::case("pipeline_ldm") else {
        return;
    };
    let sched = SpacedSchedule::ldm(BetaSchedule::LDM_CIN256, 1000, 5).unwrap();
    let z = case.f32("prequant");
    let eps = case.f32("inv.eps").get(2).unwrap();
    let (a, b) = (sched.alpha_bar(1).unwrap(), sched.alpha_bar(3).unwrap());
    let both = ldm_step(&z, &eps, &[a, b], &[b, a]).unwrap();
    for (i, (f, t)) in [(a, b), (b, a)].into_iter().enumerate() {
        let one = ldm_step(
            &z.narrow(0, i, 1).unwrap(),
            &eps.narrow(0, i, 1).unwrap(),
            &[f],
            &[t],
        )
        .unwrap();
        let err = max_abs_diff(&both.narrow(0, i, 1).unwrap(), &one);
        assert!(err <= 1e-6 * max_abs(&one), "item {i}: {err}");
    }
}
