//! The wire contract: a PgQ event becomes an AMQP message (SPEC §2).
//!
//! Pure: no I/O, no clocks except the UUIDs it is required to mint (`correlation_id` v4
//! and the `sequence` v7 header). [`build_message`] either returns a complete message or a
//! [`Rejection`] naming the column and the problem; it never publishes half-right and
//! never panics, whatever the columns hold (a property test checks that).
//!
//! | column | becomes |
//! |---|---|
//! | `ev_type` | routing key (NULL → empty) |
//! | `ev_data` | body, unchanged (NULL → empty) |
//! | `ev_extra1` | exchange (NULL/empty → default exchange) |
//! | `ev_extra2` | `content_type` (NULL/empty → not set) |
//! | `ev_extra3` | JSON object of properties; `headers` in it replaces `ev_extra4` |
//! | `ev_extra4` | JSON object of headers |
//! | `ev_time` | `timestamp` property (whole seconds) and `timestamp` header (ISO-8601) |
//! | `ev_txid` | `txid` header |
//!
//! A JSON `null` for a recognised property in `ev_extra3` means "do not set it" (so a
//! producer can remove an automatic property such as `app_id`); `"headers": null` means
//! "no override", so `ev_extra4` applies. `ev_extra4` must be a JSON object (or NULL/empty)
//! even when `ev_extra3.headers` replaces it.

use chrono::{DateTime, Datelike, Timelike, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{Map, Value};
use std::fmt;
use uuid::Uuid;

use crate::event::Event;

/// The longest AMQP short string (exchange, routing key, header name, most properties).
const SHORT_STRING_MAX: usize = 255;

/// Per-worker inputs to the mapping that do not change from event to event.
#[derive(Clone, Debug)]
pub struct MessageDefaults {
    /// Default `app_id` (None: not set).
    pub app_id: Option<ShortString>,
    /// Default `delivery_mode`.
    pub delivery_mode: u8,
    /// Value of the `origin` header.
    pub origin: LongString,
    /// Where deterministic `message_id`s come from; `None` turns them off.
    pub message_ids: Option<MessageIdNamespace>,
}

/// The namespace of deterministic message ids: one per database and queue.
///
/// `message_id = UUIDv5(namespace, "<ev_id in decimal>")`, with `namespace = UUIDv5(MIKKOO_NAMESPACE,
/// "<system identifier>/<queue>")`. The database's system identifier is fixed at
/// `initdb` and survives restarts and upgrades, so the same event always gets the same
/// id, while two databases (or two queues) that reuse an `ev_id` do not collide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageIdNamespace(Uuid);

/// The root namespace of mikkoo's message ids (a fixed, random UUID).
const MIKKOO_NAMESPACE: Uuid = Uuid::from_u128(0x6d69_6b6b_6f6f_4d49_8b4b_4f4f_2d49_4421);

impl MessageIdNamespace {
    /// The namespace for `queue` in the database with `system_identifier`.
    pub fn new(system_identifier: &str, queue: &str) -> Self {
        let name = format!("{system_identifier}/{queue}");
        MessageIdNamespace(Uuid::new_v5(&MIKKOO_NAMESPACE, name.as_bytes()))
    }

    /// The message id of event `ev_id`: `UUIDv5(namespace, decimal ev_id)`.
    pub fn message_id(&self, ev_id: i64) -> Uuid {
        Uuid::new_v5(&self.0, ev_id.to_string().as_bytes())
    }
}

/// A message ready to publish. The body is the event's `ev_data`, borrowed at publish
/// time rather than copied here.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Exchange (`""` is the default exchange).
    pub exchange: ShortString,
    /// Routing key.
    pub routing_key: ShortString,
    /// Properties, headers included.
    pub properties: BasicProperties,
}

/// The result of mapping one event.
#[derive(Debug)]
pub struct Mapped {
    /// The message.
    pub message: Message,
    /// Keys of `ev_extra3` that are not AMQP properties, ignored (the caller logs them
    /// once per key).
    pub ignored_properties: Vec<String>,
}

