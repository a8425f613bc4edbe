//! The wire contract end to end: what a PgQ event becomes on RabbitMQ (SPEC §2).

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use uuid::Uuid;

use crate::support::*;

/// `ev_time` and `ev_txid` of an event as PgQ stored them.
async fn stored_time_and_txid(queue: &PgQueue, ev_id: i64) -> (DateTime<Utc>, i64) {
    let row = queue
        .client
        .query_one(
            "SELECT e.ev_time, e.ev_txid FROM pgq.event_template e, pgq.queue q \
             WHERE q.queue_name = $1 AND e.ev_id = $2 \
               AND e.tableoid::regclass::text ~ ('^' || q.queue_data_pfx || '_[0-9]+$')",
            &[&queue.name, &ev_id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn system_identifier(queue: &PgQueue) -> String {
    queue
        .client
        .query_one("SELECT system_identifier::text FROM pg_control_system()", &[])
        .await
        .unwrap()
        .get(0)
}

fn text(value: &Option<lapin::types::ShortString>) -> Option<&str> {
    value.as_ref().map(|v| v.as_str())
}

#[tokio::test]
async fn every_column_maps_as_specified() {
    let mut queue = PgQueue::create("wire_columns").await;
    let mut sink = Sink::topic("wire_columns").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));

    let event = NewEvent::to(&sink.exchange, "invoice.created", "{\"total\": 42}")
        .content_type("application/json")
        .headers(r#"{"tenant": "acme", "attempt": 3}"#);
    let ids = queue.insert_batch(&[event]).await;
    let delivery = sink.take(1).await.remove(0);

    assert_eq!(delivery.exchange.as_str(), sink.exchange);
    assert_eq!(delivery.routing_key.as_str(), "invoice.created");
    assert_eq!(body(&delivery), "{\"total\": 42}");
    let properties = &delivery.properties;
    assert_eq!(text(properties.content_type()), Some("application/json"));
    assert_eq!(
        text(properties.app_id()),
        Some(concat!("mikkoo/", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(properties.delivery_mode(), &Some(2));
    let correlation = Uuid::parse_str(text(properties.correlation_id()).unwrap()).unwrap();
    assert_eq!(correlation.get_version_num(), 4);

    // message_id: UUIDv5(UUIDv5(mikkoo namespace, "<system id>/<queue>"), "<ev_id>").
    let namespace = Uuid::new_v5(
        &Uuid::from_u128(0x6d69_6b6b_6f6f_4d49_8b4b_4f4f_2d49_4421),
        format!("{}/{}", system_identifier(&queue).await, queue.name).as_bytes(),
    );
    let expected_id = Uuid::new_v5(&namespace, ids[0].to_string().as_bytes()).to_string();
    assert_eq!(text(properties.message_id()), Some(expected_id.as_str()));

    let (ev_time, ev_txid) = stored_time_and_txid(&queue, ids[0]).await;
    assert_eq!(properties.timestamp(), &Some(ev_time.timestamp() as u64));
    assert_eq!(header_text(&delivery, "tenant").as_deref(), Some("acme"));
    assert_eq!(header(&delivery, "attempt"), Some(&AMQPValue::LongInt(3)));
    let expected_timestamp = if ev_time.timestamp_subsec_micros() == 0 {
        ev_time.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        ev_time.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
    };
    assert_eq!(header_text(&delivery, "timestamp"), Some(expected_timestamp));
    let txid = match header(&delivery, "txid") {
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::LongLongInt(n)) => *n,
        other => panic!("txid header is {other:?}"),
    };
    assert_eq!(txid, ev_txid);
    let sequence = Uuid::parse_str(&header_text(&delivery, "sequence").unwrap()).unwrap();
    assert_eq!(sequence.get_version_num(), 7);
    assert_eq!(header_text(&delivery, "origin"), Some(mikkoo::host::fqdn()));
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn ev_extra3_properties_override_the_automatic_ones() {
    let mut queue = PgQueue::create("wire_props").await;
    let mut sink = Sink::topic("wire_props").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    let properties = r#"{"app_id": "billing", "content_encoding": "gzip", "content_type": "text/plain",
        "correlation_id": "corr-1", "message_id": "msg-1", "type": "invoice", "user_id": "guest",
        "reply_to": "replies", "delivery_mode": 1, "priority": 7, "timestamp": 1234567890,
        "expiration": 60000, "unknown_key": "ignored"}"#;
    let event = NewEvent::to(&sink.exchange, "rk", "x")
        .content_type("application/json")
        .properties(properties);
    queue.insert_batch(&[event]).await;
    let delivery = sink.take(1).await.remove(0);
    let p = &delivery.properties;
    assert_eq!(text(p.app_id()), Some("billing"));
    assert_eq!(text(p.content_encoding()), Some("gzip"));
    assert_eq!(
        text(p.content_type()),
        Some("text/plain"),
        "ev_extra3 content_type beats ev_extra2"
    );
    assert_eq!(text(p.correlation_id()), Some("corr-1"));
    assert_eq!(text(p.message_id()), Some("msg-1"));
    assert_eq!(text(p.kind()), Some("invoice"));
    assert_eq!(text(p.user_id()), Some("guest"));
    assert_eq!(text(p.reply_to()), Some("replies"));
    assert_eq!(p.delivery_mode(), &Some(1));
    assert_eq!(p.priority(), &Some(7));
    assert_eq!(p.timestamp(), &Some(1_234_567_890));
    assert_eq!(text(p.expiration()), Some("60000"));
    relay.wait_for_log("ev_extra3 key is not an AMQP property").await;
    assert!(relay.log().contains("unknown_key"));
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn header_precedence_and_json_types() {
    let mut queue = PgQueue::create("wire_headers").await;
    let mut sink = Sink::topic("wire_headers").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    let typed = NewEvent::to(&sink.exchange, "typed", "1").headers(
        r#"{"s": "v", "yes": true, "small": -5, "big": 9000000000, "f": 2.5, "nothing": null,
            "list": [1, "a"], "nested": {"k": "v"}, "origin": "producer-host", "txid": "producer-txid"}"#,
    );
    let replaced = NewEvent::to(&sink.exchange, "replaced", "2")
        .properties(r#"{"headers": {"from": "extra3"}}"#)
        .headers(r#"{"from": "extra4", "only_in_extra4": 1}"#);
    queue.insert_batch(&[typed, replaced]).await;
    let deliveries = sink.take(2).await;

    let typed = &deliveries[0];
    assert_eq!(header_text(typed, "s").as_deref(), Some("v"));
    assert_eq!(header(typed, "yes"), Some(&AMQPValue::Boolean(true)));
    assert_eq!(header(typed, "small"), Some(&AMQPValue::LongInt(-5)));
    assert_eq!(header(typed, "big"), Some(&AMQPValue::LongLongInt(9_000_000_000)));
    assert_eq!(header(typed, "f"), Some(&AMQPValue::Double(2.5)));
    assert_eq!(header(typed, "nothing"), Some(&AMQPValue::Void));
    let mut list = FieldArray::default();
    list.push(AMQPValue::LongInt(1));
    list.push(AMQPValue::LongString("a".into()));
    assert_eq!(header(typed, "list"), Some(&AMQPValue::FieldArray(list)));
    let mut nested = FieldTable::default();
    nested.insert("k".into(), AMQPValue::LongString("v".into()));
    assert_eq!(header(typed, "nested"), Some(&AMQPValue::FieldTable(nested)));
    assert_eq!(
        header_text(typed, "origin").as_deref(),
        Some("producer-host"),
        "the producer's value wins"
    );
    assert_eq!(header_text(typed, "txid").as_deref(), Some("producer-txid"));
    assert!(header(typed, "sequence").is_some() && header(typed, "timestamp").is_some());

    let replaced = &deliveries[1];
    assert_eq!(header_text(replaced, "from").as_deref(), Some("extra3"));
    assert_eq!(
        header(replaced, "only_in_extra4"),
        None,
        "ev_extra3.headers replaces ev_extra4 entirely"
    );
    assert!(header(replaced, "origin").is_some());
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn null_columns_make_a_valid_message() {
    let mut queue = PgQueue::create("wire_nulls").await;
    let mut sink = Sink::topic("wire_nulls").await;
    let mut relay = Relay::start(&config_yaml(&[worker_yaml(&queue.name, "")]));
    // NULL exchange: the default exchange routes by routing key to the queue of that name.
    let default_exchange = NewEvent {
        ev_type: Some(sink.queue.clone()),
        ..NewEvent::default()
    };
    // NULL routing key on the topic exchange (bound with `#`, which matches "").
    let empty_key = NewEvent {
        ev_extra1: Some(sink.exchange.clone()),
        ev_extra2: Some(String::new()),
        ev_extra3: Some(String::new()),
        ev_extra4: Some(String::new()),
        ..NewEvent::default()
    };
    queue.insert_batch(&[default_exchange, empty_key]).await;
    let deliveries = sink.take(2).await;
    assert_eq!(deliveries[0].exchange.as_str(), "");
    assert_eq!(deliveries[0].routing_key.as_str(), sink.queue);
    assert_eq!(deliveries[1].exchange.as_str(), sink.exchange);
    assert_eq!(deliveries[1].routing_key.as_str(), "");
    for delivery in &deliveries {
        assert!(delivery.data.is_empty(), "NULL ev_data is an empty body");
        assert_eq!(delivery.properties.content_type(), &None);
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let names: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["origin", "sequence", "timestamp", "txid"]);
    }
    assert!(relay.stop().await.success());
}

#[tokio::test]
async fn message_id_none_and_worker_defaults() {
    let mut queue = PgQueue::create("wire_defaults").await;
    let mut sink = Sink::topic("wire_defaults").await;
    let config = config_yaml(&[worker_yaml(
        &queue.name,
        "message_id: none\napp_id: my-relay\ndelivery_mode: 1",
    )]);
    let mut relay = Relay::start(&format!("{config}  origin: relay.test\n"));
    queue
        .insert_batch(&[NewEvent::to(&sink.exchange, "k", "b")])
        .await;
    let delivery = sink.take(1).await.remove(0);
    assert_eq!(delivery.properties.message_id(), &None);
    assert_eq!(text(delivery.properties.app_id()), Some("my-relay"));
    assert_eq!(delivery.properties.delivery_mode(), &Some(1));
    assert_eq!(header_text(&delivery, "origin").as_deref(), Some("relay.test"));
    assert!(relay.stop().await.success());
}
