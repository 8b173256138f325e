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
/// Request images handed to the decoder (undecodable ones included): a cache hit on an image
/// this guard has decoded before needs no decode, so this grows more slowly than the image count.
pub const IMAGES_DECODED: &str = "diffguard_images_decoded_total";
/// Webhook deliveries of OOD reports by `result` (`ok`, `failed` after retries, `dropped` when
/// the queue was full).
pub const WEBHOOK: &str = "diffguard_webhook_deliveries_total";
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

/// One guarded route's per-request metrics. Handles are registered on first use and kept:
/// `metrics::counter!` with owned label values allocates, hashes and looks its key up on every
/// call, which was about a tenth of a cache hit's CPU.
pub struct RouteMetrics {
    route: String,
    mode: String,
    timings: std::sync::OnceLock<(metrics::Histogram, metrics::Histogram)>,
    requests: Memo<u16>,
    verdicts: Memo<(Option<u32>, &'static str)>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl RouteMetrics {
    /// Metrics labelled with `route` and, for verdicts, the policy `mode`.
    pub fn new(route: &str, mode: &str) -> Self {
        Self {
            route: route.to_string(),
            mode: mode.to_string(),
            timings: std::sync::OnceLock::new(),
            requests: Memo::default(),
            verdicts: Memo::default(),
        }
    }

    /// The policy mode the verdicts are labelled with.
    pub fn mode(&self) -> &str {
        &self.mode
    }

    /// One answered request: its status, the upstream's time and the time the guard added.
    pub fn request(&self, status: u16, upstream: std::time::Duration, added: std::time::Duration) {
        let route = &self.route;
        self.requests
            .get(status, || {
                metrics::counter!(REQUESTS, "route" => route.clone(), "status" => status.to_string())
            })
            .increment(1);
        let (up, add) = self.timings.get_or_init(|| {
            (
                metrics::histogram!(UPSTREAM_SECONDS, "route" => route.clone()),
                metrics::histogram!(ADDED_SECONDS, "route" => route.clone()),
            )
        });
        up.record(upstream.as_secs_f64());
        add.record(added.as_secs_f64());
    }

    /// One image's verdict for a detector label (`None`: the label could not be read).
    pub fn verdict(&self, label: Option<u32>, verdict: &'static str) {
        let (route, mode) = (&self.route, &self.mode);
        self.verdicts
            .get((label, verdict), || {
                let label = label.map_or_else(|| "unknown".to_string(), |l| l.to_string());
                metrics::counter!(VERDICTS, "route" => route.clone(), "label" => label, "verdict" => verdict, "mode" => mode.clone())
            })
            .increment(1);
    }
}

/// Counter handles by label values. The values are bounded (statuses, label ids × verdicts) and
/// the guard's own, so a fast hasher serves: SipHash was a visible share of a cache hit.
struct Memo<K>(
    std::sync::RwLock<std::collections::HashMap<K, metrics::Counter, foldhash::fast::RandomState>>,
);

impl<K> Default for Memo<K> {
    fn default() -> Self {
        Self(Default::default())
    }
}

impl<K: Eq + std::hash::Hash + Copy> Memo<K> {
    fn get(&self, key: K, register: impl FnOnce() -> metrics::Counter) -> metrics::Counter {
        if let Some(c) = self.0.read().ok().and_then(|m| m.get(&key).cloned()) {
            return c;
        }
        let c = register();
        // A poisoned lock only costs the memo: the handle still counts.
        if let Ok(mut m) = self.0.write() {
            m.insert(key, c.clone());
        }
        c
    }
}
