//! Settling events: ordering, empty batches, broker refusals (returns, nacks, closed
//! channels), retries, dead letters, rejected events, and the batch window of
//! `min_count` / `min_interval` / `min_lag` (SPEC §2.4, §3.2, §5, §6.1–6.2).

use std::time::{Duration, Instant};

use crate::support::*;

fn bodies(deliveries: &[lapin::message::Delivery]) -> Vec<String> {
    deliveries.iter().map(body).collect()
}

#[tokio::test]
async fn a_batch_arrives_in_ev_id_order() {
    let mut queue = PgQueue::create("order").await;
    let mut sink = Sink::topic("order").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(
        &queue.name,
        "max_in_flight: 50\nfetch_size: 70",
    )]));
    let events: Vec<NewEvent> = (0..1000)
        .map(|i| NewEvent::to(&sink.exchange, "k", &i.to_string()))
        .collect();
    queue.insert_batch(&events).await;
    let second: Vec<NewEvent> = (1000..1100)
        .map(|i| NewEvent::to(&sink.exchange, "k", &i.to_string()))
        .collect();
    queue.insert_batch(&second).await;
    let received = bodies(&sink.take(1100).await);
    let expected: Vec<String> = (0..1100).map(|i| i.to_string()).collect();
    assert_eq!(received, expected);
    queue.wait_drained().await;
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn empty_batches_are_finished() {
    let queue = PgQueue::create("empty").await;
    let mut sink = Sink::topic("empty").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    for _ in 0..3 {
        queue.tick().await;
    }
    queue.wait_drained().await;
    assert!(sink.drain_now().is_empty());
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn a_missing_exchange_fails_only_its_own_event() {
    let mut queue = PgQueue::create("noexchange").await;
    let mut sink = Sink::topic("noexchange").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "max_failures: 0")]));
    let missing = unique("missing_exchange");
    let mut events: Vec<NewEvent> = (0..20)
        .map(|i| NewEvent::to(&sink.exchange, "k", &format!("good-{i}")))
        .collect();
    events.insert(7, NewEvent::to(&missing, "k", "bad"));
    let ids = queue.insert_batch(&events).await;

    // Unconfirmed good events are published again after the channel closes: duplicates
    // are allowed (same message_id), losses are not. Every good one must arrive.
    let good: Vec<String> = (0..20).map(|i| format!("good-{i}")).collect();
    let mut received = Vec::new();
    while good.iter().any(|g| !received.contains(g)) {
        received.extend(bodies(&sink.take(1).await));
    }
    queue.wait_drained().await;
    received.extend(bodies(&sink.drain_now()));
    assert!(!received.contains(&"bad".to_owned()));
    let letters = queue.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0, ids[7]);
    assert!(
        letters[0].2.contains("NOT_FOUND - no exchange"),
        "{}",
        letters[0].2
    );

    assert!(
        !relay.log().contains("worker failed"),
        "a channel error is not a connection failure"
    );
    // The worker goes on.
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "after")])
        .await;
    let after = bodies(&sink.take(1).await);
    assert!(after.contains(&"after".to_owned()), "{after:?}");
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn unroutable_events_are_retried_then_dead_lettered() {
    let mut queue = PgQueue::create("noroute").await;
    let mut sink = Sink::bound("noroute", &["routed"]).await;
    // A long retry delay: only the test brings the event back, so pgqd's maintenance
    // cannot empty the retry queue before the test looks at it.
    let worker = worker_with_long_retry_delay(&queue.name, "max_failures: 2");
    let mut relay = Relay::start(&config_yaml(&[worker]));
    let ids = queue
        .insert_batch(&[
            NewEvent::to(&sink.exchange, "routed", "first"),
            NewEvent::to(&sink.exchange, "nowhere", "lost?"),
            NewEvent::to(&sink.exchange, "routed", "last"),
        ])
        .await;
    assert_eq!(bodies(&sink.take(2).await), ["first", "last"]);
    queue.wait_drained().await;
    assert_eq!(
        queue.retry_queue_len().await,
        1,
        "the unroutable event waits in pgq's retry queue"
    );

    // Attempts 2 and 3 fail too; the third failure (ev_retry = max_failures) dead-letters.
    for _ in 1..=2 {
        queue.make_retries_due().await;
        queue.bring_back_retries().await;
        queue.wait_drained().await;
    }
    eventually("the dead letter", || async {
        (!queue.dead_letters().await.is_empty()).then_some(())
    })
    .await;
    let letters = queue.dead_letters().await;
    assert_eq!(letters.len(), 1);
    let (ev_id, ev_retry, reason) = &letters[0];
    assert_eq!(*ev_id, ids[1]);
    assert_eq!(
        *ev_retry,
        Some(2),
        "ev_retry holds max_failures after exhausted retries"
    );
    assert!(reason.starts_with("NO_ROUTE"), "{reason}");
    assert!(reason.contains("gave up after 3 attempts"), "{reason}");
    assert_eq!(queue.retry_queue_len().await, 0);
    assert!(sink.drain_now().is_empty());
    assert!(relay.log().contains("event not delivered"));
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn invalid_events_are_rejected_and_the_rest_delivered() {
    let mut queue = PgQueue::create("invalid").await;
    let mut sink = Sink::topic("invalid").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    let long = "x".repeat(256);
    let x = sink.exchange.clone();
    let events = vec![
        NewEvent::to(&x, "k", "good-0"),
        NewEvent::to(&x, "k", "bad-json-3").properties("{not json"),
        NewEvent::to(&x, "k", "bad-type-3").properties(r#"{"priority": 300}"#),
        NewEvent::to(&x, "k", "bad-json-4").headers("[1, 2]"),
        NewEvent::to(&x, &long, "bad-routing-key"),
        NewEvent::to(&long, "k", "bad-exchange"),
        NewEvent::to(&x, "k", "bad-header").headers(&format!("{{\"{long}\": 1}}")),
        NewEvent::to(&x, "k", "good-1"),
    ];
    let ids = queue.insert_batch(&events).await;
    assert_eq!(bodies(&sink.take(2).await), ["good-0", "good-1"]);
    queue.wait_drained().await;
    let letters = queue.dead_letters().await;
    let reasons: Vec<(i64, String)> = letters
        .iter()
        .map(|(id, _, reason)| (*id, reason.clone()))
        .collect();
    let expected = [
        (ids[1], "ev_extra3: not valid JSON"),
        (ids[2], "ev_extra3: priority must be 0-255"),
        (
            ids[3],
            "ev_extra4: must be a JSON object of headers, found an array",
        ),
        (ids[4], "ev_type: routing key is 256 bytes"),
        (ids[5], "ev_extra1: exchange name is 256 bytes"),
        (ids[6], "ev_extra4: a header name is longer than"),
    ];
    assert_eq!(reasons.len(), expected.len(), "{reasons:#?}");
    for ((id, reason), (want_id, want)) in reasons.iter().zip(expected) {
        assert_eq!(*id, want_id);
        assert!(reason.starts_with(want), "{reason:?} should start with {want:?}");
    }
    assert!(
        letters.iter().all(|(_, retry, _)| retry.unwrap_or(0) == 0),
        "rejected events were never retried"
    );
    assert_eq!(queue.retry_queue_len().await, 0);
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn dead_letter_discard_logs_and_drops() {
    let mut queue = PgQueue::create("discard").await;
    let mut sink = Sink::topic("discard").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "dead_letter: discard")]));
    queue
        .insert_batch(&[
            NewEvent::to(&sink.exchange, "k", "bad").properties("[]"),
            NewEvent::to(&sink.exchange, "k", "good"),
        ])
        .await;
    assert_eq!(bodies(&sink.take(1).await), ["good"]);
    queue.wait_drained().await;
    relay.wait_for_log("event discarded (dead_letter: discard)").await;
    assert!(queue.dead_letters().await.is_empty());
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn confirm_false_still_delivers() {
    let mut queue = PgQueue::create("noconfirm").await;
    let mut sink = Sink::topic("noconfirm").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "confirm: false")]));
    let events: Vec<NewEvent> = (0..200)
        .map(|i| NewEvent::to(&sink.exchange, "k", &i.to_string()))
        .collect();
    queue.insert_batch(&events).await;
    let expected: Vec<String> = (0..200).map(|i| i.to_string()).collect();
    assert_eq!(bodies(&sink.take(200).await), expected);
    queue.wait_drained().await;
    relay.wait_for_log("confirm is false").await;
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn two_queues_are_relayed_independently() {
    let mut first = PgQueue::create("two_a").await;
    let mut second = PgQueue::create("two_b").await;
    let mut sink = Sink::topic("two").await;
    let mut relay = Relay::start(&config_yaml(&[
        worker_yaml(&first.name, ""),
        worker_yaml(&second.name, ""),
    ]));
    first
        .insert_batch(&[NewEvent::to(&sink.exchange, "a", "from-a")])
        .await;
    second
        .insert_batch(&[NewEvent::to(&sink.exchange, "b", "from-b")])
        .await;
    let mut received = bodies(&sink.take(2).await);
    received.sort();
    assert_eq!(received, ["from-a", "from-b"]);
    assert!(relay.stop().await.success());
}

