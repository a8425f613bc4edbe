//! The relay benchmark (SPEC §10): throughput against a bare publisher's ceiling, CPU per
//! event, peak memory on a large batch, and latency against a bare PgQ poller, all
//! measured side by side in one run on the local servers.
//!
//! ```text
//! scripts/bench                       # defaults: 100 000 events, 200-byte bodies, 3 repetitions
//! scripts/bench --events 50000 --body-size 1000 --batch-sizes 1000,10000 --repetitions 5
//! ```
//!
//! Throughput is timed the same way for the ceiling and the relay: from the first to
//! the last message counted in the RabbitMQ queue (polled every 2 ms). The ceiling is a
//! lapin publisher in this process sending the very messages the relay would send
//! (built with `mikkoo::mapping`), with a pipelined window of confirms. The relay is the
//! release binary, started after the events were inserted and ticked into batches.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::VecDeque;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use mikkoo::event::Event;
use mikkoo::mapping::{MessageDefaults, MessageIdNamespace, build_message};
use support::{AMQP_URL, PG_URL, PgQueue, binary, unique};

struct Options {
    events: usize,
    body_size: usize,
    batch_sizes: Vec<usize>,
    repetitions: usize,
    confirm_modes: Vec<bool>,
    memory_events: usize,
    latency_events: usize,
    latency_interval: Duration,
    latency_wait: Duration,
    relay_args: Vec<String>,
    skip_memory: bool,
    skip_latency: bool,
}

impl Options {
    fn parse() -> Options {
        let mut options = Options {
            events: 100_000,
            body_size: 200,
            batch_sizes: vec![1000, 10_000],
            repetitions: 3,
            confirm_modes: vec![true, false],
            memory_events: 200_000,
            latency_events: 500,
            latency_interval: Duration::from_millis(10),
            latency_wait: Duration::from_millis(10),
            relay_args: Vec::new(),
            skip_memory: false,
            skip_latency: false,
        };
        // `cargo bench` passes --bench; `cargo test --all-targets` runs this target
        // without it, as a smoke test: a tiny run that keeps the benchmark working.
        if !std::env::args().any(|a| a == "--bench") {
            options.events = 2000;
            options.batch_sizes = vec![1000];
            options.repetitions = 1;
            options.memory_events = 5000;
            options.latency_events = 20;
            println!("smoke run (cargo test): tiny sizes, figures meaningless; scripts/bench measures");
        }
        let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .unwrap_or_else(|| usage(&format!("{flag} needs a value")))
            };
            let number = |text: String| {
                text.parse::<usize>()
                    .unwrap_or_else(|_| usage(&format!("not a number: {text}")))
            };
            match flag.as_str() {
                "--events" => options.events = number(value()),
                "--body-size" => options.body_size = number(value()),
                "--batch-sizes" => {
                    options.batch_sizes = value().split(',').map(|n| number(n.to_owned())).collect()
                }
                "--repetitions" => options.repetitions = number(value()).max(1),
                "--confirm" => {
                    options.confirm_modes = match value().as_str() {
                        "true" => vec![true],
                        "false" => vec![false],
                        "both" => vec![true, false],
                        other => usage(&format!("--confirm takes true, false or both, not {other}")),
                    }
                }
                "--memory-events" => options.memory_events = number(value()),
                "--latency-events" => options.latency_events = number(value()),
                "--latency-interval-ms" => {
                    options.latency_interval = Duration::from_millis(number(value()) as u64)
                }
                "--latency-wait-ms" => options.latency_wait = Duration::from_millis(number(value()) as u64),
                "--worker" => options.relay_args.push(value()),
                "--skip-memory" => options.skip_memory = true,
                "--skip-latency" => options.skip_latency = true,
                other => usage(&format!("unknown argument {other}")),
            }
        }
        options
    }
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: scripts/bench [--events N] [--body-size BYTES] [--batch-sizes 1000,10000] \
         [--repetitions N] [--confirm true|false|both] [--memory-events N] [--latency-events N] \
         [--latency-interval-ms N] [--latency-wait-ms N] [--worker 'key: value']... [--skip-memory] [--skip-latency]"
    );
    std::process::exit(2);
}

/// Median, minimum and maximum of repeated measurements.
#[derive(Clone, Copy, Debug)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Spread {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        Spread {
            median: sorted[sorted.len() / 2],
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }
}

/// One throughput run.
struct Run {
    events_per_second: f64,
    cpu_per_event: Option<Duration>,
    peak_rss_bytes: Option<u64>,
}

/// The RabbitMQ side of the benchmark: an exchange and a durable queue bound to it, and
/// a channel to count what arrived.
struct Target {
    connection: Connection,
    channel: Channel,
    exchange: String,
    queue: String,
}

