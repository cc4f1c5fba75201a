//! A data subject request as filed (HTTP body or `privacy.requests` record), validated
//! field by field: every error names the field at fault.

use crate::identity::config::IdentityConfig;
use crate::identity::{Identifier, Refusal};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestType {
    Access,
    Portability,
    Erasure,
    Rectification,
    Unsuppress,
}

impl RequestType {
    pub const ALL: [RequestType; 5] = [
        RequestType::Access,
        RequestType::Portability,
        RequestType::Erasure,
        RequestType::Rectification,
        RequestType::Unsuppress,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RequestType::Access => "access",
            RequestType::Portability => "portability",
            RequestType::Erasure => "erasure",
            RequestType::Rectification => "rectification",
            RequestType::Unsuppress => "unsuppress",
        }
    }

    fn parse(text: &str) -> Option<RequestType> {
        RequestType::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// Access and portability hand back what chorus holds.
    pub fn exports(self) -> bool {
        matches!(self, RequestType::Access | RequestType::Portability)
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyRequest {
    pub request_id: String,
    #[serde(rename = "type")]
    pub kind: RequestType,
    pub identifier: Identifier,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_callback_url: Option<String>,
    /// When chorus took the request, ms since the epoch.
    pub received_at: i64,
}

/// Why a request was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub code: &'static str,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn invalid(code: &'static str, field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { code, field: field.into(), message: message.into() }
}

const FIELDS: [&str; 7] =
    ["request_id", "type", "identifier", "changes", "reason", "status_callback_url", "received_at"];

/// Identifier types a rectification cannot change: they are how the graph knows the
/// customer (change them by unlinking and identifying).
const IDENTIFYING_ATTRIBUTES: [&str; 2] = ["email", "phone"];

/// Longest `reason` kept.
const MAX_REASON_CHARS: usize = 1_000;

impl PrivacyRequest {
    /// Validate a request. `request_id` and `received_at` are taken from the record
    /// when present, else from `fallback_id` and `now`. `max_bytes` bounds `changes`.
    pub fn parse(
        json: &Value,
        config: &IdentityConfig,
        fallback_id: impl FnOnce() -> String,
        now: i64,
        max_bytes: usize,
    ) -> Result<PrivacyRequest, FieldError> {
        let Value::Object(map) = json else {
            return Err(invalid("invalid_request", "", "a privacy request is a JSON object"));
        };
        if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(invalid(
                "invalid_request",
                unknown.as_str(),
                format!("unknown field {unknown:?}; expected one of {FIELDS:?}"),
            ));
        }
        let kind = match map.get("type") {
            Some(Value::String(t)) => RequestType::parse(t).ok_or_else(|| {
                let all: Vec<&str> = RequestType::ALL.iter().map(|t| t.as_str()).collect();
                invalid("invalid_request", "type", format!("{t:?} is not one of {all:?}"))
            })?,
            Some(_) => return Err(invalid("invalid_request", "type", "must be a string")),
            None => return Err(invalid("invalid_request", "type", "is required")),
        };
        let identifier = parse_identifier(map.get("identifier"), config)?;
        let changes = match (map.get("changes"), kind) {
            (None | Some(Value::Null), RequestType::Rectification) => {
                return Err(invalid("invalid_changes", "changes", "a rectification needs the attributes to correct"))
            }
            (None | Some(Value::Null), _) => None,
            (Some(_), kind) if kind != RequestType::Rectification => {
                return Err(invalid(
                    "invalid_request",
                    "changes",
                    format!("only a rectification has changes, not {}", kind.as_str()),
                ))
            }
            (Some(Value::Object(changes)), _) => Some(validate_changes(changes, max_bytes)?),
            (Some(_), _) => {
                return Err(invalid("invalid_changes", "changes", "must be an object of attribute → value"))
            }
        };
        let reason = match map.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(r)) => Some(r.chars().take(MAX_REASON_CHARS).collect()),
            Some(_) => return Err(invalid("invalid_request", "reason", "must be a string")),
        };
        let status_callback_url = match map.get("status_callback_url") {
            None | Some(Value::Null) => None,
            Some(Value::String(url)) => Some(validate_callback(url)?),
            Some(_) => return Err(invalid("invalid_callback_url", "status_callback_url", "must be a string")),
        };
        let request_id = match map.get("request_id") {
            None | Some(Value::Null) => fallback_id(),
            Some(Value::String(id)) if uuid::Uuid::parse_str(id).is_ok() => id.to_lowercase(),
            Some(_) => return Err(invalid("invalid_request", "request_id", "must be a UUID")),
        };
        let received_at = match map.get("received_at") {
            None | Some(Value::Null) => now,
            Some(v) => {
                v.as_i64().ok_or_else(|| invalid("invalid_request", "received_at", "must be ms since the epoch"))?
            }
        };
        Ok(PrivacyRequest { request_id, kind, identifier, changes, reason, status_callback_url, received_at })
    }

    pub fn order(&self) -> super::Order {
        super::Order {
            request_id: self.request_id.clone(),
            kind: self.kind,
            changes: self.changes.clone(),
            received_at: self.received_at,
        }
    }
}

