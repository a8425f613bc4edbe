//! Configuration: the file format of the Python relay, read into one resolved [`Config`].
//!
//! Loading goes in three steps: the file is parsed into a plain value tree (YAML, or JSON
//! when the name ends in `.json`); `${VAR}` references are expanded (`expand`); then
//! `reader` walks the tree, filling defaults, resolving aliases and validating every
//! value against its dotted key path. Nothing else in the program looks at the raw file.
//!
//! This module owns what the settings *are* and their defaults; it does not connect to
//! anything. Secrets are wrapped in [`Secret`] so that `Debug`, logs and errors show
//! `***` instead.

mod duration;
mod expand;
mod logging;
mod rabbitmq;
mod reader;
mod worker;

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use self::logging::{LogHandler, LogTarget, LoggingConfig};
pub use self::rabbitmq::{RabbitmqConfig, TlsOptions};
pub use self::worker::{BatchWindow, DeadLetterTarget, MessageIdMode, WorkerConfig};
pub(crate) use duration::format_duration;

/// Parses a duration as the configuration writes them (`10`, `500ms`, `5m`), for
/// command-line options.
pub fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    duration::parse_duration(text)
        .ok_or_else(|| format!("expected a duration such as 30s, 5m or 1h, found {text:?}"))
}
use reader::{Diagnostics, Node, Table};

/// A value that must never be shown: `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it somewhere.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One problem with the configuration: where it is (the dotted key path) and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path such as `Application.workers.invoices.rabbitmq.port`; empty for
    /// problems with the file as a whole.
    pub path: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn at(path: &str, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Everything that was wrong with one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    /// The file that was read.
    pub file: PathBuf,
    /// Every problem found, in file order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "configuration error in {file}: {error}")?;
        }
        Ok(())
    }
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    /// `Application`: what to relay and how.
    pub application: Application,
    /// `Daemon`: how to detach when not in the foreground.
    pub daemon: DaemonConfig,
    /// `Logging`: the parts of Python's dictConfig the relay honours.
    pub logging: LoggingConfig,
    /// Warnings found while reading (unknown keys, ignored aliases, risky settings);
    /// logged once logging is set up.
    pub warnings: Vec<String>,
}

/// The `Application` section.
#[derive(Clone, Debug)]
pub struct Application {
    /// PgQ queue name → worker settings, one worker per queue.
    pub workers: BTreeMap<String, WorkerConfig>,
    /// How often each worker refreshes lag figures and logs a status line.
    pub poll_interval: Duration,
    /// Value of the `origin` header; `None` means the host's FQDN.
    pub origin: Option<String>,
    /// statsd reporting.
    pub statsd: StatsdConfig,
    /// The HTTP listener for `/metrics`, `/livez`, `/readyz`, `/status`.
    pub http: Option<HttpConfig>,
    /// Sentry DSN for error reports.
    pub sentry_dsn: Option<Secret>,
    /// The built-in PgQ ticker.
    pub ticker: TickerConfig,
}

/// `Application.statsd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsdConfig {
    /// Send metrics at all.
    pub enabled: bool,
    /// statsd host.
    pub host: String,
    /// statsd port.
    pub port: u16,
    /// Metric name prefix.
    pub prefix: String,
    /// Put the host name after the prefix.
    pub include_hostname: bool,
    /// Transport.
    pub protocol: StatsdProtocol,
}

/// statsd transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsdProtocol {
    /// UDP datagrams (the default).
    Udp,
    /// Newline-separated lines over one TCP connection.
    Tcp,
}

/// `Application.http`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
}

/// `Application.ticker`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TickerConfig {
    /// Run PgQ's ticker and maintenance from the relay itself.
    pub enabled: bool,
    /// How often to tick.
    pub period: Duration,
}

/// The `Daemon` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Where to write the process id when detached.
    pub pidfile: Option<PathBuf>,
    /// User to run as after detaching.
    pub user: Option<String>,
    /// Group to run as after detaching.
    pub group: Option<String>,
}

/// Default location of the configuration file when `-c` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/mikkoo/mikkoo.yaml";

