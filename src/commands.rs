//! The operator's subcommands besides running the relay: `check`, `status`,
//! `dead-letter list|replay` and `audit report|consume`. Each prints its result and
//! says how the process should exit.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Level;

use crate::amqp::Broker;
use crate::audit::{self, ConsumeLimits, Straggler};
use crate::config::{Config, MessageIdMode, WorkerConfig};
use crate::deadletter::{self, ListedLetter, Selection};
use crate::logging::{self, LogFormat};
use crate::mapping::MessageIdNamespace;
use crate::pgconn::PgTarget;
use crate::pgq::PgqSession;

/// How a command ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    /// Done, nothing to report (exit 0).
    Clean,
    /// Done, and what it found needs attention (exit 1): unreachable servers,
    /// stragglers in the audit.
    Findings,
}

/// Why a command could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The command line or configuration does not fit (exit 2).
    #[error("{0}")]
    Usage(String),
    /// Something failed (exit 1).
    #[error("{0}")]
    Failed(String),
}

fn failed(error: impl std::fmt::Display) -> CommandError {
    CommandError::Failed(error.to_string())
}

/// The configured worker of `queue`.
fn worker<'c>(config: &'c Config, queue: &str) -> Result<&'c WorkerConfig, CommandError> {
    config.application.workers.get(queue).ok_or_else(|| {
        CommandError::Usage(format!(
            "queue {queue:?} is not configured under Application.workers in {}",
            config.file.display()
        ))
    })
}

/// The databases of the chosen workers, each with the queues it holds.
fn databases<'c>(
    config: &'c Config,
    queue: Option<&str>,
) -> Result<BTreeMap<String, (&'c PgTarget, Vec<String>)>, CommandError> {
    let mut out: BTreeMap<String, (&PgTarget, Vec<String>)> = BTreeMap::new();
    let chosen: Vec<&WorkerConfig> = match queue {
        Some(queue) => vec![worker(config, queue)?],
        None => config.application.workers.values().collect(),
    };
    for worker in chosen {
        let key = format!("{}/{}", worker.postgres.host_port(), worker.postgres.dbname());
        out.entry(key)
            .or_insert_with(|| (&worker.postgres, Vec::new()))
            .1
            .push(worker.queue.clone());
    }
    Ok(out)
}

async fn session(worker: &WorkerConfig) -> Result<PgqSession, CommandError> {
    PgqSession::connect(&worker.postgres, &worker.queue, &worker.consumer_name)
        .await
        .map_err(failed)
}

/// `check`: the resolved configuration; with `connect`, every worker's servers. Its
/// warnings go to stderr in the log `format` (under JSON, every line is an object).
pub async fn check(config: &Config, connect: bool, format: LogFormat) -> Result<Finished, CommandError> {
    for warning in &config.warnings {
        logging::to_terminal(format, Level::WARN, warning);
    }
    print!("{}", crate::check::summary(config));
    if !connect {
        return Ok(Finished::Clean);
    }
    let (report, all_ok) = crate::check::connect_all(config).await;
    print!("{report}");
    if all_ok {
        Ok(Finished::Clean)
    } else {
        logging::to_terminal(
            format,
            Level::ERROR,
            "some servers could not be reached (see above)",
        );
        Ok(Finished::Findings)
    }
}

/// `status`: PgQ's figures for every configured queue, as a table or JSON.
pub async fn status(config: &Config, json: bool) -> Result<Finished, CommandError> {
    let statuses = crate::status::collect(config).await;
    if json {
        println!("{}", crate::status::json(&statuses));
    } else {
        print!("{}", crate::status::table(&statuses));
    }
    Ok(if statuses.iter().any(|s| s.error.is_some()) {
        Finished::Findings
    } else {
        Finished::Clean
    })
}

/// `dead-letter list`.
pub async fn dead_letter_list(
    config: &Config,
    queue: Option<&str>,
    json: bool,
) -> Result<Finished, CommandError> {
    let mut letters: Vec<ListedLetter> = Vec::new();
    for (target, queues) in databases(config, queue)?.into_values() {
        let (client, _connection) = target.connect("mikkoo dead-letter").await.map_err(failed)?;
        letters.extend(deadletter::list(&client, &queues).await.map_err(failed)?);
    }
    if json {
        println!("{}", serde_json::json!({ "dead_letters": letters }));
    } else {
        print!("{}", letters_table(&letters));
    }
    Ok(Finished::Clean)
}

fn letters_table(letters: &[ListedLetter]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6} {:<20} {:>8} {:>5} {:<25} {:<16} {:<16} {:<40} body",
        "id", "queue", "ev_id", "retry", "failed at", "exchange", "routing key", "reason"
    );
    for l in letters {
        let _ = writeln!(
            out,
            "{:>6} {:<20} {:>8} {:>5} {:<25} {:<16} {:<16} {:<40} {}",
            l.id,
            l.queue,
            l.ev_id,
            l.ev_retry.map_or_else(|| "-".to_owned(), |r| r.to_string()),
            l.failed_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            l.exchange.as_deref().unwrap_or(""),
            l.routing_key.as_deref().unwrap_or(""),
            l.reason,
            l.body_preview.as_deref().unwrap_or("").replace('\n', " "),
        );
    }
    let _ = writeln!(out, "{} dead letter(s)", letters.len());
    out
}

