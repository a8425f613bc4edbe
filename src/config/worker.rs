//! `Application.workers.<queue>`: the settings of one worker, with their defaults.

use std::time::Duration;

use super::rabbitmq::{RabbitmqConfig, read_rabbitmq, read_rabbitmq_url};
use super::reader::{Diagnostics, Node, join};
use crate::pgconn::PgTarget;

/// Default `max_in_flight`: unconfirmed messages allowed on the channel at once.
/// Measured with `scripts/bench --batch-sizes 10000 --confirm true --worker
/// 'max_in_flight: N'` (README "Performance"): 50 reached 0.67 of the bare publisher's
/// ceiling, 200 0.82, 1000 0.93, 5000 0.92. Beyond 1000 the broker, not the window,
/// bounds throughput, while the window bounds what is published again after a channel
/// failure.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1000;

/// Default `fetch_size`: events read from PostgreSQL per round trip. Measured like
/// `max_in_flight`: 100 reached 0.88 of the ceiling, 500 0.96, 1000 1.01, 5000 0.92;
/// peak RSS on a 200 000-event batch grew from 22 MiB (100) to 28 MiB (1000) and
/// 46 MiB (5000). 1000 amortises the round trip and keeps memory flat whatever the
/// batch size.
pub const DEFAULT_FETCH_SIZE: usize = 1000;

/// Default `confirm_timeout`. A healthy broker confirms in milliseconds even when it
/// fsyncs; a minute of silence means a connection that is dead in a way TCP has not
/// noticed yet (heartbeats take up to twice `heartbeat_interval`).
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings of the worker that relays one PgQ queue.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerConfig {
    /// The PgQ queue name (the key under `Application.workers`).
    pub queue: String,
    /// Where the queue lives.
    pub postgres: PgTarget,
    /// Where the messages go.
    pub rabbitmq: RabbitmqConfig,
    /// PgQ consumer name.
    pub consumer_name: String,
    /// Publisher confirms.
    pub confirm: bool,
    /// Most unconfirmed messages on the channel at once.
    pub max_in_flight: usize,
    /// How long a publisher confirm may take before the connection is treated as
    /// broken and the unconfirmed events are published again on a new one.
    pub confirm_timeout: Duration,
    /// Publish with the mandatory flag, so unroutable messages come back as failures.
    pub mandatory: bool,
    /// Default delivery mode (1 transient, 2 persistent).
    pub delivery_mode: u8,
    /// Default `app_id` property.
    pub app_id: String,
    /// How `message_id` is set when the event does not set it.
    pub message_id: MessageIdMode,
    /// Failures before an event is dead-lettered instead of retried.
    pub max_failures: i32,
    /// Delay handed to `pgq.event_retry`.
    pub retry_delay: Duration,
    /// Sleep after `next_batch` found nothing.
    pub wait_duration: Duration,
    /// `next_batch_custom` parameters.
    pub batch_window: BatchWindow,
    /// Events read from PostgreSQL per round trip.
    pub fetch_size: usize,
    /// Where events go that cannot be delivered.
    pub dead_letter: DeadLetterTarget,
    /// Hold an advisory lock so only one relay consumes this queue+consumer.
    pub exclusive: bool,
    /// Unregister the PgQ consumer on clean shutdown.
    pub unregister: bool,
    /// How long a graceful stop may take to settle the open batch.
    pub shutdown_timeout: Duration,
    /// Mark `mikkoo.audit` rows confirmed.
    pub audit: bool,
}

/// How the automatic `message_id` property is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageIdMode {
    /// A UUID derived from the database, the queue and `ev_id`: stable across retries.
    Deterministic,
    /// No automatic `message_id`.
    None,
}

/// `min_count` / `min_interval` / `min_lag`, passed to `pgq.next_batch_custom`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchWindow {
    /// Wait until a batch holds at least this many events.
    pub min_count: Option<i32>,
    /// Wait until a batch covers at least this much time.
    pub min_interval: Option<Duration>,
    /// Only take events older than this.
    pub min_lag: Option<Duration>,
}

impl BatchWindow {
    /// True when plain `pgq.next_batch` semantics apply.
    pub fn is_default(&self) -> bool {
        *self == BatchWindow::default()
    }
}

