//! A diffusers `UNet2DModel` folder runs as the project's pixel UNet, unchanged on disk, and
//! computes what diffusers computes. Fixture: `scripts/golden_diffusers.py` (diffusers 0.42.1,
//! torch 2.15, seeded random weights stored in float16, reference output in float32), committed
//! in `tests/data/diffusers-unet2d/`.

mod models_unet_common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use diffguard_engine::EngineError;
use diffguard_engine::models::diffusers::{self, UNet2DConfig};
use diffguard_engine::models::pixel_unet::PixelUNetConfig;
use models_unet_common::{assert_close, ints};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/diffusers-unet2d")
}

/// A scratch copy of the fixture whose `config.json` is edited by `edit`.
struct Edited(PathBuf);

impl Edited {
    fn new(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Self {
        let dir =
            std::env::temp_dir().join(format!("diffguard-diffusers-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in [diffusers::CONFIG_FILE, diffusers::WEIGHTS_FILE] {
            std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
        }
        let path = dir.join(diffusers::CONFIG_FILE);
        let mut cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut cfg);
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        Self(dir)
    }
}

impl Drop for Edited {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_error(dir: &Path) -> String {
    match diffusers::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// The fixture's configuration is this pixel UNet: two levels of 32 channels, attention at the
/// second (downsampling factor 2) with head dim 16, three classes plus the null label.
#[test]
fn config_translates_to_the_pixel_unet() {
    let cfg = UNet2DConfig::read(&fixture())
        .unwrap()
        .pixel_unet()
        .unwrap();
    assert_eq!(
        cfg,
        PixelUNetConfig {
            image_size: 8,
            in_channels: 3,
            model_channels: 32,
            channel_mult: vec![1, 1],
            num_res_blocks: 2,
            attention_ds: vec![2],
            num_head_channels: 16,
            num_classes: 3,
        }
    );
}

/// ε on three (x, t, label) cases, the null label included, against diffusers' own forward. Both
/// sides are float32 on the same (f16-rounded) weights, so only summation order differs; 1e-4 of
/// the output scale is the bound of every golden test in this crate (the torch-twin parity
/// measured ≈1e-6). A wrong head interleave, a swapped norm or a misplaced block moves the
/// output by O(1).
#[test]
fn diffusers_unet2d_parity() {
    let unet = diffusers::load(&fixture(), DType::F32, &Device::Cpu).unwrap();
    let case =
        candle_core::safetensors::load(fixture().join("case.safetensors"), &Device::Cpu).unwrap();
    let eps = unet
        .forward(&case["x"], &ints(&case["t"]), &ints(&case["y"]))
        .unwrap();
    assert_close(
        "pixel UNet vs diffusers UNet2DModel",
        &eps,
        &case["eps"],
        1e-4,
    );
}

/// Settings that compute something else are refused with the key named, before any tensor is
/// read.
#[test]
fn other_architectures_are_refused_by_key() {
    use serde_json::json;
    let cases: [(&str, &str, serde_json::Value); 6] = [
        ("shift", "resnet_time_scale_shift", json!("default")),
        ("attn-groups", "attn_norm_num_groups", json!(null)),
        ("labels", "num_class_embeds", json!(null)),
        ("flip", "flip_sin_to_cos", json!(false)),
        ("upsample", "upsample_type", json!("conv")),
        ("widths", "block_out_channels", json!([32, 48])),
    ];
    for (name, key, value) in cases {
        let dir = Edited::new(name, |c| c[key] = value);
        let err = load_error(&dir.0);
        assert!(
            err.contains(&format!("`{key}`")) && err.contains("config.json"),
            "{key}: {err}"
        );
    }
    let dir = Edited::new("blocks", |c| {
        c["down_block_types"] = json!(["DownBlock2D", "AttnDownBlock2D"])
    });
    assert!(load_error(&dir.0).contains("`down_block_types`"));
    let dir = Edited::new("attn-mismatch", |c| {
        c["up_block_types"] = json!(["ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"])
    });
    assert!(load_error(&dir.0).contains("disagree on attention"));
}

/// A checkpoint that lacks a tensor, or has one the network does not use, is an error listing it
/// by name: the missing one under the pixel UNet's name, the left-over one under diffusers'.
#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = Edited::new("tensors", |_| {});
    let weights = dir.0.join(diffusers::WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let conv = tensors
        .remove("up_blocks.0.resnets.2.conv2.weight")
        .unwrap();
    tensors.insert("up_blocks.0.resnets.2.conv3.weight".into(), conv);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let err = diffusers::load(&dir.0, DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, EngineError::WeightMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("output_blocks.2.0.out_layers.3.weight"),
        "{text}"
    );
    assert!(
        text.contains("up_blocks.0.resnets.2.conv3.weight"),
        "{text}"
    );
    std::fs::remove_file(&weights).unwrap();
    assert!(load_error(&dir.0).contains(diffusers::WEIGHTS_FILE));
}

/// A bundle whose `denoiser.weights` names a diffusers folder runs it (the fixture's ε comes out
/// of the bundle's denoiser), the folder's weights file is what the fingerprint hashes, and a
/// manifest declaring another architecture than the folder's config is refused, naming both.
#[test]
fn bundle_runs_a_diffusers_folder() {
    use diffguard_engine::bundle::{Bundle, Manifest, write_untrained};
    use diffguard_engine::models::catalog::{SearchPaths, Status, bundle_catalog, check};
    let dir =
        std::env::temp_dir().join(format!("diffguard-diffusers-bundle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut manifest = Manifest::tiny(10, 0);
    manifest.classifier.resnet.in_channels = 3;
    manifest.classifier.resnet.mean = vec![0.5; 3];
    manifest.classifier.resnet.std = vec![0.5; 3];
    write_untrained(&dir, &manifest, 1).unwrap();
    manifest.denoiser.weights = fixture().display().to_string();
    manifest.denoiser.pixel_unet = UNet2DConfig::read(&fixture())
        .unwrap()
        .pixel_unet()
        .unwrap();
    manifest.write(&dir).unwrap();

    let bundle = Bundle::open(&dir, &Device::Cpu).unwrap();
    let case =
        candle_core::safetensors::load(fixture().join("case.safetensors"), &Device::Cpu).unwrap();
    let eps = bundle
        .denoiser
        .forward(&case["x"], &ints(&case["t"]), &ints(&case["y"]))
        .unwrap();
    assert_close("bundle denoiser vs diffusers", &eps, &case["eps"], 1e-4);
    let hash = |p: &Path| diffguard_engine::bundle::hash_file(p).unwrap();
    let expected = diffguard_engine::recipe::fingerprint(
        &manifest.recipe,
        &[
            ("classifier", &hash(&dir.join("classifier.safetensors"))),
            ("denoiser", &hash(&fixture().join(diffusers::WEIGHTS_FILE))),
        ],
    )
    .unwrap();
    assert_eq!(
        bundle.fingerprint, expected,
        "the folder's weights file is hashed"
    );

    // `diffguard models` finds the folder's weights and verifies them through the same loader.
    let paths = SearchPaths::from_env(Default::default(), vec![dir.clone()], |_| None);
    let denoiser = |m: &Manifest| {
        let files = bundle_catalog(Some((&dir, m)));
        check(&files, &paths, true).remove(2)
    };
    let found = denoiser(&manifest);
    assert_eq!(found.status, Status::Ok, "{found:#?}");
    assert_eq!(
        found.path.as_deref(),
        Some(fixture().join(diffusers::WEIGHTS_FILE).as_path())
    );

    manifest.denoiser.pixel_unet.num_res_blocks = 1;
    assert_eq!(denoiser(&manifest).status, Status::Unreadable);
    manifest.write(&dir).unwrap();
    let err = Bundle::open(&dir, &Device::Cpu)
        .err()
        .expect("mismatch refused")
        .to_string();
    assert!(
        err.contains("denoiser.pixel_unet") && err.contains("diffusers folder"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
