//! Log output: levels from the `Logging` section (or `--log-level` / `MIKKOO_LOG`), lines
//! to stderr, files and syslog, as text or one JSON object per line.
//!
//! Python logger names in the `Logging` section map to the Rust modules doing the same
//! job: `mikkoo` → `mikkoo`, `pika` → `lapin` and `amq_protocol`, `queries` / `psycopg`
//! → `tokio_postgres`; other names are ignored. The level filter can be replaced at run
//! time ([`LogHandle::reload`]) so SIGHUP applies level changes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Layered;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

/// The registry with the reloadable level filter; output layers sit on top of it.
type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// One output of log lines.
type Output = Box<dyn Layer<Filtered> + Send + Sync>;

use crate::config::{LogHandler, LogTarget, LoggingConfig};

/// Line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Overrides from the command line and environment.
#[derive(Clone, Debug, Default)]
pub struct LogOverrides {
    /// `--log-level`: the level for mikkoo's own lines (dependencies stay at `warn`).
    pub level: Option<LevelFilter>,
    /// `MIKKOO_LOG`: a full filter such as `mikkoo=debug,lapin=info`.
    pub filter: Option<String>,
    /// `--log-format`.
    pub format: Option<LogFormat>,
}

/// Changes the level filter of a running process.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    overrides: LogOverrides,
}

impl LogHandle {
    /// Applies the levels of a reloaded `Logging` section (command-line and environment
    /// overrides still win). Outputs do not change until restart.
    pub fn reload(&self, logging: &LoggingConfig) -> Result<(), String> {
        let filter = build_filter(logging, &self.overrides)?;
        self.filter.reload(filter).map_err(|error| error.to_string())
    }
}

/// The filter directives the `Logging` section asks for.
pub fn directives(logging: &LoggingConfig) -> String {
    let root = logging.root_level.unwrap_or(LevelFilter::WARN);
    let mut parts = vec![level_name(root).to_owned()];
    let mut mikkoo_set = false;
    for (name, level) in &logging.loggers {
        for target in rust_targets(name) {
            mikkoo_set |= target == "mikkoo";
            parts.push(format!("{target}={}", level_name(*level)));
        }
    }
    if logging.root_level.is_none() {
        if !mikkoo_set {
            parts.push("mikkoo=info".to_owned());
        }
        // lapin logs a returned message with its body at WARN and every channel error at
        // ERROR; mikkoo reports both itself, with the event id and without the payload.
        if !logging.loggers.contains_key("pika") {
            parts.push("lapin=off".to_owned());
        }
    }
    parts.join(",")
}

/// Rust module paths standing for a Python logger name.
fn rust_targets(python_name: &str) -> Vec<String> {
    match python_name {
        "pika" => vec!["lapin".into(), "amq_protocol".into()],
        "queries" | "psycopg" | "psycopg2" => vec!["tokio_postgres".into()],
        name if name == "mikkoo" || name.starts_with("mikkoo.") => vec![name.replace('.', "::")],
        _ => Vec::new(),
    }
}

fn level_name(level: LevelFilter) -> &'static str {
    match level {
        LevelFilter::OFF => "off",
        LevelFilter::ERROR => "error",
        LevelFilter::WARN => "warn",
        LevelFilter::INFO => "info",
        LevelFilter::DEBUG => "debug",
        _ => "trace",
    }
}

fn build_filter(logging: &LoggingConfig, overrides: &LogOverrides) -> Result<EnvFilter, String> {
    let directives = match (&overrides.filter, overrides.level) {
        (Some(filter), _) => filter.clone(),
        (None, Some(level)) => format!("warn,mikkoo={}", level_name(level)),
        (None, None) => directives(logging),
    };
    EnvFilter::builder()
        .parse(&directives)
        .map_err(|error| format!("invalid log filter {directives:?}: {error}"))
}

