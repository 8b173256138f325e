//! Verdict ids: every scored request is remembered for `verdicts.retention_secs` so clients can
//! read a late verdict by id (poll or SSE).

use std::sync::Arc;
use std::time::Duration;

use moka::future::Cache;

use super::queue::Slot;
use super::verdict::{CacheStatus, InstanceReport, Outcome, Verdict, VerdictReport};

/// One image of a request.
#[derive(Debug, Clone)]
pub struct InstanceSlot {
    /// Detector label id, when the label could be read.
    pub label: Option<u32>,
    /// Class name, when the route lists names.
    pub label_name: Option<String>,
    /// Hit or miss.
    pub cache: CacheStatus,
    /// Receives the outcome (already filled for hits and unverified instances).
    pub slot: Slot,
}

impl InstanceSlot {
    /// An instance whose outcome is known now.
    pub fn resolved(
        label: Option<u32>,
        label_name: Option<String>,
        cache: CacheStatus,
        outcome: Outcome,
    ) -> Self {
        Self {
            label,
            label_name,
            cache,
            slot: tokio::sync::watch::channel(Some(outcome)).1,
        }
    }

    fn outcome(&self) -> Option<Outcome> {
        self.slot.borrow().clone()
    }

    fn report(&self) -> InstanceReport {
        let o = self.outcome();
        let (score, threshold, diagnostics) = match &o {
            Some(Outcome::Scored(s)) => (Some(s.score), Some(s.threshold), s.diagnostics.clone()),
            _ => (None, None, Default::default()),
        };
        InstanceReport {
            verdict: o.as_ref().map_or(Verdict::Pending, Outcome::verdict),
            label: self.label,
            label_name: self.label_name.clone(),
            score,
            threshold,
            reason: match o {
                Some(Outcome::Unverified { reason }) => Some(reason),
                _ => None,
            },
            cache: self.cache,
            diagnostics,
        }
    }

    async fn wait(&self) {
        let mut rx = self.slot.clone();
        // Err = the scorer went away without answering; the report then says pending → treated as unverified by callers.
        let _ = rx.wait_for(Option::is_some).await;
    }
}

/// The verdict state of one request.
#[derive(Debug)]
pub struct RequestRecord {
    /// Verdict id.
    pub id: String,
    /// Route name.
    pub route: String,
    /// Detector fingerprint.
    pub detector: String,
    /// One per image.
    pub instances: Vec<InstanceSlot>,
}

impl RequestRecord {
    /// Snapshot for clients.
    pub fn report(&self) -> VerdictReport {
        let instances: Vec<InstanceReport> =
            self.instances.iter().map(InstanceSlot::report).collect();
        VerdictReport {
            id: self.id.clone(),
            route: self.route.clone(),
            verdict: Verdict::combine(instances.iter().map(|i| i.verdict)),
            detector: self.detector.clone(),
            instances,
        }
    }

    /// Waits until every instance has an outcome, at most `budget`. True when all are done.
    pub async fn wait(&self, budget: Duration) -> bool {
        let all = futures_util::future::join_all(self.instances.iter().map(InstanceSlot::wait));
        tokio::time::timeout(budget, all).await.is_ok() && self.done()
    }

    /// Every instance has an outcome.
    pub fn done(&self) -> bool {
        self.instances.iter().all(|i| i.slot.borrow().is_some())
    }
}

/// Verdict ids → records, bounded and expiring.
#[derive(Clone)]
pub struct VerdictRegistry {
    records: Cache<String, Arc<RequestRecord>>,
}

impl VerdictRegistry {
    /// Keeps `capacity` ids for `retention` each.
    pub fn new(capacity: u64, retention: Duration) -> Self {
        Self {
            records: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(retention)
                .build(),
        }
    }

    /// Remembers a record.
    pub async fn insert(&self, rec: Arc<RequestRecord>) {
        self.records.insert(rec.id.clone(), rec).await;
    }

    /// Looks an id up.
    pub async fn get(&self, id: &str) -> Option<Arc<RequestRecord>> {
        self.records.get(id).await
    }
}
