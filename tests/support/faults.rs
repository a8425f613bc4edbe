//! Fault injection and delivery accounting for the fault tests and the chaos run.
//!
//! Faults touch only the relay's own connections (found by the names it gives them:
//! `mikkoo <queue> <host>` on RabbitMQ, `mikkoo <queue>` in `pg_stat_activity`), except
//! the server restarts, which every test that uses them takes [`serial`] for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lapin::message::Delivery;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::*;

/// Tests that disturb a whole server hold it for writing, so they run alone; every
/// other fault test holds it for reading, so those run together.
static SERVERS: RwLock<()> = RwLock::const_new(());

/// For a test that stops, restarts or throttles a server everyone uses.
pub async fn serial() -> RwLockWriteGuard<'static, ()> {
    SERVERS.write().await
}

/// For a test that touches only its own relay's connections.
pub async fn shared() -> RwLockReadGuard<'static, ()> {
    SERVERS.read().await
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// RabbitMQ connections whose client-provided name starts with `prefix`: their pids,
/// in the form `rabbitmqctl close_connection` takes.
pub fn rabbit_connections(prefix: &str) -> Vec<String> {
    let listing = run(
        "rabbitmqctl",
        &[
            "-q",
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
        ],
    );
    let needle = format!("{{\"connection_name\",\"{prefix}");
    listing
        .lines()
        .filter(|line| line.contains(&needle))
        .filter_map(|line| line.split('\t').next().map(str::to_owned))
        .collect()
}

/// Force-closes the relay's AMQP connection(s) for `queue`; returns how many.
pub fn close_relay_connection(queue: &str) -> usize {
    let pids = rabbit_connections(&format!("mikkoo {queue} "));
    for pid in &pids {
        run(
            "rabbitmqctl",
            &["-q", "close_connection", pid, "closed by a fault test"],
        );
    }
    pids.len()
}

/// Waits until exactly `n` relay connections for `queue` exist.
pub async fn wait_relay_connections(queue: &str, n: usize) {
    let prefix = format!("mikkoo {queue} ");
    eventually(&format!("{n} AMQP connection(s) named {prefix:?}"), || {
        let prefix = prefix.clone();
        async move {
            let found = tokio::task::spawn_blocking(move || rabbit_connections(&prefix))
                .await
                .unwrap();
            (found.len() == n).then_some(())
        }
    })
    .await;
}

/// Stops the RabbitMQ application (the node stays up).
pub fn rabbit_stop_app() {
    run("rabbitmqctl", &["-q", "stop_app"]);
}

/// Starts the RabbitMQ application again and waits until it accepts connections.
pub async fn rabbit_start_app() {
    run("rabbitmqctl", &["-q", "start_app"]);
    eventually("RabbitMQ to accept connections", || async {
        Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .ok()
            .map(|_| ())
    })
    .await;
}

/// RabbitMQ's memory alarm, raised on purpose: the broker blocks every publishing
/// connection (`connection.blocked`) until [`MemoryAlarm::clear`], or until the guard
/// drops, so a failing test never leaves the broker blocked for the ones after it.
/// Only under [`serial`]: it stops every publisher.
pub struct MemoryAlarm {
    raised: bool,
}

/// The watermark RabbitMQ runs with otherwise (its default).
const MEMORY_WATERMARK: &str = "0.4";

impl MemoryAlarm {
    /// Sets the memory watermark so low that the alarm goes off at once.
    pub fn raise() -> MemoryAlarm {
        run(
            "rabbitmqctl",
            &["-q", "set_vm_memory_high_watermark", "0.0000001"],
        );
        MemoryAlarm { raised: true }
    }

    /// Puts the watermark back: the broker unblocks its connections.
    pub fn clear(mut self) {
        self.raised = false;
        run(
            "rabbitmqctl",
            &["-q", "set_vm_memory_high_watermark", MEMORY_WATERMARK],
        );
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        if self.raised {
            // No panic here: this runs while a failed test unwinds.
            let _ = Command::new("rabbitmqctl")
                .args(["-q", "set_vm_memory_high_watermark", MEMORY_WATERMARK])
                .status();
        }
    }
}

/// Terminates the relay's PostgreSQL backends for `queue`; returns how many.
pub async fn terminate_relay_backends(queue: &str) -> i64 {
    let client = pg().await;
    let name = format!("mikkoo {queue}");
    let row = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .await
        .unwrap();
    row.get(0)
}

/// Restarts PostgreSQL and waits until it accepts connections.
pub async fn restart_postgres() {
    let version = run("sh", &["-c", "ls /etc/postgresql | head -n 1"]);
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", version.trim(), "main", "restart"],
    );
    eventually("PostgreSQL to accept connections", || async {
        tokio_postgres::connect(PG_URL, NoTls).await.ok().map(|_| ())
    })
    .await;
}

