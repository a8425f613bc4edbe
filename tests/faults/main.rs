//! Fault tests (SPEC §4, §6, §8): the relay's connections are cut, the servers
//! restarted, the process killed or stopped, a second instance started, while events
//! flow. Each test checks by event that nothing was lost, that duplicates stay within
//! one batch and carry the same `message_id`, and that the relay goes on afterwards.
//!
//! Tests that disturb a whole server take `faults::serial()`; the others touch only
//! their own relay's connections and run in parallel.

// Set-up failures are test failures: unwrapping is how the helpers report them.
#![allow(clippy::unwrap_used)]

#[path = "../support/mod.rs"]
mod support;

mod process;
mod servers;
mod standby;
