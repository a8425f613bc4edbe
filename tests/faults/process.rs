//! The relay process itself: killed, stopped mid-batch, stopped idle, interrupted twice,
//! and a stop that cannot finish within `shutdown_timeout`.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::support::faults::*;
use crate::support::*;

#[tokio::test]
async fn sigkill_mid_batch_then_restart() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("proc_kill").await;
    let mut sink = Sink::topic("proc_kill").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, SLOW_BATCHES)]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "kill", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 500).await;
    relay.signal(Signal::SIGKILL);
    relay.wait_exit().await;
    assert!(
        queue.open_batch().await.is_some(),
        "the killed relay left its batch open"
    );
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "kill", 1, 100).await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    ledger.verify(&deliveries).assert_promise(1);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn sigterm_mid_batch_finishes_the_batch_and_exits_0() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("proc_term").await;
    let mut sink = Sink::topic("proc_term").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, SLOW_BATCHES)]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "term", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 300).await;
    let status = relay.stop().await;
    assert!(status.success(), "{status:?}");
    assert!(
        queue.open_batch().await.is_none(),
        "the batch was finished before exiting"
    );
    deliveries.extend(sink.drain_now());
    // Everything of the batch was confirmed before the relay exited; give the broker a
    // moment to hand the last ones to the test's consumer.
    while !ledger.all_arrived(&deliveries) {
        deliveries.extend(sink.take(1).await);
    }
    let verdict = ledger.verify(&deliveries);
    verdict.assert_promise(0);
    assert_eq!(verdict.duplicates, 0);
}

#[tokio::test]
async fn sigterm_while_idle_exits_0_at_once() {
    let _servers = shared().await;
    let queue = PgQueue::create("proc_idle").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    relay.wait_for_log("connected to rabbitmq").await;
    let started = Instant::now();
    let status = relay.stop().await;
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(relay.log().contains("worker stopped"));
}

#[tokio::test]
async fn second_sigint_stops_at_once_leaving_the_batch_open() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("proc_int").await;
    let mut sink = Sink::topic("proc_int").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, SLOW_BATCHES)]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "int", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 100).await;
    relay.signal(Signal::SIGINT);
    relay.wait_for_log("SIGINT: stopping gracefully").await;
    relay.signal(Signal::SIGINT);
    let status = tokio::time::timeout(DEADLINE, relay.wait_exit()).await.unwrap();
    assert_eq!(status.code(), Some(1), "a forced stop is not a clean one");
    assert!(relay.log().contains("stopped at once on a second SIGINT"));
    assert!(
        queue.open_batch().await.is_some(),
        "the batch stays open, to be relayed again"
    );
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    ledger.verify(&deliveries).assert_promise(1);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn a_stop_that_cannot_finish_leaves_the_batch_open_after_shutdown_timeout() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("proc_timeout").await;
    let mut sink = Sink::topic("proc_timeout").await;
    let worker = worker_yaml(&queue.name, &format!("shutdown_timeout: 1s\n{SLOW_BATCHES}"));
    let mut relay = Relay::start(&config_yaml(&[worker]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "stuck", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 50).await;
    // The batch is open; hold the consumer's subscription row so that its
    // pgq.finish_batch has to wait.
    let lock = queue.lock_subscription().await;
    let started = Instant::now();
    let status = relay.stop().await;
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(
        relay
            .log()
            .contains("did not finish its batch within shutdown_timeout"),
        "{}",
        relay.log()
    );
    lock.release().await;
    assert!(
        queue.open_batch().await.is_some(),
        "the unfinished batch stays open"
    );
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    ledger.verify(&deliveries).assert_promise(1);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn unregister_true_unregisters_on_a_clean_stop() {
    let _servers = shared().await;
    let queue = PgQueue::create("proc_unregister").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "unregister: true")]));
    relay.wait_for_log("unregister is true").await;
    relay.wait_for_log("connected to rabbitmq").await;
    assert!(relay.stop().await.success());
    assert!(relay.log().contains("unregistered pgq consumer"));
    assert!(!queue.is_registered().await);
}

#[tokio::test]
async fn unregister_false_keeps_the_consumer() {
    let _servers = shared().await;
    let queue = PgQueue::create("proc_keep").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    relay.wait_for_log("connected to rabbitmq").await;
    assert!(relay.stop().await.success());
    assert!(queue.is_registered().await);
}

/// A loopback port in front of RabbitMQ that accepts connections at once but forwards
/// nothing until opened, so the relay's AMQP handshake waits meanwhile.
struct Gate {
    port: u16,
    open: tokio::sync::watch::Sender<bool>,
    accepted: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl Gate {
    async fn closed() -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (open, opened) = tokio::sync::watch::channel(false);
        let (accepted_tx, accepted) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let _ = accepted_tx.send(());
                let mut opened = opened.clone();
                tokio::spawn(async move {
                    let _ = opened.wait_for(|open| *open).await;
                    if let Ok(mut server) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Gate { port, open, accepted }
    }
}

#[tokio::test]
async fn sigterm_while_connecting_takes_no_new_batch() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("proc_connecting").await;
    let mut sink = Sink::topic("proc_connecting").await;
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "waiting")])
        .await;
    let mut gate = Gate::closed().await;
    let via_gate = format!("host: 127.0.0.1, port: {}, socket_timeout: 60", gate.port);
    let mut relay = Relay::start(&config_yaml(&[worker_yaml_via(&queue.name, "", &via_gate)]));
    relay.wait_for_log("connected to postgresql").await;
    tokio::time::timeout(DEADLINE, gate.accepted.recv())
        .await
        .expect("the relay reaches the gate");
    relay.signal(Signal::SIGTERM);
    relay.wait_for_log("SIGTERM: stopping gracefully").await;
    gate.open.send_replace(true);
    let status = tokio::time::timeout(DEADLINE, relay.wait_exit())
        .await
        .expect("the relay stops");
    assert!(status.success(), "{status:?}");
    assert!(
        relay.log().contains("connected to rabbitmq"),
        "the handshake completed after the stop was asked for: {}",
        relay.log()
    );
    assert!(sink.drain_now().is_empty(), "a stopping worker took a batch");
    assert_eq!(queue.open_batch().await, None, "no batch was opened");

    // The event is still there for the next run.
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    assert_eq!(body(&sink.take(1).await[0]), "waiting");
    assert!(relay.stop().await.success());
}
