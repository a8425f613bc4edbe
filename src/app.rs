//! Running the relay: start the workers, react to signals, stop in order.
//!
//! | signal | effect |
//! |---|---|
//! | SIGTERM, SIGINT | graceful stop: each worker settles and finishes its open batch within `shutdown_timeout` |
//! | second SIGINT | stop at once (open batches stay open and are relayed again later) |
//! | SIGHUP | reload the configuration file; an invalid file changes nothing |
//! | SIGUSR1 | log one status line per worker |
//!
//! What can fail at start is checked before the process detaches, while the operator's
//! terminal is attached: [`load_config`] (the file, and the Sentry DSN) and
//! [`bind_http`] (the `/metrics` address); [`run`] takes the bound socket.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigErrors};
use crate::logging::LogHandle;
use crate::stats::Registry;
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
    /// The HTTP endpoints could not listen.
    #[error("cannot listen on {address} (Application.http.listen): {source}")]
    Listen {
        /// The configured address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the configuration file, with the checks the config module cannot make itself
/// (the Sentry DSN needs the `sentry` feature): at start and on SIGHUP alike, so a
/// reload never accepts a file the next start would refuse.
pub fn load_config(path: &Path) -> Result<Config, ConfigErrors> {
    let config = Config::load(path)?;
    crate::reporting::check_dsn(config.application.sentry_dsn.as_ref()).map_err(|error| ConfigErrors {
        file: path.to_owned(),
        errors: vec![error],
    })?;
    Ok(config)
}

/// The `Application.http.listen` socket, bound and waiting for the runtime.
#[derive(Debug)]
pub struct HttpListener {
    address: SocketAddr,
    socket: std::net::TcpListener,
}

/// Binds `Application.http.listen`, if configured. Called before detaching, so an
/// address in use is reported on the terminal rather than by a daemon that dies unseen
/// (and a port below 1024 can be bound before dropping to `Daemon.user`).
pub fn bind_http(config: &Config) -> Result<Option<HttpListener>, RunError> {
    let Some(http) = &config.application.http else {
        return Ok(None);
    };
    let listen_error = |source| RunError::Listen {
        address: http.listen,
        source,
    };
    let socket = std::net::TcpListener::bind(http.listen).map_err(listen_error)?;
    // tokio requires a non-blocking socket.
    socket.set_nonblocking(true).map_err(listen_error)?;
    Ok(Some(HttpListener {
        address: http.listen,
        socket,
    }))
}

/// Serves the HTTP endpoints on `listener` until `stop`.
fn start_http(
    listener: HttpListener,
    registry: &Arc<Registry>,
    stop: &CancellationToken,
) -> Result<JoinHandle<()>, RunError> {
    let socket = TcpListener::from_std(listener.socket).map_err(|source| RunError::Listen {
        address: listener.address,
        source,
    })?;
    Ok(tokio::spawn(crate::http::serve(
        socket,
        Arc::clone(registry),
        stop.clone(),
    )))
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

/// Runs the relay until a stop signal, then stops it gracefully. `http` is the socket
/// [`bind_http`] bound for `Application.http`; the HTTP endpoints keep it until the
/// process exits (a changed `http` on SIGHUP takes effect at the next restart).
pub async fn run(
    config: Config,
    origin: String,
    log: Option<LogHandle>,
    http: Option<HttpListener>,
) -> Result<(), RunError> {
    let mut signals = Signals::install()?;
    let path = config.file.clone();
    let registry = Arc::new(Registry::default());
    let reporting = CancellationToken::new();
    let mut reporters = Vec::new();
    if let Some(listener) = http {
        reporters.push(start_http(listener, &registry, &reporting)?);
    }
    if config.application.statsd.enabled {
        let statsd = config.application.statsd.clone();
        reporters.push(tokio::spawn(crate::statsd::run(
            statsd,
            Arc::clone(&registry),
            reporting.clone(),
        )));
    }
    let mut running = config;
    let mut supervisor = Supervisor::start(&running, origin, registry);
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
            _ = signals.hangup.recv() => {
                if let Some(config) = reload(&path, &running, &mut supervisor, log.as_ref()) {
                    running = config;
                }
            }
            _ = signals.user1.recv() => log_status(&supervisor),
        }
    }
    let stopped = tokio::select! {
        _ = supervisor.shutdown() => Ok(()),
        _ = signals.interrupt.recv() => Err(RunError::Interrupted),
    };
    reporting.cancel();
    for reporter in reporters {
        let _ = reporter.await;
    }
    if stopped.is_ok() {
        tracing::info!("stopped");
    }
    stopped
}

/// Applies the configuration file again; returns it when it was valid.
fn reload(
    path: &Path,
    running: &Config,
    supervisor: &mut Supervisor,
    log: Option<&LogHandle>,
) -> Option<Config> {
    tracing::info!(file = %path.display(), "SIGHUP: reloading the configuration");
    let config = match load_config(path) {
        Ok(config) => config,
        Err(errors) => {
            for error in &errors.errors {
                tracing::error!(file = %path.display(), error = %error, "configuration reload refused; running unchanged");
            }
            return None;
        }
    };
    let needs_restart = [
        (
            "Application.http",
            running.application.http != config.application.http,
        ),
        (
            "Application.statsd",
            running.application.statsd != config.application.statsd,
        ),
        (
            "Application.sentry_dsn",
            running.application.sentry_dsn != config.application.sentry_dsn,
        ),
        (
            "Application.origin",
            running.application.origin != config.application.origin,
        ),
        ("Daemon", running.daemon != config.daemon),
    ];
    for (section, changed) in needs_restart {
        if changed {
            tracing::warn!(
                section,
                "changed on reload; this section takes effect at the next restart"
            );
        }
    }
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(log) = log
        && let Err(error) = log.reload(&config.logging)
    {
        tracing::error!(%error, "log levels not changed");
    }
    supervisor.apply(&config);
    Some(config)
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
