//! End-to-end tests: the real `mikkoo` binary against the real PostgreSQL (with pgq) and
//! RabbitMQ. `scripts/services.sh` starts them; `scripts/test` runs these.

// Set-up failures are test failures: unwrapping is how the helpers report them.
#![allow(clippy::unwrap_used)]

mod cli;
mod delivery;
mod operations;
mod schema;
#[path = "../support/mod.rs"]
mod support;
mod tls;
mod wire;
