//! The worker: relays one PgQ queue to RabbitMQ, for as long as it is asked to.
//!
//! A worker owns one PostgreSQL session and one AMQP connection. Each turn of its loop
//! makes sure both are open (creating the queue, registering the consumer and taking the
//! exclusive lock on the way), asks PgQ for a batch, and relays it or sleeps
//! `wait_duration`. When a connection fails, only that one is opened again, after an
//! exponential backoff; the other is kept, and so is what was already confirmed of the
//! open batch (`progress`), so nothing confirmed is published twice.
//!
//! Stopping is checked between batches, while sleeping, and after connecting (so a stop
//! asked for while connecting takes no new batch): a batch that has started is settled
//! and finished first. The supervisor bounds that with
//! `shutdown_timeout`; if it has to abort the task, the batch's transaction rolls back
//! and PgQ hands the batch out again later.

mod batch;
mod progress;
mod settle;
mod stop;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::types::{LongString, ShortString};
use tokio::sync::watch;

use crate::amqp::Broker;
use crate::backoff::Backoff;
use crate::config::{DeadLetterTarget, MessageIdMode, WorkerConfig};
use crate::deadletter;
use crate::error::{Link, WorkerError};
use crate::mapping::{MessageDefaults, MessageIdNamespace};
use crate::pgq::PgqSession;
use crate::stats::{WorkerState, WorkerStats};

pub use progress::EvIdSet;
pub use stop::StopSignal;

