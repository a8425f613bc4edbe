//! Helpers for end-to-end tests against the real PostgreSQL (with pgq) and RabbitMQ.
//!
//! Every test gets its own PgQ queue, exchange and AMQP queue names ([`unique`]), waits
//! for conditions with deadlines ([`eventually`]), and cleans up when its guards drop.
//! PgQ is ticked from the test (`pgq.ticker(queue)` with thresholds that make every call
//! tick), so batch boundaries are where the test puts them. The relay is the real binary
//! started with a generated configuration ([`Relay`]).

#![allow(dead_code)]

pub mod faults;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::mpsc;
use tokio_postgres::{Client, NoTls};

pub const PG_URL: &str = "postgresql://postgres@127.0.0.1:5432/postgres";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// How long any condition may take before a test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random: u32 = rand::random();
    format!("{prefix}_{}_{n}_{random:08x}", std::process::id())
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn pg() -> Client {
    let (client, connection) = tokio_postgres::connect(PG_URL, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// One event to insert, column by column (PgQ's names).
#[derive(Clone, Debug, Default)]
pub struct NewEvent {
    pub ev_type: Option<String>,
    pub ev_data: Option<String>,
    pub ev_extra1: Option<String>,
    pub ev_extra2: Option<String>,
    pub ev_extra3: Option<String>,
    pub ev_extra4: Option<String>,
}

impl NewEvent {
    /// An event for `exchange` with `routing_key` and `body`.
    pub fn to(exchange: &str, routing_key: &str, body: &str) -> NewEvent {
        NewEvent {
            ev_type: Some(routing_key.to_owned()),
            ev_data: Some(body.to_owned()),
            ev_extra1: Some(exchange.to_owned()),
            ..NewEvent::default()
        }
    }

    pub fn properties(mut self, json: &str) -> NewEvent {
        self.ev_extra3 = Some(json.to_owned());
        self
    }

    pub fn headers(mut self, json: &str) -> NewEvent {
        self.ev_extra4 = Some(json.to_owned());
        self
    }

    pub fn content_type(mut self, content_type: &str) -> NewEvent {
        self.ev_extra2 = Some(content_type.to_owned());
        self
    }
}

/// A PgQ queue owned by one test: created with the consumer registered, ticked on
/// demand, dropped at the end.
pub struct PgQueue {
    pub name: String,
    pub consumer: String,
    pub client: Client,
}

impl PgQueue {
    /// Creates the queue and registers `mikkoo` as its consumer, so every event the
    /// test inserts from now on belongs to the relay.
    pub async fn create(prefix: &str) -> PgQueue {
        let client = pg().await;
        let name = unique(prefix);
        let consumer = "mikkoo".to_owned();
        client
            .execute("SELECT pgq.create_queue($1)", &[&name])
            .await
            .unwrap();
        for (key, value) in [
            ("ticker_max_count", "1"),
            ("ticker_max_lag", "0"),
            ("ticker_idle_period", "0"),
        ] {
            client
                .execute("SELECT pgq.set_queue_config($1, $2, $3)", &[&name, &key, &value])
                .await
                .unwrap();
        }
        client
            .execute("SELECT pgq.register_consumer($1, $2)", &[&name, &consumer])
            .await
            .unwrap();
        PgQueue {
            name,
            consumer,
            client,
        }
    }

    /// Opens a new session after the server restarted.
    pub async fn reconnect(&mut self) {
        self.client = eventually("a new PostgreSQL session", || async {
            let (client, connection) = tokio_postgres::connect(PG_URL, NoTls).await.ok()?;
            tokio::spawn(connection);
            Some(client)
        })
        .await;
    }

    /// Inserts events in one transaction (so they land in one batch) and returns their ids.
    pub async fn insert(&mut self, events: &[NewEvent]) -> Vec<i64> {
        let transaction = self.client.transaction().await.unwrap();
        let mut ids = Vec::with_capacity(events.len());
        for event in events {
            let row = transaction
                .query_one(
                    "SELECT pgq.insert_event($1, $2, $3, $4, $5, $6, $7)",
                    &[
                        &self.name,
                        &event.ev_type,
                        &event.ev_data,
                        &event.ev_extra1,
                        &event.ev_extra2,
                        &event.ev_extra3,
                        &event.ev_extra4,
                    ],
                )
                .await
                .unwrap();
            ids.push(row.get(0));
        }
        transaction.commit().await.unwrap();
        ids
    }

    /// Inserts `n` events to `exchange` with bodies `{tag}-{i}` in one statement, then
    /// ticks, so they form one batch. Returns the bodies.
    pub async fn insert_generated(&mut self, exchange: &str, tag: &str, n: usize) -> Vec<String> {
        let count = i32::try_from(n).unwrap();
        self.client
            .execute(
                "SELECT pgq.insert_event($1, 'k', $2 || '-' || i, $3, NULL, NULL, NULL) \
                 FROM generate_series(0, $4 - 1) AS i",
                &[&self.name, &tag, &exchange, &count],
            )
            .await
            .unwrap();
        self.tick().await;
        (0..n).map(|i| format!("{tag}-{i}")).collect()
    }

    /// True while the relay's consumer is registered on the queue.
    pub async fn is_registered(&self) -> bool {
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM pgq.get_consumer_info($1) WHERE consumer_name = $2",
                &[&self.name, &self.consumer],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) == 1
    }

    /// Holds the consumer's subscription row (on a session of its own) until the guard
    /// is released: `pgq.next_batch` and `pgq.finish_batch` of the relay wait behind it.
    pub async fn lock_subscription(&self) -> SubscriptionLock {
        let client = pg().await;
        client.batch_execute("BEGIN").await.unwrap();
        client
            .execute(
                "SELECT 1 FROM pgq.subscription s JOIN pgq.queue q ON q.queue_id = s.sub_queue \
                 WHERE q.queue_name = $1 FOR UPDATE OF s",
                &[&self.name],
            )
            .await
            .unwrap();
        SubscriptionLock { client }
    }

    /// The consumer's open batch, if any.
    pub async fn open_batch(&self) -> Option<i64> {
        self.client
            .query_one(
                "SELECT current_batch FROM pgq.get_consumer_info($1, $2)",
                &[&self.name, &self.consumer],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Inserts events and ticks, so they form one batch.
    pub async fn insert_batch(&mut self, events: &[NewEvent]) -> Vec<i64> {
        let ids = self.insert(events).await;
        self.tick().await;
        ids
    }

    /// Makes a tick now.
    pub async fn tick(&self) {
        self.client
            .query_one("SELECT pgq.ticker($1)", &[&self.name])
            .await
            .unwrap();
    }

    /// Moves due retry events back into the queue (as pgqd's maintenance does; pgqd may
    /// beat the test to it, which is fine) and ticks.
    pub async fn bring_back_retries(&self) {
        while self.retry_queue_len().await > 0 {
            self.client
                .query_one("SELECT pgq.maint_retry_events()", &[])
                .await
                .unwrap();
        }
        self.tick().await;
    }

    /// Events waiting in PgQ's retry queue for this queue.
    pub async fn retry_queue_len(&self) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM pgq.retry_queue r JOIN pgq.queue q ON q.queue_id = r.ev_queue WHERE q.queue_name = $1",
                &[&self.name],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// True when the consumer has no open batch and has consumed the queue's last tick.
    pub async fn is_drained(&self) -> bool {
        let row = self
            .client
            .query_opt(
                "SELECT c.current_batch IS NULL AND c.last_tick = q.last_tick_id \
                 FROM pgq.get_consumer_info($1, $2) c, pgq.get_queue_info($1) q",
                &[&self.name, &self.consumer],
            )
            .await
            .unwrap();
        row.is_some_and(|row| row.get::<_, Option<bool>>(0) == Some(true))
    }

    /// Waits until the relay finished every batch ticked so far.
    pub async fn wait_drained(&self) {
        eventually("the relay to finish every batch", || async {
            self.is_drained().await.then_some(())
        })
        .await;
    }

    /// Events of this queue waiting in PgQ's retry queue: (ev_id, ev_retry), by ev_id.
    pub async fn retry_events(&self) -> Vec<(i64, Option<i32>)> {
        self.client
            .query(
                "SELECT r.ev_id, r.ev_retry FROM pgq.retry_queue r JOIN pgq.queue q ON q.queue_id = r.ev_queue \
                 WHERE q.queue_name = $1 ORDER BY r.ev_id",
                &[&self.name],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    /// Makes every event of this queue in PgQ's retry queue due now, whatever
    /// `retry_delay` said (a long delay keeps pgqd's own maintenance from bringing them
    /// back before the test looks); [`PgQueue::bring_back_retries`] then brings them back.
    pub async fn make_retries_due(&self) {
        self.client
            .execute(
                "UPDATE pgq.retry_queue r SET ev_retry_after = now() FROM pgq.queue q \
                 WHERE q.queue_id = r.ev_queue AND q.queue_name = $1",
                &[&self.name],
            )
            .await
            .unwrap();
    }

    /// Makes a tick now and returns its id.
    pub async fn tick_id(&self) -> i64 {
        self.client
            .query_one("SELECT pgq.ticker($1)", &[&self.name])
            .await
            .unwrap()
            .get::<_, Option<i64>>(0)
            .expect("pgq.ticker made a tick")
    }

    /// The consumer's position: the last tick it finished and the tick that ends its
    /// open batch (`None` when no batch is open).
    pub async fn consumer_ticks(&self) -> (i64, Option<i64>) {
        let row = self
            .client
            .query_one(
                "SELECT last_tick, next_tick FROM pgq.get_consumer_info($1, $2)",
                &[&self.name, &self.consumer],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    }

    /// Dead-letter rows of this queue: (ev_id, ev_retry, reason).
    pub async fn dead_letters(&self) -> Vec<(i64, Option<i32>, String)> {
        let exists: bool = self
            .client
            .query_one("SELECT to_regclass('mikkoo.dead_letter') IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        if !exists {
            return Vec::new();
        }
        self.client
            .query(
                "SELECT ev_id, ev_retry, reason FROM mikkoo.dead_letter WHERE queue = $1 ORDER BY ev_id",
                &[&self.name],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect()
    }
}

/// A database of the test's own with pgq, dropped with the guard.
pub struct Database {
    pub name: String,
    pub client: Client,
}

impl Database {
    pub async fn create(prefix: &str) -> Database {
        let name = unique(prefix);
        pg().await
            .execute(&format!("CREATE DATABASE {name}"), &[])
            .await
            .unwrap();
        let url = format!("postgresql://postgres@127.0.0.1:5432/{name}");
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        client.batch_execute("CREATE EXTENSION pgq").await.unwrap();
        Database { name, client }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        clean_up(async move {
            let _ = pg()
                .await
                .execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), &[])
                .await;
        });
    }
}

/// Runs async clean-up from a `Drop` to completion. The test's runtime cannot be
/// entered from there; a short-lived runtime on a thread of its own can.
pub fn clean_up(work: impl Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work);
    })
    .join();
}

impl Drop for PgQueue {
    fn drop(&mut self) {
        let name = self.name.clone();
        clean_up(async move {
            let client = pg().await;
            // A failed test may still hold a lock on the queue from a session on its
            // own (now blocked) runtime: give up rather than hang.
            let _ = client.batch_execute("SET lock_timeout = '5s'").await;
            let _ = client.execute("SELECT pgq.drop_queue($1, true)", &[&name]).await;
            let _ = client
                .execute("DELETE FROM mikkoo.dead_letter WHERE queue = $1", &[&name])
                .await;
        });
    }
}

/// A held lock on a consumer's subscription row; [`SubscriptionLock::release`] lets go.
pub struct SubscriptionLock {
    client: Client,
}

impl SubscriptionLock {
    pub async fn release(self) {
        self.client.batch_execute("ROLLBACK").await.unwrap();
    }
}

/// An exchange with a queue bound to it, collecting what arrives.
///
/// By default the queue is exclusive and vanishes with the test's connection. A
/// [`Sink::durable`] one survives a broker restart: the test calls
/// [`Sink::reconnect`] afterwards and goes on collecting; it is deleted on drop.
pub struct Sink {
    pub exchange: String,
    pub queue: String,
    routing_keys: Vec<String>,
    durable: bool,
    connection: Connection,
    sender: mpsc::UnboundedSender<Delivery>,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
}

impl Sink {
    /// A topic exchange with a queue bound to `#` (receives every routing key).
    pub async fn topic(prefix: &str) -> Sink {
        Self::bound(prefix, &["#"]).await
    }

    /// A topic exchange with a queue bound to the given routing keys.
    pub async fn bound(prefix: &str, routing_keys: &[&str]) -> Sink {
        Self::declare(prefix, routing_keys, false).await
    }

    /// A durable exchange and queue (bound to `#`) that survive a broker restart.
    pub async fn durable(prefix: &str) -> Sink {
        Self::declare(prefix, &["#"], true).await
    }

    async fn declare(prefix: &str, routing_keys: &[&str], durable: bool) -> Sink {
        let (sender, deliveries) = mpsc::unbounded_channel();
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let sink = Sink {
            exchange: unique(&format!("{prefix}_x")),
            queue: unique(&format!("{prefix}_q")),
            routing_keys: routing_keys.iter().map(|k| (*k).to_owned()).collect(),
            durable,
            connection,
            sender,
            deliveries,
        };
        sink.declare_and_consume().await;
        sink
    }

    async fn declare_and_consume(&self) {
        let channel = self.connection.create_channel().await.unwrap();
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: self.durable,
                    auto_delete: !self.durable,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: self.durable,
                    exclusive: !self.durable,
                    auto_delete: !self.durable,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        for key in &self.routing_keys {
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        consume(&channel, &self.queue, self.sender.clone()).await;
    }

    /// Connects again after the broker went away (durable sinks only).
    pub async fn reconnect(&mut self) {
        assert!(self.durable, "only a durable sink survives the broker going away");
        self.connection = eventually("the test's own AMQP connection", || async {
            Connection::connect(AMQP_URL, ConnectionProperties::default())
                .await
                .ok()
        })
        .await;
        self.declare_and_consume().await;
    }

    /// Waits for `n` messages (and no fewer), in arrival order.
    pub async fn take(&mut self, n: usize) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while out.len() < n {
            match tokio::time::timeout_at(deadline, self.deliveries.recv()).await {
                Ok(Some(delivery)) => out.push(delivery),
                Ok(None) => panic!("consumer closed after {} of {n} messages", out.len()),
                Err(_) => panic!("timed out with {} of {n} messages on {}", out.len(), self.queue),
            }
        }
        out
    }

    /// Waits for the next message, or `None` after `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Delivery> {
        tokio::time::timeout(wait, self.deliveries.recv())
            .await
            .ok()
            .flatten()
    }

    /// Messages that arrived so far, without waiting.
    pub fn drain_now(&mut self) -> Vec<Delivery> {
        let mut out = Vec::new();
        while let Ok(delivery) = self.deliveries.try_recv() {
            out.push(delivery);
        }
        out
    }

    /// Binds the queue to one more routing key (on the sink's own connection, since the
    /// queue is exclusive to it).
    pub async fn bind(&self, routing_key: &str) {
        let channel = self.connection.create_channel().await.unwrap();
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Deletes the exchange (to make publishes to it fail).
    pub async fn delete_exchange(&self) {
        let channel = self.connection.create_channel().await.unwrap();
        channel
            .exchange_delete(self.exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if !self.durable {
            return;
        }
        let (exchange, queue) = (self.exchange.clone(), self.queue.clone());
        clean_up(async move {
            if let Ok(connection) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                && let Ok(channel) = connection.create_channel().await
            {
                let _ = channel
                    .queue_delete(
                        queue.as_str().into(),
                        lapin::options::QueueDeleteOptions::default(),
                    )
                    .await;
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        });
    }
}

/// A queue that holds at most `max_length` messages and refuses more
/// (`x-overflow: reject-publish`: RabbitMQ nacks a publish routed to it while it is full),
/// bound to an existing exchange with one routing key. Nobody consumes it, so it fills
/// up; the test takes messages out with [`BoundedQueue::get`]. Exclusive to its own
/// connection, so it vanishes with the test.
pub struct BoundedQueue {
    pub name: String,
    channel: lapin::Channel,
    /// Keeps the exclusive queue alive.
    _connection: Connection,
}

impl BoundedQueue {
    pub async fn declare(prefix: &str, exchange: &str, routing_key: &str, max_length: i64) -> BoundedQueue {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        let name = unique(&format!("{prefix}_bounded"));
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(max_length));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        BoundedQueue {
            name,
            channel,
            _connection: connection,
        }
    }

    /// Publishes `body` to `exchange` with `routing_key` from the test (with a publisher
    /// confirm) and returns whether the broker acked it.
    pub async fn publish(&self, exchange: &str, routing_key: &str, body: &str) -> bool {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions::default(),
                body.as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap()
            .is_ack()
    }

    /// Takes the oldest message out of the queue (acknowledged), if there is one.
    pub async fn get(&self) -> Option<Delivery> {
        self.channel
            .basic_get(
                self.name.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .map(|message| message.delivery)
    }

    /// Messages in the queue now.
    pub async fn len(&self) -> u32 {
        self.channel
            .queue_declare(
                self.name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }
}

/// Consumes `queue` into `sender`, acking each message after handing it on.
async fn consume(channel: &lapin::Channel, queue: &str, sender: mpsc::UnboundedSender<Delivery>) {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            unique("test_consumer").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let acker = delivery.acker.clone();
            if sender.send(delivery).is_err() {
                break;
            }
            let _ = acker.ack(BasicAckOptions::default()).await;
        }
    });
}

/// A header's value, if present.
pub fn header<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref()?.inner().get(name)
}

/// A long-string header as text.
pub fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    match header(delivery, name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        other => panic!("header {name} is {other:?}, not a string"),
    }
}

