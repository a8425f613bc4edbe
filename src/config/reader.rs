//! A path-tracking reader over the parsed configuration tree.
//!
//! The YAML (or JSON) file is first parsed into a plain [`serde_json::Value`] tree; this
//! module walks that tree the way the old relay's users wrote it. Every value it reads
//! knows its dotted key path (`Application.workers.invoices.rabbitmq.port`), so a wrong
//! type or an out-of-range number is reported where it is, and every key that nobody
//! read is reported as unknown by name. It never stops at the first problem: all errors
//! and warnings are collected in [`Diagnostics`] so one run shows everything to fix.

use serde_json::{Map, Value};
use std::time::Duration;

use super::ConfigError;
use super::duration::parse_duration;

/// Errors and warnings collected while reading one configuration file.
#[derive(Debug, Default)]
pub(crate) struct Diagnostics {
    /// Problems that make the configuration unusable (exit status 2).
    pub errors: Vec<ConfigError>,
    /// Things worth telling the operator that do not stop the relay (unknown keys,
    /// ignored duplicates, unsafe-but-allowed settings).
    pub warnings: Vec<String>,
}

impl Diagnostics {
    pub fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError::at(path, message));
    }

    pub fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }
}

/// Joins a parent path and a key into a dotted path.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// One value of the tree together with its path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Node<'a> {
    pub path: &'a str,
    pub value: &'a Value,
}

/// Owns the path string so [`Node`]s can borrow it.
#[derive(Debug)]
pub(crate) struct Entry<'a> {
    pub path: String,
    pub value: &'a Value,
}

impl<'a> Entry<'a> {
    pub fn node(&self) -> Node<'_> {
        Node {
            path: &self.path,
            value: self.value,
        }
    }
}

/// A mapping being read: remembers which keys were read so the rest can be reported.
#[derive(Debug)]
pub(crate) struct Table<'a> {
    path: String,
    map: &'a Map<String, Value>,
    read: Vec<&'a str>,
}

impl<'a> Table<'a> {
    pub fn new(path: impl Into<String>, map: &'a Map<String, Value>) -> Self {
        Table {
            path: path.into(),
            map,
            read: Vec::new(),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The value under `key`, or `None` when it is absent or null (a null means "use
    /// the default", as an empty YAML key does).
    pub fn get(&mut self, key: &str) -> Option<Entry<'a>> {
        let (stored_key, value) = self.map.get_key_value(key)?;
        self.read.push(stored_key.as_str());
        if value.is_null() {
            return None;
        }
        Some(Entry {
            path: join(&self.path, key),
            value,
        })
    }

    /// The value under `key`, falling back to the alias `alias`. When both are present
    /// the key wins and a warning names the ignored alias.
    pub fn get_aliased(&mut self, key: &str, alias: &str, diag: &mut Diagnostics) -> Option<Entry<'a>> {
        let primary = self.get(key);
        let secondary = self.get(alias);
        match (primary, secondary) {
            (Some(primary), Some(_)) => {
                diag.warn(format!(
                    "{}: both `{key}` and its alias `{alias}` are set; using `{key}`, ignoring `{}`",
                    self.path,
                    join(&self.path, alias)
                ));
                Some(primary)
            }
            (primary, secondary) => primary.or(secondary),
        }
    }

    /// Marks a key as known but unused (historical keys of the Python relay).
    pub fn ignore(&mut self, key: &str) {
        if let Some((stored_key, _)) = self.map.get_key_value(key) {
            self.read.push(stored_key.as_str());
        }
    }

    /// Marks every key as known (a section whose keys are not the relay's to judge).
    pub fn ignore_rest(&mut self) {
        self.read.extend(self.map.keys().map(String::as_str));
    }

    /// Warns about every key that was not read.
    pub fn finish(self, diag: &mut Diagnostics) {
        for key in self.map.keys() {
            if !self.read.contains(&key.as_str()) {
                diag.warn(format!(
                    "unknown configuration key {} (ignored)",
                    join(&self.path, key)
                ));
            }
        }
    }
}

impl<'a> Node<'a> {
    fn type_error(&self, diag: &mut Diagnostics, expected: &str) {
        diag.error(
            self.path,
            format!("expected {expected}, found {}", describe(self.value)),
        );
    }

    /// A string. Numbers and booleans are accepted as their text (YAML turns an
    /// unquoted `password: 12345` into a number; the user meant the text).
    pub fn string(&self, diag: &mut Diagnostics) -> Option<String> {
        match self.value {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.type_error(diag, "a string");
                None
            }
        }
    }

    /// A non-empty string.
    pub fn non_empty_string(&self, diag: &mut Diagnostics) -> Option<String> {
        let value = self.string(diag)?;
        if value.trim().is_empty() {
            diag.error(self.path, "must not be empty");
            return None;
        }
        Some(value)
    }

