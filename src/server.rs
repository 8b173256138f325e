//! Assembles and runs the two listeners (proxy + verdict API, ops) with graceful shutdown.
//!
//! The proxy listener is served by `server.io_threads` threads, each a single-threaded Tokio
//! runtime accepting from the same socket, the way nginx runs worker processes. A connection, the
//! guard work of its requests and the upstream connections they use then stay on one thread: no
//! work stealing, no waking another core per request. On the cache-hit path that is most of the
//! guard's CPU beyond its own work (`benches/proxy_vs_nginx.md`). Work that outlives a request
//! (late verdicts, cache fills, the webhook) runs on the caller's runtime, which outlives them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use futures_util::future::BoxFuture;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::Config;
use crate::error::GuardError;
use crate::guard::{Detector, Guard, GuardInitError};
use crate::proxy::RouteTable;
use crate::{api, ops};

/// The server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// Guard state could not be built.
    #[error(transparent)]
    Guard(#[from] GuardInitError),
    /// A route could not be built.
    #[error(transparent)]
    Route(#[from] GuardError),
    /// An I/O thread or its runtime could not be started.
    #[error("cannot start proxy I/O thread: {0}")]
    Thread(std::io::Error),
}

/// A running guard.
pub struct RunningServer {
    /// Proxy listener address (useful with port 0).
    pub addr: SocketAddr,
    /// Ops listener address.
    pub ops_addr: SocketAddr,
    /// Shared guard state.
    pub guard: Arc<Guard>,
    shutdown: CancellationToken,
    /// Each resolves when a listener has drained (the I/O threads' and the ops listener's).
    tasks: Vec<Drained>,
    grace: Duration,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish (up to the grace period), then stops the
    /// scoring threads and delivers the webhook reports still queued (each step up to the grace
    /// period).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let drain = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(
                grace_ms = self.grace.as_millis() as u64,
                "shutdown grace period over; dropping in-flight requests"
            );
        }
        // Queued jobs get one more grace period; past it the threads are abandoned.
        let guard = self.guard.clone();
        let stop = tokio::task::spawn_blocking(move || guard.shutdown());
        if tokio::time::timeout(self.grace, stop).await.is_err() {
            tracing::warn!("scoring threads still busy at shutdown; not waiting for them");
        }
        // Last: the scoring threads may have queued reports for late OOD verdicts.
        if let Some(webhook) = self.guard.webhook() {
            webhook.shutdown(self.grace).await;
        }
    }

    /// A token that stops the server when cancelled (signals, tests).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

fn bind_error(addr: &str) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Bind {
        addr: addr.to_string(),
        source,
    }
}

async fn bind(addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(bind_error(addr))
}

/// `server.io_threads`, with 0 meaning one per CPU.
fn io_thread_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

/// Serves `app` on `listener` until `token` is cancelled and the connections have drained.
async fn serve(listener: TcpListener, app: axum::Router, token: CancellationToken) {
    let svc = app.into_make_service_with_connect_info::<SocketAddr>();
    if let Err(e) = axum::serve(listener, svc)
        .with_graceful_shutdown(token.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "listener failed");
    }
}

/// Resolves (with an error, as the sender is dropped) when a listener has drained.
type Drained = tokio::sync::oneshot::Receiver<()>;

/// One proxy connection's service: the verdict API under its prefix, the routes elsewhere.
///
/// It stands where `axum::serve` and a router did: the routes are dispatched straight from the
/// table, without a router clone, a connect-info layer and a boxed route future per request
/// (`benches/proxy_vs_nginx.md`, session 10).
struct ProxyConnection {
    peer: SocketAddr,
    routes: RouteTable,
    api: axum::Router,
}

impl hyper::service::Service<Request<Incoming>> for ProxyConnection {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(axum::body::Body::new);
        // Where `axum::serve` put it: the forwarder and handlers read the client address there.
        req.extensions_mut().insert(ConnectInfo(self.peer));
        if req.uri().path().starts_with(api::PREFIX) {
            Box::pin(self.api.clone().oneshot(req))
        } else {
            self.routes.dispatch(req)
        }
    }
}

/// Errors of `accept` that concern one connection only: the next accept is unaffected.
fn connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// How often an I/O thread's timer keeper fires: sooner than any request's upstream deadline.
fn keeper_period(cfg: &Config) -> Duration {
    let shortest = cfg
        .routes
        .iter()
        .map(|r| r.timeout_ms)
        .min()
        .unwrap_or(1_000);
    Duration::from_millis((shortest / 2).clamp(10, 1_000))
}

