//! The `mikkoo` binary: parse the command line, load the configuration, detach (before
//! any thread exists), set up logging, run, and turn the result into an exit status.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use clap::Parser;

use mikkoo::audit::ConsumeLimits;
use mikkoo::cli::{AuditAction, Cli, Command, DeadLetterAction};
use mikkoo::commands::{self, CommandError, Finished};
use mikkoo::config::Config;
use mikkoo::deadletter::Selection;
use mikkoo::logging::{self, LogOverrides};
use mikkoo::{app, daemon, host, reporting, schema};

/// Exit status for usage and configuration errors.
const EXIT_CONFIG: u8 = 2;
/// Exit status for any other fatal error.
const EXIT_FATAL: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Sql) => {
            print!("{}", schema::MIKKOO_SQL);
            ExitCode::SUCCESS
        }
        Some(Command::Check { connect }) => operate(&cli, |config, _stop| async move {
            commands::check(&config, connect).await
        }),
        Some(Command::Status { json }) => operate(&cli, |config, _stop| async move {
            commands::status(&config, json).await
        }),
        Some(Command::DeadLetter { ref action }) => operate(&cli, |config, _stop| async move {
            match action {
                DeadLetterAction::List { queue, json } => {
                    commands::dead_letter_list(&config, queue.as_deref(), *json).await
                }
                DeadLetterAction::Replay { queue, ids, all } => {
                    let selection = if *all {
                        Selection::All
                    } else {
                        Selection::Ids(ids.clone())
                    };
                    commands::dead_letter_replay(&config, queue, &selection).await
                }
            }
        }),
        Some(Command::Audit { ref action }) => operate(&cli, |config, stop| async move {
            match action {
                AuditAction::Report { older_than, json } => {
                    commands::audit_report(&config, *older_than, *json).await
                }
                AuditAction::Consume {
                    amqp_queue,
                    worker,
                    max_messages,
                    idle_exit,
                } => {
                    let limits = ConsumeLimits {
                        max_messages: *max_messages,
                        idle_exit: *idle_exit,
                    };
                    commands::audit_consume(&config, amqp_queue, worker.as_deref(), limits, &stop).await
                }
            }
        }),
        None => run(&cli),
    }
}

fn load(cli: &Cli) -> Result<Config, ExitCode> {
    match Config::load(&cli.config) {
        Ok(config) => Ok(config),
        Err(errors) => {
            eprintln!("{errors}");
            Err(ExitCode::from(EXIT_CONFIG))
        }
    }
}

/// Runs an operator command: loads the configuration, runs `command` until it is done
/// or SIGINT/SIGTERM, and maps its result to an exit status.
fn operate<F, Fut>(cli: &Cli, command: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Finished, CommandError>>,
{
    let config = match load(cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match current_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let stop = CancellationToken::new();
    let result = runtime.block_on(async {
        let on_signal = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            on_signal.cancel();
        });
        if let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            let on_terminate = stop.clone();
            tokio::spawn(async move {
                terminate.recv().await;
                on_terminate.cancel();
            });
        }
        command(config, stop.clone()).await
    });
    match result {
        Ok(Finished::Clean) => ExitCode::SUCCESS,
        Ok(Finished::Findings) => ExitCode::from(EXIT_FATAL),
        Err(CommandError::Usage(message)) => {
            eprintln!("mikkoo: {message}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(CommandError::Failed(message)) => fatal(&message),
    }
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| fatal(&format!("cannot start the async runtime: {error}")))
}

fn run(cli: &Cli) -> ExitCode {
    let config = match load(cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let overrides = LogOverrides {
        level: cli.log_level.map(|level| level.filter()),
        filter: std::env::var("MIKKOO_LOG").ok().filter(|f| !f.trim().is_empty()),
        format: cli.log_format,
    };
    // Logging first, while the terminal is attached: a log file that cannot be opened
    // is reported there. Its file descriptors survive detaching.
    let log = match logging::init(&config.logging, overrides, cli.foreground) {
        Ok(log) => log,
        Err(error) => {
            eprintln!("mikkoo: cannot set up logging: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _pidfile = if cli.foreground {
        None
    } else {
        if config
            .logging
            .handlers
            .iter()
            .all(|h| h.debug_only || h.target == mikkoo::config::LogTarget::Stderr)
        {
            eprintln!(
                "mikkoo: warning: no file or syslog handler in Logging; the daemon's log lines are discarded"
            );
        }
        match daemon::detach(&config.daemon) {
            Ok(pidfile) => pidfile,
            Err(error) => return fatal(&error.to_string()),
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    // After detaching: the Sentry client runs a thread of its own.
    let _reporting = match reporting::init(config.application.sentry_dsn.as_ref()) {
        Ok(guard) => guard,
        Err(error) => return fatal(&error),
    };
    let origin = config.application.origin.clone().unwrap_or_else(host::fqdn);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config.file.display(), origin = %origin, "mikkoo starting");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fatal(&format!("cannot start the async runtime: {error}")),
    };
    match runtime.block_on(app::run(config, origin, Some(log))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fatal(&error.to_string()),
    }
}

fn fatal(message: &str) -> ExitCode {
    tracing::error!("{message}");
    eprintln!("mikkoo: {message}");
    ExitCode::from(EXIT_FATAL)
}
