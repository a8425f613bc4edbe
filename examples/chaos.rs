//! The chaos run: relays a stream of events while injecting a random fault every few
//! seconds, then accounts every event by fault kind: delivered, lost, duplicates.
//!
//! ```text
//! scripts/chaos --seconds 120 --events 100000        # the full run (README "Delivery")
//! scripts/chaos --seconds 20 --events 20000          # the short form scripts/test runs
//! ```
//!
//! Faults: the relay's AMQP connection force-closed, RabbitMQ stopped and started, the
//! relay's PostgreSQL backend terminated, PostgreSQL restarted, the relay SIGKILLed and
//! started again, the relay SIGTERMed and started again. It disturbs the local servers:
//! run it alone. Exits 1 if any event was lost or a copy carried another message id.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::seq::IndexedRandom;
use support::faults::*;
use support::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    None,
    AmqpClose,
    RabbitRestart,
    PgTerminate,
    PgRestart,
    Sigkill,
    Sigterm,
}

const FAULTS: [Fault; 6] = [
    Fault::AmqpClose,
    Fault::RabbitRestart,
    Fault::PgTerminate,
    Fault::PgRestart,
    Fault::Sigkill,
    Fault::Sigterm,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "(before any fault)",
            Fault::AmqpClose => "amqp connection closed",
            Fault::RabbitRestart => "rabbitmq restarted",
            Fault::PgTerminate => "pg backend terminated",
            Fault::PgRestart => "postgresql restarted",
            Fault::Sigkill => "relay SIGKILLed",
            Fault::Sigterm => "relay SIGTERMed",
        }
    }
}

struct Args {
    seconds: u64,
    events: usize,
    batch: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 60,
        events: 100_000,
        batch: 500,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let value: u64 = iter.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            eprintln!("usage: chaos [--seconds N] [--events N] [--batch N]");
            std::process::exit(2);
        });
        match flag.as_str() {
            "--seconds" => args.seconds = value,
            "--events" => args.events = value as usize,
            "--batch" => args.batch = value as usize,
            _ => {
                eprintln!("unknown argument {flag}");
                std::process::exit(2);
            }
        }
    }
    args
}

/// When each fault started, to attribute events and copies to the fault before them.
struct Timeline {
    faults: Vec<(Instant, Fault)>,
}

impl Timeline {
    fn at(&self, when: Instant) -> Fault {
        self.faults
            .iter()
            .rev()
            .find(|(start, _)| *start <= when)
            .map_or(Fault::None, |(_, fault)| *fault)
    }
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let mut queue = PgQueue::create("chaos").await;
    let mut sink = Sink::durable("chaos").await;
    let config = config_yaml(&[worker_yaml(&queue.name, "max_in_flight: 100\nfetch_size: 200")]);
    let mut relay = Relay::start(&config);
    let mut deliveries: Vec<(Instant, Received)> = Vec::new();
    let mut timeline = Timeline { faults: Vec::new() };
    let started = Instant::now();
    let run_for = Duration::from_secs(args.seconds);
    let mut next_fault = started + Duration::from_secs(3);
    let mut rng = rand::rng();

    println!(
        "chaos: {} events in batches of {} over {}s, a fault every 2-5 s",
        args.events, args.batch, args.seconds
    );
    let producer = tokio::spawn(produce(
        queue.name.clone(),
        sink.exchange.clone(),
        args.events,
        args.batch,
        run_for.mul_f64(0.8),
    ));
    while !producer.is_finished() || started.elapsed() < run_for {
        if let Some(delivery) = sink.next_within(Duration::from_millis(50)).await {
            deliveries.push((Instant::now(), Received::of(&delivery)));
        }
        if Instant::now() >= next_fault && started.elapsed() < run_for {
            let fault = *FAULTS.choose(&mut rng).unwrap();
            println!("  {:>5.1}s  {}", started.elapsed().as_secs_f64(), fault.name());
            timeline.faults.push((Instant::now(), fault));
            inject(fault, &mut queue, &mut sink, &mut relay, &config).await;
            next_fault = Instant::now() + Duration::from_millis(2000 + rand::random_range(0..3000));
        }
    }
    let (ledger, inserted_at) = producer.await.unwrap();

    println!(
        "  {:>5.1}s  faults over; waiting for every event",
        started.elapsed().as_secs_f64()
    );
    let mut missing: std::collections::HashSet<String> = inserted_at.keys().cloned().collect();
    deliveries.iter().for_each(|(_, r)| {
        missing.remove(&r.body);
    });
    let deadline = Instant::now() + Duration::from_secs(300);
    while !missing.is_empty() && Instant::now() < deadline {
        if let Some(delivery) = sink.next_within(Duration::from_millis(200)).await {
            let received = Received::of(&delivery);
            missing.remove(&received.body);
            deliveries.push((Instant::now(), received));
        }
    }
    if missing.is_empty() {
        // Copies still on their way arrive before a sentinel inserted now.
        queue.wait_drained().await;
        let sentinel = unique("sentinel");
        queue
            .insert_batch(&[NewEvent::to(&sink.exchange, "k", &sentinel)])
            .await;
        loop {
            let received = Received::of(&sink.take(1).await.remove(0));
            if received.body == sentinel {
                break;
            }
            deliveries.push((Instant::now(), received));
        }
    }
    assert!(relay.stop().await.success());
    let ok = report(&ledger, &inserted_at, &deliveries, &timeline);
    std::process::exit(if ok { 0 } else { 1 });
}

