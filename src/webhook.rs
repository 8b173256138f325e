//! The optional webhook on OOD verdicts (DESIGN §3): every final `ood` verdict is POSTed as its
//! verdict report (the JSON `GET /diffguard/v1/verdicts/{id}` serves) to `webhook.url`.
//!
//! Delivery never touches the request path: reports go into a bounded queue and one task sends
//! them in order, retrying connection errors, timeouts, 429 and 5xx with a doubling back-off.
//! A full queue drops the report and counts it; so does an endpoint that keeps failing. The
//! request's `traceparent` travels with the report, so the receiver's spans join the trace.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::config::WebhookConfig;
use crate::guard::VerdictReport;
use crate::telemetry::{self, metric};

/// First retry delay; doubled for each further attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// The webhook could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// `webhook.url` is not an http(s) URL.
    #[error("webhook.url `{0}`: {1}")]
    Url(String, String),
    /// The TLS client could not be built.
    #[error("webhook TLS: {0}")]
    Tls(String),
}

/// Sends OOD verdict reports to the configured endpoint.
#[derive(Clone)]
pub struct Webhook {
    queue: mpsc::Sender<Delivery>,
}

struct Delivery {
    body: Bytes,
    headers: HeaderMap,
}

impl Webhook {
    /// Starts the delivery task. Call inside a Tokio runtime.
    pub fn start(cfg: &WebhookConfig) -> Result<Option<Self>, WebhookError> {
        let Some(url) = &cfg.url else {
            return Ok(None);
        };
        let uri: Uri = url
            .parse()
            .map_err(|e| WebhookError::Url(url.clone(), format!("{e}")))?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| WebhookError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(https);
        let (queue, rx) = mpsc::channel(cfg.queue_capacity);
        let sender = Sender {
            client,
            uri,
            timeout: Duration::from_millis(cfg.timeout_ms),
            retries: cfg.retries,
        };
        tokio::spawn(sender.run(rx));
        Ok(Some(Self { queue }))
    }

    /// Queues one report; never waits. Called from the current request's (or late verdict's)
    /// span, whose trace context the delivery carries.
    pub fn notify(&self, report: &VerdictReport) {
        let body = match serde_json::to_vec(report) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                tracing::warn!(error = %e, "webhook: report not serialisable; not sent");
                return delivered("failed");
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("diffguard-event", HeaderValue::from_static("ood"));
        telemetry::inject_current(&mut headers);
        if self.queue.try_send(Delivery { body, headers }).is_err() {
            tracing::warn!(id = %report.id, "webhook queue full; OOD report dropped");
            delivered("dropped");
        }
    }
}

fn delivered(result: &'static str) {
    metrics::counter!(metric::WEBHOOK, "result" => result).increment(1);
}

struct Sender {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    uri: Uri,
    timeout: Duration,
    retries: u32,
}

impl Sender {
    async fn run(self, mut rx: mpsc::Receiver<Delivery>) {
        while let Some(d) = rx.recv().await {
            let result = self.deliver(&d).await;
            delivered(if result.is_ok() { "ok" } else { "failed" });
            if let Err(e) = result {
                tracing::warn!(error = %e, url = %self.uri, "webhook delivery failed; report dropped");
            }
        }
    }

    async fn deliver(&self, d: &Delivery) -> Result<(), String> {
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            match self.post(d).await {
                Ok(s) if s.is_success() => return Ok(()),
                // The endpoint refused this report; sending it again will not change that.
                Ok(s) if s.is_client_error() && s != StatusCode::TOO_MANY_REQUESTS => {
                    return Err(format!("endpoint answered {s}"));
                }
                Ok(s) if attempt >= self.retries => return Err(format!("endpoint answered {s}")),
                Err(e) if attempt >= self.retries => return Err(e),
                _ => {}
            }
            attempt += 1;
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }

    async fn post(&self, d: &Delivery) -> Result<StatusCode, String> {
        let mut req = Request::post(self.uri.clone())
            .body(Body::from(d.body.clone()))
            .map_err(|e| e.to_string())?;
        *req.headers_mut() = d.headers.clone();
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp.status()),
            Ok(Err(e)) => Err(format!("{e}")),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}
