//! The `mikkoo` binary: parse the command line, load the configuration, set up logging
//! and bind the HTTP address while the terminal is attached, detach (before any thread
//! exists), run, and turn the result into an exit status.
//!
//! Errors and warnings the operator must see are written with
//! [`logging::to_terminal`]: plain lines, or under `--log-format json` log objects,
//! since then every line written must be one (SPEC §11).

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::Level;

use mikkoo::audit::ConsumeLimits;
use mikkoo::cli::{AuditAction, Cli, Command, DeadLetterAction};
use mikkoo::commands::{self, CommandError, Finished};
use mikkoo::config::{Config, ConfigError, ConfigErrors, LogTarget};
use mikkoo::deadletter::Selection;
use mikkoo::logging::{self, LogFormat, LogOverrides, SetupError};
use mikkoo::{app, daemon, host, reporting, schema};

/// Exit status for usage and configuration errors.
const EXIT_CONFIG: u8 = 2;
/// Exit status for any other fatal error.
const EXIT_FATAL: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = log_overrides(&cli);
    match cli.command {
        Some(Command::Sql) => {
            print!("{}", schema::MIKKOO_SQL);
            ExitCode::SUCCESS
        }
        Some(Command::Check { connect }) => {
            let format = overrides.format();
            operate(&cli, overrides, move |config, _stop| async move {
                commands::check(&config, connect, format).await
            })
        }
        Some(Command::Status { json }) => operate(&cli, overrides, |config, _stop| async move {
            commands::status(&config, json).await
        }),
        Some(Command::DeadLetter { ref action }) => operate(&cli, overrides, |config, _stop| async move {
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
        Some(Command::Audit { ref action }) => operate(&cli, overrides, |config, stop| async move {
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
        None => run(&cli, overrides),
    }
}

/// `--log-level`, `--log-format` and `MIKKOO_LOG`.
fn log_overrides(cli: &Cli) -> LogOverrides {
    LogOverrides {
        level: cli.log_level.map(|level| level.filter()),
        filter: std::env::var("MIKKOO_LOG").ok().filter(|f| !f.trim().is_empty()),
        format: cli.log_format,
    }
}

fn load(cli: &Cli, format: LogFormat) -> Result<Config, ExitCode> {
    app::load_config(&cli.config).map_err(|errors| {
        report_config_errors(&errors, format);
        ExitCode::from(EXIT_CONFIG)
    })
}

fn report_config_errors(errors: &ConfigErrors, format: LogFormat) {
    match format {
        LogFormat::Text => eprintln!("{errors}"),
        LogFormat::Json => {
            for error in &errors.errors {
                let line = format!("configuration error in {}: {error}", errors.file.display());
                logging::to_terminal(format, Level::ERROR, &line);
            }
        }
    }
}

/// Reports why logging could not be set up: a `Logging` section problem as a
/// configuration error naming the file, a bad `MIKKOO_LOG` as a usage error.
fn logging_failed(error: SetupError, file: &Path, format: LogFormat) -> ExitCode {
    match error {
        SetupError::Config { key, message } => {
            let errors = ConfigErrors {
                file: file.to_owned(),
                errors: vec![ConfigError { path: key, message }],
            };
            report_config_errors(&errors, format);
            ExitCode::from(EXIT_CONFIG)
        }
        SetupError::Environment(_) => {
            logging::to_terminal(format, Level::ERROR, &error.to_string());
            ExitCode::from(EXIT_CONFIG)
        }
        SetupError::Install(_) => {
            logging::to_terminal(format, Level::ERROR, &error.to_string());
            ExitCode::from(EXIT_FATAL)
        }
    }
}

/// Runs an operator command: logs to stderr, loads the configuration, runs `command`
/// until it is done or SIGINT/SIGTERM, and maps its result to an exit status. Its
/// errors go to the terminal only: the command has no other log output.
fn operate<F, Fut>(cli: &Cli, overrides: LogOverrides, command: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Finished, CommandError>>,
{
    let format = overrides.format();
    if let Err(error) = logging::init_command(&overrides) {
        return logging_failed(error, &cli.config, format);
    }
    let config = match load(cli, format) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match current_thread_runtime() {
        Ok(runtime) => runtime,
        Err(message) => {
            logging::to_terminal(format, Level::ERROR, &message);
            return ExitCode::from(EXIT_FATAL);
        }
    };
    let stop = CancellationToken::new();
    let result = runtime.block_on(async {
        stop_on_signals(&stop);
        command(config, stop.clone()).await
    });
    let (message, code) = match result {
        Ok(Finished::Clean) => return ExitCode::SUCCESS,
        Ok(Finished::Findings) => return ExitCode::from(EXIT_FATAL),
        Err(CommandError::Usage(message)) => (message, EXIT_CONFIG),
        Err(CommandError::Failed(message)) => (message, EXIT_FATAL),
    };
    logging::to_terminal(format, Level::ERROR, &message);
    ExitCode::from(code)
}

/// Cancels `stop` on SIGINT or SIGTERM (inside the runtime).
fn stop_on_signals(stop: &CancellationToken) {
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
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))
}

fn run(cli: &Cli, overrides: LogOverrides) -> ExitCode {
    let format = overrides.format();
    let config = match load(cli, format) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Logging first, while the terminal is attached: a log file that cannot be opened
    // is reported there. Its file descriptors survive detaching.
    let log = match logging::init(&config.logging, overrides, cli.foreground) {
        Ok(log) => log,
        Err(error) => return logging_failed(error, &config.file, format),
    };
    let fatal = Fatal {
        format,
        log_on_stderr: log.writes_to_stderr(),
    };
    // The pidfile first: a second instance is told it is one, not that the HTTP
    // address is taken.
    let detachable = if cli.foreground {
        None
    } else {
        warn_if_log_discarded(&config, format);
        match daemon::prepare(&config.daemon) {
            Ok(detachable) => Some(detachable),
            Err(error) => return fatal.exit(&error.to_string()),
        }
    };
    // Bound before detaching too, so an address in use is reported on the terminal.
    let http = match app::bind_http(&config) {
        Ok(http) => http,
        Err(error) => return fatal.exit(&error.to_string()),
    };
    let _pidfile = match detachable {
        None => None,
        Some(detachable) => match detachable.detach() {
            Ok(pidfile) => pidfile,
            Err(error) => return fatal.exit(&error.to_string()),
        },
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    // After detaching: the Sentry client runs a thread of its own. Its DSN was checked
    // with the configuration.
    let _reporting = match reporting::init(config.application.sentry_dsn.as_ref()) {
        Ok(guard) => guard,
        Err(error) => return fatal.exit(&error.to_string()),
    };
    let origin = config.application.origin.clone().unwrap_or_else(host::fqdn);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config.file.display(), origin = %origin, "mikkoo starting");
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fatal.exit(&format!("cannot start the async runtime: {error}")),
    };
    match runtime.block_on(app::run(config, origin, Some(log), http)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fatal.exit(&error.to_string()),
    }
}

/// Warns on the terminal when the daemon's log lines would go nowhere: once detached,
/// stderr is /dev/null, and `debug_only` handlers are off in the background.
fn warn_if_log_discarded(config: &Config, format: LogFormat) {
    let discarded = config
        .logging
        .handlers
        .iter()
        .all(|h| h.debug_only || h.target == LogTarget::Stderr);
    if discarded {
        logging::to_terminal(
            format,
            Level::WARN,
            "Logging.handlers: no file or syslog handler; the daemon's log lines are discarded",
        );
    }
}

/// How the relay reports an error that ends it.
#[derive(Clone, Copy)]
struct Fatal {
    format: LogFormat,
    /// Whether the relay's log already writes to stderr.
    log_on_stderr: bool,
}

impl Fatal {
    /// Logs `message` (files, syslog, Sentry) and tells the terminal. In text format the
    /// plain `mikkoo: …` line is always written, as a last word below the log lines; in
    /// JSON only when the log does not reach stderr, so no line is written twice.
    fn exit(self, message: &str) -> ExitCode {
        tracing::error!("{message}");
        if self.format == LogFormat::Text || !self.log_on_stderr {
            logging::to_terminal(self.format, Level::ERROR, message);
        }
        ExitCode::from(EXIT_FATAL)
    }
}
