//! `diffguard models` as a user runs it: the real binary, a scratch HOME / models directory /
//! Hugging Face cache, golden checkpoints (official tensor names) and an engine-written bundle.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diffguard_engine::bundle::{Manifest, write_untrained};
use diffguard_engine::recipe::PixelCfgRecipe;
use serde_json::Value;

const ADM_URL: &str =
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt";

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "diffguard-models-cli-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("models")).unwrap();
        Self(dir)
    }
    fn models(&self) -> PathBuf {
        self.0.join("models")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn goldens() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/goldens");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: {} is absent", dir.display());
        None
    }
}

/// Runs `diffguard models ARGS` with the scratch folder as HOME, models dir and HF home, and none
/// of the caller's DiffGuard / Hugging Face variables.
fn models(s: &Scratch, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_diffguard"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("DIFFGUARD_") || k.starts_with("HF_") {
            cmd.env_remove(k);
        }
    }
    cmd.arg("models")
        .args(args)
        .env("HOME", &s.0)
        .env("HF_HOME", s.0.join("hf"))
        .env("DIFFGUARD_MODELS", s.models())
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o).0))
}

#[test]
fn missing_files_name_their_download_url() {
    let s = Scratch::new("missing");
    let out = models(&s, &["--recipe", "gdm"]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "missing files must fail the command");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("diffusion"))
        .unwrap_or_else(|| panic!("no diffusion row:\n{stdout}"));
    assert!(line.contains("missing") && line.contains(ADM_URL), "{line}");
    assert!(
        stdout.contains(&format!("looked in: {}", s.models().display())),
        "{stdout}"
    );
    assert!(stderr.contains("gdm:diffusion missing"), "{stderr}");
}

#[test]
fn json_reports_found_and_missing_files() {
    let Some(g) = goldens() else { return };
    let s = Scratch::new("json");
    let resnet = s.models().join("resnet50-0676ba61.pth");
    std::fs::copy(g.join("resnet/weights.safetensors"), &resnet).unwrap();
    let out = models(&s, &["--recipe", "gdm", "--json"]);
    let v = json(&out);
    let reports = v.as_array().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["recipe"], "gdm");
    assert_eq!(reports[0]["models_dir"], s.models().display().to_string());
    let files = reports[0]["files"].as_array().unwrap();
    let roles: Vec<&str> = files.iter().map(|f| f["role"].as_str().unwrap()).collect();
    assert_eq!(
        roles,
        ["diffusion", "classifier", "dists-vgg16", "dists-weights"]
    );
    assert_eq!(files[1]["status"], "found");
    assert_eq!(files[1]["path"], resnet.display().to_string());
    assert_eq!(files[0]["status"], "missing");
    assert_eq!(files[0]["sources"][0]["url"], ADM_URL);
    assert!(!out.status.success());

    // Every recipe when none is named.
    let v = json(&models(&s, &["--json"]));
    let recipes: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["recipe"].as_str().unwrap())
        .collect();
    assert_eq!(recipes, ["gdm", "ldm", "bundle"]);
}

