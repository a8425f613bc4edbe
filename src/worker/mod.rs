//! The worker: relays one PgQ queue to RabbitMQ, for as long as it is asked to.
//!
//! A worker owns one PostgreSQL session and one AMQP connection. Each turn of its loop
//! makes sure both are open (creating the queue, registering the consumer and taking the
//! exclusive lock on the way), asks PgQ for a batch, and relays it or sleeps
//! `wait_duration`. When a connection fails, only that one is opened again, after an
//! exponential backoff; the other is kept, and so is what was already confirmed of the
//! open batch (`progress`), so nothing confirmed is published twice.
//!
//! Stopping is checked only between batches and while sleeping: a batch that has
//! started is settled and finished first. The supervisor bounds that with
//! `shutdown_timeout`; if it has to abort the task, the batch's transaction rolls back
//! and PgQ hands the batch out again later.

mod batch;
mod progress;
mod settle;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::types::{LongString, ShortString};
use tokio_util::sync::CancellationToken;

use crate::amqp::Broker;
use crate::config::{DeadLetterTarget, MessageIdMode, WorkerConfig};
use crate::deadletter;
use crate::error::{Link, WorkerError};
use crate::mapping::{MessageDefaults, MessageIdNamespace};
use crate::pgq::PgqSession;
use crate::stats::{WorkerState, WorkerStats};

pub use progress::EvIdSet;

/// A worker and what it needs to run.
pub struct Worker {
    config: Arc<WorkerConfig>,
    /// Value of the `origin` header.
    origin: String,
    /// How often to log a status line.
    poll_interval: Duration,
    /// Shared with whoever reports on the worker.
    stats: Arc<WorkerStats>,
    /// Cancelled to ask the worker to stop at its next safe point.
    stop: CancellationToken,
}

/// The PostgreSQL side, once connected.
struct PgLink {
    session: PgqSession,
    /// Message defaults depend on the database's identity, so they live with the session.
    defaults: MessageDefaults,
    /// Whether this session holds the queue's advisory lock (always true when not
    /// `exclusive`).
    active: bool,
}

/// What one turn of the loop did.
enum Turn {
    /// A batch was relayed; ask again at once.
    Relayed,
    /// Nothing to do now: sleep `wait_duration`.
    Idle,
    /// Another instance is active.
    Standby,
}

impl Worker {
    /// A worker for `config`.
    pub fn new(
        config: Arc<WorkerConfig>,
        origin: String,
        poll_interval: Duration,
        stats: Arc<WorkerStats>,
        stop: CancellationToken,
    ) -> Worker {
        Worker {
            config,
            origin,
            poll_interval,
            stats,
            stop,
        }
    }