/// Why an event cannot become a message. Retrying cannot fix it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The column at fault (`ev_extra3`, `ev_extra4`, `ev_extra3.headers`, ...).
    pub column: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl Rejection {
    fn new(column: &'static str, problem: impl Into<String>) -> Self {
        Rejection {
            column,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.column, self.problem)
    }
}

impl std::error::Error for Rejection {}

/// Maps `event` to a message, or says why it cannot be one.
pub fn build_message(event: &Event, defaults: &MessageDefaults) -> Result<Mapped, Rejection> {
    let exchange = short_string(event.ev_extra1.as_deref(), "ev_extra1", "exchange name")?;
    let routing_key = short_string(event.ev_type.as_deref(), "ev_type", "routing key")?;

    let mut draft = Draft {
        app_id: defaults.app_id.clone(),
        content_type: non_empty(event.ev_extra2.as_deref())
            .map(|value| short_string(Some(value), "ev_extra2", "content_type"))
            .transpose()?,
        correlation_id: Some(uuid_short_string(Uuid::new_v4())),
        message_id: defaults
            .message_ids
            .map(|namespace| uuid_short_string(namespace.message_id(event.ev_id))),
        timestamp: Some(unix_seconds(event.ev_time)),
        delivery_mode: Some(defaults.delivery_mode),
        ..Draft::default()
    };

    let mut ignored_properties = Vec::new();
    let mut header_override = None;
    if let Some(properties) = json_object(
        event.ev_extra3.as_deref(),
        "ev_extra3",
        "a JSON object of AMQP properties",
    )? {
        for (key, value) in properties {
            if key == "headers" {
                if !value.is_null() {
                    header_override = Some(value);
                }
            } else if !draft.apply(&key, value)? {
                ignored_properties.push(key);
            }
        }
    }

    // Parsed even when ev_extra3.headers replaces it: a malformed ev_extra4 is a producer
    // bug that must be rejected and seen, not hidden by the override (SPEC §2.4).
    let extra4 = json_object(
        event.ev_extra4.as_deref(),
        "ev_extra4",
        "a JSON object of headers",
    )?;
    let mut headers = match header_override {
        Some(Value::Object(map)) => field_table(map, "ev_extra3.headers")?,
        Some(other) => {
            return Err(Rejection::new(
                "ev_extra3",
                format!("headers must be a JSON object, found {}", json_kind(&other)),
            ));
        }
        None => match extra4 {
            Some(map) => field_table(map, "ev_extra4")?,
            None => FieldTable::default(),
        },
    };
    add_automatic_headers(&mut headers, event, defaults);
    draft.headers = Some(headers);

    Ok(Mapped {
        message: Message {
            exchange,
            routing_key,
            properties: draft.into_properties(),
        },
        ignored_properties,
    })
}

/// Adds `origin`, `sequence`, `timestamp` and `txid` where the producer did not set them.
fn add_automatic_headers(headers: &mut FieldTable, event: &Event, defaults: &MessageDefaults) {
    if !headers.contains_key("origin") {
        headers.insert(
            ShortString::from("origin"),
            AMQPValue::LongString(defaults.origin.clone()),
        );
    }
    if !headers.contains_key("sequence") {
        let sequence = Uuid::now_v7().hyphenated().to_string();
        headers.insert(
            ShortString::from("sequence"),
            AMQPValue::LongString(sequence.into()),
        );
    }
    if !headers.contains_key("timestamp") {
        let timestamp = iso_timestamp(event.ev_time);
        headers.insert(
            ShortString::from("timestamp"),
            AMQPValue::LongString(timestamp.into()),
        );
    }
    if !headers.contains_key("txid") {
        headers.insert(ShortString::from("txid"), integer_value(event.ev_txid));
    }
}

/// `ev_time` as Python's `isoformat()` wrote it: microseconds, `+00:00` offset, and no
/// fraction when it is zero.
pub fn iso_timestamp(time: DateTime<Utc>) -> String {
    use std::fmt::Write as _;
    // Written field by field: chrono's strftime parses its format string on every call,
    // which showed in the relay's per-event profile.
    let mut out = String::with_capacity(32);
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        time.year(),
        time.month(),
        time.day(),
        time.hour(),
        time.minute(),
        time.second()
    );
    // A leap second shows as nanoseconds beyond one second; keep six digits.
    let micros = (time.nanosecond() / 1000).min(999_999);
    if micros != 0 {
        let _ = write!(out, ".{micros:06}");
    }
    out.push_str("+00:00");
    out
}