/// What a test expects to arrive, grouped by the batch it was inserted in.
#[derive(Debug, Default)]
pub struct Ledger {
    /// body → index of the batch it was inserted in
    expected: HashMap<String, usize>,
    batches: usize,
}

/// What the accounting needs of one delivery.
#[derive(Clone, Debug)]
pub struct Received {
    pub body: String,
    pub message_id: Option<String>,
    /// The broker redelivered it to the test's consumer (after the consumer's own
    /// connection dropped): not a copy the relay made.
    pub redelivered: bool,
}

impl Received {
    pub fn of(delivery: &Delivery) -> Received {
        Received {
            body: body(delivery),
            message_id: delivery.properties.message_id().as_ref().map(|id| id.to_string()),
            redelivered: delivery.redelivered,
        }
    }
}

/// Expected events not seen yet, updated one delivery at a time.
#[derive(Debug)]
pub struct Missing {
    bodies: std::collections::HashSet<String>,
}

impl Missing {
    pub fn saw(&mut self, delivery: &Delivery) {
        self.bodies.remove(&body(delivery));
    }

    pub fn is_empty(&self) -> bool {
        self.bodies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.bodies.len()
    }
}

/// The accounting of what arrived against what was expected.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Distinct expected events that arrived.
    pub delivered: usize,
    /// Expected events that did not arrive.
    pub lost: Vec<String>,
    /// Extra copies that arrived.
    pub duplicates: usize,
    /// Batches that the extra copies belong to.
    pub duplicate_batches: BTreeSet<usize>,
    /// Events whose copies carried different message ids.
    pub inconsistent_ids: Vec<String>,
    /// Messages nobody expected.
    pub unexpected: usize,
}

impl Ledger {
    /// Records one inserted batch.
    pub fn expect_batch(&mut self, bodies: &[String]) {
        for body in bodies {
            self.expected.insert(body.clone(), self.batches);
        }
        self.batches += 1;
    }

    pub fn len(&self) -> usize {
        self.expected.len()
    }

    /// Tracks which expected events have not arrived yet.
    pub fn missing(&self) -> Missing {
        Missing {
            bodies: self.expected.keys().cloned().collect(),
        }
    }

    /// True when every expected body is among `deliveries`.
    pub fn all_arrived(&self, deliveries: &[Delivery]) -> bool {
        let mut missing = self.missing();
        deliveries.iter().for_each(|d| missing.saw(d));
        missing.is_empty()
    }

    /// Accounts `deliveries` (ignoring the broker redelivering to the test's own
    /// consumer after a reconnect: those are not the relay's doing).
    pub fn verify(&self, deliveries: &[Delivery]) -> Verdict {
        self.verify_received(deliveries.iter().map(Received::of))
    }

    /// [`Ledger::verify`] over what was kept of each delivery.
    pub fn verify_received(&self, received: impl IntoIterator<Item = Received>) -> Verdict {
        let mut copies: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
        let mut verdict = Verdict::default();
        for Received {
            body,
            message_id,
            redelivered,
        } in received
        {
            if !self.expected.contains_key(&body) {
                verdict.unexpected += 1;
                continue;
            }
            let seen = copies.entry(body).or_default();
            if redelivered && seen.contains(&message_id) {
                continue;
            }
            seen.push(message_id);
        }
        for (body, batch) in &self.expected {
            match copies.get(body) {
                None => verdict.lost.push(body.clone()),
                Some(ids) => {
                    verdict.delivered += 1;
                    if ids.len() > 1 {
                        verdict.duplicates += ids.len() - 1;
                        verdict.duplicate_batches.insert(*batch);
                    }
                    if ids.iter().any(|id| id != &ids[0]) {
                        verdict.inconsistent_ids.push(body.clone());
                    }
                }
            }
        }
        verdict.lost.sort();
        verdict
    }
}

impl Verdict {
    /// The promise of SPEC §6.1 for one fault: nothing lost, duplicates within at most
    /// `max_batches` batches, and every copy with the same message id.
    pub fn assert_promise(&self, max_batches: usize) {
        assert!(
            self.lost.is_empty(),
            "{} events lost, e.g. {:?}",
            self.lost.len(),
            &self.lost[..self.lost.len().min(5)]
        );
        assert!(
            self.duplicate_batches.len() <= max_batches,
            "duplicates in {} batches ({:?}), allowed {max_batches}",
            self.duplicate_batches.len(),
            self.duplicate_batches
        );
        assert!(
            self.inconsistent_ids.is_empty(),
            "copies with different message ids: {:?}",
            self.inconsistent_ids
        );
        assert_eq!(self.unexpected, 0, "messages nobody inserted arrived");
    }
}

