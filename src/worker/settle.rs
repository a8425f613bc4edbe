//! What becomes of the events of a batch that were not confirmed: retried through PgQ,
//! or dead-lettered, recorded in the batch's own transaction.

use crate::amqp::{Broker, Outcome};
use crate::config::{DeadLetterTarget, WorkerConfig};
use crate::deadletter::{self, DeadLetter};
use crate::error::WorkerError;
use crate::event::Event;
use crate::mapping::{Message, MessageIdNamespace, integer_value, iso_timestamp};
use crate::pgq::BatchTransaction;
use crate::stats::WorkerStats;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Unsettled outcomes held before they are written; writing in chunks keeps memory
/// bounded when a whole batch fails.
const FLUSH_THRESHOLD: usize = 1000;

/// Outcomes of one batch not yet written to PostgreSQL.
#[derive(Debug, Default)]
pub(super) struct Settlement {
    /// Publish failures: retried while `ev_retry < max_failures`, else dead-lettered.
    failures: Vec<(Event, String)>,
    /// Rejected events: dead-lettered at once.
    rejections: Vec<(Event, String)>,
    /// Totals for the batch, added to the stats once the batch commits.
    pub totals: Totals,
    /// Where dead letters sent to an exchange get their `message_id` (the original
    /// event's), so a letter sent twice can be de-duplicated too.
    message_ids: Option<MessageIdNamespace>,
}

/// What happened to the events of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Totals {
    pub retried: u64,
    pub dead_lettered: u64,
    pub rejected: u64,
    pub discarded: u64,
}

impl Settlement {
    /// Nothing settled yet; dead letters on an exchange carry ids from `message_ids`.
    pub fn new(message_ids: Option<MessageIdNamespace>) -> Self {
        Settlement {
            message_ids,
            ..Settlement::default()
        }
    }

    /// Notes a failed publish attempt.
    pub fn failed(&mut self, queue: &str, event: Event, reason: String) {
        tracing::warn!(queue, ev_id = event.ev_id, attempt = event.retries() + 1, %reason, "event not delivered");
        self.failures.push((event, reason));
    }

    /// Notes an event that cannot become a message.
    pub fn rejected(&mut self, queue: &str, event: Event, reason: String) {
        tracing::warn!(queue, ev_id = event.ev_id, %reason, "event rejected: its metadata cannot make an AMQP message");
        self.totals.rejected += 1;
        self.rejections.push((event, reason));
    }

    /// True when enough is held that it should be written now.
    pub fn should_flush(&self) -> bool {
        self.failures.len() + self.rejections.len() >= FLUSH_THRESHOLD
    }

    /// Writes retries and dead letters held so far into the batch's transaction.
    pub async fn flush(
        &mut self,
        config: &WorkerConfig,
        transaction: &BatchTransaction<'_>,
        broker: &mut Broker,
    ) -> Result<(), WorkerError> {
        let failures = std::mem::take(&mut self.failures);
        let rejections = std::mem::take(&mut self.rejections);
        let mut retries: Vec<&Event> = Vec::new();
        let mut letters: Vec<(&Event, String)> = Vec::new();
        for (event, reason) in &failures {
            if event.retries() < config.max_failures {
                tracing::info!(
                    queue = %config.queue,
                    ev_id = event.ev_id,
                    retry_in = ?config.retry_delay,
                    "event handed to pgq retry queue"
                );
                retries.push(event);
            } else {
                let attempts = event.retries() + 1;
                letters.push((
                    event,
                    format!(
                        "{reason} (gave up after {attempts} attempts; max_failures is {})",
                        config.max_failures
                    ),
                ));
            }
        }
        letters.extend(rejections.iter().map(|(event, reason)| (event, reason.clone())));

        let failed_dead_letters = self.dead_letter(config, transaction, broker, &letters).await?;
        retries.extend(failed_dead_letters);
        transaction.retry_events(&retries, config.retry_delay).await?;
        self.totals.retried += retries.len() as u64;
        Ok(())
    }

    /// Sends `letters` to the configured destination. Returns the events that could
    /// not be dead-lettered there (only possible for an exchange); the caller retries
    /// them instead, so they are never lost.
    async fn dead_letter<'e>(
        &mut self,
        config: &WorkerConfig,
        transaction: &BatchTransaction<'_>,
        broker: &mut Broker,
        letters: &[(&'e Event, String)],
    ) -> Result<Vec<&'e Event>, WorkerError> {
        let queue = config.queue.as_str();
        match &config.dead_letter {
            DeadLetterTarget::Table => {
                for (event, reason) in letters {
                    tracing::error!(queue, ev_id = event.ev_id, %reason, "event dead-lettered to mikkoo.dead_letter");
                }
                let rows: Vec<DeadLetter<'_>> = letters
                    .iter()
                    .map(|(event, reason)| DeadLetter { event, reason })
                    .collect();
                deadletter::insert(transaction.transaction(), queue, &config.consumer_name, &rows).await?;
                self.totals.dead_lettered += letters.len() as u64;
                Ok(Vec::new())
            }
            DeadLetterTarget::Discard => {
                for (event, reason) in letters {
                    tracing::error!(
                        queue,
                        ev_id = event.ev_id,
                        %reason,
                        ev_type = event.ev_type.as_deref().unwrap_or(""),
                        ev_extra1 = event.ev_extra1.as_deref().unwrap_or(""),
                        ev_data = event.ev_data.as_deref().unwrap_or(""),
                        "event discarded (dead_letter: discard)"
                    );
                }
                self.totals.discarded += letters.len() as u64;
                Ok(Vec::new())
            }
            DeadLetterTarget::Exchange {
                exchange,
                routing_key,
            } => {
                let mut undelivered = Vec::new();
                for (event, reason) in letters {
                    let message_id = self.message_ids.map(|ids| ids.message_id(event.ev_id));
                    let message = dead_letter_message(
                        config,
                        exchange,
                        routing_key.as_deref(),
                        event,
                        reason,
                        message_id,
                    );
                    match broker
                        .publish_and_wait(message, event.body(), true, config.confirm_timeout)
                        .await
                    {
                        Outcome::Acked => {
                            tracing::error!(queue, ev_id = event.ev_id, %reason, exchange = %exchange, "event dead-lettered to exchange");
                            self.totals.dead_lettered += 1;
                        }
                        Outcome::ConnectionLost { reason } => return Err(WorkerError::BrokerLost { reason }),
                        other => {
                            tracing::error!(
                                queue,
                                ev_id = event.ev_id,
                                outcome = ?other,
                                "dead-letter exchange refused the event; retrying it through pgq instead"
                            );
                            if matches!(other, Outcome::ChannelClosed { .. }) {
                                broker.reopen_channel().await?;
                            }
                            undelivered.push(*event);
                        }
                    }
                }
                Ok(undelivered)
            }
        }
    }
}

