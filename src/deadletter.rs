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
/// (two workers starting at once would otherwise race on the catalog).
const DDL_LOCK_KEY: i64 = 0x6d69_6b6b_6f6f_0001;

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
