//! The two other inputs upstream systems send: message requests (`messages.requests`)
//! and consent changes (`consent`). Both name a customer by `customer_id` or by
//! `identifiers`.

use crate::validate::{
    as_object, kind_of, optional_string, required_string, required_timestamp, string_map, ValidationError,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageRequest {
    pub request_id: String,
    pub timestamp: String,
    #[serde(default, skip_serializing)]
    pub timestamp_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identifiers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<String>,
    pub category: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_id: Option<String>,
    pub channels: Vec<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub variables: Value,
    /// Set on the requests a journey makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journey_id: Option<String>,
}

impl MessageRequest {
    pub fn from_json(value: &Value) -> Result<MessageRequest, ValidationError> {
        let obj = as_object(value, "")?;
        let (timestamp, timestamp_ms) = required_timestamp(obj, "timestamp")?;
        let channels = match obj.get("channels") {
            Some(Value::Array(items)) if !items.is_empty() => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().map(str::to_owned).ok_or_else(|| {
                        ValidationError::new(format!("channels[{i}]"), format!("expected a string, got {}", kind_of(v)))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(Value::Array(_)) => return Err(ValidationError::new("channels", "must name at least one channel")),
            None | Some(Value::Null) => return Err(ValidationError::new("channels", "is required")),
            Some(other) => {
                return Err(ValidationError::new("channels", format!("expected an array, got {}", kind_of(other))))
            }
        };
        let request = MessageRequest {
            request_id: required_string(obj, "request_id")?,
            timestamp,
            timestamp_ms,
            customer_id: optional_string(obj, "customer_id", "customer_id")?,
            identifiers: string_map(obj, "identifiers")?,
            campaign_id: optional_string(obj, "campaign_id", "campaign_id")?,
            category: required_string(obj, "category")?,
            content_id: optional_string(obj, "content_id", "content_id")?,
            channels,
            variables: obj.get("variables").cloned().unwrap_or(Value::Null),
            journey_id: optional_string(obj, "journey_id", "journey_id")?,
        };
        if request.customer_id.is_none() && request.identifiers.is_empty() {
            return Err(ValidationError::new("customer_id", "a request needs `customer_id` or `identifiers`"));
        }
        Ok(request)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identifiers: BTreeMap<String, String>,
    pub purpose: String,
    pub granted: bool,
    pub timestamp: String,
    #[serde(default, skip_serializing)]
    pub timestamp_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl ConsentChange {
    pub fn from_json(value: &Value) -> Result<ConsentChange, ValidationError> {
        let obj = as_object(value, "")?;
        let (timestamp, timestamp_ms) = required_timestamp(obj, "timestamp")?;
        let granted = match obj.get("granted") {
            Some(Value::Bool(b)) => *b,
            None | Some(Value::Null) => return Err(ValidationError::new("granted", "is required")),
            Some(other) => {
                return Err(ValidationError::new("granted", format!("expected a boolean, got {}", kind_of(other))))
            }
        };
        let change = ConsentChange {
            customer_id: optional_string(obj, "customer_id", "customer_id")?,
            identifiers: string_map(obj, "identifiers")?,
            purpose: required_string(obj, "purpose")?,
            granted,
            timestamp,
            timestamp_ms,
            source: optional_string(obj, "source", "source")?,
        };
        if change.customer_id.is_none() && change.identifiers.is_empty() {
            return Err(ValidationError::new("customer_id", "a consent change needs `customer_id` or `identifiers`"));
        }
        Ok(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_needs_a_customer_and_channels() {
        let ok = json!({"request_id": "r1", "timestamp": "2024-02-14T10:30:00Z", "customer_id": "c1",
                        "category": "transactional", "channels": ["email"]});
        assert!(MessageRequest::from_json(&ok).is_ok());
        let mut v = ok.clone();
        v.as_object_mut().unwrap().remove("customer_id");
        assert!(MessageRequest::from_json(&v).unwrap_err().to_string().contains("needs `customer_id`"));
        let mut v = ok.clone();
        v["channels"] = json!([]);
        assert_eq!(
            MessageRequest::from_json(&v).unwrap_err().to_string(),
            "field `channels`: must name at least one channel"
        );
        let mut v = ok;
        v["channels"] = json!(["email", 3]);
        assert_eq!(MessageRequest::from_json(&v).unwrap_err().field, "channels[1]");
    }

    #[test]
    fn consent_granted_must_be_boolean() {
        let v = json!({"customer_id": "c1", "purpose": "marketing_email", "granted": "yes",
                       "timestamp": "2024-02-14T10:30:00Z"});
        assert_eq!(
            ConsentChange::from_json(&v).unwrap_err().to_string(),
            "field `granted`: expected a boolean, got a string"
        );
    }
}
