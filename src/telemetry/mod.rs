//! Logs, traces and metrics. [`init`] installs the global subscriber once per process: a fmt layer
//! (text or JSON) and, when an OTLP endpoint is configured (config or standard `OTEL_*` variables),
//! an OpenTelemetry layer exporting over gRPC or HTTP/protobuf. W3C `traceparent` is extracted from
//! incoming requests and injected into upstream requests.

pub mod metric;
mod propagation;

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use self::propagation::{extract_parent, inject_current};
use crate::config::TelemetryConfig;

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("tracing subscriber: {0}")]
    Subscriber(String),
}

/// Flushes and shuts the span exporter down when dropped (or on [`TelemetryGuard::shutdown`]).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now. Blocks; call from a blocking context.
    pub fn force_flush(&self) {
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "span flush failed");
        }
    }

    /// Final flush and exporter shutdown. Blocks; call from a blocking context.
    pub fn shutdown(mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("diffguard: span exporter shutdown: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Where spans go, resolved from config first, then the standard `OTEL_*` variables.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpTarget {
    /// Base endpoint from config, or `None` to let the exporter read `OTEL_*` itself.
    pub endpoint: Option<String>,
    /// gRPC or HTTP/protobuf.
    pub protocol: Protocol,
}

/// Resolves the OTLP target; `None` means export is off.
pub fn otlp_target(
    cfg: &TelemetryConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<OtlpTarget> {
    let env_endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if cfg.otlp_endpoint.is_none() && env_endpoint.is_none() {
        return None;
    }
    let protocol = cfg
        .otlp_protocol
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    let protocol = match protocol.as_deref() {
        Some("http/protobuf") => Protocol::HttpBinary,
        _ => Protocol::Grpc,
    };
    Some(OtlpTarget {
        endpoint: cfg.otlp_endpoint.clone(),
        protocol,
    })
}

fn build_provider(
    cfg: &TelemetryConfig,
    target: &OtlpTarget,
) -> Result<SdkTracerProvider, TelemetryError> {
    let err = |e: opentelemetry_otlp::ExporterBuildError| TelemetryError::Exporter(e.to_string());
    let exporter = match target.protocol {
        Protocol::HttpBinary => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary);
            if let Some(e) = &target.endpoint {
                // Like OTEL_EXPORTER_OTLP_ENDPOINT, the config value is a base URL.
                let e = e.trim_end_matches('/');
                b = b.with_endpoint(if e.ends_with("/v1/traces") {
                    e.to_string()
                } else {
                    format!("{e}/v1/traces")
                });
            }
            b.build().map_err(err)?
        }
        _ => {
            let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            if let Some(e) = &target.endpoint {
                b = b.with_endpoint(e.clone());
            }
            b.build().map_err(err)?
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| cfg.service_name.clone());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

/// Installs logging and (when configured) OTLP export for the whole process. Call once, inside a
/// Tokio runtime (the gRPC exporter spawns its channel there).
pub fn init(cfg: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_filter));
    // Without span context the fmt layer is not interested in spans at all, so with no exporter
    // a request's spans are disabled and their field recording costs nothing.
    let log_spans = cfg.log_spans;
    let filter = filter.and(filter_fn(move |m| log_spans || !m.is_span()));
    let fmt = if cfg.log_format == "json" {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        // Colour only for a terminal: escape codes in collected logs are noise, and formatting
        // them for every recorded span field costs CPU on the request path.
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .boxed()
    };
    let target = otlp_target(cfg, &|k| std::env::var(k).ok());
    let provider = target
        .as_ref()
        .map(|t| build_provider(cfg, t))
        .transpose()?;
    let logs = tracing_subscriber::registry().with(fmt.with_filter(filter));
    // Not `.with(Option<layer>)`: an absent layer there counts as interested in every span, which
    // would build every span of every request with nothing to send it to.
    let installed = match &provider {
        Some(p) => {
            opentelemetry::global::set_tracer_provider(p.clone());
            logs.with(tracing_opentelemetry::layer().with_tracer(p.tracer("diffguard")))
                .try_init()
        }
        None => logs.try_init(),
    };
    installed.map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = metric::builder().build_recorder();
        let handle = recorder.handle();
        spawn_upkeep(handle.clone());
        // Another recorder may exist (embedding application, tests); we still render our own.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The recorder keeps every histogram sample until they are folded into buckets, which only a
/// scrape or an upkeep does; without it an unscraped guard grew ≈16 bytes per request (two
/// histograms), ≈8 MB per 500k requests. A plain thread, so it needs no runtime.
fn spawn_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started; scrape /metrics to bound memory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_off_without_endpoint() {
        assert_eq!(otlp_target(&TelemetryConfig::default(), &|_| None), None);
    }

    #[test]
    fn otlp_protocol_from_env() {
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://c:4318".to_string()),
            "OTEL_EXPORTER_OTLP_PROTOCOL" => Some("http/protobuf".to_string()),
            _ => None,
        };
        let t = otlp_target(&TelemetryConfig::default(), &env).unwrap();
        assert_eq!(t.protocol, Protocol::HttpBinary);
        assert_eq!(t.endpoint, None);
    }
}
