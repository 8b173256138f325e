//! Malformed input and misbehaving upstreams: each gets the right status, none panics, and the
//! guard keeps serving afterwards.

mod common;

use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use common::*;
use serde_json::json;

fn raw_route(policy: &str) -> String {
    format!(
        "name = \"raw\"\nprefix = \"/predictions/\"\nupstream = \"{{up}}\"\nrequest = {{ kind = \"raw\" }}\nresponse = {{ kind = \"argmax\", pointer = \"/scores\" }}\npolicy = {policy}\ntimeout_ms = 300"
    )
}

/// An upstream that records request headers and answers `{"scores": [...]}` predicting class 3,
/// with a forged `diffguard-verdict` header of its own.
fn recording_upstream(seen: Seen) -> Router {
    Router::new().fallback(move |headers: HeaderMap| {
        let seen = seen.clone();
        async move {
            seen.push(&headers);
            (
                [("diffguard-verdict", "in-distribution")],
                axum::Json(json!({"scores": [0.0, 0.1, 0.2, 0.9, 0.0]})),
            )
                .into_response()
        }
    })
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(&body);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc.sum().to_be_bytes());
}

/// A decompression bomb's shape: a valid PNG declaring `w`×`h` pixels whose IDAT holds only the
/// start of the data (a real bomb would be a few MB of zeros deflated).
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit gray, deflate, no filter, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut z, &vec![0u8; 1 << 16]).unwrap();
    chunk(&mut out, b"IDAT", &z.finish().unwrap());
    chunk(&mut out, b"IEND", &[]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_oversized_images_are_refused_before_the_upstream() {
    let seen = Seen::default();
    let up = Upstream::router(recording_upstream(seen.clone())).await;
    let det = TestDetector::new();
    let g = guard()
        .route(&up, &raw_route("{ mode = \"flag\" }"))
        .start(det.clone())
        .await;

    let r = g
        .post(
            "/predictions/m",
            "image/png",
            b"definitely not an image".to_vec(),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "urn:diffguard:problem:bad-image");

    let full = png(64, 64, 100);
    let r = g
        .post(
            "/predictions/m",
            "image/png",
            full[..full.len() / 2].to_vec(),
        )
        .await;
    assert_eq!(r.status, 400, "truncated PNG: {}", r.text());

    let r = g
        .post("/predictions/m", "image/png", png_header(50_000, 50_000))
        .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["type"], "urn:diffguard:problem:image-too-large");

    let r = g.post("/predictions/m", "image/png", Vec::new()).await;
    assert_eq!(r.status, 400, "empty body");

    assert_eq!(
        seen.0.lock().unwrap().len(),
        0,
        "nothing reached the upstream"
    );
    assert_eq!(det.jobs(), 0);
    // Still serving.
    assert_eq!(
        g.post("/predictions/m", "image/png", dark()).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_body_is_413() {
    let up = Upstream::router(recording_upstream(Seen::default())).await;
    let g = guard()
        .server("max_body_bytes = 2000")
        .route(&up, &raw_route("{ mode = \"reject\" }"))
        .start(TestDetector::new())
        .await;
    let r = g
        .post("/predictions/m", "image/png", vec![0u8; 50_000])
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["type"], "urn:diffguard:problem:body-too-large");
}

#[test]
fn server_section_twice_is_rejected_by_the_config() {
    // The harness composes TOML; a duplicate [server] table must fail loudly, not silently merge.
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n[server]\nmax_body_bytes = 1\n";
    assert!(diffguard::config::Config::from_toml(text).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_requests_invalid_or_missing_field_are_400() {
    let up = Upstream::example().await;
    let g = guard()
        .route(&up, "name = \"j\"\nprefix = \"/classify\"\nupstream = \"{up}\"\nrequest = { kind = \"json_base64\", pointer = \"/image\" }\nresponse = { kind = \"argmax\", pointer = \"/logits\" }")
        .route(&up, "name = \"k\"\nprefix = \"/v1/models/\"\nupstream = \"{up}\"\nrequest = { kind = \"kserve_v1\" }\nresponse = { kind = \"kserve_v1\" }")
        .start(TestDetector::new())
        .await;
    for (path, body) in [
        ("/classify", "{\"image\": "),
        ("/classify", "{\"img\": \"AAAA\"}"),
        ("/classify", "{\"image\": 42}"),
        ("/classify", "{\"image\": \"%%%not base64\"}"),
        ("/v1/models/m:predict", "{\"instances\": []}"),
        ("/v1/models/m:predict", "{\"inputs\": []}"),
    ] {
        let r = g.post(path, "application/json", body).await;
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert_eq!(r.h("content-type"), Some("application/problem+json"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_upstream_answers() {
    let text_up = Upstream::router(Router::new().fallback(|| async { "a cat, probably" })).await;
    let label_up =
        Upstream::router(Router::new().fallback(|| async { axum::Json(json!({"class_id": 42})) }))
            .await;
    let g = guard()
        .route(&text_up, &raw_route("{ mode = \"flag\" }").replace("name = \"raw\"", "name = \"text\""))
        .route(&label_up, "name = \"label\"\nprefix = \"/label\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\nresponse = { kind = \"pointer_index\", pointer = \"/class_id\" }\ninject_body = true")
        .start(TestDetector::new())
        .await;
    let r = g.post("/predictions/m", "image/png", dark()).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        "a cat, probably",
        "non-JSON answer passed through unchanged"
    );
    assert_eq!(r.h("diffguard-verdict"), Some("unverified"));

    let r = g.post("/label", "image/png", dark()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.h("diffguard-verdict"), Some("unverified"));
    let reason = r.json()["diffguard"]["instances"][0]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("outside"), "{reason}");

    // Reject + fail closed: a prediction that cannot be read cannot be vouched for.
    let closed = guard()
        .route(
            &text_up,
            &raw_route("{ mode = \"reject\", fail_mode = \"closed\" }"),
        )
        .start(TestDetector::new())
        .await;
    let r = closed.post("/predictions/m", "image/png", dark()).await;
    assert_eq!(r.status, 502);
    assert_eq!(
        r.json()["type"],
        "urn:diffguard:problem:upstream-unreadable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_slow_or_failing() {
    // A port that was just free: nothing listens.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let slow = Upstream::router(Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        "late"
    }))
    .await;
    let failing = Upstream::router(
        Router::new()
            .fallback(|| async { (http::StatusCode::INTERNAL_SERVER_ERROR, "model crashed") }),
    )
    .await;
    let mut b = guard().route(
        &slow,
        &raw_route("{ mode = \"reject\" }")
            .replace("name = \"raw\"", "name = \"slow\"")
            .replace("/predictions/", "/slow"),
    );
    b = b.route(
        &failing,
        &raw_route("{ mode = \"reject\" }")
            .replace("name = \"raw\"", "name = \"fail\"")
            .replace("/predictions/", "/fail"),
    );
    let mut text = raw_route("{ mode = \"reject\" }")
        .replace("name = \"raw\"", "name = \"dead\"")
        .replace("/predictions/", "/dead");
    text = text.replace("{up}", &format!("http://{dead}"));
    b = b.route(&slow, &text);
    let g = b.start(TestDetector::new()).await;

    let r = g.post("/dead", "image/png", dark()).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.json()["type"],
        "urn:diffguard:problem:upstream-unreachable"
    );
    let t = std::time::Instant::now();
    let r = g.post("/slow", "image/png", dark()).await;
    assert_eq!(r.status, 504);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "timed out at the route's 300 ms, not the upstream's 2 s"
    );
    let r = g.post("/fail", "image/png", dark()).await;
    assert_eq!(r.status, 500, "upstream errors pass through");
    assert_eq!(r.text(), "model crashed");
    assert!(r.h("diffguard-verdict").is_none());
    assert_eq!(g.post("/nowhere", "image/png", dark()).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_headers_are_stripped_and_proxy_headers_set() {
    let seen = Seen::default();
    let up = Upstream::router(recording_upstream(seen.clone())).await;
    let g = guard()
        .route(&up, &raw_route("{ mode = \"flag\" }"))
        .start(TestDetector::new())
        .await;
    let r = g
        .post_with(
            "/predictions/m?x=1",
            "image/png",
            bright(),
            &[
                ("diffguard-verdict", "in-distribution"),
                ("diffguard-score", "0"),
                ("connection", "x-private"),
                ("x-private", "secret"),
                ("x-forwarded-for", "10.0.0.9"),
                ("accept-encoding", "gzip, br"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.h("diffguard-verdict"),
        Some("ood"),
        "the guard's verdict, not the client's or the upstream's"
    );
    let h = seen.last();
    assert!(h.keys().all(|k| !k.starts_with("diffguard-")), "{h:?}");
    assert!(
        !h.contains_key("x-private"),
        "headers named in Connection are hop-by-hop"
    );
    assert_eq!(
        h.get("x-forwarded-for").map(String::as_str),
        Some("10.0.0.9, 127.0.0.1")
    );
    assert_eq!(h.get("x-forwarded-host"), Some(&g.addr().to_string()));
    assert_eq!(h.get("x-forwarded-proto").map(String::as_str), Some("http"));
    assert_eq!(h.get("host"), Some(&up.addr.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodyless_requests_pass_through_unscored() {
    let seen = Seen::default();
    let up = Upstream::router(recording_upstream(seen.clone())).await;
    let det = TestDetector::new();
    let g = guard()
        .route(&up, "name = \"k\"\nprefix = \"/v1/models/\"\nupstream = \"{up}\"\nrequest = { kind = \"kserve_v1\" }\nresponse = { kind = \"kserve_v1\" }\npolicy = { mode = \"reject\", fail_mode = \"closed\" }")
        .start(det.clone())
        .await;
    // Model metadata / readiness calls of the upstream API are not predictions.
    let r = g.get("/v1/models/fashion").await;
    assert_eq!(r.status, 200);
    assert!(r.json()["scores"].is_array(), "the upstream's own answer");
    assert!(
        r.h("diffguard-verdict").is_none(),
        "an upstream cannot forge a verdict header either"
    );
    assert_eq!(seen.0.lock().unwrap().len(), 1);
    assert_eq!(det.jobs(), 0);
}
