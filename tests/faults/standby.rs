//! Two instances on one queue (SPEC §8): one active, one standing by, a take-over
//! within seconds of the active one's death, never the same batch published twice
//! concurrently.

use nix::sys::signal::Signal;

use crate::support::faults::*;
use crate::support::*;

#[tokio::test]
async fn standby_takes_over_when_the_active_instance_dies() {
    let _servers = shared().await;
    let mut queue = PgQueue::create("standby").await;
    let mut sink = Sink::topic("standby").await;
    let config = config_yaml(&[worker_yaml(&queue.name, SLOW_BATCHES)]);
    let mut first = Relay::start(&config);
    first.wait_for_log("this instance is active").await;
    let mut second = Relay::start(&config);
    // Steady state: the second one stands by, so nothing arrives twice.
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "steady", 5, 200).await;
    let mut deliveries = Vec::new();
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    let verdict = ledger.verify(&deliveries);
    verdict.assert_promise(0);
    assert_eq!(
        verdict.duplicates, 0,
        "two instances never publish the same batch"
    );
    assert!(
        !second.log().contains("this instance is active"),
        "{}",
        second.log()
    );
    wait_relay_connections(&queue.name, 1).await;

    // The active one dies mid-batch; the standby resumes the open batch.
    let mut ledger = Ledger::default();
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "takeover", 1, 5000).await;
    let mut deliveries = Vec::new();
    wait_mid_batch(&mut sink, &queue, &mut deliveries, 300).await;
    first.signal(Signal::SIGKILL);
    first.wait_exit().await;
    second.wait_for_log("this instance is active").await;
    insert_batches(&mut queue, &mut ledger, &sink.exchange, "takeover", 1, 100).await;
    collect_all(&mut sink, &mut queue, &ledger, &mut deliveries).await;
    ledger.verify(&deliveries).assert_promise(1);
    assert!(second.stop().await.success());
}

#[tokio::test]
async fn exclusive_false_lets_instances_share_the_consumer() {
    let _servers = shared().await;
    let queue = PgQueue::create("shared").await;
    let config = config_yaml(&[worker_yaml(&queue.name, "exclusive: false")]);
    let mut first = Relay::start(&config);
    let mut second = Relay::start(&config);
    first.wait_for_log("connected to rabbitmq").await;
    second.wait_for_log("connected to rabbitmq").await;
    assert!(!first.log().contains("holding the queue's lock"));
    assert!(first.stop().await.success());
    assert!(second.stop().await.success());
}
