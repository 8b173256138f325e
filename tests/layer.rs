//! `DiffGuardLayer` used in-process, around a Rust service's own classifier route (no proxy).

mod common;

use std::collections::BTreeMap;

use axum::Router;
use axum::routing::post;
use common::*;
use diffguard::config::{
    Config, FailMode, PolicyConfig, PolicyMode, RequestAdapterConfig, ResponseAdapterConfig,
};
use diffguard::guard::{DiffGuardLayer, Guard, RouteGuard};
use diffguard::proxy::response::LabelMap;

async fn own_classifier() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"label": 3, "logits": [0.1, 0.2, 0.3, 2.0]}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_guards_an_in_process_route() {
    let cfg: Config = guard().route(&Upstream::example().await, "name = \"unused\"\nprefix = \"/unused\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\nresponse = { kind = \"argmax\", pointer = \"/x\" }").config();
    let det = TestDetector::new();
    let shared = Guard::new(&cfg, det.clone()).unwrap();
    let route = RouteGuard {
        name: "own".into(),
        span_name: "/classify".into(),
        request: RequestAdapterConfig::Raw,
        response: ResponseAdapterConfig::PointerIndex {
            pointer: "/label".into(),
            logits: Some("/logits".into()),
        },
        policy: PolicyConfig {
            mode: PolicyMode::Reject,
            wait_ms: 2_000,
            fail_mode: FailMode::Open,
        },
        labels: LabelMap::new(Vec::new(), &BTreeMap::new(), 10),
        inject_body: false,
    };
    let app = Router::new()
        .route(
            "/classify",
            post(own_classifier).layer(DiffGuardLayer::new(shared, route)),
        )
        .route("/other", post(own_classifier));
    let up = Upstream::router(app).await;
    let c = client();
    let post = |path: &str, img: Vec<u8>| {
        http::Request::post(format!("{}{path}", up.url()))
            .header("content-type", "image/png")
            .body(http_body_util::Full::new(bytes::Bytes::from(img)))
            .unwrap()
    };

    let ok = send(&c, post("/classify", dark())).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.h("diffguard-verdict"), Some("in-distribution"));
    assert_eq!(ok.h("diffguard-label"), Some("3"));
    assert_eq!(
        det.logits_seen.lock().unwrap()[0].as_deref(),
        Some(&[0.1, 0.2, 0.3, 2.0][..])
    );

    let rejected = send(&c, post("/classify", bright())).await;
    assert_eq!(rejected.status, 422);
    assert_eq!(rejected.json()["diffguard"]["verdict"], "ood");

    let unguarded = send(&c, post("/other", bright())).await;
    assert_eq!(unguarded.status, 200);
    assert!(
        unguarded.h("diffguard-verdict").is_none(),
        "only the layered route is guarded"
    );
}