/// Where undeliverable events go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeadLetterTarget {
    /// Rows in `mikkoo.dead_letter`, written with the batch's `finish_batch`.
    Table,
    /// Logged and dropped (the Python relay's behaviour).
    Discard,
    /// Published to an exchange with the failure in headers.
    Exchange {
        /// Exchange to publish dead letters to.
        exchange: String,
        /// Routing key; `None` keeps the event's own routing key.
        routing_key: Option<String>,
    },
}

pub(crate) fn read_worker(queue: &str, node: Node<'_>, diag: &mut Diagnostics) -> Option<WorkerConfig> {
    let mut table = node.table(diag)?;
    let path = table.path().to_owned();
    if queue.trim().is_empty() {
        diag.error(&path, "the PgQ queue name must not be empty");
    }

    let postgres = match table.get_aliased("postgres_url", "postgresql_url", diag) {
        Some(entry) => {
            let url = entry.node().non_empty_string(diag);
            url.and_then(|url| match PgTarget::parse(&url) {
                Ok(target) => Some(target),
                Err(message) => {
                    diag.error(&entry.path, message);
                    None
                }
            })
        }
        None => {
            diag.error(
                &join(&path, "postgres_url"),
                "missing: the PostgreSQL URL of the database holding the queue",
            );
            None
        }
    };

    let mapping = table.get("rabbitmq");
    let url = table.get("rabbitmq_url");
    let rabbitmq = match (mapping, url) {
        (Some(mapping), url) => {
            if let Some(url) = url {
                diag.warn(format!(
                    "{path}: both `rabbitmq` and `rabbitmq_url` are set; using `rabbitmq`, ignoring `{}`",
                    url.path
                ));
            }
            read_rabbitmq(mapping.node(), diag)
        }
        (None, Some(url)) => read_rabbitmq_url(url.node(), diag),
        (None, None) => Some(RabbitmqConfig::default()),
    };

    let consumer_name = table
        .get("consumer_name")
        .and_then(|e| e.node().non_empty_string(diag))
        .unwrap_or_else(|| "mikkoo".to_owned());
    let confirm = flag(&mut table, "confirm", true, diag);
    if !confirm {
        diag.warn(format!(
            "{path}.confirm is false: messages count as delivered once written to the socket, \
             so a broker failure can lose them (at-most-once), and neither unroutable messages \
             nor one that makes the broker close the channel can be told apart"
        ));
    }
    let max_in_flight = table
        .get("max_in_flight")
        .and_then(|e| e.node().integer(diag, 1, 65_535))
        .map_or(DEFAULT_MAX_IN_FLIGHT, |n| n as usize);
    let confirm_timeout = table
        .get("confirm_timeout")
        .and_then(|e| e.node().positive_duration(diag))
        .unwrap_or(DEFAULT_CONFIRM_TIMEOUT);
    let mandatory = flag(&mut table, "mandatory", true, diag);
    let delivery_mode = table
        .get("delivery_mode")
        .and_then(|e| e.node().integer(diag, 1, 2))
        .map_or(2, |n| n as u8);
    let app_id = table
        .get("app_id")
        .and_then(|e| short_string(e.node(), diag))
        .unwrap_or_else(|| format!("mikkoo/{}", env!("CARGO_PKG_VERSION")));
    let message_id = read_message_id_mode(&mut table, diag);
    let max_failures = table
        .get("max_failures")
        .and_then(|e| e.node().integer(diag, 0, i64::from(i32::MAX)))
        .map_or(10, |n| n as i32);
    let retry_delay = table
        .get_aliased("retry_delay", "retry_interval", diag)
        .and_then(|e| e.node().duration(diag))
        .unwrap_or(Duration::from_secs(10));
    let wait_duration = table
        .get("wait_duration")
        .and_then(|e| e.node().duration(diag))
        .unwrap_or(Duration::from_secs(1));
    let batch_window = BatchWindow {
        min_count: table
            .get("min_count")
            .and_then(|e| e.node().integer(diag, 1, i64::from(i32::MAX)))
            .map(|n| n as i32),
        min_interval: table.get("min_interval").and_then(|e| e.node().duration(diag)),
        min_lag: table.get("min_lag").and_then(|e| e.node().duration(diag)),
    };
    let fetch_size = table
        .get("fetch_size")
        .and_then(|e| e.node().integer(diag, 1, 1_000_000))
        .map_or(DEFAULT_FETCH_SIZE, |n| n as usize);
    let dead_letter = match table.get("dead_letter") {
        Some(entry) => read_dead_letter(entry.node(), diag),
        None => Some(DeadLetterTarget::Table),
    };
    let exclusive = flag(&mut table, "exclusive", true, diag);
    let unregister = flag(&mut table, "unregister", false, diag);
    if unregister {
        diag.warn(format!(
            "{path}.unregister is true: on a clean stop the PgQ consumer is unregistered, and every \
             event inserted while the relay is down will be skipped"
        ));
    }
    let shutdown_timeout = table
        .get("shutdown_timeout")
        .and_then(|e| e.node().duration(diag))
        .unwrap_or(Duration::from_secs(30));
    let audit = flag(&mut table, "audit", false, diag);
    // The Python relay forked `processes` workers per queue; one async worker per queue
    // replaces them (PgQ hands a consumer one batch at a time anyway).
    table.ignore("processes");
    table.finish(diag);

    Some(WorkerConfig {
        queue: queue.to_owned(),
        postgres: postgres?,
        rabbitmq: rabbitmq?,
        consumer_name,
        confirm,
        max_in_flight,
        confirm_timeout,
        mandatory,
        delivery_mode,
        app_id,
        message_id,
        max_failures,
        retry_delay,
        wait_duration,
        batch_window,
        fetch_size,
        dead_letter: dead_letter?,
        exclusive,
        unregister,
        shutdown_timeout,
        audit,
    })
}