/// With nothing configured, the bundle catalog is the default bundle `diffguard serve` loads: the
/// latent one, its four files (the autoencoder included) found in the source tree and, verified,
/// fitting the architectures its `bundle.json` declares.
#[test]
fn default_bundle_is_listed_with_its_autoencoder() {
    let s = Scratch::new("default-bundle");
    let out = models(&s, &["--recipe", "bundle", "--verify", "--json"]);
    let v = json(&out);
    let files = v[0]["files"].as_array().unwrap();
    let roles: Vec<&str> = files.iter().map(|f| f["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["bundle", "classifier", "denoiser", "autoencoder"]);
    let default =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(diffguard_engine::bundle::DEFAULT_BUNDLE);
    for f in files {
        assert_eq!(f["status"], "ok", "{f}");
        assert!(
            Path::new(f["path"].as_str().unwrap()).starts_with(&default),
            "{f}"
        );
    }
    assert!(out.status.success(), "{}", text(&out).1);
}

#[test]
fn verify_lists_the_mismatched_tensors() {
    let Some(g) = goldens() else { return };
    let s = Scratch::new("verify");
    // The golden ResNet has one Bottleneck per stage: not a ResNet-50.
    std::fs::copy(
        g.join("resnet/weights.safetensors"),
        s.models().join("resnet50-0676ba61.pth"),
    )
    .unwrap();
    let v = json(&models(&s, &["--recipe", "ldm", "--verify", "--json"]));
    let classifier = &v[0]["files"][1];
    assert_eq!(classifier["status"], "mismatch");
    let missing = &classifier["verification"]["parts"][0]["missing"];
    assert!(
        missing
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "layer1.1.conv1.weight"),
        "{missing}"
    );
    let (stdout, _) = text(&models(&s, &["--recipe", "ldm", "--verify"]));
    let row = stdout
        .lines()
        .find(|l| l.starts_with("classifier"))
        .unwrap();
    assert!(row.contains("mismatch"), "{row}");
    // ResNet-50 has [3, 4, 6, 3] blocks, the golden one per stage: 12 blocks x 15 tensors.
    assert!(
        stdout.contains("180 missing (layer1.1.bn1.bias, "),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 wrong shape (fc.bias model [1000] vs file [10]"),
        "{stdout}"
    );
}

#[test]
fn explicit_file_is_final() {
    let Some(g) = goldens() else { return };
    let s = Scratch::new("explicit");
    std::fs::copy(
        g.join("resnet/weights.safetensors"),
        s.models().join("resnet50-0676ba61.pth"),
    )
    .unwrap();
    let typo = s.0.join("no-such.pth");
    let arg = format!("classifier={}", typo.display());
    let v = json(&models(&s, &["--recipe", "gdm", "--file", &arg, "--json"]));
    let classifier = &v[0]["files"][1];
    assert_eq!(classifier["status"], "missing");
    assert_eq!(
        classifier["tried"],
        serde_json::json!([typo.display().to_string()])
    );
    let out = models(&s, &["--recipe", "gdm", "--file", "nosuchrole=/x"]);
    assert!(text(&out).1.contains("has no role `nosuchrole`"));
}

#[test]
fn verified_bundle_passes() {
    let s = Scratch::new("bundle");
    let bundle = s.0.join("bundle");
    let recipe = PixelCfgRecipe::default();
    let manifest = Manifest::tiny(recipe.ddim_steps, recipe.early_stop_steps);
    write_untrained(&bundle, &manifest, 3).unwrap();
    let b = bundle.display().to_string();
    let out = models(&s, &["--recipe", "pixel-cfg", "--bundle", &b, "--verify"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.contains(" ok ")).count(),
        3,
        "{stdout}"
    );

    // The bundle a guard config names is the one looked at, as `diffguard serve` would load it.
    let default =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml"))
            .unwrap();
    let config = s.0.join("guard.toml");
    let toml = format!("{default}\n[detector.settings]\nbundle = {b:?}\n");
    std::fs::write(&config, toml).unwrap();
    let c = config.display().to_string();
    let v = json(&models(
        &s,
        &["--recipe", "pixel-cfg", "--config", &c, "--json"],
    ));
    for f in v[0]["files"].as_array().unwrap() {
        assert_eq!(f["status"], "found", "{f}");
        assert!(f["path"].as_str().unwrap().starts_with(&b), "{f}");
    }
}

#[cfg(not(feature = "fetch"))]
#[test]
fn fetch_without_the_feature_explains_how() {
    let s = Scratch::new("fetch");
    let out = models(&s, &["fetch", "--recipe", "gdm"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("--features fetch"), "{stderr}");
    assert!(stderr.contains(ADM_URL), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}/256x256_diffusion_uncond.pt",
            s.models().display()
        )),
        "{stderr}"
    );
}
