//! The baseline detectors on tiny synthetic cases with known answers, and ViM / KNN against
//! OpenOOD's formulas run in numpy (scripts/sklearn_reference.py).

use candle_core::{Device, Tensor};
use diffguard_engine::eval::{self, Knn, Vim};

fn t(rows: &[&[f64]]) -> Tensor {
    let cols = rows[0].len();
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), cols), &Device::Cpu).unwrap()
}

fn t2(rows: &[Vec<f64>]) -> Tensor {
    let refs: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
    t(&refs)
}

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
}

#[test]
fn eval_logit_baselines_known_values() {
    let logits = t(&[&[0.0, 0.0], &[3f64.ln(), 0.0], &[1000.0, 1000.0]]);
    let msp = eval::msp(&logits).unwrap();
    // ln MSP: softmax maxima ½, ¾, ½ (the last without overflow).
    for (got, want) in msp.iter().zip([0.5f64.ln(), 0.75f64.ln(), 0.5f64.ln()]) {
        close(*got, want, 1e-15, "ln MSP");
    }
    let e = eval::energy(&logits).unwrap();
    for (got, want) in e.iter().zip([2f64.ln(), 4f64.ln(), 1000.0 + 2f64.ln()]) {
        close(*got, want, 1e-12, "energy");
    }
    assert_eq!(eval::max_logit(&logits).unwrap(), [0.0, 3f64.ln(), 1000.0]);
}

#[test]
fn eval_msp_does_not_saturate() {
    // MSP = 1/(1+e^−40) and 1/(1+e^−45) both round to exactly 1.0 in f64 (and long before in
    // f32), which would tie them; ln MSP = −ln1p(e^−m) keeps them apart.
    let logits = t(&[&[40.0, 0.0], &[45.0, 0.0]]);
    assert_eq!(1.0 / (1.0 + (-40f64).exp()), 1.0);
    let s = eval::msp(&logits).unwrap();
    assert!(s[0] < s[1], "{s:?}");
    close(s[0] / -(-40f64).exp(), 1.0, 1e-12, "ln MSP ≈ −e^−40");
    // As a detector: confident InD vs less confident OOD gives AUROC 1, not ½.
    let ind = eval::msp(&t(&[&[50.0, 0.0], &[48.0, 0.0]])).unwrap();
    let ood = eval::msp(&t(&[&[40.0, 0.0], &[39.0, 0.0]])).unwrap();
    assert_eq!(eval::auroc(&ind, &ood).unwrap(), 1.0);
}

#[test]
fn eval_knn_known_distances() {
    // Bank: e1, e2, −e1. After normalisation, squared distances from a query direction q are
    // 2 − 2 cos(q, b).
    let bank = t(&[&[1.0, 0.0], &[0.0, 5.0], &[-2.0, 0.0]]);
    let knn = Knn::fit(&bank, 2).unwrap();
    let s = knn
        .score(&t(&[&[3.0, 0.0], &[0.0, 1.0], &[1.0, 1.0]]))
        .unwrap();
    // 3e1: {0, 2, 4} → 2nd = 2; e2: {2, 0, 2} → 2; (1,1)/√2: {2−√2, 2−√2, 2+√2} → 2−√2.
    // f32 dot products: 1e-6 covers the rounding of 2 − 2·cos near 0.
    let want = [-2.0, -2.0, -(2.0 - 2f64.sqrt())];
    for (g, w) in s.iter().zip(want) {
        close(*g, w, 1e-6, "KNN score");
    }
    let nearest = Knn::fit(&bank, 1)
        .unwrap()
        .score(&t(&[&[-1.0, 0.0]]))
        .unwrap();
    close(nearest[0], 0.0, 1e-6, "k = 1 exact match");
    assert!(Knn::fit(&bank, 4).is_err());
    assert!(knn.score(&t(&[&[1.0, 0.0, 0.0]])).is_err());
}

