//! What each worker reports about itself: counters, state, and the time of its last
//! progress. Workers write; status lines, `/status`, metrics and health checks read.
//!
//! Plain atomics, updated per batch or per event without locks, so reading them never
//! slows the relay down.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
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
    /// Events dead-lettered (including rejected ones).
    pub dead_lettered: Counter,
    /// Events rejected because their metadata cannot make a message.
    pub rejected: Counter,
    /// Batches finished.
    pub batches: Counter,
    /// `next_batch` calls that found nothing.
    pub empty_queue: Counter,
    /// Unexpected returns of unroutable messages.
    pub returned: Counter,
    /// Negative acknowledgements.
    pub nacked: Counter,
    /// AMQP connections opened.
    pub connections_opened: Counter,
    /// AMQP connections lost or closed.
    pub connections_closed: Counter,
    state: AtomicU8,
    current_batch: AtomicI64,
    in_flight: AtomicU64,
    started: Instant,
    /// Milliseconds since `started` of the last progress (batch answered or confirm).
    last_progress_ms: AtomicU64,
}

impl WorkerStats {
    /// Fresh stats for `queue`.
    pub fn new(queue: &str) -> Arc<WorkerStats> {
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
            state: AtomicU8::new(WorkerState::Connecting as u8),
            current_batch: AtomicI64::new(0),
            in_flight: AtomicU64::new(0),
            started: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
        })
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
}
