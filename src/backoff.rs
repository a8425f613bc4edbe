//! Exponential backoff with jitter, for everything that retries a server: workers
//! reconnecting, the supervisor restarting a panicked worker, the built-in ticker.

use std::time::Duration;

/// Exponential backoff: 100 ms doubling to 30 s, each delay drawn from its upper half so
/// many workers failing together do not reconnect in lockstep.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The first delay's ceiling.
    pub const FIRST: Duration = Duration::from_millis(100);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(30);

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = Self::FIRST
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        let jitter: f64 = rand::random_range(0.5..=1.0);
        ceiling.mul_f64(jitter)
    }

    /// After a success: the next failure waits the shortest delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_jitter() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays[11] >= Duration::from_secs(15) && delays[11] <= Duration::from_secs(30));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
