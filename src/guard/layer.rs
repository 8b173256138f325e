//! [`DiffGuardLayer`]: the guard as a tower layer. Around the reverse proxy's forwarding service it
//! is the product; around a Rust service's own classifier route it guards that route in-process.
//!
//! Per request: strip client `diffguard-*` headers → buffer the body (limit) → extract and hash
//! the image(s), decoding those this guard has not seen (pixel limit) → call the inner service →
//! read the label(s) from its JSON answer → cache / single-flight scoring (pixels decoded on a
//! miss) → wait within the budget → apply the policy → annotate.
//!
//! ```no_run
//! # async fn demo(cfg: diffguard::config::Config, route: diffguard::config::RouteConfig) {
//! use axum::{Router, routing::post};
//! use diffguard::guard::{DiffGuardLayer, Guard, RouteGuard, build_detector};
//! let guard = Guard::new(&cfg, build_detector(&cfg.detector).unwrap()).unwrap();
//! let layer = DiffGuardLayer::new(guard, RouteGuard::from_config(&route, cfg.detector.num_classes));
//! let app: Router = Router::new().route("/classify", post(|| async { "{\"label\": 3}" }).layer(layer));
//! # }
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, header};
use http_body_util::BodyExt;
use tower::{Layer, Service, ServiceExt};
use tracing::{Instrument, field::Empty};

use super::input::{ImageInput, read_images};
use super::registry::{InstanceSlot, RequestRecord};
use super::verdict::{Outcome, Verdict, VerdictReport};
use super::{Guard, policy};
use crate::config::{
    PolicyConfig, PolicyMode, RequestAdapterConfig, ResponseAdapterConfig, RouteConfig,
};
use crate::error::GuardError;
use crate::proxy::response::{LabelMap, extract_predictions};
use crate::telemetry::{self, metric::RouteMetrics};

/// Route-specific guard settings.
#[derive(Debug, Clone)]
pub struct RouteGuard {
    /// Route name (metrics, spans, verdicts); shared by every request's verdict record.
    pub name: Arc<str>,
    /// Low-cardinality span name, e.g. the route prefix.
    pub span_name: String,
    /// Where the image is.
    pub request: RequestAdapterConfig,
    /// Where the label is.
    pub response: ResponseAdapterConfig,
    /// What to do with the verdict.
    pub policy: PolicyConfig,
    /// Upstream class → detector label.
    pub labels: LabelMap,
    /// Add a `"diffguard"` object to JSON bodies.
    pub inject_body: bool,
}

impl RouteGuard {
    /// From a configured route.
    pub fn from_config(r: &RouteConfig, num_classes: u32) -> Self {
        Self {
            name: r.name.as_str().into(),
            span_name: r.prefix.clone(),
            request: r.request.clone(),
            response: r.response.clone(),
            policy: r.policy,
            labels: LabelMap::new(r.labels.clone(), &r.label_ids, num_classes),
            inject_body: r.inject_body,
        }
    }
}

/// What every request of one guarded route shares.
struct RouteState {
    guard: Arc<Guard>,
    route: RouteGuard,
    metrics: RouteMetrics,
}

/// Tower layer putting the guard around a service whose answers carry the predicted label.
#[derive(Clone)]
pub struct DiffGuardLayer {
    state: Arc<RouteState>,
}

impl DiffGuardLayer {
    /// Guards one route with shared guard state.
    pub fn new(guard: Arc<Guard>, route: RouteGuard) -> Self {
        let mode = format!("{:?}", route.policy.mode).to_lowercase();
        let metrics = RouteMetrics::new(&route.name, &mode);
        Self {
            state: Arc::new(RouteState {
                guard,
                route,
                metrics,
            }),
        }
    }
}

impl<S> Layer<S> for DiffGuardLayer {
    type Service = DiffGuardService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        DiffGuardService {
            state: self.state.clone(),
            inner,
        }
    }
}

/// The service made by [`DiffGuardLayer`].
#[derive(Clone)]
pub struct DiffGuardService<S> {
    state: Arc<RouteState>,
    inner: S,
}

impl<S> DiffGuardService<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// Serves one request from a shared reference: the guard is always ready, and readiness of
    /// the inner service is checked on the clone that serves the call.
    pub fn serve(&self, req: Request<Body>) -> BoxFuture<'static, Result<Response, Infallible>> {
        let (state, inner) = (self.state.clone(), self.inner.clone());
        Box::pin(async move { Ok(handle(&state, inner, req).await) })
    }
}

