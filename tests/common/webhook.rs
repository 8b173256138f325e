//! Webhook receivers for the webhook tests: loopback servers that record each POST.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};

use super::Upstream;

pub const ROUTE: &str = "name = \"r\"\nprefix = \"/predictions/\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\nresponse = { kind = \"top_key\" }\npolicy = { mode = \"flag\", wait_ms = 5000 }\nlabels = [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\", \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]";

/// What a receiver got: headers and body of each POST, in order.
pub type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

pub fn json(body: &Bytes) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
}

/// A receiver answering the given statuses in turn (the last one from then on).
pub async fn receiver(statuses: Vec<u16>) -> (Upstream, Received) {
    slow_receiver(statuses, Duration::ZERO).await
}

/// The same, taking `delay` over each answer.
pub async fn slow_receiver(statuses: Vec<u16>, delay: Duration) -> (Upstream, Received) {
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
