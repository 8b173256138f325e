//! LDM UNet (SpatialTransformer) and ClassEmbedder parity with the `ldm_unet` and
//! `class_embedder` goldens (official CompVis code, random weights).

mod models_unet_common;

use candle_core::{DType, Tensor};
use diffguard_engine::models::class_embedder::{ClassEmbedder, ClassEmbedderConfig};
use diffguard_engine::models::ldm_unet::{LdmDenoiser, LdmUNet, LdmUNetConfig};
use diffguard_engine::{Denoiser, LabelId};
use models_unet_common::{BATCH_TOL, assert_close, case, golden_dir, ints, weights};

// The golden's float64-vs-float32 max_rel_to_max is 8.4e-7 (cond) / 9.2e-7 (null); we allow 10×
// (summation order differs between candle and torch): 1e-5 of max|eps|.
const REL_TOL: f64 = 1e-5;

fn embedder() -> Option<ClassEmbedder> {
    let dir = golden_dir("class_embedder")?;
    let vb = weights(&dir, DType::F32).pp("cond_stage_model");
    Some(ClassEmbedder::new(vb, ClassEmbedderConfig::golden_tiny()).unwrap())
}

fn labels(t: &Tensor) -> Vec<LabelId> {
    ints(t).into_iter().map(LabelId).collect()
}

#[test]
fn class_embedder_matches_golden() {
    let (Some(dir), Some(emb)) = (golden_dir("class_embedder"), embedder()) else {
        return;
    };
    let c = case(&dir);
    let out = emb.forward(&labels(&c["labels"])).unwrap();
    // A table lookup of F16-exact values: bit-identical.
    assert_close("embedding", &out, &c["embedding"], 0.0);
    assert_eq!(emb.null_label(), LabelId(1000));
    assert!(emb.forward(&[LabelId(1001)]).is_err());
}

#[test]
fn ldm_unet_matches_golden() {
    let Some(dir) = golden_dir("ldm_unet") else {
        return;
    };
    let c = case(&dir);
    let vb = weights(&dir, DType::F32).pp("model.diffusion_model");
    let unet = LdmUNet::new(vb, LdmUNetConfig::golden_tiny()).unwrap();
    let t = ints(&c["timesteps"]);
    let eps_cond = unet.forward(&c["z"], &t, &c["context_cond"]).unwrap();
    assert_close("eps_cond", &eps_cond, &c["eps_cond"], REL_TOL);
    let eps_null = unet.forward(&c["z"], &t, &c["context_null"]).unwrap();
    assert_close("eps_null", &eps_null, &c["eps_null"], REL_TOL);
}

#[test]
fn ldm_denoiser_labels_and_null_path() {
    let (Some(dir), Some(emb)) = (golden_dir("ldm_unet"), embedder()) else {
        return;
    };
    let c = case(&dir);
    let vb = weights(&dir, DType::F32).pp("model.diffusion_model");
    let unet = LdmUNet::new(vb, LdmUNetConfig::golden_tiny()).unwrap();
    let den = LdmDenoiser::new(unet, emb).unwrap();
    assert_eq!(den.null_label(), Some(LabelId(1000)));
    assert_eq!(den.num_classes(), 1000);
    let t = ints(&c["timesteps"]);

    let eps_cond = den.eps(&c["z"], &t, Some(&labels(&c["labels"]))).unwrap();
    assert_close("denoiser cond", &eps_cond, &c["eps_cond"], REL_TOL);
    let eps_none = den.eps(&c["z"], &t, None).unwrap();
    assert_close(
        "denoiser None = null class",
        &eps_none,
        &c["eps_null"],
        REL_TOL,
    );
    let explicit = den
        .eps(&c["z"], &t, Some(&[LabelId(1000), LabelId(1000)]))
        .unwrap();
    assert_close("explicit null", &explicit, &eps_none, 0.0);

    // Batch of two equals the two single-item calls.
    let items: Vec<Tensor> = (0..2)
        .map(|i| {
            let l = labels(&c["labels"]);
            den.eps(&c["z"].narrow(0, i, 1).unwrap(), &t[i..=i], Some(&l[i..=i]))
                .unwrap()
        })
        .collect();
    assert_close(
        "batch vs items",
        &eps_cond,
        &Tensor::cat(&items, 0).unwrap(),
        BATCH_TOL,
    );
}
