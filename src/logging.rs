//! Log output: levels from the `Logging` section (or `--log-level` / `MIKKOO_LOG`), lines
//! to stderr, files and syslog, as text or one JSON object per line.
//!
//! Python logger names in the `Logging` section map to the Rust modules doing the same
//! job: `mikkoo` → `mikkoo`, `pika` → `lapin` and `amq_protocol`, `lapin` → `lapin`,
//! `queries` / `psycopg` → `tokio_postgres`; other names are ignored. lapin is silent
//! unless the operator names it (see `silence_lapin`). The level filter can be
//! replaced at run time ([`LogHandle::reload`]) so SIGHUP applies level changes.
//!
//! The relay installs its outputs with [`init`]; the operator's subcommands log to
//! stderr only ([`init_command`]). Lines that must reach the operator's terminal
//! whatever the outputs and levels (errors that end the process, warnings before
//! detaching) go through [`to_terminal`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;

use tracing::Level;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogHandler, LogTarget, LoggingConfig};

/// The registry with the reloadable level filter; the relay's outputs sit on top of it.
type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;

/// One output of log lines, on top of subscriber `S`.
type Output<S> = Box<dyn Layer<S> + Send + Sync>;

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

impl LogOverrides {
    /// The chosen line format (text unless `--log-format json`).
    pub fn format(&self) -> LogFormat {
        self.format.unwrap_or(LogFormat::Text)
    }
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The `Logging` section asks for something that cannot be done; `key` says where
    /// (`Logging.handlers.file`), so the caller can report it as a configuration error.
    #[error("{key}: {message}")]
    Config {
        /// Dotted key path in the configuration file.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// `MIKKOO_LOG` is not a valid filter.
    #[error("MIKKOO_LOG: {0}")]
    Environment(String),
    /// A global subscriber was installed already.
    #[error("cannot install the log subscriber: {0}")]
    Install(String),
}

/// The relay's installed log: its level filter can be changed at run time.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    overrides: LogOverrides,
    stderr: bool,
}

impl LogHandle {
    /// Applies the levels of a reloaded `Logging` section (command-line and environment
    /// overrides still win). Outputs do not change until restart.
    pub fn reload(&self, logging: &LoggingConfig) -> Result<(), String> {
        let filter = build_filter(&self.overrides, &directives(logging)).map_err(|e| e.to_string())?;
        self.filter.reload(filter).map_err(|error| error.to_string())
    }

