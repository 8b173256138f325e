//! The two recipes end to end on a slice of the real Fashion-MNIST files: output folder layout,
//! exported weights that load into the model, a reported accuracy that recomputes, resumption.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;
use diffguard_engine::data::{FashionSplit, fashion_mnist};
use diffguard_engine::models::pixel_unet::{PixelUNet, PixelUNetConfig};
use diffguard_engine::train::recipes::{
    RecipeArgs, classifier_accuracy, default_fashion_dir, fashion_resnet, load_exported,
    train_classifier, train_diffusion,
};

fn args(tag: &str, steps: u64) -> Option<RecipeArgs> {
    let fashion_dir = default_fashion_dir();
    if !fashion_dir.join("train-images-idx3-ubyte.gz").exists() {
        eprintln!("SKIPPED: no Fashion-MNIST at {}", fashion_dir.display());
        return None;
    }
    let out: PathBuf = std::env::temp_dir().join(format!("dg-recipe-{tag}-{}", std::process::id()));
    Some(RecipeArgs {
        out,
        fashion_dir,
        seed: 3,
        steps,
        batch: 8,
        lr: 1e-3,
        budget: None,
        checkpoint_every: Duration::from_secs(600),
        progress: false,
        train_limit: Some(64),
        test_limit: Some(100),
    })
}

#[test]
fn classifier_recipe_exports_loadable_weights_and_resumes() {
    let Some(mut a) = args("cls", 3) else { return };
    let _ = std::fs::remove_dir_all(&a.out);
    let net = fashion_resnet(vec![4, 8], vec![1, 1]);
    let first = train_classifier(&a, &net).unwrap();
    assert_eq!((first.step, first.train_images), (3, 64));
    a.steps = 5;
    let second = train_classifier(&a, &net).unwrap();
    assert_eq!(second.step, 5, "the second run continues from step 3");
    assert!(second.wall_secs > first.wall_secs);

    // The exported file is what the report measured.
    let vb = load_exported(&a.out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(vb.contains_tensor("fc.weight") && vb.contains_tensor("bn1.running_var"));
    let weights = candle_core::safetensors::load(a.out.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let test = fashion_mnist(&a.fashion_dir, FashionSplit::Test).unwrap();
    let test = test.select(&(0..100).collect::<Vec<_>>()).unwrap();
    let acc = classifier_accuracy(&weights, &net, &test).unwrap();
    assert_eq!(Some(acc), second.test_accuracy);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["widths"], serde_json::json!([4, 8]));
    let _ = std::fs::remove_dir_all(&a.out);
}

#[test]
fn diffusion_recipe_exports_weights_the_unet_loads() {
    let Some(a) = args("ddpm", 2) else { return };
    let _ = std::fs::remove_dir_all(&a.out);
    // GroupNorm has 32 groups, so 32 channels is the smallest width.
    let unet = PixelUNetConfig {
        image_size: 28,
        in_channels: 1,
        model_channels: 32,
        channel_mult: vec![1, 1],
        num_res_blocks: 1,
        attention_ds: vec![],
        num_head_channels: 32,
        num_classes: 10,
    };
    let report = train_diffusion(&a, &unet).unwrap();
    assert_eq!(report.step, 2);
    let vb = load_exported(&a.out.join("model.safetensors"), &Device::Cpu).unwrap();
    let model = PixelUNet::new(vb, unet).unwrap();
    let x =
        candle_core::Tensor::zeros((1, 1, 28, 28), candle_core::DType::F32, &Device::Cpu).unwrap();
    let eps = model.forward(&x, &[500], &[10]).unwrap();
    assert_eq!(eps.dims(), &[1, 1, 28, 28]);
    let _ = std::fs::remove_dir_all(&a.out);
}
