//! `diffguard train` as a user runs it: the real binary on the real Fashion-MNIST files, a few
//! steps on a small subset, then a resume with more steps, and bad flags rejected by name.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fashion_dir() -> Option<PathBuf> {
    let root = std::env::var_os("DIFFGUARD_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("data"));
    let dir = root.join("fashion-mnist");
    if dir.join("train-images-idx3-ubyte.gz").is_file() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: no Fashion-MNIST at {} (run scripts/fetch-data.sh)",
            dir.display()
        );
        None
    }
}

fn train(out: &Path, fashion: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffguard"))
        .args(["train", "classifier", "--no-progress", "--out"])
        .arg(out)
        .arg("--fashion")
        .arg(fashion)
        .args([
            "--widths", "8,16", "--layers", "1,1", "--batch", "8", "--limit", "64",
        ])
        .args(["--test-limit", "50", "--checkpoint-mins", "0.1"])
        .args(extra)
        .output()
        .expect("run diffguard train")
}

fn report(out: &Path) -> serde_json::Value {
    let bytes = std::fs::read(out.join("train-report.json")).expect("train-report.json");
    serde_json::from_slice(&bytes).expect("report is JSON")
}

#[test]
fn train_classifier_runs_resumes_and_reports() {
    let Some(fashion) = fashion_dir() else { return };
    let out = std::env::temp_dir().join(format!("diffguard-train-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);

    let first = train(&out, &fashion, &["--steps", "2"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(report(&out)["step"], 2);
    assert!(out.join("model.safetensors").is_file());
    assert!(out.join("config.json").is_file());

    // Same settings, more steps: continues from the checkpoint instead of starting over.
    let second = train(&out, &fashion, &["--steps", "4"]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let r = report(&out);
    assert_eq!(
        (r["step"].as_u64(), r["total_steps"].as_u64()),
        (Some(4), Some(4))
    );
    let acc = r["test_accuracy"].as_f64().expect("test accuracy");
    assert!((0.0..=1.0).contains(&acc));
    assert!(String::from_utf8_lossy(&second.stdout).contains("test accuracy"));

    // A different seed is another run: the checkpoint refuses it rather than mixing the two.
    let clash = train(&out, &fashion, &["--steps", "6", "--seed", "1"]);
    assert!(!clash.status.success());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_training_flags_are_named() {
    let out = std::env::temp_dir().join(format!("diffguard-train-bad-{}", std::process::id()));
    let missing = std::env::temp_dir().join("diffguard-no-such-data-dir");
    let neg = train(&out, &missing, &["--budget-mins=-1"]);
    assert!(!neg.status.success());
    let err = String::from_utf8_lossy(&neg.stderr);
    assert!(err.contains("--budget-mins"), "{err}");

    let no_data = train(&out, &missing, &["--steps", "1"]);
    assert!(!no_data.status.success());
    let err = String::from_utf8_lossy(&no_data.stderr);
    assert!(
        err.contains("diffguard-no-such-data-dir") && !err.contains("panicked"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

fn run(args: &[&str], out: &Path, fashion: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diffguard"))
        .args(["train"])
        .args(args)
        .args([
            "--no-progress",
            "--batch",
            "8",
            "--limit",
            "32",
            "--steps",
            "2",
        ])
        .arg("--out")
        .arg(out)
        .arg("--fashion")
        .arg(fashion)
        .output()
        .expect("run diffguard train")
}

/// The latent route from the command line: an autoencoder, then a latent prior on its latents; a
/// missing autoencoder folder is an error that names it.
#[test]
fn train_autoencoder_then_latent_diffusion() {
    let Some(fashion) = fashion_dir() else { return };
    let tmp = std::env::temp_dir().join(format!("diffguard-train-latent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let (ae, prior) = (tmp.join("ae"), tmp.join("prior"));

    let out = run(&["autoencoder", "--test-limit", "10"], &ae, &fashion);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("test reconstruction"));
    let r = report(&ae);
    assert_eq!(
        (r["model"].as_str(), r["step"].as_u64()),
        (Some("autoencoder"), Some(2))
    );
    assert!(r["test_recon_psnr"].as_f64().is_some_and(f64::is_finite));

    let latent = ae.to_str().unwrap();
    let out = run(
        &["diffusion", "--latent", latent, "--channels", "32"],
        &prior,
        &fashion,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&prior);
    assert_eq!(r["model"].as_str(), Some("latent-ddpm"));
    assert_eq!(
        r["train_images"].as_u64(),
        Some(64),
        "32 images and their mirrors"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(prior.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (
            config["image_size"].as_u64(),
            config["in_channels"].as_u64()
        ),
        (Some(7), Some(3))
    );

    let missing = tmp.join("no-autoencoder-here");
    let out = run(
        &["diffusion", "--latent", missing.to_str().unwrap()],
        &tmp.join("p2"),
        &fashion,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-autoencoder-here") && !err.contains("panicked"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