    /// Whether one of the outputs is stderr (so the operator's terminal, until the
    /// process detaches).
    pub fn writes_to_stderr(&self) -> bool {
        self.stderr
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
    // Without a root level the Python relay logged its own INFO lines; so does mikkoo.
    if logging.root_level.is_none() && !mikkoo_set {
        parts.push("mikkoo=info".to_owned());
    }
    silence_lapin(&parts.join(","))
}

/// Turns lapin off unless `directives` name it. lapin logs every returned message at
/// WARN in its Debug form, body included, and every channel close at ERROR (which the
/// Sentry layer would turn into events); mikkoo reports both itself, with the event id
/// and without the payload. A root level (`WARNING` in example.yaml), `--log-level` or
/// a bare `debug` in `MIKKOO_LOG` therefore does not reach lapin: only `pika` / `lapin`
/// in `Logging.loggers`, or `lapin=…` in `MIKKOO_LOG`, does.
fn silence_lapin(directives: &str) -> String {
    if names_lapin(directives) {
        directives.to_owned()
    } else if directives.trim().is_empty() {
        "lapin=off".to_owned()
    } else {
        format!("{directives},lapin=off")
    }
}

/// Whether a filter has a directive for the whole of lapin (`lapin=debug`). One for a
/// module only (`lapin::channel=debug`) still gets `lapin=off` added: the more specific
/// directive wins for that module, and the rest of lapin stays quiet.
fn names_lapin(directives: &str) -> bool {
    directives
        .split(',')
        .any(|directive| directive.split(['=', '[']).next().unwrap_or_default().trim() == "lapin")
}

/// Rust module paths standing for a Python logger name.
fn rust_targets(python_name: &str) -> Vec<String> {
    match python_name {
        "pika" => vec!["lapin".into(), "amq_protocol".into()],
        "lapin" => vec!["lapin".into()],
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

/// The level filter: `MIKKOO_LOG` if set, else `--log-level` for mikkoo's own lines,
/// else `configured` (the `Logging` section's directives for the relay).
fn build_filter(overrides: &LogOverrides, configured: &str) -> Result<EnvFilter, SetupError> {
    // Errors quote what the operator wrote, not the directives added to it.
    let parse = |directives: &str, written: &str| {
        EnvFilter::builder()
            .parse(directives)
            .map_err(|error| format!("invalid log filter {written:?}: {error}"))
    };
    match (&overrides.filter, overrides.level) {
        (Some(filter), _) => parse(&silence_lapin(filter), filter).map_err(SetupError::Environment),
        (None, Some(level)) => {
            // Made of level names only: it parses.
            let directives = format!("warn,mikkoo={},lapin=off", level_name(level));
            parse(&directives, &directives).map_err(SetupError::Environment)
        }
        (None, None) => parse(configured, configured).map_err(|message| SetupError::Config {
            key: "Logging.loggers".to_owned(),
            message,
        }),
    }
}

/// Installs the relay's global subscriber. `foreground` adds stderr and enables the
/// Python helper's `debug_only` handlers.
pub fn init(
    logging: &LoggingConfig,
    overrides: LogOverrides,
    foreground: bool,
) -> Result<LogHandle, SetupError> {
    let (filter, handle) = reload::Layer::new(build_filter(&overrides, &directives(logging))?);
    let format = overrides.format();
    let mut layers: Vec<Output<Filtered>> = Vec::new();
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
        layers.push(stderr_layer(format));
        stderr_added = true;
    }
    let registry = tracing_subscriber::registry().with(filter).with(layers);
    // Turns ERROR lines into Sentry events once a client is initialised (a no-op
    // before, and without a DSN).
    #[cfg(feature = "sentry")]
    let registry = registry
        .with(sentry::integrations::tracing::ErrorLayer::new().with_filter(LevelFilter::ERROR))
        .with(sentry::integrations::tracing::BreadcrumbLayer::new().with_filter(LevelFilter::INFO));
    registry
        .try_init()
        .map_err(|error| SetupError::Install(error.to_string()))?;
    Ok(LogHandle {
        filter: handle,
        overrides,
        stderr: stderr_added,
    })
}

/// Installs the subscriber of an operator's subcommand (`check`, `status`, …): stderr
/// only, since their results go to stdout and the `Logging` section's files and syslog
/// are the relay's; at `warn` (so a per-message warning of `audit consume` shows)
/// unless `--log-level` or `MIKKOO_LOG` says otherwise.
pub fn init_command(overrides: &LogOverrides) -> Result<(), SetupError> {
    let filter = build_filter(overrides, "warn,lapin=off")?;
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr_layer(overrides.format()))
        .try_init()
        .map_err(|error| SetupError::Install(error.to_string()))
}

/// Writes `message` to stderr for the operator, whatever the log outputs and levels
/// are: in text format as a plain `mikkoo: …` line (`mikkoo: warning: …` at WARN),
/// in JSON format as one log object, since there every line written must be one
/// (SPEC §11).
pub fn to_terminal(format: LogFormat, level: Level, message: &str) {
    match format {
        LogFormat::Text if level == Level::WARN => eprintln!("mikkoo: warning: {message}"),
        LogFormat::Text => eprintln!("mikkoo: {message}"),
        LogFormat::Json => {
            let subscriber = Registry::default().with(stderr_layer(LogFormat::Json));
            tracing::subscriber::with_default(subscriber, || match level {
                Level::ERROR => tracing::error!(target: "mikkoo", "{message}"),
                Level::WARN => tracing::warn!(target: "mikkoo", "{message}"),
                _ => tracing::info!(target: "mikkoo", "{message}"),
            });
        }
    }
}

fn stderr_is_terminal() -> bool {
    io::IsTerminal::is_terminal(&io::stderr())
}

fn stderr_layer<S>(format: LogFormat) -> Output<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + 'static,
{
    boxed(format, io::stderr, stderr_is_terminal(), LevelFilter::TRACE)
}

fn output_layer<S>(handler: &LogHandler, format: LogFormat) -> Result<Output<S>, SetupError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + 'static,
{
    let level = handler.level.unwrap_or(LevelFilter::TRACE);
    let unusable = |message: String| SetupError::Config {
        key: format!("Logging.handlers.{}", handler.name),
        message,
    };
    Ok(match &handler.target {
        LogTarget::Stderr => boxed(format, io::stderr, stderr_is_terminal(), level),
        LogTarget::File(path) => {
            let file = ReopeningFile::open(path.clone())
                .map_err(|error| unusable(format!("cannot open {}: {error}", path.display())))?;
            boxed(format, file, false, level)
        }
        LogTarget::Syslog { address, facility } => {
            let syslog = Syslog::connect(address, facility)
                .map_err(|error| unusable(format!("cannot reach syslog at {address}: {error}")))?;
            boxed(format, syslog, false, level)
        }
    })
}

fn boxed<S, W>(format: LogFormat, writer: W, ansi: bool, level: LevelFilter) -> Output<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + 'static,
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
        // Absolute, since detaching changes directory to `/` and the path is looked up
        // again at every line to notice rotation.
        let path = std::path::absolute(&path)?;
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
        // Rotated: another file at the path, or none. A path the process may no longer
        // look up (after dropping privileges) is not a rotation.
        let rotated = match std::fs::metadata(&self.path) {
            Ok(metadata) => metadata.ino() != state.1,
            Err(error) => error.kind() == io::ErrorKind::NotFound,
        };
        if rotated
            && let Ok(file) = ReopeningFile::open_append(&self.path)
            && let Ok(metadata) = file.metadata()
        {
            *state = (file, metadata.ino());
        }
        // When reopening failed, the line goes to the old file: better than nowhere.
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
        })
    }

    /// One datagram: priority, tag and line. The tag's pid is read at send time: the
    /// outputs are set up before the process detaches, and the daemon's pid is not the
    /// launcher's.
    fn datagram(&self, severity: u8, line: &str) -> String {
        format!(
            "<{}>mikkoo[{}]: {}",
            u16::from(self.facility) * 8 + u16::from(severity),
            std::process::id(),
            line.trim_end()
        )
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
        let message = self
            .syslog
            .datagram(self.severity, &String::from_utf8_lossy(&self.buffer));
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
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
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
        assert!(build_filter(&overrides, "error").is_ok());
        let bad = LogOverrides {
            filter: Some("mikkoo=loud".into()),
            ..LogOverrides::default()
        };
        let error = build_filter(&bad, "error").unwrap_err();
        assert!(matches!(error, SetupError::Environment(_)), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with("MIKKOO_LOG: invalid log filter \"mikkoo=loud\": "),
            "{error}"
        );
    }

    /// Whether `filter` lets a `level` event of `target` through.
    fn lets_through(filter: EnvFilter, target: &'static str, level: Level) -> bool {
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || match (target, level) {
            ("lapin", Level::WARN) => tracing::enabled!(target: "lapin", Level::WARN),
            ("lapin", Level::ERROR) => tracing::enabled!(target: "lapin", Level::ERROR),
            ("lapin::channel", Level::WARN) => tracing::enabled!(target: "lapin::channel", Level::WARN),
            ("mikkoo", Level::INFO) => tracing::enabled!(target: "mikkoo", Level::INFO),
            _ => unreachable!("add the callsite for {target} {level}"),
        })
    }

    /// example.yaml's shape: a root level, a `mikkoo` logger, no `pika`.
    fn root_warning() -> LoggingConfig {
        LoggingConfig {
            root_level: Some(LevelFilter::WARN),
            loggers: BTreeMap::from([("mikkoo".to_owned(), LevelFilter::INFO)]),
            handlers: Vec::new(),
        }
    }

    #[test]
    fn lapin_is_silent_under_a_root_level() {
        assert_eq!(directives(&root_warning()), "warn,mikkoo=info,lapin=off");
        let filter = build_filter(&LogOverrides::default(), &directives(&root_warning())).unwrap();
        assert!(!lets_through(filter, "lapin", Level::ERROR));
        let filter = build_filter(&LogOverrides::default(), &directives(&root_warning())).unwrap();
        assert!(lets_through(filter, "mikkoo", Level::INFO));
    }

    #[test]
    fn lapin_logs_when_its_logger_is_configured() {
        for name in ["pika", "lapin"] {
            let mut logging = root_warning();
            logging.loggers.insert(name.to_owned(), LevelFilter::WARN);
            let filter = build_filter(&LogOverrides::default(), &directives(&logging)).unwrap();
            assert!(lets_through(filter, "lapin", Level::WARN), "{name}");
        }
    }

    #[test]
    fn lapin_is_silent_under_overrides_that_do_not_name_it() {
        let level = LogOverrides {
            level: Some(LevelFilter::TRACE),
            ..LogOverrides::default()
        };
        let everything = LogOverrides {
            filter: Some("debug".into()),
            ..LogOverrides::default()
        };
        for overrides in [level, everything] {
            let filter = build_filter(&overrides, "error").unwrap();
            assert!(!lets_through(filter, "lapin", Level::ERROR), "{overrides:?}");
        }
        let named = |filter: &str| {
            let overrides = LogOverrides {
                filter: Some(filter.into()),
                ..LogOverrides::default()
            };
            build_filter(&overrides, "error").unwrap()
        };
        assert!(lets_through(named("lapin=warn"), "lapin", Level::WARN));
        let one_module = "debug,lapin::channel=warn";
        assert!(lets_through(named(one_module), "lapin::channel", Level::WARN));
        assert!(!lets_through(named(one_module), "lapin", Level::ERROR));
    }

    #[test]
    fn names_lapin_reads_directive_targets() {
        assert!(names_lapin("warn,lapin=info"));
        assert!(names_lapin("lapin[span]=debug"));
        assert!(names_lapin(" lapin "));
        assert!(!names_lapin("lapin::channel=debug"));
        assert!(!names_lapin("warn,mikkoo=debug,lapinx=info"));
    }

    #[test]
    fn syslog_lines_carry_the_sending_process_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let syslog = Syslog::connect(path.to_str().unwrap(), "daemon").unwrap();
        {
            let mut line = syslog.line(4);
            line.write_all(b"pool exhausted\n").unwrap();
        }
        let mut buffer = [0u8; 256];
        let n = server.recv(&mut buffer).unwrap();
        assert_eq!(
            std::str::from_utf8(&buffer[..n]).unwrap(),
            format!("<28>mikkoo[{}]: pool exhausted", std::process::id())
        );
    }
}
