//! The reverse proxy: routes (path prefix → upstream), the forwarding service, and the request /
//! response adapters the guard uses to find images and labels.

pub mod forward;
mod multipart;
pub mod request;
pub mod response;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use http::Request;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

pub use self::forward::Forwarder;
use crate::config::Config;
use crate::error::GuardError;
use crate::guard::{DiffGuardLayer, Guard, RouteGuard};

type RouteService = BoxCloneSyncService<Request<Body>, Response, Infallible>;

/// Longest-prefix dispatch to one guarded forwarder per route.
#[derive(Clone)]
pub struct RouteTable {
    routes: Arc<Vec<(String, RouteService)>>,
}

impl RouteTable {
    /// One `DiffGuardLayer(Forwarder)` per configured route. Upstream URLs were validated with
    /// the config; a bad one here is reported, not panicked on.
    pub fn from_config(cfg: &Config, guard: &Arc<Guard>) -> Result<Self, GuardError> {
        let mut routes: Vec<(String, RouteService)> = Vec::new();
        for r in &cfg.routes {
            let base = r
                .upstream
                .parse()
                .map_err(|e| GuardError::BadRequest(format!("routes.{}.upstream: {e}", r.name)))?;
            let fwd = Forwarder::new(
                base,
                r.strip_prefix
                    .then(|| r.prefix.trim_end_matches('/').to_string()),
                Duration::from_millis(r.connect_timeout_ms),
                Duration::from_millis(r.timeout_ms),
            );
            let svc = DiffGuardLayer::new(
                guard.clone(),
                RouteGuard::from_config(r, cfg.detector.num_classes),
            )
            .layer(fwd);
            routes.push((r.prefix.clone(), BoxCloneSyncService::new(svc)));
        }
        routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(Self {
            routes: Arc::new(routes),
        })
    }

    fn find(&self, path: &str) -> Option<RouteService> {
        self.routes
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|(_, s)| s.clone())
    }
}

impl Service<Request<Body>> for RouteTable {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let svc = self.find(req.uri().path());
        Box::pin(async move {
            match svc {
                Some(s) => s.oneshot(req).await,
                None => Ok(GuardError::NoRoute(req.uri().path().to_string()).into_response()),
            }
        })
    }
}
