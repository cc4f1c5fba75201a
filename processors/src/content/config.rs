//! `content:` in topology.yaml: the items shipped with the topology and the channel
//! limits. Declared items are what journeys can send before anything is published on
//! the `content` topic (the built-in cart-abandonment journey sends `cart_reminder` by
//! email, then `cart_discount` by push). The limits are configuration rather than
//! constants because they are what the deployment's push provider, devices and SMS
//! budget allow, and those differ.

use super::item::{CallToAction, ChannelOverrides, ContentItem, Description, PushOverrides};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentConfig {
    /// Items available without the `content` topic; listing items replaces the
    /// built-in ones.
    pub items: Vec<ContentItem>,
    pub push: PushLimits,
    pub sms: SmsLimits,
}

/// Push lengths in characters; longer texts are cut at a word boundary with "…".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushLimits {
    pub title_max: usize,
    pub body_max: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmsLimits {
    /// Most parts one SMS may take (each is billed); longer texts are cut at a word
    /// boundary with an ellipsis.
    pub max_segments: usize,
}

/// A concatenated SMS numbers its parts in one byte.
const MAX_SMS_SEGMENTS: usize = 255;

impl Default for PushLimits {
    /// What iOS and Android show without expanding the notification.
    fn default() -> Self {
        PushLimits { title_max: 65, body_max: 240 }
    }
}

impl Default for SmsLimits {
    fn default() -> Self {
        SmsLimits { max_segments: 3 }
    }
}

impl Default for ContentConfig {
    fn default() -> Self {
        ContentConfig {
            items: vec![cart_reminder(), cart_discount()],
            push: PushLimits::default(),
            sms: SmsLimits::default(),
        }
    }
}

fn text(source: &str) -> Option<String> {
    Some(source.to_owned())
}

/// The cart-abandonment journey's first message (email).
fn cart_reminder() -> ContentItem {
    ContentItem {
        id: "cart_reminder".into(),
        name: text("Cart reminder"),
        title: text("{{ customer.first_name | default('Hi') }}, your cart is waiting"),
        description: Description {
            short: text("The items in your cart are saved. Complete your order before they sell out."),
            long: text(
                "We saved the items in your cart so you can pick up where you left off.\n\n\
                 Complete your order in a couple of clicks, before they sell out.",
            ),
            chat: text("Your cart is still waiting. Want to complete your order?"),
        },
        cta: Some(CallToAction {
            label: "Complete your order".into(),
            url: "https://shop.example/cart?c={{ customer.canonical_id }}".into(),
        }),
        ..ContentItem::default()
    }
}

/// The cart-abandonment journey's second message (push), with the request's
/// `discount` variable.
fn cart_discount() -> ContentItem {
    ContentItem {
        id: "cart_discount".into(),
        name: text("Cart discount"),
        title: text("{{ vars.discount | default('10%') }} off the items in your cart"),
        description: Description {
            short: text("Complete your order today and save {{ vars.discount | default('10%') }}."),
            ..Description::default()
        },
        cta: Some(CallToAction {
            label: "Claim your discount".into(),
            url: "https://shop.example/cart?c={{ customer.canonical_id }}&offer=cart_discount".into(),
        }),
        channels: ChannelOverrides {
            push: PushOverrides {
                title: text("{{ customer.first_name | default('Hi') }}, take {{ vars.discount | default('10%') }} off your cart"),
                body: text(
                    "Your cart is still waiting. Complete your order today and save {{ vars.discount | default('10%') }}.",
                ),
            },
            ..ChannelOverrides::default()
        },
        ..ContentItem::default()
    }
}

impl ContentConfig {
    /// The declared item with this id.
    pub fn item(&self, id: &str) -> Option<&ContentItem> {
        self.items.iter().find(|item| item.id == id)
    }

