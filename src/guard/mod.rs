//! The guard: from an image and a predicted label to a verdict, under a route's policy.
//!
//! - [`detector`]: the `Detector` seam and its factory.
//! - [`diffguard`]: the DiffGuard detector (the engine, from a model bundle).
//! - [`logits`]: a model-free detector on the upstream's own logits (energy, max-logit, MSP).
//! - [`decode`]: image decoding with pixel limits.
//! - [`input`]: a request's images: hashed always, decoded only when needed.
//! - [`verdict`]: verdicts, outcomes, cache keys, reports.
//! - [`queue`]: bounded, micro-batched, single-flight scoring on OS threads.
//! - [`registry`]: verdict ids for late verdicts.
//! - [`policy`]: reject / flag / shadow / off as a pure function.
//! - [`layer`]: [`DiffGuardLayer`], the tower layer that puts it all around a service.

pub mod decode;
pub mod detector;
pub mod diffguard;
mod fifo;
pub mod input;
pub mod layer;
pub mod logits;
pub mod policy;
pub mod queue;
pub mod registry;
pub mod verdict;

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

pub use self::decode::DecodeError;
pub use self::detector::{Detector, DetectorError, Diagnostics, Image, Job, Score, build_detector};
pub use self::input::{ImageInput, KnownImages};
pub use self::layer::{DiffGuardLayer, DiffGuardService, RouteGuard};
use self::queue::{ScoringQueue, Submitted};
use self::registry::{InstanceSlot, OutcomeSlot};
pub use self::registry::{RequestRecord, VerdictRegistry};
pub use self::verdict::{CacheStatus, Outcome, Verdict, VerdictKey, VerdictKeyer, VerdictReport};
use crate::cache::{MemoryStore, RedisStore, Tiered};
use crate::config::Config;
use crate::webhook::Webhook;

fn joined(label: u32, label_name: Option<String>, slot: queue::Slot) -> InstanceSlot {
    // Already answered but not yet cached: served without scoring, i.e. a hit.
    let cache = if slot.borrow().is_some() {
        CacheStatus::Hit
    } else {
        CacheStatus::Miss
    };
    InstanceSlot {
        label: Some(label),
        label_name,
        cache,
        slot: OutcomeSlot::Awaited(slot),
    }
}

/// Shared state of every guarded route: detector, queue, cache, verdict ids, limits.
pub struct Guard {
    detector: Arc<dyn Detector>,
    fingerprint: Arc<str>,
    keyer: VerdictKeyer,
    queue: Arc<ScoringQueue>,
    cache: Arc<Tiered>,
    registry: VerdictRegistry,
    known: KnownImages,
    webhook: Option<Webhook>,
    max_body_bytes: usize,
    max_pixels: u64,
    /// The runtime `new` was called on: work that outlives a request runs there, not on the
    /// proxy's I/O thread, whose runtime ends when its listener has drained.
    background: tokio::runtime::Handle,
}

/// The guard could not start.
#[derive(Debug, thiserror::Error)]
pub enum GuardInitError {
    /// Redis URL unusable (an unreachable Redis is not an error).
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    /// Webhook URL or TLS client unusable (an unreachable endpoint is not an error).
    #[error(transparent)]
    Webhook(#[from] crate::webhook::WebhookError),
}

impl Guard {
    /// Starts the scoring threads and cache tiers. Call inside a Tokio runtime.
    pub fn new(cfg: &Config, detector: Arc<dyn Detector>) -> Result<Arc<Self>, GuardInitError> {
        // Metrics recorded before the recorder exists are lost; install it first.
        crate::telemetry::prometheus();
        let memory = MemoryStore::new(
            cfg.cache.memory_capacity,
            Duration::from_secs(cfg.cache.memory_ttl_secs),
        );
        let redis = cfg
            .cache
            .redis
            .as_ref()
            .map(RedisStore::connect)
            .transpose()?
            .map(Arc::new);
        let d = &cfg.detector;
        let fingerprint: Arc<str> = detector.fingerprint().into();
        Ok(Arc::new(Self {
            keyer: VerdictKeyer::new(&fingerprint),
            fingerprint,
            queue: ScoringQueue::start(detector.clone(), d.threads, d.batch_size, d.queue_capacity),
            detector,
            cache: Arc::new(Tiered::new(memory, redis)),
            registry: VerdictRegistry::new(
                cfg.verdicts.capacity,
                Duration::from_secs(cfg.verdicts.retention_secs),
            ),
            known: KnownImages::new(Duration::from_secs(cfg.cache.memory_ttl_secs)),
            webhook: Webhook::start(&cfg.webhook)?,
            max_body_bytes: cfg.server.max_body_bytes,
            max_pixels: cfg.server.max_pixels,
            background: tokio::runtime::Handle::current(),
        }))
    }