#[derive(serde::Deserialize)]
struct VimRef {
    train: Vec<Vec<f64>>,
    w: Vec<Vec<f64>>,
    b: Vec<f64>,
    dim: usize,
    queries: Vec<Vec<f64>>,
    u: Vec<f64>,
    alpha: f64,
    scores: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct KnnRef {
    bank: Vec<Vec<f64>>,
    queries: Vec<Vec<f64>>,
    k: usize,
    scores: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Reference {
    vim: VimRef,
    knn: KnnRef,
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/sklearn_reference.json"
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn eval_vim_matches_openood_numpy() {
    let r = reference().vim;
    let b = Tensor::from_vec(r.b.clone(), r.b.len(), &Device::Cpu).unwrap();
    let vim = Vim::fit(&t2(&r.train), &t2(&r.w), &b, r.dim).unwrap();
    // All f64; LAPACK and nalgebra differ only by eigensolver rounding (~1e-14 relative) on
    // scores of size ~10: 1e-9 is a wide margin that would still catch any formula error.
    for (g, w) in vim.origin().iter().zip(&r.u) {
        close(*g, *w, 1e-9, "ViM origin u");
    }
    close(vim.alpha(), r.alpha, 1e-9, "ViM alpha");
    for (g, w) in vim.score(&t2(&r.queries)).unwrap().iter().zip(&r.scores) {
        close(*g, *w, 1e-9, "ViM score");
    }
}

#[test]
fn eval_vim_known_subspace() {
    // Features with covariance diag(8, 8, ½)/6 around the origin, fc = the first two coordinates,
    // no bias → u = 0, principal subspace span(e1, e2), residual e3. Max logits of the six
    // training points: 2, 0, 2, 0, 0, 0 (mean ⅔); residual norms 0,0,0,0,½,½ (mean ⅙) → α = 4.
    let train = t(&[
        &[2.0, 0.0, 0.0],
        &[-2.0, 0.0, 0.0],
        &[0.0, 2.0, 0.0],
        &[0.0, -2.0, 0.0],
        &[0.0, 0.0, 0.5],
        &[0.0, 0.0, -0.5],
    ]);
    let w = t(&[&[1.0, 0.0, 0.0], &[0.0, 1.0, 0.0]]);
    let b = Tensor::new(&[0.0f64, 0.0], &Device::Cpu).unwrap();
    let vim = Vim::fit(&train, &w, &b, 2).unwrap();
    close(vim.alpha(), 4.0, 1e-12, "alpha");
    let s = vim
        .score(&t(&[&[1.0, 0.0, 0.25], &[0.0, 0.0, 1.0]]))
        .unwrap();
    close(
        s[0],
        (1f64.exp() + 1.0).ln() - 1.0,
        1e-12,
        "score in the subspace",
    );
    close(s[1], 2f64.ln() - 4.0, 1e-12, "score off the subspace");
    assert!(Vim::fit(&train, &w, &b, 3).is_err(), "dim must be below D");

    // With a bias in the fc's column space, u is the exact point of all-zero logits.
    let w = t(&[&[1.0, 0.0], &[0.0, 2.0], &[1.0, 1.0]]);
    let v = [1.0, -2.0];
    let bias: Vec<f64> = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
        .iter()
        .map(|r| -(r[0] * v[0] + r[1] * v[1]))
        .collect();
    let b = Tensor::from_vec(bias, 3, &Device::Cpu).unwrap();
    let train = t(&[&[2.0, -2.0], &[0.0, -2.0], &[1.0, -1.5], &[1.0, -2.5]]);
    let vim = Vim::fit(&train, &w, &b, 1).unwrap();
    for (g, w) in vim.origin().iter().zip(v) {
        close(*g, w, 1e-12, "origin");
    }
}

#[test]
fn eval_knn_matches_openood_numpy() {
    let r = reference().knn;
    let knn = Knn::fit(&t2(&r.bank), r.k).unwrap();
    // The engine multiplies in f32: cos error ~1e-7 per term over 8 terms, doubled by 2 − 2cos.
    for (g, w) in knn.score(&t2(&r.queries)).unwrap().iter().zip(&r.scores) {
        close(*g, *w, 1e-5, "KNN score");
    }
}

/// A stand-in classifier: logits (10·m, 10·(1 − m)) and features (m, m²) of the mean pixel m.
/// Refuses anything but (N, 3, H, W), as the `Classifier` contract demands.
struct MeanClassifier;

impl diffguard_engine::Classifier for MeanClassifier {
    fn forward(
        &self,
        x01: &Tensor,
    ) -> diffguard_engine::Result<diffguard_engine::ClassifierOutput> {
        assert_eq!(x01.dim(1)?, 3, "inputs must be RGB");
        let m = x01.flatten_from(1)?.mean_keepdim(1)?;
        let logits = Tensor::cat(&[(&m * 10.0)?, ((1.0 - &m)? * 10.0)?], 1)?;
        let penultimate = Tensor::cat(&[m.clone(), m.sqr()?], 1)?;
        Ok(diffguard_engine::ClassifierOutput {
            logits,
            features: penultimate.unsqueeze(2)?.unsqueeze(3)?,
            penultimate,
        })
    }
    fn log_prob_input_grad(
        &self,
        _: &Tensor,
        _: &[diffguard_engine::LabelId],
    ) -> diffguard_engine::Result<Tensor> {
        Err(diffguard_engine::EngineError::InvalidInput(
            "not used".into(),
        ))
    }
    fn grad_cam(
        &self,
        _: &Tensor,
        _: &[diffguard_engine::LabelId],
    ) -> diffguard_engine::Result<Tensor> {
        Err(diffguard_engine::EngineError::InvalidInput(
            "not used".into(),
        ))
    }
    fn num_classes(&self) -> usize {
        2
    }
}

#[test]
fn eval_outputs_and_all_baselines() {
    use diffguard_engine::LabelId;
    use diffguard_engine::data::{Dataset, Pixels};
    // Seven grey 1×2 images with mean pixels 0, 1/6, …, 1.
    let pixels: Vec<u8> = (0..7u16).flat_map(|i| [(i * 255 / 6) as u8; 2]).collect();
    let data = Dataset::new(
        "g",
        [1, 1, 2],
        Pixels::U8(pixels),
        vec![LabelId(0); 7],
        vec!["x".into()],
    )
    .unwrap();
    let out = eval::collect_outputs(&MeanClassifier, &data, 3, &Device::Cpu).unwrap();
    assert_eq!(out.logits.dims(), [7, 2]);
    assert_eq!(out.penultimate.dims(), [7, 2]);
    // Mean below ½ → class 1, above → class 0 (image 3 has mean 127/255 < ½).
    let predicted: Vec<u32> = out.predicted.iter().map(|l| l.0).collect();
    assert_eq!(predicted, [1, 1, 1, 1, 0, 0, 0]);
    // Batching does not change anything.
    let whole = eval::collect_outputs(&MeanClassifier, &data, 100, &Device::Cpu).unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(v(&out.logits), v(&whole.logits));

    let w = t(&[&[10.0, 0.0], &[-10.0, 0.0]]);
    let b = Tensor::new(&[0.0f64, 10.0], &Device::Cpu).unwrap();
    let fitted = eval::FittedBaselines::fit(&out, 2, Some((&w, &b)), 1).unwrap();
    let scores = fitted.score_all(&out).unwrap();
    assert_eq!(
        scores.keys().copied().collect::<Vec<_>>(),
        ["EBO", "KNN", "MLS", "MSP", "ViM"]
    );
    assert!(scores.values().all(|s| s.len() == 7));
    assert_eq!(scores["MLS"], eval::max_logit(&out.logits).unwrap());
    let no_vim = eval::FittedBaselines::fit(&out, 2, None, 1).unwrap();
    assert!(!no_vim.score_all(&out).unwrap().contains_key("ViM"));
}
