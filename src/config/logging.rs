//! `Logging`: the parts of Python's `logging.config.dictConfig` shape the relay honours.
//!
//! Old files load unchanged. Read: `root.level`, `loggers.<name>.level`, and the handlers
//! that the root or a logger lists, of class `logging.StreamHandler` (stderr),
//! `logging.FileHandler` / `logging.handlers.WatchedFileHandler` (`filename`) and
//! `logging.handlers.SysLogHandler` (`address`), with their `level` and the Python
//! helper's `debug_only` flag (used only in the foreground). Formatters, filters and
//! the rest of dictConfig's keys are accepted and ignored: they are Python-specific.
//! A key dictConfig itself would not know (a typo such as `loggres` or `levle`) is
//! warned about by name, and a handler that a logger lists but `handlers` does not
//! define is too.

use std::collections::BTreeMap;
use std::path::PathBuf;
use tracing::level_filters::LevelFilter;

use super::reader::{Diagnostics, Node, Table};

/// dictConfig's top-level keys the relay accepts without using.
const UNUSED_SECTION_KEYS: &[&str] = &[
    "version",
    "formatters",
    "filters",
    "incremental",
    "disable_existing_loggers",
];
/// dictConfig's logger keys the relay accepts without using.
const UNUSED_LOGGER_KEYS: &[&str] = &["propagate", "filters"];
/// Handler keys the relay accepts without using: dictConfig's own, and the arguments
/// of the standard handler classes.
const UNUSED_HANDLER_KEYS: &[&str] = &[
    "formatter",
    "filters",
    "()",
    ".",
    "stream",
    "mode",
    "encoding",
    "delay",
    "errors",
    "maxBytes",
    "backupCount",
    "when",
    "interval",
    "utc",
    "atTime",
    "socktype",
];

/// What the `Logging` section asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoggingConfig {
    /// `root.level`: the level for everything not named in `loggers`.
    pub root_level: Option<LevelFilter>,
    /// `loggers.<name>.level` by Python logger name (`mikkoo`, `pika`, ...).
    pub loggers: BTreeMap<String, LevelFilter>,
    /// The handlers used by the root or by a logger.
    pub handlers: Vec<LogHandler>,
}

/// One output of log lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogHandler {
    /// The handler's name in the file.
    pub name: String,
    /// Where lines go.
    pub target: LogTarget,
    /// Lines below this level are not written by this handler.
    pub level: Option<LevelFilter>,
    /// Only used when running in the foreground (`-f`), as in the Python helper.
    pub debug_only: bool,
}

/// Where a handler writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard error.
    Stderr,
    /// Append to a file.
    File(PathBuf),
    /// Syslog: a Unix socket path or a `host:port` for UDP.
    Syslog {
        /// `/dev/log` style socket path, or `host:port`.
        address: String,
        /// Syslog facility name (`daemon`, `local0`, ...).
        facility: String,
    },
}

/// Python's level names (and numbers) as tracing filters. CRITICAL has no tracing
/// equivalent; ERROR is the nearest.
fn python_level(node: Node<'_>, diag: &mut Diagnostics) -> Option<LevelFilter> {
    let text = match node.value {
        serde_json::Value::Number(n) => n.to_string(),
        _ => node.string(diag)?,
    };
    let level = match text.trim().to_ascii_uppercase().as_str() {
        "CRITICAL" | "FATAL" | "50" | "ERROR" | "40" => LevelFilter::ERROR,
        "WARNING" | "WARN" | "30" => LevelFilter::WARN,
        "INFO" | "20" => LevelFilter::INFO,
        "DEBUG" | "10" => LevelFilter::DEBUG,
        "NOTSET" | "0" | "TRACE" => LevelFilter::TRACE,
        _ => {
            diag.error(
                node.path,
                format!("expected a level (CRITICAL, ERROR, WARNING, INFO, DEBUG, NOTSET), found {text:?}"),
            );
            return None;
        }
    };
    Some(level)
}

