//! Segment's Tracking API spec, mapped onto the standard event: what lets teams point
//! Segment's own libraries (analytics.js, analytics-node, analytics-python, ...) at
//! chorus and change nothing else.
//!
//! One message (`identify`, `track`, `page`, `screen`, `group`, `alias`) becomes one
//! standard event: `messageId` is the `event_id` (so a retried batch is processed once),
//! `userId` / `anonymousId` the identifiers, `traits` the profile attributes,
//! `properties` the payload, `context` the event context. Timestamps are corrected for
//! the client's clock as Segment does. Unknown fields are ignored (clients add
//! `_metadata`, `integrations`, ...); a field of the wrong type is an error naming it.
//! The HTTP side (auth, limits, gzip, CORS) is in the binary's `src/tracking.rs`.

pub mod config;

use crate::topology::Topology;
use chorus_schemas::{kind_of, Event, ValidationError};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

pub use config::SegmentConfig;

/// The six call types of the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl CallType {
    /// A message's `type`, or a route's name: `/v1/track` and analytics.js's `/v1/t`.
    pub fn parse(name: &str) -> Option<CallType> {
        Some(match name {
            "identify" | "i" => CallType::Identify,
            "track" | "t" => CallType::Track,
            "page" | "p" => CallType::Page,
            "screen" | "s" => CallType::Screen,
            "group" | "g" => CallType::Group,
            "alias" | "a" => CallType::Alias,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Identify => "identify",
            CallType::Track => "track",
            CallType::Page => "page",
            CallType::Screen => "screen",
            CallType::Group => "group",
            CallType::Alias => "alias",
        }
    }
}

/// What the receiving side knows about a message.
#[derive(Debug, Clone)]
pub struct Receipt<'a> {
    /// The source whose write key sent it.
    pub source: &'a str,
    /// The channel that source implies.
    pub channel: &'a str,
    /// When chorus received the call (ms since the epoch).
    pub received_at: i64,
    /// The client's address, for a message without `context.ip` (as Segment fills it).
    pub ip: Option<&'a str>,
}

/// The parts of a batch call every message of it shares.
#[derive(Debug, Clone, Default)]
pub struct BatchDefaults<'a> {
    pub context: Option<&'a Map<String, Value>>,
    pub sent_at: Option<&'a Value>,
}

/// A message refused, with the field at fault (`batch[3].userId`, `timestamp`).
pub type MessageError = ValidationError;

