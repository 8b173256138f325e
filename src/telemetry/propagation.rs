//! W3C trace-context in and out of HTTP headers.

use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the client's `traceparent`, when there is one.
pub fn extract_parent(span: &tracing::Span, headers: &HeaderMap) {
    // A span nothing records (no exporter) has no use for a parent.
    if span.is_disabled() {
        return;
    }
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    if opentelemetry::trace::TraceContextExt::span(&cx)
        .span_context()
        .is_valid()
    {
        let _ = span.set_parent(cx);
    }
}

/// Writes the current span's `traceparent` into `headers` (no-op without an OTel layer, in which
/// case the client's own `traceparent`, if any, is forwarded unchanged).
pub fn inject_current(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    if opentelemetry::trace::TraceContextExt::span(&cx)
        .span_context()
        .is_valid()
    {
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(headers))
        });
    }
}
