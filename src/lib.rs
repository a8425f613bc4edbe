//! mikkoo relays events from PgQ queues in PostgreSQL to RabbitMQ, at least once.
//!
//! Each configured queue gets a [`worker`] with its own PostgreSQL session and AMQP
//! connection. A worker takes PgQ batches, maps every event to a message ([`mapping`],
//! the wire contract), publishes with pipelined publisher confirms, and finishes a batch
//! only when every event in it is settled: confirmed, handed to PgQ's retry queue, or
//! dead-lettered.
//!
//! # Layout
//!
//! - [`cli`]: command-line arguments.
//! - [`config`]: the configuration file, read once into a validated [`config::Config`].
//! - [`app`]: running the relay: signals, reload, ordered shutdown.
//! - [`supervisor`]: one worker per queue; restarts and reloads.
//! - [`worker`]: the batch loop of one queue, reconnects, backoff, graceful stop.
//! - [`mapping`]: pure event → message conversion (SPEC §2).
//! - [`event`]: a PgQ event row.
//! - [`pgq`]: the PgQ client over tokio-postgres, one method per PgQ function.
//! - [`pgconn`]: PostgreSQL URLs, libpq TLS modes, connecting.
//! - [`amqp`]: the RabbitMQ connection, publishing and naming the broker's answers.
//! - [`deadletter`]: the `mikkoo.dead_letter` table; listing and replaying it.
//! - [`audit`]: `mikkoo.audit`: confirmed by the relay, received by `audit consume`, reported.
//! - [`error`]: connection-ending failures and which link to reopen.
//! - [`backoff`]: exponential backoff with jitter for every retry of a server.
//! - [`stats`]: per-worker counters, gauges, histograms, readiness; the registry.
//! - [`metrics`]: metric names; Prometheus text and statsd lines.
//! - [`http`]: `/metrics`, `/livez`, `/readyz`, `/status`.
//! - [`statsd`]: the statsd reporter (UDP or TCP, flushed every second).
//! - [`status`]: the figures `mikkoo status` reads from PgQ.
//! - [`ticker`]: the built-in PgQ ticker and maintenance.
//! - [`logging`]: log levels and outputs from the `Logging` section.
//! - [`daemon`]: detaching, pidfile, dropping privileges.
//! - [`check`]: what `mikkoo check` prints and connects to.
//! - [`commands`]: the operator subcommands: `check`, `status`, `dead-letter`, `audit`.
//! - [`host`]: the host's FQDN.
//! - [`reporting`]: error reports to Sentry.
//! - [`schema`]: the helper SQL schema printed by `mikkoo sql`.

pub mod amqp;
pub mod app;
pub mod audit;
pub mod backoff;
pub mod check;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod deadletter;
pub mod error;
pub mod event;
pub mod host;
pub mod http;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod pgconn;
pub mod pgq;
pub mod reporting;
pub mod schema;
pub mod stats;
pub mod statsd;
pub mod status;
pub mod supervisor;
pub mod ticker;
pub mod worker;
