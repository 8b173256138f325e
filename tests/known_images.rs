//! A request image is decoded once per guard: a cache hit on an image decoded before only hashes
//! it, and a miss for it decodes it then. Its own test binary, because it reads a process-wide
//! counter that other tests' requests would move.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_images_are_decoded_only_on_a_miss() {
    // The upstream predicts the class named in the path, so one image can get two labels.
    let app = axum::Router::new().route(
        "/predictions/{class}",
        axum::routing::post(
            |axum::extract::Path(class): axum::extract::Path<String>| async move {
                axum::Json(serde_json::json!({ class: 0.9 }))
            },
        ),
    );
    let up = Upstream::router(app).await;
    let det = TestDetector::new();
    let route = "name = \"r\"\nprefix = \"/predictions/\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\nresponse = { kind = \"top_key\" }\npolicy = { mode = \"flag\", wait_ms = 5000 }\nlabels = [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\", \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]";
    let g = guard().route(&up, route).start(det.clone()).await;
    let decoded = |m: &str| metric_sum(m, "diffguard_images_decoded_total", "");
    let img = bright();

    let first = g.post("/predictions/Bag", "image/png", img.clone()).await;
    assert_eq!(first.h("diffguard-cache"), Some("miss"));
    assert_eq!(decoded(&g.ops("/metrics").await.text()), 1.0);

    // Same image, same label: a hit, and the image is only hashed.
    let hit = g.post("/predictions/Bag", "image/png", img.clone()).await;
    assert_eq!(hit.h("diffguard-cache"), Some("hit"));
    assert_eq!(decoded(&g.ops("/metrics").await.text()), 1.0);

    // Same image, new label: a miss, so its pixels are decoded now and scored as they are.
    let miss = g.post("/predictions/Coat", "image/png", img).await;
    assert_eq!(miss.h("diffguard-cache"), Some("miss"));
    assert_eq!(miss.h("diffguard-verdict"), Some("ood"));
    assert_eq!(decoded(&g.ops("/metrics").await.text()), 2.0);
    assert_eq!(*det.labels_seen.lock().unwrap(), vec![8, 4]);
    let score: f32 = miss.h("diffguard-score").unwrap().parse().unwrap();
    assert!((score - 240.0 / 255.0).abs() < 1e-4, "{score}");

    // A different image that is not decodable is still refused before the upstream is called.
    let bad = g
        .post("/predictions/Bag", "image/png", b"not an image".to_vec())
        .await;
    assert_eq!(bad.status, 400);
}
