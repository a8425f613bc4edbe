//! One test per rule of the wire contract, and a property test that no input panics.

use super::*;
use chrono::TimeZone;
use proptest::prelude::*;

fn defaults() -> MessageDefaults {
    MessageDefaults {
        app_id: Some(ShortString::from("mikkoo/test")),
        delivery_mode: 2,
        origin: LongString::from("relay.example.com"),
        message_ids: Some(MessageIdNamespace::new("7312345678901234567", "invoices")),
    }
}

fn event() -> Event {
    Event {
        ev_id: 42,
        ev_time: Utc.with_ymd_and_hms(2026, 12, 4, 13, 18, 11).unwrap()
            + chrono::Duration::microseconds(833_698),
        ev_txid: 1234,
        ev_retry: None,
        ev_type: Some("invoice.created".into()),
        ev_data: Some("{\"id\": 1}".into()),
        ev_extra1: Some("billing".into()),
        ev_extra2: Some("application/json".into()),
        ev_extra3: None,
        ev_extra4: None,
    }
}

fn build(event: &Event) -> Message {
    build_message(event, &defaults()).expect("event maps").message
}

fn reject(event: &Event) -> String {
    build_message(event, &defaults())
        .expect_err("event is rejected")
        .to_string()
}

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a AMQPValue> {
    message.properties.headers().as_ref()?.inner().get(name)
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(text.into())
}

#[test]
fn ev_type_is_the_routing_key_and_null_is_empty() {
    assert_eq!(build(&event()).routing_key.as_str(), "invoice.created");
    let event = Event {
        ev_type: None,
        ..event()
    };
    assert_eq!(build(&event).routing_key.as_str(), "");
}

#[test]
fn ev_extra1_is_the_exchange_and_null_or_empty_is_the_default_exchange() {
    assert_eq!(build(&event()).exchange.as_str(), "billing");
    for extra1 in [None, Some(String::new())] {
        let event = Event {
            ev_extra1: extra1,
            ..event()
        };
        assert_eq!(build(&event).exchange.as_str(), "");
    }
}

#[test]
fn ev_extra2_is_the_content_type_and_null_or_empty_leaves_it_unset() {
    assert_eq!(
        build(&event())
            .properties
            .content_type()
            .as_ref()
            .unwrap()
            .as_str(),
        "application/json"
    );
    for extra2 in [None, Some(String::new())] {
        let event = Event {
            ev_extra2: extra2,
            ..event()
        };
        assert_eq!(build(&event).properties.content_type(), &None);
    }
}

#[test]
fn body_is_ev_data_unchanged_and_null_is_empty() {
    assert_eq!(event().body(), b"{\"id\": 1}");
    assert_eq!(
        Event {
            ev_data: None,
            ..event()
        }
        .body(),
        b""
    );
}

#[test]
fn automatic_properties() {
    let message = build(&event());
    let properties = &message.properties;
    assert_eq!(properties.app_id().as_ref().unwrap().as_str(), "mikkoo/test");
    assert_eq!(properties.delivery_mode(), &Some(2));
    assert_eq!(properties.timestamp(), &Some(1_796_390_291));
    let correlation = properties.correlation_id().as_ref().unwrap().as_str();
    assert_eq!(Uuid::parse_str(correlation).unwrap().get_version_num(), 4);
    let other = build(&event());
    assert_ne!(
        other.properties.correlation_id(),
        properties.correlation_id(),
        "correlation ids are fresh"
    );
}

#[test]
fn message_id_is_deterministic_per_database_queue_and_event() {
    let first = build(&event()).properties.message_id().clone().unwrap();
    let again = build(&event()).properties.message_id().clone().unwrap();
    assert_eq!(first, again);
    let other_event = build(&Event { ev_id: 43, ..event() })
        .properties
        .message_id()
        .clone()
        .unwrap();
    assert_ne!(first, other_event);
    let other_queue = MessageIdNamespace::new("7312345678901234567", "payments").message_id(42);
    assert_ne!(first.as_str(), other_queue.to_string());
    assert_eq!(Uuid::parse_str(first.as_str()).unwrap().get_version_num(), 5);
    // Reproducible by consumers from the documented recipe.
    let namespace = Uuid::new_v5(&MIKKOO_NAMESPACE, b"7312345678901234567/invoices");
    assert_eq!(first.as_str(), Uuid::new_v5(&namespace, b"42").to_string());
}

