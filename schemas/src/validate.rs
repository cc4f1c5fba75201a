//! Field-by-field validation helpers: every rejection names the field and what was wrong,
//! so a producer can fix its record from the `events.dlq` reason alone.

use serde_json::{Map, Value};
use std::fmt;

/// Why an input record was rejected. `field` is a dotted path (`context.timezone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "field `{}`: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ValidationError {}

/// How a JSON value is described in an error (`a string`, `an object`).
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn as_object<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>, ValidationError> {
    value.as_object().ok_or_else(|| ValidationError::new(field, format!("expected an object, got {}", kind_of(value))))
}

/// A required, non-empty string field.
pub(crate) fn required_string(obj: &Map<String, Value>, field: &str) -> Result<String, ValidationError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ValidationError::new(field, "is required")),
        Some(Value::String(s)) if s.trim().is_empty() => Err(ValidationError::new(field, "must not be empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(ValidationError::new(field, format!("expected a string, got {}", kind_of(other)))),
    }
}

/// An optional string field; `null` and absent mean None, an empty string is an error.
pub(crate) fn optional_string(
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<String>, ValidationError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Err(ValidationError::new(path, "must not be empty")),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(ValidationError::new(path, format!("expected a string, got {}", kind_of(other)))),
    }
}

/// A map of identifier type → value, both strings.
pub(crate) fn string_map(
    obj: &Map<String, Value>,
    field: &str,
) -> Result<std::collections::BTreeMap<String, String>, ValidationError> {
    let mut out = std::collections::BTreeMap::new();
    match obj.get(field) {
        None | Some(Value::Null) => Ok(out),
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let path = format!("{field}.{k}");
                match v {
                    Value::Null => {}
                    Value::String(s) => {
                        out.insert(k.clone(), s.clone());
                    }
                    other => {
                        return Err(ValidationError::new(path, format!("expected a string, got {}", kind_of(other))))
                    }
                }
            }
            Ok(out)
        }
        Some(other) => Err(ValidationError::new(field, format!("expected an object, got {}", kind_of(other)))),
    }
}

/// RFC 3339 timestamp → milliseconds since the Unix epoch.
pub fn parse_timestamp_ms(text: &str) -> Result<i64, String> {
    let ts: jiff::Timestamp = text
        .parse()
        .map_err(|e| format!("expected an RFC 3339 timestamp such as 2024-02-14T10:30:00Z, got {text:?} ({e})"))?;
    Ok(ts.as_millisecond())
}

pub(crate) fn required_timestamp(obj: &Map<String, Value>, field: &str) -> Result<(String, i64), ValidationError> {
    let text = required_string(obj, field)?;
    let ms = parse_timestamp_ms(&text).map_err(|m| ValidationError::new(field, m))?;
    Ok((text, ms))
}
