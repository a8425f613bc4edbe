//! The PgQ client: one PostgreSQL session of one worker, with methods named after the
//! PgQ functions they call.
//!
//! A batch is read inside one transaction ([`BatchTransaction`]): the batch's own SQL
//! (`pgq.batch_event_sql`) runs as a server-side portal and is fetched `fetch_size` rows
//! at a time, so memory stays flat whatever the batch size. The same transaction then
//! carries the batch's retries, dead-letter rows and `pgq.finish_batch`, so either all of
//! them happen or none do.
//!
//! `pgq.next_batch` runs outside that transaction on purpose: once PgQ has handed out a
//! batch, it keeps handing out the same one until it is finished, which is what lets a
//! worker that lost its connection resume exactly where it was.

use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Portal, Row, Transaction};

use crate::config::BatchWindow;
use crate::event::Event;
use crate::pgconn::{ConnectError, PgTarget};

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgqError {
    /// No connection could be opened.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The database lacks the extension.
    #[error("pgq extension is not installed in database {database}: CREATE EXTENSION pgq")]
    ExtensionMissing {
        /// Database name.
        database: String,
    },
    /// A part of the helper schema the configuration needs is not installed.
    #[error("{what}; install the helper schema: mikkoo sql | psql")]
    SchemaMissing {
        /// What is missing, and for whom.
        what: String,
    },
    /// The session ended while a batch was being relayed.
    #[error("the PostgreSQL session ended during the batch")]
    SessionLost,
    /// A statement failed.
    #[error("{what} failed: {}", crate::pgconn::with_causes(source))]
    Query {
        /// The PgQ function or statement that failed.
        what: &'static str,
        /// What PostgreSQL said.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl PgqError {
    /// True when PgQ says this consumer is not subscribed: the queue was dropped or the
    /// consumer unregistered behind the relay's back.
    pub fn is_not_subscribed(&self) -> bool {
        match self {
            PgqError::Query { source, .. } => source
                .as_db_error()
                .is_some_and(|db| db.message().starts_with("Not subscriber to queue")),
            _ => false,
        }
    }
}

/// Attaches the failing statement's name to a tokio-postgres error.
pub(crate) trait QueryContext<T> {
    fn context(self, what: &'static str) -> Result<T, PgqError>;
}

impl<T> QueryContext<T> for Result<T, tokio_postgres::Error> {
    fn context(self, what: &'static str) -> Result<T, PgqError> {
        self.map_err(|source| PgqError::Query { what, source })
    }
}

/// A batch handed out by `pgq.next_batch_custom`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Batch id, stable until the batch is finished.
    pub id: i64,
    /// Tick that ends the batch.
    pub cur_tick_id: i64,
    /// Tick that starts the batch.
    pub prev_tick_id: i64,
    /// Time of the ending tick.
    pub cur_tick_time: DateTime<Utc>,
}

/// Figures from `pgq.get_consumer_info`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConsumerInfo {
    /// Age of the last tick the consumer finished.
    pub lag: Duration,
    /// Time since the consumer last finished a batch.
    pub last_seen: Duration,
    /// Events not yet processed (PgQ's estimate).
    pub pending_events: i64,
    /// Open batch, if any.
    pub current_batch: Option<i64>,
}

/// One worker's PostgreSQL session.
pub struct PgqSession {
    client: Client,
    /// Drives the connection; ends when the connection does.
    connection: tokio::task::JoinHandle<()>,
    queue: String,
    consumer: String,
    database: String,
}

impl Drop for PgqSession {
    fn drop(&mut self) {
        // Dropping the client closes the socket; the task then ends by itself. Abort it
        // anyway so a half-open connection cannot keep a task alive.
        self.connection.abort();
    }
}

/// Columns of an event row, in `pgq.batch_event_sql`'s order.
const EVENT_COLUMNS: usize = 10;

impl PgqSession {
    /// Connects and checks that `pgq` is installed.
    pub async fn connect(target: &PgTarget, queue: &str, consumer: &str) -> Result<PgqSession, PgqError> {
        let (client, connection) = target.connect(&format!("mikkoo {queue}")).await?;
        let session = PgqSession {
            client,
            connection,
            queue: queue.to_owned(),
            consumer: consumer.to_owned(),
            database: target.dbname().to_owned(),
        };
        session.check_extension().await?;
        Ok(session)
    }

