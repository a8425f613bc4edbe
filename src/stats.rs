//! What each worker reports about itself: counters, gauges, histograms, connection
//! state, and the time of its last progress. Workers write; status lines, `/status`,
//! `/metrics`, statsd and `/readyz` read (see [`crate::metrics`] for the names).
//!
//! Plain atomics, updated per batch or per event without locks on the hot path, so
//! reading them never slows the relay down. The [`Registry`] is the set of workers
//! running now; the supervisor keeps it current across reloads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What a worker is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WorkerState {
    /// Connecting to PostgreSQL or RabbitMQ.
    Connecting = 0,
    /// Another instance holds the queue's lock; waiting to take over.
    Standby = 1,
    /// Waiting for the next batch.
    Idle = 2,
    /// Relaying a batch.
    Processing = 3,
    /// Waiting before reconnecting after a failure.
    Backoff = 4,
    /// Stopping or stopped.
    Stopped = 5,
}

impl WorkerState {
    fn from_u8(value: u8) -> WorkerState {
        match value {
            0 => WorkerState::Connecting,
            1 => WorkerState::Standby,
            2 => WorkerState::Idle,
            3 => WorkerState::Processing,
            4 => WorkerState::Backoff,
            _ => WorkerState::Stopped,
        }
    }

    /// Lower-case name for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Connecting => "connecting",
            WorkerState::Standby => "standby",
            WorkerState::Idle => "idle",
            WorkerState::Processing => "processing",
            WorkerState::Backoff => "backoff",
            WorkerState::Stopped => "stopped",
        }
    }
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current total.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the buckets of duration histograms, in seconds.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of the buckets of the batch-size histogram, in events.
pub const SIZE_BUCKETS: &[f64] = &[0.0, 1.0, 10.0, 100.0, 1000.0, 10_000.0, 100_000.0, 1_000_000.0];

/// A histogram with fixed buckets (Prometheus-style, cumulative when read).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One slot per bound, plus one for values above the last.
    counts: Vec<AtomicU64>,
    /// Sum of the observed values, in millionths (exact enough for seconds and sizes).
    sum_millionths: AtomicU64,
    count: AtomicU64,
}

