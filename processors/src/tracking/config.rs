//! The `segment:` section of topology.yaml: how Segment track event names become chorus
//! event types. The defaults follow Segment's e-commerce, email and mobile specs.

use crate::topology::{config_error, ConfigError};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SegmentConfig {
    /// Segment event name (`Order Completed`) → chorus event type (`order.completed`).
    pub events: BTreeMap<String, String>,
    /// The event type of a track call whose name is neither in `events` nor a chorus
    /// event type itself (the name is kept in `payload.event`); `reject` answers 400.
    pub other_events: String,
}

/// Refuse track calls with names the table does not know.
pub const REJECT: &str = "reject";

/// Segment's spec names and the chorus event types they mean.
pub const DEFAULT_EVENTS: &[(&str, &str)] = &[
    ("Application Opened", "app.opened"),
    ("Cart Viewed", "cart.viewed"),
    ("Checkout Started", "checkout.started"),
    ("Email Link Clicked", "email.clicked"),
    ("Email Opened", "email.opened"),
    ("Order Completed", "order.completed"),
    ("Order Refunded", "order.returned"),
    ("Product Added", "cart.item_added"),
    ("Product Removed", "cart.item_removed"),
    ("Product Viewed", "product.viewed"),
    ("Push Notification Tapped", "push.opened"),
];

impl Default for SegmentConfig {
    fn default() -> Self {
        SegmentConfig {
            events: DEFAULT_EVENTS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            other_events: "track".to_owned(),
        }
    }
}

impl SegmentConfig {
    /// The chorus event type of a track call named `name`; `None` when refused.
    pub fn event_type<'a>(&'a self, name: &'a str, known: &[String]) -> Option<&'a str> {
        if let Some(t) = self.events.get(name) {
            return Some(t);
        }
        if known.iter().any(|k| k == name) {
            return Some(name);
        }
        (self.other_events != REJECT).then_some(self.other_events.as_str())
    }

    pub fn validate(&self, event_types: &[String], errors: &mut Vec<ConfigError>) {
        let known = |t: &str| event_types.iter().any(|k| k == t);
        for (name, event_type) in &self.events {
            if !known(event_type) {
                errors.push(config_error(
                    format!("segment.events.{name}"),
                    format!("{event_type:?} is not in event_types"),
                ));
            }
        }
        if self.other_events != REJECT && !known(&self.other_events) {
            errors.push(config_error(
                "segment.other_events",
                format!("{:?} is not in event_types (or `reject`)", self.other_events),
            ));
        }
    }
}
