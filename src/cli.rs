//! The command line (SPEC §1).

use std::path::PathBuf;

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
    /// Print the helper SQL schema (install it with `mikkoo sql | psql`)
    Sql,
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