/// Keeps a timer armed on this I/O thread, due sooner than any request's upstream deadline.
/// Tokio wakes its driver through an eventfd (a `write` syscall, then one more turn of the event
/// loop) whenever a timer is set that is due before every armed one; with none armed, that was
/// most requests' upstream deadline (`strace`: 0.7 writes per cache hit, none in `hyper_floor`).
async fn keep_timer_armed(period: Duration, token: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    token
        .run_until_cancelled(async {
            loop {
                tick.tick().await;
            }
        })
        .await;
}

/// Serves the proxy on `listener` until `token` is cancelled, then lets open connections finish
/// their requests (each closes once idle).
async fn serve_proxy(
    listener: TcpListener,
    routes: RouteTable,
    api: axum::Router,
    keeper: Duration,
    token: CancellationToken,
) {
    tokio::spawn(keep_timer_armed(keeper, token.clone()));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // Head and body copied into one buffer per write: for the small answers classifiers give,
    // cheaper than hyper's vectored queue (about 1,300 instructions of a cache hit, both sides
    // together). Large bodies are copied in pieces of at most hyper's buffer size.
    builder.http1().writev(false);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = token.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) if connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors, most likely: give connections time to close.
                tracing::error!(error = %e, "accept failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // Small answers go out at once rather than wait for the client's ACK (Nagle).
        let _ = stream.set_nodelay(true);
        let svc = ProxyConnection {
            peer,
            routes: routes.clone(),
            api: api.clone(),
        };
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Starts one I/O thread serving `app` from its own handle on the shared listening socket.
/// The runtime and the listener's registration are made here, so their errors stop the start.
fn spawn_io_thread(
    index: usize,
    listener: &std::net::TcpListener,
    routes: RouteTable,
    api: axum::Router,
    keeper: Duration,
    token: CancellationToken,
) -> Result<Drained, ServerError> {
    let runtime: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Thread)?;
    let listener = {
        let _in_runtime = runtime.enter();
        TcpListener::from_std(listener.try_clone().map_err(ServerError::Thread)?)
            .map_err(ServerError::Thread)?
    };
    let (drained, on_drained) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("diffguard-io-{index}"))
        .spawn(move || {
            runtime.block_on(serve_proxy(listener, routes, api, keeper, token));
            drop(drained);
        })
        .map_err(ServerError::Thread)?;
    Ok(on_drained)
}

/// Starts both listeners with `detector`. Call inside a Tokio runtime: the ops listener and the
/// guard's background work run on it, the proxy listener on its own I/O threads.
pub async fn start(
    cfg: &Config,
    detector: Arc<dyn Detector>,
) -> Result<RunningServer, ServerError> {
    let guard = Guard::new(cfg, detector)?;
    let listen = cfg.server.listen.as_str();
    // Bound through Tokio for its SO_REUSEADDR (a restart must not wait out TIME_WAIT), then
    // handed to the I/O threads, which register it with their own runtimes.
    let listener = bind(listen).await?.into_std().map_err(bind_error(listen))?;
    let addr = listener.local_addr().map_err(bind_error(listen))?;
    let ops_listener = bind(&cfg.server.ops_listen).await?;
    let ops_addr = ops_listener
        .local_addr()
        .map_err(bind_error(&cfg.server.ops_listen))?;
    let token = CancellationToken::new();
    let threads = io_thread_count(cfg.server.io_threads);
    // Each thread gets its own route table, so its own upstream connection pools: an upstream
    // connection is driven by the thread whose requests use it.
    let tables = (0..threads)
        .map(|_| RouteTable::from_config(cfg, &guard))
        .collect::<Result<Vec<_>, _>>()?;
    let keeper = keeper_period(cfg);
    let mut tasks = Vec::with_capacity(threads + 1);
    for (i, table) in tables.into_iter().enumerate() {
        // A path under the API's prefix that names no API endpoint is still a route's.
        let api = api::router(guard.clone()).fallback_service(table.clone());
        match spawn_io_thread(i, &listener, table, api, keeper, token.clone()) {
            Ok(drained) => tasks.push(drained),
            Err(e) => {
                // The threads already started stop with the token.
                token.cancel();
                return Err(e);
            }
        }
    }
    let (drained, on_drained) = tokio::sync::oneshot::channel::<()>();
    let ops = ops::router(guard.clone());
    let ops_token = token.clone();
    tokio::spawn(async move {
        serve(ops_listener, ops, ops_token).await;
        drop(drained);
    });
    tasks.push(on_drained);
    tracing::info!(%addr, %ops_addr, io_threads = threads, detector = %guard.fingerprint(), routes = cfg.routes.len(), "diffguard listening");
    Ok(RunningServer {
        addr,
        ops_addr,
        guard,
        shutdown: token,
        tasks,
        grace: Duration::from_millis(cfg.server.shutdown_grace_ms),
    })
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
