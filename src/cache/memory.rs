//! The in-process tier: moka with a capacity and a time to live.

use std::time::Duration;

use futures_util::future::BoxFuture;
use moka::future::Cache;

use super::{CacheError, VerdictStore};
use crate::guard::{Score, VerdictKey};

/// In-process verdict cache.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<VerdictKey, Score>,
}

impl MemoryStore {
    /// `capacity` entries, each kept `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
        }
    }
}

impl VerdictStore for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn get<'a>(&'a self, key: &'a VerdictKey) -> BoxFuture<'a, Result<Option<Score>, CacheError>> {
        Box::pin(async move { Ok(self.cache.get(key).await) })
    }
    fn put<'a>(
        &'a self,
        key: &'a VerdictKey,
        score: &'a Score,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            self.cache.insert(*key, score.clone()).await;
            Ok(())
        })
    }
}
