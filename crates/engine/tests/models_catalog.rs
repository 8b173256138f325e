//! The model catalog's offline lookup and verification on real files: golden checkpoints (official
//! tensor names, written by the reference PyTorch code) and bundles written by the engine, laid
//! out in a models directory and a Hugging Face cache in a scratch folder.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use diffguard_engine::bundle::{Manifest, write_untrained};
use diffguard_engine::models::adm_unet::AdmUNetConfig;
use diffguard_engine::models::catalog::{
    Arch, BUNDLE_FOLDER, ModelFile, SearchPaths, Status, Verification, Via, bundle_catalog,
    catalog, check, locate, verify,
};
use diffguard_engine::models::class_embedder::ClassEmbedderConfig;
use diffguard_engine::models::ldm_unet::LdmUNetConfig;
use diffguard_engine::models::resnet::{BlockKind, ResNetConfig};
use diffguard_engine::models::vq::VqConfig;
use diffguard_engine::recipe::PixelCfgRecipe;

fn goldens() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/goldens");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED: {} is absent", dir.display());
        None
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("diffguard-catalog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn put(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(src, dest).unwrap();
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn save(tensors: &HashMap<String, Tensor>, dest: &Path) {
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    candle_core::safetensors::save(tensors, dest).unwrap();
}

fn role<'a>(files: &'a mut [ModelFile], role: &str) -> &'a mut ModelFile {
    files.iter_mut().find(|f| f.role == role).unwrap()
}

/// An environment with only the given variables (the process environment is never read).
fn env(vars: &[(&str, &Path)]) -> impl Fn(&str) -> Option<OsString> {
    let map: BTreeMap<String, OsString> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_os_str().to_owned()))
        .collect();
    move |k| map.get(k).cloned()
}

/// The golden ResNet: torchvision Bottleneck names with ResNet-50 widths, one block per stage.
fn golden_resnet() -> ResNetConfig {
    ResNetConfig::torchvision(BlockKind::Bottleneck, vec![1, 1, 1, 1], 10)
}

#[test]
fn default_search_order_from_the_environment() {
    let home = Path::new("/home/u");
    let p = SearchPaths::from_env(BTreeMap::new(), vec![], env(&[("HOME", home)]));
    assert_eq!(p.dirs, vec![home.join(".cache/diffguard")]);
    assert_eq!(p.hf_cache, Some(home.join(".cache/huggingface/hub")));
    let p = SearchPaths::from_env(
        BTreeMap::new(),
        vec!["/b".into()],
        env(&[
            ("HOME", home),
            ("DIFFGUARD_MODELS", Path::new("/m")),
            ("HF_HOME", Path::new("/hf")),
        ]),
    );
    assert_eq!(p.dirs, vec![PathBuf::from("/b"), "/m".into()]);
    assert_eq!(p.models_dir(), Some(Path::new("/m")));
    assert_eq!(p.hf_cache, Some("/hf/hub".into()));
    let p = SearchPaths::from_env(
        BTreeMap::new(),
        vec![],
        env(&[
            ("HF_HOME", Path::new("/hf")),
            ("HF_HUB_CACHE", Path::new("/c")),
        ]),
    );
    assert_eq!(p.hf_cache, Some("/c".into()));
    assert!(
        p.dirs.is_empty(),
        "no HOME and no DIFFGUARD_MODELS: no models dir"
    );
}

#[test]
fn every_recipe_names_files_and_download_locations() {
    for recipe in ["gdm", "ldm", "pixel-cfg"] {
        let files = catalog(recipe).unwrap();
        assert!(!files.is_empty());
        for f in &files {
            assert!(!f.names.is_empty() && !f.sources.is_empty(), "{}", f.role);
        }
    }
    let gdm = catalog("gdm").unwrap();
    let urls: Vec<String> = gdm.iter().map(|f| f.sources[0].describe()).collect();
    assert_eq!(
        urls,
        [
            "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
            "https://download.pytorch.org/models/resnet50-0676ba61.pth",
            "https://download.pytorch.org/models/vgg16-397923af.pth",
            "https://github.com/photosynthesis-team/piq/releases/download/v0.4.1/dists_weights.pt",
        ]
    );
    let ldm = catalog("ldm").unwrap();
    let prefixes: Vec<&str> = ldm[0].parts.iter().map(|p| p.prefix).collect();
    assert_eq!(
        prefixes,
        [
            "model.diffusion_model.",
            "first_stage_model.",
            "cond_stage_model."
        ]
    );
    assert!(catalog("cifar").is_err());
}

