//! RabbitMQ and PostgreSQL going away under the relay.

use std::time::Duration;

use crate::support::faults::*;
use crate::support::*;

#[tokio::test]
async fn amqp_connection_force_closed_mid_batch() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("fault_close").await;
    let mut sink = Sink::topic("fault_close").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, SLOW_BATCHES)]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "close", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 300).await;
    assert_eq!(
        close_relay_connection(&queue.name),
        1,
        "the relay has exactly one connection"
    );
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "close", 2, 500).await;
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    ledger.verify(&deliveries).assert_promise(1);
    wait_relay_connections(&queue.name, 1).await;
    assert!(
        relay.log().contains("worker failed; reconnecting"),
        "{}",
        relay.log()
    );
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn broker_unreachable_at_start_then_reachable() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("fault_late_broker").await;
    let mut sink = Sink::topic("fault_late_broker").await;
    let mut proxy = Proxy::reserved("127.0.0.1:5672").await;
    let worker = worker_yaml_via(&queue.name, "", &format!("host: 127.0.0.1, port: {}", proxy.port));
    let mut relay = Relay::start(&config_yaml(&[worker]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "late", 3, 100).await;
    relay.wait_for_log("cannot connect to RabbitMQ").await;
    assert!(sink.next_within(Duration::from_millis(300)).await.is_none());
    proxy.start().await;
    let mut deliveries = Vec::new();
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    let verdict = ledger.verify(&deliveries);
    verdict.assert_promise(0);
    assert_eq!(
        verdict.duplicates, 0,
        "nothing was published before the broker came"
    );
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn silent_broker_is_detected_by_the_confirm_timeout() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("fault_silent").await;
    let mut sink = Sink::topic("fault_silent").await;
    let mut proxy = Proxy::reserved("127.0.0.1:5672").await;
    proxy.start().await;
    let worker = worker_yaml_via(
        &queue.name,
        &format!(
            "{SLOW_BATCHES}
confirm_timeout: 1s"
        ),
        &format!("host: 127.0.0.1, port: {}, heartbeat_interval: 0", proxy.port),
    );
    let mut relay = Relay::start(&config_yaml(&[worker]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "silent", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 200).await;
    proxy.stall_existing();
    relay.wait_for_log("no publisher confirm within").await;
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    ledger.verify(&deliveries).assert_promise(1);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn rabbitmq_restart_mid_batch() {
    let _serial = serial().await;
    let mut queue = PgQueue::create("fault_rabbit_restart").await;
    let mut sink = Sink::durable("fault_rabbit_restart").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, SLOW_BATCHES)]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "restart", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 300).await;
    tokio::task::spawn_blocking(rabbit_stop_app).await.unwrap();
    // Whatever the test's consumer had not taken yet stays in the durable queue.
    deliveries.extend(sink.drain_now());
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "restart", 1, 500).await;
    relay.wait_for_log("worker failed; reconnecting").await;
    rabbit_start_app().await;
    sink.reconnect().await;
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    ledger.verify(&deliveries).assert_promise(1);
    wait_relay_connections(&queue.name, 1).await;
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn postgres_backend_terminated_mid_batch() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("fault_pg_kill").await;
    let mut sink = Sink::topic("fault_pg_kill").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, SLOW_BATCHES)]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "pgkill", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 500).await;
    assert_eq!(
        terminate_relay_backends(&queue.name).await,
        1,
        "the relay has exactly one session"
    );
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "pgkill", 1, 200).await;
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    let verdict = ledger.verify(&deliveries);
    verdict.assert_promise(1);
    assert_eq!(
        verdict.duplicates, 0,
        "confirmed events of the resumed batch are not published again"
    );
    assert!(
        relay.log().contains("worker failed; reconnecting"),
        "{}",
        relay.log()
    );
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn postgres_restart_mid_batch() {
    let _serial = serial().await;
    let mut queue = PgQueue::create("fault_pg_restart").await;
    let mut sink = Sink::topic("fault_pg_restart").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, SLOW_BATCHES)]));
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "pgrestart", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 500).await;
    restart_postgres().await;
    queue.reconnect().await;
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "pgrestart", 1, 200).await;
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    let verdict = ledger.verify(&deliveries);
    verdict.assert_promise(1);
    assert_eq!(
        verdict.duplicates, 0,
        "confirmed events of the resumed batch are not published again"
    );
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn a_failing_broker_does_not_hold_up_another_queue() {
    let _servers = shared().await;
    let mut healthy = PgQueue::create("fault_iso_ok").await;
    let mut broken = PgQueue::create("fault_iso_bad").await;
    let mut sink = Sink::topic("fault_iso").await;
    let bad_worker = worker_yaml_via(&broken.name, "", "host: 127.0.0.1, port: 1");
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&healthy.name, ""), bad_worker]));
    let mut ledger = Ledger::default();
    insert_batches(
        &mut broken,
        &mut Ledger::default(),
        &sink.exchange,
        "never",
        2,
        50,
    )
    .await;
    insert_batches(&mut healthy, &mut ledger, &sink.exchange, "iso", 20, 200).await;
    let mut deliveries = Vec::new();
    collect_all(&mut sink, &mut healthy, &ledger, &mut deliveries).await;
    let verdict = ledger.verify(&deliveries);
    verdict.assert_promise(0);
    assert_eq!(verdict.duplicates, 0);
    let log = relay.log();
    let retries = log
        .lines()
        .filter(|line| line.contains("worker failed; reconnecting") && line.contains(&broken.name))
        .count();
    assert!(
        retries >= 2,
        "the broken worker keeps retrying with backoff: {log}"
    );
    assert!(
        !broken.is_drained().await,
        "the broken queue's events wait for its broker"
    );
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn consumer_unregistered_behind_the_relays_back_is_registered_again() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("fault_unregister").await;
    let mut sink = Sink::topic("fault_unregister").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "before")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "before");
    queue
        .client
        .execute(
            "SELECT pgq.unregister_consumer($1, $2)",
            &[&queue.name, &queue.consumer],
        )
        .await
        .unwrap();
    relay
        .wait_for_log("consumer unregistered behind the relay's back")
        .await;
    eventually("the consumer to be registered again", || async {
        queue.is_registered().await.then_some(())
    })
    .await;
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "after")])
        .await;
    assert_eq!(body(&sink.take(1).await[0]), "after");
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn blocked_connection_pauses_publishing() {
    let _serial = serial().await;
    let mut queue = PgQueue::create("fault_blocked").await;
    let mut sink = Sink::topic("fault_blocked").await;
    let port = free_port();
    let config = config_yaml(&[worker_yaml(&queue.name, "confirm_timeout: 1s")]);
    let mut relay = Relay::start(&with_http(config, port));
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "warm-up")])
        .await;
    sink.take(1).await;
    wait_http(port, "/readyz", 200).await;
    let blocked_total = "mikkoo_amqp_connection_blocked_total";
    assert_eq!(read_metric(port, blocked_total, &queue.name).await, 0.0);
    assert_eq!(read_metric(port, "mikkoo_blocked", &queue.name).await, 0.0);

    let alarm = MemoryAlarm::raise();
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "blocked", 1, 50).await;
    relay.wait_for_log("rabbitmq blocked the connection").await;
    // While blocked: /readyz is red and says why, /metrics counted the block and shows
    // it going on, /status shows it.
    let wanted = format!("{}: RabbitMQ blocked the connection", queue.name);
    let reason = eventually("/readyz to report the blocked connection", || async {
        http_get(port, "/readyz")
            .await
            .filter(|(status, body)| *status == 503 && body.contains(&wanted))
            .map(|(_, body)| body)
    })
    .await;
    assert!(
        reason.trim().len() > wanted.len(),
        "the broker's reason is given: {reason}"
    );
    assert_eq!(read_metric(port, blocked_total, &queue.name).await, 1.0);
    assert_eq!(read_metric(port, "mikkoo_blocked", &queue.name).await, 1.0);
    let status: serde_json::Value = serde_json::from_str(&wait_http(port, "/status", 200).await).unwrap();
    let worker = &status["workers"][0];
    assert_eq!(worker["ready"], false, "{worker}");
    assert!(worker["blocked"].is_string(), "{worker}");
    // Stay blocked well past confirm_timeout: a blocked broker reads nothing, so waiting
    // is right, and the deadline must not turn it into a reconnect.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        http_get(port, "/readyz").await.map(|(status, _)| status),
        Some(503),
        "still red while blocked"
    );
    alarm.clear();
    let mut deliveries = Vec::new();
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    ledger.verify(&deliveries).assert_promise(1);
    relay.wait_for_log("rabbitmq unblocked the connection").await;
    // Unblocked: ready again, the block counted once, /status clear.
    wait_http(port, "/readyz", 200).await;
    assert_eq!(read_metric(port, blocked_total, &queue.name).await, 1.0);
    assert_eq!(read_metric(port, "mikkoo_blocked", &queue.name).await, 0.0);
    let status: serde_json::Value = serde_json::from_str(&wait_http(port, "/status", 200).await).unwrap();
    let worker = &status["workers"][0];
    assert_eq!(worker["ready"], true, "{worker}");
    assert!(worker["blocked"].is_null(), "{worker}");
    let log = relay.log();
    assert!(
        !log.contains("no publisher confirm within") && !log.contains("worker failed"),
        "{log}"
    );
    assert!(relay.stop().await.success());
}
