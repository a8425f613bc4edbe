//! The `mikkoo.dead_letter` table: where events that cannot be delivered are kept, with
//! the reason, for an operator to inspect and replay.
//!
//! The table's definition is the one in `sql/mikkoo.sql` (a test checks they agree); a
//! worker with `dead_letter: table` creates it at start when missing. Rows are written in
//! the transaction that finishes their batch, so an event is either still in its batch or
//! in this table — never in neither.

use tokio_postgres::{Client, Transaction};

use crate::event::Event;
use crate::pgq::{EventColumns, PgqError, QueryContext};

/// DDL of the dead-letter table, shared with `sql/mikkoo.sql`.
pub const DEAD_LETTER_DDL: &str = include_str!("../sql/dead_letter.sql");

/// Advisory lock key serialising concurrent `CREATE ... IF NOT EXISTS` of the table
/// (two workers starting at once would otherwise race on the catalog). `sql/mikkoo.sql`
/// takes the same lock (as the decimal 7883950731863982081; a test checks it).
pub const DDL_LOCK_KEY: i64 = 0x6d69_6b6b_6f6f_0001;

/// Creates schema `mikkoo` and table `mikkoo.dead_letter` when missing.
pub async fn ensure_table(client: &Client) -> Result<(), PgqError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('mikkoo.dead_letter') IS NOT NULL", &[])
        .await
        .context("checking for mikkoo.dead_letter")?
        .get(0);
    if exists {
        return Ok(());
    }
    let statements =
        format!("BEGIN; SELECT pg_advisory_xact_lock({DDL_LOCK_KEY}); {DEAD_LETTER_DDL}\nCOMMIT;");
    client
        .batch_execute(&statements)
        .await
        .context("creating mikkoo.dead_letter")?;
    Ok(())
}

/// One event to dead-letter and why.
#[derive(Debug)]
pub struct DeadLetter<'a> {
    /// The event as read from the batch.
    pub event: &'a Event,
    /// What went wrong, in words an operator would search for.
    pub reason: &'a str,
}

/// Inserts dead-letter rows in the batch's transaction, in one statement.
pub async fn insert(
    transaction: &Transaction<'_>,
    queue: &str,
    consumer: &str,
    letters: &[DeadLetter<'_>],
) -> Result<(), PgqError> {
    if letters.is_empty() {
        return Ok(());
    }
    let events: Vec<&Event> = letters.iter().map(|letter| letter.event).collect();
    let reasons: Vec<&str> = letters.iter().map(|letter| letter.reason).collect();
    let columns = EventColumns::of(&events);
    transaction
        .execute(
            "INSERT INTO mikkoo.dead_letter (ev_id, ev_time, ev_txid, ev_retry, ev_type, ev_data, \
                 ev_extra1, ev_extra2, ev_extra3, ev_extra4, reason, queue, consumer) \
             SELECT e.*, $12, $13 \
             FROM unnest($1::bigint[], $2::timestamptz[], $3::bigint[], $4::int4[], $5::text[], \
                         $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[]) \
                  AS e(ev_id, ev_time, ev_txid, ev_retry, ev_type, ev_data, \
                       ev_extra1, ev_extra2, ev_extra3, ev_extra4, reason)",
            &[
                &columns.ev_id,
                &columns.ev_time,
                &columns.ev_txid,
                &columns.ev_retry,
                &columns.ev_type,
                &columns.ev_data,
                &columns.ev_extra1,
                &columns.ev_extra2,
                &columns.ev_extra3,
                &columns.ev_extra4,
                &reasons,
                &queue,
                &consumer,
            ],
        )
        .await
        .context("inserting into mikkoo.dead_letter")?;
    Ok(())
}

/// One row of `mikkoo.dead_letter`, for listing.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ListedLetter {
    /// Row id (what `dead-letter replay --id` takes).
    pub id: i64,
    /// The PgQ queue.
    pub queue: String,
    /// The event id.
    pub ev_id: i64,
    /// Retries at the last attempt.
    pub ev_retry: Option<i32>,
    /// When it was inserted.
    pub ev_time: chrono::DateTime<chrono::Utc>,
    /// When it was dead-lettered.
    pub failed_at: chrono::DateTime<chrono::Utc>,
    /// Exchange (`ev_extra1`).
    pub exchange: Option<String>,
    /// Routing key (`ev_type`).
    pub routing_key: Option<String>,
    /// Why.
    pub reason: String,
    /// The first characters of the body.
    pub body_preview: Option<String>,
}

/// Characters of the body shown by `dead-letter list`.
const PREVIEW_CHARS: i32 = 60;

/// Dead letters of `queues`, oldest first.
pub async fn list(client: &Client, queues: &[String]) -> Result<Vec<ListedLetter>, PgqError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('mikkoo.dead_letter') IS NOT NULL", &[])
        .await
        .context("checking for mikkoo.dead_letter")?
        .get(0);
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT id, queue, ev_id, ev_retry, ev_time, failed_at, ev_extra1, ev_type, reason, left(ev_data, $2) \
             FROM mikkoo.dead_letter WHERE queue = ANY($1) ORDER BY failed_at, id",
            &[&queues, &PREVIEW_CHARS],
        )
        .await
        .context("listing mikkoo.dead_letter")?;
    Ok(rows
        .iter()
        .map(|row| ListedLetter {
            id: row.get(0),
            queue: row.get(1),
            ev_id: row.get(2),
            ev_retry: row.get(3),
            ev_time: row.get(4),
            failed_at: row.get(5),
            exchange: row.get(6),
            routing_key: row.get(7),
            reason: row.get(8),
            body_preview: row.get(9),
        })
        .collect())
}