    /// Every problem as (YAML path, message), under `path` (the section's own path,
    /// `content` in topology.yaml): blank and duplicate ids, templates that do not
    /// compile, limits of zero.
    pub fn validate(&self, path: &str) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        let mut first_index: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, item) in self.items.iter().enumerate() {
            let at = format!("{path}.items[{i}]");
            if item.id.trim().is_empty() {
                errors.push((format!("{at}.id"), "must not be empty".to_owned()));
            } else if let Some(first) = first_index.get(item.id.as_str()) {
                errors.push((
                    format!("{at}.id"),
                    format!("duplicate id {:?}, first declared at items[{first}]", item.id),
                ));
            } else {
                first_index.insert(&item.id, i);
            }
            for (field, message) in item.template_errors() {
                errors.push((format!("{at}.{field}"), message));
            }
        }
        for (field, value) in [("push.title_max", self.push.title_max), ("push.body_max", self.push.body_max)] {
            if value == 0 {
                errors.push((format!("{path}.{field}"), "must be at least 1".to_owned()));
            }
        }
        if !(1..=MAX_SMS_SEGMENTS).contains(&self.sms.max_segments) {
            errors.push((format!("{path}.sms.max_segments"), format!("must be between 1 and {MAX_SMS_SEGMENTS}")));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `content:` section of the shipped topology.yaml, spelling out the defaults.
    const SHIPPED_YAML: &str = r#"
items:
  - id: cart_reminder
    name: Cart reminder
    title: "{{ customer.first_name | default('Hi') }}, your cart is waiting"
    description:
      short: The items in your cart are saved. Complete your order before they sell out.
      long: |-
        We saved the items in your cart so you can pick up where you left off.

        Complete your order in a couple of clicks, before they sell out.
      chat: Your cart is still waiting. Want to complete your order?
    cta: { label: Complete your order, url: "https://shop.example/cart?c={{ customer.canonical_id }}" }
  - id: cart_discount
    name: Cart discount
    title: "{{ vars.discount | default('10%') }} off the items in your cart"
    description:
      short: "Complete your order today and save {{ vars.discount | default('10%') }}."
    cta: { label: Claim your discount, url: "https://shop.example/cart?c={{ customer.canonical_id }}&offer=cart_discount" }
    channels:
      push:
        title: "{{ customer.first_name | default('Hi') }}, take {{ vars.discount | default('10%') }} off your cart"
        body: "Your cart is still waiting. Complete your order today and save {{ vars.discount | default('10%') }}."
push: { title_max: 65, body_max: 240 }
sms: { max_segments: 3 }
"#;

    fn from_yaml(text: &str) -> Result<ContentConfig, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }

    #[test]
    fn the_shipped_yaml_spells_out_the_defaults() {
        assert_eq!(from_yaml(SHIPPED_YAML).expect("parses"), ContentConfig::default());
    }

    #[test]
    fn an_empty_section_gives_the_defaults_and_they_are_valid() {
        let config = from_yaml("{}").expect("parses");
        assert_eq!(config, ContentConfig::default());
        assert_eq!(config.validate("content"), Vec::<(String, String)>::new());
        assert!(config.item("cart_reminder").is_some() && config.item("cart_discount").is_some());
        assert_eq!(config.item("nope"), None);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(from_yaml("push: { title_maximum: 10 }").is_err());
        assert!(from_yaml("items: [{ id: x, titel: typo }]").is_err());
        assert!(from_yaml("templates: []").is_err());
    }

    #[test]
    fn every_problem_is_reported_with_its_yaml_path() {
        let config = from_yaml(
            r#"
items:
  - { id: a, title: "{{ oops" }
  - { id: "" }
  - { id: a, description: { chat: "{% if %}" }, cta: { url: "{{ x | }}" } }
push: { title_max: 0, body_max: 0 }
sms: { max_segments: 0 }
"#,
        )
        .expect("parses");
        let paths: Vec<String> = config.validate("content").into_iter().map(|(path, _)| path).collect();
        assert_eq!(
            paths,
            [
                "content.items[0].title",
                "content.items[1].id",
                "content.items[2].id",
                "content.items[2].description.chat",
                "content.items[2].cta.url",
                "content.push.title_max",
                "content.push.body_max",
                "content.sms.max_segments",
            ]
        );
        let errors = config.validate("content");
        assert!(errors[2].1.contains("duplicate id \"a\", first declared at items[0]"), "{:?}", errors[2]);
        assert!(errors[0].1.contains("syntax error"), "{:?}", errors[0]);
    }

    #[test]
    fn more_sms_segments_than_a_concatenated_sms_can_number_is_refused() {
        let config = ContentConfig { sms: SmsLimits { max_segments: 256 }, ..ContentConfig::default() };
        assert_eq!(config.validate("content").len(), 1);
    }
}
