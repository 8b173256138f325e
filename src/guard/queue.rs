//! The bounded scoring queue: detector work on dedicated OS threads, micro-batched, single-flight
//! on the verdict key. Submitting never blocks: a full queue answers [`Submitted::Full`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::watch;

use super::detector::{Detector, Job};
use super::verdict::{Outcome, VerdictKey};
use crate::telemetry::metric;

/// Receives the outcome of one job once the detector has answered.
pub type Slot = watch::Receiver<Option<Outcome>>;

/// Result of [`ScoringQueue::submit`].
#[derive(Debug)]
pub enum Submitted {
    /// A new job was queued; the caller owns the follow-up (cache write, then [`ScoringQueue::finish`]).
    Leader(Slot),
    /// An identical job is already queued or running; share its outcome.
    Joined(Slot),
    /// The queue is full; nothing was queued.
    Full,
}

struct QueuedJob {
    job: Job,
    reply: watch::Sender<Option<Outcome>>,
    span: tracing::Span,
}

/// Handle to the scoring threads.
pub struct ScoringQueue {
    tx: Mutex<Option<SyncSender<QueuedJob>>>,
    inflight: Mutex<HashMap<VerdictKey, Slot>>,
    depth: Arc<AtomicUsize>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ScoringQueue {
    /// Starts `threads` scoring threads, each taking up to `batch_size` jobs per detector call.
    pub fn start(
        detector: Arc<dyn Detector>,
        threads: usize,
        batch_size: usize,
        capacity: usize,
    ) -> Arc<Self> {
        let (tx, rx) = sync_channel::<QueuedJob>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        let depth = Arc::new(AtomicUsize::new(0));
        let workers = (0..threads.max(1))
            .map(|i| {
                let (rx, det, depth) = (rx.clone(), detector.clone(), depth.clone());
                std::thread::Builder::new()
                    .name(format!("diffguard-score-{i}"))
                    .spawn(move || worker(&rx, det.as_ref(), batch_size.max(1), &depth))
            })
            .filter_map(|r| {
                r.map_err(|e| tracing::error!(error = %e, "cannot spawn a scoring thread"))
                    .ok()
            })
            .collect();
        Arc::new(Self {
            tx: Mutex::new(Some(tx)),
            inflight: Mutex::new(HashMap::new()),
            depth,
            workers: Mutex::new(workers),
        })
    }

    /// Queues `job` unless an identical one (same `key`) is in flight. `span` is the request span
    /// the scoring span will be linked to.
    pub fn submit(&self, key: VerdictKey, job: Job, span: tracing::Span) -> Submitted {
        let mut inflight = lock(&self.inflight);
        if let Some(slot) = inflight.get(&key) {
            metrics::counter!(metric::SINGLE_FLIGHT_JOINS).increment(1);
            return Submitted::Joined(slot.clone());
        }
        let Some(tx) = lock(&self.tx).clone() else {
            return Submitted::Full;
        };
        let (reply, slot) = watch::channel(None);
        self.depth.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(QueuedJob { job, reply, span }) {
            Ok(()) => {
                metrics::gauge!(metric::QUEUE_DEPTH).set(self.depth() as f64);
                inflight.insert(key, slot.clone());
                Submitted::Leader(slot)
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                metrics::counter!(metric::JOBS_DROPPED).increment(1);
                Submitted::Full
            }
        }
    }

    /// The in-flight job for `key`, if any (counted as a single-flight join).
    pub fn join(&self, key: &VerdictKey) -> Option<Slot> {
        let slot = lock(&self.inflight).get(key).cloned();
        if slot.is_some() {
            metrics::counter!(metric::SINGLE_FLIGHT_JOINS).increment(1);
        }
        slot
    }

    /// Ends single-flight for `key`; called once the outcome is in the cache.
    pub fn finish(&self, key: &VerdictKey) {
        lock(&self.inflight).remove(key);
    }

    /// Jobs waiting for a thread.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Keys being scored or waiting.
    pub fn inflight(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// Stops accepting jobs and waits for the threads to finish what is queued.
    pub fn shutdown(&self) {
        lock(&self.tx).take();
        let workers: Vec<_> = lock(&self.workers).drain(..).collect();
        for w in workers {
            let _ = w.join();
        }
    }
}

fn worker(
    rx: &Mutex<Receiver<QueuedJob>>,
    detector: &dyn Detector,
    batch_size: usize,
    depth: &AtomicUsize,
) {
    while let Some(batch) = next_batch(rx, batch_size) {
        depth.fetch_sub(batch.len(), Ordering::SeqCst);
        metrics::gauge!(metric::QUEUE_DEPTH).set(depth.load(Ordering::SeqCst) as f64);
        score_batch(detector, batch);
    }
}

/// Blocks for one job, then takes whatever else is already waiting, up to `batch_size`.
fn next_batch(rx: &Mutex<Receiver<QueuedJob>>, batch_size: usize) -> Option<Vec<QueuedJob>> {
    let rx = lock(rx);
    let first = rx.recv().ok()?;
    let mut batch = vec![first];
    while batch.len() < batch_size {
        match rx.try_recv() {
            Ok(j) => batch.push(j),
            Err(_) => break,
        }
    }
    Some(batch)
}

fn score_batch(detector: &dyn Detector, batch: Vec<QueuedJob>) {
    let span = tracing::info_span!("diffguard.score", batch_size = batch.len(), detector = %detector.fingerprint());
    for j in &batch {
        span.follows_from(&j.span);
    }
    let _entered = span.enter();
    let jobs: Vec<Job> = batch.iter().map(|j| j.job.clone()).collect();
    let started = Instant::now();
    let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| detector.score(&jobs)));
    let per_image = started.elapsed().as_secs_f64() / jobs.len() as f64;
    metrics::counter!(metric::JOBS).increment(jobs.len() as u64);
    let outcomes: Vec<Outcome> = match results {
        Ok(r) if r.len() == jobs.len() => r
            .into_iter()
            .map(|r| match r {
                Ok(s) => Outcome::Scored(s),
                Err(e) => Outcome::Unverified {
                    reason: e.to_string(),
                },
            })
            .collect(),
        Ok(r) => vec![
            unverified(format!(
                "detector returned {} results for {} jobs",
                r.len(),
                jobs.len()
            ));
            jobs.len()
        ],
        Err(_) => vec![unverified("detector panicked".into()); jobs.len()],
    };
    for (j, o) in batch.into_iter().zip(outcomes) {
        metrics::histogram!(metric::ENGINE_SECONDS).record(per_image);
        j.reply.send_replace(Some(o));
    }
}

fn unverified(reason: String) -> Outcome {
    tracing::error!(%reason, "scoring failed");
    Outcome::Unverified { reason }
}
