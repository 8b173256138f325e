//! VQ-f4 autoencoder parity with the `vq_f4` golden (official LDM/taming code, random weights).

mod models_unet_common;

use candle_core::{DType, Tensor};
use diffguard_engine::Autoencoder;
use diffguard_engine::models::vq::{VqConfig, VqModel};
use models_unet_common::{BATCH_TOL, assert_close, case, golden_dir, ints, max_diff, weights};

// Observed float64-vs-float32 max_rel_to_max: encode 1.9e-6, decode (same codes) 1.4e-6. We allow
// 10× for summation-order differences: 2e-5 of max|ref|.
const REL_TOL: f64 = 2e-5;

fn model() -> Option<(VqModel, std::collections::HashMap<String, Tensor>)> {
    let dir = golden_dir("vq_f4")?;
    let vb = weights(&dir, DType::F32).pp("first_stage_model");
    Some((
        VqModel::new(vb, VqConfig::golden_tiny()).unwrap(),
        case(&dir),
    ))
}

#[test]
fn encode_quantize_decode_match_golden() {
    let Some((vq, c)) = model() else { return };
    let pre = vq.encode(&c["x"]).unwrap();
    assert_close("prequant", &pre, &c["prequant"], REL_TOL);

    // Smallest golden margin between best and second code is 1.0e-4, far above f32 error here.
    let (quant, idx) = vq.quantizer().unwrap().quantize(&pre).unwrap();
    assert_eq!(ints(&idx), ints(&c["indices"]), "code indices");
    // quant is z + (e − z) in the reference: within 1 ulp of the codebook row (7.5e-9 observed).
    assert_close("quant", &quant, &c["quant"], 1e-6);

    let dec = vq.decode(&c["prequant"]).unwrap();
    assert_close("decoded", &dec, &c["decoded"], REL_TOL);
}

#[test]
fn batch_equals_per_item() {
    let Some((vq, c)) = model() else { return };
    let full = vq.encode(&c["x"]).unwrap();
    let items: Vec<Tensor> = (0..2)
        .map(|i| vq.encode(&c["x"].narrow(0, i, 1).unwrap()).unwrap())
        .collect();
    assert_close(
        "encode batch vs items",
        &full,
        &Tensor::cat(&items, 0).unwrap(),
        BATCH_TOL,
    );
    let full = vq.decode(&c["prequant"]).unwrap();
    let items: Vec<Tensor> = (0..2)
        .map(|i| vq.decode(&c["prequant"].narrow(0, i, 1).unwrap()).unwrap())
        .collect();
    assert_close(
        "decode batch vs items",
        &full,
        &Tensor::cat(&items, 0).unwrap(),
        BATCH_TOL,
    );
}

/// The project's continuous autoencoder: no codebook (decode takes the latent as it is), and the
/// scale factor multiplies on the way in and divides on the way out.
#[test]
fn continuous_autoencoder_applies_its_scale_factor_both_ways() {
    use candle_core::Device;
    use candle_nn::VarMap;
    use diffguard_engine::train::seeded_var_builder;

    let dev = Device::Cpu;
    let vars = VarMap::new();
    let mut cfg = VqConfig::fashion_mnist();
    let plain = VqModel::new(seeded_var_builder(&vars, 1, DType::F32, &dev), cfg.clone()).unwrap();
    assert!(plain.quantizer().is_none());
    cfg.scale_factor = 2.5;
    let scaled = VqModel::new(seeded_var_builder(&vars, 1, DType::F32, &dev), cfg.clone()).unwrap();
    // Seeded, so that the rounding below is the same on every run.
    let x = (diffguard_engine::eval::quality::seeded_noise(&[2, 1, 28, 28], 5, &dev).unwrap()
        * 0.5)
        .unwrap();
    let z = plain.encode(&x).unwrap();
    assert_eq!(z.dims(), &[2, 3, 7, 7]);
    let zs = scaled.encode(&x).unwrap();
    // Same weights (same seed and names). Encode differs at most by the one f32 multiply (≤ 1 ulp,
    // ≈ 5e-7 at |z| ≈ 9): 1e-6 absolute. Decode sees z·s/s, up to 2 ulp off z, and the decoder's
    // GroupNorms amplify that (3.2e-6 observed on this input, 4.2e-6 on others): 1e-5 absolute.
    let (d_enc, _) = max_diff(&zs, &(&z * 2.5).unwrap());
    assert!(d_enc < 1e-6, "encode × s: {d_enc:e}");
    let (d_dec, _) = max_diff(&scaled.decode(&zs).unwrap(), &plain.decode(&z).unwrap());
    eprintln!("encode × s max_abs {d_enc:e}, decode ÷ s max_abs {d_dec:e}");
    assert!(d_dec < 1e-5, "decode ÷ s: {d_dec:e}");
    assert_eq!(plain.decode(&z).unwrap().dims(), &[2, 1, 28, 28]);

    cfg.scale_factor = 0.0;
    let err = VqModel::new(seeded_var_builder(&vars, 1, DType::F32, &dev), cfg).unwrap_err();
    assert!(err.to_string().contains("scale_factor"), "{err}");
}
