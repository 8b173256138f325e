//! A bounded map that forgets its oldest entries first and every entry after a retention time:
//! the store behind verdict ids.
//!
//! Verdict ids are written once per request (and once more when a late verdict settles) and read
//! rarely, so recency of use says nothing and the newest must stay: first in, first out. A
//! general-purpose cache (moka, with its LRU bookkeeping, timer wheel and epoch-based reclamation)
//! cost ~12 µs per request on the cache-hit path here, more than any other step of the guard's
//! own work; this costs a hash-map insert and a queue push under an uncontended shard lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Upper bound on shards; fewer when the capacity is smaller.
const MAX_SHARDS: usize = 16;

/// Keys are random (UUIDs), so their low bits spread them over the shards.
pub(crate) struct FifoMap<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    per_shard: usize,
    retention: Duration,
}

struct Shard<V> {
    // Keys are random verdict ids minted here (clients only look them up), so a fast seeded
    // hasher is safe; SipHash was a visible share of a cache hit.
    entries: HashMap<u128, Stamped<V>, foldhash::fast::RandomState>,
    /// Keys in write order, with the write they record; a key written again has a newer record
    /// and its older one is skipped when it reaches the front.
    order: VecDeque<(u128, u64)>,
    writes: u64,
}

struct Stamped<V> {
    value: V,
    at: Instant,
    write: u64,
}

impl<V: Clone> FifoMap<V> {
    /// Holds at most `capacity` entries (a little fewer when `capacity` does not divide evenly
    /// over the shards), each for `retention` after its last write.
    pub(crate) fn new(capacity: u64, retention: Duration) -> Self {
        let capacity = usize::try_from(capacity).unwrap_or(usize::MAX).max(1);
        let shards = capacity.min(MAX_SHARDS);
        Self {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        entries: HashMap::default(),
                        order: VecDeque::new(),
                        writes: 0,
                    })
                })
                .collect(),
            per_shard: capacity / shards,
            retention,
        }
    }

    fn shard(&self, key: u128) -> MutexGuard<'_, Shard<V>> {
        let i = (key as usize) % self.shards.len();
        // A panic while holding the lock leaves a consistent map (every step below is a single
        // std collection call), so a poisoned lock is still usable.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `value`, restarting the key's retention, and drops what is over the bound or
    /// expired.
    pub(crate) fn insert(&self, key: u128, value: V) {
        self.shard(key)
            .write(key, value, self.per_shard, self.retention);
    }

    /// Writes `value` only if the key is held (and not expired), under one lock.
    pub(crate) fn replace(&self, key: u128, value: V) {
        let mut shard = self.shard(key);
        if shard.live(key, self.retention).is_some() {
            shard.write(key, value, self.per_shard, self.retention);
        }
    }

    /// The value, unless absent or expired.
    pub(crate) fn get(&self, key: u128) -> Option<V> {
        self.shard(key)
            .live(key, self.retention)
            .map(|e| e.value.clone())
    }

    /// Entries held, expired ones not yet dropped included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.entries.len()))
            .sum()
    }
}

impl<V> Shard<V> {
    fn live(&self, key: u128, retention: Duration) -> Option<&Stamped<V>> {
        self.entries
            .get(&key)
            .filter(|e| e.at.elapsed() < retention)
    }

    fn write(&mut self, key: u128, value: V, bound: usize, retention: Duration) {
        let now = Instant::now();
        self.writes += 1;
        let write = self.writes;
        self.entries.insert(
            key,
            Stamped {
                value,
                at: now,
                write,
            },
        );
        self.order.push_back((key, write));
        self.evict(bound, now, retention);
    }

    fn evict(&mut self, bound: usize, now: Instant, retention: Duration) {
        while let Some(&(key, write)) = self.order.front() {
            let current = self.entries.get(&key).filter(|e| e.write == write);
            match current {
                Some(e) if self.entries.len() <= bound && now.duration_since(e.at) < retention => {
                    break;
                }
                Some(_) => {
                    self.entries.remove(&key);
                }
                // Superseded by a later write of the same key.
                None => {}
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_go_first_and_the_bound_holds() {
        let m = FifoMap::new(100, Duration::from_secs(60));
        // Consecutive keys land in consecutive shards, as random ones do on average.
        for k in 0..1_000u128 {
            m.insert(k, k);
        }
        assert!(m.len() <= 100, "{} entries over a bound of 100", m.len());
        assert!(m.len() >= 100 - MAX_SHARDS, "{} entries", m.len());
        for k in 990..1_000 {
            assert_eq!(m.get(k), Some(k), "a fresh key was dropped");
        }
        assert_eq!(m.get(0), None);
        assert_eq!(m.get(899), None);
    }

    #[test]
    fn entries_expire_after_the_retention_from_their_last_write() {
        // 16 shards of 4; keys 1, 17 and 33 share a shard. Sleeps only overshoot, so the
        // expired key is certain; the rewritten one has 150 ms of slack.
        let m = FifoMap::new(64, Duration::from_millis(400));
        m.insert(1, "a");
        m.insert(17, "b");
        std::thread::sleep(Duration::from_millis(250));
        m.replace(17, "b2");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(m.get(1), None, "expired 500 ms after its write");
        assert_eq!(m.get(17), Some("b2"), "rewritten 250 ms ago");
        // The next write to the shard drops the expired entry instead of keeping it until the
        // bound.
        m.insert(33, "c");
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn replace_never_resurrects_and_a_rewrite_keeps_one_entry() {
        let m = FifoMap::new(64, Duration::from_secs(60)); // 16 shards of 4
        m.replace(7, 1);
        assert_eq!(m.get(7), None);
        m.insert(7, 1);
        m.replace(7, 2);
        assert_eq!(m.get(7), Some(2));
        assert_eq!(m.len(), 1);
        // The rewrite moved key 7 to the back of its shard: newer keys of that shard go first.
        let shards = m.shards.len() as u128;
        m.insert(7 + shards, 3);
        m.replace(7, 4);
        for i in 2..=4 {
            m.insert(7 + i * shards, 5);
        }
        assert_eq!(m.get(7 + shards), None);
        assert_eq!(m.get(7), Some(4));
    }
}
