//! The model-free `logits` detector end to end: built from config as `diffguard serve` builds it,
//! in front of a real upstream on loopback whose answers carry scores; verdicts are ready with
//! the response and readable by id afterwards (from the registry's settled form).

mod common;

use axum::Json;
use axum::extract::Request;
use common::*;
use diffguard::guard::build_detector;

/// Answers a confident score vector for dark images and a flat one for bright images.
async fn scores(req: Request) -> Json<serde_json::Value> {
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    let img = image::load_from_memory(&body).unwrap().to_luma8();
    let dark = img.pixels().map(|p| u32::from(p.0[0])).sum::<u32>() < 128 * img.len() as u32;
    let s: Vec<f32> = if dark {
        vec![0.0, 0.0, 0.0, 11.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    } else {
        vec![1.0, 1.1, 1.0, 1.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    };
    Json(serde_json::json!({ "scores": s }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn energy_on_upstream_logits_rejects_flat_answers() {
    let up = Upstream::router(axum::Router::new().fallback(scores)).await;
    let b = guard()
        .with("[detector]\nkind = \"logits\"\n[detector.settings]\nthreshold = -5.0\n")
        .route(
            &up,
            "name = \"s\"\nprefix = \"/p\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\n\
             response = { kind = \"argmax\", pointer = \"/scores\" }\npolicy = { mode = \"reject\" }",
        );
    let detector = build_detector(&b.config().detector).expect("logits detector from config");
    let g = b.start(detector).await;
    assert_eq!(g.ops("/readyz").await.status, 200);

    let ok = g.post("/p", "image/png", dark()).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.h("diffguard-verdict"), Some("in-distribution"));
    let bad = g.post("/p", "image/png", bright()).await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    assert_eq!(bad.json()["diffguard"]["verdict"], "ood");

    // The verdict is final at response time: the registry keeps it settled and serves it by id.
    let id = ok.h("diffguard-id").expect("verdict id").to_string();
    let v = g.get(&format!("/diffguard/v1/verdicts/{id}")).await;
    assert_eq!(v.status, 200);
    let report = v.json();
    assert_eq!(report["verdict"], "in-distribution");
    let score = report["instances"][0]["score"].as_f64().expect("score");
    // energy = −logsumexp(11, 0 × 9) = −(11 + ln(1 + 9e⁻¹¹)).
    let want = -(11.0 + (1.0 + 9.0 * (-11f64).exp()).ln());
    assert!((score - want).abs() < 1e-4, "{score} vs {want}");
    let sse = g.get(&format!("/diffguard/v1/verdicts/{id}/events")).await;
    assert!(sse.text().contains("event: verdict"), "{}", sse.text());
    assert!(sse.text().contains("in-distribution"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_scores_are_unverified_with_the_reason() {
    let up = Upstream::router(
        axum::Router::new().fallback(|| async { Json(serde_json::json!({ "label": 3 })) }),
    )
    .await;
    let b = guard()
        .with("[detector]\nkind = \"logits\"\n[detector.settings]\nthreshold = -5.0\n")
        .route(
            &up,
            "name = \"s\"\nprefix = \"/p\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\n\
             response = { kind = \"pointer_index\", pointer = \"/label\" }\n\
             policy = { mode = \"flag\", wait_ms = 2000 }\ninject_body = true",
        );
    let detector = build_detector(&b.config().detector).expect("detector");
    let g = b.start(detector).await;
    let r = g.post("/p", "image/png", dark()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.h("diffguard-verdict"), Some("unverified"));
    assert!(
        r.json()["diffguard"]["instances"][0]["reason"]
            .as_str()
            .expect("reason")
            .contains("no scores")
    );
}

#[tokio::test]
async fn a_logits_detector_without_threshold_fails_at_start_naming_the_key() {
    let b = guard().with("[detector]\nkind = \"logits\"\n").route(
        &Upstream::router(axum::Router::new()).await,
        "name = \"s\"\nprefix = \"/p\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\n\
         response = { kind = \"argmax\", pointer = \"/scores\" }",
    );
    let err = build_detector(&b.config().detector)
        .err()
        .expect("must refuse");
    assert!(
        err.to_string().contains("detector.settings.threshold"),
        "{err}"
    );
}
