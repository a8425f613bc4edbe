//! Exponential backoff with jitter, for everything that retries a server: workers
//! reconnecting, the supervisor restarting a panicked worker, the built-in ticker,
//! statsd. [`Outage`] adds what a client that reports outages (not every attempt)
//! needs: whether a failure began one, and how long it lasted once it ends.

use std::time::{Duration, Instant};

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

/// A server's outage as a retrying client sees it.
#[derive(Debug, Default)]
pub struct Outage {
    backoff: Backoff,
    /// When the first failed attempt of the current outage was.
    since: Option<Instant>,
}

impl Outage {
    /// A failed attempt: the wait before the next one, and whether this failure began
    /// the outage (the one worth reporting).
    pub fn failed(&mut self) -> (Duration, bool) {
        let began = self.since.is_none();
        self.since.get_or_insert_with(Instant::now);
        (self.backoff.next_delay(), began)
    }

    /// A successful attempt: how long the outage it ends lasted, if there was one.
    pub fn ended(&mut self) -> Option<Duration> {
        self.backoff.reset();
        self.since.take().map(|since| since.elapsed())
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

    #[test]
    fn an_outage_begins_once_and_ends_once() {
        let mut outage = Outage::default();
        assert_eq!(outage.ended(), None, "no outage yet");
        let (first_wait, began) = outage.failed();
        assert!(began && first_wait <= Backoff::FIRST);
        let (second_wait, began) = outage.failed();
        assert!(!began && second_wait >= Backoff::FIRST);
        assert!(outage.ended().is_some());
        assert!(outage.failed().1, "the next failure begins a new outage");
    }
}
