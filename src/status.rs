//! `mikkoo status`: what PostgreSQL says about each configured queue — whether the
//! consumer is registered, its lag, when it was last seen, pending events, its open
//! batch, the ticker's lag, and dead letters — as a table or JSON.
//!
//! It reads PgQ's own bookkeeping, so it works whether or not a relay is running.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::config::Config;
use crate::pgq::PgqSession;
use crate::pgq::{PgqError, QueryContext};

/// One queue's figures.
#[derive(Debug, Default)]
pub struct QueueStatus {
    /// The PgQ queue.
    pub queue: String,
    /// The consumer name.
    pub consumer: String,
    /// Set when PostgreSQL could not be asked.
    pub error: Option<String>,
    /// Whether the queue exists.
    pub queue_exists: bool,
    /// Whether the consumer is registered.
    pub registered: bool,
    /// Age of the last tick the consumer finished, in seconds.
    pub lag_seconds: Option<f64>,
    /// Seconds since the consumer last finished a batch.
    pub last_seen_seconds: Option<f64>,
    /// Events not yet handed to the consumer (PgQ's estimate).
    pub pending_events: Option<i64>,
    /// The open batch, if any.
    pub open_batch: Option<i64>,
    /// Seconds since the queue's last tick.
    pub ticker_lag_seconds: Option<f64>,
    /// Rows in `mikkoo.dead_letter` for the queue (`None` without the table).
    pub dead_letters: Option<i64>,
}

/// Asks PostgreSQL about every configured queue.
pub async fn collect(config: &Config) -> Vec<QueueStatus> {
    let mut out = Vec::new();
    for (queue, worker) in &config.application.workers {
        let mut status = QueueStatus {
            queue: queue.clone(),
            consumer: worker.consumer_name.clone(),
            ..QueueStatus::default()
        };
        match PgqSession::connect(&worker.postgres, queue, &worker.consumer_name).await {
            Ok(session) => {
                if let Err(error) = fill(&session, &mut status).await {
                    status.error = Some(error.to_string());
                }
            }
            Err(error) => status.error = Some(error.to_string()),
        }
        out.push(status);
    }
    out
}

async fn fill(session: &PgqSession, status: &mut QueueStatus) -> Result<(), PgqError> {
    let client = session.client();
    let queue = client
        .query_opt(
            "SELECT extract(epoch FROM ticker_lag)::float8 FROM pgq.get_queue_info() WHERE queue_name = $1",
            &[&status.queue],
        )
        .await
        .context("pgq.get_queue_info")?;
    let Some(queue) = queue else {
        return Ok(());
    };
    status.queue_exists = true;
    status.ticker_lag_seconds = queue.get(0);
    let consumer = client
        .query_opt(
            "SELECT extract(epoch FROM lag)::float8, extract(epoch FROM last_seen)::float8, \
                    pending_events, current_batch \
             FROM pgq.get_consumer_info($1) WHERE consumer_name = $2",
            &[&status.queue, &status.consumer],
        )
        .await
        .context("pgq.get_consumer_info")?;
    if let Some(consumer) = consumer {
        status.registered = true;
        status.lag_seconds = consumer.get(0);
        status.last_seen_seconds = consumer.get(1);
        status.pending_events = consumer.get(2);
        status.open_batch = consumer.get(3);
    }
    let has_table: bool = client
        .query_one("SELECT to_regclass('mikkoo.dead_letter') IS NOT NULL", &[])
        .await
        .context("checking for mikkoo.dead_letter")?
        .get(0);
    if has_table {
        let count: i64 = client
            .query_one(
                "SELECT count(*) FROM mikkoo.dead_letter WHERE queue = $1",
                &[&status.queue],
            )
            .await
            .context("counting dead letters")?
            .get(0);
        status.dead_letters = Some(count);
    }
    Ok(())
}

fn seconds(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |s| format!("{s:.1}s"))
}

fn number(value: Option<i64>) -> String {
    value.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// A readable table.
pub fn table(statuses: &[QueueStatus]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<12} {:>10} {:>8} {:>10} {:>9} {:>10} {:>11} {:>12}",
        "queue",
        "consumer",
        "registered",
        "lag",
        "last seen",
        "pending",
        "open batch",
        "ticker lag",
        "dead letters"
    );
    for s in statuses {
        if let Some(error) = &s.error {
            let _ = writeln!(out, "{:<24} {:<12} error: {error}", s.queue, s.consumer);
            continue;
        }
        let registered = match (s.queue_exists, s.registered) {
            (false, _) => "no queue",
            (true, false) => "no",
            (true, true) => "yes",
        };
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>10} {:>8} {:>10} {:>9} {:>10} {:>11} {:>12}",
            s.queue,
            s.consumer,
            registered,
            seconds(s.lag_seconds),
            seconds(s.last_seen_seconds),
            number(s.pending_events),
            number(s.open_batch),
            seconds(s.ticker_lag_seconds),
            number(s.dead_letters)
        );
    }
    out
}

/// The same as JSON.
pub fn json(statuses: &[QueueStatus]) -> Value {
    let queues: Vec<Value> = statuses
        .iter()
        .map(|s| {
            json!({
                "queue": s.queue,
                "consumer": s.consumer,
                "error": s.error,
                "queue_exists": s.queue_exists,
                "registered": s.registered,
                "lag_seconds": s.lag_seconds,
                "last_seen_seconds": s.last_seen_seconds,
                "pending_events": s.pending_events,
                "open_batch": s.open_batch,
                "ticker_lag_seconds": s.ticker_lag_seconds,
                "dead_letters": s.dead_letters,
            })
        })
        .collect();
    json!({ "queues": queues })
}