    /// Runs until stopped. Failures are logged and retried with backoff; they never end
    /// the worker.
    pub async fn run(self) {
        let queue = self.config.queue.clone();
        let mut pg: Option<PgLink> = None;
        let mut broker: Option<Broker> = None;
        let mut progress = progress::BatchProgress::default();
        let mut ignored_keys = HashSet::new();
        let mut backoff = Backoff::default();
        let mut last_status = Instant::now();
        while !self.stop.is_cancelled() {
            let turn = self
                .turn(&mut pg, &mut broker, &mut progress, &mut ignored_keys)
                .await;
            let pause = match turn {
                Ok(Turn::Relayed) => {
                    backoff.reset();
                    None
                }
                Ok(Turn::Idle) => {
                    backoff.reset();
                    self.stats.set_state(WorkerState::Idle);
                    Some(self.config.wait_duration)
                }
                Ok(Turn::Standby) => {
                    self.stats.set_state(WorkerState::Standby);
                    Some(self.config.wait_duration)
                }
                Err(error) => {
                    let delay = backoff.next();
                    match error.broken_link() {
                        Link::Postgres => pg = None,
                        Link::Broker => {
                            if broker.take().is_some() {
                                self.stats.connections_closed.add(1);
                            }
                        }
                    }
                    tracing::error!(queue = %queue, error = %error, retry_in = ?delay, "worker failed; reconnecting");
                    self.stats.set_state(WorkerState::Backoff);
                    Some(delay)
                }
            };
            if last_status.elapsed() >= self.poll_interval {
                last_status = Instant::now();
                self.log_status(pg.as_ref()).await;
            }
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.stop.cancelled() => {}
                }
            }
        }
        self.shut_down(pg, broker).await;
    }

    /// One turn: connect what is missing, then take and relay one batch.
    async fn turn(
        &self,
        pg: &mut Option<PgLink>,
        broker: &mut Option<Broker>,
        progress: &mut progress::BatchProgress,
        ignored_keys: &mut HashSet<String>,
    ) -> Result<Turn, WorkerError> {
        if pg.as_ref().is_some_and(|link| link.session.is_closed()) {
            *pg = None;
        }
        if pg.is_none() {
            self.stats.set_state(WorkerState::Connecting);
            *pg = Some(self.open_postgres().await?);
        }
        let Some(link) = pg.as_mut() else {
            return Ok(Turn::Idle);
        };
        if !link.active {
            link.active = link.session.try_exclusive_lock().await?;
            if !link.active {
                return Ok(Turn::Standby);
            }
            tracing::info!(queue = %self.config.queue, consumer = %self.config.consumer_name, "holding the queue's lock; this instance is active");
        }
        if broker.as_ref().is_some_and(|b| !b.is_connected()) {
            let reason = broker.as_ref().and_then(Broker::failure).unwrap_or_default();
            return Err(WorkerError::BrokerLost { reason });
        }
        if broker.is_none() {
            self.stats.set_state(WorkerState::Connecting);
            let connected =
                Broker::connect(&self.config.rabbitmq, &self.config.queue, self.config.confirm).await?;
            tracing::info!(queue = %self.config.queue, broker = %connected.address(), "connected to rabbitmq");
            self.stats.connections_opened.add(1);
            *broker = Some(connected);
        }
        let Some(broker) = broker.as_mut() else {
            return Ok(Turn::Idle);
        };

        let batch = link.session.next_batch(&self.config.batch_window).await?;
        self.stats.progressed();
        let Some(batch) = batch else {
            self.stats.empty_queue.add(1);
            return Ok(Turn::Idle);
        };
        self.stats.set_state(WorkerState::Processing);
        self.stats.set_current_batch(Some(batch.id));
        let relay = batch::BatchRelay {
            config: &self.config,
            defaults: &link.defaults,
            stats: &self.stats,
            broker,
            progress,
            ignored_keys,
        };
        let summary = relay.relay(&mut link.session, &batch).await;
        self.stats.set_current_batch(None);
        let summary = summary?;
        tracing::debug!(queue = %self.config.queue, batch = batch.id, ?summary, "batch relayed");
        Ok(Turn::Relayed)
    }

    /// Connects to PostgreSQL and prepares the queue: create it, register the consumer,
    /// create the dead-letter table when it is the destination.
    async fn open_postgres(&self) -> Result<PgLink, WorkerError> {
        let config = &self.config;
        let session = PgqSession::connect(&config.postgres, &config.queue, &config.consumer_name).await?;
        if session.create_queue().await? {
            tracing::info!(queue = %config.queue, "created pgq queue");
        }
        if session.register_consumer().await? {
            tracing::info!(queue = %config.queue, consumer = %config.consumer_name, "registered pgq consumer");
        }
        if config.dead_letter == DeadLetterTarget::Table {
            deadletter::ensure_table(session.client()).await?;
        }
        let message_ids = match config.message_id {
            MessageIdMode::Deterministic => Some(MessageIdNamespace::new(
                &session.system_identifier().await?,
                &config.queue,
            )),
            MessageIdMode::None => None,
        };
        tracing::info!(queue = %config.queue, database = %config.postgres.redacted(), "connected to postgresql");
        let defaults = MessageDefaults {
            app_id: ShortString::try_new(config.app_id.as_str()).ok(),
            delivery_mode: config.delivery_mode,
            origin: LongString::from(self.origin.as_str()),
            message_ids,
        };
        Ok(PgLink {
            session,
            defaults,
            active: !config.exclusive,
        })
    }

    async fn log_status(&self, pg: Option<&PgLink>) {
        let info = match pg {
            Some(link) => link.session.consumer_info().await.ok().flatten(),
            None => None,
        };
        let stats = &self.stats;
        tracing::info!(
            queue = %self.config.queue,
            state = stats.state().name(),
            processed = stats.processed.get(),
            failed = stats.failed.get(),
            retried = stats.retried.get(),
            dead_lettered = stats.dead_lettered.get(),
            batches = stats.batches.get(),
            pending_events = info.as_ref().map(|i| i.pending_events),
            lag_seconds = info.as_ref().map(|i| i.lag.as_secs_f64()),
            "status"
        );
    }

    async fn shut_down(&self, pg: Option<PgLink>, broker: Option<Broker>) {
        self.stats.set_state(WorkerState::Stopped);
        if self.config.unregister
            && let Some(link) = &pg
            && link.active
        {
            match link.session.unregister_consumer().await {
                Ok(()) => {
                    tracing::warn!(queue = %self.config.queue, consumer = %self.config.consumer_name, "unregistered pgq consumer (unregister: true)")
                }
                Err(error) => {
                    tracing::error!(queue = %self.config.queue, %error, "could not unregister the pgq consumer")
                }
            }
        }
        if let Some(broker) = broker {
            broker.close().await;
            self.stats.connections_closed.add(1);
        }
        tracing::info!(queue = %self.config.queue, "worker stopped");
    }
}

/// Exponential backoff: 100 ms doubling to 30 s, each delay drawn from its upper half so
/// many workers failing together do not reconnect in lockstep.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);

    fn next(&mut self) -> Duration {
        let ceiling = Self::FIRST
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        let jitter: f64 = rand::random_range(0.5..=1.0);
        ceiling.mul_f64(jitter)
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays[11] >= Duration::from_secs(15) && delays[11] <= Duration::from_secs(30));
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(100));
    }
}
