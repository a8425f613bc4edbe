//! A PgQ event as the relay reads it from a batch.

use chrono::{DateTime, Utc};

/// One row of a PgQ batch, with PgQ's column names. Every text column may be NULL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Event id, unique within the queue and kept across retries.
    pub ev_id: i64,
    /// When the event was inserted.
    pub ev_time: DateTime<Utc>,
    /// Transaction id of the inserting transaction.
    pub ev_txid: i64,
    /// How many times the event was retried before (NULL for a fresh event).
    pub ev_retry: Option<i32>,
    /// Routing key.
    pub ev_type: Option<String>,
    /// Message body.
    pub ev_data: Option<String>,
    /// Exchange.
    pub ev_extra1: Option<String>,
    /// `content_type` property.
    pub ev_extra2: Option<String>,
    /// JSON object of AMQP properties.
    pub ev_extra3: Option<String>,
    /// JSON object of headers.
    pub ev_extra4: Option<String>,
}

impl Event {
    /// Failures so far (a NULL `ev_retry` counts as none).
    pub fn retries(&self) -> i32 {
        self.ev_retry.unwrap_or(0)
    }

    /// The body as bytes (a NULL `ev_data` is an empty body).
    pub fn body(&self) -> &[u8] {
        self.ev_data.as_deref().unwrap_or("").as_bytes()
    }
}
