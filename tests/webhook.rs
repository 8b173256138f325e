//! The webhook on OOD verdicts against real HTTP receivers on loopback: one POST per OOD verdict
//! carrying its report, none for in-distribution, retries on 5xx, a dead endpoint that never
//! touches the client's answer, signatures a receiver can verify, and queued reports delivered
//! at shutdown. Its own binary: it reads process-wide delivery counters.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::*;

const ROUTE: &str = "name = \"r\"\nprefix = \"/predictions/\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\nresponse = { kind = \"top_key\" }\npolicy = { mode = \"flag\", wait_ms = 5000 }\nlabels = [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\", \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]";

/// What a receiver got: headers and body of each POST, in order.
type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
}

/// A receiver answering the given statuses in turn (the last one from then on).
async fn receiver(statuses: Vec<u16>) -> (Upstream, Received) {
    slow_receiver(statuses, Duration::ZERO).await
}

/// The same, taking `delay` over each answer.
async fn slow_receiver(statuses: Vec<u16>, delay: Duration) -> (Upstream, Received) {
    let got: Received = Arc::default();
    let g = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let g = g.clone();
            let statuses = statuses.clone();
            async move {
                tokio::time::sleep(delay).await;
                let mut got = g.lock().unwrap();
                got.push((headers, body));
                let s = statuses[(got.len() - 1).min(statuses.len() - 1)];
                StatusCode::from_u16(s).unwrap()
            }
        }),
    );
    (Upstream::router(app).await, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ood_reports_are_posted_retried_and_never_delay_the_answer() {
    let up = Upstream::example().await;
    // First attempt 503, then 200: the one OOD report arrives twice, the second time accepted.
    let (hook, got) = receiver(vec![503, 200]).await;
    let g = guard()
        .with(&format!("[webhook]\nurl = \"{}/hook\"", hook.url()))
        .route(&up, ROUTE)
        .start(TestDetector::new())
        .await;

    // In-distribution first: the delivery task is FIFO, so a report for it would arrive first.
    let fine = g.post("/predictions/m", "image/png", dark()).await;
    assert_eq!(fine.h("diffguard-verdict"), Some("in-distribution"));
    let ood = g.post("/predictions/m", "image/png", bright()).await;
    assert_eq!(ood.status, 200, "flag never blocks");
    assert_eq!(ood.h("diffguard-verdict"), Some("ood"));
    let id = ood.h("diffguard-id").unwrap().to_string();

    wait_until("two attempts", || got.lock().unwrap().len() == 2).await;
    for (headers, body) in got.lock().unwrap().iter() {
        let report = json(body);
        assert_eq!(report["id"], id.as_str());
        assert_eq!(report["verdict"], "ood");
        assert_eq!(report["route"], "r");
        assert!(report["instances"][0]["score"].as_f64().unwrap() > 0.5);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["diffguard-event"], "ood");
        assert!(
            headers.get("diffguard-signature").is_none(),
            "no secret, no signature"
        );
    }
    let text = g.ops("/metrics").await.text();
    assert_eq!(
        metric_sum(&text, "diffguard_webhook_deliveries_total", "result=\"ok\""),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_sum(
            &text,
            "diffguard_webhook_deliveries_total",
            "result=\"failed\""
        ),
        0.0
    );
    drop(g);

    // A dead endpoint: the answer is unchanged and the failure is counted after the retries.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/hook", dead.local_addr().unwrap());
    drop(dead);
    let g = guard()
        .with(&format!("[webhook]\nurl = \"{dead_url}\"\nretries = 1"))
        .route(&up, ROUTE)
        .start(TestDetector::new())
        .await;
    let started = Instant::now();
    let ood = g.post("/predictions/m", "image/png", bright()).await;
    assert_eq!(ood.status, 200);
    assert_eq!(ood.h("diffguard-verdict"), Some("ood"));
    assert!(started.elapsed() < Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = g.ops("/metrics").await.text();
        let failed = metric_sum(
            &text,
            "diffguard_webhook_deliveries_total",
            "result=\"failed\"",
        );
        if failed >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "failed delivery never counted: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        got.lock().unwrap().len(),
        2,
        "nothing more reached the first receiver"
    );
}

/// Checks `t=<unix>,v1=<hex>` against HMAC-SHA256(secret, "<t>.<body>") as a receiver would,
/// and that the timestamp is within a minute of now.
fn verify(secret: &str, header: &str, body: &[u8]) -> Result<(), String> {
    let (t, v1) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
        .ok_or_else(|| format!("malformed signature {header:?}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t_secs: u64 = t.parse().map_err(|e| format!("timestamp {t:?}: {e}"))?;
    if now.abs_diff(t_secs) > 60 {
        return Err(format!("stale timestamp {t}"));
    }
    let tag: Vec<u8> = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&v1[i..i + 2], 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("hex {v1:?}: {e}"))?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signed = [t.as_bytes(), b".", body].concat();
    ring::hmac::verify(&key, &signed, &tag).map_err(|_| "signature does not verify".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_reports_verify_and_queued_ones_are_delivered_at_shutdown() {
    const SECRET: &str = "s3cret-for-the-webhook-test";
    const REPORTS: usize = 4;
    let up = Upstream::example().await;
    // 250 ms per answer: the reports are still queued when the guard is told to stop.
    let (hook, got) = slow_receiver(vec![200], Duration::from_millis(250)).await;
    let mut g = guard()
        .with(&format!(
            "[webhook]\nurl = \"{}/hook\"\nsecret = \"{SECRET}\"",
            hook.url()
        ))
        .route(&up, ROUTE)
        .start(TestDetector::new())
        .await;
    let mut ids = Vec::new();
    for _ in 0..REPORTS {
        let ood = g.post("/predictions/m", "image/png", bright()).await;
        assert_eq!(ood.h("diffguard-verdict"), Some("ood"));
        ids.push(ood.h("diffguard-id").unwrap().to_string());
    }
    assert!(
        got.lock().unwrap().len() < REPORTS,
        "the receiver is too fast for this test to show the drain"
    );
    g.server.take().unwrap().shutdown().await;

    let got = got.lock().unwrap();
    let delivered: Vec<String> = got
        .iter()
        .map(|(_, body)| json(body)["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        delivered, ids,
        "every queued report, in order, before shutdown returned"
    );
    for (headers, body) in got.iter() {
        let sig = headers["diffguard-signature"].to_str().unwrap();
        verify(SECRET, sig, body).unwrap();
        assert!(verify("another-secret-of-enough-length", sig, body).is_err());
        let mut tampered = body.to_vec();
        tampered.push(b' ');
        assert!(verify(SECRET, sig, &tampered).is_err());
    }
}
