//! The built-in PgQ ticker (`Application.ticker`), so a deployment needs no pgqd.
//!
//! One task per database the workers consume from does what pgqd does there: every
//! `period` it calls `pgq.ticker()` and moves due retry events back into their queues
//! (`pgq.maint_retry_events()` until it has none); every two minutes it runs the
//! operations `pgq.maint_operations()` lists (table rotation, vacuum of PgQ's tables),
//! each in its own transaction as pgqd does. With several relays on one database only
//! the one holding the ticker's advisory lock ticks; the others retry the lock every
//! `period`.
//!
//! A database that cannot be reached is retried with the workers' backoff (100 ms
//! doubling to 30 s, with jitter, through [`backoff::Outage`]); an outage is logged once
//! when it starts and once when the ticker is back, not at every attempt.

use std::fmt;
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::backoff;
use crate::pgconn::PgTarget;

/// Advisory lock key of the ticker (advisory locks are per database).
const TICKER_LOCK_KEY: i64 = 0x6d69_6b6b_6f6f_7469;

/// How often the maintenance operations run (pgqd's default `maint_period`).
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(120);

/// Runs the ticker for the database of `target` until `stop`.
pub async fn run(target: PgTarget, period: Duration, stop: CancellationToken) {
    let database = format!("{}/{}", target.host_port(), target.dbname());
    let mut outage = Outage::new(database.clone());
    while !stop.is_cancelled() {
        let session = async {
            match target.connect("mikkoo ticker").await {
                Ok((client, connection)) => {
                    let _connection = AbortOnDrop(connection);
                    tick_while_connected(&client, &database, period, &stop, &mut outage)
                        .await
                        .map_err(|error| error.to_string())
                }
                Err(error) => Err(error.to_string()),
            }
        };
        // A server that went silent must not hold up shutdown: a stop abandons the
        // connection attempt or the tick in progress (its transaction rolls back).
        let result = tokio::select! {
            result = session => result,
            _ = stop.cancelled() => return,
        };
        // `Ok` only comes back once `stop` is cancelled.
        let Err(error) = result else { continue };
        let retry_in = outage.failed(&error);
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = stop.cancelled() => {}
        }
    }
}

/// Ends the connection's task when dropped: a stopped ticker must not keep its session
/// (and the ticker's advisory lock) open behind a server that went silent.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The ticker's view of its database: reported once when an outage starts and once
/// when it ends.
struct Outage {
    database: String,
    outage: backoff::Outage,
}

impl Outage {
    fn new(database: String) -> Self {
        Outage {
            database,
            outage: backoff::Outage::default(),
        }
    }

    /// Notes a failed session or connection attempt; returns the wait before the next.
    /// Only the first failure of an outage is an error line; the rest are debug lines.
    fn failed(&mut self, error: &dyn fmt::Display) -> Duration {
        let (retry_in, began) = self.outage.failed();
        let database = &self.database;
        if began {
            tracing::error!(%database, %error, "pgq ticker failed; reconnecting with backoff");
        } else {
            tracing::debug!(%database, %error, ?retry_in, "pgq ticker still failing; retrying");
        }
        retry_in
    }

    /// Notes a session doing its work (a whole tick, or a standby's lock check), ending
    /// an outage. Judged by the work, not by the connect: a database that accepts
    /// connections but fails every tick (pgq missing) must still back off.
    fn answered(&mut self) {
        if let Some(down_for) = self.outage.ended() {
            tracing::info!(database = %self.database, ?down_for, "pgq ticker reconnected");
        }
    }
}

/// One session: take the lock (or wait for it), then tick until the session fails or
/// `stop`.
async fn tick_while_connected(
    client: &Client,
    database: &str,
    period: Duration,
    stop: &CancellationToken,
    outage: &mut Outage,
) -> Result<(), tokio_postgres::Error> {
    let mut announced_standby = false;
    loop {
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&TICKER_LOCK_KEY])
            .await?
            .get(0);
        if locked {
            break;
        }
        outage.answered();
        if !announced_standby {
            tracing::info!(%database, "another relay ticks this database; standing by");
            announced_standby = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
    tracing::info!(%database, ?period, "ticking pgq (the built-in ticker holds this database's lock)");
    let mut last_maintenance: Option<Instant> = None;
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.cancelled() => return Ok(()),
        }
        client.query_one("SELECT pgq.ticker()", &[]).await?;
        retry_events(client).await?;
        if last_maintenance.is_none_or(|at| at.elapsed() >= MAINTENANCE_PERIOD) {
            maintain(client, database).await?;
            last_maintenance = Some(Instant::now());
        }
        outage.answered();
    }
}

/// Moves every due retry event back into its queue.
async fn retry_events(client: &Client) -> Result<(), tokio_postgres::Error> {
    loop {
        let moved: i32 = client
            .query_one("SELECT pgq.maint_retry_events()", &[])
            .await?
            .get(0);
        if moved == 0 {
            return Ok(());
        }
    }
}

/// Runs what `pgq.maint_operations()` asks for, each in its own transaction.
async fn maintain(client: &Client, database: &str) -> Result<(), tokio_postgres::Error> {
    let operations = client
        .query("SELECT func_name, func_arg FROM pgq.maint_operations()", &[])
        .await?;
    for operation in operations {
        let function: String = operation.get(0);
        let argument: Option<String> = operation.get(1);
        let result = match (function.as_str(), argument) {
            ("vacuum", Some(table)) => {
                let quoted = client
                    .query_one("SELECT pgq.quote_fqname($1)", &[&table])
                    .await?
                    .get::<_, String>(0);
                client.batch_execute(&format!("VACUUM {quoted}")).await
            }
            (name, argument) if is_pgq_function(name) => {
                let statement = format!("SELECT {name}($1)");
                match argument {
                    Some(argument) => client.query(&statement, &[&argument]).await.map(drop),
                    None => client.query(&format!("SELECT {name}()"), &[]).await.map(drop),
                }
            }
            (name, _) => {
                tracing::warn!(%database, function = name, "skipping a pgq maintenance operation that is not a pgq function");
                Ok(())
            }
        };
        if let Err(error) = result {
            tracing::warn!(%database, %function, %error, "pgq maintenance operation failed");
        }
    }
    Ok(())
}

/// Maintenance operations name functions; only schema-qualified identifiers are run.
fn is_pgq_function(name: &str) -> bool {
    let mut parts = name.split('.');
    let (Some(schema), Some(function), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let identifier =
        |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    identifier(schema) && identifier(function)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_qualified_identifiers_are_run() {
        assert!(super::is_pgq_function("pgq.maint_rotate_tables_step1"));
        assert!(super::is_pgq_function("londiste.periodic_maintenance"));
        assert!(!super::is_pgq_function("pgq.f(); DROP TABLE x; --"));
        assert!(!super::is_pgq_function("vacuum"));
    }
}