/// Map one message to a standard event. `call` is the route's call type; in a batch,
/// `None` (each message says its own `type`).
pub fn to_event(
    message: &Value,
    call: Option<CallType>,
    defaults: &BatchDefaults<'_>,
    receipt: &Receipt<'_>,
    topology: &Topology,
) -> Result<Event, MessageError> {
    let msg = message
        .as_object()
        .ok_or_else(|| ValidationError::new("", format!("a message is an object, got {}", kind_of(message))))?;
    let call = match (call, msg.get("type")) {
        (_, Some(Value::String(t))) => {
            CallType::parse(t).filter(|c| call.is_none_or(|route| route == *c)).ok_or_else(|| match call {
                Some(route) => ValidationError::new(
                    "type",
                    format!("{t:?} sent to the {} route (leave `type` out or match the route)", route.as_str()),
                ),
                None => ValidationError::new(
                    "type",
                    format!("unknown call type {t:?} (identify, track, page, screen, group, alias)"),
                ),
            })?
        }
        (Some(route), None | Some(Value::Null)) => route,
        (None, None | Some(Value::Null)) => return Err(ValidationError::new("type", "is required in a batch")),
        (_, Some(other)) => {
            return Err(ValidationError::new("type", format!("expected a string, got {}", kind_of(other))))
        }
    };
    let user_id = id_field(msg, "userId")?;
    let anonymous_id = id_field(msg, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        return Err(ValidationError::new("userId", "a message needs a userId or an anonymousId"));
    }
    let properties = object_field(msg, "properties")?;
    let traits = object_field(msg, "traits")?;
    let context = merged_context(object_field(msg, "context")?, defaults.context);
    let (timestamp, original, sent_at) = corrected_time(msg, defaults.sent_at, receipt.received_at)?;
    let event_id = match msg.get("messageId") {
        None | Some(Value::Null) => derived_message_id(receipt.source, message),
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(ValidationError::new("messageId", "must not be empty")),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => {
            return Err(ValidationError::new("messageId", format!("expected a string, got {}", kind_of(other))))
        }
    };

    let mut event_traits = Map::new();
    let mut identifiers = Map::new();
    let mut anonymous = anonymous_id.clone();
    let (event_type, payload) = match call {
        CallType::Identify => {
            event_traits = traits.cloned().unwrap_or_default();
            ("identify".to_owned(), Value::Null)
        }
        CallType::Track => {
            let name = required_text(msg, "event")?;
            let known = &topology.event_types;
            let event_type = topology.segment.event_type(&name, known).ok_or_else(|| {
                ValidationError::new("event", format!("{name:?} is not in the topology's segment.events"))
            })?;
            let mut payload = commerce_payload(properties, event_type);
            if event_type != name && !topology.segment.events.contains_key(&name) {
                payload.insert("event".into(), Value::String(name.clone()));
            }
            (event_type.to_owned(), Value::Object(payload))
        }
        CallType::Page => {
            let mut payload = context.get("page").and_then(Value::as_object).cloned().unwrap_or_default();
            payload.extend(properties.cloned().unwrap_or_default());
            if let Some(name) = optional_text(msg, "name")? {
                payload.insert("name".into(), Value::String(name));
            }
            if let Some(category) = optional_text(msg, "category")? {
                payload.insert("category".into(), Value::String(category));
            }
            ("page.viewed".to_owned(), Value::Object(payload))
        }
        CallType::Screen => {
            let mut payload = properties.cloned().unwrap_or_default();
            if let Some(name) = optional_text(msg, "name")? {
                payload.insert("screen".into(), Value::String(name));
            }
            ("screen.viewed".to_owned(), Value::Object(payload))
        }
        CallType::Group => {
            let group_id = id_field(msg, "groupId")?.ok_or_else(|| ValidationError::new("groupId", "is required"))?;
            let mut account = traits.cloned().unwrap_or_default();
            account.insert("id".into(), Value::String(group_id.clone()));
            event_traits.insert("account".into(), Value::Object(account));
            ("group".to_owned(), json!({"group_id": group_id}))
        }
        CallType::Alias => {
            let previous =
                id_field(msg, "previousId")?.ok_or_else(|| ValidationError::new("previousId", "is required"))?;
            if user_id.is_none() {
                return Err(ValidationError::new("userId", "an alias links a previousId to a userId"));
            }
            // The previous id is usually the anonymous id; an earlier user id links the
            // same way (it cannot be a second customer_id: that type is unique).
            match &anonymous {
                Some(a) if *a != previous => {
                    identifiers.insert("anonymous_id".into(), Value::String(previous.clone()));
                }
                _ => anonymous = Some(previous.clone()),
            }
            ("alias".to_owned(), json!({"previous_id": previous}))
        }
    };
    if event_type == "system.tick" {
        return Err(ValidationError::new(
            "event",
            "system.tick moves event time; it is not sent through the Segment API",
        ));
    }
    if !topology.is_known_event_type(&event_type) {
        return Err(ValidationError::new(
            if call == CallType::Track { "event" } else { "type" },
            format!("event type {event_type:?} is not in the topology's event_types"),
        ));
    }
    check_context_types(&context)?;
    let device = context.get("device").and_then(Value::as_object);
    if let Some(token) = device.and_then(|d| d.get("token")).and_then(Value::as_str).filter(|t| !t.is_empty()) {
        event_traits.insert("push_token".into(), Value::String(token.to_owned()));
    }
    let text = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
    let mut event_context = Map::new();
    let mut put = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            event_context.insert(name.into(), Value::String(v));
        }
    };
    put("ip", text(context.get("ip")).or_else(|| receipt.ip.map(str::to_owned)));
    put("user_agent", text(context.get("userAgent")));
    put("locale", text(context.get("locale")));
    put("timezone", text(context.get("timezone")));
    put("device_id", device.and_then(|d| text(d.get("id"))));
    put("device_type", device.and_then(|d| text(d.get("type"))));
    put("app_version", context.get("app").and_then(|a| text(a.get("version"))));
    put("source", Some(receipt.source.to_owned()));
    put("original_timestamp", original);
    put("sent_at", sent_at);
    put("received_at", Some(crate::time::rfc3339(receipt.received_at)));
    for (from, to) in [("library", "library"), ("campaign", "campaign"), ("page", "page"), ("location", "geo")] {
        if let Some(v @ Value::Object(_)) = context.get(from) {
            event_context.insert(to.into(), v.clone());
        }
    }

    let mut event = json!({
        "event_id": event_id,
        "event_type": event_type,
        "timestamp": crate::time::rfc3339(timestamp),
        "channel": receipt.channel,
        "context": event_context,
        "traits": event_traits,
        "identifiers": identifiers,
        "payload": payload,
    });
    if let Some(u) = user_id {
        event["customer_id"] = Value::String(u);
    }
    if let Some(a) = anonymous {
        event["anonymous_id"] = Value::String(a);
    }
    Event::from_json(&event).map_err(|e| translate_field(e, call))
}

