//! How the supervisor asks a worker to stop, and why.
//!
//! The reason matters for `unregister: true`: a worker stopped for good (shutdown, or
//! its queue removed from the configuration) unregisters its consumer, but one stopped
//! only to be started again with reloaded settings must not, or PgQ would drop every
//! event inserted until the new worker registers again. A replacement's stop for good
//! reaches the worker it replaces while that one is still stopping, so a shutdown in
//! the middle of a restart still unregisters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// A stop request shared by the supervisor and one worker.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    token: CancellationToken,
    /// Set before `token` is cancelled when the worker will be started again.
    for_restart: Arc<AtomicBool>,
    /// The signal of the worker this one replaces, until that one has stopped.
    predecessor: Arc<Mutex<Option<StopSignal>>>,
}

impl StopSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// The signal of a worker that replaces the one `previous` stops.
    pub fn succeeding(previous: StopSignal) -> StopSignal {
        let signal = StopSignal::new();
        *signal.lock_predecessor() = Some(previous);
        signal
    }

    /// The replaced worker has stopped: nothing needs to reach it any more.
    pub fn predecessor_stopped(&self) {
        self.lock_predecessor().take();
    }

    /// Asks the worker to stop for good (even after a stop for restart), and the one it
    /// replaces, if that one is still stopping.
    pub fn stop(&self) {
        self.for_restart.store(false, Ordering::SeqCst);
        self.token.cancel();
        if let Some(predecessor) = self.lock_predecessor().take() {
            predecessor.stop();
        }
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

    fn lock_predecessor(&self) -> std::sync::MutexGuard<'_, Option<StopSignal>> {
        self.predecessor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        for_restart.stop();
        assert!(for_restart.is_final(), "a later stop for good wins");
    }

    #[test]
    fn a_replacement_stopped_for_good_makes_its_stopping_predecessor_final() {
        let old = StopSignal::new();
        old.stop_for_restart();
        let new = StopSignal::succeeding(old.clone());
        new.stop();
        assert!(old.is_final() && new.is_final());

        let done = StopSignal::new();
        done.stop_for_restart();
        let next = StopSignal::succeeding(done.clone());
        next.predecessor_stopped();
        next.stop();
        assert!(!done.is_final(), "a predecessor that has stopped is left alone");
    }
}
