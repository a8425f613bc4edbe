//! PostgreSQL connection settings from a libpq-style URL, and the connection itself.
//!
//! tokio-postgres understands most libpq URL parameters but not the TLS ones operators
//! actually use (`sslmode=verify-ca|verify-full`, `sslrootcert`, `sslcert`, `sslkey`). This
//! module takes those out of the URL, gives the rest to tokio-postgres, and applies the
//! TLS ones to an OpenSSL connector with libpq's meanings:
//!
//! | sslmode | TLS | certificate checked | host name checked |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `allow`, `prefer` (default) | if the server offers it | no | no |
//! | `require` | yes | only when `sslrootcert` is given (as libpq) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! Without `sslrootcert`, verification uses the system's trust store. `allow` is
//! treated as `prefer` (tokio-postgres cannot try plain text first).
//!
//! It owns nothing of PgQ: see [`crate::pgq`] for that.

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// libpq's `sslmode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS when the server offers it (treated as `prefer`).
    Allow,
    /// TLS when the server offers it, unverified.
    Prefer,
    /// TLS required, unverified unless `sslrootcert` is given.
    Require,
    /// TLS required, certificate chain verified.
    VerifyCa,
    /// TLS required, certificate chain and host name verified.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode must be disable, allow, prefer, require, verify-ca or verify-full, found {other:?}"
                ));
            }
        })
    }
}

/// Where and how to connect to PostgreSQL.
#[derive(Clone, PartialEq)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    root_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    /// True when the URL names the application itself; otherwise each connection is
    /// named after its purpose (`mikkoo <queue>`), so operators can tell them apart in
    /// `pg_stat_activity`.
    url_sets_application_name: bool,
    redacted: String,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Display for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// Default connect timeout when the URL does not set `connect_timeout`.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl PgTarget {
    /// Parses a `postgresql://` (or `postgres://`) URL.
    pub fn parse(url: &str) -> Result<PgTarget, String> {
        let mut ssl_mode = SslMode::Prefer;
        let mut url_sets_keepalives = false;
        let mut url_sets_user_timeout = false;
        let mut root_cert = None;
        let mut client_cert = None;
        let mut client_key = None;
        let redacted = redact_url(url);
        let passthrough = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut parsed = url::Url::parse(url)
                .map_err(|error| format!("invalid PostgreSQL URL {redacted}: {error}"))?;
            let mut kept: Vec<(String, String)> = Vec::new();
            for (key, value) in parsed.query_pairs() {
                match key.as_ref() {
                    "sslmode" => ssl_mode = value.parse()?,
                    "sslrootcert" => root_cert = Some(PathBuf::from(value.as_ref())),
                    "sslcert" => client_cert = Some(PathBuf::from(value.as_ref())),
                    "sslkey" => client_key = Some(PathBuf::from(value.as_ref())),
                    _ => {
                        url_sets_keepalives |= key.starts_with("keepalives");
                        url_sets_user_timeout |= key == "tcp_user_timeout";
                        kept.push((key.into_owned(), value.into_owned()));
                    }
                }
            }
            if kept.is_empty() {
                parsed.set_query(None);
            } else {
                parsed.query_pairs_mut().clear().extend_pairs(kept);
            }
            parsed.to_string()
        } else {
            return Err(format!(
                "invalid PostgreSQL URL {redacted}: expected postgresql://user:password@host:port/database"
            ));
        };
        let mut config = tokio_postgres::Config::from_str(&passthrough)
            .map_err(|error| format!("invalid PostgreSQL URL {redacted}: {error}"))?;
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        // A network that drops packets silently must not hang a worker for the 15 minutes
        // TCP takes to give up: keepalives find a dead peer when idle, the user timeout
        // when data goes unacknowledged. The URL's own settings win.
        if !url_sets_keepalives {
            config
                .keepalives(true)
                .keepalives_idle(Duration::from_secs(30))
                .keepalives_interval(Duration::from_secs(10))
                .keepalives_retries(3);
        }
        if !url_sets_user_timeout {
            config.tcp_user_timeout(Duration::from_secs(60));
        }
        let url_sets_application_name = config.get_application_name().is_some();
        Ok(PgTarget {
            config,
            ssl_mode,
            root_cert,
            client_cert,
            client_key,
            url_sets_application_name,
            redacted,
        })
    }

    /// The tokio-postgres settings (without the TLS parameters).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The requested `sslmode`.
    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// `host:port` of the first host, for messages.
    pub fn host_port(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    /// The database name, for messages.
    pub fn dbname(&self) -> &str {
        self.config
            .get_dbname()
            .or_else(|| self.config.get_user())
            .unwrap_or("postgres")
    }

    /// The URL with its password replaced by `***`.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// Builds the TLS connector that implements this target's `sslmode`.
    pub fn tls_connector(&self) -> Result<MakeTlsConnector, String> {
        let describe =
            |what: &str, error: openssl::error::ErrorStack| format!("PostgreSQL TLS: {what}: {error}");
        let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(|e| describe("setup", e))?;
        let verify_chain = match self.ssl_mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => false,
        };
        if verify_chain {
            match &self.root_cert {
                Some(path) => builder
                    .set_ca_file(path)
                    .map_err(|e| describe(&format!("cannot load sslrootcert {}", path.display()), e))?,
                None => builder
                    .set_default_verify_paths()
                    .map_err(|e| describe("cannot load the system trust store", e))?,
            }
            builder.set_verify(SslVerifyMode::PEER);
        } else {
            builder.set_verify(SslVerifyMode::NONE);
        }
        if let Some(cert) = &self.client_cert {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| describe(&format!("cannot load sslcert {}", cert.display()), e))?;
            let key = self.client_key.as_ref().unwrap_or(cert);
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| describe(&format!("cannot load sslkey {}", key.display()), e))?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        if self.ssl_mode != SslMode::VerifyFull {
            connector.set_callback(|connect, _domain| {
                connect.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(connector)
    }

    /// Opens a connection named `application_name` (unless the URL names one) and spawns
    /// the task that drives it. The returned handle ends when the connection does.
    pub async fn connect(
        &self,
        application_name: &str,
    ) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), ConnectError> {
        let tls = self.tls_connector().map_err(ConnectError::Tls)?;
        let mut config = self.config.clone();
        if !self.url_sets_application_name {
            config.application_name(application_name);
        }
        let (client, connection) = config
            .connect(tls)
            .await
            .map_err(|source| ConnectError::Postgres {
                target: self.host_port(),
                source,
            })?;
        let handle = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "postgresql connection ended");
            }
        });
        Ok((client, handle))
    }
}

