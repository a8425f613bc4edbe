//! How the supervisor asks a worker to stop, and why.
//!
//! The reason matters for `unregister: true`: a worker stopped for good (shutdown, or
//! its queue removed from the configuration) unregisters its consumer, but one stopped
//! only to be started again with reloaded settings must not, or PgQ would drop every
//! event inserted until the new worker registers again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

/// A stop request shared by the supervisor and one worker.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    token: CancellationToken,
    /// Set before `token` is cancelled when the worker will be started again.
    for_restart: Arc<AtomicBool>,
}

impl StopSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// Asks the worker to stop for good.
    pub fn stop(&self) {
        self.token.cancel();
    }

    /// Asks the worker to stop because it is replaced by one with new settings.
    pub fn stop_for_restart(&self) {
        self.for_restart.store(true, Ordering::SeqCst);
        self.token.cancel();
    }

    /// Whether a stop was asked for.
    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once a stop is asked for.
    pub async fn requested(&self) {
        self.token.cancelled().await;
    }

    /// Whether the worker is stopping for good (so `unregister: true` applies).
    pub fn is_final(&self) -> bool {
        self.is_requested() && !self.for_restart.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stop_for_good_is_final() {
        let for_good = StopSignal::new();
        assert!(!for_good.is_requested() && !for_good.is_final());
        for_good.stop();
        assert!(for_good.is_requested() && for_good.is_final());

        let for_restart = StopSignal::new();
        for_restart.clone().stop_for_restart();
        assert!(for_restart.is_requested() && !for_restart.is_final());
    }
}