/// A read of a [`Histogram`].
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations ≤ bound)`, cumulative, ending with `+Inf`.
    pub buckets: Vec<(f64, u64)>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram with `bounds`.
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_millionths: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let index = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let millionths = (value.max(0.0) * 1e6) as u64;
        self.sum_millionths.fetch_add(millionths, Ordering::Relaxed);
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// Reads the histogram.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (index, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = self.bounds.get(index).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, cumulative));
        }
        HistogramSnapshot {
            buckets,
            sum: self.sum_millionths.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// One worker's published facts.
#[derive(Debug)]
pub struct WorkerStats {
    /// The queue.
    pub queue: String,
    /// Events confirmed by RabbitMQ.
    pub processed: Counter,
    /// Publish attempts that failed (nack, returned, channel error).
    pub failed: Counter,
    /// Events handed to PgQ's retry queue.
    pub retried: Counter,
    /// Events dead-lettered or discarded (including rejected ones).
    pub dead_lettered: Counter,
    /// Events rejected because their metadata cannot make a message.
    pub rejected: Counter,
    /// Batches finished.
    pub batches: Counter,
    /// `next_batch` calls that found nothing.
    pub empty_queue: Counter,
    /// Unroutable messages returned by the broker.
    pub returned: Counter,
    /// Negative acknowledgements.
    pub nacked: Counter,
    /// AMQP connections opened.
    pub connections_opened: Counter,
    /// AMQP connections lost or closed.
    pub connections_closed: Counter,
    /// Times the broker blocked the connection.
    pub connections_blocked: Counter,
    /// Events per finished batch.
    pub batch_size: Histogram,
    /// Time from `next_batch` to the batch's commit.
    pub batch_duration: Histogram,
    /// Time from publishing a message to its confirm.
    pub confirm_latency: Histogram,
    /// Milliseconds the worker may go without progress before `/readyz` calls it
    /// stalled (follows `wait_duration` across reloads).
    progress_deadline_ms: AtomicU64,
    state: AtomicU8,
    current_batch: AtomicI64,
    in_flight: AtomicU64,
    pending_events: AtomicI64,
    lag_micros: AtomicU64,
    postgres_connected: AtomicBool,
    broker_connected: AtomicBool,
    blocked: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    started: Instant,
    /// Milliseconds since `started` of the last progress (batch answered or confirm).
    last_progress_ms: AtomicU64,
}

/// `max(3 × wait_duration, 30 s)` in milliseconds.
fn progress_deadline_ms(wait_duration: Duration) -> u64 {
    let deadline = wait_duration.saturating_mul(3).max(Duration::from_secs(30));
    u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX)
}

impl WorkerStats {
    /// Fresh stats for `queue`; `wait_duration` sets how long it may go without
    /// progress: `max(3 × wait_duration, 30 s)`.
    pub fn new(queue: &str, wait_duration: Duration) -> Arc<WorkerStats> {
        Arc::new(WorkerStats {
            queue: queue.to_owned(),
            processed: Counter::default(),
            failed: Counter::default(),
            retried: Counter::default(),
            dead_lettered: Counter::default(),
            rejected: Counter::default(),
            batches: Counter::default(),
            empty_queue: Counter::default(),
            returned: Counter::default(),
            nacked: Counter::default(),
            connections_opened: Counter::default(),
            connections_closed: Counter::default(),
            connections_blocked: Counter::default(),
            batch_size: Histogram::new(SIZE_BUCKETS),
            batch_duration: Histogram::new(SECONDS_BUCKETS),
            confirm_latency: Histogram::new(SECONDS_BUCKETS),
            progress_deadline_ms: AtomicU64::new(progress_deadline_ms(wait_duration)),
            state: AtomicU8::new(WorkerState::Connecting as u8),
            current_batch: AtomicI64::new(0),
            in_flight: AtomicU64::new(0),
            pending_events: AtomicI64::new(-1),
            lag_micros: AtomicU64::new(u64::MAX),
            postgres_connected: AtomicBool::new(false),
            broker_connected: AtomicBool::new(false),
            blocked: Mutex::new(None),
            last_error: Mutex::new(None),
            started: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
        })
    }

    /// How long the worker may go without progress before `/readyz` calls it stalled:
    /// `max(3 × wait_duration, 30 s)`.
    pub fn progress_deadline(&self) -> Duration {
        Duration::from_millis(self.progress_deadline_ms.load(Ordering::Relaxed))
    }

    /// A reloaded `wait_duration` for the worker that carries these stats on.
    pub fn set_wait_duration(&self, wait_duration: Duration) {
        self.progress_deadline_ms
            .store(progress_deadline_ms(wait_duration), Ordering::Relaxed);
    }

    /// Forgets everything about the worker's connections: disconnected, not blocked,
    /// nothing in flight, no batch.
    pub fn reset_connection_state(&self) {
        self.set_postgres_connected(false);
        self.set_broker_connected(false);
        self.set_blocked(None);
        self.set_in_flight(0);
        self.set_current_batch(None);
    }

    /// Sets the state.
    pub fn set_state(&self, state: WorkerState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// The state.
    pub fn state(&self) -> WorkerState {
        WorkerState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Sets the batch being relayed (`None` between batches).
    pub fn set_current_batch(&self, batch: Option<i64>) {
        self.current_batch.store(batch.unwrap_or(0), Ordering::Relaxed);
    }

    /// The batch being relayed.
    pub fn current_batch(&self) -> Option<i64> {
        match self.current_batch.load(Ordering::Relaxed) {
            0 => None,
            id => Some(id),
        }
    }

    /// Sets the number of unconfirmed messages.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Ordering::Relaxed);
    }

    /// Unconfirmed messages on the channel.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records PgQ's figures for the consumer.
    pub fn set_backlog(&self, pending_events: i64, lag: Duration) {
        self.pending_events.store(pending_events, Ordering::Relaxed);
        let micros = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX - 1);
        self.lag_micros.store(micros, Ordering::Relaxed);
    }

    /// Events PgQ has not handed to the consumer yet, once known.
    pub fn pending_events(&self) -> Option<i64> {
        Some(self.pending_events.load(Ordering::Relaxed)).filter(|n| *n >= 0)
    }

    /// Age of the last tick the consumer finished, once known.
    pub fn lag(&self) -> Option<Duration> {
        match self.lag_micros.load(Ordering::Relaxed) {
            u64::MAX => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }

    /// Notes whether the PostgreSQL session is up.
    pub fn set_postgres_connected(&self, connected: bool) {
        self.postgres_connected.store(connected, Ordering::Relaxed);
    }

    /// Notes whether the AMQP connection is up.
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
    }

    /// True while the PostgreSQL session is up.
    pub fn postgres_connected(&self) -> bool {
        self.postgres_connected.load(Ordering::Relaxed)
    }

    /// True while the AMQP connection is up.
    pub fn broker_connected(&self) -> bool {
        self.broker_connected.load(Ordering::Relaxed)
    }

    /// Notes that the broker blocked (`Some(reason)`) or unblocked (`None`) the
    /// connection.
    pub fn set_blocked(&self, reason: Option<String>) {
        let mut blocked = self
            .blocked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if reason.is_some() && blocked.is_none() {
            self.connections_blocked.add(1);
        }
        *blocked = reason;
    }

    /// Why the broker blocks the connection, while it does.
    pub fn blocked(&self) -> Option<String> {
        self.blocked
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Notes the last failure (`None` once the worker is healthy again).
    pub fn set_last_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = error;
    }

    /// The last failure, while the worker has not recovered from it.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Notes progress: `next_batch` answered or a confirm arrived.
    pub fn progressed(&self) {
        let elapsed = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_progress_ms.store(elapsed, Ordering::Relaxed);
    }

    /// Time since the last progress.
    pub fn since_progress(&self) -> Duration {
        let last = Duration::from_millis(self.last_progress_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Why the worker is not ready, if it is not: an active worker must be connected to
    /// both servers, not blocked, and have progressed within its deadline. A standby (or
    /// stopping) worker is ready: it is doing what it should.
    pub fn unready_reason(&self) -> Option<String> {
        let queue = &self.queue;
        if matches!(self.state(), WorkerState::Standby | WorkerState::Stopped) {
            return None;
        }
        let cause = || self.last_error().map(|e| format!(": {e}")).unwrap_or_default();
        if !self.postgres_connected() {
            return Some(format!("{queue}: not connected to PostgreSQL{}", cause()));
        }
        if !self.broker_connected() {
            return Some(format!("{queue}: not connected to RabbitMQ{}", cause()));
        }
        if let Some(reason) = self.blocked() {
            return Some(format!("{queue}: RabbitMQ blocked the connection: {reason}"));
        }
        let idle = self.since_progress();
        let deadline = self.progress_deadline();
        if idle > deadline {
            return Some(format!(
                "{queue}: no progress for {}s (next_batch unanswered and no confirm; limit {}s)",
                idle.as_secs(),
                deadline.as_secs()
            ));
        }
        None
    }
}

/// The workers running now, by queue. Shared by the supervisor (which keeps it
/// current), the HTTP endpoints and the statsd reporter.
#[derive(Debug, Default)]
pub struct Registry {
    workers: RwLock<BTreeMap<String, Arc<WorkerStats>>>,
}

impl Registry {
    /// Adds (or replaces) a worker's stats.
    pub fn insert(&self, stats: Arc<WorkerStats>) {
        let mut workers = self
            .workers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        workers.insert(stats.queue.clone(), stats);
    }

    /// Removes a worker's stats, unless its queue has other stats by now (it was
    /// configured again).
    pub fn remove_if_same(&self, stats: &Arc<WorkerStats>) {
        let mut workers = self
            .workers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if workers
            .get(&stats.queue)
            .is_some_and(|current| Arc::ptr_eq(current, stats))
        {
            workers.remove(&stats.queue);
        }
    }

    /// Every running worker's stats, by queue.
    pub fn workers(&self) -> Vec<Arc<WorkerStats>> {
        let workers = self
            .workers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        workers.values().cloned().collect()
    }

    /// Why the relay is not ready, one line per worker that is not; empty when ready.
    pub fn unready_reasons(&self) -> Vec<String> {
        self.workers()
            .iter()
            .filter_map(|stats| stats.unready_reason())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_with_an_infinite_bucket() {
        let histogram = Histogram::new(&[1.0, 10.0]);
        for value in [0.5, 1.0, 5.0, 100.0] {
            histogram.observe(value);
        }
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.buckets, [(1.0, 2), (10.0, 3), (f64::INFINITY, 4)]);
        assert_eq!(snapshot.count, 4);
        assert!((snapshot.sum - 106.5).abs() < 1e-9);
    }

    #[test]
    fn readiness_names_what_is_wrong() {
        let stats = WorkerStats::new("invoices", Duration::from_secs(1));
        stats.set_state(WorkerState::Idle);
        assert_eq!(
            stats.unready_reason().unwrap(),
            "invoices: not connected to PostgreSQL"
        );
        stats.set_postgres_connected(true);
        stats.set_last_error(Some("cannot connect to RabbitMQ at h:5672: refused".into()));
        assert_eq!(
            stats.unready_reason().unwrap(),
            "invoices: not connected to RabbitMQ: cannot connect to RabbitMQ at h:5672: refused"
        );
        stats.set_broker_connected(true);
        stats.set_blocked(Some("low on memory".into()));
        assert!(
            stats
                .unready_reason()
                .unwrap()
                .contains("blocked the connection: low on memory")
        );
        assert_eq!(stats.connections_blocked.get(), 1);
        stats.set_blocked(None);
        stats.progressed();
        assert_eq!(stats.unready_reason(), None);
        stats.set_state(WorkerState::Standby);
        stats.set_postgres_connected(false);
        assert_eq!(stats.unready_reason(), None, "a standby is ready");
    }

    #[test]
    fn progress_deadline_is_at_least_thirty_seconds() {
        assert_eq!(
            WorkerStats::new("q", Duration::from_secs(1)).progress_deadline(),
            Duration::from_secs(30)
        );
        assert_eq!(
            WorkerStats::new("q", Duration::from_secs(20)).progress_deadline(),
            Duration::from_secs(60)
        );
    }
}