/// Whole seconds since the epoch, fraction truncated; times before 1970 become 0 (an
/// AMQP timestamp is unsigned).
fn unix_seconds(time: DateTime<Utc>) -> u64 {
    u64::try_from(time.timestamp()).unwrap_or(0)
}

/// Integers as the wire contract says: signed 32-bit when they fit, else signed 64-bit
/// (SPEC §2.3, §11). Shared with every other header mikkoo writes, dead letters included.
pub fn integer_value(value: i64) -> AMQPValue {
    match i32::try_from(value) {
        Ok(small) => AMQPValue::LongInt(small),
        Err(_) => AMQPValue::LongLongInt(value),
    }
}

fn uuid_short_string(uuid: Uuid) -> ShortString {
    let mut buffer = Uuid::encode_buffer();
    let text = uuid.hyphenated().encode_lower(&mut buffer);
    // 36 bytes always fit a short string.
    ShortString::try_new(&*text).unwrap_or_default()
}

fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|text| !text.is_empty())
}

fn short_string(value: Option<&str>, column: &'static str, what: &str) -> Result<ShortString, Rejection> {
    let text = value.unwrap_or("");
    ShortString::try_new(text).map_err(|_| {
        Rejection::new(
            column,
            format!(
                "{what} is {} bytes, longer than the AMQP limit of {SHORT_STRING_MAX}",
                text.len()
            ),
        )
    })
}

/// Parses a JSON-object column; NULL, empty or blank means `None`.
fn json_object(
    text: Option<&str>,
    column: &'static str,
    expected: &str,
) -> Result<Option<Map<String, Value>>, Rejection> {
    let Some(text) = text.filter(|text| !text.trim().is_empty()) else {
        return Ok(None);
    };
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(other) => Err(Rejection::new(
            column,
            format!("must be {expected}, found {}", json_kind(&other)),
        )),
        Err(error) => Err(Rejection::new(column, format!("not valid JSON ({error})"))),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSON object as an AMQP field table.
fn field_table(map: Map<String, Value>, column: &'static str) -> Result<FieldTable, Rejection> {
    let mut table = FieldTable::default();
    for (key, value) in map {
        let value = field_value(value, column, &key)?;
        let name = ShortString::try_new(key).map_err(|_| header_name_too_long(column))?;
        table.insert(name, value);
    }
    Ok(table)
}

fn header_name_too_long(column: &'static str) -> Rejection {
    Rejection::new(
        column,
        format!("a header name is longer than the AMQP limit of {SHORT_STRING_MAX} bytes"),
    )
}

/// JSON → AMQP field value: string → long string, bool → boolean, integer → signed
/// 32-bit when it fits else signed 64-bit, other numbers → double, null → void, array →
/// field array, object → nested table.
fn field_value(value: Value, column: &'static str, name: &str) -> Result<AMQPValue, Rejection> {
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(flag) => AMQPValue::Boolean(flag),
        Value::String(text) => AMQPValue::LongString(text.into()),
        Value::Number(number) => {
            if let Some(integer) = number.as_i64() {
                integer_value(integer)
            } else if number.is_u64() {
                return Err(Rejection::new(
                    column,
                    format!(
                        "header {:?}: integer {number} does not fit a signed 64-bit value",
                        shorten(name)
                    ),
                ));
            } else {
                AMQPValue::Double(number.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::Array(items) => {
            let mut array = FieldArray::default();
            for item in items {
                array.push(field_value(item, column, name)?);
            }
            AMQPValue::FieldArray(array)
        }
        Value::Object(map) => AMQPValue::FieldTable(field_table(map, column)?),
    })
}

/// The first characters of a possibly huge name, for messages.
fn shorten(name: &str) -> String {
    const SHOWN: usize = 40;
    match name.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}…", &name[..cut]),
        None => name.to_owned(),
    }
}

