//! VQ-f4 autoencoder parity with the `vq_f4` golden (official LDM/taming code, random weights).

mod models_unet_common;

use candle_core::{DType, Tensor};
use diffguard_engine::Autoencoder;
use diffguard_engine::models::vq::{VqConfig, VqModel};
use models_unet_common::{BATCH_TOL, assert_close, case, golden_dir, ints, weights};

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
    let (quant, idx) = vq.quantizer().quantize(&pre).unwrap();
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
