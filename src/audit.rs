//! Auditing: `mikkoo.audit` rows follow an audited event from insert to confirm to
//! receipt (SPEC §9).
//!
//! Producers insert with `mikkoo.insert_audited_event`. A worker with `audit: true`
//! sets `confirmed_at` for the batch's confirmed events in the transaction that
//! finishes the batch (one statement per batch). `mikkoo audit consume` sets
//! `received_at` as messages arrive at a RabbitMQ queue; `mikkoo audit report` lists
//! the rows still waiting for either.

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, GenericClient};

use crate::pgq::{PgqError, QueryContext};
use crate::worker::EvIdSet;

/// Fails, with the fix in the message, when the audit table is not installed.
pub async fn check_installed(client: &Client, queue: &str) -> Result<(), PgqError> {
    let installed: bool = client
        .query_one(
            "SELECT to_regclass('mikkoo.audit') IS NOT NULL \
                AND EXISTS (SELECT 1 FROM information_schema.columns \
                            WHERE table_schema = 'mikkoo' AND table_name = 'audit' AND column_name = 'confirmed_at')",
            &[],
        )
        .await
        .context("checking for mikkoo.audit")?
        .get(0);
    if installed {
        Ok(())
    } else {
        Err(PgqError::SchemaMissing {
            what: format!(
                "the worker for {queue} has audit: true, but mikkoo.audit (with confirmed_at) is not installed"
            ),
        })
    }
}

/// Sets `confirmed_at` on the audit rows of `confirmed` events of `queue`, in the
/// batch's transaction, in one statement.
pub async fn mark_confirmed(
    transaction: &impl GenericClient,
    queue: &str,
    confirmed: &EvIdSet,
) -> Result<(), PgqError> {
    if confirmed.is_empty() {
        return Ok(());
    }
    let (low, high): (Vec<i64>, Vec<i64>) = confirmed.ranges().iter().copied().unzip();
    transaction
        .execute(
            "UPDATE mikkoo.audit a SET confirmed_at = now() \
             FROM unnest($2::bigint[], $3::bigint[]) AS r(low, high) \
             WHERE a.queue = $1 AND a.event_id BETWEEN r.low AND r.high AND a.confirmed_at IS NULL",
            &[&queue, &low, &high],
        )
        .await
        .context("marking mikkoo.audit rows confirmed")?;
    Ok(())
}

/// Sets `received_at` for `message_id`; false when no such row waits for it.
pub async fn mark_received(client: &Client, message_id: uuid::Uuid) -> Result<bool, PgqError> {
    let updated = client
        .execute(
            "UPDATE mikkoo.audit SET received_at = now() WHERE message_id = $1::text::uuid AND received_at IS NULL",
            &[&message_id.to_string()],
        )
        .await
        .context("marking a mikkoo.audit row received")?;
    Ok(updated > 0)
}

/// An audit row still waiting for a stage.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Straggler {
    /// The message id.
    pub message_id: String,
    /// The PgQ event id.
    pub event_id: i64,
    /// The PgQ queue.
    pub queue: String,
    /// Exchange.
    pub exchange: Option<String>,
    /// Routing key.
    pub routing_key: Option<String>,
    /// When it was queued.
    pub published_at: DateTime<Utc>,
    /// When RabbitMQ confirmed it.
    pub confirmed_at: Option<DateTime<Utc>>,
}

/// Rows older than `older_than` that are not confirmed, and those confirmed but not
/// received.
pub async fn stragglers(
    client: &Client,
    older_than: std::time::Duration,
) -> Result<(Vec<Straggler>, Vec<Straggler>), PgqError> {
    let seconds = older_than.as_secs_f64();
    let select = |condition: &str| {
        format!(
            "SELECT message_id::text, event_id, queue, exchange, routing_key, published_at, confirmed_at \
             FROM mikkoo.audit WHERE {condition} AND published_at < now() - $1::float8 * interval '1 second' \
             ORDER BY published_at LIMIT 10000"
        )
    };
    let rows_of = |rows: Vec<tokio_postgres::Row>| -> Vec<Straggler> {
        rows.iter()
            .map(|row| Straggler {
                message_id: row.get(0),
                event_id: row.get(1),
                queue: row.get(2),
                exchange: row.get(3),
                routing_key: row.get(4),
                published_at: row.get(5),
                confirmed_at: row.get(6),
            })
            .collect()
    };
    let unconfirmed = client
        .query(&select("confirmed_at IS NULL"), &[&seconds])
        .await
        .context("listing unconfirmed audit rows")?;
    let unreceived = client
        .query(
            &select("confirmed_at IS NOT NULL AND received_at IS NULL"),
            &[&seconds],
        )
        .await
        .context("listing unreceived audit rows")?;
    Ok((rows_of(unconfirmed), rows_of(unreceived)))
}

/// How `audit consume` ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConsumeLimits {
    /// Stop after this many messages.
    pub max_messages: Option<u64>,
    /// Stop when no message arrives for this long.
    pub idle_exit: Option<std::time::Duration>,
}

/// What `audit consume` saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumeSummary {
    /// Messages taken from the queue.
    pub messages: u64,
    /// Audit rows marked received.
    pub marked: u64,
    /// Messages without a UUID `message_id`, or with no audit row waiting.
    pub unmatched: u64,
}

/// Why `audit consume` stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// PostgreSQL failed (the message being handled was returned to the queue).
    #[error(transparent)]
    Postgres(#[from] PgqError),
    /// RabbitMQ failed.
    #[error(transparent)]
    Amqp(#[from] crate::amqp::AmqpError),
    /// The consumer ended.
    #[error("RabbitMQ consumer failed: {0}")]
    Consumer(#[from] lapin::Error),
}

/// Consumes `consumer` and marks each message's audit row received, acking a message
/// only once its row is updated; stops at `limits` or `stop`.
pub async fn consume(
    client: &Client,
    mut consumer: lapin::Consumer,
    limits: ConsumeLimits,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<ConsumeSummary, ConsumeError> {
    use futures_util::StreamExt;
    let mut summary = ConsumeSummary::default();
    while limits.max_messages.is_none_or(|max| summary.messages < max) {
        let next = async {
            match limits.idle_exit {
                Some(idle) => tokio::time::timeout(idle, consumer.next()).await.ok().flatten(),
                None => consumer.next().await,
            }
        };
        let delivery = tokio::select! {
            delivery = next => delivery,
            _ = stop.cancelled() => None,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery?;
        summary.messages += 1;
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok());
        let marked = match message_id {
            Some(id) => match mark_received(client, id).await {
                Ok(marked) => marked,
                Err(error) => {
                    let requeue = lapin::options::BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    };
                    let _ = delivery.nack(requeue).await;
                    return Err(error.into());
                }
            },
            None => false,
        };
        if marked {
            summary.marked += 1;
        } else {
            summary.unmatched += 1;
            tracing::warn!(
                message_id = ?delivery.properties.message_id().as_ref().map(|id| id.as_str()),
                "message has no audit row waiting for it (no UUID message_id, unknown, or already received)"
            );
        }
        delivery.ack(lapin::options::BasicAckOptions::default()).await?;
    }
    Ok(summary)
}