    /// A boolean: YAML booleans, or the strings `true/false/yes/no/on/off/1/0` in any
    /// case (as they arrive from `${VAR}` expansion or old YAML 1.1 files).
    pub fn bool(&self, diag: &mut Diagnostics) -> Option<bool> {
        match self.value {
            Value::Bool(b) => Some(*b),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Some(true),
                "false" | "no" | "off" | "0" => Some(false),
                _ => {
                    self.type_error(diag, "a boolean (true or false)");
                    None
                }
            },
            Value::Number(n) if n.as_u64() == Some(1) => Some(true),
            Value::Number(n) if n.as_u64() == Some(0) => Some(false),
            _ => {
                self.type_error(diag, "a boolean (true or false)");
                None
            }
        }
    }

    /// An integer within `min..=max`; numeric strings are accepted.
    pub fn integer(&self, diag: &mut Diagnostics, min: i64, max: i64) -> Option<i64> {
        let parsed = match self.value {
            Value::Number(n) => n.as_i64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            }),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        let Some(value) = parsed else {
            self.type_error(diag, "an integer");
            return None;
        };
        if value < min || value > max {
            diag.error(
                self.path,
                format!("must be between {min} and {max}, found {value}"),
            );
            return None;
        }
        Some(value)
    }

    /// A duration: seconds as a number (fractions allowed) or a string such as
    /// `500ms`, `10s`, `2m`, `1h`.
    pub fn duration(&self, diag: &mut Diagnostics) -> Option<Duration> {
        let parsed = match self.value {
            Value::Number(n) => n.as_f64().and_then(|secs| Duration::try_from_secs_f64(secs).ok()),
            Value::String(s) => parse_duration(s),
            _ => None,
        };
        // Longer than any sensible delay, and past what PostgreSQL intervals and
        // timers take comfortably: a typo such as 10000000 days is an error, not a hang.
        const LONGEST: Duration = Duration::from_secs(366 * 24 * 3600);
        if let Some(duration) = parsed
            && duration > LONGEST
        {
            diag.error(self.path, "must be at most a year");
            return None;
        }
        if parsed.is_none() {
            diag.error(
                self.path,
                format!(
                    "expected a duration such as 10, 0.5, \"500ms\", \"10s\" or \"2m\", found {}",
                    describe(self.value)
                ),
            );
        }
        parsed
    }

    /// A duration that must be greater than zero.
    pub fn positive_duration(&self, diag: &mut Diagnostics) -> Option<Duration> {
        let value = self.duration(diag)?;
        if value.is_zero() {
            diag.error(self.path, "must be greater than zero");
            return None;
        }
        Some(value)
    }

    /// A mapping.
    pub fn table(&self, diag: &mut Diagnostics) -> Option<Table<'a>> {
        match self.value {
            Value::Object(map) => Some(Table::new(self.path, map)),
            _ => {
                self.type_error(diag, "a mapping");
                None
            }
        }
    }

    /// A string, or a list of strings (host names for fail-over).
    pub fn string_list(&self, diag: &mut Diagnostics) -> Option<Vec<String>> {
        match self.value {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (index, item) in items.iter().enumerate() {
                    let path = format!("{}[{index}]", self.path);
                    let node = Node {
                        path: &path,
                        value: item,
                    };
                    out.push(node.non_empty_string(diag)?);
                }
                if out.is_empty() {
                    diag.error(self.path, "must name at least one host");
                    return None;
                }
                Some(out)
            }
            _ => self.non_empty_string(diag).map(|s| vec![s]),
        }
    }
}

/// Names a JSON value's type for error messages, without its content (which may be a
/// secret).
pub(crate) fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_keys_are_warned_with_their_path() {
        let value = json!({"known": 1, "typo": 2});
        let mut diag = Diagnostics::default();
        let mut table = Table::new("Application.workers.q", value.as_object().unwrap());
        assert!(table.get("known").is_some());
        table.finish(&mut diag);
        assert_eq!(
            diag.warnings,
            ["unknown configuration key Application.workers.q.typo (ignored)"]
        );
    }

    #[test]
    fn alias_loses_to_key_with_a_warning() {
        let value = json!({"retry_delay": 1, "retry_interval": 2});
        let mut diag = Diagnostics::default();
        let mut table = Table::new("w", value.as_object().unwrap());
        let entry = table
            .get_aliased("retry_delay", "retry_interval", &mut diag)
            .unwrap();
        assert_eq!(entry.value, &json!(1));
        assert!(
            diag.warnings[0].contains("ignoring `w.retry_interval`"),
            "{:?}",
            diag.warnings
        );
    }

    #[test]
    fn integers_are_range_checked() {
        let value = json!(70000);
        let mut diag = Diagnostics::default();
        let node = Node {
            path: "a.port",
            value: &value,
        };
        assert_eq!(node.integer(&mut diag, 1, 65535), None);
        assert_eq!(
            diag.errors[0].to_string(),
            "a.port: must be between 1 and 65535, found 70000"
        );
    }

    #[test]
    fn booleans_accept_yaml_1_1_words() {
        let mut diag = Diagnostics::default();
        for (text, expected) in [("yes", true), ("Off", false), ("TRUE", true), ("0", false)] {
            let value = json!(text);
            let node = Node {
                path: "x",
                value: &value,
            };
            assert_eq!(node.bool(&mut diag), Some(expected), "{text}");
        }
        let value = json!("maybe");
        let node = Node {
            path: "x",
            value: &value,
        };
        assert_eq!(node.bool(&mut diag), None);
        assert!(diag.errors[0].to_string().contains("expected a boolean"));
    }

    #[test]
    fn type_errors_do_not_echo_the_value() {
        let value = json!({"secret": "hunter2"});
        let mut diag = Diagnostics::default();
        let node = Node {
            path: "x.password",
            value: &value,
        };
        assert_eq!(node.string(&mut diag), None);
        assert_eq!(
            diag.errors[0].to_string(),
            "x.password: expected a string, found a mapping"
        );
    }
}
