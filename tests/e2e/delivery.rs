//! Settling events: ordering, empty batches, broker refusals, retries, dead letters and
//! rejected events (SPEC §2.4, §5, §6.1–6.2).

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
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "max_failures: 2")]));
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
