//! The floor under the guard's proxy: a pass-through reverse proxy built from hyper and
//! hyper-util alone (no axum, no guard, no telemetry), laid out as the guard serves (one
//! single-threaded runtime per I/O thread, all accepting from one socket, each with its own pooled
//! upstream client). `scripts/bench_proxy.sh` runs it beside nginx and the guard: what separates
//! the guard from nginx that this does not close is the HTTP stack's, not the guard's.
//!
//! ```text
//! cargo run --release --example hyper_floor -- --listen 127.0.0.1:18486 --upstream http://127.0.0.1:18481
//! ```

#[path = "support/floor.rs"]
mod floor;

use std::convert::Infallible;
use std::time::Duration;

use clap::Parser as _;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, hyper::Error>;

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: Uri,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut parts = upstream.into_parts();
    parts.path_and_query = req.uri().path_and_query().cloned();
    let Ok(uri) = Uri::from_parts(parts) else {
        return Ok(bad_gateway());
    };
    *req.uri_mut() = uri;
    Ok(match client.request(req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(_) => bad_gateway(),
    })
}

fn main() -> anyhow::Result<()> {
    let args = floor::Args::parse();
    let upstream = args.upstream;
    floor::serve_per_core(args.listen, args.threads, || {
        // One pool per I/O thread, as the guard keeps one per thread.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let upstream = upstream.clone();
        move |stream| {
            let (client, upstream) = (client.clone(), upstream.clone());
            async move {
                let svc = service_fn(move |req| forward(client.clone(), upstream.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            }
        }
    })
}