impl Config {
    /// Reads, expands and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigErrors {
            file: path.to_owned(),
            errors: vec![ConfigError::at("", format!("cannot read the file: {error}"))],
        })?;
        Self::from_text(path, &text, &|name| std::env::var(name).ok())
    }

    /// Parses configuration text; `path` decides the format and names the file in errors.
    pub fn from_text(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            file: path.to_owned(),
            errors,
        };
        let mut tree = parse_tree(path, text).map_err(|message| fail(vec![ConfigError::at("", message)]))?;
        let mut diag = Diagnostics::default();
        expand::expand_tree(&mut tree, "", env, &mut diag);
        let config = read_config(path, &tree, &mut diag);
        match config {
            Some(mut config) if diag.errors.is_empty() => {
                config.warnings = diag.warnings;
                Ok(config)
            }
            _ => Err(fail(diag.errors)),
        }
    }
}

fn parse_tree(path: &Path, text: &str) -> Result<Value, String> {
    let is_json = path
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("json"));
    let tree: Value = if is_json {
        serde_json::from_str(text).map_err(|error| format!("invalid JSON: {error}"))?
    } else {
        serde_saphyr::from_str(text).map_err(|error| format!("invalid YAML: {error}"))?
    };
    match tree {
        Value::Object(_) => Ok(tree),
        Value::Null => Err("the file is empty; it needs at least Application.workers".to_owned()),
        _ => Err("the file must be a mapping with the sections Application, Daemon and Logging".to_owned()),
    }
}

/// Finds a top-level section by its documented name or its lower-case form.
fn section<'a>(root: &mut Table<'a>, name: &str, diag: &mut Diagnostics) -> Option<reader::Entry<'a>> {
    root.get_aliased(name, &name.to_ascii_lowercase(), diag)
}

fn read_config(path: &Path, tree: &Value, diag: &mut Diagnostics) -> Option<Config> {
    let Value::Object(map) = tree else {
        return None;
    };
    let mut root = Table::new("", map);
    let application = match section(&mut root, "Application", diag) {
        Some(entry) => read_application(entry.node(), diag),
        None => {
            diag.error(
                "Application",
                "missing: the Application section with its workers is required",
            );
            None
        }
    };
    let daemon = section(&mut root, "Daemon", diag)
        .and_then(|entry| read_daemon(entry.node(), diag))
        .unwrap_or_default();
    let logging = section(&mut root, "Logging", diag)
        .and_then(|entry| logging::read_logging(entry.node(), diag))
        .unwrap_or_default();
    root.finish(diag);
    Some(Config {
        file: path.to_owned(),
        application: application?,
        daemon,
        logging,
        warnings: Vec::new(),
    })
}

fn read_application(node: Node<'_>, diag: &mut Diagnostics) -> Option<Application> {
    let mut table = node.table(diag)?;
    let poll_interval = table
        .get("poll_interval")
        .and_then(|e| e.node().positive_duration(diag))
        .unwrap_or(Duration::from_secs(10));
    let origin = table.get("origin").and_then(|e| e.node().non_empty_string(diag));
    let statsd = match table.get("statsd") {
        // On an error the default stands in, so the rest is still read and checked
        // (the error itself keeps the configuration from loading).
        Some(entry) => read_statsd(entry.node(), diag).unwrap_or_default(),
        None => StatsdConfig::default(),
    };
    let http = table.get("http").and_then(|e| read_http(e.node(), diag));
    let sentry_dsn = table
        .get("sentry_dsn")
        .and_then(|e| e.node().string(diag))
        .filter(|dsn| !dsn.trim().is_empty())
        .map(Secret::new);
    let ticker = match table.get("ticker") {
        Some(entry) => read_ticker(entry.node(), diag).unwrap_or_default(),
        None => TickerConfig::default(),
    };
    let workers = match table.get("workers") {
        Some(entry) => read_workers(entry.node(), diag),
        None => {
            diag.error(
                &reader::join(table.path(), "workers"),
                "missing: map each PgQ queue name to its settings",
            );
            None
        }
    };
    table.finish(diag);
    Some(Application {
        workers: workers?,
        poll_interval,
        origin,
        statsd,
        http,
        sentry_dsn,
        ticker,
    })
}

fn read_workers(node: Node<'_>, diag: &mut Diagnostics) -> Option<BTreeMap<String, WorkerConfig>> {
    let Value::Object(map) = node.value else {
        diag.error(
            node.path,
            "expected a mapping of PgQ queue names to worker settings",
        );
        return None;
    };
    let mut workers = BTreeMap::new();
    let mut failed = false;
    for (queue, value) in map {
        let path = reader::join(node.path, queue);
        let worker_node = Node { path: &path, value };
        match worker::read_worker(queue, worker_node, diag) {
            Some(worker) => {
                workers.insert(queue.clone(), worker);
            }
            None => failed = true,
        }
    }
    (!failed).then_some(workers)
}

