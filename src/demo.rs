//! `diffguard demo`: the example upstream and the guard on loopback ephemeral ports, a handful of
//! bundled real images sent through, one table printed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::{Config, DEFAULT_TOML};
use crate::guard::Detector;
use crate::upstream::{self, FASHION_CLASSES};

/// Bundled images: name, ground truth, bytes. Fashion-MNIST test images are in-distribution for
/// the Fashion-MNIST models; MNIST digits are out-of-distribution.
pub const IMAGES: [(&str, &str, &[u8]); 9] = [
    (
        "fashion-0000-boot.png",
        "Ankle boot (InD)",
        include_bytes!("../examples/assets/images/fashion-0000-boot.png"),
    ),
    (
        "fashion-0002-trouser.png",
        "Trouser (InD)",
        include_bytes!("../examples/assets/images/fashion-0002-trouser.png"),
    ),
    (
        "fashion-0009-sneaker.png",
        "Sneaker (InD)",
        include_bytes!("../examples/assets/images/fashion-0009-sneaker.png"),
    ),
    (
        "fashion-0018-bag.png",
        "Bag (InD)",
        include_bytes!("../examples/assets/images/fashion-0018-bag.png"),
    ),
    (
        "fashion-0019-tshirt.png",
        "T-shirt/top (InD)",
        include_bytes!("../examples/assets/images/fashion-0019-tshirt.png"),
    ),
    (
        "fashion-0013-dress.png",
        "Dress (InD)",
        include_bytes!("../examples/assets/images/fashion-0013-dress.png"),
    ),
    (
        "mnist-digit2.png",
        "digit 2 (OOD)",
        include_bytes!("../examples/assets/images/mnist-digit2.png"),
    ),
    (
        "mnist-digit3.png",
        "digit 3 (OOD)",
        include_bytes!("../examples/assets/images/mnist-digit3.png"),
    ),
    (
        "mnist-digit7.png",
        "digit 7 (OOD)",
        include_bytes!("../examples/assets/images/mnist-digit7.png"),
    ),
];

/// One row of the demo table.
#[derive(Debug, Clone)]
pub struct DemoRow {
    /// Image file.
    pub image: String,
    /// Ground truth.
    pub truth: String,
    /// HTTP status from the guard.
    pub status: u16,
    /// Predicted class (from the guard's label header).
    pub predicted: String,
    /// `diffguard-verdict`.
    pub verdict: String,
    /// `diffguard-score`.
    pub score: String,
    /// `diffguard-threshold`.
    pub threshold: String,
    /// `diffguard-cache`.
    pub cache: String,
    /// Round trip through the guard.
    pub latency: Duration,
}

/// Runs the demo with `detector` in front of `classifier` (the example upstream's model); returns
/// the rows (the caller prints them).
pub async fn run(
    detector: Arc<dyn Detector>,
    classifier: Arc<dyn upstream::Classifier>,
    wait_ms: u64,
) -> anyhow::Result<Vec<DemoRow>> {
    let up = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let up_addr = up.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let up_task = tokio::spawn(upstream::serve(
        up,
        classifier,
        stop.clone().cancelled_owned(),
    ));

    let mut cfg = Config::from_toml(DEFAULT_TOML)?;
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.server.ops_listen = "127.0.0.1:0".into();
    cfg.routes[0].upstream = format!("http://{up_addr}");
    cfg.routes[0].policy.wait_ms = wait_ms;
    let server = crate::server::start(&cfg, detector).await?;

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut rows = Vec::new();
    // The first image twice: the second answer comes from the verdict cache.
    let sends = IMAGES.iter().chain(IMAGES.iter().take(1));
    for (name, truth, bytes) in sends {
        let req = http::Request::post(format!("http://{}/predictions/fashion", server.addr))
            .header("content-type", "image/png")
            .body(Full::new(Bytes::from_static(bytes)))?;
        let t = Instant::now();
        let resp = client.request(req).await?;
        let status = resp.status().as_u16();
        let h = |k: &str| {
            resp.headers()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        let (verdict, score, threshold, cache, label) = (
            h("diffguard-verdict"),
            h("diffguard-score"),
            h("diffguard-threshold"),
            h("diffguard-cache"),
            h("diffguard-label"),
        );
        let _ = resp.into_body().collect().await?;
        let latency = t.elapsed();
        let predicted = label
            .parse::<usize>()
            .ok()
            .and_then(|l| FASHION_CLASSES.get(l))
            .map_or(label, |s| s.to_string());
        rows.push(DemoRow {
            image: name.to_string(),
            truth: truth.to_string(),
            status,
            predicted,
            verdict,
            score,
            threshold,
            cache,
            latency,
        });
    }
    server.shutdown().await;
    stop.cancel();
    let _ = up_task.await;
    Ok(rows)
}

/// Formats the rows as a fixed-width table.
pub fn table(rows: &[DemoRow]) -> String {
    let mut s = format!(
        "{:<26} {:<18} {:>4} {:<12} {:<16} {:>9} {:>9} {:<5} {:>9}\n",
        "image", "truth", "http", "predicted", "verdict", "score", "threshold", "cache", "latency"
    );
    for r in rows {
        s.push_str(&format!(
            "{:<26} {:<18} {:>4} {:<12} {:<16} {:>9} {:>9} {:<5} {:>7.1}ms\n",
            r.image,
            r.truth,
            r.status,
            r.predicted,
            r.verdict,
            trim(&r.score),
            trim(&r.threshold),
            r.cache,
            r.latency.as_secs_f64() * 1000.0
        ));
    }
    s
}

fn trim(s: &str) -> String {
    s.parse::<f32>()
        .map_or_else(|_| s.to_string(), |v| format!("{v:.4}"))
}
