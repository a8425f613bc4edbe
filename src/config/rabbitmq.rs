//! `rabbitmq` (a mapping) and `rabbitmq_url` (a URL string): where and how to connect
//! to the broker.

use std::path::PathBuf;
use std::time::Duration;

use super::Secret;
use super::reader::{Diagnostics, Node, join};

/// Connection settings for RabbitMQ.
#[derive(Clone, Debug, PartialEq)]
pub struct RabbitmqConfig {
    /// Host names tried in order (fail-over).
    pub hosts: Vec<String>,
    /// Port.
    pub port: u16,
    /// Virtual host.
    pub vhost: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: Secret,
    /// AMQP heartbeat; zero turns heartbeats off.
    pub heartbeat: Duration,
    /// Largest frame the client proposes.
    pub frame_max: u32,
    /// How long a TCP connect plus handshake may take.
    pub connect_timeout: Duration,
    /// TLS settings; `None` is plain TCP.
    pub tls: Option<TlsOptions>,
}

impl Default for RabbitmqConfig {
    fn default() -> Self {
        RabbitmqConfig {
            hosts: vec!["localhost".to_owned()],
            port: 5672,
            vhost: "/".to_owned(),
            username: "guest".to_owned(),
            password: Secret::new("guest"),
            heartbeat: Duration::from_secs(300),
            frame_max: 131_072,
            connect_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

impl RabbitmqConfig {
    /// `amqp[s]://user:***@host:port/vhost` for logs and `check` output.
    pub fn redacted(&self) -> String {
        let scheme = if self.tls.is_some() { "amqps" } else { "amqp" };
        let hosts = self
            .hosts
            .iter()
            .map(|host| format!("{host}:{}", self.port))
            .collect::<Vec<_>>()
            .join(",");
        let vhost = percent_encoding::utf8_percent_encode(&self.vhost, percent_encoding::NON_ALPHANUMERIC);
        format!("{scheme}://{}:***@{hosts}/{vhost}", self.username)
    }
}

/// `ssl_options`: TLS on the operator's terms (OpenSSL semantics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// CA bundle file.
    pub ca_certs: Option<PathBuf>,
    /// Directory of hashed CA certificates.
    pub ca_path: Option<PathBuf>,
    /// CA certificates as PEM text.
    pub ca_data: Option<String>,
    /// Client certificate (PEM).
    pub certfile: Option<PathBuf>,
    /// Client private key (PEM); defaults to `certfile`.
    pub keyfile: Option<PathBuf>,
    /// Password of an encrypted private key.
    pub password: Option<Secret>,
    /// OpenSSL cipher list.
    pub ciphers: Option<String>,
    /// Verify the broker's certificate and host name.
    pub verify: bool,
    /// Name to verify instead of the host.
    pub server_name: Option<String>,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            ca_certs: None,
            ca_path: None,
            ca_data: None,
            certfile: None,
            keyfile: None,
            password: None,
            ciphers: None,
            verify: true,
            server_name: None,
        }
    }
}

pub(crate) fn read_rabbitmq(node: Node<'_>, diag: &mut Diagnostics) -> Option<RabbitmqConfig> {
    if let serde_json::Value::String(_) = node.value {
        // `rabbitmq: amqp://...` is a URL in the mapping's place; accept it.
        return read_rabbitmq_url(node, diag);
    }
    let mut table = node.table(diag)?;
    let (defaults, url_port) = match table.get("url") {
        Some(entry) => {
            let parsed = read_url(entry.node(), diag)?;
            (parsed.config, parsed.explicit_port)
        }
        None => (RabbitmqConfig::default(), None),
    };
    let hosts = table
        .get_aliased("host", "hosts", diag)
        .and_then(|e| e.node().string_list(diag))
        .unwrap_or(defaults.hosts);
    let tls = match table.get("ssl_options") {
        Some(entry) => Some(read_tls(entry.node(), diag)?),
        None => defaults.tls,
    };
    // A port the operator wrote (the `port` key, else the URL's) always wins; only
    // without one does TLS decide between 5671 and 5672 (SPEC §3.3).
    let port = table
        .get("port")
        .and_then(|e| e.node().integer(diag, 1, 65535))
        .map(|p| p as u16)
        .or(url_port)
        .unwrap_or_else(|| default_port(tls.is_some()));
    let vhost = table
        .get("vhost")
        .and_then(|e| e.node().string(diag))
        .unwrap_or(defaults.vhost);
    let username = table
        .get("username")
        .and_then(|e| e.node().string(diag))
        .unwrap_or(defaults.username);
    let password = read_password(&mut table, diag).unwrap_or(defaults.password);
    let heartbeat = table
        .get("heartbeat_interval")
        .and_then(|e| heartbeat(e.node(), diag))
        .unwrap_or(defaults.heartbeat);
    let frame_max = table
        .get("frame_max")
        .and_then(|e| e.node().integer(diag, 4096, i64::from(u32::MAX)))
        .map_or(defaults.frame_max, |n| n as u32);
    let connect_timeout = table
        .get("socket_timeout")
        .and_then(|e| e.node().positive_duration(diag))
        .unwrap_or(defaults.connect_timeout);
    table.finish(diag);
    Some(RabbitmqConfig {
        hosts,
        port,
        vhost,
        username,
        password,
        heartbeat,
        frame_max,
        connect_timeout,
        tls,
    })
}

