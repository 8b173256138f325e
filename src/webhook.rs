//! The optional webhook on OOD verdicts (DESIGN §3): every final `ood` verdict is POSTed as its
//! verdict report (the JSON `GET /diffguard/v1/verdicts/{id}` serves) to `webhook.url`.
//!
//! Delivery never touches the request path: reports go into a bounded queue and one task sends
//! them in order, retrying connection errors, timeouts, 429 and 5xx with a doubling back-off.
//! A full queue drops the report and counts it; so does an endpoint that keeps failing. The
//! request's `traceparent` travels with the report, so the receiver's spans join the trace.
//!
//! With `webhook.secret` set, each attempt is signed (`diffguard-signature: t=…,v1=…`, the
//! scheme Stripe and others use): HMAC-SHA256 over `"<t>.<body>"`, so a receiver can reject
//! forged reports and, by the timestamp, replayed ones. At shutdown the queue is closed and the
//! reports already in it are still delivered, within the server's grace period.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ring::hmac;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{WebhookConfig, check_webhook_secret};
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
    /// `webhook.secret_file` cannot be read or holds too short a secret.
    #[error("webhook.secret_file `{0}`: {1}")]
    SecretFile(String, String),
}

/// The header that carries a delivery's signature.
pub const SIGNATURE_HEADER: &str = "diffguard-signature";

/// Sends OOD verdict reports to the configured endpoint.
pub struct Webhook {
    queue: mpsc::Sender<Delivery>,
    closing: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Set by the delivery task's [`Inbox`] when it ends: reports it left undelivered.
    undelivered: Arc<AtomicUsize>,
}

struct Delivery {
    body: Bytes,
    headers: HeaderMap,
}

/// The delivery task's end of the queue. It is dropped when the task ends or is aborted at
/// shutdown, and then records how many reports were left undelivered: those still queued, plus
/// the one being sent.
struct Inbox {
    rx: mpsc::Receiver<Delivery>,
    sending: bool,
    undelivered: Arc<AtomicUsize>,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut left = usize::from(self.sending);
        while self.rx.try_recv().is_ok() {
            left += 1;
        }
        self.undelivered.store(left, Ordering::Release);
    }
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
            key: signing_key(cfg)?,
        };
        let closing = CancellationToken::new();
        let undelivered = Arc::new(AtomicUsize::new(0));
        let inbox = Inbox {
            rx,
            sending: false,
            undelivered: undelivered.clone(),
        };
        let task = tokio::spawn(sender.run(inbox, closing.clone()));
        Ok(Some(Self {
            queue,
            closing,
            task: Mutex::new(Some(task)),
            undelivered,
        }))
    }

    /// Takes no new reports and delivers those already queued, waiting at most `grace`; what is
    /// still undelivered then (the queued reports and the one being sent) is dropped, counted,
    /// logged and returned.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.closing.cancel();
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        let Some(mut task) = task else { return 0 };
        if tokio::time::timeout(grace, &mut task).await.is_ok() {
            return 0;
        }
        task.abort();
        // Once the aborted task is gone, its inbox has counted what it left.
        let _ = task.await;
        let left = self.undelivered.load(Ordering::Acquire);
        tracing::warn!(
            undelivered = left,
            "webhook: shutdown grace period over; undelivered OOD reports dropped"
        );
        metrics::counter!(metric::WEBHOOK, "result" => "dropped").increment(left as u64);
        left
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
        if let Err(e) = self.queue.try_send(Delivery { body, headers }) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "closed by shutdown",
            };
            tracing::warn!(id = %report.id, "webhook {why}; OOD report dropped");
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
    key: Option<hmac::Key>,
}

impl Sender {
    /// Delivers in order until the queue is closed (at `closing`) and empty.
    async fn run(self, mut inbox: Inbox, closing: CancellationToken) {
        loop {
            let next = tokio::select! {
                d = inbox.rx.recv() => d,
                () = closing.cancelled(), if !inbox.rx.is_closed() => {
                    // Refuses new reports; `recv` still yields the queued ones, then `None`.
                    inbox.rx.close();
                    continue;
                }
            };
            let Some(d) = next else { return };
            inbox.sending = true;
            let result = self.deliver(&d).await;
            inbox.sending = false;
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
        if let Some(key) = &self.key {
            // Signed per attempt, so that a retry after a back-off still looks fresh.
            let unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            req.headers_mut()
                .insert(SIGNATURE_HEADER, signature(key, unix, &d.body));
        }
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp.status()),
            Ok(Err(e)) => Err(format!("{e}")),
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}

/// The HMAC key from `webhook.secret` or, read now, from `webhook.secret_file`.
fn signing_key(cfg: &WebhookConfig) -> Result<Option<hmac::Key>, WebhookError> {
    let file_secret;
    let secret = match (&cfg.secret, &cfg.secret_file) {
        (Some(s), _) => s.expose(),
        (None, Some(path)) => {
            let bad = |m: String| WebhookError::SecretFile(path.display().to_string(), m);
            let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
            file_secret = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string();
            check_webhook_secret(&file_secret).map_err(|m| bad(format!("the secret {m}")))?;
            &file_secret
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes())))
}

/// `t=<unix>,v1=<hex HMAC-SHA256(key, "<unix>.<body>")>`.
fn signature(key: &hmac::Key, unix: u64, body: &[u8]) -> HeaderValue {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(unix.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let hex: String = ctx
        .sign()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    HeaderValue::from_str(&format!("t={unix},v1={hex}"))
        .unwrap_or_else(|_| unreachable!("digits, letters, '=' and ',' only"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected digest is Python's `hmac.new(b"Jefe", b"12.ab", hashlib.sha256)`, an
    /// implementation independent of ring (whose HMAC passes RFC 4231 with the same key).
    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, 12, b"ab"),
            "t=12,v1=11d6a572a281aab60fb5ed4c621bfaf1c0c5c68f5786bbf21dc8ef5bfff0a41d"
        );
    }

    /// A mounted secret file signs exactly like the same secret given inline (its trailing
    /// newline is not part of it); a short or missing file is an error naming the file.
    #[test]
    fn secret_file_signs_like_the_inline_secret() {
        let dir = std::env::temp_dir().join(format!("dg-webhook-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "0123456789abcdef-rotated\n").unwrap();
        let from_file = WebhookConfig {
            secret_file: Some(file.clone()),
            ..WebhookConfig::default()
        };
        let inline: WebhookConfig =
            serde_json::from_str(r#"{"secret": "0123456789abcdef-rotated"}"#).unwrap();
        let sign = |c: &WebhookConfig| signature(&signing_key(c).unwrap().unwrap(), 7, b"{}");
        assert_eq!(sign(&from_file), sign(&inline));
        assert!(signing_key(&WebhookConfig::default()).unwrap().is_none());

        std::fs::write(&file, "short\n").unwrap();
        let err = signing_key(&from_file).err().unwrap().to_string();
        assert!(
            err.contains("secret_file") && err.contains("16 characters"),
            "{err}"
        );
        std::fs::remove_file(&file).unwrap();
        let err = signing_key(&from_file).err().unwrap().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
