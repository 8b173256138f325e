//! Policies × fail modes (DESIGN §3.6), the wait budget, late verdicts (poll + SSE), the verdict
//! cache, single-flight and the bounded queue, with the deterministic test detector.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use diffguard::guard::{Detector, Verdict};

fn route(mode: &str, fail_mode: &str, wait_ms: u64) -> String {
    format!(
        "name = \"r\"\nprefix = \"/predictions/\"\nupstream = \"{{up}}\"\nrequest = {{ kind = \"raw\" }}\nresponse = {{ kind = \"top_key\" }}\npolicy = {{ mode = \"{mode}\", fail_mode = \"{fail_mode}\", wait_ms = {wait_ms} }}\nlabels = [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\", \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]\ninject_body = true"
    )
}

async fn start(
    up: &Upstream,
    mode: &str,
    fail_mode: &str,
    wait_ms: u64,
    det: Arc<dyn Detector>,
) -> TestGuard {
    guard()
        .with("[detector]\nqueue_capacity = 64")
        .route(up, &route(mode, fail_mode, wait_ms))
        .start(det)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_blocks_ood_with_problem_json_in_both_fail_modes() {
    let up = Upstream::example().await;
    for fm in ["open", "closed"] {
        let g = start(&up, "reject", fm, 5_000, TestDetector::new()).await;
        let r = g.post("/predictions/m", "image/png", bright()).await;
        assert_eq!(r.status, 422, "{fm}: {}", r.text());
        assert_eq!(r.h("content-type"), Some("application/problem+json"));
        let v = r.json();
        assert_eq!(v["type"], "urn:diffguard:problem:ood");
        assert_eq!(v["diffguard"]["verdict"], "ood");
        assert!(v["diffguard"]["instances"][0]["score"].as_f64().unwrap() > 0.5);
        let ok = g.post("/predictions/m", "image/png", dark()).await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.h("diffguard-verdict"), Some("in-distribution"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_slow_verdict_open_passes_unverified_closed_is_503() {
    let up = Upstream::example().await;
    let g = start(
        &up,
        "reject",
        "open",
        50,
        TestDetector::slow(Duration::from_millis(600)),
    )
    .await;
    let r = g.post("/predictions/m", "image/png", bright()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.h("diffguard-verdict"), Some("unverified"));
    assert!(r.h("diffguard-id").is_some());

    let g = start(
        &up,
        "reject",
        "closed",
        50,
        TestDetector::slow(Duration::from_millis(600)),
    )
    .await;
    let r = g.post("/predictions/m", "image/png", bright()).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.json()["type"],
        "urn:diffguard:problem:verdict-unavailable"
    );
    // A failing detector is "no verdict" too: closed blocks, open passes.
    let g = start(&up, "reject", "closed", 2_000, TestDetector::failing()).await;
    assert_eq!(
        g.post("/predictions/m", "image/png", dark()).await.status,
        503
    );
    let g = start(&up, "reject", "open", 2_000, TestDetector::failing()).await;
    let r = g.post("/predictions/m", "image/png", dark()).await;
    assert_eq!(
        (r.status, r.h("diffguard-verdict")),
        (200, Some("unverified"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_annotates_and_injects_without_blocking() {
    let up = Upstream::example().await;
    for fm in ["open", "closed"] {
        let g = start(&up, "flag", fm, 5_000, TestDetector::new()).await;
        let r = g.post("/predictions/m", "image/png", bright()).await;
        assert_eq!(r.status, 200, "flag never blocks ({fm})");
        assert_eq!(r.h("diffguard-verdict"), Some("ood"));
        let body = r.json();
        assert_eq!(body["diffguard"]["verdict"], "ood");
        let diag = &body["diffguard"]["instances"][0]["diagnostics"];
        // f32 sum of 784 pixels: worst-case rounding ≈ 784 × 6e-8 ≈ 5e-5.
        assert!(
            (diag["mean"].as_f64().unwrap() - 240.0 / 255.0).abs() < 1e-4,
            "{diag}"
        );
        assert_eq!(body["diffguard"]["id"].as_str(), r.h("diffguard-id"));
        assert!(
            body.as_object().unwrap().len() == 6,
            "5 classes + the diffguard object"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flag_pending_then_late_verdict_by_poll_and_sse() {
    let up = Upstream::example().await;
    let det = TestDetector::slow(Duration::from_millis(700));
    let g = start(&up, "flag", "open", 20, det.clone()).await;
    let r = g.post("/predictions/m", "image/png", bright()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.h("diffguard-verdict"), Some("pending"));
    let id = r.h("diffguard-id").unwrap().to_string();

    let p = g.get(&format!("/diffguard/v1/verdicts/{id}")).await;
    assert_eq!(p.status, 202);
    assert_eq!(p.json()["verdict"], "pending");

    // SSE: one `verdict` event once the detector answers.
    let sse = g.get(&format!("/diffguard/v1/verdicts/{id}/events")).await;
    assert_eq!(sse.status, 200);
    assert_eq!(sse.h("content-type"), Some("text/event-stream"));
    let text = sse.text();
    assert!(text.contains("event: verdict"), "{text}");
    let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(data).unwrap()["verdict"],
        "ood"
    );

    let done = g.get(&format!("/diffguard/v1/verdicts/{id}")).await;
    assert_eq!(done.status, 200);
    assert_eq!(done.json()["instances"][0]["verdict"], "ood");
    assert_eq!(g.get("/diffguard/v1/verdicts/nope").await.status, 404);
    assert_eq!(
        g.get("/diffguard/v1/verdicts/nope/events").await.status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_never_touches_the_response_but_scores() {
    let up = Upstream::example().await;
    let det = TestDetector::new();
    let g = start(&up, "shadow", "closed", 5_000, det.clone()).await;
    let direct = send(
        &client(),
        http::Request::post(format!("{}/predictions/m", up.url()))
            .body(http_body_util::Full::new(bytes::Bytes::from(bright())))
            .unwrap(),
    )
    .await;
    let r = g.post("/predictions/m", "image/png", bright()).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .keys()
            .all(|k| !k.as_str().starts_with("diffguard-"))
    );
    assert_eq!(r.body, direct.body, "body byte-identical to the upstream's");
    // Not decodable: still forwarded (the upstream answers its own 400), nothing scored for it.
    let bad = g
        .post("/predictions/m", "image/png", b"not an image".to_vec())
        .await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"].is_string(),
        "the upstream's own error body"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(det.jobs(), 1, "shadow scores in the background");
    let m = g.ops("/metrics").await.text();
    assert!(
        metric_sum(&m, "diffguard_verdicts_total", "verdict=\"ood\"") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_is_a_plain_proxy() {
    let up = Upstream::example().await;
    let det = TestDetector::new();
    let g = start(&up, "off", "open", 5_000, det.clone()).await;
    let r = g.post("/predictions/m", "image/png", bright()).await;
    assert_eq!(r.status, 200);
    assert!(r.h("diffguard-verdict").is_none());
    assert_eq!(det.jobs(), 0);
}

/// Request and answer bodies far beyond one socket write pass whole, both ways: the listener
/// and the upstream client copy head and body into one write buffer (`writev` off), which must
/// hold back and resume rather than lose or reorder bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_passes_multi_megabyte_bodies_whole_both_ways() {
    use axum::extract::DefaultBodyLimit;
    let echo = axum::Router::new()
        .route(
            "/predictions/m",
            axum::routing::post(|body: bytes::Bytes| async move {
                // Reversed: an answer that is not the request, yet fully determined by it.
                body.iter().rev().copied().collect::<Vec<u8>>()
            }),
        )
        .layer(DefaultBodyLimit::disable());
    let up = Upstream::router(echo).await;
    let g = start(&up, "off", "open", 5_000, TestDetector::new()).await;
    let mut x: u32 = 0x2545_F491;
    let sent: Vec<u8> = (0..3 * 1024 * 1024 + 17)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let r = g
        .post("/predictions/m", "application/octet-stream", sent.clone())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), sent.len());
    assert!(
        r.body.iter().eq(sent.iter().rev()),
        "answer differs from the reversed request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_flight_and_cache_hit() {
    let up = Upstream::example().await;
    let det = TestDetector::slow(Duration::from_millis(300));
    let g = Arc::new(start(&up, "flag", "open", 5_000, det.clone()).await);
    let img = png(28, 28, 77);
    let reqs = (0..16).map(|_| {
        let (g, img) = (g.clone(), img.clone());
        tokio::spawn(async move { g.post("/predictions/m", "image/png", img).await })
    });
    let resps = futures_util::future::join_all(reqs).await;
    for r in &resps {
        let r = r.as_ref().unwrap();
        assert_eq!(r.h("diffguard-verdict"), Some("in-distribution"));
    }
    assert_eq!(
        det.jobs(),
        1,
        "16 concurrent identical requests → one detector job"
    );
    let again = g.post("/predictions/m", "image/png", img.clone()).await;
    assert_eq!(again.h("diffguard-cache"), Some("hit"));
    assert_eq!(again.h("diffguard-verdict"), Some("in-distribution"));
    assert_eq!(det.jobs(), 1);
    let m = g.ops("/metrics").await.text();
    assert!(
        metric_sum(&m, "diffguard_single_flight_joins_total", "") >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_is_unverified_and_counted_never_blocking() {
    let up = Upstream::example().await;
    let det = TestDetector::slow(Duration::from_millis(800));
    let g = Arc::new(
        guard()
            .with("[detector]\nqueue_capacity = 1\nbatch_size = 1\nthreads = 1")
            .route(&up, &route("flag", "open", 10))
            .start(det.clone())
            .await,
    );
    // Distinct images so single-flight does not merge them.
    let reqs = (0..6u8).map(|i| {
        let g = g.clone();
        tokio::spawn(async move {
            let t = std::time::Instant::now();
            let r = g
                .post("/predictions/m", "image/png", png(28, 28, 10 + i))
                .await;
            (r, t.elapsed())
        })
    });
    let resps = futures_util::future::join_all(reqs).await;
    let mut unverified = 0;
    for r in resps {
        let (r, took) = r.unwrap();
        assert_eq!(r.status, 200);
        assert!(
            took < Duration::from_millis(700),
            "a full queue must not block ({took:?})"
        );
        if r.h("diffguard-verdict") == Some("unverified") {
            unverified += 1;
            assert!(
                r.json()["diffguard"]["instances"][0]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("queue full")
            );
        }
    }
    assert!(
        unverified >= 1,
        "with capacity 1 and one slow thread some of 6 must be refused"
    );
    let m = g.ops("/metrics").await.text();
    assert!(metric_sum(&m, "diffguard_jobs_dropped_total", "") >= unverified as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn micro_batches_group_waiting_jobs() {
    let up = Upstream::example().await;
    let det = TestDetector::slow(Duration::from_millis(200));
    let g = Arc::new(
        guard()
            .with("[detector]\nbatch_size = 8\nthreads = 1")
            .route(&up, &route("flag", "open", 5_000))
            .start(det.clone())
            .await,
    );
    let reqs = (0..8u8).map(|i| {
        let g = g.clone();
        tokio::spawn(async move {
            g.post("/predictions/m", "image/png", png(28, 28, 30 + i))
                .await
        })
    });
    for r in futures_util::future::join_all(reqs).await {
        assert_eq!(r.unwrap().h("diffguard-verdict"), Some("in-distribution"));
    }
    assert_eq!(det.jobs(), 8);
    let batches = det.batches.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        batches < 8,
        "jobs queued behind a busy thread are batched (got {batches} batches)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints() {
    let up = Upstream::example().await;
    let g = start(&up, "flag", "open", 1_000, TestDetector::new()).await;
    assert_eq!(g.ops("/healthz").await.status, 200);
    let ready = g.ops("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["detector_fingerprint"], "test-mean-intensity");
    let api = g.ops("/openapi.json").await.json();
    assert!(api["paths"]["/diffguard/v1/verdicts/{id}"].is_object());
    g.post("/predictions/m", "image/png", dark()).await;
    let m = g.ops("/metrics").await.text();
    for name in [
        "diffguard_requests_total",
        "diffguard_upstream_seconds",
        "diffguard_added_seconds",
        "diffguard_cache_lookups_total",
        "diffguard_jobs_total",
        "diffguard_engine_seconds",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    // A detector whose models are not usable says so on /readyz, and its verdicts are
    // `unverified` with its reason.
    let unready = start(&up, "flag", "open", 1_000, Arc::new(NotReady)).await;
    assert_eq!(unready.ops("/readyz").await.status, 503);
    let r = unready.post("/predictions/m", "image/png", dark()).await;
    assert_eq!(r.h("diffguard-verdict"), Some("unverified"));
    assert!(
        r.json()["diffguard"]["instances"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("models not loaded")
    );
}

/// A detector whose models are not loaded: not ready, every job fails with the reason.
struct NotReady;

impl diffguard::guard::Detector for NotReady {
    fn fingerprint(&self) -> String {
        "not-ready".into()
    }
    fn ready(&self) -> bool {
        false
    }
    fn score(
        &self,
        jobs: &[diffguard::guard::Job],
    ) -> Vec<Result<diffguard::guard::Score, diffguard::guard::DetectorError>> {
        jobs.iter()
            .map(|_| {
                Err(diffguard::guard::DetectorError::Unavailable(
                    "models not loaded".into(),
                ))
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_drains_in_flight_requests() {
    let slow = axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        axum::Json(serde_json::json!({"Bag": 0.9}))
    });
    let up = Upstream::router(slow).await;
    let mut g = start(&up, "flag", "open", 1_000, TestDetector::new()).await;
    let (client, addr) = (g.client.clone(), g.addr());
    let inflight = tokio::spawn(async move {
        send(
            &client,
            http::Request::post(format!("http://{addr}/predictions/m"))
                .body(http_body_util::Full::new(bytes::Bytes::from(dark())))
                .unwrap(),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    g.stop().await;
    let r = inflight.await.unwrap();
    assert_eq!(r.status, 200, "in-flight request finished during shutdown");
    assert_eq!(r.h("diffguard-verdict"), Some("in-distribution"));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

/// A request answered `pending` leaves a task that settles its verdict id when the detector
/// answers. That task must outlive the proxy I/O thread that served the request, whose runtime
/// ends with its listener: after shutdown, the id still settles.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_verdict_settles_after_the_io_threads_have_stopped() {
    use diffguard::guard::registry::Entry;
    let up = Upstream::example().await;
    let mut g = start(
        &up,
        "flag",
        "open",
        20,
        TestDetector::slow(Duration::from_millis(600)),
    )
    .await;
    let r = g.post("/predictions/m", "image/png", bright()).await;
    assert_eq!(r.h("diffguard-verdict"), Some("pending"));
    let id = r.h("diffguard-id").unwrap().to_string();
    let guard = g.server.as_ref().unwrap().guard.clone();
    // Stops the I/O threads at once (nothing in flight), then waits for the queued job.
    g.stop().await;
    wait_until("the late verdict settles its id", || {
        matches!(guard.registry().get(&id), Some(Entry::Settled(_)))
    })
    .await;
    let Some(Entry::Settled(report)) = guard.registry().get(&id) else {
        unreachable!()
    };
    assert_eq!(report.verdict, Verdict::Ood);
}

/// The proxy listener's own accept loop serves HTTP/1.1 and HTTP/2 (prior knowledge) alike, and
/// dispatches by path: routes, the verdict API under its prefix, 404 elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_http2_and_dispatches_routes_api_and_unknown_paths() {
    let up = Upstream::example().await;
    let g = start(&up, "flag", "open", 5_000, TestDetector::new()).await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let url = |path: &str| format!("http://{}{path}", g.addr());
    let r = send(
        &h2,
        http::Request::post(url("/predictions/m"))
            .header("content-type", "image/png")
            .body(http_body_util::Full::new(bytes::Bytes::from(dark())))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.h("diffguard-verdict"), Some("in-distribution"));
    let id = r.h("diffguard-id").expect("an id").to_string();

    let get = |path: String| {
        http::Request::get(url(&path))
            .body(Default::default())
            .unwrap()
    };
    let verdict = send(&h2, get(format!("/diffguard/v1/verdicts/{id}"))).await;
    assert_eq!(verdict.status, 200, "{}", verdict.text());
    assert_eq!(verdict.json()["verdict"], "in-distribution");
    assert_eq!(verdict.json()["id"], id.as_str());
    // The API's prefix with no endpoint behind it, and a path no route claims: both 404.
    for path in ["/diffguard/v1/nothing", "/elsewhere"] {
        let r = send(&h2, get(path.into())).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        let over_h1 = g.get(path).await;
        assert_eq!(over_h1.status, 404, "{path} over HTTP/1.1");
    }
}
