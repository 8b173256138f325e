//! The DiffGuard detector behind the guard's `Detector` seam, on a real (untrained, seeded) model
//! bundle: loading, configuration errors, and per-job results for good and bad images.

use std::path::PathBuf;
use std::sync::Arc;

use diffguard::config::DetectorConfig;
use diffguard::guard::{DetectorError, Image, Job, build_detector};
use diffguard_engine::bundle::{Manifest, write_untrained};

fn bundle(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffguard-det-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // 10 DDIM steps, 6 of them inverted: short enough for a debug-build test.
    let manifest = Manifest::tiny(10, 4);
    write_untrained(&dir, &manifest, 3).unwrap();
    dir
}

fn config(dir: &std::path::Path) -> DetectorConfig {
    let mut cfg = DetectorConfig::default();
    cfg.settings.insert(
        "bundle".into(),
        serde_json::Value::String(dir.display().to_string()),
    );
    cfg
}

fn job(width: u32, height: u32, channels: u8, label: u32) -> Job {
    let n = (width * height * u32::from(channels)) as usize;
    Job {
        image: Arc::new(Image {
            width,
            height,
            channels,
            pixels: (0..n).map(|i| (i * 37 % 256) as u8).collect(),
        }),
        label,
        logits: None,
    }
}

#[test]
fn scores_each_job_and_fails_bad_ones_alone() {
    let dir = bundle("score");
    let detector = build_detector(&config(&dir)).unwrap();
    assert_eq!(detector.fingerprint().len(), 64);
    // Gray at the model's size, RGB at another size (resized and converted), and a broken one.
    let mut broken = job(28, 28, 1, 1);
    Arc::get_mut(&mut broken.image).unwrap().pixels.truncate(10);
    let jobs = [job(28, 28, 1, 0), job(40, 30, 3, 9), broken];
    let results = detector.score(&jobs);
    assert_eq!(results.len(), 3);
    for r in &results[..2] {
        let s = r.as_ref().unwrap();
        assert!(s.score.is_finite() && s.score >= 0.0, "{s:?}");
        // Uncalibrated bundle: never OOD.
        assert!(s.threshold.is_infinite() && !s.is_ood());
        assert!(s.diagnostics["denoiser_evals"] > 0.0);
        // The request span's `diffguard.early_stop_step` attribute reads this key.
        let k = s.diagnostics["early_stop_step"];
        assert!((0.0..6.0).contains(&k) && k.fract() == 0.0, "{k}");
    }
    assert!(
        matches!(results[2], Err(DetectorError::InvalidInput(_))),
        "{:?}",
        results[2]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn configuration_errors_name_the_problem() {
    let dir = bundle("config");
    let mut cfg = config(&dir);
    cfg.num_classes = 7;
    let err = build_detector(&cfg).err().unwrap().to_string();
    assert!(
        err.contains("10 classes") && err.contains("num_classes is 7"),
        "{err}"
    );

    let mut cfg = config(&dir);
    cfg.settings
        .insert("device".into(), serde_json::Value::String("tpu".into()));
    let err = build_detector(&cfg).err().unwrap().to_string();
    assert!(err.contains("unknown device `tpu`"), "{err}");

    let cfg = config(&dir.join("nowhere"));
    let err = build_detector(&cfg).err().unwrap().to_string();
    assert!(err.contains("bundle.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
