//! OTLP HTTP/protobuf export to an in-test axum receiver (one test per process: the tracing subscriber is global).

mod common;

use common::otlp::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_attributes_ood_event_and_traceparent_over_http() {
    let sink = Sink::default();
    let endpoint = http_receiver(sink.clone()).await;
    check_trace_export("http/protobuf", endpoint, sink).await;
}
