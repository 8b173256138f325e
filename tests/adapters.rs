//! Every request and response adapter, end to end through the real example classifier:
//! client → guard → example upstream, with the deterministic test detector.

mod common;

use common::*;
use serde_json::json;

const FASHION_LABELS: &str = r#"labels = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]"#;

fn real_images() -> Vec<&'static [u8]> {
    diffguard::demo::IMAGES.iter().map(|(_, _, b)| *b).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torchserve_raw_image_and_top_key() {
    let up = Upstream::example().await;
    let det = TestDetector::new();
    let g = guard()
        .route(&up, &format!("name = \"ts\"\nprefix = \"/predictions/\"\nupstream = \"{{up}}\"\nrequest = {{ kind = \"raw\" }}\nresponse = {{ kind = \"top_key\" }}\n{FASHION_LABELS}"))
        .start(det.clone())
        .await;
    for img in real_images() {
        let r = g
            .post("/predictions/fashion", "image/png", img.to_vec())
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        // The label the guard read must be what the real classifier predicted.
        assert_eq!(
            r.h("diffguard-label").unwrap(),
            classifier_label(img).to_string()
        );
        // The body is the classifier's, untouched.
        assert!(r.json().as_object().unwrap().len() == 5);
        let v = r.h("diffguard-verdict").unwrap();
        assert!(v == "in-distribution" || v == "ood", "{v}");
    }
    // Bright image → the test detector says OOD; dark → in-distribution.
    let r = g.post("/predictions/fashion", "image/png", bright()).await;
    assert_eq!(r.h("diffguard-verdict"), Some("ood"));
    let score: f32 = r.h("diffguard-score").unwrap().parse().unwrap();
    assert!((score - 240.0 / 255.0).abs() < 1e-4, "{score}");
    // Shortest form that reads back as the same f32.
    assert_eq!(r.h("diffguard-threshold"), Some("0.5"));
    assert_eq!(
        g.post("/predictions/fashion", "image/png", dark())
            .await
            .h("diffguard-verdict"),
        Some("in-distribution")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserve_v1_batch_gives_one_verdict_per_instance() {
    let up = Upstream::example().await;
    let det = TestDetector::new();
    let g = guard()
        .route(&up, "name = \"kserve\"\nprefix = \"/v1/models/\"\nupstream = \"{up}\"\nrequest = { kind = \"kserve_v1\" }\nresponse = { kind = \"kserve_v1\" }\ninject_body = true")
        .start(det.clone())
        .await;
    let body = json!({"instances": [{"b64": b64(&dark())}, {"b64": b64(&bright())}, {"b64": b64(real_images()[1])}]});
    let r = g
        .post(
            "/v1/models/fashion:predict",
            "application/json",
            body.to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.h("diffguard-verdict"), Some("ood"));
    let labels: Vec<String> = r
        .h("diffguard-label")
        .unwrap()
        .split(',')
        .map(String::from)
        .collect();
    assert_eq!(labels.len(), 3);
    assert_eq!(labels[2], classifier_label(real_images()[1]).to_string());
    let v = r.json();
    assert_eq!(
        v["predictions"].as_array().unwrap().len(),
        3,
        "upstream body kept"
    );
    let inst = v["diffguard"]["instances"].as_array().unwrap();
    assert_eq!(inst[0]["verdict"], "in-distribution");
    assert_eq!(inst[1]["verdict"], "ood");
    assert_eq!(det.jobs(), 3);
    // The classifier's probabilities travel with the job as logits.
    assert!(
        det.logits_seen
            .lock()
            .unwrap()
            .iter()
            .all(|l| l.as_ref().is_some_and(|l| l.len() == 10))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_v2_bytes_input_and_fp32_output() {
    let up = Upstream::example().await;
    let g = guard()
        .route(&up, "name = \"oip\"\nprefix = \"/v2/models/\"\nupstream = \"{up}\"\nrequest = { kind = \"oip_v2\", input = \"image\" }\nresponse = { kind = \"oip_v2\", output = \"probabilities\" }")
        .start(TestDetector::new())
        .await;
    let imgs = real_images();
    let body = json!({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": [b64(imgs[0]), b64(imgs[3])]}]});
    let r = g
        .post(
            "/v2/models/fashion/infer",
            "application/json",
            body.to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.h("diffguard-label").unwrap(),
        format!(
            "{},{}",
            classifier_label(imgs[0]),
            classifier_label(imgs[3])
        )
    );
    assert_eq!(r.h("diffguard-cache"), Some("miss,miss"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_json_pointer_index_with_label_ids_and_logits() {
    let up = Upstream::example().await;
    let det = TestDetector::new();
    // Renumber upstream ids i → 9 - i to prove the label map is applied.
    let ids: Vec<String> = (0..10).map(|i| format!("\"{i}\" = {}", 9 - i)).collect();
    let g = guard()
        .route(&up, &format!("name = \"custom\"\nprefix = \"/api/classify\"\nupstream = \"{{up}}/classify\"\nstrip_prefix = true\nrequest = {{ kind = \"json_base64\", pointer = \"/image\" }}\nresponse = {{ kind = \"pointer_index\", pointer = \"/result/class_id\", logits = \"/logits\" }}\nlabel_ids = {{ {} }}", ids.join(", ")))
        .start(det.clone())
        .await;
    let img = real_images()[2];
    let r = g
        .post(
            "/api/classify",
            "application/json",
            json!({"image": b64(img)}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.h("diffguard-label").unwrap(),
        (9 - classifier_label(img)).to_string()
    );
    assert_eq!(
        det.logits_seen.lock().unwrap()[0].as_ref().map(Vec::len),
        Some(10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_field_and_pointer_name() {
    let up = Upstream::example().await;
    let g = guard()
        .route(&up, &format!("name = \"upload\"\nprefix = \"/upload\"\nupstream = \"{{up}}\"\nrequest = {{ kind = \"multipart\", field = \"file\" }}\nresponse = {{ kind = \"pointer_name\", pointer = \"/result/class_name\" }}\n{FASHION_LABELS}"))
        .start(TestDetector::new())
        .await;
    let img = real_images()[4];
    let (ct, body) = multipart("file", img);
    let r = g.post("/upload", &ct, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.h("diffguard-label").unwrap(),
        classifier_label(img).to_string()
    );
    // A form without the configured field is the client's fault.
    let (ct, body) = multipart("other", img);
    assert_eq!(g.post("/upload", &ct, body).await.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn argmax_of_a_logits_array() {
    let up = Upstream::example().await;
    let g = guard()
        .route(&up, "name = \"argmax\"\nprefix = \"/classify\"\nupstream = \"{up}\"\nrequest = { kind = \"json_base64\", pointer = \"/image\" }\nresponse = { kind = \"argmax\", pointer = \"/logits\" }")
        .start(TestDetector::new())
        .await;
    for img in real_images() {
        let r = g
            .post(
                "/classify",
                "application/json",
                json!({"image": b64(img)}).to_string(),
            )
            .await;
        assert_eq!(
            r.h("diffguard-label").unwrap(),
            classifier_label(img).to_string()
        );
    }
    // RGB input is accepted and scored like gray: mean intensity of (240, 240, 240) is OOD.
    let r = g
        .post(
            "/classify",
            "application/json",
            json!({"image": b64(&png_rgb(32, 32, [240, 240, 240]))}).to_string(),
        )
        .await;
    assert_eq!(r.h("diffguard-verdict"), Some("ood"));
}