/// Search order: explicit path (final even when absent), models directory, Hugging Face cache
/// (`refs/main` first), and what is tried when nothing is found.
#[test]
fn lookup_order_and_statuses() {
    let Some(g) = goldens() else { return };
    let s = Scratch::new("lookup");
    let models = s.0.join("models");
    let hub = s.0.join("hf/hub");
    put(
        &g.join("adm_unet/weights.safetensors"),
        &models.join("256x256_diffusion_uncond.pt"),
    );
    // The DISTS weights exist in the models dir, but an explicit path names another file.
    put(
        &g.join("class_embedder/weights.safetensors"),
        &models.join("dists_weights.pt"),
    );
    let repo = hub.join("models--timm--resnet50.tv_in1k");
    put(
        &g.join("resnet/weights.safetensors"),
        &repo.join("snapshots/bbbb/model.safetensors"),
    );
    put(
        &g.join("class_embedder/weights.safetensors"),
        &repo.join("snapshots/aaaa/model.safetensors"),
    );
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "bbbb\n").unwrap();

    let explicit = BTreeMap::from([("dists-weights".to_string(), s.0.join("typo.pt"))]);
    let paths = SearchPaths::from_env(
        explicit,
        vec![],
        env(&[("DIFFGUARD_MODELS", &models), ("HF_HOME", &s.0.join("hf"))]),
    );
    let files = catalog("gdm").unwrap();
    let reports = check(&files, &paths, false);
    let status: Vec<(&str, Status)> = reports
        .iter()
        .map(|r| (r.role.as_str(), r.status))
        .collect();
    assert_eq!(
        status,
        [
            ("diffusion", Status::Found),
            ("classifier", Status::Found),
            ("dists-vgg16", Status::Missing),
            ("dists-weights", Status::Missing),
        ]
    );
    assert_eq!(
        reports[0].path.as_deref(),
        Some(models.join("256x256_diffusion_uncond.pt").as_path())
    );
    assert_eq!(
        reports[0].via,
        Some(Via::Directory {
            dir: models.clone()
        })
    );
    assert_eq!(
        reports[1].path.as_deref(),
        Some(repo.join("snapshots/bbbb/model.safetensors").as_path()),
        "refs/main's snapshot wins over the other one"
    );
    assert_eq!(
        reports[1].via,
        Some(Via::HuggingFace {
            repo: "timm/resnet50.tv_in1k".into()
        })
    );
    assert_eq!(reports[3].tried, vec![s.0.join("typo.pt")]);
    let vgg_tried = &reports[2].tried;
    assert_eq!(vgg_tried[0], models.join("vgg16-397923af.pth"));
    assert_eq!(
        vgg_tried.last().unwrap(),
        &hub.join("models--timm--vgg16.tv_in1k/snapshots/*/model.safetensors")
    );

    // Without refs/main the snapshots are taken in name order.
    std::fs::remove_file(repo.join("refs/main")).unwrap();
    let found = locate(&files[1], &paths).found.unwrap().0;
    assert_eq!(found, repo.join("snapshots/aaaa/model.safetensors"));
    // A models-dir copy wins over the HF cache.
    put(
        &g.join("resnet/weights.safetensors"),
        &models.join("imagenet_res50_acc76.10.pth"),
    );
    let found = locate(&files[1], &paths).found.unwrap().0;
    assert_eq!(found, models.join("imagenet_res50_acc76.10.pth"));
}

