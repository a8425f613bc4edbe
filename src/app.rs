//! Running the relay: start the workers, react to signals, stop in order.
//!
//! | signal | effect |
//! |---|---|
//! | SIGTERM, SIGINT | graceful stop: each worker settles and finishes its open batch within `shutdown_timeout` |
//! | second SIGINT | stop at once (open batches stay open and are relayed again later) |
//! | SIGHUP | reload the configuration file; an invalid file changes nothing |
//! | SIGUSR1 | log one status line per worker |

use std::path::Path;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::config::Config;
use crate::logging::LogHandle;
use crate::supervisor::Supervisor;

/// Why the relay stopped other than cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// A second SIGINT asked to stop without waiting.
    #[error("stopped at once on a second SIGINT; open batches will be relayed again")]
    Interrupted,
}

/// The signals the relay reacts to.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
    user1: Signal,
}

impl Signals {
    fn install() -> Result<Signals, RunError> {
        let install = |kind| signal(kind).map_err(RunError::Signals);
        Ok(Signals {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
            user1: install(SignalKind::user_defined1())?,
        })
    }
}

/// Runs the relay until a stop signal, then stops it gracefully.
pub async fn run(config: Config, origin: String, log: Option<LogHandle>) -> Result<(), RunError> {
    let mut signals = Signals::install()?;
    let path = config.file.clone();
    let mut supervisor = Supervisor::start(&config, origin);
    loop {
        tokio::select! {
            _ = signals.terminate.recv() => {
                tracing::info!("SIGTERM: stopping gracefully");
                break;
            }
            _ = signals.interrupt.recv() => {
                tracing::info!("SIGINT: stopping gracefully (send SIGINT again to stop at once)");
                break;
            }
            _ = signals.hangup.recv() => reload(&path, &mut supervisor, log.as_ref()),
            _ = signals.user1.recv() => log_status(&supervisor),
        }
    }
    tokio::select! {
        _ = supervisor.shutdown() => {
            tracing::info!("stopped");
            Ok(())
        }
        _ = signals.interrupt.recv() => Err(RunError::Interrupted),
    }
}

fn reload(path: &Path, supervisor: &mut Supervisor, log: Option<&LogHandle>) {
    tracing::info!(file = %path.display(), "SIGHUP: reloading the configuration");
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            for error in &errors.errors {
                tracing::error!(file = %path.display(), error = %error, "configuration reload refused; running unchanged");
            }
            return;
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(log) = log
        && let Err(error) = log.reload(&config.logging)
    {
        tracing::error!(%error, "log levels not changed");
    }
    supervisor.apply(&config);
}

fn log_status(supervisor: &Supervisor) {
    for stats in supervisor.stats() {
        tracing::info!(
            queue = %stats.queue,
            state = stats.state().name(),
            batch = stats.current_batch(),
            in_flight = stats.in_flight(),
            processed = stats.processed.get(),
            failed = stats.failed.get(),
            retried = stats.retried.get(),
            dead_lettered = stats.dead_lettered.get(),
            batches = stats.batches.get(),
            since_progress = ?stats.since_progress(),
            "status (SIGUSR1)"
        );
    }
}