fn flag(table: &mut super::reader::Table<'_>, key: &str, default: bool, diag: &mut Diagnostics) -> bool {
    table
        .get(key)
        .and_then(|e| e.node().bool(diag))
        .unwrap_or(default)
}

/// A string that must fit an AMQP short string (255 bytes).
pub(crate) fn short_string(node: Node<'_>, diag: &mut Diagnostics) -> Option<String> {
    let value = node.string(diag)?;
    if value.len() > 255 {
        diag.error(
            node.path,
            format!("must be at most 255 bytes, found {}", value.len()),
        );
        return None;
    }
    Some(value)
}

fn read_message_id_mode(table: &mut super::reader::Table<'_>, diag: &mut Diagnostics) -> MessageIdMode {
    let Some(entry) = table.get("message_id") else {
        return MessageIdMode::Deterministic;
    };
    match entry
        .node()
        .string(diag)
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("deterministic") => MessageIdMode::Deterministic,
        Some("none") => MessageIdMode::None,
        Some(other) => {
            diag.error(
                &entry.path,
                format!("expected deterministic or none, found {other:?}"),
            );
            MessageIdMode::Deterministic
        }
        None => MessageIdMode::Deterministic,
    }
}

fn read_dead_letter(node: Node<'_>, diag: &mut Diagnostics) -> Option<DeadLetterTarget> {
    if let serde_json::Value::Object(_) = node.value {
        let mut table = node.table(diag)?;
        let exchange = match table.get("exchange") {
            Some(entry) => short_string(entry.node(), diag),
            None => {
                diag.error(
                    &join(node.path, "exchange"),
                    "missing: the exchange to publish dead letters to",
                );
                None
            }
        };
        let routing_key = table
            .get("routing_key")
            .and_then(|e| short_string(e.node(), diag));
        table.finish(diag);
        return Some(DeadLetterTarget::Exchange {
            exchange: exchange?,
            routing_key,
        });
    }
    match node.string(diag)?.to_ascii_lowercase().as_str() {
        "table" => Some(DeadLetterTarget::Table),
        "discard" => Some(DeadLetterTarget::Discard),
        other => {
            diag.error(
                node.path,
                format!("expected table, discard or {{exchange: NAME, routing_key: KEY}}, found {other:?}"),
            );
            None
        }
    }
}