/// A worker block with a retry delay long enough that only the test brings retried
/// events back ([`PgQueue::make_retries_due`]), never pgqd's maintenance in between.
fn worker_with_long_retry_delay(queue: &str, extra: &str) -> String {
    let worker = worker_yaml(queue, extra);
    assert!(worker.contains("retry_delay: 0\n"));
    worker.replace("retry_delay: 0\n", "retry_delay: 1h\n")
}

/// An exchange (`open` routed to the sink) with a queue bound to `full` that already
/// holds its one allowed message, so the broker nacks every publish routed there.
async fn exchange_with_a_full_queue(prefix: &str) -> (Sink, BoundedQueue) {
    let sink = Sink::bound(prefix, &["open"]).await;
    let full = BoundedQueue::declare(prefix, &sink.exchange, "full", 1).await;
    assert!(
        full.publish(&sink.exchange, "full", "filler").await,
        "the first message fits"
    );
    assert!(
        !full.publish(&sink.exchange, "full", "probe").await,
        "the broker nacks a publish to the full queue"
    );
    (sink, full)
}

#[tokio::test]
async fn a_nacked_event_is_retried_and_arrives_once_there_is_room() {
    let mut queue = PgQueue::create("nack").await;
    let (mut sink, full) = exchange_with_a_full_queue("nack").await;
    let port = free_port();
    let worker = worker_with_long_retry_delay(&queue.name, "max_failures: 5");
    let mut relay = Relay::start(&with_http(config_yaml(&[worker]), port));
    let ids = queue
        .insert_batch(&[
            NewEvent::to(&sink.exchange, "open", "before"),
            NewEvent::to(&sink.exchange, "full", "refused"),
            NewEvent::to(&sink.exchange, "open", "after"),
        ])
        .await;
    // The nack fails that event only: the rest of the batch is delivered and the batch
    // is finished, with the refused event in PgQ's retry queue.
    assert_eq!(bodies(&sink.take(2).await), ["before", "after"]);
    queue.wait_drained().await;
    assert_eq!(queue.retry_events().await, [(ids[1], Some(1))]);
    let delayed: bool = queue
        .client
        .query_one(
            "SELECT ev_retry_after > now() + interval '50 minutes' FROM pgq.retry_queue WHERE ev_id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap()
        .get(0);
    assert!(delayed, "pgq.event_retry was given retry_delay");
    assert!(queue.dead_letters().await.is_empty());
    relay.wait_for_log("NACK: the broker refused the message").await;
    assert_eq!(
        read_metric(port, "mikkoo_amqp_nacked_total", &queue.name).await,
        1.0
    );

    // Brought back while the queue is still full: nacked again, ev_retry goes up.
    queue.make_retries_due().await;
    queue.bring_back_retries().await;
    queue.wait_drained().await;
    assert_eq!(queue.retry_events().await, [(ids[1], Some(2))]);
    assert_eq!(
        read_metric(port, "mikkoo_amqp_nacked_total", &queue.name).await,
        2.0
    );

    // Room again: the third attempt is confirmed and the event arrives.
    assert_eq!(full.get().await.map(|d| body(&d)).as_deref(), Some("filler"));
    queue.make_retries_due().await;
    queue.bring_back_retries().await;
    queue.wait_drained().await;
    let arrived = eventually("the retried event in the bounded queue", || async {
        full.get().await
    })
    .await;
    assert_eq!(body(&arrived), "refused");
    assert!(queue.retry_events().await.is_empty());
    assert!(queue.dead_letters().await.is_empty());
    assert_eq!(
        read_metric(port, "mikkoo_amqp_nacked_total", &queue.name).await,
        2.0
    );
    assert_eq!(read_metric(port, "mikkoo_retried_total", &queue.name).await, 2.0);
    assert_eq!(
        read_metric(port, "mikkoo_processed_total", &queue.name).await,
        3.0
    );
    assert!(sink.drain_now().is_empty(), "nothing was published twice");
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn a_nacked_event_is_dead_lettered_once_max_failures_is_reached() {
    let mut queue = PgQueue::create("nack_dead").await;
    let (mut sink, full) = exchange_with_a_full_queue("nack_dead").await;
    let worker = worker_with_long_retry_delay(&queue.name, "max_failures: 1");
    let mut relay = Relay::start(&config_yaml(&[worker]));
    let ids = queue
        .insert_batch(&[
            NewEvent::to(&sink.exchange, "full", "refused"),
            NewEvent::to(&sink.exchange, "open", "delivered"),
        ])
        .await;
    assert_eq!(bodies(&sink.take(1).await), ["delivered"]);
    queue.wait_drained().await;
    assert_eq!(queue.retry_events().await, [(ids[0], Some(1))]);
    assert!(queue.dead_letters().await.is_empty());

    // The second attempt is nacked too; ev_retry = max_failures: dead-lettered.
    queue.make_retries_due().await;
    queue.bring_back_retries().await;
    queue.wait_drained().await;
    let letters = queue.dead_letters().await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (ev_id, ev_retry, reason) = &letters[0];
    assert_eq!(*ev_id, ids[0]);
    assert_eq!(
        *ev_retry,
        Some(1),
        "ev_retry holds max_failures after exhausted retries"
    );
    assert!(reason.starts_with("NACK"), "{reason}");
    assert!(reason.contains("gave up after 2 attempts"), "{reason}");
    assert!(queue.retry_events().await.is_empty());
    assert_eq!(full.len().await, 1, "only the filler is in the full queue");
    relay
        .wait_for_log("event dead-lettered to mikkoo.dead_letter")
        .await;
    assert!(sink.drain_now().is_empty());
    assert!(relay.stop().await.success());
}

/// Waits until the relay has asked PgQ for a batch since this call began and been given
/// none: its `empty_queue` counter moved twice (the first move may belong to a
/// `next_batch` that started before the test's last tick).
async fn wait_for_no_batch(port: u16, queue: &str) {
    let before = read_metric(port, "mikkoo_empty_queue_total", queue).await;
    eventually("the relay to ask for a batch and find none", || async {
        (read_metric(port, "mikkoo_empty_queue_total", queue).await >= before + 2.0).then_some(())
    })
    .await;
}

/// Two events with bodies `{tag}-a` and `{tag}-b`.
fn two_events(exchange: &str, tag: &str) -> Vec<NewEvent> {
    ["a", "b"]
        .iter()
        .map(|suffix| NewEvent::to(exchange, "k", &format!("{tag}-{suffix}")))
        .collect()
}

/// Waits until `/metrics` shows `count` finished batches holding `sum` events in all.
async fn wait_batch_sizes(port: u16, queue: &str, count: f64, sum: f64) {
    eventually(&format!("{count} batches of {sum} events in all"), || async {
        let (_, text) = http_get(port, "/metrics").await?;
        let seen = (
            metric(&text, "mikkoo_batch_size_count", queue)?,
            metric(&text, "mikkoo_batch_size_sum", queue)?,
        );
        (seen == (count, sum)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn without_a_batch_window_every_tick_is_relayed_at_once() {
    let mut queue = PgQueue::create("no_window").await;
    let mut sink = Sink::topic("no_window").await;
    let port = free_port();
    let mut relay = Relay::start(&with_http(config_yaml(&[worker_yaml(&queue.name, "")]), port));
    for round in 0..3 {
        let tag = format!("round{round}");
        queue.insert(&two_events(&sink.exchange, &tag)).await;
        let tick = queue.tick_id().await;
        assert_eq!(
            bodies(&sink.take(2).await),
            [format!("{tag}-a"), format!("{tag}-b")]
        );
        eventually("the tick's batch to be finished", || async {
            (queue.consumer_ticks().await.0 >= tick).then_some(())
        })
        .await;
    }
    // pgqd's ticks may add empty batches; the events came two by two.
    let sum = read_metric(port, "mikkoo_batch_size_sum", &queue.name).await;
    let count = read_metric(port, "mikkoo_batch_size_count", &queue.name).await;
    assert_eq!(sum, 6.0);
    assert!(count >= 3.0, "{count} batches");
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn min_count_merges_ticks_until_the_batch_has_enough_events() {
    let mut queue = PgQueue::create("min_count").await;
    // PgQ counts a batch's events by its event-id sequence (`last_value` at each tick),
    // and a fresh sequence reads the same before and after handing out its first id. A
    // rolled-back insert uses that id up, so from here on the count is exact.
    queue.client.batch_execute("BEGIN").await.unwrap();
    queue
        .client
        .execute("SELECT pgq.insert_event($1, 'k', 'rolled back')", &[&queue.name])
        .await
        .unwrap();
    queue.client.batch_execute("ROLLBACK").await.unwrap();
    let mut sink = Sink::topic("min_count").await;
    let port = free_port();
    let worker = worker_yaml(&queue.name, "min_count: 4");
    let mut relay = Relay::start(&with_http(config_yaml(&[worker]), port));
    wait_http(port, "/readyz", 200).await;
    for round in 0..2 {
        let (position, _) = queue.consumer_ticks().await;
        // Two events and a tick: fewer than min_count, so no batch, tick after tick.
        let first = format!("round{round}-first");
        queue.insert(&two_events(&sink.exchange, &first)).await;
        queue.tick().await;
        wait_for_no_batch(port, &queue.name).await;
        queue.tick().await;
        wait_for_no_batch(port, &queue.name).await;
        assert_eq!(
            queue.consumer_ticks().await,
            (position, None),
            "no batch while fewer than min_count events are there"
        );
        assert!(sink.drain_now().is_empty());
        // Two more: four since the consumer's position, one batch takes them all.
        let second = format!("round{round}-second");
        queue.insert(&two_events(&sink.exchange, &second)).await;
        let tick = queue.tick_id().await;
        assert_eq!(
            bodies(&sink.take(4).await),
            [
                format!("{first}-a"),
                format!("{first}-b"),
                format!("{second}-a"),
                format!("{second}-b")
            ]
        );
        eventually("the merged batch to be finished", || async {
            let (position, open) = queue.consumer_ticks().await;
            (position >= tick && open.is_none()).then_some(())
        })
        .await;
        let batches = f64::from(round + 1);
        wait_batch_sizes(port, &queue.name, batches, 4.0 * batches).await;
    }
    assert!(relay.stop().await.success());
}

/// Seconds from tick `from` to tick `to` of `queue`, by their tick times (PostgreSQL's
/// clock, as PgQ measures `min_interval`); to `now()` when `to` is `None`.
async fn seconds_between_ticks(queue: &PgQueue, from: i64, to: Option<i64>) -> f64 {
    queue
        .client
        .query_one(
            "SELECT extract(epoch FROM coalesce(b.tick_time, now()) - a.tick_time)::float8 \
             FROM pgq.queue q JOIN pgq.tick a ON a.tick_queue = q.queue_id AND a.tick_id = $2 \
             LEFT JOIN pgq.tick b ON b.tick_queue = q.queue_id AND b.tick_id = $3 \
             WHERE q.queue_name = $1",
            &[&queue.name, &from, &to],
        )
        .await
        .unwrap()
        .get(0)
}

/// Ticks until a message arrives (at most [`DEADLINE`]) and returns it.
async fn tick_until_delivered(queue: &PgQueue, sink: &mut Sink) -> lapin::message::Delivery {
    let deadline = Instant::now() + DEADLINE;
    loop {
        queue.tick().await;
        if let Some(delivery) = sink.next_within(Duration::from_millis(200)).await {
            return delivery;
        }
        assert!(Instant::now() < deadline, "no batch within {DEADLINE:?}");
    }
}

/// The consumer's position once `/metrics` shows batches holding `events` in all and no
/// batch is open.
async fn position_after(port: u16, queue: &PgQueue, events: f64) -> i64 {
    eventually(
        &format!("batches holding {events} events to be finished"),
        || async {
            let sum = read_metric(port, "mikkoo_batch_size_sum", &queue.name).await;
            let (position, open) = queue.consumer_ticks().await;
            (sum == events && open.is_none()).then_some(position)
        },
    )
    .await
}

#[tokio::test]
async fn min_interval_merges_ticks_until_the_batch_covers_it() {
    const INTERVAL: f64 = 3.0;
    let mut queue = PgQueue::create("min_interval").await;
    let mut sink = Sink::topic("min_interval").await;
    let port = free_port();
    let worker = worker_yaml(&queue.name, "min_interval: 3s");
    let mut relay = Relay::start(&with_http(config_yaml(&[worker]), port));
    wait_http(port, "/readyz", 200).await;

    // First batch: the consumer's position moves only by min_interval or more.
    let (start, _) = queue.consumer_ticks().await;
    queue.insert(&[NewEvent::to(&sink.exchange, "k", "first")]).await;
    assert_eq!(body(&tick_until_delivered(&queue, &mut sink).await), "first");
    let position = position_after(port, &queue, 1.0).await;
    let gap = seconds_between_ticks(&queue, start, Some(position)).await;
    assert!(gap >= INTERVAL, "a batch of {gap} s, shorter than min_interval");
    let batches = read_metric(port, "mikkoo_batch_size_count", &queue.name).await;

    // Right after that batch: events and ticks, and no batch, tick after tick.
    for body in ["early", "later"] {
        queue.insert(&[NewEvent::to(&sink.exchange, "k", body)]).await;
        queue.tick().await;
        wait_for_no_batch(port, &queue.name).await;
    }
    let since = seconds_between_ticks(&queue, position, None).await;
    assert!(
        since < INTERVAL,
        "the test's premise: its ticks came within min_interval of the consumer's position ({since} s)"
    );
    assert_eq!(queue.consumer_ticks().await, (position, None), "no batch yet");
    assert!(sink.drain_now().is_empty());

    // A tick min_interval after the consumer's position closes one batch with both.
    assert_eq!(body(&tick_until_delivered(&queue, &mut sink).await), "early");
    assert_eq!(bodies(&sink.take(1).await), ["later"]);
    let next = position_after(port, &queue, 3.0).await;
    let gap = seconds_between_ticks(&queue, position, Some(next)).await;
    assert!(gap >= INTERVAL, "a batch of {gap} s, shorter than min_interval");
    assert_eq!(
        read_metric(port, "mikkoo_batch_size_count", &queue.name).await,
        batches + 1.0,
        "both events in one batch"
    );
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn min_lag_holds_events_back_until_they_are_old_enough() {
    const LAG: Duration = Duration::from_secs(3);
    let mut queue = PgQueue::create("min_lag").await;
    let mut sink = Sink::topic("min_lag").await;
    let port = free_port();
    let worker = worker_yaml(&queue.name, "min_lag: 3s");
    let mut relay = Relay::start(&with_http(config_yaml(&[worker]), port));
    wait_http(port, "/readyz", 200).await;
    let inserted = Instant::now();
    queue.insert(&[NewEvent::to(&sink.exchange, "k", "aged")]).await;
    let tick = queue.tick_id().await;
    wait_for_no_batch(port, &queue.name).await;
    let (position, open) = queue.consumer_ticks().await;
    assert!(
        inserted.elapsed() < LAG,
        "the test's premise: the relay looked within min_lag of the tick"
    );
    assert!(
        position < tick && open.is_none_or(|next| next < tick),
        "the tick is not taken while younger than min_lag: position {position}, open {open:?}, tick {tick}"
    );
    assert!(sink.drain_now().is_empty());
    // No further tick is needed: the same tick is taken once it is old enough.
    assert_eq!(bodies(&sink.take(1).await), ["aged"]);
    assert!(
        inserted.elapsed() >= LAG,
        "relayed after {:?}, younger than min_lag",
        inserted.elapsed()
    );
    assert!(relay.stop().await.success());
}
