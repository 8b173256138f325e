//! The DiffGuard guard: a reverse proxy that scores every classifier prediction for
//! out-of-distribution inputs and annotates, rejects or shadows it per route.
//!
//! Modules follow the request path (DESIGN §2–§3):
//! - [`config`]: the one typed configuration (TOML + `DIFFGUARD_*` env), validated at start.
//! - [`proxy`]: routes, forwarding, request/response adapters.
//! - [`guard`]: the `Detector` seam, scoring queue, policy, verdict ids, and [`guard::DiffGuardLayer`].
//! - [`cache`]: verdict stores (in process, Redis).
//! - [`telemetry`]: tracing, OTLP, Prometheus.
//! - [`api`]: late verdicts (poll and SSE); [`ops`]: health, readiness, metrics, OpenAPI.
//! - [`server`]: listeners and graceful shutdown; [`upstream`]: the example classifier server;
//!   [`demo`]: the `diffguard demo` command; [`cli`]: `diffguard eval` and `diffguard calibrate`.
//! - [`webhook`]: the optional POST of OOD verdict reports.

pub mod api;
pub mod cache;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod guard;
pub mod ops;
pub mod proxy;
pub mod server;
pub mod telemetry;
pub mod upstream;
pub mod webhook;
