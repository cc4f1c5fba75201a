//! One entry of a profile's bounded recent activity. An activity never changes once
//! kept, yet every snapshot publishes it and every write-back stores it, so it is kept
//! as its published JSON, serialised once when the event arrives: snapshots copy the
//! bytes and the store keeps them as one string, instead of walking the event's payload
//! at every commit.

use crate::json::JsonText;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Activity {
    /// Event time, for the order of the list.
    pub at: i64,
    /// For deduplication, when a merge folds two lists together.
    pub event_id: String,
    /// The published form, [`Fields`] as JSON.
    json: JsonText,
}

/// What an activity says, as published: `{"type", "event_id", "at", "channel", "details"}`.
#[derive(Serialize)]
struct Fields<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    event_id: &'a str,
    at: i64,
    channel: Option<&'a str>,
    details: &'a Value,
}

/// [`Fields`] owned, as read back from JSON.
#[derive(Deserialize)]
struct OwnedFields {
    #[serde(rename = "type")]
    event_type: String,
    event_id: String,
    at: i64,
    channel: Option<String>,
    details: Value,
}

impl Activity {
    pub fn new(event_type: &str, event_id: &str, at: i64, channel: Option<&str>, details: &Value) -> Activity {
        let fields = Fields { event_type, event_id, at, channel, details };
        // A struct of strings, numbers and a JSON value always serialises.
        let json = JsonText::write(&fields).unwrap_or_default();
        Activity { at, event_id: event_id.to_owned(), json }
    }
}

impl PartialEq for Activity {
    fn eq(&self, other: &Activity) -> bool {
        self.json == other.json
    }
}

/// JSON (a `profiles` snapshot, a profile travelling to its survivor) gets the published
/// object; the binary store encoding gets `[at, event_id, json]`.
impl Serialize for Activity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            self.json.serialize(serializer)
        } else {
            (self.at, &self.event_id, self.json.text()).serialize(serializer)
        }
    }
}

/// Either form reads back, whatever the format: a stored value read as plain JSON (a
/// profile moving to its merge survivor) holds the stored form.
impl<'de> Deserialize<'de> for Activity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Activity, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Stored(i64, String, String),
            Published(OwnedFields),
        }
        match Form::deserialize(deserializer)? {
            Form::Stored(at, event_id, json) => {
                let json = JsonText::from_text(json).map_err(D::Error::custom)?;
                Ok(Activity { at, event_id, json })
            }
            Form::Published(f) => Ok(Activity::new(&f.event_type, &f.event_id, f.at, f.channel.as_deref(), &f.details)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Activity;
    use serde_json::json;

    fn example() -> Activity {
        Activity::new("product.viewed", "e-1", 42, Some("web"), &json!({"product_id": "p1", "price": 19.5}))
    }

    #[test]
    fn it_publishes_the_documented_object() {
        let published = serde_json::to_value(example()).unwrap();
        assert_eq!(
            published,
            json!({"type": "product.viewed", "event_id": "e-1", "at": 42, "channel": "web",
                   "details": {"product_id": "p1", "price": 19.5}})
        );
    }

    #[test]
    fn it_round_trips_through_json_and_the_store_encoding() {
        let a = example();
        let from_json: Activity = serde_json::from_slice(&serde_json::to_vec(&a).unwrap()).unwrap();
        assert_eq!(from_json, a);
        let stored = crate::cache::encode(&a).unwrap();
        let from_store: Activity = crate::cache::decode(&stored).unwrap();
        assert_eq!(from_store, a);
        // A stored value read as plain JSON (a profile moving to its merge survivor).
        let as_value: serde_json::Value = crate::cache::decode(&stored).unwrap();
        assert_eq!(serde_json::from_value::<Activity>(as_value).unwrap(), a);
        assert_eq!((from_store.at, from_store.event_id.as_str()), (42, "e-1"));
    }

    #[test]
    fn a_stored_activity_that_is_not_json_is_an_error_not_a_panic() {
        let mut bytes = vec![0x01];
        rmp_serde::encode::write(&mut bytes, &(1_i64, "e", "{not json")).unwrap();
        assert!(crate::cache::decode::<Activity>(&bytes).is_err());
    }
}