    /// The underlying client, for helpers that run their own statements.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The underlying client, for helpers that open their own transactions.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// True once the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn check_extension(&self) -> Result<(), PgqError> {
        let row = self
            .client
            .query_one("SELECT to_regproc('pgq.next_batch_custom') IS NOT NULL", &[])
            .await
            .context("checking for the pgq extension")?;
        if row.get::<_, bool>(0) {
            Ok(())
        } else {
            Err(PgqError::ExtensionMissing {
                database: self.database.clone(),
            })
        }
    }

    /// The cluster's system identifier (fixed at initdb), the root of deterministic
    /// message ids. `pg_control_system()` is executable by every role by default; where
    /// a DBA revoked it, the database's name and OID stand in (stable for the database's
    /// life) and a warning says so.
    pub async fn system_identifier(&self) -> Result<String, PgqError> {
        match self
            .client
            .query_one("SELECT system_identifier::text FROM pg_control_system()", &[])
            .await
        {
            Ok(row) => Ok(row.get(0)),
            Err(error) if error.code().is_some() => {
                tracing::warn!(
                    queue = %self.queue,
                    %error,
                    "cannot read the system identifier; message ids derive from the database name and oid"
                );
                let row = self
                    .client
                    .query_one(
                        "SELECT current_database() || ':' || oid::text FROM pg_database WHERE datname = current_database()",
                        &[],
                    )
                    .await
                    .context("reading the database identity")?;
                Ok(row.get(0))
            }
            Err(source) => Err(PgqError::Query {
                what: "reading the system identifier",
                source,
            }),
        }
    }

    /// `pgq.create_queue`: true when the queue was created now.
    pub async fn create_queue(&self) -> Result<bool, PgqError> {
        let row = self
            .client
            .query_one("SELECT pgq.create_queue($1)", &[&self.queue])
            .await
            .context("pgq.create_queue")?;
        Ok(row.get::<_, i32>(0) == 1)
    }

    /// `pgq.register_consumer`: true when the consumer was registered now.
    pub async fn register_consumer(&self) -> Result<bool, PgqError> {
        let row = self
            .client
            .query_one(
                "SELECT pgq.register_consumer($1, $2)",
                &[&self.queue, &self.consumer],
            )
            .await
            .context("pgq.register_consumer")?;
        Ok(row.get::<_, i32>(0) == 1)
    }

    /// `pgq.unregister_consumer`.
    pub async fn unregister_consumer(&self) -> Result<(), PgqError> {
        self.client
            .query_one(
                "SELECT pgq.unregister_consumer($1, $2)",
                &[&self.queue, &self.consumer],
            )
            .await
            .context("pgq.unregister_consumer")?;
        Ok(())
    }

    /// Tries to take the session-level advisory lock that makes this worker the only
    /// active consumer of its queue+consumer. Held until the session ends.
    pub async fn try_exclusive_lock(&self) -> Result<bool, PgqError> {
        let row = self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtext('mikkoo:' || $1::text), hashtext($2::text))",
                &[&self.queue, &self.consumer],
            )
            .await
            .context("pg_try_advisory_lock")?;
        Ok(row.get(0))
    }

    /// `pgq.next_batch_custom` (which is `pgq.next_batch` when the window is empty).
    pub async fn next_batch(&self, window: &BatchWindow) -> Result<Option<Batch>, PgqError> {
        let seconds = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let min_lag = seconds(window.min_lag);
        let min_interval = seconds(window.min_interval);
        let row = self
            .client
            .query_one(
                "SELECT batch_id, cur_tick_id, prev_tick_id, cur_tick_time \
                 FROM pgq.next_batch_custom($1, $2, $3::float8 * interval '1 second', $4::int4, \
                                            $5::float8 * interval '1 second')",
                &[
                    &self.queue,
                    &self.consumer,
                    &min_lag,
                    &window.min_count,
                    &min_interval,
                ],
            )
            .await
            .context("pgq.next_batch")?;
        let Some(id) = row.get::<_, Option<i64>>(0) else {
            return Ok(None);
        };
        Ok(Some(Batch {
            id,
            cur_tick_id: row.get(1),
            prev_tick_id: row.get(2),
            cur_tick_time: row.get(3),
        }))
    }

    /// `pgq.get_consumer_info` for this queue and consumer; `None` when the consumer is
    /// not registered.
    pub async fn consumer_info(&self) -> Result<Option<ConsumerInfo>, PgqError> {
        let row = self
            .client
            .query_opt(
                "SELECT extract(epoch FROM lag)::float8, extract(epoch FROM last_seen)::float8, \
                        pending_events, current_batch \
                 FROM pgq.get_consumer_info($1, $2)",
                &[&self.queue, &self.consumer],
            )
            .await
            .context("pgq.get_consumer_info")?;
        Ok(row.map(|row| ConsumerInfo {
            lag: seconds(row.get(0)),
            last_seen: seconds(row.get(1)),
            pending_events: row.get::<_, Option<i64>>(2).unwrap_or(0),
            current_batch: row.get(3),
        }))
    }

    /// Opens the batch's transaction and its event cursor.
    pub async fn open_batch(
        &mut self,
        batch: &Batch,
        fetch_size: usize,
    ) -> Result<BatchTransaction<'_>, PgqError> {
        let queue = self.queue.clone();
        let consumer = self.consumer.clone();
        let transaction = self.client.transaction().await.context("BEGIN")?;
        let sql: String = transaction
            .query_one("SELECT pgq.batch_event_sql($1)", &[&batch.id])
            .await
            .context("pgq.batch_event_sql")?
            .get(0);
        let statement = transaction
            .prepare(&sql)
            .await
            .context("preparing the batch query")?;
        let portal = transaction
            .bind(&statement, &[])
            .await
            .context("opening the batch cursor")?;
        Ok(BatchTransaction {
            transaction,
            portal,
            fetch_size: i32::try_from(fetch_size).unwrap_or(i32::MAX),
            exhausted: false,
            batch_id: batch.id,
            queue,
            consumer,
        })
    }
}

