//! Error reports to Sentry (`Application.sentry_dsn`; cargo feature `sentry`, on by
//! default).
//!
//! Once initialised, every log line at ERROR becomes a Sentry event (lines below it
//! become breadcrumbs), and panics are reported. The client starts a thread, so it is
//! initialised after detaching. Nothing secret reaches it: mikkoo's log lines and
//! errors never carry passwords (URLs are redacted), and the DSN itself is a
//! [`Secret`].

use crate::config::Secret;

/// Keeps the Sentry client alive; reports are flushed when it is dropped.
pub struct ReportingGuard {
    #[cfg(feature = "sentry")]
    _client: Option<sentry::ClientInitGuard>,
}

/// Starts reporting to `dsn`, if one is configured. Returns an error for a DSN that
/// does not parse (a configuration error) or when the build has no Sentry support.
pub fn init(dsn: Option<&Secret>) -> Result<ReportingGuard, String> {
    #[cfg(feature = "sentry")]
    {
        let Some(dsn) = dsn else {
            return Ok(ReportingGuard { _client: None });
        };
        let parsed: sentry::types::Dsn = dsn
            .expose()
            .parse()
            .map_err(|error| format!("Application.sentry_dsn is not a valid DSN: {error}"))?;
        let mut options = sentry::ClientOptions::default();
        options.dsn = Some(parsed);
        options.release = Some(concat!("mikkoo@", env!("CARGO_PKG_VERSION")).into());
        options.attach_stacktrace = true;
        Ok(ReportingGuard {
            _client: Some(sentry::init(options)),
        })
    }
    #[cfg(not(feature = "sentry"))]
    {
        match dsn {
            None => Ok(ReportingGuard {}),
            Some(_) => Err(
                "Application.sentry_dsn is set but this mikkoo was built without the sentry feature".into(),
            ),
        }
    }
}
