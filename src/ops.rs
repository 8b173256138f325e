//! The ops listener: `/healthz` (process up), `/readyz` (detector ready, Redis answering when
//! configured), `/metrics` (Prometheus text), `/openapi.json`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http::{StatusCode, header};

use crate::cache::VerdictStore;
use crate::guard::Guard;

/// Routes of the ops listener.
pub fn router(guard: Arc<Guard>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    openapi().to_string(),
                )
            }),
        )
        .with_state(guard)
}

async fn readyz(State(guard): State<Arc<Guard>>) -> Response {
    let detector = guard.detector().ready();
    let redis = match guard.cache().redis() {
        Some(r) => Some(r.ping().await),
        None => None,
    };
    let ready = detector && redis != Some(false);
    let body = serde_json::json!({"ready": ready, "detector": detector, "detector_fingerprint": guard.fingerprint(), "redis": redis});
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::prometheus().render(),
    )
        .into_response()
}

/// The OpenAPI 3.1 description of the verdict API, the ops endpoints and the guard's headers.
pub fn openapi() -> serde_json::Value {
    let report = serde_json::json!({"$ref": "#/components/schemas/VerdictReport"});
    serde_json::json!({
        "openapi": "3.1.0",
        "info": {"title": "DiffGuard guard", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Reverse proxy that scores image-classifier predictions for out-of-distribution inputs. Proxied routes are the upstream's own API; the guard adds the diffguard-* response headers described in components.headers."},
        "paths": {
            "/diffguard/v1/verdicts/{id}": {"get": {
                "summary": "Verdict of a guarded request",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "final verdict", "content": {"application/json": {"schema": report}}},
                    "202": {"description": "still pending", "content": {"application/json": {"schema": report}}},
                    "404": {"description": "unknown or expired id", "content": {"application/problem+json": {}}}}}},
            "/diffguard/v1/verdicts/{id}/events": {"get": {
                "summary": "Server-sent events: one `verdict` event when the verdict is final",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {}}}, "404": {"description": "unknown id"}}}},
            "/healthz": {"get": {"summary": "liveness (ops listener)", "responses": {"200": {"description": "up"}}}},
            "/readyz": {"get": {"summary": "readiness (ops listener)", "responses": {"200": {"description": "ready"}, "503": {"description": "detector or Redis not ready"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (ops listener)", "responses": {"200": {"description": "text exposition"}}}}
        },
        "components": {
            "schemas": {
                "Verdict": {"type": "string", "enum": ["in-distribution", "ood", "pending", "unverified"]},
                "InstanceReport": {"type": "object", "required": ["verdict", "cache"], "properties": {
                    "verdict": {"$ref": "#/components/schemas/Verdict"}, "label": {"type": "integer"}, "label_name": {"type": "string"},
                    "score": {"type": "number"}, "threshold": {"type": "number"}, "reason": {"type": "string"},
                    "cache": {"type": "string", "enum": ["hit", "miss"]}}},
                "VerdictReport": {"type": "object", "required": ["id", "route", "verdict", "detector", "instances"], "properties": {
                    "id": {"type": "string"}, "route": {"type": "string"}, "verdict": {"$ref": "#/components/schemas/Verdict"},
                    "detector": {"type": "string"}, "instances": {"type": "array", "items": {"$ref": "#/components/schemas/InstanceReport"}}}}
            },
            "headers": {
                "diffguard-verdict": {"description": "in-distribution | ood | pending | unverified", "schema": {"type": "string"}},
                "diffguard-score": {"description": "OOD score per instance, comma-separated; higher = more OOD", "schema": {"type": "string"}},
                "diffguard-threshold": {"description": "threshold per instance; score > threshold means OOD", "schema": {"type": "string"}},
                "diffguard-label": {"description": "label id per instance in the detector's label space", "schema": {"type": "string"}},
                "diffguard-id": {"description": "verdict id for /diffguard/v1/verdicts/{id}", "schema": {"type": "string"}},
                "diffguard-cache": {"description": "hit | miss per instance", "schema": {"type": "string"}}
            }
        }
    })
}