/// A standard-event field name in an error, said as the Segment field the caller sent.
fn translate_field(mut e: ValidationError, call: CallType) -> ValidationError {
    let segment = match e.field.as_str() {
        "customer_id" => "userId".to_owned(),
        "anonymous_id" => "anonymousId".to_owned(),
        "event_id" => "messageId".to_owned(),
        "context.user_agent" => "context.userAgent".to_owned(),
        "context.device_id" => "context.device.id".to_owned(),
        "context.device_type" => "context.device.type".to_owned(),
        "context.app_version" => "context.app.version".to_owned(),
        f if f.starts_with("payload") => {
            let rest = f.trim_start_matches("payload");
            if call == CallType::Identify {
                format!("traits{rest}")
            } else {
                format!("properties{rest}")
            }
        }
        f if f.starts_with("identifiers") => "previousId".to_owned(),
        f => f.to_owned(),
    };
    e.field = segment;
    e
}

/// The context fields chorus reads must have the spec's types; others pass unread.
fn check_context_types(context: &Map<String, Value>) -> Result<(), ValidationError> {
    let wrong = |path: &str, want: &str, v: &Value| {
        Err(ValidationError::new(format!("context.{path}"), format!("expected {want}, got {}", kind_of(v))))
    };
    for name in ["ip", "userAgent", "locale", "timezone"] {
        match context.get(name) {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(v) => return wrong(name, "a string", v),
        }
    }
    for name in ["device", "app", "library", "campaign", "page", "location"] {
        match context.get(name) {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(v) => return wrong(name, "an object", v),
        }
    }
    for (parent, name) in [("device", "id"), ("device", "type"), ("device", "token"), ("app", "version")] {
        match context.get(parent).and_then(|p| p.get(name)) {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(v) => return wrong(&format!("{parent}.{name}"), "a string", v),
        }
    }
    Ok(())
}

/// The message's context over the batch's: the message's own fields win.
fn merged_context(own: Option<&Map<String, Value>>, batch: Option<&Map<String, Value>>) -> Map<String, Value> {
    let mut context = batch.cloned().unwrap_or_default();
    context.extend(own.cloned().unwrap_or_default());
    context
}

/// Segment's correction for a client clock that is wrong: the time between the event
/// and its sending, by the client's clock, taken back from when chorus received it.
/// `timestamp = receivedAt − (sentAt − originalTimestamp)`; without `sentAt` the
/// client's timestamp as given; a time in the future is clamped to the receipt.
/// Returns the corrected time and the client's two times as sent (RFC 3339).
fn corrected_time(
    msg: &Map<String, Value>,
    batch_sent_at: Option<&Value>,
    received_at: i64,
) -> Result<(i64, Option<String>, Option<String>), ValidationError> {
    let original = time_field(msg.get("timestamp").or_else(|| msg.get("originalTimestamp")), "timestamp")?;
    let sent = match msg.get("sentAt") {
        Some(v) if !v.is_null() => time_field(Some(v), "sentAt")?,
        _ => time_field(batch_sent_at, "sentAt")?,
    };
    let at = match (&original, &sent) {
        (Some((o, _)), Some((s, _))) => received_at.saturating_sub(s.saturating_sub(*o)),
        (Some((o, _)), None) => *o,
        (None, _) => received_at,
    };
    Ok((at.min(received_at), original.map(|(_, text)| text), sent.map(|(_, text)| text)))
}

