//! The example upstream: a small, real REST image classifier speaking TorchServe, KServe v1,
//! Open Inference Protocol v2 and a custom JSON/multipart API. Used by `diffguard demo`, the tests,
//! `examples/upstream.rs` and docker-compose.
//!
//! The model is the project's trained Fashion-MNIST ResNet from the default bundle
//! (`models/fashion-mnist-latent`, or `$DIFFGUARD_BUNDLE`). If that bundle cannot be loaded, the
//! upstream falls back to a nearest-centroid classifier whose centroids are the class means of the
//! 60,000 Fashion-MNIST training images (`examples/assets/centroids.png`, made by
//! `examples/make_assets.rs`) and says so on stderr. Both sit behind [`Classifier`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{Value, json};

use crate::guard::Image;
use crate::guard::decode::decode;

/// Fashion-MNIST class names, in label order.
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

const CENTROIDS_PNG: &[u8] = include_bytes!("../examples/assets/centroids.png");

/// An image classifier: class names and one logit per class.
pub trait Classifier: Send + Sync {
    /// Class names in logit order.
    fn classes(&self) -> &[&'static str];
    /// Logits for one image.
    fn logits(&self, image: &Image) -> Vec<f32>;
    /// What the model is, for humans (the demo prints it).
    fn describe(&self) -> String;
}

/// The classifier the example upstream serves: the bundle's ResNet, else nearest-centroid.
pub fn default_classifier() -> Arc<dyn Classifier> {
    let dir = crate::guard::diffguard::default_bundle_dir();
    match BundleResNet::open(&dir) {
        Ok(model) => Arc::new(model),
        Err(e) => {
            eprintln!(
                "example upstream: cannot load the ResNet of {} ({e}); serving nearest-centroid",
                dir.display()
            );
            Arc::new(NearestCentroid::bundled())
        }
    }
}

/// The project's trained Fashion-MNIST ResNet, read from a bundle folder.
pub struct BundleResNet {
    net: diffguard_engine::models::resnet::ResNet,
    source: PathBuf,
}

impl BundleResNet {
    pub fn open(dir: &Path) -> Result<Self, diffguard_engine::EngineError> {
        let cpu = diffguard_engine::bundle::device_from_name("cpu")?;
        let (net, source) = diffguard_engine::bundle::open_classifier(dir, &cpu)?;
        Ok(Self { net, source })
    }
}

impl Classifier for BundleResNet {
    fn classes(&self) -> &[&'static str] {
        &FASHION_CLASSES
    }
    fn logits(&self, image: &Image) -> Vec<f32> {
        if image.width == 0 || image.height == 0 {
            return vec![0.0; 10];
        }
        // A model error on a decoded 28×28 image would be a bug, not bad input; answer
        // "no preference" rather than failing the request.
        self.net
            .logits_from_pixels(to_28x28_gray(image), 1, 28, 28)
            .ok()
            .and_then(|mut rows| rows.pop())
            .unwrap_or_else(|| vec![0.0; 10])
    }
    fn describe(&self) -> String {
        format!(
            "the project's Fashion-MNIST ResNet ({})",
            self.source.display()
        )
    }
}

/// Nearest class mean in pixel space; logits are negative scaled squared distances.
pub struct NearestCentroid {
    centroids: Vec<Vec<f32>>,
}

impl NearestCentroid {
    /// The bundled Fashion-MNIST centroids.
    pub fn bundled() -> Self {
        // The PNG is a build-time constant checked by a unit test, so failure here is a build bug.
        let img = decode(CENTROIDS_PNG, 280 * 28)
            .map(|i| i.to_f32())
            .unwrap_or_else(|_| vec![0.0; 280 * 28]);
        let centroids = (0..10)
            .map(|c| {
                (0..28)
                    .flat_map(|y| img[y * 280 + c * 28..y * 280 + c * 28 + 28].to_vec())
                    .collect()
            })
            .collect();
        Self { centroids }
    }
}

/// Grayscale 28×28 in [0, 1]: RGB averaged, other sizes nearest-neighbour resampled.
fn to_28x28_gray(image: &Image) -> Vec<f32> {
    let (w, h, c) = (
        image.width as usize,
        image.height as usize,
        image.channels as usize,
    );
    let mut out = Vec::with_capacity(784);
    for y in 0..28 {
        for x in 0..28 {
            let (sx, sy) = (x * w / 28, y * h / 28);
            let p = &image.pixels[(sy * w + sx) * c..(sy * w + sx) * c + c];
            out.push(p.iter().map(|&v| f32::from(v)).sum::<f32>() / (c as f32 * 255.0));
        }
    }
    out
}

impl Classifier for NearestCentroid {
    fn classes(&self) -> &[&'static str] {
        &FASHION_CLASSES
    }
    fn logits(&self, image: &Image) -> Vec<f32> {
        if image.width == 0 || image.height == 0 {
            return vec![0.0; 10];
        }
        let x = to_28x28_gray(image);
        // Mean squared distance; ×40 gives softmax probabilities that are neither flat nor one-hot.
        self.centroids
            .iter()
            .map(|c| {
                -40.0
                    * c.iter()
                        .zip(&x)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f32>()
                    / 784.0
            })
            .collect()
    }
    fn describe(&self) -> String {
        "nearest-centroid on Fashion-MNIST (examples/assets/centroids.png)".into()
    }
}

fn softmax(l: &[f32]) -> Vec<f32> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = l.iter().map(|x| (x - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

type Model = Arc<dyn Classifier>;

/// The example server's routes.
pub fn router(model: Model) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .fallback(dispatch)
        .with_state(model)
}

/// A client error of the example server: 400 with `{"error": ...}`.
struct Bad(String);

impl IntoResponse for Bad {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": self.0})),
        )
            .into_response()
    }
}

