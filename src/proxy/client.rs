//! The upstream client: kept-alive HTTP/1.1 connections to one upstream, reused last-in first-out.
//!
//! hyper-util's pooled client serves any number of hosts: every request hashed the scheme and
//! authority into its pool map twice (checkout, return), raced a lazy connect against the
//! checkout, and returned the connection through a spawned watcher. A route has one upstream and
//! each proxy I/O thread its own route table, so a plain stack of idle connections does the same
//! job for 5–6k fewer instructions per request (callgrind; see `benches/proxy_vs_nginx.md`).
//!
//! A connection is taken off the stack for one exchange and put back when the answer's body has
//! been read to its end; a body dropped early takes its connection with it (hyper closes it), as
//! does any error. A request that a kept connection turned away unsent (the upstream closed it
//! while idle) goes to the next kept connection, or a new one, as hyper-util's client retries it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

/// Idle connections older than this are closed rather than reused: upstream servers close theirs
/// after a keep-alive timeout of their own, and a request sent on one they are closing is lost.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be opened.
    #[error("connect to {addr}: {reason}")]
    Connect {
        /// `host:port` as configured.
        addr: String,
        /// What failed, from the resolver or the socket.
        reason: String,
    },
    /// The connection failed during the exchange.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// Connections to one upstream `host:port`.
pub struct UpstreamClient {
    host: String,
    port: u16,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<(SendRequest<Body>, Instant)>>,
}

impl UpstreamClient {
    /// A client for `host:port`; connections are opened on demand within `connect_timeout`.
    pub fn new(host: String, port: u16, connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            host,
            port,
            connect_timeout,
            idle: Mutex::new(VecDeque::new()),
        })
    }

    /// Sends `req` (origin-form URI, `Host` set) and returns the answer, whose body gives the
    /// connection back when read to its end.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Body>,
    ) -> Result<Response<PooledBody>, ClientError> {
        while let Some(mut conn) = self.take_idle() {
            // A connection comes back when its last answer's body has been read; its driver may
            // not have turned to the next request yet. Waiting for that beats opening another.
            if conn.ready().await.is_err() {
                continue;
            }
            match conn.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(resp, conn)),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection had closed while idle. Try the next.
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        let mut conn = self.connect().await?;
        let resp = conn.send_request(req).await?;
        Ok(self.wrap(resp, conn))
    }

    fn wrap(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        conn: SendRequest<Body>,
    ) -> Response<PooledBody> {
        resp.map(|body| {
            let mut body = PooledBody {
                body,
                home: Some((conn, self.clone())),
            };
            // No body to read (204, 304, `Content-Length: 0`): the connection is free now.
            if http_body::Body::is_end_stream(&body.body) {
                body.release();
            }
            body
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<(SendRequest<Body>, Instant)>> {
        // The stack holds no invariant a panic elsewhere could have broken.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle connection that is still worth using.
    fn take_idle(&self) -> Option<SendRequest<Body>> {
        let now = Instant::now();
        let mut idle = self.idle();
        while let Some((conn, since)) = idle.pop_back() {
            if reusable(&conn, since, now) {
                return Some(conn);
            }
        }
        None
    }

    fn put_idle(&self, conn: SendRequest<Body>) {
        let now = Instant::now();
        if !reusable(&conn, now, now) {
            return;
        }
        let mut idle = self.idle();
        // Oldest first: connections nobody took for a while are closed here, not kept forever.
        while idle
            .front()
            .is_some_and(|(c, since)| !reusable(c, *since, now))
        {
            idle.pop_front();
        }
        idle.push_back((conn, now));
    }

    /// Opens a connection: each resolved address in turn, all within the connect timeout.
    async fn connect(&self) -> Result<SendRequest<Body>, ClientError> {
        let fail = |reason: String| ClientError::Connect {
            addr: format!("{}:{}", self.host, self.port),
            reason,
        };
        let stream = tokio::time::timeout(self.connect_timeout, self.open_socket())
            .await
            .map_err(|_| fail(format!("timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| fail(e.to_string()))?;
        let (conn, driver) = http1::Builder::new()
            // One buffer per write, as the listener does (`serve_proxy`).
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = driver.await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(conn)
    }

    async fn open_socket(&self) -> std::io::Result<tokio::net::TcpStream> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => {
                    s.set_nodelay(true)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Open, and idle since `since` for less than [`IDLE_TIMEOUT`] at `now`.
fn reusable(conn: &SendRequest<Body>, since: Instant, now: Instant) -> bool {
    !conn.is_closed() && now.saturating_duration_since(since) < IDLE_TIMEOUT
}

/// An upstream answer's body that gives its connection back to the client at its end.
pub struct PooledBody {
    body: Incoming,
    home: Option<(SendRequest<Body>, Arc<UpstreamClient>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((conn, client)) = self.home.take() {
            client.put_idle(conn);
        }
    }
}

impl http_body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            // An error leaves the connection unusable: it goes with this body.
            Poll::Ready(Some(Err(_))) => drop(self.home.take()),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;

    use super::*;

    /// A real HTTP/1 server on loopback answering `body` to everything; counts its connections.
    async fn upstream(keep_alive: bool, body: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = service_fn(move |_req| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(body))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        (addr, accepted)
    }

    fn client(addr: SocketAddr) -> Arc<UpstreamClient> {
        UpstreamClient::new(addr.ip().to_string(), addr.port(), Duration::from_secs(2))
    }

    fn request() -> Request<Body> {
        Request::builder()
            .uri("/predict")
            .header(http::header::HOST, "upstream")
            .body(Body::empty())
            .unwrap()
    }

    async fn read(c: &Arc<UpstreamClient>) -> Bytes {
        let resp = c.send(request()).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    /// `n` exchanges one after another, each answer read whole; the connections they took.
    async fn one_by_one(keep_alive: bool, n: usize) -> usize {
        let (addr, accepted) = upstream(keep_alive, b"{\"label\": 3}").await;
        let c = client(addr);
        for _ in 0..n {
            assert_eq!(read(&c).await, &b"{\"label\": 3}"[..]);
        }
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn sequential_exchanges_share_one_connection() {
        assert_eq!(one_by_one(true, 20).await, 1);
    }

    #[tokio::test]
    async fn concurrent_exchanges_open_connections_and_keep_them() {
        let (addr, accepted) = upstream(true, b"ok").await;
        let c = client(addr);
        for _ in 0..3 {
            let answers = futures_util::future::join_all((0..4).map(|_| read(&c))).await;
            assert!(answers.iter().all(|a| a == &b"ok"[..]));
        }
        // Four at a time need four connections; the later rounds reuse them.
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_upstream_closing_after_each_answer_loses_no_request() {
        assert_eq!(one_by_one(false, 10).await, 10);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_takes_its_connection_along() {
        static BIG: [u8; 1 << 20] = [7; 1 << 20];
        let (addr, accepted) = upstream(true, &BIG).await;
        let c = client(addr);
        let mut body = c.send(request()).await.unwrap().into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        drop(body);
        assert_eq!(read(&c).await.len(), BIG.len());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let Err(err) = client(addr).send(request()).await else {
            panic!("an answer from a closed port");
        };
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