fn parse_identifier(value: Option<&Value>, config: &IdentityConfig) -> Result<Identifier, FieldError> {
    let Some(value) = value else { return Err(invalid("invalid_request", "identifier", "is required")) };
    let Value::Object(id) = value else {
        return Err(invalid("invalid_request", "identifier", "must be an object {\"type\", \"value\"}"));
    };
    if let Some(unknown) = id.keys().find(|k| !matches!(k.as_str(), "type" | "value")) {
        return Err(invalid(
            "invalid_request",
            format!("identifier.{unknown}"),
            "unknown field; an identifier has a type and a value",
        ));
    }
    let Some(kind) = id.get("type").and_then(Value::as_str) else {
        return Err(invalid("invalid_request", "identifier.type", "is required (a string)"));
    };
    let Some(raw) = id.get("value").and_then(Value::as_str) else {
        return Err(invalid("invalid_identifier", "identifier.value", "is required (a string)"));
    };
    Identifier::parse(config, kind, raw).map_err(|refusal| match refusal {
        Refusal::UnknownType => {
            let declared: Vec<&str> = config.types.iter().map(|t| t.name.as_str()).collect();
            invalid(
                "unknown_identifier_type",
                "identifier.type",
                format!("{kind:?} is not a declared identifier type ({declared:?})"),
            )
        }
        // The message names the type, never the value (it may be personal data).
        other => {
            invalid("invalid_identifier", "identifier.value", format!("is not a usable {kind} ({})", other.label()))
        }
    })
}

fn validate_changes(changes: &Map<String, Value>, max_bytes: usize) -> Result<Map<String, Value>, FieldError> {
    if changes.is_empty() {
        return Err(invalid("invalid_changes", "changes", "names no attribute"));
    }
    let size = serde_json::to_vec(changes).map(|b| b.len()).unwrap_or(usize::MAX);
    if size > max_bytes {
        return Err(invalid("invalid_changes", "changes", format!("is {size} bytes, over limits.max_record_bytes")));
    }
    let mut flat = Map::new();
    for (name, value) in changes {
        let field = format!("changes.{name}");
        if name.is_empty() || name.len() > 200 {
            return Err(invalid("invalid_changes", field, "an attribute name is 1 to 200 characters"));
        }
        if IDENTIFYING_ATTRIBUTES.contains(&name.as_str()) {
            return Err(invalid(
                "invalid_changes",
                field,
                "identifies the customer: change it by unlinking the old one and identifying with the new one",
            ));
        }
        match value {
            // One level of nesting, as the profile flattens traits (`address.city`).
            Value::Object(inner) if !inner.is_empty() => {
                for (inner_name, v) in inner {
                    flat.insert(format!("{name}.{inner_name}"), v.clone());
                }
            }
            Value::Object(_) => return Err(invalid("invalid_changes", field, "is an empty object")),
            v => {
                flat.insert(name.clone(), v.clone());
            }
        }
    }
    Ok(flat)
}