/// `--verify`: the tiny golden checkpoints against the full-size presets are mismatches that name
/// the offending tensors; against their own architectures they are ok; a truncated file is
/// unreadable; VGG16 features and DISTS alpha/beta (full size in the golden) are ok as is.
#[test]
fn verification_against_architectures() {
    let Some(g) = goldens() else { return };
    let s = Scratch::new("verify");
    let models = s.0.join("models");
    put(
        &g.join("adm_unet/weights.safetensors"),
        &models.join("256x256_diffusion_uncond.pt"),
    );
    put(
        &g.join("resnet/weights.safetensors"),
        &models.join("resnet50-0676ba61.pth"),
    );
    // Split the golden DISTS file the way the official files are split.
    let dists = load(&g.join("vgg_dists/weights.safetensors"));
    let (ab, features): (HashMap<_, _>, HashMap<_, _>) = dists
        .into_iter()
        .partition(|(k, _)| k == "alpha" || k == "beta");
    save(&features, &models.join("vgg16-397923af.pth"));
    save(&ab, &models.join("dists_weights.pt"));
    let paths = SearchPaths::from_env(
        BTreeMap::new(),
        vec![],
        env(&[("DIFFGUARD_MODELS", &models)]),
    );

    let mut files = catalog("gdm").unwrap();
    let reports = check(&files, &paths, true);
    let status: Vec<Status> = reports.iter().map(|r| r.status).collect();
    assert_eq!(
        status,
        [Status::Mismatch, Status::Mismatch, Status::Ok, Status::Ok]
    );
    let Some(Verification::Mismatch { parts }) = &reports[1].verification else {
        panic!("{:?}", reports[1].verification)
    };
    // ResNet-50 has 3 blocks in layer1; the golden has 1, with the same widths.
    assert!(
        parts[0]
            .missing
            .contains(&"layer1.1.conv1.weight".to_string())
    );
    assert!(!parts[0].missing.iter().any(|n| n.starts_with("layer1.0.")));
    assert_eq!(parts[0].wrong_shape.len(), 2, "fc: 10 classes, not 1000");
    assert!(parts[0].summary.contains("layer1.1.conv1.weight"));
    let Some(Verification::Mismatch { parts }) = &reports[0].verification else {
        panic!("{:?}", reports[0].verification)
    };
    let first = &parts[0].wrong_shape[0];
    assert_ne!(first.model, first.checkpoint);

    // The same files against their own (tiny) architectures.
    role(&mut files, "diffusion").parts[0].arch = Arch::AdmUNet(AdmUNetConfig::golden_tiny(true));
    role(&mut files, "classifier").parts[0].arch = Arch::ResNet(golden_resnet());
    let reports = check(&files, &paths, true);
    assert!(
        reports.iter().all(|r| r.status == Status::Ok),
        "{reports:#?}"
    );
    // The unconditional variant does not use the class embedding: one unexpected tensor.
    role(&mut files, "diffusion").parts[0].arch = Arch::AdmUNet(AdmUNetConfig::golden_tiny(false));
    let v = verify(&files[0], &models.join("256x256_diffusion_uncond.pt"));
    let Verification::Mismatch { parts } = v else {
        panic!("{v:?}")
    };
    assert_eq!(parts[0].unexpected, ["label_emb.weight"]);
    assert!(parts[0].missing.is_empty() && parts[0].wrong_shape.is_empty());

    // Half a file.
    let bytes = std::fs::read(models.join("resnet50-0676ba61.pth")).unwrap();
    std::fs::write(
        models.join("resnet50-0676ba61.pth"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let v = verify(&files[1], &models.join("resnet50-0676ba61.pth"));
    assert!(matches!(v, Verification::Unreadable { .. }), "{v:?}");
}

/// LDM: one checkpoint, three models under three prefixes.
#[test]
fn ldm_checkpoint_parts() {
    let Some(g) = goldens() else { return };
    let s = Scratch::new("ldm");
    let mut all = HashMap::new();
    for golden in ["ldm_unet", "vq_f4", "class_embedder"] {
        all.extend(load(&g.join(golden).join("weights.safetensors")));
    }
    let ckpt = s.0.join("models/cin256-v2/model.ckpt");
    save(&all, &ckpt);
    let paths = SearchPaths::from_env(
        BTreeMap::new(),
        vec![],
        env(&[("DIFFGUARD_MODELS", &s.0.join("models"))]),
    );
    let mut files = catalog("ldm").unwrap();
    files.truncate(1);
    let r = &check(&files, &paths, true)[0];
    assert_eq!(r.path.as_deref(), Some(ckpt.as_path()));
    let Some(Verification::Mismatch { parts }) = &r.verification else {
        panic!("{:?}", r.verification)
    };
    let names: Vec<&str> = parts.iter().map(|p| p.part.as_str()).collect();
    assert_eq!(names, ["unet", "first stage", "class embedder"]);
    assert!(parts[2].wrong_shape[0].name == "cond_stage_model.embedding.weight");
    assert_eq!(parts[2].wrong_shape[0].model, [1001, 512]);
    assert_eq!(parts[2].wrong_shape[0].checkpoint, [1001, 64]);

    let tiny = [
        Arch::LdmUNet(LdmUNetConfig::golden_tiny()),
        Arch::Vq(VqConfig::golden_tiny()),
        Arch::ClassEmbedder(ClassEmbedderConfig::golden_tiny()),
    ];
    for (part, arch) in files[0].parts.iter_mut().zip(tiny) {
        part.arch = arch;
    }
    assert_eq!(verify(&files[0], &ckpt), Verification::Ok);
    // A tensor of one part gone: only that part is reported, under its full name.
    all.remove("first_stage_model.quant_conv.bias");
    save(&all, &ckpt);
    let Verification::Mismatch { parts } = verify(&files[0], &ckpt) else {
        panic!()
    };
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].missing, ["first_stage_model.quant_conv.bias"]);
}