pub fn body(delivery: &Delivery) -> String {
    String::from_utf8(delivery.data.clone()).unwrap()
}

/// The relay binary, started with a configuration file of the test's.
pub struct Relay {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

/// Path of the relay binary under test: cargo's for tests; for examples (the chaos
/// run), the `mikkoo` built next to them in `target/<profile>/`.
pub fn binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_mikkoo") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|examples| examples.parent())
        .unwrap()
        .join("mikkoo")
}

/// A worker configuration block for `queue` with fast test timings; `extra` lines are
/// added as they are (indented six spaces).
pub fn worker_yaml(queue: &str, extra: &str) -> String {
    let mut text = format!(
        "    {queue}:\n      postgres_url: {PG_URL}\n      rabbitmq_url: {AMQP_URL}\n      wait_duration: 0.05\n      retry_delay: 0\n"
    );
    for line in extra.lines().filter(|line| !line.trim().is_empty()) {
        text.push_str("      ");
        text.push_str(line.trim_start());
        text.push('\n');
    }
    text
}

/// A worker block like [`worker_yaml`] that reaches RabbitMQ through `rabbitmq` (the
/// body of a YAML flow mapping, e.g. `host: 127.0.0.1, port: 1`) instead of the local
/// broker's URL.
pub fn worker_yaml_via(queue: &str, extra: &str, rabbitmq: &str) -> String {
    worker_yaml(queue, extra).replace(
        &format!("rabbitmq_url: {AMQP_URL}"),
        &format!("rabbitmq: {{{rabbitmq}}}"),
    )
}

