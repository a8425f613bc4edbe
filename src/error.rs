//! Errors that end a worker's connection, and what the worker does about them.
//!
//! Per-event trouble (a nack, an unroutable message, an exchange that does not exist) is
//! not an error here: it is an [`Outcome`](crate::amqp::Outcome) the worker settles by
//! retrying or dead-lettering that event. A [`WorkerError`] means a connection can no
//! longer be trusted; [`WorkerError::broken_link`] says which one the worker must open
//! again (after a backoff), keeping the other — and with it the PgQ batch, the advisory
//! lock, or the AMQP connection.

use crate::amqp::AmqpError;
use crate::pgq::PgqError;

/// The connection a failure broke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The PostgreSQL session (and with it the batch transaction and the lock).
    Postgres,
    /// The AMQP connection.
    Broker,
}

/// A failure that ends one of the worker's connections.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// PostgreSQL failed.
    #[error(transparent)]
    Postgres(#[from] PgqError),
    /// RabbitMQ could not be reached or used.
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    /// The AMQP connection failed while publishing.
    #[error("lost the RabbitMQ connection: {reason}")]
    BrokerLost {
        /// What happened.
        reason: String,
    },
}

impl WorkerError {
    /// Which connection to open again.
    pub fn broken_link(&self) -> Link {
        match self {
            WorkerError::Postgres(_) => Link::Postgres,
            WorkerError::Amqp(_) | WorkerError::BrokerLost { .. } => Link::Broker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_names_the_link_to_reopen() {
        let pg = WorkerError::Postgres(PgqError::ExtensionMissing {
            database: "db".into(),
        });
        assert_eq!(pg.broken_link(), Link::Postgres);
        let lost = WorkerError::BrokerLost {
            reason: "reset".into(),
        };
        assert_eq!(lost.broken_link(), Link::Broker);
        let amqp = WorkerError::Amqp(AmqpError::Connect {
            target: "h:5672".into(),
            reason: "refused".into(),
        });
        assert_eq!(amqp.broken_link(), Link::Broker);
    }

    #[test]
    fn missing_extension_says_how_to_fix_it() {
        let error = PgqError::ExtensionMissing {
            database: "orders".into(),
        };
        assert_eq!(
            error.to_string(),
            "pgq extension is not installed in database orders: CREATE EXTENSION pgq"
        );
    }
}