/// A worker and what it needs to run.
pub struct Worker {
    config: Arc<WorkerConfig>,
    /// Value of the `origin` header.
    origin: String,
    /// How often to log a status line (follows reloads).
    poll_interval: watch::Receiver<Duration>,
    /// Shared with whoever reports on the worker.
    stats: Arc<WorkerStats>,
    /// Raised to ask the worker to stop at its next safe point.
    stop: StopSignal,
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

/// What a worker keeps from one turn of its loop to the next.
#[derive(Default)]
struct Links {
    /// The PostgreSQL side; `None` until connected and after it failed.
    pg: Option<PgLink>,
    /// The AMQP side; `None` until connected and after it failed.
    broker: Option<Broker>,
    /// What is already confirmed of the open batch (kept across reconnects).
    progress: progress::BatchProgress,
    /// `ev_extra3` keys already logged as ignored.
    ignored_keys: HashSet<String>,
    /// True once the queue and consumer were set up, so that finding them gone later
    /// is reported.
    subscribed: bool,
}

/// What one turn of the loop did.
enum Turn {
    /// A batch was relayed; ask again at once.
    Relayed,
    /// Nothing to do now: sleep `wait_duration`.
    Idle,
    /// Another instance is active.
    Standby,
    /// A stop was asked for while connecting: no new batch is taken.
    Stopping,
}

impl Worker {
    /// A worker for `config`.
    pub fn new(
        config: Arc<WorkerConfig>,
        origin: String,
        poll_interval: watch::Receiver<Duration>,
        stats: Arc<WorkerStats>,
        stop: StopSignal,
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
        // The stats may come from the worker this one replaces (or from before a panic):
        // nothing of its connections holds for this one.
        self.stats.reset_connection_state();
        let mut links = Links::default();
        let mut backoff = Backoff::default();
        let mut last_status = Instant::now();
        while !self.stop.is_requested() {
            let pause = match self.turn(&mut links).await {
                Ok(Turn::Relayed) => {
                    backoff.reset();
                    self.stats.set_last_error(None);
                    None
                }
                Ok(Turn::Idle) => {
                    backoff.reset();
                    self.stats.set_last_error(None);
                    self.stats.set_state(WorkerState::Idle);
                    Some(self.config.wait_duration)
                }
                Ok(Turn::Standby) => {
                    self.stats.set_state(WorkerState::Standby);
                    Some(self.config.wait_duration)
                }
                Ok(Turn::Stopping) => None,
                Err(error) => {
                    let delay = backoff.next_delay();
                    self.drop_broken_link(&mut links, error.broken_link()).await;
                    tracing::error!(queue = %self.config.queue, error = %error, retry_in = ?delay, "worker failed; reconnecting");
                    self.stats.set_last_error(Some(error.to_string()));
                    self.stats.set_state(WorkerState::Backoff);
                    Some(delay)
                }
            };
            if last_status.elapsed() >= *self.poll_interval.borrow() {
                last_status = Instant::now();
                self.log_status(links.pg.as_ref()).await;
            }
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = self.stop.requested() => {}
                }
            }
        }
        self.shut_down(links).await;
    }

    async fn drop_broken_link(&self, links: &mut Links, link: Link) {
        match link {
            Link::Postgres => {
                links.pg = None;
                self.stats.set_postgres_connected(false);
            }
            Link::Broker => {
                self.stats.set_broker_connected(false);
                self.stats.set_blocked(None);
                if let Some(lost) = links.broker.take() {
                    lost.close().await;
                    self.stats.connections_closed.add(1);
                }
            }
        }
    }

    /// One turn: connect what is missing, then take and relay one batch.
    async fn turn(&self, links: &mut Links) -> Result<Turn, WorkerError> {
        let Some(link) = self.postgres(&mut links.pg, &mut links.subscribed).await? else {
            return Ok(Turn::Standby);
        };
        let broker = self.broker(&mut links.broker).await?;
        // Connecting can take a while; a stop asked for meanwhile takes no new batch.
        if self.stop.is_requested() {
            return Ok(Turn::Stopping);
        }

        let batch = match link.session.next_batch(&self.config.batch_window).await {
            Err(error) if error.is_not_subscribed() => {
                self.subscribe(&link.session, true).await?;
                return Ok(Turn::Relayed);
            }
            batch => batch?,
        };
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
            progress: &mut links.progress,
            ignored_keys: &mut links.ignored_keys,
        };
        let summary = relay.relay(&mut link.session, &batch).await;
        self.stats.set_current_batch(None);
        let summary = summary?;
        tracing::debug!(
            queue = %self.config.queue,
            batch = batch.id,
            ticks = %format!("{}..{}", batch.prev_tick_id, batch.cur_tick_id),
            tick_time = %batch.cur_tick_time,
            ?summary,
            "batch relayed"
        );
        Ok(Turn::Relayed)
    }

    /// The PostgreSQL link, opened when missing and holding the queue's lock; `None`
    /// while another instance is active.
    async fn postgres<'l>(
        &self,
        pg: &'l mut Option<PgLink>,
        subscribed: &mut bool,
    ) -> Result<Option<&'l mut PgLink>, WorkerError> {
        if pg.as_ref().is_some_and(|link| link.session.is_closed()) {
            *pg = None;
            self.stats.set_postgres_connected(false);
        }
        let link = match pg {
            Some(link) => link,
            None => {
                self.stats.set_state(WorkerState::Connecting);
                let link = self.open_postgres(*subscribed).await?;
                *subscribed = true;
                self.stats.set_postgres_connected(true);
                pg.insert(link)
            }
        };
        if !link.active {
            link.active = link.session.try_exclusive_lock().await?;
            if !link.active {
                return Ok(None);
            }
            tracing::info!(queue = %self.config.queue, consumer = %self.config.consumer_name, "holding the queue's lock; this instance is active");
        }
        Ok(Some(link))
    }

    /// The AMQP link, opened when missing; an error when it has failed.
    async fn broker<'l>(&self, broker: &'l mut Option<Broker>) -> Result<&'l mut Broker, WorkerError> {
        if let Some(existing) = broker.as_ref()
            && !existing.is_connected()
        {
            let reason = existing
                .failure()
                .unwrap_or_else(|| "connection closed".to_owned());
            return Err(WorkerError::BrokerLost { reason });
        }
        match broker {
            Some(connected) => Ok(connected),
            None => {
                self.stats.set_state(WorkerState::Connecting);
                let connected = Broker::connect(
                    &self.config.rabbitmq,
                    &self.config.queue,
                    self.config.confirm,
                    Some(Arc::clone(&self.stats)),
                )
                .await?;
                tracing::info!(queue = %self.config.queue, broker = %connected.address(), "connected to rabbitmq");
                self.stats.connections_opened.add(1);
                self.stats.set_broker_connected(true);
                Ok(broker.insert(connected))
            }
        }
    }

    /// `pgq.create_queue` and `pgq.register_consumer`. When this worker had been
    /// subscribed before, having to do either means someone undid it behind the relay's
    /// back: that is worth a warning, since PgQ kept no events for the consumer meanwhile.
    async fn subscribe(&self, session: &PgqSession, subscribed_before: bool) -> Result<(), WorkerError> {
        let created = session.create_queue().await?;
        let registered = session.register_consumer().await?;
        let queue = &self.config.queue;
        let consumer = &self.config.consumer_name;
        if subscribed_before && (created || registered) {
            tracing::warn!(
                queue = %queue,
                consumer = %consumer,
                created_queue = created,
                "the pgq queue was dropped or the consumer unregistered behind the relay's back; \
                 created and registered again (events inserted meanwhile are lost to this consumer)"
            );
        } else {
            if created {
                tracing::info!(queue = %queue, "created pgq queue");
            }
            if registered {
                tracing::info!(queue = %queue, consumer = %consumer, "registered pgq consumer");
            }
        }
        Ok(())
    }

    /// Connects to PostgreSQL and prepares the queue: create it, register the consumer,
    /// create the dead-letter table when it is the destination.
    async fn open_postgres(&self, subscribed_before: bool) -> Result<PgLink, WorkerError> {
        let config = &self.config;
        let session = PgqSession::connect(&config.postgres, &config.queue, &config.consumer_name).await?;
        self.subscribe(&session, subscribed_before).await?;
        if config.dead_letter == DeadLetterTarget::Table {
            deadletter::ensure_table(session.client()).await?;
        }
        if config.audit {
            crate::audit::check_installed(session.client(), &config.queue).await?;
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
            Some(link) => match link.session.consumer_info().await {
                Ok(info) => info,
                Err(error) => {
                    tracing::warn!(queue = %self.config.queue, %error, "cannot read the consumer's lag from pgq");
                    None
                }
            },
            None => None,
        };
        if let Some(info) = &info {
            self.stats.set_backlog(info.pending_events, info.lag);
        }
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

    async fn shut_down(&self, links: Links) {
        self.stats.set_state(WorkerState::Stopped);
        self.stats.reset_connection_state();
        if self.config.unregister
            && let Some(link) = &links.pg
            && link.active
        {
            self.unregister(&link.session).await;
        }
        if let Some(broker) = links.broker {
            broker.close().await;
            self.stats.connections_closed.add(1);
        }
        tracing::info!(queue = %self.config.queue, "worker stopped");
    }

    /// `unregister: true` at a stop for good; a restart with new settings keeps the
    /// consumer, so no event inserted meanwhile is lost to it.
    async fn unregister(&self, session: &PgqSession) {
        let (queue, consumer) = (&self.config.queue, &self.config.consumer_name);
        if !self.stop.is_final() {
            tracing::info!(queue = %queue, consumer = %consumer, "restarting with new settings; the pgq consumer stays registered");
            return;
        }
        match session.unregister_consumer().await {
            Ok(()) => {
                tracing::warn!(queue = %queue, consumer = %consumer, "unregistered pgq consumer (unregister: true)")
            }
            Err(error) => tracing::error!(queue = %queue, %error, "could not unregister the pgq consumer"),
        }
    }
}
