//! The `profile:` section of topology.yaml: how each event type updates the Customer
//! 360 profile, how much recent activity it keeps, and the churn model.

use crate::topology::{ConfigError, Duration};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Latest events kept on the profile as `recent_activity`.
    pub recent_activity: usize,
    /// A campaign the customer interacted with stays in `active_campaigns` this long.
    pub campaign_window: Duration,
    /// Most purchased product ids remembered (recommendations leave them out).
    pub purchased_items: usize,
    /// Event type → how it updates the profile. Types not listed are only counted in
    /// `event_counts` and recent activity.
    pub events: BTreeMap<String, EventEffect>,
    pub churn: ChurnModel,
}

/// Where an event's counter lives on the profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    Behavioural,
    Transactional,
    Interaction,
}

/// How one event type updates the profile. Fields name payload fields (dot paths).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventEffect {
    pub section: Section,
    /// Counter name in the section (count and last time); the event type by default.
    #[serde(default)]
    pub count: Option<String>,
    /// Totals: name → numeric payload field added up (call seconds, items bought).
    #[serde(default)]
    pub sum: BTreeMap<String, String>,
    /// Latest values: name → payload field, last by event time (payment method).
    #[serde(default)]
    pub latest: BTreeMap<String, String>,
    /// The event is a purchase: it adds to revenue, purchase count and last category.
    #[serde(default)]
    pub purchase: Option<PurchaseFields>,
    /// The event refunds this payload field's amount (lifetime value is net of it).
    #[serde(default)]
    pub refund: Option<String>,
    /// The event is an interaction with the campaign named by this payload field.
    #[serde(default)]
    pub campaign: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PurchaseFields {
    /// Order value.
    pub value: String,
    /// Category of the order (falls back to the first item's category).
    pub category: String,
    /// Line items, each `{product_id, category, price, quantity}`.
    pub items: String,
}

impl Default for PurchaseFields {
    fn default() -> Self {
        PurchaseFields { value: "total".into(), category: "category".into(), items: "items".into() }
    }
}

/// Churn risk from recency and frequency (an RFM-style logistic model):
/// `risk = 1 / (1 + e^-(intercept + recency_weight × days since last activity
///                      + frequency_weight × orders per 30 days of tenure))`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChurnModel {
    pub intercept: f64,
    pub recency_weight: f64,
    pub frequency_weight: f64,
    /// Score at or above which the risk is `high`, and `medium`; below is `low`.
    pub high: f64,
    pub medium: f64,
}

impl Default for ChurnModel {
    fn default() -> Self {
        ChurnModel { intercept: -2.5, recency_weight: 0.08, frequency_weight: -0.5, high: 0.7, medium: 0.4 }
    }
}

impl ChurnModel {
    /// Risk in [0, 1], rounded to 3 decimals.
    pub fn score(&self, days_inactive: f64, orders_per_30_days: f64) -> f64 {
        let z = self.intercept + self.recency_weight * days_inactive + self.frequency_weight * orders_per_30_days;
        let risk = 1.0 / (1.0 + (-z).exp());
        (risk * 1000.0).round() / 1000.0
    }

    pub fn level(&self, score: f64) -> &'static str {
        if score >= self.high {
            "high"
        } else if score >= self.medium {
            "medium"
        } else {
            "low"
        }
    }
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            recent_activity: 20,
            campaign_window: Duration::days(30),
            purchased_items: 200,
            events: default_events(),
            churn: ChurnModel::default(),
        }
    }
}

fn effect(section: Section, count: &str) -> EventEffect {
    EventEffect {
        section,
        count: Some(count.to_owned()),
        sum: BTreeMap::new(),
        latest: BTreeMap::new(),
        purchase: None,
        refund: None,
        campaign: None,
    }
}

fn paths(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The seed's event catalogue.
pub fn default_events() -> BTreeMap<String, EventEffect> {
    use Section::*;
    let mut events = BTreeMap::new();
    for (event, section, count) in [
        ("page.viewed", Behavioural, "page_views"),
        ("screen.viewed", Behavioural, "screen_views"),
        ("app.opened", Behavioural, "app_opens"),
        ("content.viewed", Behavioural, "content_consumed"),
        ("product.viewed", Behavioural, "product_views"),
        ("cart.item_added", Behavioural, "cart_additions"),
        ("cart.item_removed", Behavioural, "cart_removals"),
        ("support.case_opened", Interaction, "support_cases"),
        ("complaint.filed", Interaction, "complaints"),
        ("chat.message", Interaction, "chat_messages"),
    ] {
        events.insert(event.to_owned(), effect(section, count));
    }
    for (event, count) in [
        ("email.opened", "email_opens"),
        ("email.clicked", "email_clicks"),
        ("push.opened", "push_opens"),
        ("sms.clicked", "sms_clicks"),
    ] {
        events.insert(
            event.to_owned(),
            EventEffect { campaign: Some("campaign_id".into()), ..effect(Interaction, count) },
        );
    }
    events.insert(
        "call.completed".into(),
        EventEffect { sum: paths(&[("call_seconds", "duration_s")]), ..effect(Interaction, "calls") },
    );
    events.insert(
        "order.completed".into(),
        EventEffect {
            purchase: Some(PurchaseFields::default()),
            latest: paths(&[("payment_method", "payment_method"), ("shipping_method", "shipping_method")]),
            ..effect(Transactional, "orders")
        },
    );
    events.insert(
        "order.returned".into(),
        EventEffect {
            refund: Some("amount".into()),
            sum: paths(&[("returned_value", "amount")]),
            ..effect(Transactional, "returns")
        },
    );
    events
}

impl ProfileConfig {
    pub fn validate(&self, event_types: &[String], errors: &mut Vec<ConfigError>) {
        let err = |path: String, message: &str| ConfigError { path, message: message.to_owned() };
        if self.recent_activity > 1000 {
            errors.push(err("profile.recent_activity".into(), "must be at most 1000"));
        }
        if self.purchased_items > 10_000 {
            errors.push(err("profile.purchased_items".into(), "must be at most 10000"));
        }
        for (event, effect) in &self.events {
            if !event_types.contains(event) {
                errors.push(err(format!("profile.events.{event}"), "is not in event_types"));
            }
            let names = effect.count.iter().chain(effect.sum.keys()).chain(effect.latest.keys());
            if names.clone().any(|n| !crate::topology::is_identifier_type(n)) {
                errors.push(err(format!("profile.events.{event}"), "names must be lower-case letters, digits and _"));
            }
        }
        let c = &self.churn;
        if ![c.intercept, c.recency_weight, c.frequency_weight, c.high, c.medium].iter().all(|x| x.is_finite())
            || !(0.0..=1.0).contains(&c.high)
            || !(0.0..=1.0).contains(&c.medium)
            || c.medium > c.high
        {
            errors.push(err("profile.churn".into(), "weights must be finite and 0 <= medium <= high <= 1"));
        }
    }
}
