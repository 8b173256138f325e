//! Assembles and runs the two listeners (proxy + verdict API, ops) with graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    tasks: Vec<JoinHandle<()>>,
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

async fn bind(addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Starts both listeners with `detector`. Call inside a Tokio runtime.
pub async fn start(
    cfg: &Config,
    detector: Arc<dyn Detector>,
) -> Result<RunningServer, ServerError> {
    let guard = Guard::new(cfg, detector)?;
    let table = RouteTable::from_config(cfg, &guard)?;
    let app = api::router(guard.clone()).fallback_service(table);
    let ops = ops::router(guard.clone());
    let (listener, ops_listener) = (
        bind(&cfg.server.listen).await?,
        bind(&cfg.server.ops_listen).await?,
    );
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: cfg.server.listen.clone(),
        source,
    })?;
    let ops_addr = ops_listener
        .local_addr()
        .map_err(|source| ServerError::Bind {
            addr: cfg.server.ops_listen.clone(),
            source,
        })?;
    let token = CancellationToken::new();
    let serve = |listener: TcpListener, app: axum::Router, token: CancellationToken| {
        tokio::spawn(async move {
            let svc = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, svc)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "listener failed");
            }
        })
    };
    let tasks = vec![
        serve(listener, app, token.clone()),
        serve(ops_listener, ops, token.clone()),
    ];
    tracing::info!(%addr, %ops_addr, detector = %guard.fingerprint(), routes = cfg.routes.len(), "diffguard listening");
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