fn seconds(value: Option<f64>) -> Duration {
    value
        .and_then(|secs| Duration::try_from_secs_f64(secs.max(0.0)).ok())
        .unwrap_or_default()
}

/// The transaction of one batch: reads its events, then records what became of them.
pub struct BatchTransaction<'a> {
    transaction: Transaction<'a>,
    portal: Portal,
    fetch_size: i32,
    exhausted: bool,
    batch_id: i64,
    queue: String,
    consumer: String,
}

impl BatchTransaction<'_> {
    /// The next events of the batch in `ev_id` order; empty when the batch is read.
    pub async fn next_chunk(&mut self) -> Result<Vec<Event>, PgqError> {
        if self.exhausted {
            return Ok(Vec::new());
        }
        let rows = self
            .transaction
            .query_portal(&self.portal, self.fetch_size)
            .await
            .context("fetching batch events")?;
        if rows.len() < self.fetch_size as usize {
            self.exhausted = true;
        }
        rows.iter().map(event_from_row).collect()
    }

    /// True once the session under the transaction has ended.
    pub fn is_closed(&self) -> bool {
        self.transaction.client().is_closed()
    }

    /// The transaction, for dead-letter and audit statements of the same batch.
    pub fn transaction(&self) -> &Transaction<'_> {
        &self.transaction
    }

    /// Puts events in PgQ's retry queue, to come back after `delay` with `ev_retry`
    /// incremented.
    ///
    /// This is `pgq.event_retry(batch_id, ev_id, ...)`'s effect, done through
    /// `pgq.event_retry_raw` with the event's own columns: `event_retry` re-reads the
    /// whole batch for every event it retries, which makes a batch with many failures
    /// quadratic. One statement retries them all.
    pub async fn retry_events(&self, events: &[&Event], delay: Duration) -> Result<(), PgqError> {
        if events.is_empty() {
            return Ok(());
        }
        let columns = EventColumns::of(events);
        let delay = delay.as_secs_f64();
        let retries: Vec<i32> = events.iter().map(|e| e.retries().saturating_add(1)).collect();
        let params: [&(dyn ToSql + Sync); 12] = [
            &self.queue,
            &self.consumer,
            &delay,
            &columns.ev_id,
            &columns.ev_time,
            &retries,
            &columns.ev_type,
            &columns.ev_data,
            &columns.ev_extra1,
            &columns.ev_extra2,
            &columns.ev_extra3,
            &columns.ev_extra4,
        ];
        self.transaction
            .execute(
                "SELECT pgq.event_retry_raw($1, $2, now() + $3::float8 * interval '1 second', \
                        e.ev_id, e.ev_time, e.ev_retry, e.ev_type, e.ev_data, \
                        e.ev_extra1, e.ev_extra2, e.ev_extra3, e.ev_extra4) \
                 FROM unnest($4::bigint[], $5::timestamptz[], $6::int4[], $7::text[], $8::text[], \
                             $9::text[], $10::text[], $11::text[], $12::text[]) \
                      AS e(ev_id, ev_time, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4)",
                &params,
            )
            .await
            .context("pgq.event_retry")?;
        Ok(())
    }

    /// `pgq.finish_batch`, then COMMIT: everything recorded in this transaction becomes
    /// true together.
    pub async fn finish(self) -> Result<(), PgqError> {
        self.transaction
            .query_one("SELECT pgq.finish_batch($1)", &[&self.batch_id])
            .await
            .context("pgq.finish_batch")?;
        self.transaction.commit().await.context("COMMIT of the batch")?;
        Ok(())
    }
}

