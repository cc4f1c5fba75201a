//! The standard channel event (seed schema) and its validation. JSON is the wire form on
//! `events.raw` and `POST /v1/events`; Avro single-object encoding is accepted too.

use crate::validate::{
    as_object, kind_of, optional_string, required_string, required_timestamp, string_map, ValidationError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub event_type: String,
    /// RFC 3339 as sent.
    pub timestamp: String,
    /// `timestamp` in ms since the epoch (derived, not sent).
    #[serde(default, skip_serializing)]
    pub timestamp_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(default, skip_serializing_if = "EventContext::is_empty")]
    pub context: EventContext,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identifiers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub traits: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub payload: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventContext {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_version: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub geo: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// The sending library `{name, version}` (Segment's `context.library`).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub library: Value,
    /// UTM campaign `{name, source, medium, term, content}`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub campaign: Value,
    /// The page the event came from `{url, path, referrer, title, search}`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub page: Value,
    /// The source (topology `access.sources`) whose write key sent the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The client's own timestamp, before clock-skew correction (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_timestamp: Option<String>,
    /// When the client sent the event, by its own clock (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<String>,
    /// When chorus received it (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<String>,
}

impl EventContext {
    pub fn is_empty(&self) -> bool {
        *self == EventContext::default()
    }
}

const CONTEXT_STRINGS: [&str; 11] = [
    "device_type",
    "app_version",
    "ip",
    "user_agent",
    "device_id",
    "timezone",
    "locale",
    "source",
    "original_timestamp",
    "sent_at",
    "received_at",
];

impl Event {
    /// Parse and validate one event from JSON bytes.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Event, ValidationError> {
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| ValidationError::new("", format!("not valid JSON: {e}")))?;
        Event::from_json(&value)
    }

    /// Validate a JSON value as an event; every error names its field.
    pub fn from_json(value: &Value) -> Result<Event, ValidationError> {
        let obj = as_object(value, "")?;
        let event_id = required_string(obj, "event_id")?;
        let event_type = required_string(obj, "event_type")?;
        let (timestamp, timestamp_ms) = required_timestamp(obj, "timestamp")?;
        let context = match obj.get("context") {
            None | Some(Value::Null) => EventContext::default(),
            Some(Value::Object(ctx)) => {
                for name in CONTEXT_STRINGS {
                    optional_string(ctx, name, &format!("context.{name}"))?;
                }
                if let Some(tz) = ctx.get("timezone").and_then(Value::as_str) {
                    jiff::tz::TimeZone::get(tz).map_err(|_| {
                        ValidationError::new("context.timezone", format!("unknown IANA time zone {tz:?}"))
                    })?;
                }
                serde_json::from_value(Value::Object(ctx.clone()))
                    .map_err(|e| ValidationError::new("context", e.to_string()))?
            }
            Some(other) => {
                return Err(ValidationError::new("context", format!("expected an object, got {}", kind_of(other))))
            }
        };
        let traits = match obj.get("traits") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(t)) => t.clone(),
            Some(other) => {
                return Err(ValidationError::new("traits", format!("expected an object, got {}", kind_of(other))))
            }
        };
        let payload = match obj.get("payload") {
            None => Value::Null,
            Some(p @ (Value::Object(_) | Value::Null)) => p.clone(),
            Some(other) => {
                return Err(ValidationError::new("payload", format!("expected an object, got {}", kind_of(other))))
            }
        };
        Ok(Event {
            event_id,
            event_type,
            timestamp,
            timestamp_ms,
            customer_id: optional_string(obj, "customer_id", "customer_id")?,
            anonymous_id: optional_string(obj, "anonymous_id", "anonymous_id")?,
            session_id: optional_string(obj, "session_id", "session_id")?,
            channel: optional_string(obj, "channel", "channel")?,
            context,
            identifiers: string_map(obj, "identifiers")?,
            traits,
            payload,
        })
    }

    /// A number from the payload (`payload.total`), accepting numeric strings.
    pub fn payload_f64(&self, field: &str) -> Option<f64> {
        match self.payload.get(field)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }

    pub fn payload_str(&self, field: &str) -> Option<&str> {
        self.payload.get(field).and_then(Value::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"event_id": "e1", "event_type": "product.viewed", "timestamp": "2024-02-14T10:30:00Z",
               "customer_id": "cust_123", "channel": "web",
               "context": {"device_type": "iOS", "geo": {"country": "AU"}, "timezone": "Australia/Sydney"},
               "payload": {"product_id": "p1", "price": 299.0}})
    }

    #[test]
    fn seed_example_event_validates() {
        let e = Event::from_json(&base()).unwrap();
        assert_eq!(e.timestamp_ms, 1_707_906_600_000);
        assert_eq!(e.payload_f64("price"), Some(299.0));
        assert_eq!(e.context.timezone.as_deref(), Some("Australia/Sydney"));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("event_id", json!(null), "field `event_id`: is required"),
            ("timestamp", json!(12), "field `timestamp`: expected a string, got a number"),
            ("payload", json!([1]), "field `payload`: expected an object, got an array"),
            ("customer_id", json!(""), "field `customer_id`: must not be empty"),
        ];
        for (field, bad, want) in cases {
            let mut v = base();
            v[field] = bad;
            assert_eq!(Event::from_json(&v).unwrap_err().to_string(), want);
        }
        let mut v = base();
        v["context"]["timezone"] = json!("Mars/Olympus");
        assert!(Event::from_json(&v).unwrap_err().to_string().contains("context.timezone"));
        let mut v = base();
        v["identifiers"] = json!({"email": 5});
        assert_eq!(
            Event::from_json(&v).unwrap_err().to_string(),
            "field `identifiers.email`: expected a string, got a number"
        );
        let mut v = base();
        v["timestamp"] = json!("yesterday");
        assert!(Event::from_json(&v).unwrap_err().to_string().starts_with("field `timestamp`: expected an RFC 3339"));
    }

    #[test]
    fn malformed_json_is_a_clear_error() {
        let err = Event::from_json_bytes(b"{not json").unwrap_err();
        assert!(err.to_string().starts_with("not valid JSON"));
    }

    #[test]
    fn serialises_back_to_the_wire_shape() {
        let e = Event::from_json(&base()).unwrap();
        let back = serde_json::to_value(&e).unwrap();
        assert_eq!(Event::from_json(&back).unwrap(), e);
    }
}