fn validate_callback(url: &str) -> Result<String, FieldError> {
    let field = "status_callback_url";
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(invalid("invalid_callback_url", field, "must be an http(s) URL"));
    }
    if callback_host(url).is_none() || url.len() > 2_000 || url.chars().any(char::is_whitespace) {
        return Err(invalid("invalid_callback_url", field, "must be an http(s) URL with a host"));
    }
    Ok(url.to_owned())
}

/// The host an http(s) URL names, without user info or port.
pub fn callback_host(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => host_port.split(':').next()?,
    };
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<PrivacyRequest, FieldError> {
        PrivacyRequest::parse(
            &v,
            &IdentityConfig::default(),
            || "00000000-0000-7000-8000-000000000000".into(),
            5,
            1 << 20,
        )
    }

    #[test]
    fn a_good_request_is_normalised() {
        let r =
            parse(json!({"type": "erasure", "identifier": {"type": "email", "value": " Ann@Example.com "}})).unwrap();
        assert_eq!(r.kind, RequestType::Erasure);
        assert_eq!(r.identifier.label(), "email:ann@example.com");
        assert_eq!(r.received_at, 5);
        assert_eq!(r.request_id, "00000000-0000-7000-8000-000000000000");
    }

    #[test]
    fn every_error_names_its_field() {
        let cases = [
            (json!([]), "invalid_request", ""),
            (json!({"identifier": {"type": "email", "value": "a@b.co"}}), "invalid_request", "type"),
            (json!({"type": "forget", "identifier": {"type": "email", "value": "a@b.co"}}), "invalid_request", "type"),
            (json!({"type": "access"}), "invalid_request", "identifier"),
            (
                json!({"type": "access", "identifier": {"type": "shoe", "value": "x"}}),
                "unknown_identifier_type",
                "identifier.type",
            ),
            (
                json!({"type": "access", "identifier": {"type": "email", "value": "not-an-email"}}),
                "invalid_identifier",
                "identifier.value",
            ),
            (json!({"type": "access", "identifier": {"type": "email"}}), "invalid_identifier", "identifier.value"),
            (
                json!({"type": "access", "identifier": {"type": "email", "value": "a@b.co"}, "extra": 1}),
                "invalid_request",
                "extra",
            ),
            (
                json!({"type": "access", "identifier": {"type": "email", "value": "a@b.co"}, "changes": {"x": 1}}),
                "invalid_request",
                "changes",
            ),
            (
                json!({"type": "rectification", "identifier": {"type": "email", "value": "a@b.co"}}),
                "invalid_changes",
                "changes",
            ),
            (
                json!({"type": "rectification", "identifier": {"type": "email", "value": "a@b.co"}, "changes": {}}),
                "invalid_changes",
                "changes",
            ),
            (
                json!({"type": "rectification", "identifier": {"type": "email", "value": "a@b.co"}, "changes": {"email": "b@c.co"}}),
                "invalid_changes",
                "changes.email",
            ),
            (
                json!({"type": "access", "identifier": {"type": "email", "value": "a@b.co"}, "status_callback_url": "ftp://x"}),
                "invalid_callback_url",
                "status_callback_url",
            ),
            (
                json!({"type": "access", "identifier": {"type": "email", "value": "a@b.co"}, "request_id": "nope"}),
                "invalid_request",
                "request_id",
            ),
        ];
        for (body, code, field) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!((e.code, e.field.as_str()), (code, field), "{body}: {e}");
            assert!(!e.message.contains("not-an-email"), "an error never repeats the value: {e}");
        }
    }

    #[test]
    fn rectification_changes_are_flattened_like_traits() {
        let r = parse(json!({"type": "rectification", "identifier": {"type": "customer_id", "value": "c1"},
            "changes": {"first_name": "Ann", "address": {"city": "Lyon"}}}))
        .unwrap();
        let changes = r.changes.unwrap();
        assert_eq!(changes.get("address.city"), Some(&json!("Lyon")));
        assert_eq!(changes.get("first_name"), Some(&json!("Ann")));
    }
}