/// The message a dead letter becomes on a dead-letter exchange: the original body, the
/// failure and the original metadata in `x-mikkoo-*` headers.
fn dead_letter_message(
    config: &WorkerConfig,
    exchange: &str,
    routing_key: Option<&str>,
    event: &Event,
    reason: &str,
    message_id: Option<uuid::Uuid>,
) -> Message {
    let mut headers = FieldTable::default();
    let mut put = |name: &str, value: AMQPValue| {
        headers.insert(ShortString::try_new(name).unwrap_or_default(), value);
    };
    let text = |value: &str| AMQPValue::LongString(LongString::from(value));
    put("x-mikkoo-reason", text(reason));
    put("x-mikkoo-queue", text(&config.queue));
    put("x-mikkoo-ev-id", integer_value(event.ev_id));
    put("x-mikkoo-ev-retry", AMQPValue::LongInt(event.retries()));
    put("x-mikkoo-ev-time", text(&iso_timestamp(event.ev_time)));
    put("x-mikkoo-ev-txid", integer_value(event.ev_txid));
    let original = [
        ("x-mikkoo-exchange", &event.ev_extra1),
        ("x-mikkoo-routing-key", &event.ev_type),
        ("x-mikkoo-content-type", &event.ev_extra2),
        ("x-mikkoo-properties", &event.ev_extra3),
        ("x-mikkoo-headers", &event.ev_extra4),
    ];
    for (name, value) in original {
        if let Some(value) = value {
            put(name, text(value));
        }
    }
    let routing_key = routing_key
        .or(event.ev_type.as_deref())
        .and_then(|key| ShortString::try_new(key).ok())
        .unwrap_or_default();
    Message {
        exchange: ShortString::try_new(exchange).unwrap_or_default(),
        routing_key,
        properties: {
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_app_id(ShortString::try_new(config.app_id.as_str()).unwrap_or_default())
                .with_headers(headers);
            match message_id {
                Some(id) => {
                    properties.with_message_id(ShortString::try_new(id.to_string()).unwrap_or_default())
                }
                None => properties,
            }
        },
    }
}

impl Totals {
    /// Adds the batch's totals to the worker's counters (after the batch committed).
    pub fn record(&self, stats: &WorkerStats) {
        stats.retried.add(self.retried);
        stats.dead_lettered.add(self.dead_lettered + self.discarded);
        stats.rejected.add(self.rejected);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use chrono::{TimeZone, Utc};
    use std::path::Path;

    fn worker_config() -> WorkerConfig {
        let text =
            "Application:\n  workers:\n    invoices:\n      postgres_url: postgresql://localhost/postgres\n";
        let mut config =
            Config::from_text(Path::new("test.yaml"), text, &|_| None).expect("valid configuration");
        config.application.workers.remove("invoices").expect("worker")
    }

    fn event(ev_id: i64, ev_txid: i64) -> Event {
        Event {
            ev_id,
            ev_time: Utc.with_ymd_and_hms(2026, 12, 4, 13, 18, 11).unwrap(),
            ev_txid,
            ev_retry: Some(3),
            ev_type: Some("orders".into()),
            ev_data: None,
            ev_extra1: None,
            ev_extra2: None,
            ev_extra3: None,
            ev_extra4: None,
        }
    }

    fn header(message: &Message, name: &str) -> Option<AMQPValue> {
        message.properties.headers().as_ref()?.inner().get(name).cloned()
    }

    #[test]
    fn dead_letter_integers_are_32_bit_when_they_fit() {
        let config = worker_config();
        let small = dead_letter_message(&config, "dead", None, &event(42, 1234), "why", None);
        assert_eq!(header(&small, "x-mikkoo-ev-id"), Some(AMQPValue::LongInt(42)));
        assert_eq!(header(&small, "x-mikkoo-ev-txid"), Some(AMQPValue::LongInt(1234)));
        assert_eq!(header(&small, "x-mikkoo-ev-retry"), Some(AMQPValue::LongInt(3)));

        let big = 1_i64 << 40;
        let large = dead_letter_message(&config, "dead", None, &event(big, big + 1), "why", None);
        assert_eq!(
            header(&large, "x-mikkoo-ev-id"),
            Some(AMQPValue::LongLongInt(big))
        );
        assert_eq!(
            header(&large, "x-mikkoo-ev-txid"),
            Some(AMQPValue::LongLongInt(big + 1))
        );
    }
}