/// Events as column arrays, for `unnest`-based statements that handle many events in
/// one round trip.
pub(crate) struct EventColumns<'a> {
    pub ev_id: Vec<i64>,
    pub ev_time: Vec<DateTime<Utc>>,
    pub ev_txid: Vec<i64>,
    pub ev_retry: Vec<Option<i32>>,
    pub ev_type: Vec<Option<&'a str>>,
    pub ev_data: Vec<Option<&'a str>>,
    pub ev_extra1: Vec<Option<&'a str>>,
    pub ev_extra2: Vec<Option<&'a str>>,
    pub ev_extra3: Vec<Option<&'a str>>,
    pub ev_extra4: Vec<Option<&'a str>>,
}

impl<'a> EventColumns<'a> {
    pub fn of(events: &[&'a Event]) -> Self {
        let text = |f: fn(&'a Event) -> &'a Option<String>| -> Vec<Option<&'a str>> {
            events.iter().map(|e| f(e).as_deref()).collect()
        };
        EventColumns {
            ev_id: events.iter().map(|e| e.ev_id).collect(),
            ev_time: events.iter().map(|e| e.ev_time).collect(),
            ev_txid: events.iter().map(|e| e.ev_txid).collect(),
            ev_retry: events.iter().map(|e| e.ev_retry).collect(),
            ev_type: text(|e| &e.ev_type),
            ev_data: text(|e| &e.ev_data),
            ev_extra1: text(|e| &e.ev_extra1),
            ev_extra2: text(|e| &e.ev_extra2),
            ev_extra3: text(|e| &e.ev_extra3),
            ev_extra4: text(|e| &e.ev_extra4),
        }
    }
}

fn event_from_row(row: &Row) -> Result<Event, PgqError> {
    debug_assert_eq!(row.len(), EVENT_COLUMNS);
    let get =
        |index| -> Result<Option<String>, PgqError> { row.try_get(index).context("decoding an event row") };
    Ok(Event {
        ev_id: row.try_get(0).context("decoding an event row")?,
        ev_time: row.try_get(1).context("decoding an event row")?,
        ev_txid: row
            .try_get::<_, Option<i64>>(2)
            .context("decoding an event row")?
            .unwrap_or(0),
        ev_retry: row.try_get(3).context("decoding an event row")?,
        ev_type: get(4)?,
        ev_data: get(5)?,
        ev_extra1: get(6)?,
        ev_extra2: get(7)?,
        ev_extra3: get(8)?,
        ev_extra4: get(9)?,
    })
}
