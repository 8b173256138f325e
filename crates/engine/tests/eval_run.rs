//! The evaluation and calibration runners end to end on an untrained tiny bundle and tiny real
//! subsets: every output file, the report's gallery, resuming from the score cache, and the
//! calibration's achieved false-reject rate on the scores it computed.

use std::path::{Path, PathBuf};

use candle_core::Device;
use diffguard_engine::bundle::{Bundle, Manifest, write_untrained};
use diffguard_engine::data::data_dir;
use diffguard_engine::eval::ThresholdsFile;
use diffguard_engine::eval::calibration::{
    CalibrationConfig, calibrate_bundle, install_thresholds,
};
use diffguard_engine::eval::report::{GALLERY_IMG_CLASS, write_outputs};
use diffguard_engine::eval::run::{DetectorKind, EvalConfig, EvalResults, evaluate};
use diffguard_engine::eval::variants::variants;
use diffguard_engine::recipe::Recipe;

fn tiny_manifest() -> Manifest {
    // 6 DDIM steps, 3 inverted: a short trajectory that still runs every stage.
    Manifest::tiny(6, 3)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffguard-evalrun-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The data folder, or None (with a loud note) when scripts/fetch-data.sh has not run.
fn data() -> Option<PathBuf> {
    let d = data_dir();
    for sub in ["fashion-mnist", "mnist/digits", "animal-mnist", "foolbox"] {
        if !d.join(sub).exists() {
            eprintln!(
                "SKIPPED: no {} under {} (run scripts/fetch-data.sh or set DIFFGUARD_DATA)",
                sub,
                d.display()
            );
            return None;
        }
    }
    Some(d)
}

/// A ROOT/CLASS/IMAGE folder of CIFAR-10 fixtures (32×32 RGB: the loader must resize and grey them).
fn cifar_folder(data: &Path, root: &Path) -> PathBuf {
    let dir = root.join("cifar");
    for entry in std::fs::read_dir(data.join("foolbox")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix("cifar10_") {
            let label = rest
                .trim_end_matches(".png")
                .rsplit('_')
                .next()
                .unwrap()
                .to_string();
            std::fs::create_dir_all(dir.join(&label)).unwrap();
            std::fs::copy(&path, dir.join(&label).join(&name)).unwrap();
        }
    }
    dir
}

fn config(data: PathBuf, folder: PathBuf) -> EvalConfig {
    let mut cfg = EvalConfig::new(data);
    cfg.per_set = Some(4);
    cfg.val_size = Some(4);
    cfg.bank_size = 64;
    cfg.knn_k = 5;
    cfg.ood_folders = vec![folder];
    // One variant keeps the test fast; the others are recipe overrides (tested below).
    cfg.variants = vec!["recipe".into()];
    cfg.batch_size = 8;
    cfg.gallery_per_end = 1;
    cfg.progress = false;
    cfg
}

fn diffguard_rows(r: &EvalResults) -> Vec<(String, Vec<f64>)> {
    r.detectors
        .iter()
        .filter(|d| d.kind != DetectorKind::Baseline)
        .map(|d| (d.name.clone(), d.metrics.iter().map(|m| m.auroc).collect()))
        .collect()
}

#[test]
fn eval_writes_every_output_and_resumes_from_the_cache() {
    let Some(data) = data() else { return };
    let root = scratch("eval");
    let bundle_dir = root.join("bundle");
    write_untrained(&bundle_dir, &tiny_manifest(), 7).unwrap();
    let bundle = Bundle::open(&bundle_dir, &Device::Cpu).unwrap();
    let cfg = config(data.clone(), cifar_folder(&data, &root));
    let out = root.join("out");
    let cache = root.join("scores.jsonl");

    let first = evaluate(&bundle, &cfg, &cache).unwrap();
    assert_eq!(first.ood_sets, ["mnist", "animal-mnist", "folder:cifar"]);
    for n in first.set_sizes.values() {
        assert_eq!(*n, 4);
    }
    // 5 baselines, 1 DiffGuard variant, a cascade and an oracle per baseline.
    assert_eq!(first.detectors.len(), 5 + 1 + 5 + 5);
    for d in &first.detectors {
        assert_eq!(d.metrics.len(), 3, "{}", d.name);
        for m in &d.metrics {
            assert!(
                (0.0..=1.0).contains(&m.auroc),
                "{} auroc {}",
                d.name,
                m.auroc
            );
        }
    }
    // Four sets × 4 images, plus 4 validation images.
    let expected = 4 * 4 + 4;
    assert_eq!((first.cache.computed, first.cache.cached), (expected, 0));

    write_outputs(&first, &out, "test").unwrap();
    for f in ["results.json", "results.md", "roc.png", "report.html"] {
        let len = std::fs::metadata(out.join(f)).unwrap().len();
        assert!(len > 100, "{f} is {len} bytes");
    }
    let roc = image::open(out.join("roc.png")).unwrap();
    assert!(roc.width() > 3 * 300, "one panel per OOD set");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(
        json["detectors"].as_array().unwrap().len(),
        first.detectors.len()
    );
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("| MSP |") && md.contains("envelope oracle, eval-only"));

    // The gallery: 1 image per end, 2 ends, 4 sets; input + synthesis + difference each.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    let claimed: usize = html
        .split("data-count=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .parse()
        .unwrap();
    let tag = format!("<img class=\"{GALLERY_IMG_CLASS}\"");
    let found = html.matches(&tag).count();
    assert_eq!(claimed, found);
    assert_eq!(found, 2 * 4 * 3);
    assert_eq!(
        html.matches("src=\"data:image/png;base64,iVBORw0KGgo")
            .count(),
        found + 1,
        "every image (gallery + ROC) is an inlined PNG"
    );

    // A second run computes nothing and reproduces the DiffGuard rows exactly.
    let second = evaluate(&bundle, &cfg, &cache).unwrap();
    assert_eq!((second.cache.computed, second.cache.cached), (0, expected));
    assert_eq!(diffguard_rows(&first), diffguard_rows(&second));

    // An interrupted run: half the cache survives, the last line torn mid-write.
    let text = std::fs::read_to_string(&cache).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    let keep = lines.len() / 2;
    let torn = &lines[keep][..lines[keep].len() / 2];
    std::fs::write(&cache, format!("{}\n{torn}", lines[..keep].join("\n"))).unwrap();
    let third = evaluate(&bundle, &cfg, &cache).unwrap();
    assert_eq!(third.cache.cached, keep);
    assert_eq!(third.cache.computed, expected - keep);
    assert_eq!(diffguard_rows(&first), diffguard_rows(&third));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn calibration_hits_its_target_on_the_scores_it_computed() {
    let Some(data) = data() else { return };
    let root = scratch("calibrate");
    let bundle_dir = root.join("bundle");
    write_untrained(&bundle_dir, &tiny_manifest(), 7).unwrap();
    let bundle = Bundle::open(&bundle_dir, &Device::Cpu).unwrap();
    let mut cfg = CalibrationConfig::new(data);
    cfg.val_size = Some(20);
    cfg.target_false_reject_rate = 0.25;
    cfg.min_per_class = 1;
    cfg.batch_size = 20;
    cfg.progress = false;
    let cache = root.join("val.jsonl");
    let cal = calibrate_bundle(&bundle, &cfg, &cache).unwrap();
    assert_eq!(cal.scores.len(), 20);
    assert_eq!(cal.cache.computed, 20);

    let t = &cal.thresholds;
    assert_eq!(t.detector_fingerprint, bundle.fingerprint);
    let frr = |scores: &[f64], threshold: f64| {
        scores.iter().filter(|&&s| -s > threshold).count() as f64 / scores.len() as f64
    };
    let global = frr(&cal.scores, t.global.threshold);
    assert_eq!(global, t.global.achieved_false_reject_rate);
    // The highest threshold not above the target: at most the target, and within one image of it
    // (one image more would exceed it), unless ties with the threshold image stop it short.
    assert!(
        (0.25 - 1.0 / 20.0..=0.25).contains(&global),
        "global FRR {global}"
    );
    for (label, c) in &t.per_class {
        let mine: Vec<f64> = cal
            .scores
            .iter()
            .zip(&cal.predicted)
            .filter(|(_, p)| p.0 == *label)
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(mine.len(), c.samples);
        assert_eq!(frr(&mine, c.threshold), c.achieved_false_reject_rate);
        assert!(c.achieved_false_reject_rate <= 0.25, "class {label}");
    }

    // Installed in the bundle, the file opens with it; a rerun reuses every score.
    t.save(&bundle_dir.join("thresholds.json")).unwrap();
    install_thresholds(&bundle_dir, "thresholds.json").unwrap();
    let reopened = Bundle::open(&bundle_dir, &Device::Cpu).unwrap();
    assert_eq!(reopened.thresholds.as_ref(), Some(t));
    ThresholdsFile::load(&bundle_dir.join("thresholds.json"), &bundle.fingerprint).unwrap();
    let again = calibrate_bundle(&reopened, &cfg, &cache).unwrap();
    assert_eq!((again.cache.computed, again.cache.cached), (0, 20));
    assert_eq!(&again.thresholds, t);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn variants_follow_the_recipe() {
    let base = tiny_manifest().recipe;
    let all = variants(&base, &[]).unwrap();
    let ids: Vec<&str> = all.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["recipe", "dsg", "clean-grad", "aes"]);
    assert_eq!(all[0].recipe, base);
    let Recipe::PixelCfg(p) = &all[1].recipe else {
        panic!()
    };
    assert!(!p.use_cam);
    let Recipe::PixelCfg(p) = &all[2].recipe else {
        panic!()
    };
    assert!(p.classifier_scale > 0.0);
    let Recipe::PixelCfg(p) = &all[3].recipe else {
        panic!()
    };
    assert!(p.early_stop.enabled());

    // Without the mask, `dsg` adds it (the old id `no-dsg` is the same toggle).
    let mut plain = base.clone();
    if let Recipe::PixelCfg(p) = &mut plain {
        p.use_cam = false;
    }
    for id in ["dsg", "no-dsg"] {
        let v = variants(&plain, &[id.into()]).unwrap();
        let Recipe::PixelCfg(p) = &v[1].recipe else {
            panic!()
        };
        assert!(p.use_cam, "{id}");
        assert_eq!(v[1].name, "DiffGuard + DSG mask");
    }
    // The latent recipe (no mask, no classifier guidance, no early stop) gets only the mask.
    let latent = diffguard_engine::bundle::Manifest::tiny_latent(10).recipe;
    let ids: Vec<String> = variants(&latent, &[])
        .unwrap()
        .into_iter()
        .map(|v| v.id)
        .collect();
    assert_eq!(ids, ["recipe", "dsg"]);
    assert!(variants(&latent, &["aes".into()]).is_err());
    assert!(variants(&base, &["bogus".into()]).is_err());
}