#[test]
fn message_id_none_turns_it_off() {
    let defaults = MessageDefaults {
        message_ids: None,
        ..defaults()
    };
    let message = build_message(&event(), &defaults).unwrap().message;
    assert_eq!(message.properties.message_id(), &None);
}

#[test]
fn automatic_headers_have_exact_formats() {
    let message = build(&event());
    assert_eq!(
        header(&message, "origin"),
        Some(&long_string("relay.example.com"))
    );
    assert_eq!(
        header(&message, "timestamp"),
        Some(&long_string("2026-12-04T13:18:11.833698+00:00"))
    );
    assert_eq!(header(&message, "txid"), Some(&AMQPValue::LongInt(1234)));
    let Some(AMQPValue::LongString(sequence)) = header(&message, "sequence") else {
        panic!("sequence header missing");
    };
    let sequence = Uuid::parse_str(std::str::from_utf8(sequence.as_bytes()).unwrap()).unwrap();
    assert_eq!(sequence.get_version_num(), 7);
}

#[test]
fn timestamp_header_leaves_out_a_zero_fraction() {
    let event = Event {
        ev_time: Utc.with_ymd_and_hms(2026, 12, 4, 13, 18, 11).unwrap(),
        ..event()
    };
    assert_eq!(
        header(&build(&event), "timestamp"),
        Some(&long_string("2026-12-04T13:18:11+00:00"))
    );
}

#[test]
fn sequence_is_strictly_increasing() {
    let sequences: Vec<String> = (0..1000)
        .map(|_| match header(&build(&event()), "sequence") {
            Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]));
}

#[test]
fn large_txid_is_a_64_bit_integer() {
    let event = Event {
        ev_txid: 5_000_000_000,
        ..event()
    };
    assert_eq!(
        header(&build(&event), "txid"),
        Some(&AMQPValue::LongLongInt(5_000_000_000))
    );
}

#[test]
fn ev_extra4_headers_with_every_json_type() {
    let event = Event {
        ev_extra4: Some(
            r#"{"s": "x", "t": true, "small": 7, "big": 9000000000, "neg": -3, "f": 1.5,
                "n": null, "a": [1, "two"], "o": {"k": "v"}}"#
                .into(),
        ),
        ..event()
    };
    let message = build(&event);
    assert_eq!(header(&message, "s"), Some(&long_string("x")));
    assert_eq!(header(&message, "t"), Some(&AMQPValue::Boolean(true)));
    assert_eq!(header(&message, "small"), Some(&AMQPValue::LongInt(7)));
    assert_eq!(
        header(&message, "big"),
        Some(&AMQPValue::LongLongInt(9_000_000_000))
    );
    assert_eq!(header(&message, "neg"), Some(&AMQPValue::LongInt(-3)));
    assert_eq!(header(&message, "f"), Some(&AMQPValue::Double(1.5)));
    assert_eq!(header(&message, "n"), Some(&AMQPValue::Void));
    let mut array = FieldArray::default();
    array.push(AMQPValue::LongInt(1));
    array.push(long_string("two"));
    assert_eq!(header(&message, "a"), Some(&AMQPValue::FieldArray(array)));
    let mut nested = FieldTable::default();
    nested.insert("k".into(), long_string("v"));
    assert_eq!(header(&message, "o"), Some(&AMQPValue::FieldTable(nested)));
}

