//! In-test OTLP receivers (gRPC with tonic, HTTP/protobuf with axum) collecting exported spans,
//! and the end-to-end trace assertions both transports share.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use super::*;

#[derive(Clone, Default)]
pub struct Sink(pub Arc<Mutex<Vec<Span>>>);

impl Sink {
    fn take(&self, req: ExportTraceServiceRequest) {
        let spans = req
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.0.lock().unwrap().extend(spans);
    }
    pub fn spans(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// gRPC receiver; returns its endpoint URL.
pub async fn grpc_receiver(sink: Sink) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    format!("http://{addr}")
}

/// HTTP/protobuf receiver (`POST /v1/traces`); returns its base URL.
pub async fn http_receiver(sink: Sink) -> String {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(req) => {
                        sink.take(req);
                        let resp = ExportTraceServiceResponse {
                            partial_success: None,
                        }
                        .encode_to_vec();
                        ([("content-type", "application/x-protobuf")], resp).into_response()
                    }
                    Err(e) => (http::StatusCode::BAD_REQUEST, e.to_string()).into_response(),
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::BoolValue(b) => b.to_string(),
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// Sends an OOD image with a client `traceparent` through a guard exporting to `endpoint`, then
/// checks what the receiver got and what the upstream saw.
pub async fn check_trace_export(protocol: &str, endpoint: String, sink: Sink) {
    let tcfg = diffguard::config::TelemetryConfig {
        otlp_endpoint: Some(endpoint),
        otlp_protocol: Some(protocol.to_string()),
        log_filter: "warn".into(),
        ..Default::default()
    };
    let telemetry = diffguard::telemetry::init(&tcfg).unwrap();
    assert!(telemetry.exporting());

    let seen = Seen::default();
    let up = recorder(&seen, serde_json::json!({"Bag": 0.9, "Coat": 0.1})).await;
    // The webhook's receiver: an OOD report carries the request's trace context.
    let hook_seen = Seen::default();
    let hook = recorder(&hook_seen, serde_json::json!({})).await;
    let g = guard()
        .with(&format!("[webhook]\nurl = \"{}/hook\"", hook.url()))
        .route(&up, "name = \"traced\"\nprefix = \"/predictions/\"\nupstream = \"{up}\"\nrequest = { kind = \"raw\" }\nresponse = { kind = \"top_key\" }\npolicy = { mode = \"flag\", wait_ms = 3000 }\nlabels = [\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\", \"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]")
        // Scoring that takes a while: the request then waits for its verdict, and the trace must
        // show that wait. An instant verdict can be ready before the guard would wait (no span).
        .start(TestDetector::slow(Duration::from_millis(50)))
        .await;
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let r = g
        .post_with(
            "/predictions/m",
            "image/png",
            bright(),
            &[("traceparent", &traceparent)],
        )
        .await;
    assert_eq!(r.h("diffguard-verdict"), Some("ood"));

    // The upstream joins the client's trace, as a child of the guard's upstream span.
    let (up_trace, up_parent) = traceparent_at(&seen, "the upstream");
    assert_eq!(up_trace, TRACE_ID);
    assert_ne!(
        up_parent, PARENT_ID,
        "the guard injects its own span as the parent"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let find = |name: &str| sink.spans().into_iter().find(|s| s.name == name);
    loop {
        let t = telemetry_flush(&telemetry);
        t.await;
        if find("POST /predictions/").is_some()
            && find("diffguard.score").is_some()
            && find("upstream").is_some()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "spans not exported; got {:?}",
            sink.spans()
                .iter()
                .map(|s| s.name.clone())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let req = find("POST /predictions/").unwrap();
    assert_eq!(hex(&req.trace_id), TRACE_ID);
    assert_eq!(
        hex(&req.parent_span_id),
        PARENT_ID,
        "request span is the client's child"
    );
    assert_eq!(attr(&req, "diffguard.verdict").as_deref(), Some("ood"));
    assert_eq!(attr(&req, "diffguard.route").as_deref(), Some("traced"));
    assert_eq!(attr(&req, "diffguard.label").as_deref(), Some("8"));
    assert_eq!(
        attr(&req, "diffguard.detector").as_deref(),
        Some("test-mean-intensity")
    );
    assert_eq!(attr(&req, "diffguard.cache_hit").as_deref(), Some("false"));
    let score: f64 = attr(&req, "diffguard.score").unwrap().parse().unwrap();
    assert!(score > 0.9, "{score}");
    assert!(attr(&req, "diffguard.threshold").is_some());
    assert_eq!(
        attr(&req, "diffguard.early_stop_step").as_deref(),
        Some("3")
    );
    assert!(
        req.events.iter().any(|e| e.name == "diffguard.ood"),
        "OOD span event: {:?}",
        req.events
    );

    let upstream = find("upstream").unwrap();
    assert_eq!(upstream.parent_span_id, req.span_id);
    assert_eq!(
        hex(&upstream.span_id),
        up_parent,
        "the upstream saw the upstream span as its parent"
    );
    for child in ["cache", "wait"] {
        let c = find(child).unwrap_or_else(|| panic!("no {child} span"));
        assert_eq!(
            c.parent_span_id, req.span_id,
            "{child} is a child of the request span"
        );
    }
    // The webhook delivery joins the trace as a child of the request span.
    wait_until("the webhook delivery", || !hook_seen.last().is_empty()).await;
    let (hook_trace, hook_parent) = traceparent_at(&hook_seen, "the webhook");
    assert_eq!(hook_trace, TRACE_ID);
    assert_eq!(hook_parent, hex(&req.span_id));

    let score_span = find("diffguard.score").unwrap();
    assert!(
        score_span
            .links
            .iter()
            .any(|l| l.span_id == req.span_id && l.trace_id == req.trace_id),
        "scoring span linked to the request span"
    );
}

/// A loopback server that records each request's headers in `seen` and answers `answer`.
async fn recorder(seen: &Seen, answer: serde_json::Value) -> Upstream {
    let seen = seen.clone();
    Upstream::router(axum::Router::new().fallback(move |h: HeaderMap| {
        let (seen, answer) = (seen.clone(), answer.clone());
        async move {
            seen.push(&h);
            axum::Json(answer)
        }
    }))
    .await
}

/// (trace id, parent span id) of the last `traceparent` that `seen` recorded.
fn traceparent_at(seen: &Seen, at: &str) -> (String, String) {
    let tp = seen
        .last()
        .get("traceparent")
        .cloned()
        .unwrap_or_else(|| panic!("no traceparent reached {at}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "malformed traceparent at {at}: {tp}");
    (parts[1].to_string(), parts[2].to_string())
}

async fn telemetry_flush(t: &diffguard::telemetry::TelemetryGuard) {
    // force_flush blocks on the exporter; keep it off the async workers.
    tokio::task::block_in_place(|| t.force_flush());
}