fn tiny_manifest(width: usize) -> Manifest {
    let recipe = PixelCfgRecipe::default();
    let mut m = Manifest::tiny(recipe.ddim_steps, recipe.early_stop_steps);
    m.classifier.resnet.widths[0] = width;
    m.classifier.resnet.stem_width = width;
    m
}

/// The project's bundle (catalog `bundle`, alias `pixel-cfg`), found in the bundle folder first,
/// else in the models directory under the default bundle's folder name, checked against the
/// architectures its own `bundle.json` declares.
#[test]
fn bundle_files() {
    assert!(
        diffguard_engine::bundle::DEFAULT_BUNDLE.ends_with(&format!("/{BUNDLE_FOLDER}")),
        "the models-directory name is the default bundle's folder"
    );
    assert_eq!(catalog("bundle").unwrap(), catalog("pixel-cfg").unwrap());
    let s = Scratch::new("bundle");
    let models = s.0.join("models");
    let bundle = models.join(BUNDLE_FOLDER);
    write_untrained(&bundle, &tiny_manifest(8), 7).unwrap();
    let own = s.0.join("own");
    let paths = SearchPaths::from_env(
        BTreeMap::new(),
        vec![own.clone()],
        env(&[("DIFFGUARD_MODELS", &models)]),
    );
    let files = catalog("pixel-cfg").unwrap();
    let reports = check(&files, &paths, true);
    for r in &reports {
        assert_eq!(r.status, Status::Ok, "{r:#?}");
        assert!(r.path.as_ref().unwrap().starts_with(&bundle));
        assert_eq!(
            r.tried[0],
            own.join(&r.names[0]),
            "the bundle folder is searched first"
        );
    }
    // A manifest that declares another classifier width: the weights no longer fit.
    tiny_manifest(12).write(&bundle).unwrap();
    let reports = check(&files, &paths, true);
    assert_eq!(reports[1].status, Status::Mismatch);
    assert_eq!(reports[2].status, Status::Ok);
    // No manifest: nothing to check the weights against.
    std::fs::remove_file(bundle.join("bundle.json")).unwrap();
    let reports = check(&files, &paths, true);
    assert_eq!(reports[0].status, Status::Missing);
    assert_eq!(reports[1].status, Status::Unreadable);
}

/// A latent bundle read through its manifest: the autoencoder is listed, every file is found by
/// the name the manifest gives it and checked against the manifest's architecture (not the
/// pixel UNet a bare catalog would assume); a denoiser of the wrong width is a mismatch.
#[test]
fn latent_bundle_lists_its_autoencoder() {
    let s = Scratch::new("latent-bundle");
    let bundle = s.0.join("latent");
    let mut manifest = Manifest::tiny_latent(10);
    manifest.denoiser.weights = "prior.safetensors".into();
    write_untrained(&bundle, &manifest, 5).unwrap();
    manifest.write(&bundle).unwrap();
    let paths = SearchPaths::from_env(BTreeMap::new(), vec![bundle.clone()], env(&[]));
    let files = bundle_catalog(Some((&bundle, &manifest)));
    let roles: Vec<&str> = files.iter().map(|f| f.role).collect();
    assert_eq!(roles, ["bundle", "classifier", "denoiser", "autoencoder"]);
    let reports = check(&files, &paths, true);
    for r in &reports {
        assert_eq!(r.status, Status::Ok, "{r:#?}");
    }
    assert_eq!(
        reports[2].path.as_deref(),
        Some(bundle.join("prior.safetensors").as_path())
    );
    // Without the manifest the bare catalog looks for the standard name and misses the prior.
    let bare = check(&bundle_catalog(None), &paths, false);
    assert_eq!(bare[2].status, Status::Missing);
    assert_eq!(bare.len(), 3);
    // A manifest that declares a wider denoiser than the file holds.
    let mut wider = manifest.clone();
    wider.denoiser.pixel_unet.model_channels *= 2;
    let reports = check(&bundle_catalog(Some((&bundle, &wider))), &paths, true);
    assert_eq!(reports[2].status, Status::Mismatch);
    assert_eq!(reports[3].status, Status::Ok);
}
