//! Micro-benchmark of the per-event mapping (event → AMQP message), the relay's main CPU
//! cost per event besides the network.
//!
//! `cargo bench --bench mapping`

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use chrono::Utc;
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use mikkoo::event::Event;
use mikkoo::mapping::{MessageDefaults, MessageIdNamespace, build_message};

fn defaults() -> MessageDefaults {
    MessageDefaults {
        app_id: Some("mikkoo/bench".into()),
        delivery_mode: 2,
        origin: "relay.example.com".into(),
        message_ids: Some(MessageIdNamespace::new("7312345678901234567", "bench")),
    }
}

fn event(extra3: Option<&str>, extra4: Option<&str>) -> Event {
    Event {
        ev_id: 123_456,
        ev_time: Utc::now(),
        ev_txid: 987_654,
        ev_retry: None,
        ev_type: Some("invoice.created".into()),
        ev_data: Some("x".repeat(200)),
        ev_extra1: Some("billing".into()),
        ev_extra2: Some("application/json".into()),
        ev_extra3: extra3.map(str::to_owned),
        ev_extra4: extra4.map(str::to_owned),
    }
}

fn mapping(c: &mut Criterion) {
    let defaults = defaults();
    let plain = event(None, None);
    c.bench_function("map plain event", |b| {
        b.iter(|| build_message(black_box(&plain), &defaults))
    });
    let rich = event(
        Some(r#"{"priority": 5, "type": "invoice", "expiration": "60000"}"#),
        Some(r#"{"tenant": "acme", "attempt": 1, "tags": ["a", "b"], "meta": {"k": "v"}}"#),
    );
    c.bench_function("map event with properties and headers", |b| {
        b.iter(|| build_message(black_box(&rich), &defaults))
    });
}

criterion_group!(benches, mapping);
criterion_main!(benches);
