//! Resizes, the DSG (Grad-CAM) mask pipeline, PSNR and the early-stop rule against the goldens, and
//! the nearest-gather backward against finite differences.

mod engine_common;

use candle_core::{DType, Device, Tensor};
use diffguard_engine::early_stop::EarlyStop;
use diffguard_engine::guidance::dsg_mask_from_cam;
use diffguard_engine::ops::resize::{NearestGather, bilinear_resize, nearest_indices};
use diffguard_engine::similarity::psnr_code;
use engine_common::{max_abs, max_abs_diff};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn bilinear_matches_torchvision_resize() {
    let Some(case) = engine_common::case("pipeline_gdm") else {
        return;
    };
    // Upscale 28 → 32 of the inputs: config suggested_checks gives 1e-6 (float32 round-off).
    let up = bilinear_resize(&case.f32("x"), 32, 32).unwrap();
    let err = max_abs_diff(&up, &case.f32("x_resized"));
    assert!(err <= 1e-6, "28→32: {err}");
    // Downscale 32 → 28 of the final outputs: [guided, unguided] rows of final_raw become x_guided
    // and x_uncond of that image. Values reach |x|≈1–3, so allow 1e-6 relative.
    for k in 0..2 {
        let raw = case.f32(&format!("img{k}.den.final_raw"));
        let down = bilinear_resize(&raw, 28, 28).unwrap();
        for (row, key) in [(0, "x_guided"), (1, "x_uncond")] {
            let want = case.f32(key).get(k).unwrap();
            let err = max_abs_diff(&down.get(row).unwrap(), &want);
            assert!(
                err <= 1e-6 * max_abs(&want).max(1.0),
                "32→28 img{k} {key}: {err}"
            );
        }
    }
}

#[test]
fn cam_mask_pipeline_matches_gradcam() {
    let Some(case) = engine_common::case("resnet") else {
        return;
    };
    let cam = case.f32("cam.lowres_relu");
    let m = dsg_mask_from_cam(&cam, (64, 64), (16, 16), 3, 0.3).unwrap();
    // cv2 INTER_LINEAR equals torch bilinear to 1e-7 relative (goldens README).
    let want_up = case.f32("cam.upsampled_raw");
    let err = max_abs_diff(&m.upsampled, &want_up);
    assert!(err <= 1e-6 * max_abs(&want_up), "upsampled: {err}");
    let err = max_abs_diff(&m.minmax, &case.f32("cam.minmax"));
    assert!(err <= 1e-6, "minmax: {err}");
    // Closest value to the cut is 5.7e-5 away, so the binary masks must be identical.
    assert_eq!(max_abs_diff(&m.image, &case.get("cam.mask")), 0.0);
    assert_eq!(max_abs_diff(&m.latent, &case.get("cam.mask_latent16")), 0.0);
    assert_eq!(m.latent.dtype(), DType::U8);
}

#[test]
fn ldm_golden_mask_downsample() {
    let Some(case) = engine_common::case("pipeline_ldm") else {
        return;
    };
    // The sampler's 16×16 mask is the 64×64 mask at pixels 0,4,…,60.
    let mask = case.get("cam.mask");
    let g = NearestGather::resize((64, 64), (16, 16), &Device::Cpu).unwrap();
    let got = g.forward(&mask).unwrap();
    assert_eq!(max_abs_diff(&got, &case.get("cam.mask_latent")), 0.0);
    // A negative cut inverts the selection (values below |cut|): complementary except ties.
    let minmax = case.f32("cam.minmax");
    let pos = minmax.gt(0.3).unwrap().to_dtype(DType::F32).unwrap();
    let neg = minmax.lt(0.3).unwrap().to_dtype(DType::F32).unwrap();
    assert_eq!(max_abs(&((pos + neg).unwrap() - 1.0).unwrap()), 0.0);
}

#[test]
fn psnr_and_stop_rule_match_reference() {
    let Some(case) = engine_common::case("pipeline_gdm") else {
        return;
    };
    let samples = case.f32("inv.samples");
    let x0 = case.f32("x_resized");
    let want_psnr = case.f32("inv.psnr");
    let dists = case.f32("inv.dists_sim");
    let stop_sel = case.bools("inv.stop_sel");
    let rule = EarlyStop {
        psnr: 51.12,
        dists: 0.6265,
    };
    let mut k_star = [None, None];
    for j in 0..samples.dim(0).unwrap() {
        let psnr = psnr_code(&samples.get(j).unwrap(), &x0).unwrap();
        let want: Vec<f32> = want_psnr.get(j).unwrap().to_vec1().unwrap();
        let d: Vec<f32> = dists.get(j).unwrap().to_vec1().unwrap();
        for b in 0..2 {
            // config suggested_checks: 1e-3 dB.
            assert!((psnr[b] - want[b] as f64).abs() <= 1e-3, "psnr[{j},{b}]");
            let fires = rule.fires(psnr[b], Some(d[b] as f64));
            assert_eq!(fires, stop_sel[j * 2 + b], "stop_sel[{j},{b}]");
            if fires && k_star[b].is_none() {
                k_star[b] = Some(j as i64);
            }
        }
    }
    let want_k: Vec<i64> = case.vec_i64("k_star");
    assert_eq!(vec![k_star[0].unwrap(), k_star[1].unwrap()], want_k);
}

#[test]
fn nearest_indices_are_legacy_torch() {
    assert_eq!(
        nearest_indices(64, 16),
        (0..16).map(|i| 4 * i).collect::<Vec<u32>>()
    );
    // floor(d·31/28): 28 outputs over 31 inputs skip three source pixels.
    let idx = nearest_indices(31, 28);
    assert_eq!(&idx[..4], &[0, 1, 2, 3]);
    assert_eq!(idx[27], 29);
    assert_eq!(nearest_indices(4, 8), vec![0, 0, 1, 1, 2, 2, 3, 3]);
}

/// L(x) = Σ w ⊙ gather(x): the analytic gradient is backward(w); central differences in f64.
#[test]
fn nearest_gather_backward_matches_finite_differences() {
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(7);
    let (h, w) = (9usize, 10usize);
    let xv: Vec<f64> = (0..2 * h * w).map(|_| rng.random::<f64>() - 0.5).collect();
    for (crop, out) in [
        ((1, 2, 7, 7), (5, 5)),
        ((0, 3, 6, 6), (11, 11)),
        ((0, 0, 9, 10), (4, 13)),
    ] {
        let g = NearestGather::crop_resize((h, w), crop, out, &dev).unwrap();
        let wv: Vec<f64> = (0..2 * out.0 * out.1)
            .map(|_| rng.random::<f64>() - 0.5)
            .collect();
        let wt = Tensor::from_vec(wv, (1, 2, out.0, out.1), &dev).unwrap();
        let loss = |xs: &[f64]| -> f64 {
            let t = Tensor::from_vec(xs.to_vec(), (1, 2, h, w), &dev).unwrap();
            (g.forward(&t).unwrap() * &wt)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let analytic: Vec<f64> = g
            .backward(&wt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let eps = 1e-6;
        for i in 0..xv.len() {
            let mut p = xv.clone();
            let mut m = xv.clone();
            p[i] += eps;
            m[i] -= eps;
            let fd = (loss(&p) - loss(&m)) / (2.0 * eps);
            // The loss is linear in x: FD is exact up to f64 cancellation (~1e-10 here).
            assert!(
                (fd - analytic[i]).abs() <= 1e-8,
                "crop {crop:?} coord {i}: fd {fd} vs {}",
                analytic[i]
            );
        }
    }
}