impl Target {
    async fn new() -> Target {
        let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let exchange = unique("bench_x");
        let queue = unique("bench_q");
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        Target {
            connection,
            channel,
            exchange,
            queue,
        }
    }

    async fn count(&self) -> usize {
        let queue = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        queue.message_count() as usize
    }

    async fn purge(&self) {
        self.channel
            .queue_purge(self.queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }

    /// Polls the queue until `n` messages are in it; returns when the first and the
    /// last arrived, calling `at_first` when the first is seen.
    async fn time_arrivals(&self, n: usize, mut at_first: impl FnMut()) -> (Instant, Instant) {
        let mut first = None;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let count = self.count().await;
            let now = Instant::now();
            if count > 0 && first.is_none() {
                first = Some(now);
                at_first();
            }
            if count >= n {
                return (first.unwrap_or(now), now);
            }
            assert!(now < deadline, "only {count} of {n} messages arrived");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn delete(self) {
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.connection.close(200, "bench done".into()).await;
    }
}

fn body_of(i: usize, size: usize) -> String {
    format!("{i:0>size$}")
}

/// The ceiling: the relay's own messages, pre-built, published by a bare lapin
/// publisher with `window` confirms in flight.
async fn ceiling(target: &Target, events: usize, body_size: usize, window: usize) -> Run {
    let defaults = MessageDefaults {
        app_id: Some(concat!("mikkoo/", env!("CARGO_PKG_VERSION")).into()),
        delivery_mode: 2,
        origin: mikkoo::host::fqdn().into(),
        message_ids: Some(MessageIdNamespace::new("bench", "bench")),
    };
    let prepared: Vec<(mikkoo::mapping::Message, String)> = (0..events)
        .map(|i| {
            let event = Event {
                ev_id: i as i64,
                ev_time: Utc::now(),
                ev_txid: 1000 + i as i64,
                ev_retry: None,
                ev_type: Some("bench".into()),
                ev_data: Some(body_of(i, body_size)),
                ev_extra1: Some(target.exchange.clone()),
                ev_extra2: Some("application/json".into()),
                ev_extra3: None,
                ev_extra4: None,
            };
            (
                build_message(&event, &defaults).unwrap().message,
                event.ev_data.unwrap(),
            )
        })
        .collect();
    let publisher = target.connection.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // The best a bare publisher does with lapin: sends handed over in groups (one I/O
    // wake-up per group), confirms awaited a quarter window at a time.
    let publish = async {
        let mut pending: VecDeque<lapin::PublisherConfirm> = VecDeque::with_capacity(window);
        let mut prepared = prepared.into_iter().peekable();
        while prepared.peek().is_some() {
            while pending.len() >= window {
                for _ in 0..window / 4 {
                    assert!(pending.pop_front().unwrap().await.unwrap().is_ack());
                }
            }
            let group: Vec<_> = prepared
                .by_ref()
                .take((window - pending.len()).min(256))
                .collect();
            let sends = group.iter().map(|(message, body)| {
                publisher.basic_publish(
                    message.exchange.clone(),
                    message.routing_key.clone(),
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    body.as_bytes(),
                    message.properties.clone(),
                )
            });
            for confirm in futures_util::future::join_all(sends).await {
                pending.push_back(confirm.unwrap());
            }
        }
        for confirm in pending {
            assert!(confirm.await.unwrap().is_ack());
        }
    };
    let ((first, last), ()) = tokio::join!(target.time_arrivals(events, || {}), publish);
    let _ = publisher.close(200, "done".into()).await;
    target.purge().await;
    Run {
        events_per_second: events as f64 / (last - first).as_secs_f64().max(1e-9),
        cpu_per_event: None,
        peak_rss_bytes: None,
    }
}

/// Inserts `events` events in batches of `batch` (one tick after each).
async fn fill_queue(queue: &PgQueue, exchange: &str, events: usize, batch: usize, body_size: usize) {
    let size = i32::try_from(body_size).unwrap();
    let mut start = 0usize;
    while start < events {
        let end = (start + batch).min(events);
        let (first, last) = (i32::try_from(start).unwrap(), i32::try_from(end - 1).unwrap());
        queue
            .client
            .execute(
                "SELECT pgq.insert_event($1, 'bench', lpad(i::text, $2, '0'), $3, 'application/json', NULL, NULL) \
                 FROM generate_series($4::int, $5::int) AS i",
                &[&queue.name, &size, &exchange, &first, &last],
            )
            .await
            .unwrap();
        queue.tick().await;
        start = end;
    }
}

fn relay_config(queue: &str, confirm: bool, wait: Duration, extra: &[String]) -> String {
    let mut worker = format!(
        "    {queue}:\n      postgres_url: {PG_URL}\n      rabbitmq_url: {AMQP_URL}\n      confirm: {confirm}\n      \
         wait_duration: {}\n",
        wait.as_secs_f64()
    );
    for line in extra {
        worker.push_str(&format!("      {line}\n"));
    }
    format!("Application:\n  poll_interval: 60\n  workers:\n{worker}")
}

/// A relay process with its configuration file.
struct RelayProcess {
    child: Child,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    fn start(config: &str) -> RelayProcess {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bench.yaml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary())
            .args(["-f", "-c"])
            .arg(&path)
            .env("MIKKOO_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        RelayProcess { child, _dir: dir }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// CPU time of every thread of `pid`, in nanoseconds (from schedstat).
fn cpu_time(pid: u32) -> Duration {
    let mut total = 0u64;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(task.path().join("schedstat"))
                && let Some(ns) = text.split_whitespace().next().and_then(|n| n.parse::<u64>().ok())
            {
                total += ns;
            }
        }
    }
    Duration::from_nanos(total)
}

/// Peak resident set of `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The relay relaying `events` prepared events.
async fn relay_run(target: &Target, options: &Options, events: usize, batch: usize, confirm: bool) -> Run {
    let queue = PgQueue::create("bench").await;
    fill_queue(&queue, &target.exchange, events, batch, options.body_size).await;
    let relay = RelayProcess::start(&relay_config(
        &queue.name,
        confirm,
        Duration::from_secs(1),
        &options.relay_args,
    ));
    let pid = relay.pid();
    let mut cpu_at_first = Duration::ZERO;
    let (first, last) = target
        .time_arrivals(events, || cpu_at_first = cpu_time(pid))
        .await;
    let cpu = cpu_time(pid).saturating_sub(cpu_at_first);
    let rss = peak_rss(pid);
    relay.stop();
    target.purge().await;
    Run {
        events_per_second: events as f64 / (last - first).as_secs_f64().max(1e-9),
        cpu_per_event: Some(cpu / u32::try_from(events).unwrap()),
        peak_rss_bytes: rss,
    }
}

/// Latencies in milliseconds, per event.
struct Latencies {
    relay: Vec<f64>,
    poller: Vec<f64>,
}

/// One event every `interval`, ticked at once; the relay and a bare PgQ poller (same
/// `wait_duration`) consume the same queue side by side.
async fn latency(target: &Target, options: &Options) -> Latencies {
    let queue = PgQueue::create("bench_latency").await;
    let poller_name = "bench_poller";
    queue
        .client
        .execute(
            "SELECT pgq.register_consumer($1, $2)",
            &[&queue.name, &poller_name],
        )
        .await
        .unwrap();
    let relay = RelayProcess::start(&relay_config(
        &queue.name,
        true,
        options.latency_wait,
        &options.relay_args,
    ));
    // Let the relay connect before timing anything.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = options.latency_events;
    let received = consume_arrivals(target, n);
    let seen = poll_like_a_bare_consumer(queue.name.clone(), poller_name, n, options.latency_wait);
    let produce = async {
        let mut committed = Vec::with_capacity(n);
        for i in 0..n {
            queue
                .client
                .execute(
                    "SELECT pgq.insert_event($1, 'bench', $2, $3, 'application/json', NULL, NULL)",
                    &[&queue.name, &i.to_string(), &target.exchange],
                )
                .await
                .unwrap();
            committed.push(Instant::now());
            queue.tick().await;
            tokio::time::sleep(options.latency_interval).await;
        }
        committed
    };
    let (committed, received, seen) = tokio::join!(produce, received, seen);
    relay.stop();
    target.purge().await;
    let since = |times: &[Option<Instant>]| -> Vec<f64> {
        times
            .iter()
            .zip(&committed)
            .filter_map(|(t, c)| t.map(|t| (t.saturating_duration_since(*c)).as_secs_f64() * 1000.0))
            .collect()
    };
    Latencies {
        relay: since(&received),
        poller: since(&seen),
    }
}

/// Consumes the target queue until `n` messages arrived; when each arrived, by body.
async fn consume_arrivals(target: &Target, n: usize) -> Vec<Option<Instant>> {
    let channel = target.connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            target.queue.as_str().into(),
            "bench_latency".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut arrived = vec![None; n];
    let mut count = 0;
    while count < n {
        let delivery = consumer.next().await.unwrap().unwrap();
        let now = Instant::now();
        if let Some(slot) = std::str::from_utf8(&delivery.data)
            .ok()
            .and_then(|b| b.parse::<usize>().ok())
            .and_then(|i| arrived.get_mut(i))
            && slot.is_none()
        {
            *slot = Some(now);
            count += 1;
        }
    }
    let _ = channel.close(200, "done".into()).await;
    arrived
}

/// A bare PgQ consumer: next_batch, read, finish_batch, sleeping `wait` when idle —
/// the latency floor the relay's own work adds to.
async fn poll_like_a_bare_consumer(
    queue: String,
    consumer: &str,
    n: usize,
    wait: Duration,
) -> Vec<Option<Instant>> {
    let client = support::pg().await;
    let mut seen = vec![None; n];
    let mut count = 0;
    while count < n {
        let batch: Option<i64> = client
            .query_one("SELECT pgq.next_batch($1, $2)", &[&queue, &consumer])
            .await
            .unwrap()
            .get(0);
        let Some(batch) = batch else {
            tokio::time::sleep(wait).await;
            continue;
        };
        let rows = client
            .query("SELECT ev_data FROM pgq.get_batch_events($1)", &[&batch])
            .await
            .unwrap();
        let now = Instant::now();
        for row in rows {
            let data: Option<String> = row.get(0);
            if let Some(slot) = data
                .and_then(|d| d.parse::<usize>().ok())
                .and_then(|i| seen.get_mut(i))
                && slot.is_none()
            {
                *slot = Some(now);
                count += 1;
            }
        }
        client
            .query_one("SELECT pgq.finish_batch($1)", &[&batch])
            .await
            .unwrap();
    }
    seen
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let options = Options::parse();
    let target = Target::new().await;
    println!(
        "mikkoo relay benchmark: {} events, {}-byte bodies, {} repetition(s) per figure, {} CPU(s)",
        options.events,
        options.body_size,
        options.repetitions,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if !options.relay_args.is_empty() {
        println!("worker settings: {}", options.relay_args.join(", "));
    }
    println!();

    let mut ceilings = Vec::new();
    let mut rows: Vec<(String, Vec<Run>)> = Vec::new();
    for _ in 0..options.repetitions {
        // Interleaved, so a noisy moment of the machine spreads over all figures.
        ceilings.push(ceiling(&target, options.events, options.body_size, 1000).await);
        for &batch in &options.batch_sizes {
            for &confirm in &options.confirm_modes {
                let label = format!("relay, batches of {batch}, confirm: {confirm}");
                let run = relay_run(&target, &options, options.events, batch, confirm).await;
                match rows.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, runs)) => runs.push(run),
                    None => rows.push((label, vec![run])),
                }
            }
        }
    }
    let ceiling = Spread::of(&ceilings.iter().map(|r| r.events_per_second).collect::<Vec<_>>());
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "throughput (events/s)", "median", "min", "max", "/ceiling", "CPU µs/ev"
    );
    println!(
        "{:<44} {:>9.0} {:>9.0} {:>9.0} {:>9} {:>10}",
        "ceiling: bare publisher, pipelined confirms", ceiling.median, ceiling.min, ceiling.max, "1.00", "-"
    );
    for (label, runs) in &rows {
        let rate = Spread::of(&runs.iter().map(|r| r.events_per_second).collect::<Vec<_>>());
        let cpu = Spread::of(
            &runs
                .iter()
                .filter_map(|r| r.cpu_per_event.map(|d| d.as_secs_f64() * 1e6))
                .collect::<Vec<_>>(),
        );
        println!(
            "{label:<44} {:>9.0} {:>9.0} {:>9.0} {:>9.2} {:>10.1}",
            rate.median,
            rate.min,
            rate.max,
            rate.median / ceiling.median,
            cpu.median
        );
    }

    if !options.skip_memory {
        memory(&target, &options).await;
    }
    if !options.skip_latency {
        report_latency(&target, &options).await;
    }
    target.delete().await;
}