    /// Detector fingerprint (shared: every request's record carries a clone).
    pub fn fingerprint(&self) -> &Arc<str> {
        &self.fingerprint
    }

    /// The detector.
    pub fn detector(&self) -> &Arc<dyn Detector> {
        &self.detector
    }

    /// Verdict ids.
    pub fn registry(&self) -> &VerdictRegistry {
        &self.registry
    }

    /// Cache tiers.
    pub fn cache(&self) -> &Arc<Tiered> {
        &self.cache
    }

    /// The scoring queue.
    pub fn queue(&self) -> &Arc<ScoringQueue> {
        &self.queue
    }

    /// Body limit in bytes.
    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// Where OOD verdict reports are sent, when configured.
    pub fn webhook(&self) -> Option<&Webhook> {
        self.webhook.as_ref()
    }

    /// Images known to decode within this guard's limits.
    pub fn known_images(&self) -> &KnownImages {
        &self.known
    }

    /// Decoded pixel limit.
    pub fn max_pixels(&self) -> u64 {
        self.max_pixels
    }

    /// Runs work that may outlive the request (and the I/O thread serving it) on the runtime
    /// the guard was made on.
    pub fn spawn_background(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.background.spawn(work);
    }

    /// Finds or starts the verdict for one image + label: cache, then single-flight queue.
    pub async fn verdict_for(
        &self,
        image: &ImageInput,
        label: u32,
        label_name: Option<String>,
        logits: Option<Vec<f32>>,
    ) -> InstanceSlot {
        let key = self.keyer.key(image.hash(), label);
        // In-flight first: the follow-up fills the memory tier before it ends single-flight, so
        // checking in this order never misses a verdict that is just being cached.
        if let Some(slot) = self.queue.join(&key) {
            return joined(label, label_name, slot);
        }
        let cached = self
            .cache
            .get(&key)
            .instrument(tracing::info_span!("cache"))
            .await;
        if let Some(score) = cached {
            return InstanceSlot::resolved(
                Some(label),
                label_name,
                CacheStatus::Hit,
                Outcome::Scored(score),
            );
        }
        let unverified = |reason: String| {
            InstanceSlot::resolved(
                Some(label),
                label_name.clone(),
                CacheStatus::Miss,
                Outcome::Unverified { reason },
            )
        };
        // Only a miss needs the pixels; an image known to decode is decoded here, not earlier.
        let image = match image.pixels(self.max_pixels).await {
            Ok(i) => i,
            Err(e) => return unverified(e.to_string()),
        };
        let job = Job {
            image,
            label,
            logits,
        };
        match self.queue.submit(key, job, tracing::Span::current()) {
            Submitted::Joined(slot) => joined(label, label_name, slot),
            Submitted::Leader(slot) => {
                self.follow_up(key, slot.clone());
                InstanceSlot {
                    label: Some(label),
                    label_name,
                    cache: CacheStatus::Miss,
                    slot: OutcomeSlot::Awaited(slot),
                }
            }
            Submitted::Full => unverified("scoring queue full".into()),
        }
    }

    /// After the leader's job: fill the memory tier, end single-flight, then write Redis (which
    /// may be slow or down and must not hold the key in flight).
    fn follow_up(&self, key: VerdictKey, mut slot: queue::Slot) {
        let (cache, queue) = (self.cache.clone(), self.queue.clone());
        self.spawn_background(async move {
            let outcome = slot
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|v| v.clone());
            let score = match outcome {
                Some(Outcome::Scored(s)) => Some(s),
                _ => None,
            };
            if let Some(s) = &score {
                cache.put_memory(&key, s).await;
            }
            queue.finish(&key);
            if let Some(s) = &score {
                cache.put_remote(&key, s).await;
            }
        });
    }

    /// Stops the scoring threads after the queued jobs.
    pub fn shutdown(&self) {
        self.queue.shutdown();
    }
}
