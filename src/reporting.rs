//! Error reports to Sentry (`Application.sentry_dsn`; cargo feature `sentry`, on by
//! default).
//!
//! Once initialised, every log line at ERROR becomes a Sentry event (lines below it
//! become breadcrumbs), and panics are reported. The client starts a thread, so it is
//! initialised after detaching; the DSN is checked before ([`check_dsn`]), so a
//! malformed one is a configuration error on the terminal, not a daemon that dies
//! unseen. Nothing secret reaches Sentry: mikkoo's log lines and errors never carry
//! passwords (URLs are redacted), and the DSN itself is a [`Secret`].

use crate::config::{ConfigError, Secret};

/// The key the DSN is read from, for errors.
const KEY: &str = "Application.sentry_dsn";

/// Keeps the Sentry client alive; reports are flushed when it is dropped.
pub struct ReportingGuard {
    #[cfg(feature = "sentry")]
    _client: Option<sentry::ClientInitGuard>,
}

/// Checks that [`init`] can use `dsn`: it parses, and this build has Sentry support.
pub fn check_dsn(dsn: Option<&Secret>) -> Result<(), ConfigError> {
    match dsn {
        None => Ok(()),
        Some(dsn) => parse(dsn).map(drop),
    }
}

#[cfg(feature = "sentry")]
fn parse(dsn: &Secret) -> Result<sentry::types::Dsn, ConfigError> {
    // The parser's error names what is missing, never the DSN's text.
    dsn.expose().parse().map_err(|error| ConfigError {
        path: KEY.to_owned(),
        message: format!("not a valid Sentry DSN: {error}"),
    })
}

#[cfg(not(feature = "sentry"))]
fn parse(_dsn: &Secret) -> Result<(), ConfigError> {
    Err(ConfigError {
        path: KEY.to_owned(),
        message: "set, but this mikkoo was built without the sentry feature".to_owned(),
    })
}

/// Starts reporting to `dsn`, if one is configured. Returns the error of [`check_dsn`]
/// for a DSN it cannot use.
pub fn init(dsn: Option<&Secret>) -> Result<ReportingGuard, ConfigError> {
    #[cfg(feature = "sentry")]
    {
        let Some(dsn) = dsn else {
            return Ok(ReportingGuard { _client: None });
        };
        let mut options = sentry::ClientOptions::default();
        options.dsn = Some(parse(dsn)?);
        options.release = Some(concat!("mikkoo@", env!("CARGO_PKG_VERSION")).into());
        options.attach_stacktrace = true;
        Ok(ReportingGuard {
            _client: Some(sentry::init(options)),
        })
    }
    #[cfg(not(feature = "sentry"))]
    {
        check_dsn(dsn).map(|()| ReportingGuard {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_dsn_is_fine() {
        assert_eq!(check_dsn(None), Ok(()));
    }

    #[cfg(feature = "sentry")]
    #[test]
    fn a_malformed_dsn_names_the_key_and_not_the_dsn() {
        let dsn = Secret::new("https://sentry.example.com/no-key-here");
        let error = check_dsn(Some(&dsn)).unwrap_err();
        assert_eq!(error.path, "Application.sentry_dsn");
        assert!(error.message.starts_with("not a valid Sentry DSN"), "{error}");
        assert!(!error.to_string().contains("sentry.example.com"), "{error}");
        let good = Secret::new("https://public@sentry.example.com/42");
        assert_eq!(check_dsn(Some(&good)), Ok(()));
    }
}
