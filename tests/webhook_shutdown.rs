//! Webhook signatures a receiver can verify, queued reports delivered at shutdown, and the ones a
//! too-short grace period leaves counted. Its own binary: its deliveries must not reach the
//! counters `webhook.rs` asserts on.

mod common;

use std::time::Duration;

use common::webhook::*;
use common::*;

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

/// Past the grace period the delivery task is stopped, and what it leaves — the report being sent
/// and those still queued — is counted as dropped, none forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_left_when_the_grace_period_ends_are_all_counted() {
    use diffguard::config::WebhookConfig;
    use diffguard::guard::{Verdict, VerdictReport};
    use diffguard::webhook::Webhook;

    // Each answer takes 10 s: the first report is still being sent when the 300 ms grace ends.
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = arrived.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                "late"
            }
        }),
    );
    let hook = Upstream::router(app).await;
    let cfg = WebhookConfig {
        url: Some(format!("{}/hook", hook.url())),
        timeout_ms: 20_000,
        ..WebhookConfig::default()
    };
    let webhook = Webhook::start(&cfg).unwrap().unwrap();
    for i in 0..3 {
        webhook.notify(&VerdictReport {
            id: format!("r{i}").into(),
            route: "r".into(),
            verdict: Verdict::Ood,
            detector: "test".into(),
            instances: Vec::new(),
        });
    }
    wait_until("the first report reaches the receiver", || {
        arrived.load(std::sync::atomic::Ordering::SeqCst) > 0
    })
    .await;
    let started = std::time::Instant::now();
    assert_eq!(webhook.shutdown(Duration::from_millis(300)).await, 3);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown waited for the receiver"
    );
    assert_eq!(
        arrived.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "in order: the others never left the queue"
    );
}