async fn memory(target: &Target, options: &Options) {
    println!();
    let memory = relay_run(
        target,
        options,
        options.memory_events,
        options.memory_events,
        true,
    )
    .await;
    println!(
        "peak RSS relaying one batch of {} events: {:.1} MiB",
        options.memory_events,
        memory.peak_rss_bytes.unwrap_or(0) as f64 / (1024.0 * 1024.0)
    );
}

async fn report_latency(target: &Target, options: &Options) {
    println!();
    let latencies = latency(target, options).await;
    println!(
        "latency (ms), {} events one every {:?}, ticked at once, wait_duration {:?}:",
        options.latency_events, options.latency_interval, options.latency_wait
    );
    println!("{:<44} {:>9} {:>9}", "", "p50", "p99");
    let relay = (
        percentile(&latencies.relay, 50.0),
        percentile(&latencies.relay, 99.0),
    );
    let poller = (
        percentile(&latencies.poller, 50.0),
        percentile(&latencies.poller, 99.0),
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        "commit -> consumed from RabbitMQ, via mikkoo", relay.0, relay.1
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        "commit -> seen by a bare next_batch poller", poller.0, poller.1
    );
    println!(
        "{:<44} {:>9.2} {:>9.2}",
        "added by the relay",
        relay.0 - poller.0,
        relay.1 - poller.1
    );
}
