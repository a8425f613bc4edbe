//! Any event columns: `build_message` returns a message or a rejection, never panics.
#![no_main]

use chrono::DateTime;
use libfuzzer_sys::fuzz_target;
use mikkoo::event::Event;
use mikkoo::mapping::{MessageDefaults, MessageIdNamespace, build_message};

fuzz_target!(|data: &[u8]| {
    // Bytes become the text columns (NUL separates them; an absent column is NULL) and,
    // from the first bytes, the numbers.
    let text = String::from_utf8_lossy(data);
    let mut columns = text.split('\0').map(|c| (!c.is_empty()).then(|| c.to_owned()));
    let number = |i: usize| data.get(i..i + 8).map_or(0, |b| i64::from_le_bytes(b.try_into().unwrap_or_default()));
    let event = Event {
        ev_id: number(0),
        ev_time: DateTime::from_timestamp(number(8) % 100_000_000_000, 0).unwrap_or_default(),
        ev_txid: number(16),
        ev_retry: data.first().map(|b| i32::from(*b) - 1),
        ev_type: columns.next().flatten(),
        ev_data: columns.next().flatten(),
        ev_extra1: columns.next().flatten(),
        ev_extra2: columns.next().flatten(),
        ev_extra3: columns.next().flatten(),
        ev_extra4: columns.next().flatten(),
    };
    let defaults = MessageDefaults {
        app_id: Some("mikkoo/fuzz".into()),
        delivery_mode: 2,
        origin: "fuzz".into(),
        message_ids: Some(MessageIdNamespace::new("fuzz", "fuzz")),
    };
    let _ = build_message(&event, &defaults);
});
