//! A bundle folder round trip: written with seeded, untrained weights, opened through the checked
//! loader, fingerprinted, and run end to end on real Fashion-MNIST test images.

use std::path::PathBuf;

use candle_core::Device;
use diffguard_engine::bundle::{Bundle, Manifest, write_untrained};
use diffguard_engine::data::{FashionSplit, PixelRange, data_dir, fashion_mnist};
use diffguard_engine::recipe::{LdmRecipe, Recipe, Reference};

fn tiny_manifest() -> Manifest {
    // A short trajectory keeps the test fast: 10 DDIM steps, 6 of them inverted.
    Manifest::tiny(10, 4)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffguard-bundle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn untrained_bundle_loads_and_scores_real_images() {
    let dir = scratch("score");
    write_untrained(&dir, &tiny_manifest(), 7).unwrap();
    let bundle = Bundle::open(&dir, &Device::Cpu).unwrap();
    assert_eq!(bundle.fingerprint.len(), 64);

    let fashion = data_dir().join("fashion-mnist");
    if !fashion.exists() {
        eprintln!(
            "SKIPPED scoring: no Fashion-MNIST under {} (run scripts/fetch-data.sh)",
            fashion.display()
        );
        return;
    }
    let test = fashion_mnist(&fashion, FashionSplit::Test).unwrap();
    let x = test
        .batch_tensor(&[0, 1, 2], PixelRange::MinusOneOne, &Device::Cpu)
        .unwrap();
    let results = bundle.detector.score(&x, None).unwrap();
    assert_eq!(results.len(), 3);
    for r in &results {
        assert!(r.score.is_finite(), "score {}", r.score);
        // logits-L1 similarity is a negated distance.
        assert!(r.score <= 0.0);
        assert_eq!(r.synthesis.dims(), &[1, 28, 28]);
        assert!(r.nfe.denoiser > 0);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fingerprint_follows_weights_and_recipe() {
    let a = scratch("fp-a");
    let b = scratch("fp-b");
    write_untrained(&a, &tiny_manifest(), 7).unwrap();
    write_untrained(&b, &tiny_manifest(), 7).unwrap();
    let fa = Bundle::open(&a, &Device::Cpu).unwrap().fingerprint;
    // Same seed, same weights, same recipe: same detector.
    assert_eq!(fa, Bundle::open(&b, &Device::Cpu).unwrap().fingerprint);

    write_untrained(&b, &tiny_manifest(), 8).unwrap();
    assert_ne!(
        fa,
        Bundle::open(&b, &Device::Cpu).unwrap().fingerprint,
        "new weights"
    );

    let mut m = tiny_manifest();
    if let Recipe::PixelCfg(r) = &mut m.recipe {
        r.guidance_scale = 5.0;
    }
    write_untrained(&b, &m, 7).unwrap();
    assert_ne!(
        fa,
        Bundle::open(&b, &Device::Cpu).unwrap().fingerprint,
        "new recipe"
    );
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn manifest_that_does_not_match_the_weights_is_a_named_error() {
    let dir = scratch("mismatch");
    let mut m = tiny_manifest();
    write_untrained(&dir, &m, 7).unwrap();
    m.denoiser.pixel_unet.model_channels = 64;
    m.write(&dir).unwrap();
    let err = Bundle::open(&dir, &Device::Cpu)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("diffusion.safetensors"), "{err}");
    assert!(err.contains("shape"), "{err}");

    let mut m = tiny_manifest();
    m.labels.pop();
    m.write(&dir).unwrap();
    let err = Bundle::open(&dir, &Device::Cpu)
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("9 labels"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A latent bundle (autoencoder + latent UNet, `ldm` recipe) loads, scores real images in latent
/// space with the LDM recipe's evaluation count, and its fingerprint covers the autoencoder.
#[test]
fn latent_bundle_scores_in_latent_space() {
    let steps = 5;
    let a = scratch("latent-a");
    write_untrained(&a, &Manifest::tiny_latent(steps), 7).unwrap();
    let bundle = Bundle::open(&a, &Device::Cpu).unwrap();
    assert!(bundle.autoencoder.is_some());
    let Recipe::Ldm(own) = bundle.detector.recipe().clone() else {
        panic!("the latent bundle runs the ldm recipe")
    };
    assert_eq!(own.inversion_steps, Some(3), "3/5 of the levels");

    let fashion = data_dir().join("fashion-mnist");
    if fashion.exists() {
        let test = fashion_mnist(&fashion, FashionSplit::Test).unwrap();
        let x = test
            .batch_tensor(&[0, 1], PixelRange::MinusOneOne, &Device::Cpu)
            .unwrap();
        let full = Recipe::Ldm(LdmRecipe {
            inversion_steps: None,
            ..own
        });
        // Null-label inversion: 1 row per level; CFG sampling: 2 rows per level, plus 1 for the
        // unguided reference branch; encode + decode (+ the reference's decode); logits of the
        // input (no label given: the classifier's own prediction), the synthesis and the
        // reference.
        assert_eq!(
            own.reference,
            Reference::Unguided,
            "the own-latent recipe compares with the unguided reconstruction"
        );
        for (detector, depth) in [
            (bundle.detector.with_recipe(full).unwrap(), steps),
            (
                bundle
                    .detector
                    .with_recipe(bundle.detector.recipe().clone())
                    .unwrap(),
                3,
            ),
        ] {
            for r in detector.score(&x, None).unwrap() {
                assert!(r.score.is_finite() && r.score <= 0.0, "score {}", r.score);
                assert_eq!(r.synthesis.dims(), &[1, 28, 28]);
                assert_eq!(r.latent.dims(), &[3, 7, 7]);
                assert_eq!(r.nfe.denoiser, 4 * depth);
                assert_eq!(r.nfe.autoencoder, 3);
                assert_eq!(r.nfe.classifier_forward, 3);
                assert_eq!(r.start_index, depth - 1);
            }
        }
    } else {
        eprintln!(
            "SKIPPED latent scoring: no Fashion-MNIST under {}",
            fashion.display()
        );
    }

    // Only the autoencoder's weights differ: another detector.
    let b = scratch("latent-b");
    write_untrained(&b, &Manifest::tiny_latent(steps), 8).unwrap();
    std::fs::copy(
        a.join("classifier.safetensors"),
        b.join("classifier.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        a.join("diffusion.safetensors"),
        b.join("diffusion.safetensors"),
    )
    .unwrap();
    assert_ne!(
        bundle.fingerprint,
        Bundle::open(&b, &Device::Cpu).unwrap().fingerprint
    );

    // A denoiser that does not take the autoencoder's latents is refused at load, by name.
    let mut m = Manifest::tiny_latent(steps);
    m.denoiser.pixel_unet.in_channels = 4;
    write_untrained(&b, &m, 7).unwrap();
    let err = Bundle::open(&b, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("3×7²") && err.contains("4×7²"), "{err}");
    for d in [a, b] {
        std::fs::remove_dir_all(&d).unwrap();
    }
}