/// Inserts `events` events in batches of `batch`, evenly over `spread`, on its own
/// session (which survives PostgreSQL restarts by reconnecting). Returns what it
/// inserted, and when.
async fn produce(
    queue: String,
    exchange: String,
    events: usize,
    batch: usize,
    spread: Duration,
) -> (Ledger, BTreeMap<String, Instant>) {
    let mut ledger = Ledger::default();
    let mut inserted_at = BTreeMap::new();
    let batches = u32::try_from(events.div_ceil(batch)).unwrap_or(u32::MAX).max(1);
    let pace = spread / batches;
    let mut client = connect_until_up().await;
    let mut inserted = 0;
    while inserted < events {
        let n = batch.min(events - inserted);
        let tag = format!("c{}", ledger.len() / batch);
        let count = i32::try_from(n).unwrap();
        let insert = client
            .execute(
                "SELECT pgq.insert_event($1, 'k', $2 || '-' || i, $3, NULL, NULL, NULL) \
                 FROM generate_series(0, $4 - 1) AS i",
                &[&queue, &tag, &exchange, &count],
            )
            .await;
        if insert.is_err() {
            // PostgreSQL restarted under us; nothing was inserted (one statement).
            client = connect_until_up().await;
            continue;
        }
        let _ = client.query_one("SELECT pgq.ticker($1)", &[&queue]).await;
        let bodies: Vec<String> = (0..n).map(|i| format!("{tag}-{i}")).collect();
        let now = Instant::now();
        for body in &bodies {
            inserted_at.insert(body.clone(), now);
        }
        ledger.expect_batch(&bodies);
        inserted += n;
        tokio::time::sleep(pace).await;
    }
    (ledger, inserted_at)
}

async fn connect_until_up() -> tokio_postgres::Client {
    eventually("PostgreSQL for the producer", || async {
        let (client, connection) = tokio_postgres::connect(PG_URL, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        Some(client)
    })
    .await
}

async fn inject(fault: Fault, queue: &mut PgQueue, sink: &mut Sink, relay: &mut Relay, config: &str) {
    match fault {
        Fault::None => {}
        Fault::AmqpClose => {
            let name = queue.name.clone();
            tokio::task::spawn_blocking(move || close_relay_connection(&name))
                .await
                .unwrap();
        }
        Fault::RabbitRestart => {
            tokio::task::spawn_blocking(rabbit_stop_app).await.unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            rabbit_start_app().await;
            sink.reconnect().await;
        }
        Fault::PgTerminate => {
            terminate_relay_backends(&queue.name).await;
        }
        Fault::PgRestart => {
            restart_postgres().await;
            queue.reconnect().await;
        }
        Fault::Sigkill => {
            relay.signal(Signal::SIGKILL);
            relay.wait_exit().await;
            *relay = Relay::start(config);
        }
        Fault::Sigterm => {
            let status = relay.stop().await;
            assert!(status.success(), "SIGTERM exit status {status:?}");
            *relay = Relay::start(config);
        }
    }
}

/// Prints delivered / lost / duplicates per fault kind; true when nothing was lost.
fn report(
    ledger: &Ledger,
    inserted_at: &BTreeMap<String, Instant>,
    deliveries: &[(Instant, Received)],
    timeline: &Timeline,
) -> bool {
    let verdict = ledger.verify_received(deliveries.iter().map(|(_, r)| r.clone()));
    #[derive(Default)]
    struct Row {
        injected: usize,
        delivered: usize,
        lost: usize,
        duplicates: usize,
    }
    let mut rows: BTreeMap<Fault, Row> = BTreeMap::new();
    for (_, fault) in &timeline.faults {
        rows.entry(*fault).or_default().injected += 1;
    }
    let mut first_copy: BTreeMap<String, ()> = BTreeMap::new();
    for (arrived, received) in deliveries {
        if !inserted_at.contains_key(&received.body) || received.redelivered {
            continue;
        }
        if first_copy.insert(received.body.clone(), ()).is_some() {
            rows.entry(timeline.at(*arrived)).or_default().duplicates += 1;
        }
    }
    for (body, when) in inserted_at {
        let row = rows.entry(timeline.at(*when)).or_default();
        if first_copy.contains_key(body) {
            row.delivered += 1;
        } else {
            row.lost += 1;
        }
    }
    println!();
    println!(
        "{:<26} {:>8} {:>10} {:>6} {:>11}",
        "fault kind", "injected", "delivered", "lost", "duplicates"
    );
    for (fault, row) in &rows {
        println!(
            "{:<26} {:>8} {:>10} {:>6} {:>11}",
            fault.name(),
            row.injected,
            row.delivered,
            row.lost,
            row.duplicates
        );
    }
    println!(
        "{:<26} {:>8} {:>10} {:>6} {:>11}",
        "total",
        timeline.faults.len(),
        verdict.delivered,
        verdict.lost.len(),
        verdict.duplicates
    );
    if !verdict.inconsistent_ids.is_empty() {
        println!(
            "copies with different message ids: {:?}",
            verdict.inconsistent_ids
        );
    }
    verdict.lost.is_empty() && verdict.inconsistent_ids.is_empty()
}
