//! The command line (SPEC §1).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::logging::LogFormat;

/// Mikkoo is a PgQ to RabbitMQ Relay
///
/// Without a subcommand, runs the relay: it detaches into the background unless
/// -f/--foreground is given.
#[derive(Debug, Parser)]
#[command(name = "mikkoo", version, about, long_about)]
pub struct Cli {
    /// Configuration file (YAML; JSON when the name ends in .json)
    #[arg(short, long, global = true, value_name = "CONFIG", default_value = crate::config::DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,

    /// Run in the foreground and log to stderr
    #[arg(short, long)]
    pub foreground: bool,

    /// Level of mikkoo's own log lines (overrides the Logging section)
    #[arg(long, global = true, value_enum, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,

    /// Log line format
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// What to do instead of running the relay
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration; with --connect also reach PostgreSQL and RabbitMQ
    Check {
        /// Also connect to every worker's PostgreSQL and RabbitMQ
        #[arg(long)]
        connect: bool,
    },
    /// Per queue, from PostgreSQL: consumer registered?, lag, last seen, pending
    /// events, open batch, ticker lag, dead letters
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// List or replay dead letters (mikkoo.dead_letter)
    DeadLetter {
        /// What to do
        #[command(subcommand)]
        action: DeadLetterAction,
    },
    /// Follow audited events: report stragglers, or mark them received from a queue
    Audit {
        /// What to do
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Print the helper SQL schema (install it with `mikkoo sql | psql`)
    Sql,
}

/// `mikkoo dead-letter ...`.
#[derive(Debug, Subcommand)]
pub enum DeadLetterAction {
    /// Show dead letters: reason, times, exchange, routing key, a body preview
    List {
        /// Only this queue
        #[arg(long)]
        queue: Option<String>,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back into their PgQ queue (keeping their message ids) and
    /// delete them, in one transaction
    #[command(group(clap::ArgGroup::new("which").required(true).args(["ids", "all"])))]
    Replay {
        /// The queue whose dead letters to replay
        #[arg(long)]
        queue: String,
        /// Row ids (as `list` shows them); repeatable
        #[arg(long = "id", value_name = "N", num_args = 1..)]
        ids: Vec<i64>,
        /// Every dead letter of the queue
        #[arg(long)]
        all: bool,
    },
}

/// `mikkoo audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditAction {
    /// List audit rows not confirmed, or confirmed but not received, after an age;
    /// exits 1 when there are any
    Report {
        /// Only rows queued longer ago than this
        #[arg(long, default_value = "5m", value_parser = crate::config::parse_duration_arg)]
        older_than: Duration,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Consume a RabbitMQ queue and mark each message's audit row received (acking it
    /// only after the row is updated)
    Consume {
        /// The RabbitMQ queue to consume
        #[arg(long, value_name = "NAME")]
        amqp_queue: String,
        /// Whose RabbitMQ and PostgreSQL to use (needed when workers use different servers)
        #[arg(long, value_name = "QUEUE")]
        worker: Option<String>,
        /// Stop after this many messages
        #[arg(long, value_name = "N")]
        max_messages: Option<u64>,
        /// Stop when no message arrives for this long
        #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration_arg)]
        idle_exit: Option<Duration>,
    },
}

/// `--log-level` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warn,
    /// What an operator needs (the default).
    Info,
    /// Details for diagnosing problems.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// As a tracing filter.
    pub fn filter(self) -> tracing::level_filters::LevelFilter {
        use tracing::level_filters::LevelFilter;
        match self {
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Trace => LevelFilter::TRACE,
        }
    }
}