/// Installs the global subscriber. `foreground` adds stderr and enables the Python
/// helper's `debug_only` handlers.
pub fn init(logging: &LoggingConfig, overrides: LogOverrides, foreground: bool) -> Result<LogHandle, String> {
    let (filter, handle) = reload::Layer::new(build_filter(logging, &overrides)?);
    let format = overrides.format.unwrap_or(LogFormat::Text);
    let mut layers: Vec<Output> = Vec::new();
    let mut stderr_added = false;
    for handler in &logging.handlers {
        if handler.debug_only && !foreground {
            continue;
        }
        if handler.target == LogTarget::Stderr {
            if stderr_added {
                continue;
            }
            stderr_added = true;
        }
        layers.push(output_layer(handler, format)?);
    }
    if foreground && !stderr_added {
        layers.push(boxed(
            format,
            io::stderr,
            stderr_is_terminal(),
            LevelFilter::TRACE,
        ));
    }
    let registry = tracing_subscriber::registry().with(filter).with(layers);
    // Turns ERROR lines into Sentry events once a client is initialised (a no-op
    // before, and without a DSN).
    #[cfg(feature = "sentry")]
    let registry = registry
        .with(sentry::integrations::tracing::ErrorLayer::new().with_filter(LevelFilter::ERROR))
        .with(sentry::integrations::tracing::BreadcrumbLayer::new().with_filter(LevelFilter::INFO));
    registry.try_init().map_err(|error| error.to_string())?;
    Ok(LogHandle {
        filter: handle,
        overrides,
    })
}

fn stderr_is_terminal() -> bool {
    io::IsTerminal::is_terminal(&io::stderr())
}

fn output_layer(handler: &LogHandler, format: LogFormat) -> Result<Output, String> {
    let level = handler.level.unwrap_or(LevelFilter::TRACE);
    Ok(match &handler.target {
        LogTarget::Stderr => boxed(format, io::stderr, stderr_is_terminal(), level),
        LogTarget::File(path) => {
            let file = ReopeningFile::open(path.clone()).map_err(|error| {
                format!(
                    "Logging.handlers.{}: cannot open {}: {error}",
                    handler.name,
                    path.display()
                )
            })?;
            boxed(format, file, false, level)
        }
        LogTarget::Syslog { address, facility } => {
            let syslog = Syslog::connect(address, facility).map_err(|error| {
                format!(
                    "Logging.handlers.{}: cannot reach syslog at {address}: {error}",
                    handler.name
                )
            })?;
            boxed(format, syslog, false, level)
        }
    })
}

fn boxed<W>(format: LogFormat, writer: W, ansi: bool, level: LevelFilter) -> Output
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => layer.with_filter(level).boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_filter(level)
            .boxed(),
    }
}

/// A log file that is opened again when it is moved or deleted (log rotation), as
/// Python's `WatchedFileHandler` does. Checking costs a `stat` per line, which is fine
/// for lines that need an operator.
struct ReopeningFile {
    path: PathBuf,
    state: Mutex<(File, u64)>,
}

impl ReopeningFile {
    fn open(path: PathBuf) -> io::Result<ReopeningFile> {
        let file = Self::open_append(&path)?;
        let inode = file.metadata()?.ino();
        Ok(ReopeningFile {
            path,
            state: Mutex::new((file, inode)),
        })
    }

    fn open_append(path: &PathBuf) -> io::Result<File> {
        OpenOptions::new().create(true).append(true).open(path)
    }
}

impl Write for &ReopeningFile {
    fn write(&mut self, buffer: &[u8]) -> io::Result<usize> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = std::fs::metadata(&self.path).map(|m| m.ino()).ok();
        if current != Some(state.1) {
            let file = ReopeningFile::open_append(&self.path)?;
            let inode = file.metadata()?.ino();
            *state = (file, inode);
        }
        state.0.write(buffer)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.0.flush()
    }
}

