//! The reverse proxy: routes (path prefix → upstream), the forwarding service, and the request /
//! response adapters the guard uses to find images and labels.

mod client;
pub mod forward;
mod multipart;
pub mod request;
pub mod response;
mod scan;

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use http::Request;
use tower::{Layer, Service};

pub use self::forward::Forwarder;
use crate::config::Config;
use crate::error::GuardError;
use crate::guard::{DiffGuardLayer, DiffGuardService, Guard, RouteGuard};

/// What serves one route: the guard around the forwarder to its upstream.
type RouteService = DiffGuardService<Forwarder>;

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
            routes.push((r.prefix.clone(), svc));
        }
        routes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(Self {
            routes: Arc::new(routes),
        })
    }

    /// Serves `req` on the route with the longest matching prefix (404 when none matches).
    /// Every route service is always ready and serves a call from a shared reference, so the
    /// table needs no clone, readiness check or boxing of its own per request.
    pub fn dispatch(&self, req: Request<Body>) -> BoxFuture<'static, Result<Response, Infallible>> {
        let path = req.uri().path();
        match self
            .routes
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
        {
            Some((_, svc)) => svc.serve(req),
            None => {
                let resp = GuardError::NoRoute(path.to_string()).into_response();
                Box::pin(std::future::ready(Ok(resp)))
            }
        }
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
        self.dispatch(req)
    }
}