impl<S> Service<Request<Body>> for DiffGuardService<S>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.serve(req)
    }
}

static H_VERDICT: HeaderName = HeaderName::from_static("diffguard-verdict");
static H_SCORE: HeaderName = HeaderName::from_static("diffguard-score");
static H_THRESHOLD: HeaderName = HeaderName::from_static("diffguard-threshold");
static H_LABEL: HeaderName = HeaderName::from_static("diffguard-label");
static H_ID: HeaderName = HeaderName::from_static("diffguard-id");
static H_CACHE: HeaderName = HeaderName::from_static("diffguard-cache");

/// Removes every `diffguard-*` header (clients and upstreams must not forge verdicts).
pub fn strip_guard_headers(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("diffguard-"))
        .cloned()
        .collect();
    for k in forged {
        headers.remove(k);
    }
}

async fn handle<S>(state: &Arc<RouteState>, inner: S, mut req: Request<Body>) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let RouteState {
        guard,
        route,
        metrics,
    } = &**state;
    let started = Instant::now();
    let span = tracing::info_span!(
        "diffguard.request",
        otel.name = %format!("{} {}", req.method(), route.span_name),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        http.response.status_code = Empty,
        diffguard.route = %route.name,
        diffguard.mode = ?route.policy.mode,
        diffguard.detector = %guard.fingerprint(),
        diffguard.verdict = Empty,
        diffguard.label = Empty,
        diffguard.score = Empty,
        diffguard.threshold = Empty,
        diffguard.cache_hit = Empty,
        diffguard.early_stop_step = Empty,
        diffguard.id = Empty,
        error.type = Empty,
    );
    telemetry::extract_parent(&span, req.headers());
    strip_guard_headers(req.headers_mut());
    let mut upstream_time = Duration::ZERO;
    let resp = run(state, inner, req, &mut upstream_time)
        .instrument(span.clone())
        .await;
    let resp = resp.unwrap_or_else(|e| {
        span.record("error.type", e.tag());
        e.into_response()
    });
    span.record("http.response.status_code", resp.status().as_u16());
    let total = started.elapsed();
    metrics.request(
        resp.status().as_u16(),
        upstream_time,
        total.saturating_sub(upstream_time),
    );
    resp
}

async fn call_inner<S>(inner: S, req: Request<Body>, upstream_time: &mut Duration) -> Response
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    let t = Instant::now();
    let mut resp = match inner.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    strip_guard_headers(resp.headers_mut());
    *upstream_time = t.elapsed();
    resp
}

/// Reads a whole body of at most `limit` bytes. Most bodies arrive as one frame, which is kept
/// as it is; collecting copied every body into a new buffer (about 1,000 instructions of a
/// cache hit's 60,000).
async fn buffer(mut body: Body, limit: usize) -> Result<Bytes, GuardError> {
    let mut whole = Bytes::new();
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| GuardError::BadRequest(format!("reading body: {e}")))?;
        // Trailers carry nothing the guard reads.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let len = joined.as_ref().map_or(whole.len(), |j| j.len());
        if len + data.len() > limit {
            return Err(GuardError::BodyTooLarge { limit });
        }
        match &mut joined {
            Some(j) => j.extend_from_slice(&data),
            None if whole.is_empty() => whole = data,
            None => {
                let mut j = bytes::BytesMut::with_capacity(whole.len() + data.len());
                j.extend_from_slice(&whole);
                j.extend_from_slice(&data);
                joined = Some(j);
            }
        }
    }
    Ok(joined.map_or(whole, bytes::BytesMut::freeze))
}