/// `dead-letter replay`.
pub async fn dead_letter_replay(
    config: &Config,
    queue: &str,
    selection: &Selection,
) -> Result<Finished, CommandError> {
    let worker = worker(config, queue)?;
    let mut session = session(worker).await?;
    let message_ids = match worker.message_id {
        MessageIdMode::Deterministic => Some(MessageIdNamespace::new(
            &session.system_identifier().await.map_err(failed)?,
            queue,
        )),
        MessageIdMode::None => None,
    };
    let (replayed, unchanged) = deadletter::replay(session.client_mut(), queue, selection, message_ids)
        .await
        .map_err(failed)?;
    println!("replayed {replayed} dead letter(s) into queue {queue}");
    if !unchanged.is_empty() {
        println!(
            "note: rows {unchanged:?} have an ev_extra3 that is not a JSON object; they were replayed as they \
             were and will be rejected again unless their producer's data is fixed"
        );
    }
    Ok(Finished::Clean)
}

/// `audit report`.
pub async fn audit_report(
    config: &Config,
    older_than: Duration,
    json: bool,
) -> Result<Finished, CommandError> {
    let mut unconfirmed: Vec<Straggler> = Vec::new();
    let mut unreceived: Vec<Straggler> = Vec::new();
    for (target, _) in databases(config, None)?.into_values() {
        let (client, _connection) = target.connect("mikkoo audit").await.map_err(failed)?;
        let installed: bool = client
            .query_one("SELECT to_regclass('mikkoo.audit') IS NOT NULL", &[])
            .await
            .map_err(failed)?
            .get(0);
        if !installed {
            return Err(CommandError::Failed(format!(
                "mikkoo.audit is not installed in {}; install the helper schema: mikkoo sql | psql",
                target.redacted()
            )));
        }
        let (more_unconfirmed, more_unreceived) =
            audit::stragglers(&client, older_than).await.map_err(failed)?;
        unconfirmed.extend(more_unconfirmed);
        unreceived.extend(more_unreceived);
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "unconfirmed": unconfirmed, "unreceived": unreceived })
        );
    } else {
        let age = crate::config::format_duration(older_than);
        print!(
            "{}",
            stragglers_table(&format!("not confirmed after {age}"), &unconfirmed)
        );
        print!(
            "{}",
            stragglers_table(&format!("confirmed, not received after {age}"), &unreceived)
        );
    }
    Ok(if unconfirmed.is_empty() && unreceived.is_empty() {
        Finished::Clean
    } else {
        Finished::Findings
    })
}

fn stragglers_table(title: &str, rows: &[Straggler]) -> String {
    let mut out = format!("{title}: {}\n", rows.len());
    for row in rows {
        let _ = writeln!(
            out,
            "  {}  queue {}  event {}  exchange {:?}  routing key {:?}  queued {}",
            row.message_id,
            row.queue,
            row.event_id,
            row.exchange.as_deref().unwrap_or(""),
            row.routing_key.as_deref().unwrap_or(""),
            row.published_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        );
    }
    out
}

/// A worker whose PostgreSQL and RabbitMQ every configured worker uses, so that
/// `audit consume` needs no `--worker` in the usual one-database, one-broker setup.
fn shared_servers(config: &Config) -> Result<&WorkerConfig, CommandError> {
    let mut workers = config.application.workers.values();
    let first = workers
        .next()
        .ok_or_else(|| CommandError::Usage("no workers are configured".into()))?;
    if workers.all(|other| other.postgres == first.postgres && other.rabbitmq == first.rabbitmq) {
        Ok(first)
    } else {
        Err(CommandError::Usage(
            "the workers use different servers; choose whose to use with --worker QUEUE".into(),
        ))
    }
}

/// `audit consume`: marks audit rows received as their messages arrive on `amqp_queue`,
/// using the RabbitMQ and PostgreSQL of `worker_queue`, or those every worker shares.
pub async fn audit_consume(
    config: &Config,
    amqp_queue: &str,
    worker_queue: Option<&str>,
    limits: ConsumeLimits,
    stop: &CancellationToken,
) -> Result<Finished, CommandError> {
    let worker = match worker_queue {
        Some(queue) => worker(config, queue)?,
        None => shared_servers(config)?,
    };
    let (client, _connection) = worker
        .postgres
        .connect("mikkoo audit consume")
        .await
        .map_err(failed)?;
    let broker = Broker::connect(&worker.rabbitmq, &format!("audit {amqp_queue}"), false, None)
        .await
        .map_err(failed)?;
    let consumer = broker.consume(amqp_queue, 100).await.map_err(failed)?;
    let summary = audit::consume(&client, consumer, limits, stop)
        .await
        .map_err(failed)?;
    broker.close().await;
    println!(
        "consumed {} message(s) from {amqp_queue}: {} audit row(s) marked received, {} without a waiting audit row",
        summary.messages, summary.marked, summary.unmatched
    );
    Ok(Finished::Clean)
}
