//! The forwarding service: one upstream, kept-alive connections ([`super::client`]), hop-by-hop
//! headers removed, `Host`/`X-Forwarded-*` set, `traceparent` injected, connect and response
//! deadlines.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Uri};
use tracing::Instrument;

use super::client::UpstreamClient;
use crate::error::GuardError;
use crate::telemetry;

/// Headers that describe one connection and must not be forwarded (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    // A match on the text dispatches on length first: comparing each name of a message with
    // eight `HeaderName`s one by one was a visible share of a forward's CPU.
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Removes hop-by-hop headers, including any listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry one (`Connection`) or none: removing only the names present saves
    // hashing all eight for removal.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k))
        .cloned()
        .collect();
    if present.is_empty() {
        return;
    }
    // `Connection: keep-alive` (or `close`) is what nearly every peer sends: those tokens name
    // no header beyond the fixed list, so only other tokens are parsed into names.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for h in present.iter().chain(&listed) {
        headers.remove(h);
    }
}

/// Forwards requests to one upstream base URL. Cheap to clone: a clone serves every call.
#[derive(Clone)]
pub struct Forwarder(Arc<Upstream>);

struct Upstream {
    client: Arc<UpstreamClient>,
    base: Uri,
    /// `Host` for every request: the upstream's authority.
    host: Option<HeaderValue>,
    strip_prefix: Option<String>,
    timeout: Duration,
}

impl Forwarder {
    /// `base` must be an `http://` URL; `strip_prefix` is removed from request paths first.
    pub fn new(
        base: Uri,
        strip_prefix: Option<String>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Self {
        let host = base
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        let client = UpstreamClient::new(
            base.host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string(),
            base.port_u16().unwrap_or(80),
            connect_timeout,
        );
        Self(Arc::new(Upstream {
            client,
            base,
            host,
            strip_prefix,
            timeout,
        }))
    }

    /// The upstream path: the base URL's path, then the request's (less the stripped prefix).
    fn path_and_query(&self, uri: &Uri) -> Result<PathAndQuery, GuardError> {
        // The common route forwards the path as it came: no string to build.
        if self.0.strip_prefix.is_none() && matches!(self.0.base.path(), "" | "/") {
            return Ok(uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")));
        }
        let path = uri.path();
        let path = match &self.0.strip_prefix {
            Some(p) => path.strip_prefix(p.as_str()).unwrap_or(path),
            None => path,
        };
        let base_path = self.0.base.path().trim_end_matches('/');
        let sep = if path.starts_with('/') || path.is_empty() {
            ""
        } else {
            "/"
        };
        let pq = match uri.query() {
            Some(q) => format!("{base_path}{sep}{path}?{q}"),
            None => format!("{base_path}{sep}{path}"),
        };
        let pq = if pq.is_empty() { "/".to_string() } else { pq };
        pq.parse()
            .map_err(|e| GuardError::BadRequest(format!("path: {e}")))
    }

    /// Sends `req` upstream and returns its response with a streaming body.
    pub async fn forward(&self, mut req: Request<Body>) -> Result<Response, GuardError> {
        let target = self.path_and_query(req.uri())?;
        let client_addr = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        if let Some(ip) = client_addr {
            let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
                Some(prev) => HeaderValue::from_str(&format!("{prev}, {ip}")).ok(),
                None => Some(peer_header(ip)),
            };
            if let Some(v) = xff {
                headers.insert(&X_FORWARDED_FOR, v);
            }
        }
        if let Some(h) = original_host {
            headers.insert(&X_FORWARDED_HOST, h);
        }
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        }
        if let Some(h) = &self.0.host {
            headers.insert(header::HOST, h.clone());
        }
        // Origin form on the wire; the upstream's address is the connection's.
        *req.uri_mut() = Uri::from(target);
        *req.version_mut() = http::Version::HTTP_11;

        let origin = self.0.base.authority().map_or("", |a| a.as_str());
        let span = tracing::info_span!("upstream", otel.kind = "client", http.request.method = %req.method(), url.full = %format_args!("http://{origin}{}", req.uri()), http.response.status_code = tracing::field::Empty);
        let timeout_ms = self.0.timeout.as_millis() as u64;
        let call = async {
            telemetry::inject_current(req.headers_mut());
            match tokio::time::timeout(self.0.timeout, self.0.client.send(req)).await {
                Err(_) => Err(GuardError::UpstreamTimeout(timeout_ms)),
                Ok(Err(e)) => Err(GuardError::UpstreamUnreachable(error_chain(&e))),
                Ok(Ok(resp)) => {
                    tracing::Span::current()
                        .record("http.response.status_code", resp.status().as_u16());
                    let (mut parts, body) = resp.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(parts, Body::new(body)))
                }
            }
        };
        call.instrument(span).await
    }
}

/// The client address as a header value. A connection sends many requests from one address and
/// stays on one I/O thread, so each thread keeps the last address it formatted: formatting it
/// anew was a visible share of a forward's CPU.
fn peer_header(ip: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(IpAddr, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((cached, value)) if *cached == ip => value.clone(),
        _ => {
            // An IP address's text is always a valid header value.
            let value = HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_string()))
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
            *last = Some((ip, value.clone()));
            value
        }
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl tower::Service<Request<Body>> for Forwarder {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            Ok(this
                .forward(req)
                .await
                .unwrap_or_else(IntoResponse::into_response))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("content-type", HeaderValue::from_static("image/png"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
        // Without `Connection`: a hop-by-hop name that is not a standard header still goes.
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
        // Nothing to strip: untouched.
        h.insert("x-request-id", HeaderValue::from_static("7"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn target_joins_base_path_and_strips_prefix() {
        // (base, strip prefix, request path, upstream URL)
        let cases = [
            (
                "http://u:1/internal",
                Some("/api/classify"),
                "/api/classify/x?y=1",
                "http://u:1/internal/x?y=1",
            ),
            (
                "http://u:1",
                None,
                "/predictions/m",
                "http://u:1/predictions/m",
            ),
            (
                "http://u:1",
                None,
                "/predictions/m?v=2&x",
                "http://u:1/predictions/m?v=2&x",
            ),
            ("http://u:1/", None, "/a/b", "http://u:1/a/b"),
        ];
        for (base, strip, path, want) in cases {
            let f = Forwarder::new(
                base.parse().unwrap(),
                strip.map(String::from),
                Duration::from_secs(1),
                Duration::from_secs(1),
            );
            let pq = f.path_and_query(&path.parse().unwrap()).unwrap();
            let got = format!(
                "http://{}{pq}",
                f.0.host.as_ref().unwrap().to_str().unwrap()
            );
            assert_eq!(got, want, "{base} {strip:?} {path}");
        }
    }

    #[test]
    fn the_peer_header_follows_the_address_it_is_asked_for() {
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        for ip in [a, a, b, a, b, b] {
            assert_eq!(peer_header(ip), ip.to_string().as_str());
        }
    }
}