impl<'a> MakeWriter<'a> for ReopeningFile {
    type Writer = &'a ReopeningFile;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

/// Sends each line as one RFC 3164 syslog datagram, to a Unix socket or over UDP.
struct Syslog {
    socket: SyslogSocket,
    facility: u8,
    tag: String,
}

enum SyslogSocket {
    Unix(UnixDatagram, PathBuf),
    Udp(std::net::UdpSocket),
}

impl Syslog {
    fn connect(address: &str, facility: &str) -> io::Result<Syslog> {
        let socket = if address.starts_with('/') {
            let socket = UnixDatagram::unbound()?;
            SyslogSocket::Unix(socket, PathBuf::from(address))
        } else {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(address)?;
            SyslogSocket::Udp(socket)
        };
        Ok(Syslog {
            socket,
            facility: facility_code(facility),
            tag: format!("mikkoo[{}]", std::process::id()),
        })
    }
}

fn facility_code(name: &str) -> u8 {
    match name.to_ascii_lowercase().as_str() {
        "kern" => 0,
        "user" => 1,
        "mail" => 2,
        "daemon" => 3,
        "auth" => 4,
        "syslog" => 5,
        "lpr" => 6,
        "news" => 7,
        "uucp" => 8,
        "cron" => 9,
        "authpriv" => 10,
        "ftp" => 11,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        _ => 1,
    }
}

/// One syslog line being written; sent when dropped (tracing writes a line at a time).
struct SyslogLine<'a> {
    syslog: &'a Syslog,
    severity: u8,
    buffer: Vec<u8>,
}

impl Write for SyslogLine<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine<'_> {
    fn drop(&mut self) {
        let line = String::from_utf8_lossy(&self.buffer);
        let message = format!(
            "<{}>{}: {}",
            u16::from(self.syslog.facility) * 8 + u16::from(self.severity),
            self.syslog.tag,
            line.trim_end()
        );
        // Best effort: a missing syslog must not take the relay down.
        let _ = match &self.syslog.socket {
            SyslogSocket::Unix(socket, path) => socket.send_to(message.as_bytes(), path),
            SyslogSocket::Udp(socket) => socket.send(message.as_bytes()),
        };
    }
}

impl<'a> MakeWriter<'a> for Syslog {
    type Writer = SyslogLine<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        self.line(6)
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        let severity = match *meta.level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        self.line(severity)
    }
}

impl Syslog {
    fn line(&self, severity: u8) -> SyslogLine<'_> {
        SyslogLine {
            syslog: self,
            severity,
            buffer: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn python_levels_map_to_rust_modules() {
        let logging = LoggingConfig {
            root_level: Some(LevelFilter::ERROR),
            loggers: BTreeMap::from([
                ("mikkoo".to_owned(), LevelFilter::INFO),
                ("pika".to_owned(), LevelFilter::ERROR),
                ("queries".to_owned(), LevelFilter::DEBUG),
                ("tornado".to_owned(), LevelFilter::ERROR),
            ]),
            handlers: Vec::new(),
        };
        assert_eq!(
            directives(&logging),
            "error,mikkoo=info,lapin=error,amq_protocol=error,tokio_postgres=debug"
        );
    }

    #[test]
    fn without_a_logging_section_mikkoo_logs_info() {
        assert_eq!(
            directives(&LoggingConfig::default()),
            "warn,mikkoo=info,lapin=off"
        );
    }

    #[test]
    fn overrides_win() {
        let overrides = LogOverrides {
            level: Some(LevelFilter::DEBUG),
            filter: None,
            format: None,
        };
        assert!(build_filter(&LoggingConfig::default(), &overrides).is_ok());
        let bad = LogOverrides {
            filter: Some("mikkoo=loud".into()),
            ..LogOverrides::default()
        };
        assert!(
            build_filter(&LoggingConfig::default(), &bad)
                .unwrap_err()
                .contains("invalid log filter")
        );
    }
}
