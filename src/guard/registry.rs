//! Verdict ids: every scored request is remembered for `verdicts.retention_secs` so clients can
//! read a late verdict by id (poll or SSE).

use std::sync::Arc;
use std::time::Duration;

use super::fifo::FifoMap;
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
    /// The outcome, or where it will arrive.
    pub slot: OutcomeSlot,
}

/// An instance's outcome: known when the request is answered, or on its way from the scorer.
#[derive(Debug, Clone)]
pub enum OutcomeSlot {
    /// Known now (cache hits, unverified instances). Most requests under load: a channel made
    /// only to hold a known value was a measurable share of a cache hit.
    Known(Outcome),
    /// Filled by the scoring queue.
    Awaited(Slot),
}

impl OutcomeSlot {
    fn get(&self) -> Option<Outcome> {
        match self {
            Self::Known(o) => Some(o.clone()),
            Self::Awaited(rx) => rx.borrow().clone(),
        }
    }

    fn is_filled(&self) -> bool {
        match self {
            Self::Known(_) => true,
            Self::Awaited(rx) => rx.borrow().is_some(),
        }
    }
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
            slot: OutcomeSlot::Known(outcome),
        }
    }

    fn outcome(&self) -> Option<Outcome> {
        self.slot.get()
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
        let OutcomeSlot::Awaited(rx) = &self.slot else {
            return;
        };
        let mut rx = rx.clone();
        // Err = the scorer went away without answering; the report then says pending → treated as unverified by callers.
        let _ = rx.wait_for(Option::is_some).await;
    }
}

/// The verdict state of one request. Its strings are shared with its reports (and the route's
/// and detector's with every request): a cache hit copied each of them twice.
#[derive(Debug)]
pub struct RequestRecord {
    /// Verdict id.
    pub id: Arc<str>,
    /// Route name.
    pub route: Arc<str>,
    /// Detector fingerprint.
    pub detector: Arc<str>,
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
        self.instances.iter().all(|i| i.slot.is_filled())
    }
}

/// What the registry keeps for one id.
#[derive(Clone)]
pub enum Entry {
    /// Some instance is still being scored: the record with its outcome channels.
    Live(Arc<RequestRecord>),
    /// Every outcome is known: only the final report, the one the response was built from. A
    /// record with its channels costs ~2 KB; a report a few hundred bytes (its diagnostics are
    /// shared with the cache), and under load almost every request is settled when it is
    /// answered (cache hits). It is rendered as JSON only when its id is read, which few are.
    Settled(Arc<VerdictReport>),
}

/// Verdict ids → records, bounded and expiring.
#[derive(Clone)]
pub struct VerdictRegistry {
    records: Arc<FifoMap<Entry>>,
}

impl VerdictRegistry {
    /// Keeps up to `capacity` ids, each for `retention` (counted from the last change: the final
    /// verdict of a late record restarts it). When full, the oldest ids go first: every id is
    /// written once and read rarely, so how often one was read says nothing, and the newest must
    /// stay.
    pub fn new(capacity: u64, retention: Duration) -> Self {
        Self {
            records: Arc::new(FifoMap::new(capacity, retention)),
        }
    }

    /// Remembers a record as `report` (its snapshot, taken by the caller) shows it: settled when
    /// that report is final, live otherwise (then [`Self::settle`] it once it finishes).
    pub fn insert(&self, rec: &Arc<RequestRecord>, report: &Arc<VerdictReport>) {
        let Some(key) = key_of(&rec.id) else {
            return;
        };
        let entry = if report.is_final() {
            Entry::Settled(report.clone())
        } else {
            Entry::Live(rec.clone())
        };
        self.records.insert(key, entry);
    }

    /// Replaces a live record that has finished by its compact form; an id the registry has
    /// already forgotten stays forgotten.
    pub fn settle(&self, rec: &RequestRecord) {
        let report = rec.report();
        if let (Some(key), true) = (key_of(&rec.id), report.is_final()) {
            self.records.replace(key, Entry::Settled(Arc::new(report)));
        }
    }

    /// Looks an id up.
    pub fn get(&self, id: &str) -> Option<Entry> {
        self.records.get(key_of(id)?)
    }
}

/// Ids are UUIDs; anything else is unknown.
fn key_of(id: &str) -> Option<u128> {
    uuid::Uuid::parse_str(id).ok().map(|u| u.as_u128())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guard::detector::Score;

    fn record(slot: InstanceSlot) -> Arc<RequestRecord> {
        Arc::new(RequestRecord {
            id: uuid::Uuid::new_v4().to_string().into(),
            route: "r".into(),
            detector: "d".into(),
            instances: vec![slot],
        })
    }

    fn scored(score: f32) -> Outcome {
        Outcome::Scored(Score {
            score,
            threshold: 1.0,
            diagnostics: Default::default(),
        })
    }

    fn registry() -> VerdictRegistry {
        VerdictRegistry::new(100, Duration::from_secs(60))
    }

    #[test]
    fn a_settled_record_is_kept_as_its_report() {
        let reg = registry();
        let rec = record(InstanceSlot::resolved(
            Some(3),
            None,
            CacheStatus::Hit,
            scored(2.5),
        ));
        reg.insert(&rec, &Arc::new(rec.report()));
        let Some(Entry::Settled(report)) = reg.get(&rec.id) else {
            panic!("a finished record must be stored settled");
        };
        assert_eq!(*report, rec.report());
        assert_eq!(report.verdict, Verdict::Ood);
    }

    #[test]
    fn a_live_record_settles_when_its_outcome_arrives() {
        let reg = registry();
        let (tx, rx) = tokio::sync::watch::channel(None);
        let rec = record(InstanceSlot {
            label: Some(1),
            label_name: None,
            cache: CacheStatus::Miss,
            slot: OutcomeSlot::Awaited(rx),
        });
        reg.insert(&rec, &Arc::new(rec.report()));
        assert!(matches!(reg.get(&rec.id), Some(Entry::Live(_))));
        reg.settle(&rec); // not done yet: stays live
        assert!(matches!(reg.get(&rec.id), Some(Entry::Live(_))));
        tx.send(Some(scored(0.5))).expect("receiver alive");
        reg.settle(&rec);
        let Some(Entry::Settled(report)) = reg.get(&rec.id) else {
            panic!("a finished record must settle");
        };
        assert_eq!(report.verdict, Verdict::InDistribution);
    }

    #[test]
    fn when_full_the_oldest_ids_go_and_the_newest_stay() {
        let reg = VerdictRegistry::new(100, Duration::from_secs(60));
        let mut ids = Vec::new();
        for i in 0..1_000 {
            let rec = record(InstanceSlot::resolved(
                None,
                None,
                CacheStatus::Miss,
                scored(i as f32),
            ));
            reg.insert(&rec, &Arc::new(rec.report()));
            ids.push(rec.id.clone());
        }
        for id in &ids[990..] {
            assert!(reg.get(id).is_some(), "a fresh id was refused");
        }
        assert!(
            reg.get(&ids[0]).is_none(),
            "the oldest id outlived the bound"
        );
        assert!(reg.records.len() <= 100);
    }

    #[test]
    fn unknown_malformed_and_forgotten_ids_are_absent() {
        let reg = registry();
        assert!(reg.get("not-a-uuid").is_none());
        assert!(reg.get(&uuid::Uuid::new_v4().to_string()).is_none());
        // settle never resurrects an id the registry does not hold.
        let rec = record(InstanceSlot::resolved(
            None,
            None,
            CacheStatus::Miss,
            scored(0.1),
        ));
        reg.settle(&rec);
        assert!(reg.get(&rec.id).is_none());
    }
}
