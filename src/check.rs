//! `mikkoo check`: what the configuration resolves to, and (with `--connect`) whether
//! every worker's PostgreSQL and RabbitMQ can be reached.
//!
//! Output never contains a password: URLs are shown redacted.

use std::fmt::Write as _;

use crate::amqp::Broker;
use crate::config::{Config, DeadLetterTarget, format_duration};
use crate::pgq::PgqSession;

/// A readable summary of the resolved configuration.
pub fn summary(config: &Config) -> String {
    let mut out = String::new();
    let workers = &config.application.workers;
    let _ = writeln!(
        out,
        "{}: configuration is valid ({} worker(s))",
        config.file.display(),
        workers.len()
    );
    for (queue, worker) in workers {
        let dead_letter = match &worker.dead_letter {
            DeadLetterTarget::Table => "table mikkoo.dead_letter".to_owned(),
            DeadLetterTarget::Discard => "discard".to_owned(),
            DeadLetterTarget::Exchange { exchange, .. } => format!("exchange {exchange:?}"),
        };
        let _ = writeln!(
            out,
            "  {queue}: {} -> {} (consumer {}, confirm {}, max_in_flight {}, fetch_size {}, \
             max_failures {}, retry_delay {}, wait_duration {}, dead letters to {dead_letter})",
            worker.postgres.redacted(),
            worker.rabbitmq.redacted(),
            worker.consumer_name,
            worker.confirm,
            worker.max_in_flight,
            worker.fetch_size,
            worker.max_failures,
            format_duration(worker.retry_delay),
            format_duration(worker.wait_duration),
        );
    }
    out
}

/// Connects to every worker's servers. Returns the report and whether all succeeded.
pub async fn connect_all(config: &Config) -> (String, bool) {
    let mut out = String::new();
    let mut all_ok = true;
    for (queue, worker) in &config.application.workers {
        match PgqSession::connect(&worker.postgres, queue, &worker.consumer_name).await {
            Ok(_) => {
                let _ = writeln!(
                    out,
                    "  {queue}: PostgreSQL at {} ok (pgq installed)",
                    worker.postgres.host_port()
                );
            }
            Err(error) => {
                all_ok = false;
                let _ = writeln!(
                    out,
                    "  {queue}: PostgreSQL at {} FAILED: {error}",
                    worker.postgres.host_port()
                );
            }
        }
        match Broker::connect(&worker.rabbitmq, queue, worker.confirm, None).await {
            Ok(broker) => {
                let _ = writeln!(out, "  {queue}: RabbitMQ at {} ok", broker.address());
                broker.close().await;
            }
            Err(error) => {
                all_ok = false;
                let hosts: Vec<String> = worker
                    .rabbitmq
                    .hosts
                    .iter()
                    .map(|host| format!("{host}:{}", worker.rabbitmq.port))
                    .collect();
                let _ = writeln!(out, "  {queue}: RabbitMQ at {} FAILED: {error}", hosts.join(", "));
            }
        }
    }
    (out, all_ok)
}
