//! OTLP/gRPC export to an in-test tonic receiver (one test per process: the tracing subscriber is global).

mod common;

use common::otlp::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_attributes_ood_event_and_traceparent_over_grpc() {
    let sink = Sink::default();
    let endpoint = grpc_receiver(sink.clone()).await;
    check_trace_export("grpc", endpoint, sink).await;
}