impl Default for StatsdConfig {
    fn default() -> Self {
        StatsdConfig {
            enabled: false,
            host: "localhost".to_owned(),
            port: 8125,
            prefix: "mikkoo".to_owned(),
            include_hostname: false,
            protocol: StatsdProtocol::Udp,
        }
    }
}

fn read_statsd(node: Node<'_>, diag: &mut Diagnostics) -> Option<StatsdConfig> {
    let mut table = node.table(diag)?;
    let defaults = StatsdConfig::default();
    let enabled = table
        .get("enabled")
        .and_then(|e| e.node().bool(diag))
        .unwrap_or(false);
    let host = table
        .get("host")
        .and_then(|e| e.node().non_empty_string(diag))
        .unwrap_or(defaults.host);
    let port = table
        .get("port")
        .and_then(|e| e.node().integer(diag, 1, 65535))
        .map_or(defaults.port, |p| p as u16);
    let prefix = table
        .get("prefix")
        .and_then(|e| e.node().string(diag))
        .unwrap_or(defaults.prefix);
    let include_hostname = table
        .get("include_hostname")
        .and_then(|e| e.node().bool(diag))
        .unwrap_or(false);
    let tcp_alias = table.get("tcp").and_then(|e| e.node().bool(diag));
    let protocol = match table.get("protocol") {
        Some(entry) => match entry
            .node()
            .string(diag)
            .map(|p| p.to_ascii_lowercase())
            .as_deref()
        {
            Some("udp") => StatsdProtocol::Udp,
            Some("tcp") => StatsdProtocol::Tcp,
            Some(other) => {
                diag.error(&entry.path, format!("expected udp or tcp, found {other:?}"));
                StatsdProtocol::Udp
            }
            None => StatsdProtocol::Udp,
        },
        None if tcp_alias == Some(true) => StatsdProtocol::Tcp,
        None => StatsdProtocol::Udp,
    };
    table.finish(diag);
    Some(StatsdConfig {
        enabled,
        host,
        port,
        prefix,
        include_hostname,
        protocol,
    })
}

/// The address `/metrics` and the health checks are served on when `http` does not say.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9187";

fn read_http(node: Node<'_>, diag: &mut Diagnostics) -> Option<HttpConfig> {
    // `http: true` (or `http: {}`) serves on the default address; `false` is off.
    if let Value::Bool(_) = node.value {
        return node.bool(diag)?.then(|| HttpConfig {
            listen: DEFAULT_HTTP_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9187))),
        });
    }
    let mut table = node.table(diag)?;
    let listen = match table.get("listen") {
        Some(entry) => {
            let text = entry.node().non_empty_string(diag)?;
            match text.parse::<SocketAddr>() {
                Ok(address) => Some(address),
                Err(_) => {
                    diag.error(
                        &entry.path,
                        format!("expected an address such as \"127.0.0.1:9187\", found {text:?}"),
                    );
                    None
                }
            }
        }
        None => DEFAULT_HTTP_LISTEN.parse().ok(),
    };
    table.finish(diag);
    Some(HttpConfig { listen: listen? })
}

impl Default for TickerConfig {
    fn default() -> Self {
        TickerConfig {
            enabled: false,
            period: Duration::from_secs(1),
        }
    }
}

fn read_ticker(node: Node<'_>, diag: &mut Diagnostics) -> Option<TickerConfig> {
    let mut table = node.table(diag)?;
    let enabled = table
        .get("enabled")
        .and_then(|e| e.node().bool(diag))
        .unwrap_or(false);
    let period = table
        .get("period")
        .and_then(|e| e.node().positive_duration(diag))
        .unwrap_or(Duration::from_secs(1));
    table.finish(diag);
    Some(TickerConfig { enabled, period })
}

fn read_daemon(node: Node<'_>, diag: &mut Diagnostics) -> Option<DaemonConfig> {
    let mut table = node.table(diag)?;
    let pidfile = table
        .get("pidfile")
        .and_then(|e| e.node().non_empty_string(diag))
        .map(PathBuf::from);
    let user = table.get("user").and_then(|e| e.node().non_empty_string(diag));
    let group = table.get("group").and_then(|e| e.node().non_empty_string(diag));
    // `prevent_core` belonged to the Python daemon helper; core dumps are the
    // operating system's business here.
    table.ignore("prevent_core");
    table.finish(diag);
    Some(DaemonConfig { pidfile, user, group })
}

#[cfg(test)]
mod tests;