async fn run<S>(
    state: &Arc<RouteState>,
    inner: S,
    req: Request<Body>,
    upstream_time: &mut Duration,
) -> Result<Response, GuardError>
where
    S: Service<Request<Body>, Response = Response, Error = Infallible>,
{
    let RouteState { guard, route, .. } = &**state;
    // Only requests with a body are predictions; GET/HEAD (metadata, health) pass as they are.
    let has_body = matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH);
    if route.policy.mode == PolicyMode::Off || !has_body {
        return Ok(call_inner(inner, req, upstream_time).await);
    }
    let limit = guard.max_body_bytes();
    if content_length(req.headers()).is_some_and(|n| n > limit as u64) {
        return Err(GuardError::BodyTooLarge { limit });
    }
    let (mut parts, body) = req.into_parts();
    // The label is read from the answer, so ask for it uncompressed.
    parts.headers.remove(header::ACCEPT_ENCODING);
    let body = buffer(body, limit).await?;
    let read = read_images(
        &route.request,
        guard.known_images(),
        guard.max_pixels(),
        &parts.headers,
        &body,
    );
    let images = match read.await {
        Ok(i) => i,
        // Shadow never changes what the client sees, bad input included.
        Err(e) if route.policy.mode == PolicyMode::Shadow => {
            tracing::info!(error = %e, "shadow: request not scorable; forwarded unchanged");
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    let resp = call_inner(
        inner,
        Request::from_parts(parts, Body::from(body)),
        upstream_time,
    )
    .await;
    if images.is_empty() || !resp.status().is_success() {
        // Upstream errors pass through untouched; there is no prediction to vouch for.
        return Ok(resp);
    }
    if content_length(resp.headers()).is_some_and(|n| n > limit as u64) {
        tracing::warn!(
            limit,
            "upstream answer larger than server.max_body_bytes; passed through unscored"
        );
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let body = buffer(body, limit)
        .await
        .map_err(|e| GuardError::UpstreamUnreadable(e.to_string()))?;
    let record = score(guard, route, &images, &body).await;
    let record = Arc::new(record);
    tracing::Span::current().record("diffguard.id", &*record.id);

    // Cache hits are done already: no wait, no span for it.
    if policy::waits(route.policy.mode) && !record.done() {
        let budget = Duration::from_millis(route.policy.wait_ms);
        record
            .wait(budget)
            .instrument(tracing::info_span!(
                "wait",
                budget_ms = route.policy.wait_ms
            ))
            .await;
    }
    let report = Arc::new(record.report());
    // The client learns the id from this response, so registering it now is early enough, and
    // the report just taken serves both the registry and the response.
    guard.registry().insert(&record, &report);
    observe(state, &report, &record);
    match policy::decide(&route.policy, report.verdict) {
        policy::Decision::Reject => Err(GuardError::Rejected(Box::new((*report).clone()))),
        // Fail closed with no readable prediction: the upstream's answer is at fault, not the scorer.
        policy::Decision::Unavailable if unreadable(&report) => {
            Err(GuardError::UpstreamUnreadable(
                report
                    .instances
                    .iter()
                    .find_map(|i| i.reason.clone())
                    .unwrap_or_default(),
            ))
        }
        policy::Decision::Unavailable => {
            Err(GuardError::VerdictUnavailable(Box::new((*report).clone())))
        }
        policy::Decision::Pass {
            annotate: false, ..
        } => Ok(Response::from_parts(parts, Body::from(body))),
        policy::Decision::Pass {
            shown,
            annotate: true,
        } => Ok(annotate(parts, body, &report, shown, route.inject_body)),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// True when the labels could not be read from the upstream answer at all.
fn unreadable(report: &VerdictReport) -> bool {
    report.instances.iter().all(|i| i.label.is_none())
}

/// Reads the labels and starts (or finds) one verdict per image.
async fn score(
    guard: &Arc<Guard>,
    route: &RouteGuard,
    images: &[ImageInput],
    body: &Bytes,
) -> RequestRecord {
    // The encoder writes the hyphenated text directly; `to_string` went through `fmt`.
    let id: Arc<str> = uuid::Uuid::new_v4()
        .hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .into();
    let record = |instances| RequestRecord {
        id: id.clone(),
        route: route.name.clone(),
        detector: guard.fingerprint().clone(),
        instances,
    };
    let unverified_all = |reason: String| {
        images
            .iter()
            .map(|_| {
                InstanceSlot::resolved(
                    None,
                    None,
                    super::CacheStatus::Miss,
                    Outcome::Unverified {
                        reason: reason.clone(),
                    },
                )
            })
            .collect()
    };
    let preds = match extract_predictions(&route.response, body) {
        Ok(p) if p.len() == images.len() => p,
        Ok(p) => {
            return record(unverified_all(format!(
                "upstream answered {} predictions for {} images",
                p.len(),
                images.len()
            )));
        }
        Err(e) => return record(unverified_all(e.to_string())),
    };
    let mut instances = Vec::with_capacity(images.len());
    for (image, pred) in images.iter().zip(preds) {
        let slot = match route.labels.resolve(&pred.label) {
            Ok((label, name)) => guard.verdict_for(image, label, name, pred.logits).await,
            Err(reason) => InstanceSlot::resolved(
                None,
                None,
                super::CacheStatus::Miss,
                Outcome::Unverified { reason },
            ),
        };
        instances.push(slot);
    }
    record(instances)
}

/// Span attributes, metrics, the OOD event and webhook; late verdicts are observed when they
/// arrive, and their record, registered live, is then settled in the registry.
fn observe(state: &Arc<RouteState>, report: &VerdictReport, record: &Arc<RequestRecord>) {
    let RouteState { guard, metrics, .. } = &**state;
    let span = tracing::Span::current();
    // A disabled span (no exporter, no span logging) would drop the joined strings unread.
    if !span.is_disabled() {
        record_span(&span, report);
    }
    if report.is_final() {
        record_outcome(guard, metrics, report);
        return;
    }
    let (state, record, parent) = (state.clone(), record.clone(), span.clone());
    guard.spawn_background(async move {
        let RouteState { guard, metrics, .. } = &*state;
        // Bounded: the registry forgets the id after its retention anyway.
        record.wait(Duration::from_secs(300)).await;
        guard.registry().settle(&record);
        let late = tracing::info_span!("diffguard.late_verdict", diffguard.id = %record.id, diffguard.route = %record.route);
        late.follows_from(&parent);
        let _e = late.enter();
        record_outcome(guard, metrics, &record.report());
    });
}

/// The verdict's attributes on the request span.
fn record_span(span: &tracing::Span, report: &VerdictReport) {
    span.record("diffguard.verdict", report.verdict.as_str());
    span.record(
        "diffguard.label",
        join(report, |i| i.label.map(|l| l.to_string())).as_str(),
    );
    span.record(
        "diffguard.score",
        join(report, |i| i.score.map(decimal)).as_str(),
    );
    span.record(
        "diffguard.threshold",
        join(report, |i| i.threshold.map(decimal)).as_str(),
    );
    let steps = join(report, |i| {
        i.diagnostics.get("early_stop_step").map(|s| s.to_string())
    });
    if report
        .instances
        .iter()
        .any(|i| i.diagnostics.contains_key("early_stop_step"))
    {
        span.record("diffguard.early_stop_step", steps.as_str());
    }
    span.record(
        "diffguard.cache_hit",
        report
            .instances
            .iter()
            .all(|i| i.cache == super::CacheStatus::Hit),
    );
}

fn record_outcome(guard: &Guard, metrics: &RouteMetrics, report: &VerdictReport) {
    for i in &report.instances {
        metrics.verdict(i.label, i.verdict.as_str());
    }
    if report.verdict == Verdict::Ood {
        let ood = |i: &super::verdict::InstanceReport| i.verdict == Verdict::Ood;
        let labels = join(report, |i| {
            ood(i).then(|| i.label.map(|l| l.to_string())).flatten()
        });
        let scores = join(report, |i| ood(i).then_some(i.score).flatten().map(decimal));
        tracing::warn!(
            diffguard.id = %report.id,
            diffguard.route = %report.route,
            diffguard.mode = %metrics.mode(),
            diffguard.label = %labels,
            diffguard.score = %scores,
            "diffguard.ood"
        );
        if let Some(w) = guard.webhook() {
            w.notify(report);
        }
    }
}

/// The shortest decimal that reads back as the same `f32`, as serde_json writes it in JSON
/// bodies (`0.5`, `-6.0`, `1e-7`). `f32`'s `Display` gives the same digits at several times the
/// cost, and two of these are formatted on every scored answer.
fn decimal(x: f32) -> String {
    zmij::Buffer::new().format(x).to_owned()
}

/// Per-instance values, comma-separated, `-` where an instance has none.
fn join(
    report: &VerdictReport,
    f: impl Fn(&super::verdict::InstanceReport) -> Option<String>,
) -> String {
    // One instance is the common request: its value needs no joining.
    if let [one] = report.instances.as_slice() {
        return f(one).unwrap_or_else(|| "-".into());
    }
    report
        .instances
        .iter()
        .map(|i| f(i).unwrap_or_else(|| "-".into()))
        .collect::<Vec<_>>()
        .join(",")
}

fn annotate(
    mut parts: http::response::Parts,
    body: Bytes,
    report: &VerdictReport,
    shown: Verdict,
    inject_body: bool,
) -> Response {
    let h = &mut parts.headers;
    h.insert(&H_VERDICT, HeaderValue::from_static(shown.as_str()));
    if let Ok(id) = HeaderValue::from_str(&report.id) {
        h.insert(&H_ID, id);
    }
    // One image is the common request: its fixed-text and integer values need no string.
    match report.instances.as_slice() {
        [one] => {
            h.insert(&H_CACHE, HeaderValue::from_static(one.cache.as_str()));
            if let Some(l) = one.label {
                h.insert(&H_LABEL, HeaderValue::from(l));
            }
        }
        _ => {
            set_header(h, &H_CACHE, join(report, |i| Some(i.cache.as_str().into())));
            if report.instances.iter().any(|i| i.label.is_some()) {
                let labels = join(report, |i| i.label.map(|l| l.to_string()));
                set_header(h, &H_LABEL, labels);
            }
        }
    }
    // Shortest decimals that read back as the same f32: `score > threshold` holds for the
    // printed values exactly when it held for the scores.
    if report.instances.iter().any(|i| i.score.is_some()) {
        let scores = join(report, |i| i.score.map(decimal));
        set_header(h, &H_SCORE, scores);
        let thresholds = join(report, |i| i.threshold.map(decimal));
        set_header(h, &H_THRESHOLD, thresholds);
    }
    let body = if inject_body {
        inject(&mut parts.headers, body, report, shown)
    } else {
        body
    };
    Response::from_parts(parts, Body::from(body))
}

/// Sets a header from a string the guard built (ids, labels, numbers: always valid), taking
/// its buffer rather than copying it.
fn set_header(headers: &mut HeaderMap, name: &HeaderName, value: String) {
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
        headers.insert(name, v);
    }
}

fn inject(headers: &mut HeaderMap, body: Bytes, report: &VerdictReport, shown: Verdict) -> Bytes {
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_slice::<serde_json::Value>(&body)
    else {
        return body;
    };
    let mut r = serde_json::to_value(report).unwrap_or_default();
    r["verdict"] = serde_json::Value::String(shown.as_str().into());
    obj.insert("diffguard".into(), r);
    match serde_json::to_vec(&obj) {
        Ok(v) => {
            headers.remove(header::CONTENT_LENGTH);
            Bytes::from(v)
        }
        Err(_) => body,
    }
}

#[cfg(test)]
mod tests {
    use super::{Body, Bytes, GuardError, buffer, decimal};

    fn frames(parts: &[&'static [u8]]) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        Body::from_stream(futures_util::stream::iter(chunks))
    }

    /// A one-frame body comes back as the very buffer it arrived in; frames are joined in order;
    /// the limit holds for the sum of the frames, however they are split.
    #[tokio::test]
    async fn buffer_keeps_one_frame_joins_many_and_counts_the_limit_across_frames() {
        let one = Bytes::from_static(b"0123456789");
        let got = buffer(Body::from(one.clone()), 10).await.unwrap();
        assert_eq!(got.as_ptr(), one.as_ptr(), "one frame must not be copied");

        let body = frames(&[b"", b"abc", b"", b"defg", b"hij"]);
        assert_eq!(buffer(body, 10).await.unwrap(), &b"abcdefghij"[..]);
        assert!(buffer(frames(&[]), 0).await.unwrap().is_empty());

        for split in [
            &[&b"abcdef"[..], b"ghijk"][..],
            &[b"abcdefghijk"],
            &[b"a", b"bcdefghij", b"k"],
        ] {
            let err = buffer(frames(split), 10).await.unwrap_err();
            assert!(
                matches!(err, GuardError::BodyTooLarge { limit: 10 }),
                "{err:?}"
            );
        }
    }

    #[tokio::test]
    async fn buffer_reports_a_failing_body_as_a_bad_request() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"abc")),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "peer gone",
            )),
        ];
        let err = buffer(Body::from_stream(futures_util::stream::iter(chunks)), 100)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, GuardError::BadRequest(m) if m.contains("peer gone")),
            "{err:?}"
        );
    }

    /// Score headers must read back as the very `f32` compared with the threshold, and show the
    /// same text as the scores in an injected JSON body.
    #[test]
    fn decimals_round_trip_and_match_the_json_body() {
        let mut x: u32 = 0x9E37_79B9;
        let mut values = vec![
            0.5f32,
            -6.0,
            1.0,
            0.0,
            1e-7,
            26.322_937,
            22.756_68,
            f32::MAX,
        ];
        for _ in 0..10_000 {
            // xorshift over all bit patterns: every exponent and sign, not just "nice" values.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if v.is_finite() {
                values.push(v);
            }
        }
        for v in values {
            let text = decimal(v);
            assert_eq!(
                text.parse::<f32>().unwrap().to_bits(),
                v.to_bits(),
                "{text}"
            );
            assert_eq!(text, serde_json::to_string(&v).unwrap(), "{v:?}");
        }
        assert_eq!(decimal(0.5), "0.5");
        assert_eq!(decimal(-6.0), "-6.0");
    }
}