/// Why a PostgreSQL connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TLS settings could not be applied (missing or unreadable files).
    #[error("{0}")]
    Tls(String),
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to PostgreSQL at {target}: {}", with_causes(source))]
    Postgres {
        /// `host:port` tried.
        target: String,
        /// What tokio-postgres said.
        #[source]
        source: tokio_postgres::Error,
    },
}

/// An error with the errors that caused it (`error: cause: cause`): tokio-postgres says
/// "error performing TLS handshake" and keeps OpenSSL's reason in its source.
pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

/// Replaces the password of a URL (in the authority or as `password=`) with `***`.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        // Unparseable: show only the scheme, as the rest may hold the password.
        return match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://***"),
            None => "***".to_owned(),
        };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    let has_password_param = parsed.query_pairs().any(|(key, _)| key == "password");
    if has_password_param {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if key == "password" {
                    "***".to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string().replace("%2A%2A%2A", "***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_parameters_are_taken_out() {
        let target = PgTarget::parse(
            "postgresql://u:pw@db.example:6432/app?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(target.ssl_mode(), SslMode::VerifyFull);
        assert_eq!(target.root_cert.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(target.config().get_application_name(), Some("x"));
        assert_eq!(target.host_port(), "db.example:6432");
        assert_eq!(target.dbname(), "app");
    }

    #[test]
    fn passwords_never_show() {
        let target = PgTarget::parse("postgresql://u:topsecret@h/db?password=alsosecret").unwrap();
        for shown in [
            target.redacted().to_owned(),
            format!("{target:?}"),
            target.to_string(),
        ] {
            assert!(
                !shown.contains("topsecret") && !shown.contains("alsosecret"),
                "{shown}"
            );
            assert!(shown.contains("***"), "{shown}");
        }
    }

    #[test]
    fn bad_urls_are_explained_without_the_password() {
        let error = PgTarget::parse("postgresql://u:topsecret@h/db?sslmode=sometimes").unwrap_err();
        assert!(error.contains("sslmode must be"), "{error}");
        let error = PgTarget::parse("mysql://u:topsecret@h/db").unwrap_err();
        assert!(
            error.contains("expected postgresql://") && !error.contains("topsecret"),
            "{error}"
        );
        let error = PgTarget::parse("postgresql://u:topsecret@h/db?bogus=1").unwrap_err();
        assert!(!error.contains("topsecret"), "{error}");
    }
}