/// A whole configuration with the given worker blocks.
pub fn config_yaml(workers: &[String]) -> String {
    format!(
        "Application:\n  poll_interval: 1\n  workers:\n{}",
        workers.concat()
    )
}

impl Relay {
    /// Starts `mikkoo -f` with `config` (YAML text).
    pub fn start(config: &str) -> Relay {
        Self::start_with(config, &[])
    }

    /// Starts `mikkoo -f` with `config` and extra arguments.
    pub fn start_with(config: &str, args: &[&str]) -> Relay {
        Self::spawn(config, args, Some("mikkoo=debug,warn,lapin=off"))
    }

    /// Starts `mikkoo -f` with levels from the configuration's `Logging` section only.
    pub fn start_with_configured_levels(config: &str) -> Relay {
        Self::spawn(config, &[], None)
    }

    fn spawn(config: &str, args: &[&str], log_filter: Option<&str>) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("mikkoo.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log_path = dir.path().join("relay.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(binary());
        command
            .arg("-f")
            .arg("-c")
            .arg(&config_path)
            .args(args)
            .env_remove("MIKKOO_LOG");
        if let Some(filter) = log_filter {
            command.env("MIKKOO_LOG", filter);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start mikkoo");
        Relay {
            child: Some(child),
            dir,
            config_path,
            log_path,
        }
    }

    /// Everything the relay logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        eventually(&format!("the relay to log {needle:?}"), || async {
            self.log().contains(needle).then_some(())
        })
        .await;
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or_default()
    }

    /// Sends `signal` to the relay.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the relay to exit.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("relay running");
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
    }

    /// Stops the relay with SIGTERM and returns its exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        tokio::time::timeout(DEADLINE, self.wait_exit())
            .await
            .expect("relay stops within the deadline")
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- relay log ----\n{}", self.log());
        }
    }
}

