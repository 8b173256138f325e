//! The client-facing verdict API: `GET /diffguard/v1/verdicts/{id}` (200 done, 202 pending,
//! 404 unknown) and `GET /diffguard/v1/verdicts/{id}/events`, a server-sent-events stream that
//! delivers the verdict once it is ready.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::StatusCode;

use crate::guard::Guard;
use crate::guard::registry::Entry;

/// Longest an SSE stream stays open waiting for a verdict.
const SSE_MAX_WAIT: Duration = Duration::from_secs(300);

/// Every path of the verdict API starts with this.
pub const PREFIX: &str = "/diffguard/v1/";

/// Routes of the verdict API.
pub fn router(guard: Arc<Guard>) -> Router {
    Router::new()
        .route(&format!("{PREFIX}verdicts/{{id}}"), get(verdict))
        .route(&format!("{PREFIX}verdicts/{{id}}/events"), get(events))
        .with_state(guard)
}

fn not_found(id: &str) -> Response {
    let body = serde_json::json!({
        "type": "urn:diffguard:problem:unknown-verdict",
        "title": "Not Found",
        "status": 404,
        "detail": format!("no verdict with id {id} (unknown or expired)"),
    });
    (
        StatusCode::NOT_FOUND,
        [(http::header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

async fn verdict(State(guard): State<Arc<Guard>>, Path(id): Path<String>) -> Response {
    match guard.registry().get(&id) {
        None => not_found(&id),
        Some(Entry::Settled(report)) => (StatusCode::OK, Json(report)).into_response(),
        Some(Entry::Live(rec)) => {
            let status = if rec.done() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            (status, Json(rec.report())).into_response()
        }
    }
}

async fn events(State(guard): State<Arc<Guard>>, Path(id): Path<String>) -> Response {
    let Some(entry) = guard.registry().get(&id) else {
        return not_found(&id);
    };
    let stream = futures_util::stream::once(async move {
        let (name, report) = match entry {
            Entry::Settled(report) => ("verdict", report),
            Entry::Live(rec) => {
                let done = rec.wait(SSE_MAX_WAIT).await;
                let name = if done { "verdict" } else { "timeout" };
                (name, Arc::new(rec.report()))
            }
        };
        let event = Event::default()
            .event(name)
            .json_data(&*report)
            .unwrap_or_else(|_| Event::default().event("error"));
        Ok::<_, Infallible>(event)
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