/// `heartbeat_interval`: a duration of whole seconds, 0 (off) to 65535.
fn heartbeat(node: Node<'_>, diag: &mut Diagnostics) -> Option<Duration> {
    let duration = node.duration(diag)?;
    if duration > Duration::from_secs(65535) {
        diag.error(
            node.path,
            "must be at most 65535 seconds (AMQP negotiates whole seconds)",
        );
        return None;
    }
    Some(Duration::from_secs(duration.as_secs_f64().round() as u64))
}

fn read_password(table: &mut super::reader::Table<'_>, diag: &mut Diagnostics) -> Option<Secret> {
    let inline = table.get("password");
    let file = table.get("password_file");
    match (inline, file) {
        (Some(inline), Some(file)) => {
            diag.warn(format!(
                "{}: both `password` and `password_file` are set; using `password`, ignoring `{}`",
                table.path(),
                file.path
            ));
            inline.node().string(diag).map(Secret::new)
        }
        (Some(inline), None) => inline.node().string(diag).map(Secret::new),
        (None, Some(file)) => {
            let path = file.node().non_empty_string(diag)?;
            match std::fs::read_to_string(&path) {
                // A trailing newline is how editors and `echo` end files, not part of
                // the password.
                Ok(text) => Some(Secret::new(text.trim_end_matches(['\n', '\r']))),
                Err(error) => {
                    diag.error(&file.path, format!("cannot read {path}: {error}"));
                    None
                }
            }
        }
        (None, None) => None,
    }
}

/// The port when none is written: 5671 for TLS, else 5672.
fn default_port(tls: bool) -> u16 {
    if tls { 5671 } else { 5672 }
}

pub(crate) fn read_rabbitmq_url(node: Node<'_>, diag: &mut Diagnostics) -> Option<RabbitmqConfig> {
    read_url(node, diag).map(|parsed| parsed.config)
}

/// What an AMQP URL says.
#[derive(Debug)]
struct ParsedUrl {
    /// The settings, defaults filled in.
    config: RabbitmqConfig,
    /// The port written in the URL, if any: it must survive `ssl_options` beside the URL.
    explicit_port: Option<u16>,
    /// Query keys that were ignored.
    unknown: Vec<String>,
}

fn read_url(node: Node<'_>, diag: &mut Diagnostics) -> Option<ParsedUrl> {
    let text = node.non_empty_string(diag)?;
    match parse_amqp_url(&text) {
        Ok(parsed) => {
            for key in &parsed.unknown {
                diag.warn(format!(
                    "{}: unknown URL query parameter {key:?} (ignored)",
                    node.path
                ));
            }
            Some(parsed)
        }
        Err(message) => {
            diag.error(node.path, message);
            None
        }
    }
}

/// Parses an `amqp://` / `amqps://` URL the way pika did: an empty path or `/` is the
/// vhost `/`; `%2f` decodes to `/`.
fn parse_amqp_url(text: &str) -> Result<ParsedUrl, String> {
    let url = url::Url::parse(text).map_err(|error| format!("invalid AMQP URL: {error}"))?;
    let tls = match url.scheme() {
        "amqp" => None,
        "amqps" => Some(TlsOptions::default()),
        other => {
            return Err(format!(
                "invalid AMQP URL: scheme must be amqp or amqps, found {other:?}"
            ));
        }
    };
    let decode = |s: &str| {
        percent_encoding_decode(s).map_err(|_| "invalid AMQP URL: percent-encoding is not UTF-8".to_owned())
    };
    let mut config = RabbitmqConfig::default();
    if let Some(host) = url.host_str().filter(|h| !h.is_empty()) {
        config.hosts = vec![host.trim_start_matches('[').trim_end_matches(']').to_owned()];
    }
    config.port = url.port().unwrap_or(default_port(tls.is_some()));
    if !url.username().is_empty() {
        config.username = decode(url.username())?;
    }
    if let Some(password) = url.password() {
        config.password = Secret::new(decode(password)?);
    }
    let path = url.path();
    if !path.is_empty() && path != "/" {
        config.vhost = decode(&path[1..])?;
    }
    let mut unknown = Vec::new();
    for (key, value) in url.query_pairs() {
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("invalid AMQP URL: {key} must be a whole number, found {value:?}"))
        };
        match key.as_ref() {
            "heartbeat" | "heartbeat_interval" => {
                config.heartbeat = Duration::from_secs(number()?.min(65535));
            }
            "frame_max" => {
                config.frame_max = u32::try_from(number()?)
                    .map_err(|_| "invalid AMQP URL: frame_max too large".to_owned())?;
            }
            "socket_timeout" | "connection_timeout" => {
                let n = number()?;
                // lapin's connection_timeout is in milliseconds, pika's socket_timeout
                // in seconds.
                config.connect_timeout = if key == "connection_timeout" {
                    Duration::from_millis(n)
                } else {
                    Duration::from_secs(n)
                };
            }
            _ => unknown.push(key.into_owned()),
        }
    }
    config.tls = tls;
    Ok(ParsedUrl {
        config,
        explicit_port: url.port(),
        unknown,
    })
}