/// Sends SIGTERM to a detached relay when dropped, so a failing test leaves none behind.
pub struct DaemonGuard(pub nix::unistd::Pid);

impl Drop for DaemonGuard {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGTERM);
    }
}

/// The binary with `args`, its log levels from its arguments and configuration only
/// (`MIKKOO_LOG` of the test's environment is not passed on).
pub fn mikkoo_command(args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command.args(args).env_remove("MIKKOO_LOG");
    command
}

/// Runs the binary to completion and returns (status, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (ExitStatus, String, String) {
    let output = mikkoo_command(args).output().expect("run mikkoo");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes `text` to a file in a fresh temporary directory.
pub fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mikkoo.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A free TCP port on loopback (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on 127.0.0.1:`port`: the status code and body, or `None` while nothing
/// answers.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// Waits until `GET path` answers `status` and returns the body.
pub async fn wait_http(port: u16, path: &str, status: u16) -> String {
    eventually(&format!("GET {path} to answer {status}"), || async {
        http_get(port, path)
            .await
            .filter(|(s, _)| *s == status)
            .map(|(_, body)| body)
    })
    .await
}

/// `config` (from [`config_yaml`]) with the HTTP endpoints on 127.0.0.1:`port`.
pub fn with_http(config: String, port: u16) -> String {
    format!("{config}{}", http_yaml(port))
}

/// The `Application.http` lines for 127.0.0.1:`port`.
pub fn http_yaml(port: u16) -> String {
    format!("  http:\n    listen: \"127.0.0.1:{port}\"\n")
}

/// The value of the Prometheus sample `name{queue="queue"}` in `/metrics` text.
pub fn metric(text: &str, name: &str, queue: &str) -> Option<f64> {
    let prefix = format!("{name}{{queue=\"{queue}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
}

/// The value of `name{queue="queue"}` at `/metrics` on `port` now (waits until the
/// endpoint answers with the sample).
pub async fn read_metric(port: u16, name: &str, queue: &str) -> f64 {
    eventually(&format!("{name} for {queue} in /metrics"), || async {
        let (_, text) = http_get(port, "/metrics").await?;
        metric(&text, name, queue)
    })
    .await
}