/// Which rows to replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selection {
    /// These row ids (all must exist).
    Ids(Vec<i64>),
    /// Every row of the queue.
    All,
}

/// Why a replay did nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Postgres(#[from] PgqError),
    /// Some requested ids are not dead letters of the queue.
    #[error("no dead letter with id {missing:?} in queue {queue}; nothing was replayed")]
    Missing {
        /// The queue.
        queue: String,
        /// The ids not found.
        missing: Vec<i64>,
    },
}

/// Re-inserts the chosen dead letters into their PgQ queue with their original fields
/// and deletes them, in one transaction. With `message_ids`, each event's ev_extra3
/// carries the message id the original event had, so consumers can still
/// de-duplicate. Returns how many were replayed, and the ids whose ev_extra3 could
/// not carry it (not a JSON object: they will be rejected again unless fixed).
pub async fn replay(
    client: &mut Client,
    queue: &str,
    selection: &Selection,
    message_ids: Option<crate::mapping::MessageIdNamespace>,
) -> Result<(usize, Vec<i64>), ReplayError> {
    let transaction = client.transaction().await.context("BEGIN")?;
    let (all, ids) = match selection {
        Selection::All => (true, Vec::new()),
        Selection::Ids(ids) => (false, ids.clone()),
    };
    let rows = transaction
        .query(
            "SELECT id, ev_id, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4 \
             FROM mikkoo.dead_letter WHERE queue = $1 AND ($2 OR id = ANY($3)) ORDER BY ev_id, id FOR UPDATE",
            &[&queue, &all, &ids],
        )
        .await
        .context("reading mikkoo.dead_letter")?;
    let found: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
    let missing: Vec<i64> = ids.iter().copied().filter(|id| !found.contains(id)).collect();
    if !missing.is_empty() {
        return Err(ReplayError::Missing {
            queue: queue.to_owned(),
            missing,
        });
    }
    let mut unchanged = Vec::new();
    for row in &rows {
        let ev_id: i64 = row.get(1);
        let extra3: Option<String> = row.get(6);
        let extra3 = match message_ids {
            Some(namespace) => {
                match with_message_id(extra3.as_deref(), &namespace.message_id(ev_id).to_string()) {
                    Some(updated) => Some(updated),
                    None => {
                        unchanged.push(row.get::<_, i64>(0));
                        extra3
                    }
                }
            }
            None => extra3,
        };
        transaction
            .query_one(
                "SELECT pgq.insert_event($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &queue,
                    &row.get::<_, Option<String>>(2),
                    &row.get::<_, Option<String>>(3),
                    &row.get::<_, Option<String>>(4),
                    &row.get::<_, Option<String>>(5),
                    &extra3,
                    &row.get::<_, Option<String>>(7),
                ],
            )
            .await
            .context("pgq.insert_event")?;
    }
    transaction
        .execute("DELETE FROM mikkoo.dead_letter WHERE id = ANY($1)", &[&found])
        .await
        .context("deleting replayed dead letters")?;
    transaction.commit().await.context("COMMIT of the replay")?;
    Ok((found.len(), unchanged))
}

/// `ev_extra3` with `message_id` set, unless the producer set one already (that one is
/// the message's identity). `None` when `ev_extra3` is not a JSON object.
pub fn with_message_id(extra3: Option<&str>, message_id: &str) -> Option<String> {
    let mut properties = match extra3.filter(|text| !text.trim().is_empty()) {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return None,
        },
    };
    // A producer's own message_id (even an explicit null: "no message id") is the
    // message's identity; only an absent one is filled in.
    if !properties.contains_key("message_id") {
        properties.insert(
            "message_id".to_owned(),
            serde_json::Value::String(message_id.to_owned()),
        );
    }
    Some(serde_json::Value::Object(properties).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_keeps_the_original_message_id() {
        assert_eq!(with_message_id(None, "m-1").unwrap(), r#"{"message_id":"m-1"}"#);
        assert_eq!(
            with_message_id(Some(""), "m-1").unwrap(),
            r#"{"message_id":"m-1"}"#
        );
        let kept = with_message_id(Some(r#"{"message_id": "producer", "priority": 1}"#), "m-1").unwrap();
        assert!(
            kept.contains(r#""message_id":"producer""#) && kept.contains(r#""priority":1"#),
            "{kept}"
        );
        let added = with_message_id(Some(r#"{"type": "t"}"#), "m-1").unwrap();
        assert!(
            added.contains(r#""message_id":"m-1""#) && added.contains(r#""type":"t""#),
            "{added}"
        );
        assert_eq!(with_message_id(Some("{broken"), "m-1"), None);
        assert_eq!(with_message_id(Some("[1]"), "m-1"), None);
    }
}