fn bad(msg: impl std::fmt::Display) -> Bad {
    Bad(msg.to_string())
}

fn b64(s: &str) -> Result<Vec<u8>, Bad> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| bad(format!("base64: {e}")))
}

fn classify(model: &Model, bytes: &[u8]) -> Result<Vec<f32>, Bad> {
    let img = decode(bytes, 4096 * 4096).map_err(bad)?;
    Ok(model.logits(&img))
}

async fn dispatch(
    State(model): State<Model>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        return StatusCode::NOT_FOUND.into_response();
    }
    let path = uri.path();
    let result = if path.starts_with("/predictions/") {
        torchserve(&model, &body)
    } else if path.starts_with("/v1/models/") && path.ends_with(":predict") {
        kserve_v1(&model, &body)
    } else if path.starts_with("/v2/models/") && path.ends_with("/infer") {
        oip_v2(&model, &body)
    } else if path == "/classify" {
        custom_json(&model, &body)
    } else if path == "/upload" {
        upload(&model, &headers, body)
    } else {
        return StatusCode::NOT_FOUND.into_response();
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn torchserve(model: &Model, body: &[u8]) -> Result<Response, Bad> {
    let p = softmax(&classify(model, body)?);
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
    let top: serde_json::Map<String, Value> = idx
        .iter()
        .take(5)
        .map(|&i| (model.classes()[i].to_string(), json!(p[i])))
        .collect();
    Ok(axum::Json(Value::Object(top)).into_response())
}

fn kserve_v1(model: &Model, body: &[u8]) -> Result<Response, Bad> {
    let v: Value = serde_json::from_slice(body).map_err(bad)?;
    let instances = v["instances"]
        .as_array()
        .ok_or_else(|| bad("missing instances"))?;
    let mut preds = Vec::new();
    for inst in instances {
        let s = inst["b64"]
            .as_str()
            .or_else(|| inst.as_str())
            .ok_or_else(|| bad("instance without b64"))?;
        preds.push(softmax(&classify(model, &b64(s)?)?));
    }
    Ok(axum::Json(json!({"predictions": preds})).into_response())
}

fn oip_v2(model: &Model, body: &[u8]) -> Result<Response, Bad> {
    let v: Value = serde_json::from_slice(body).map_err(bad)?;
    let input = v["inputs"]
        .as_array()
        .and_then(|a| a.iter().find(|i| i["datatype"] == "BYTES"))
        .ok_or_else(|| bad("no BYTES input"))?;
    let data = input["data"]
        .as_array()
        .ok_or_else(|| bad("input without data"))?;
    let mut flat = Vec::new();
    for d in data {
        flat.extend(softmax(&classify(
            model,
            &b64(d.as_str().unwrap_or_default())?,
        )?));
    }
    let n = data.len();
    Ok(axum::Json(json!({"model_name": "fashion", "outputs": [{"name": "probabilities", "shape": [n, 10], "datatype": "FP32", "data": flat}]})).into_response())
}

fn custom_answer(model: &Model, logits: Vec<f32>) -> Response {
    let i = argmax(&logits);
    axum::Json(
        json!({"result": {"class_id": i, "class_name": model.classes()[i]}, "logits": logits}),
    )
    .into_response()
}

fn custom_json(model: &Model, body: &[u8]) -> Result<Response, Bad> {
    let v: Value = serde_json::from_slice(body).map_err(bad)?;
    let s = v["image"].as_str().ok_or_else(|| bad("missing image"))?;
    Ok(custom_answer(model, classify(model, &b64(s)?)?))
}

fn upload(model: &Model, headers: &HeaderMap, body: Bytes) -> Result<Response, Bad> {
    let cfg = crate::config::RequestAdapterConfig::Multipart {
        field: "file".into(),
    };
    let img = crate::proxy::request::extract_images(&cfg, headers, &body).map_err(bad)?;
    let bytes = img.first().ok_or_else(|| bad("no file"))?;
    Ok(custom_answer(model, classify(model, bytes)?))
}

/// Serves the example upstream on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    model: Model,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(model))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_centroids_decode_and_classify_themselves() {
        decode(CENTROIDS_PNG, 280 * 28).unwrap();
        let m = NearestCentroid::bundled();
        for c in 0..10 {
            let px: Vec<u8> = m.centroids[c]
                .iter()
                .map(|v| (v * 255.0).round() as u8)
                .collect();
            let img = Image {
                width: 28,
                height: 28,
                channels: 1,
                pixels: px,
            };
            assert_eq!(argmax(&m.logits(&img)), c);
        }
    }
}