pub(crate) fn read_logging(node: Node<'_>, diag: &mut Diagnostics) -> Option<LoggingConfig> {
    let mut table = node.table(diag)?;
    let mut config = LoggingConfig::default();
    let mut used_handlers: Vec<String> = Vec::new();

    if let Some(root) = table.get("root")
        && let Some(mut root_table) = root.node().table(diag)
    {
        config.root_level = root_table.get("level").and_then(|e| python_level(e.node(), diag));
        used_handlers.extend(handler_names(&mut root_table, diag));
        finish_ignoring(root_table, UNUSED_LOGGER_KEYS, diag);
    }
    if let Some(loggers) = table.get("loggers") {
        match loggers.value {
            serde_json::Value::Object(map) => {
                for (name, value) in map {
                    let path = super::reader::join(&loggers.path, name);
                    let Some(mut logger) = (Node { path: &path, value }).table(diag) else {
                        continue;
                    };
                    if let Some(level) = logger.get("level").and_then(|e| python_level(e.node(), diag)) {
                        config.loggers.insert(name.clone(), level);
                    }
                    used_handlers.extend(handler_names(&mut logger, diag));
                    finish_ignoring(logger, UNUSED_LOGGER_KEYS, diag);
                }
            }
            _ => diag.error(
                &loggers.path,
                "expected a mapping of logger names to their settings",
            ),
        }
    }
    let defined = match table.get("handlers") {
        Some(handlers) => match handlers.value {
            serde_json::Value::Object(map) => {
                for (name, value) in map.iter().filter(|(name, _)| used_handlers.contains(name)) {
                    let path = super::reader::join(&handlers.path, name);
                    if let Some(handler) = read_handler(name, Node { path: &path, value }, diag) {
                        config.handlers.push(handler);
                    }
                }
                map.keys().cloned().collect()
            }
            _ => {
                diag.error(
                    &handlers.path,
                    "expected a mapping of handler names to their settings",
                );
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    used_handlers.sort();
    used_handlers.dedup();
    for name in used_handlers.iter().filter(|name| !defined.contains(name)) {
        diag.warn(format!(
            "{}: handler {name:?} is listed by a logger but not defined in {}.handlers (ignored)",
            table.path(),
            table.path()
        ));
    }
    finish_ignoring(table, UNUSED_SECTION_KEYS, diag);
    Some(config)
}

/// Accepts `unused` keys of `table` and warns about any other key not read.
fn finish_ignoring(mut table: Table<'_>, unused: &[&str], diag: &mut Diagnostics) {
    for key in unused {
        table.ignore(key);
    }
    table.finish(diag);
}

fn handler_names(table: &mut Table<'_>, diag: &mut Diagnostics) -> Vec<String> {
    let Some(entry) = table.get("handlers") else {
        return Vec::new();
    };
    match entry.value {
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => entry.node().string(diag).into_iter().collect(),
    }
}

fn read_handler(name: &str, node: Node<'_>, diag: &mut Diagnostics) -> Option<LogHandler> {
    let mut table = node.table(diag)?;
    let class = table
        .get("class")
        .and_then(|e| e.node().string(diag))
        .unwrap_or_default();
    let level = table.get("level").and_then(|e| python_level(e.node(), diag));
    let debug_only = table
        .get("debug_only")
        .and_then(|e| e.node().bool(diag))
        .unwrap_or(false);
    let target = match class.as_str() {
        "logging.StreamHandler" => Some(LogTarget::Stderr),
        "logging.FileHandler"
        | "logging.handlers.WatchedFileHandler"
        | "logging.handlers.RotatingFileHandler" => match table.get("filename") {
            Some(entry) => entry
                .node()
                .non_empty_string(diag)
                .map(|f| LogTarget::File(f.into())),
            None => {
                diag.error(
                    &super::reader::join(node.path, "filename"),
                    "missing: the file to log to",
                );
                None
            }
        },
        "logging.handlers.SysLogHandler" => {
            let address = match table.get("address") {
                Some(entry) => syslog_address(entry.node(), diag),
                None => Some("/dev/log".to_owned()),
            };
            let facility = table
                .get("facility")
                .and_then(|e| e.node().string(diag))
                .unwrap_or_else(|| "user".to_owned());
            address.map(|address| LogTarget::Syslog { address, facility })
        }
        other => {
            diag.warn(format!(
                "{}: handler class {other:?} is not supported (StreamHandler, FileHandler, \
                 WatchedFileHandler and SysLogHandler are); it is ignored",
                node.path
            ));
            // Its arguments are its class's (mailhost, toaddrs, ...): not typos.
            table.ignore_rest();
            None
        }
    };
    finish_ignoring(table, UNUSED_HANDLER_KEYS, diag);
    Some(LogHandler {
        name: name.to_owned(),
        target: target?,
        level,
        debug_only,
    })
}

/// `address: /dev/log`, `address: [host, 514]` or `address: "host:514"`.
fn syslog_address(node: Node<'_>, diag: &mut Diagnostics) -> Option<String> {
    match node.value {
        serde_json::Value::Array(parts) if parts.len() == 2 => {
            let host = parts[0].as_str();
            let port = parts[1].as_u64();
            match (host, port) {
                (Some(host), Some(port)) => Some(format!("{host}:{port}")),
                _ => {
                    diag.error(node.path, "expected [host, port]");
                    None
                }
            }
        }
        _ => node.non_empty_string(diag),
    }
}