fn percent_encoding_decode(text: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
}

fn read_tls(node: Node<'_>, diag: &mut Diagnostics) -> Option<TlsOptions> {
    let mut table = node.table(diag)?;
    let path_of = |table: &mut super::reader::Table<'_>, key: &str, diag: &mut Diagnostics| {
        table
            .get(key)
            .and_then(|e| e.node().non_empty_string(diag))
            .map(PathBuf::from)
    };
    let ca_certs = path_of(&mut table, "ca_certs", diag);
    let ca_path = path_of(&mut table, "ca_path", diag);
    let ca_data = table.get("ca_data").and_then(|e| e.node().non_empty_string(diag));
    let certfile = path_of(&mut table, "certfile", diag);
    let keyfile = path_of(&mut table, "keyfile", diag);
    let password = table
        .get("password")
        .and_then(|e| e.node().string(diag))
        .map(Secret::new);
    let ciphers = table.get("ciphers").and_then(|e| e.node().non_empty_string(diag));
    let verify = table
        .get("verify")
        .and_then(|e| e.node().bool(diag))
        .unwrap_or(true);
    let server_name = table
        .get("server_name")
        .and_then(|e| e.node().non_empty_string(diag));
    // `protocol` picked a Python ssl.PROTOCOL_* constant; OpenSSL negotiates the best
    // version the two sides share, which is what PROTOCOL_TLS (the usual value) meant.
    table.ignore("protocol");
    if !verify {
        diag.warn(format!(
            "{}.verify is false: the broker's certificate and host name are not checked, so anyone \
             between the relay and RabbitMQ can read and change messages",
            table.path()
        ));
    }
    if keyfile.is_some() && certfile.is_none() {
        diag.error(&join(table.path(), "keyfile"), "a keyfile needs a certfile");
    }
    table.finish(diag);
    Some(TlsOptions {
        ca_certs,
        ca_path,
        ca_data,
        certfile,
        keyfile,
        password,
        ciphers,
        verify,
        server_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_follows_pika_vhost_rules() {
        let parsed = parse_amqp_url("amqp://localhost:5672/%2f").unwrap();
        assert_eq!(parsed.config.vhost, "/");
        assert!(parsed.unknown.is_empty());
        assert_eq!(parse_amqp_url("amqp://h").unwrap().config.vhost, "/");
        assert_eq!(parse_amqp_url("amqp://h/").unwrap().config.vhost, "/");
        assert_eq!(parse_amqp_url("amqp://h/prod").unwrap().config.vhost, "prod");
    }

    #[test]
    fn url_carries_credentials_hosts_and_tls() {
        let parsed = parse_amqp_url("amqps://user:p%40ss@127.0.0.1/v?heartbeat=30&x=1").unwrap();
        assert_eq!(parsed.explicit_port, None);
        let config = parsed.config;
        assert_eq!(config.hosts, ["127.0.0.1"]);
        assert_eq!(config.port, 5671);
        assert_eq!(config.username, "user");
        assert_eq!(config.password.expose(), "p@ss");
        assert_eq!(config.heartbeat, Duration::from_secs(30));
        assert!(config.tls.as_ref().is_some_and(|tls| tls.verify));
        assert_eq!(parse_amqp_url("amqps://h/?x=1").unwrap().unknown, ["x"]);
        assert_eq!(
            parse_amqp_url("amqps://h:5672").unwrap().explicit_port,
            Some(5672)
        );
    }

    #[test]
    fn url_errors_are_clear() {
        assert!(
            parse_amqp_url("http://h")
                .unwrap_err()
                .contains("scheme must be amqp")
        );
        assert!(
            parse_amqp_url("amqp://h?heartbeat=soon")
                .unwrap_err()
                .contains("heartbeat must be a whole number")
        );
        assert!(
            parse_amqp_url("not a url")
                .unwrap_err()
                .starts_with("invalid AMQP URL")
        );
    }

    #[test]
    fn redacted_form_hides_the_password() {
        let config = parse_amqp_url("amqp://u:topsecret@h:1/v").unwrap().config;
        let shown = config.redacted();
        assert_eq!(shown, "amqp://u:***@h:1/v");
        assert_eq!(
            RabbitmqConfig::default().redacted(),
            "amqp://guest:***@localhost:5672/%2F"
        );
        assert!(!format!("{config:?}").contains("topsecret"));
    }
}
