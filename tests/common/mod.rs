//! Test harness: upstream → guard → client on loopback ephemeral ports, plus a deterministic
//! test detector (the `Detector` trait is the seam; its verdicts are controlled here).
#![allow(dead_code)]

pub mod otlp;
pub mod webhook;

use std::collections::HashMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use base64::Engine as _;
use bytes::Bytes;
use diffguard::config::Config;
use diffguard::guard::{Detector, DetectorError, Job, Score};
use diffguard::server::RunningServer;
use http::HeaderMap;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio_util::sync::CancellationToken;

/// Scores an image by its mean intensity in [0, 1] against `threshold`: dark images are
/// in-distribution, bright ones OOD. Optionally slow or failing; counts jobs and batches.
pub struct TestDetector {
    pub threshold: f32,
    pub delay: Duration,
    pub fail: bool,
    pub jobs: AtomicUsize,
    pub batches: AtomicUsize,
    pub labels_seen: Mutex<Vec<u32>>,
    pub logits_seen: Mutex<Vec<Option<Vec<f32>>>>,
}

impl TestDetector {
    pub fn new() -> Arc<Self> {
        Self::with(Duration::ZERO, false)
    }
    pub fn slow(delay: Duration) -> Arc<Self> {
        Self::with(delay, false)
    }
    pub fn failing() -> Arc<Self> {
        Self::with(Duration::ZERO, true)
    }
    fn with(delay: Duration, fail: bool) -> Arc<Self> {
        Arc::new(Self {
            threshold: 0.5,
            delay,
            fail,
            jobs: AtomicUsize::new(0),
            batches: AtomicUsize::new(0),
            labels_seen: Mutex::new(Vec::new()),
            logits_seen: Mutex::new(Vec::new()),
        })
    }
    pub fn jobs(&self) -> usize {
        self.jobs.load(Ordering::SeqCst)
    }
}

impl Detector for TestDetector {
    fn fingerprint(&self) -> String {
        "test-mean-intensity".into()
    }
    fn score(&self, jobs: &[Job]) -> Vec<Result<Score, DetectorError>> {
        std::thread::sleep(self.delay);
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.jobs.fetch_add(jobs.len(), Ordering::SeqCst);
        jobs.iter()
            .map(|j| {
                self.labels_seen.lock().unwrap().push(j.label);
                self.logits_seen.lock().unwrap().push(j.logits.clone());
                if self.fail {
                    return Err(DetectorError::Engine("test detector told to fail".into()));
                }
                let px = j.image.to_f32();
                let mean = px.iter().sum::<f32>() / px.len() as f32;
                Ok(Score {
                    score: mean,
                    threshold: self.threshold,
                    diagnostics: Arc::new(
                        [
                            ("mean".to_string(), f64::from(mean)),
                            ("early_stop_step".to_string(), 3.0),
                        ]
                        .into(),
                    ),
                })
            })
            .collect()
    }
}

/// A uniform gray PNG (`value` 0..=255).
pub fn png(w: u32, h: u32, value: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(w, h, image::Luma([value]));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A uniform RGB PNG.
pub fn png_rgb(w: u32, h: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Dark (in-distribution for the test detector) and bright (OOD) 28×28 images.
pub fn dark() -> Vec<u8> {
    png(28, 28, 20)
}
pub fn bright() -> Vec<u8> {
    png(28, 28, 240)
}

/// A running upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Upstream {
    /// The real example classifier server.
    pub async fn example() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(diffguard::upstream::serve(
            l,
            diffguard::upstream::default_classifier(),
            stop.clone().cancelled_owned(),
        ));
        Self { addr, stop }
    }

    /// A hand-written upstream for error cases.
    pub async fn router(app: Router) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
        });
        Self { addr, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Builds a guard config from TOML fragments; listeners on ephemeral loopback ports.
pub struct GuardBuilder {
    server: String,
    head: String,
    routes: Vec<String>,
}

pub fn guard() -> GuardBuilder {
    GuardBuilder {
        server: String::new(),
        head: String::new(),
        routes: Vec::new(),
    }
}

impl GuardBuilder {
    /// Extra keys of the `[server]` table.
    pub fn server(mut self, toml: &str) -> Self {
        self.server.push_str(toml);
        self.server.push('\n');
        self
    }

    /// Extra top-level TOML (e.g. `[cache.redis]`).
    pub fn with(mut self, toml: &str) -> Self {
        self.head.push_str(toml);
        self.head.push('\n');
        self
    }

    /// A `[[routes]]` body (without the header); `{up}` is replaced by the upstream URL.
    pub fn route(mut self, up: &Upstream, body: &str) -> Self {
        self.routes.push(body.replace("{up}", &up.url()));
        self
    }

    pub fn config(&self) -> Config {
        let mut text = String::from(
            "[server]\nlisten = \"127.0.0.1:0\"\nops_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 3000\n",
        );
        text.push_str(&self.server);
        text.push_str(&self.head);
        for r in &self.routes {
            text.push_str("\n[[routes]]\n");
            text.push_str(r);
            text.push('\n');
        }
        Config::from_toml(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
    }

    pub async fn start(self, detector: Arc<dyn Detector>) -> TestGuard {
        let server = diffguard::server::start(&self.config(), detector)
            .await
            .unwrap();
        TestGuard {
            server: Some(server),
            client: client(),
        }
    }
}

/// A loopback port free a moment ago, for servers that cannot report the port they bound
/// (child processes).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct TestGuard {
    pub server: Option<RunningServer>,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Debug)]
pub struct TestResponse {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn h(&self, k: &str) -> Option<&str> {
        self.headers.get(k).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl TestGuard {
    pub fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr
    }
    pub fn ops_addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().ops_addr
    }

    pub async fn send(&self, req: http::Request<Full<Bytes>>) -> TestResponse {
        send(&self.client, req).await
    }

    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
    ) -> TestResponse {
        self.post_with(path, content_type, body, &[]).await
    }

    pub async fn post_with(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> TestResponse {
        let mut b = http::Request::post(format!("http://{}{path}", self.addr()))
            .header("content-type", content_type);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::new(body.into())).unwrap()).await
    }

    pub async fn get(&self, path: &str) -> TestResponse {
        self.send(
            http::Request::get(format!("http://{}{path}", self.addr()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    pub async fn ops(&self, path: &str) -> TestResponse {
        self.send(
            http::Request::get(format!("http://{}{path}", self.ops_addr()))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    req: http::Request<Full<Bytes>>,
) -> TestResponse {
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    TestResponse {
        status,
        headers,
        body,
    }
}

/// Multipart body with one file field.
pub fn multipart(field: &str, file: &[u8]) -> (String, Vec<u8>) {
    let boundary = "diffguardTestBoundary7MA4YWxk";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// What the real example classifier predicts for `png` (label id).
pub fn classifier_label(png: &[u8]) -> usize {
    let img = diffguard::guard::decode::decode(png, 1 << 24).unwrap();
    let l = diffguard::upstream::default_classifier().logits(&img);
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

/// Polls `f` until it holds; fails the test after 8 s.
pub async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts of a metric family's samples in the Prometheus text, keyed by the full sample line prefix.
pub fn metric_sum(text: &str, name: &str, label_filter: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter(|l| l.contains(label_filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Records request headers seen by a test upstream.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<HashMap<String, String>>>>);

impl Seen {
    pub fn push(&self, h: &HeaderMap) {
        let m = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        self.0.lock().unwrap().push(m);
    }
    pub fn last(&self) -> HashMap<String, String> {
        self.0.lock().unwrap().last().cloned().unwrap_or_default()
    }
}
