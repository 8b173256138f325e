//! Verdict caches. [`VerdictStore`] is the seam; [`Tiered`] puts the in-process tier in front of an
//! optional Redis tier. Cache trouble never fails a request: a broken tier is a miss.

mod memory;
mod redis;

use std::sync::Arc;

use futures_util::future::BoxFuture;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
use crate::guard::{Score, VerdictKey};
use crate::telemetry::metric;

/// A cache tier failed (the caller treats it as a miss).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis did not answer in time, refused, or is not connected.
    #[error("redis: {0}")]
    Redis(String),
    /// A stored value could not be read back.
    #[error("corrupt cache entry: {0}")]
    Corrupt(String),
}

/// Stores scored verdicts by key. Only scores are cached: an unverified outcome is retried.
pub trait VerdictStore: Send + Sync {
    /// Tier name for metrics (`memory`, `redis`).
    fn name(&self) -> &'static str;
    /// Looks a key up.
    fn get<'a>(&'a self, key: &'a VerdictKey) -> BoxFuture<'a, Result<Option<Score>, CacheError>>;
    /// Stores a score.
    fn put<'a>(
        &'a self,
        key: &'a VerdictKey,
        score: &'a Score,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Reachable right now (`/readyz`).
    fn ping(&self) -> BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

/// Memory first, then Redis; a Redis hit is copied into memory.
pub struct Tiered {
    memory: MemoryStore,
    redis: Option<Arc<RedisStore>>,
    counters: [LookupCounters; 2],
}

/// One tier's hit and miss counters, registered on first use (after the recorder is installed)
/// and kept: `metrics::counter!` builds and looks its key up on every call, a visible share of a
/// cache hit's CPU.
#[derive(Default)]
struct LookupCounters([std::sync::OnceLock<metrics::Counter>; 2]);

impl LookupCounters {
    fn count(&self, tier: &'static str, hit: bool) {
        let (i, result) = if hit { (0, "hit") } else { (1, "miss") };
        self.0[i]
            .get_or_init(|| metrics::counter!(metric::CACHE, "tier" => tier, "result" => result))
            .increment(1);
    }
}

impl Tiered {
    /// Builds the tiers.
    pub fn new(memory: MemoryStore, redis: Option<Arc<RedisStore>>) -> Self {
        Self {
            memory,
            redis,
            counters: Default::default(),
        }
    }

    /// The Redis tier when configured.
    pub fn redis(&self) -> Option<&Arc<RedisStore>> {
        self.redis.as_ref()
    }

    /// Looks up every tier in order; errors count and fall through.
    pub async fn get(&self, key: &VerdictKey) -> Option<Score> {
        let [memory, redis] = &self.counters;
        if let Some(s) = lookup(&self.memory, memory, key).await {
            return Some(s);
        }
        let s = lookup(self.redis.as_deref()?, redis, key).await?;
        let _ = self.memory.put(key, &s).await;
        Some(s)
    }

    /// Writes the in-process tier.
    pub async fn put_memory(&self, key: &VerdictKey, score: &Score) {
        let _ = self.memory.put(key, score).await;
    }

    /// Writes the Redis tier when configured; errors are counted and logged, never returned.
    pub async fn put_remote(&self, key: &VerdictKey, score: &Score) {
        if let Some(r) = self.redis.as_deref()
            && let Err(e) = r.put(key, score).await
        {
            failed(r.name(), &e);
        }
    }
}

async fn lookup(
    store: &dyn VerdictStore,
    counters: &LookupCounters,
    key: &VerdictKey,
) -> Option<Score> {
    let tier = store.name();
    match store.get(key).await {
        Ok(found) => {
            counters.count(tier, found.is_some());
            found
        }
        Err(e) => {
            failed(tier, &e);
            None
        }
    }
}

fn failed(tier: &'static str, e: &CacheError) {
    metrics::counter!(metric::CACHE_ERRORS, "tier" => tier).increment(1);
    tracing::warn!(tier, error = %e, "verdict cache degraded; continuing without it");
}
