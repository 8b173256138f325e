//! The webhook on OOD verdicts against real HTTP receivers on loopback: one POST per OOD verdict
//! carrying its report, none for in-distribution, retries on 5xx, and a dead endpoint that never
//! touches the client's answer. Its own binary: it reads process-wide delivery counters (the
//! signing and shutdown test is in `webhook_shutdown.rs` so that its deliveries don't count here).

mod common;

use std::time::{Duration, Instant};

use common::webhook::*;
use common::*;

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
