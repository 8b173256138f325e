//! `telemetry.log_spans` on the real binary: off (the default), a log line written inside a request
//! carries no span context — the request span's fields are never formatted for the log; on, the
//! same line (the `diffguard.ood` warning) is prefixed with the request span and its fields. The
//! filter is `info`, the level of the request span, so only `log_spans` decides.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Json;
use axum::routing::post;
use common::*;

/// Uniform scores: energy −ln 10 ≈ −2.3, above the threshold, so every image is OOD.
async fn upstream() -> Upstream {
    let app = axum::Router::new().route(
        "/predictions/m",
        post(|| async { Json(serde_json::json!({ "scores": vec![0.0_f64; 10] })) }),
    );
    Upstream::router(app).await
}

/// Kills the guard however the test ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the guard with `log_spans`, sends one image through it, and returns what it logged.
async fn log_of_one_ood_request(log_spans: bool) -> String {
    let up = upstream().await;
    let (port, ops) = (free_port(), free_port());
    let config = std::env::temp_dir().join(format!(
        "diffguard-log-spans-{}-{log_spans}.toml",
        std::process::id()
    ));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nops_listen = \"127.0.0.1:{ops}\"\n\
             [detector]\nkind = \"logits\"\nnum_classes = 10\n\
             [detector.settings]\nmethod = \"energy\"\nthreshold = -6.0\n\
             [telemetry]\nlog_filter = \"info\"\nlog_spans = {log_spans}\n\
             [[routes]]\nname = \"spans\"\nprefix = \"/predictions/\"\nupstream = \"{}\"\n\
             request = {{ kind = \"raw\" }}\nresponse = {{ kind = \"argmax\", pointer = \"/scores\" }}\n\
             policy = {{ mode = \"flag\", wait_ms = 2000 }}\n",
            up.url()
        ),
    )
    .unwrap();
    let mut guard = Guard(
        Command::new(env!("CARGO_BIN_EXE_diffguard"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client = client();
    let url = format!("http://127.0.0.1:{port}/predictions/m");
    let deadline = Instant::now() + Duration::from_secs(20);
    let response = loop {
        let req = http::Request::post(&url)
            .header("content-type", "image/png")
            .body(http_body_util::Full::new(bytes::Bytes::from(bright())))
            .unwrap();
        match tokio::time::timeout(Duration::from_secs(5), client.request(req)).await {
            Ok(Ok(r)) => break r,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            other => panic!("guard never answered: {other:?}"),
        }
    };
    assert_eq!(response.headers()["diffguard-verdict"], "ood");
    let _ = std::fs::remove_file(&config);
    // The warning is written before the answer leaves; stopping the guard flushes stderr.
    let _ = guard.0.kill();
    let mut log = String::new();
    guard
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_context_is_logged_only_when_asked_for() {
    let ood_line = |log: &str| -> String {
        log.lines()
            .find(|l| l.contains("diffguard.ood"))
            .unwrap_or_else(|| panic!("no diffguard.ood line in:\n{log}"))
            .to_string()
    };
    let off = ood_line(&log_of_one_ood_request(false).await);
    assert!(
        !off.contains("diffguard.request") && !off.contains("http.request.method"),
        "span fields formatted although log_spans is off: {off}"
    );
    let on = ood_line(&log_of_one_ood_request(true).await);
    assert!(
        on.contains("http.request.method"),
        "no request span context although log_spans is on: {on}"
    );
}
