//! Metric names (one place, so dashboards and code agree) and their histogram buckets.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Requests through a guarded route, by `route` and `status`.
pub const REQUESTS: &str = "diffguard_requests_total";
/// Upstream time to response headers, by `route`.
pub const UPSTREAM_SECONDS: &str = "diffguard_upstream_seconds";
/// Time the guard added on top of the upstream, by `route`.
pub const ADDED_SECONDS: &str = "diffguard_added_seconds";
/// Cache lookups by `tier` and `result` (`hit`/`miss`).
pub const CACHE: &str = "diffguard_cache_lookups_total";
/// Cache tier failures (degraded to a miss), by `tier`.
pub const CACHE_ERRORS: &str = "diffguard_cache_errors_total";
/// Jobs waiting for a scoring thread.
pub const QUEUE_DEPTH: &str = "diffguard_queue_depth";
/// Jobs refused because the queue was full.
pub const JOBS_DROPPED: &str = "diffguard_jobs_dropped_total";
/// Jobs scored.
pub const JOBS: &str = "diffguard_jobs_total";
/// Requests that joined an identical in-flight job.
pub const SINGLE_FLIGHT_JOINS: &str = "diffguard_single_flight_joins_total";
/// Verdicts by `route`, `label`, `verdict`, `mode`.
pub const VERDICTS: &str = "diffguard_verdicts_total";
/// Detector time per image.
pub const ENGINE_SECONDS: &str = "diffguard_engine_seconds";

/// Histogram buckets: the proxy path is sub-millisecond, the engine takes up to a minute.
const FAST: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const SLOW: [f64; 12] = [
    0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

pub(super) fn builder() -> PrometheusBuilder {
    [
        (UPSTREAM_SECONDS, &FAST[..]),
        (ADDED_SECONDS, &FAST[..]),
        (ENGINE_SECONDS, &SLOW[..]),
    ]
    .into_iter()
    .fold(PrometheusBuilder::new(), |b, (name, buckets)| {
        // Only an empty bucket list is refused; ours are constant and non-empty.
        match b.set_buckets_for_metric(Matcher::Full(name.into()), buckets) {
            Ok(b) => b,
            Err(e) => unreachable!("constant buckets for {name}: {e}"),
        }
    })
}