/// The properties being assembled; turned into [`BasicProperties`] at the end because
/// lapin's builder can set a property but not unset it.
#[derive(Default)]
struct Draft {
    app_id: Option<ShortString>,
    content_encoding: Option<ShortString>,
    content_type: Option<ShortString>,
    correlation_id: Option<ShortString>,
    message_id: Option<ShortString>,
    kind: Option<ShortString>,
    user_id: Option<ShortString>,
    reply_to: Option<ShortString>,
    expiration: Option<ShortString>,
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    timestamp: Option<u64>,
    headers: Option<FieldTable>,
}

impl Draft {
    /// Applies one `ev_extra3` key. Returns `Ok(false)` for keys that are not AMQP
    /// properties.
    fn apply(&mut self, key: &str, value: Value) -> Result<bool, Rejection> {
        let slot = match key {
            "app_id" => &mut self.app_id,
            "content_encoding" => &mut self.content_encoding,
            "content_type" => &mut self.content_type,
            "correlation_id" => &mut self.correlation_id,
            "message_id" => &mut self.message_id,
            "type" => &mut self.kind,
            "user_id" => &mut self.user_id,
            "reply_to" => &mut self.reply_to,
            "delivery_mode" => {
                self.delivery_mode = small_integer(key, &value, 1, 2)?;
                return Ok(true);
            }
            "priority" => {
                self.priority = small_integer(key, &value, 0, 255)?;
                return Ok(true);
            }
            "timestamp" => {
                self.timestamp = match value {
                    Value::Null => None,
                    Value::Number(n) if n.is_u64() => n.as_u64(),
                    _ => return Err(property_error(key, "must be a non-negative integer (seconds)")),
                };
                return Ok(true);
            }
            "expiration" => {
                self.expiration = expiration(&value)?;
                return Ok(true);
            }
            _ => return Ok(false),
        };
        *slot = match value {
            Value::Null => None,
            Value::String(text) => Some(ShortString::try_new(text).map_err(|_| {
                property_error(
                    key,
                    &format!("is longer than the AMQP limit of {SHORT_STRING_MAX} bytes"),
                )
            })?),
            _ => return Err(property_error(key, "must be a string")),
        };
        Ok(true)
    }

    fn into_properties(self) -> BasicProperties {
        let mut properties = BasicProperties::default();
        macro_rules! set {
            ($($field:ident => $setter:ident),* $(,)?) => {
                $(if let Some(value) = self.$field { properties = properties.$setter(value); })*
            };
        }
        set!(
            app_id => with_app_id,
            content_encoding => with_content_encoding,
            content_type => with_content_type,
            correlation_id => with_correlation_id,
            message_id => with_message_id,
            kind => with_type,
            user_id => with_user_id,
            reply_to => with_reply_to,
            expiration => with_expiration,
            delivery_mode => with_delivery_mode,
            priority => with_priority,
            timestamp => with_timestamp,
            headers => with_headers,
        );
        properties
    }
}

fn property_error(key: &str, problem: &str) -> Rejection {
    Rejection::new("ev_extra3", format!("{key} {problem}"))
}

fn small_integer(key: &str, value: &Value, min: u8, max: u8) -> Result<Option<u8>, Rejection> {
    match value {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64().and_then(|n| u8::try_from(n).ok()) {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(property_error(key, &range_words(min, max))),
        },
        _ => Err(property_error(key, &range_words(min, max))),
    }
}

fn range_words(min: u8, max: u8) -> String {
    if max - min == 1 {
        format!("must be {min} or {max}")
    } else {
        format!("must be {min}-{max}")
    }
}

/// `expiration`: a string of digits, or a non-negative integer sent as its digits.
fn expiration(value: &Value) -> Result<Option<ShortString>, Rejection> {
    const PROBLEM: &str = "must be a non-negative integer of milliseconds, or a string of digits";
    match value {
        Value::Null => Ok(None),
        Value::Number(n) if n.is_u64() => Ok(Some(ShortString::try_new(n.to_string()).unwrap_or_default())),
        Value::String(text)
            if !text.is_empty() && text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Ok(Some(ShortString::try_new(text.as_str()).unwrap_or_default()))
        }
        _ => Err(property_error("expiration", PROBLEM)),
    }
}

#[cfg(test)]
mod tests;
