//! The recipes end to end on a slice of the real Fashion-MNIST files: output folder layout,
//! exported weights that load into the model, a reported accuracy (or reconstruction PSNR) that
//! recomputes, resumption, and the latent prior trained on the autoencoder's latents.

use std::path::PathBuf;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use diffguard_engine::Autoencoder;
use diffguard_engine::data::{FashionSplit, PixelRange, fashion_mnist};
use diffguard_engine::eval::quality::mse_psnr;
use diffguard_engine::models::pixel_unet::{PixelUNet, PixelUNetConfig};
use diffguard_engine::models::vq::VqConfig;
use diffguard_engine::train::recipes::{
    RecipeArgs, classifier_accuracy, default_fashion_dir, encoded_train_set, fashion_resnet,
    load_autoencoder, load_exported, train_autoencoder, train_classifier, train_diffusion,
    train_latent_diffusion,
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

/// The latent route: the autoencoder recipe exports a continuous autoencoder whose scale factor
/// gives the training latents unit variance and whose reported PSNR recomputes; the latent DDPM
/// then trains on the latents of the images and their mirrors.
#[test]
fn latent_recipes_train_an_autoencoder_then_a_prior_on_its_latents() {
    let Some(mut a) = args("ae", 3) else { return };
    let _ = std::fs::remove_dir_all(&a.out);
    a.test_limit = Some(20);
    let report = train_autoencoder(&a, &VqConfig::fashion_mnist()).unwrap();
    assert_eq!((report.model.as_str(), report.step), ("autoencoder", 3));
    let dev = Device::Cpu;
    let ae = load_autoencoder(&a.out, &dev).unwrap();
    let s = ae.config().scale_factor;
    assert!(s.is_finite() && s > 0.0 && s != 1.0, "scale factor {s}");

    // The scale was measured on the (64) training images: their scaled latents have σ = 1 (f32
    // encodes, f64 statistics: far below 1e-4).
    let z = encoded_train_set(&a, &a.out).unwrap();
    assert_eq!(
        (z.len(), z.chw()),
        (128, (3, 7, 7)),
        "images + mirrors, 7×7×3"
    );
    let train = fashion_mnist(&a.fashion_dir, FashionSplit::Train).unwrap();
    let x = train
        .batch_tensor(&(0..64).collect::<Vec<_>>(), PixelRange::MinusOneOne, &dev)
        .unwrap();
    let std: f64 = ae
        .encode(&x)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .var(0)
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        (std - 1.0).abs() < 1e-4,
        "σ of scaled training latents {std}"
    );

    // decode undoes the scale: the reported PSNR is that of decode(encode(x)) on the test images.
    let test = fashion_mnist(&a.fashion_dir, FashionSplit::Test).unwrap();
    let xt = test
        .batch_tensor(&(0..20).collect::<Vec<_>>(), PixelRange::MinusOneOne, &dev)
        .unwrap();
    let r = ae
        .decode(&ae.encode(&xt).unwrap())
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    let psnr = mse_psnr(&r, &xt).unwrap();
    let mean = psnr.iter().map(|p| p.1).sum::<f64>() / psnr.len() as f64;
    let reported = report.test_recon_psnr.unwrap();
    assert!(
        (mean - reported).abs() < 1e-6,
        "{mean} vs reported {reported}"
    );

    let prior_out = a.out.with_extension("prior");
    let _ = std::fs::remove_dir_all(&prior_out);
    let b = RecipeArgs {
        out: prior_out.clone(),
        steps: 2,
        ..a.clone()
    };
    let unet = PixelUNetConfig {
        model_channels: 32,
        ..PixelUNetConfig::fashion_mnist_latent()
    };
    let report = train_latent_diffusion(&b, &a.out, &unet).unwrap();
    assert_eq!((report.step, report.train_images), (2, 128));
    let vb = load_exported(&prior_out.join("model.safetensors"), &dev).unwrap();
    let model = PixelUNet::new(vb, unet.clone()).unwrap();
    let eps = model
        .forward(
            &Tensor::zeros((2, 3, 7, 7), DType::F32, &dev).unwrap(),
            &[10, 900],
            &[0, 10],
        )
        .unwrap();
    assert_eq!(eps.dims(), &[2, 3, 7, 7]);

    // A UNet that does not take the latents is refused before any training.
    let wrong = PixelUNetConfig {
        image_size: 8,
        ..unet
    };
    let err = train_latent_diffusion(&b, &a.out, &wrong)
        .unwrap_err()
        .to_string();
    assert!(err.contains("3×7²"), "{err}");
    let _ = std::fs::remove_dir_all(&a.out);
    let _ = std::fs::remove_dir_all(&prior_out);
}