#[test]
fn producer_headers_win_over_automatic_ones() {
    let event = Event {
        ev_extra4: Some(r#"{"origin": "producer", "txid": "mine", "sequence": 1, "timestamp": 0}"#.into()),
        ..event()
    };
    let message = build(&event);
    assert_eq!(header(&message, "origin"), Some(&long_string("producer")));
    assert_eq!(header(&message, "txid"), Some(&long_string("mine")));
    assert_eq!(header(&message, "sequence"), Some(&AMQPValue::LongInt(1)));
    assert_eq!(header(&message, "timestamp"), Some(&AMQPValue::LongInt(0)));
}

#[test]
fn ev_extra3_headers_replace_ev_extra4_entirely() {
    let event = Event {
        ev_extra3: Some(r#"{"headers": {"from": "extra3"}}"#.into()),
        ev_extra4: Some(r#"{"from": "extra4", "only4": 1}"#.into()),
        ..event()
    };
    let message = build(&event);
    assert_eq!(header(&message, "from"), Some(&long_string("extra3")));
    assert_eq!(header(&message, "only4"), None);
    assert!(
        header(&message, "origin").is_some(),
        "automatic headers still added"
    );
}

#[test]
fn invalid_ev_extra4_is_rejected_even_when_ev_extra3_headers_replace_it() {
    for (extra4, expected) in [
        ("{oops", "ev_extra4: not valid JSON"),
        (
            "[1]",
            "ev_extra4: must be a JSON object of headers, found an array",
        ),
    ] {
        let event = Event {
            ev_extra3: Some(r#"{"headers": {"from": "extra3"}}"#.into()),
            ev_extra4: Some(extra4.into()),
            ..event()
        };
        let reason = reject(&event);
        assert!(reason.starts_with(expected), "{reason:?} should say {expected:?}");
    }
}

#[test]
fn ev_extra3_headers_null_means_no_override() {
    let event = Event {
        ev_extra3: Some(r#"{"headers": null}"#.into()),
        ev_extra4: Some(r#"{"from": "extra4"}"#.into()),
        ..event()
    };
    assert_eq!(header(&build(&event), "from"), Some(&long_string("extra4")));
}

#[test]
fn ev_extra3_overrides_every_string_property() {
    let event = Event {
        ev_extra3: Some(
            r#"{"app_id": "a", "content_encoding": "gzip", "content_type": "text/plain",
                "correlation_id": "c", "message_id": "m", "type": "t", "user_id": "guest",
                "reply_to": "r"}"#
                .into(),
        ),
        ..event()
    };
    let properties = build(&event).properties;
    let text = |value: &Option<ShortString>| value.as_ref().map(|v| v.as_str().to_owned());
    assert_eq!(text(properties.app_id()).as_deref(), Some("a"));
    assert_eq!(text(properties.content_encoding()).as_deref(), Some("gzip"));
    assert_eq!(text(properties.content_type()).as_deref(), Some("text/plain"));
    assert_eq!(text(properties.correlation_id()).as_deref(), Some("c"));
    assert_eq!(text(properties.message_id()).as_deref(), Some("m"));
    assert_eq!(text(properties.kind()).as_deref(), Some("t"));
    assert_eq!(text(properties.user_id()).as_deref(), Some("guest"));
    assert_eq!(text(properties.reply_to()).as_deref(), Some("r"));
}

#[test]
fn ev_extra3_overrides_numeric_properties() {
    let event = Event {
        ev_extra3: Some(
            r#"{"delivery_mode": 1, "priority": 255, "timestamp": 12, "expiration": 60000}"#.into(),
        ),
        ..event()
    };
    let properties = build(&event).properties;
    assert_eq!(properties.delivery_mode(), &Some(1));
    assert_eq!(properties.priority(), &Some(255));
    assert_eq!(properties.timestamp(), &Some(12));
    assert_eq!(properties.expiration().as_ref().unwrap().as_str(), "60000");
    let digits = Event {
        ev_extra3: Some(r#"{"expiration": "1500"}"#.into()),
        ..self::event()
    };
    assert_eq!(
        build(&digits).properties.expiration().as_ref().unwrap().as_str(),
        "1500"
    );
}

#[test]
fn ev_extra3_null_unsets_an_automatic_property() {
    let event = Event {
        ev_extra3: Some(r#"{"app_id": null, "message_id": null}"#.into()),
        ..event()
    };
    let properties = build(&event).properties;
    assert_eq!(properties.app_id(), &None);
    assert_eq!(properties.message_id(), &None);
}

#[test]
fn ev_extra3_unknown_keys_are_reported_and_ignored() {
    let event = Event {
        ev_extra3: Some(r#"{"cluster_id": "x", "colour": "red", "priority": 1}"#.into()),
        ..event()
    };
    let mapped = build_message(&event, &defaults()).unwrap();
    assert_eq!(mapped.ignored_properties, ["cluster_id", "colour"]);
    assert_eq!(mapped.message.properties.priority(), &Some(1));
}

#[test]
fn empty_ev_extra3_and_ev_extra4_mean_nothing() {
    for blank in ["", "  "] {
        let event = Event {
            ev_extra3: Some(blank.into()),
            ev_extra4: Some(blank.into()),
            ..event()
        };
        let message = build(&event);
        assert_eq!(message.properties.headers().as_ref().unwrap().inner().len(), 4);
    }
}

#[test]
fn all_null_columns_still_make_a_message() {
    let event = Event {
        ev_type: None,
        ev_data: None,
        ev_extra1: None,
        ev_extra2: None,
        ev_extra3: None,
        ev_extra4: None,
        ..event()
    };
    let message = build(&event);
    assert_eq!(message.exchange.as_str(), "");
    assert_eq!(message.routing_key.as_str(), "");
    assert_eq!(message.properties.headers().as_ref().unwrap().inner().len(), 4);
}

#[test]
fn rejections_name_the_column_and_the_problem() {
    let with3 = |json: &str| Event {
        ev_extra3: Some(json.into()),
        ..event()
    };
    let with4 = |json: &str| Event {
        ev_extra4: Some(json.into()),
        ..event()
    };
    let cases = [
        (with3("{not json"), "ev_extra3: not valid JSON"),
        (
            with3("[1, 2]"),
            "ev_extra3: must be a JSON object of AMQP properties, found an array",
        ),
        (
            with4("\"text\""),
            "ev_extra4: must be a JSON object of headers, found a string",
        ),
        (with4("{oops"), "ev_extra4: not valid JSON"),
        (with3(r#"{"priority": 256}"#), "ev_extra3: priority must be 0-255"),
        (
            with3(r#"{"priority": "high"}"#),
            "ev_extra3: priority must be 0-255",
        ),
        (
            with3(r#"{"delivery_mode": 3}"#),
            "ev_extra3: delivery_mode must be 1 or 2",
        ),
        (
            with3(r#"{"timestamp": -1}"#),
            "ev_extra3: timestamp must be a non-negative integer",
        ),
        (
            with3(r#"{"expiration": "soon"}"#),
            "ev_extra3: expiration must be",
        ),
        (with3(r#"{"expiration": -5}"#), "ev_extra3: expiration must be"),
        (
            with3(r#"{"message_id": 7}"#),
            "ev_extra3: message_id must be a string",
        ),
        (
            with3(r#"{"headers": [1]}"#),
            "ev_extra3: headers must be a JSON object, found an array",
        ),
        (
            with4(r#"{"n": 18446744073709551615}"#),
            "does not fit a signed 64-bit value",
        ),
    ];
    for (event, expected) in cases {
        let reason = reject(&event);
        assert!(
            reason.starts_with(expected) || reason.contains(expected),
            "{reason:?} should say {expected:?}"
        );
    }
}

#[test]
fn over_long_names_are_rejected() {
    let long = "x".repeat(256);
    let cases = [
        (
            Event {
                ev_extra1: Some(long.clone()),
                ..event()
            },
            "ev_extra1: exchange name is 256 bytes",
        ),
        (
            Event {
                ev_type: Some(long.clone()),
                ..event()
            },
            "ev_type: routing key is 256 bytes",
        ),
        (
            Event {
                ev_extra2: Some(long.clone()),
                ..event()
            },
            "ev_extra2: content_type is 256 bytes",
        ),
        (
            Event {
                ev_extra4: Some(format!("{{\"{long}\": 1}}")),
                ..event()
            },
            "ev_extra4: a header name is longer than",
        ),
        (
            Event {
                ev_extra3: Some(format!("{{\"headers\": {{\"a\": {{\"{long}\": 1}}}}}}")),
                ..event()
            },
            "ev_extra3.headers: a header name is longer than",
        ),
        (
            Event {
                ev_extra3: Some(format!("{{\"reply_to\": \"{long}\"}}")),
                ..event()
            },
            "ev_extra3: reply_to is longer than",
        ),
    ];
    for (event, expected) in cases {
        let reason = reject(&event);
        assert!(
            reason.starts_with(expected),
            "{reason:?} should start with {expected:?}"
        );
    }
    let exactly = "x".repeat(255);
    assert_eq!(
        build(&Event {
            ev_extra1: Some(exactly),
            ..event()
        })
        .exchange
        .as_str()
        .len(),
        255
    );
}

#[test]
fn multibyte_names_are_measured_in_bytes() {
    let name = "é".repeat(128); // 256 bytes, 128 characters
    assert!(
        reject(&Event {
            ev_type: Some(name),
            ..event()
        })
        .contains("256 bytes")
    );
}

fn arbitrary_json() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_owned()),
        any::<bool>().prop_map(|b| b.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        ".{0,300}".prop_map(|s| serde_json::to_string(&s).unwrap()),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(|items| format!("[{}]", items.join(","))),
            prop::collection::vec((".{0,300}", inner), 0..8).prop_map(|pairs| {
                let body: Vec<String> = pairs
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                    .collect();
                format!("{{{}}}", body.join(","))
            }),
        ]
    })
}

fn arbitrary_column() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        ".{0,300}".prop_map(Some),
        arbitrary_json().prop_map(Some)
    ]
}

fn arbitrary_properties() -> impl Strategy<Value = Option<String>> {
    let key = prop_oneof![
        Just("app_id"),
        Just("content_encoding"),
        Just("content_type"),
        Just("correlation_id"),
        Just("message_id"),
        Just("type"),
        Just("user_id"),
        Just("reply_to"),
        Just("delivery_mode"),
        Just("priority"),
        Just("timestamp"),
        Just("expiration"),
        Just("headers"),
        Just("other"),
    ];
    let pairs = prop::collection::vec((key, arbitrary_json()), 0..6).prop_map(|pairs| {
        let body: Vec<String> = pairs.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        Some(format!("{{{}}}", body.join(",")))
    });
    prop_oneof![arbitrary_column(), pairs]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_events_never_panic(
        ev_id in any::<i64>(),
        seconds in -100_000_000_000i64..100_000_000_000i64,
        ev_txid in any::<i64>(),
        ev_retry in any::<Option<i32>>(),
        ev_type in arbitrary_column(),
        ev_data in arbitrary_column(),
        ev_extra1 in arbitrary_column(),
        ev_extra2 in arbitrary_column(),
        ev_extra3 in arbitrary_properties(),
        ev_extra4 in arbitrary_column(),
    ) {
        let event = Event {
            ev_id,
            ev_time: DateTime::from_timestamp(seconds, 0).unwrap_or_default(),
            ev_txid, ev_retry, ev_type, ev_data, ev_extra1, ev_extra2, ev_extra3, ev_extra4,
        };
        match build_message(&event, &defaults()) {
            Ok(mapped) => {
                // A message is complete: the automatic headers are always there.
                let headers = mapped.message.properties.headers().clone().unwrap_or_default();
                for name in ["origin", "sequence", "timestamp", "txid"] {
                    prop_assert!(headers.contains_key(name));
                }
            }
            Err(rejection) => prop_assert!(!rejection.problem.is_empty()),
        }
    }
}