/// An ISO 8601 time: RFC 3339, or a date-time without offset (read as UTC), as
/// Segment's libraries send; ms since the epoch and the canonical text.
fn time_field(value: Option<&Value>, field: &str) -> Result<Option<(i64, String)>, ValidationError> {
    let text = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.trim(),
        Some(other) => {
            return Err(ValidationError::new(field, format!("expected an ISO 8601 string, got {}", kind_of(other))))
        }
    };
    let ms = text
        .parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .or_else(|_| {
            text.parse::<jiff::civil::DateTime>()
                .and_then(|d| jiff::tz::TimeZone::UTC.to_timestamp(d))
                .map(|t| t.as_millisecond())
        })
        .map_err(|_| ValidationError::new(field, format!("{text:?} is not an ISO 8601 date-time")))?;
    Ok(Some((ms, crate::time::rfc3339(ms))))
}

/// `properties` of a track call in the shape chorus's stages read: Segment's e-commerce
/// spec names `products` and `revenue`; chorus's orders have `items` and `total`.
fn commerce_payload(properties: Option<&Map<String, Value>>, event_type: &str) -> Map<String, Value> {
    let mut payload = properties.cloned().unwrap_or_default();
    if let Some(Value::Array(products)) = payload.get("products") {
        let items: Vec<Value> = products
            .iter()
            .filter_map(Value::as_object)
            .map(|p| {
                let mut item = p.clone();
                if !item.contains_key("product_id") {
                    if let Some(sku) = p.get("sku").or_else(|| p.get("id")) {
                        item.insert("product_id".into(), sku.clone());
                    }
                }
                Value::Object(item)
            })
            .collect();
        payload.entry("items").or_insert(Value::Array(items));
    }
    if !payload.contains_key("product_id") {
        if let Some(sku) = payload.get("sku").cloned() {
            payload.insert("product_id".into(), sku);
        }
    }
    if !payload.contains_key("total") {
        if let Some(revenue) = payload.get("revenue").or_else(|| payload.get("value")).cloned() {
            payload.insert("total".into(), revenue);
        }
    }
    if event_type == "order.returned" && !payload.contains_key("amount") {
        if let Some(total) = payload.get("total").cloned() {
            payload.insert("amount".into(), total);
        }
    }
    payload
}

/// An id the spec allows as a string or a number; empty means absent.
fn id_field(msg: &Map<String, Value>, field: &str) -> Result<Option<String>, ValidationError> {
    match msg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => {
            Err(ValidationError::new(field, format!("expected a string or a number, got {}", kind_of(other))))
        }
    }
}

fn object_field<'a>(
    msg: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, ValidationError> {
    match msg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(ValidationError::new(field, format!("expected an object, got {}", kind_of(other)))),
    }
}

fn optional_text(msg: &Map<String, Value>, field: &str) -> Result<Option<String>, ValidationError> {
    match msg.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone()).filter(|s| !s.is_empty())),
        Some(other) => Err(ValidationError::new(field, format!("expected a string, got {}", kind_of(other)))),
    }
}

fn required_text(msg: &Map<String, Value>, field: &str) -> Result<String, ValidationError> {
    optional_text(msg, field)?.ok_or_else(|| ValidationError::new(field, "is required"))
}

/// A message sent without `messageId` (the spec allows it) gets one derived from its
/// content, so that the same message sent twice is still processed once.
fn derived_message_id(source: &str, message: &Value) -> String {
    let mut hash = Sha256::new();
    hash.update(source.as_bytes());
    hash.update([0]);
    hash.update(message.to_string().as_bytes());
    let digest = hash.finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("chorus-{hex}")
}

#[cfg(test)]
mod tests;