/// Inserts `batches` batches of `per_batch` events to `exchange`, recording them.
pub async fn insert_batches(
    queue: &mut PgQueue,
    ledger: &mut Ledger,
    exchange: &str,
    tag: &str,
    batches: usize,
    per_batch: usize,
) {
    for _ in 0..batches {
        let bodies = queue
            .insert_generated(exchange, &format!("{tag}-{}", ledger.batches), per_batch)
            .await;
        ledger.expect_batch(&bodies);
    }
}

/// Worker settings that make a batch take long enough to be cut in the middle: one
/// message in flight at a time, small fetches.
pub const SLOW_BATCHES: &str = "max_in_flight: 1\nfetch_size: 10";

/// Waits until at least `n` messages arrived (keeping them in `deliveries`) while the
/// relay is still inside a batch, so the fault the test injects next lands mid-batch.
pub async fn wait_mid_batch(sink: &mut Sink, queue: &PgQueue, deliveries: &mut Vec<Delivery>, n: usize) {
    while deliveries.len() < n {
        deliveries.extend(sink.take(1).await);
    }
    assert!(
        queue.open_batch().await.is_some(),
        "the batch finished before the fault could be injected; the test needs a bigger batch"
    );
}

/// Adds to `deliveries` until every expected event arrived and the relay finished every
/// batch; then waits for a sentinel event, so copies still on their way are counted too.
pub async fn collect_all(
    sink: &mut Sink,
    queue: &mut PgQueue,
    ledger: &Ledger,
    deliveries: &mut Vec<Delivery>,
) {
    let deadline = tokio::time::Instant::now() + DEADLINE * 4;
    let mut missing = ledger.missing();
    deliveries.iter().for_each(|d| missing.saw(d));
    while !missing.is_empty() {
        if tokio::time::Instant::now() > deadline {
            let verdict = ledger.verify(deliveries);
            panic!(
                "only {} distinct of {} events arrived, missing e.g. {:?}",
                verdict.delivered,
                ledger.len(),
                &verdict.lost[..verdict.lost.len().min(5)]
            );
        }
        if let Some(delivery) = sink.next_within(Duration::from_millis(200)).await {
            missing.saw(&delivery);
            deliveries.push(delivery);
        }
    }
    queue.wait_drained().await;
    let sentinel = unique("sentinel");
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", &sentinel)])
        .await;
    loop {
        let delivery = sink.take(1).await.remove(0);
        if body(&delivery) == sentinel {
            break;
        }
        deliveries.push(delivery);
    }
}

/// A TCP proxy on loopback in front of a server, for faults the real servers cannot be
/// asked to produce: refusing connections until started, or going silent.
pub struct Proxy {
    pub port: u16,
    target: String,
    /// Connections numbered below this no longer forward bytes (a broker that went
    /// silent without closing anything); later ones work.
    stall_below: Arc<AtomicU64>,
    next_connection: Arc<AtomicU64>,
    listener: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to `target` on a free port that is not listening yet.
    pub async fn reserved(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        Proxy {
            port,
            target: target.to_owned(),
            stall_below: Arc::new(AtomicU64::new(0)),
            next_connection: Arc::new(AtomicU64::new(0)),
            listener: None,
        }
    }

    /// Starts accepting and forwarding.
    pub async fn start(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let target = self.target.clone();
        let stall_below = Arc::clone(&self.stall_below);
        let next_connection = Arc::clone(&self.next_connection);
        self.listener = Some(tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = target.clone();
                let stall = Stall {
                    id: next_connection.fetch_add(1, Ordering::SeqCst),
                    below: Arc::clone(&stall_below),
                };
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&target).await {
                        forward(client, server, stall).await;
                    }
                });
            }
        }));
    }

    /// Every connection open now goes silent; new ones work.
    pub fn stall_existing(&self) {
        self.stall_below
            .store(self.next_connection.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stall_below.store(u64::MAX, Ordering::SeqCst);
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

/// Whether one proxied connection has gone silent.
#[derive(Clone)]
struct Stall {
    id: u64,
    below: Arc<AtomicU64>,
}

impl Stall {
    fn is_stalled(&self) -> bool {
        self.id < self.below.load(Ordering::SeqCst)
    }
}

async fn forward(client: TcpStream, server: TcpStream, stall: Stall) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, stall.clone()),
        pump(server_read, client_write, stall)
    );
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stall: Stall,
) {
    use tokio::io::AsyncReadExt;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if stall.is_stalled() {
            // Swallow everything and never answer: the peer sees silence, not a close.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
