//! Channel-agnostic content (the seed's "Principle 4"): an item is written once — title,
//! short / long / chat descriptions, images, a call to action, free-form attributes —
//! and each channel renderer extracts what it needs: an HTML fragment for the web, a
//! full email, a push notification within its length limits, GSM-7 / UCS-2 SMS
//! segments, a chat card, an in-app message.
//!
//! Rendering is a pure function of (item, channel, customer, request variables,
//! config): no clock, no randomness, no I/O, so the same request renders the same bytes
//! on every replay and every partition. The layout follows the data flow:
//!
//! - `item` — the content model and its strict parse (the `content` topic, topology.yaml);
//! - `config` — the `content:` section of topology.yaml: default items and limits;
//! - `templates` — Jinja fields rendered to plain text for one recipient;
//! - `html` — web fragment and email (the only place HTML escaping happens);
//! - `cards` — push, in-app and chat: short structured payloads;
//! - `sms` — GSM-7 / UCS-2 detection and segment splitting;
//! - `text` — word-boundary truncation shared by the length-limited channels.

mod cards;
mod config;
mod html;
mod item;
mod sms;
mod templates;
mod text;

pub use config::{ContentConfig, PushLimits, SmsLimits};
pub use item::{
    CallToAction, ChannelOverrides, ChatOverrides, ContentItem, Description, EmailOverrides, Image, Images,
    InAppOverrides, PushOverrides, SmsOverrides,
};
pub use sms::{SmsEncoding, SmsMessage};

use serde_json::Value;
use templates::PersonalisedItem;

/// The channels [`render`] knows, in the orchestrator's default order.
pub const CHANNELS: &[&str] = &["email", "push", "sms", "chat", "web", "in_app"];

/// The channels [`render`] knows.
pub fn channels() -> &'static [&'static str] {
    CHANNELS
}

/// Why an item could not be parsed or rendered. Every variant names the item and the
/// field at fault, so a refused content record or a failed send is fixable from the
/// message alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    /// Not JSON, or JSON of another shape (a missing `url`, an unknown field).
    #[error("content item is malformed: {0}")]
    Malformed(String),
    #[error("content item has no id")]
    MissingId,
    #[error("content item {item:?}: `{field}` is not a valid template: {message}")]
    BadTemplate { item: String, field: String, message: String },
    #[error("content item {item:?}: `{field}` failed to render: {message}")]
    RenderFailed { item: String, field: String, message: String },
    /// A URL field rendered to a link that is not http(s), mailto, tel or relative
    /// (`javascript:` from a customer-controlled variable would run in the recipient's
    /// browser).
    #[error(
        "content item {item:?}: `{field}` rendered to {url:?}, which is not an http(s), mailto, tel or relative link"
    )]
    UnsafeUrl { item: String, field: String, url: String },
    /// Nothing to send: the SMS text, or both push title and body, rendered empty.
    #[error("content item {item:?} renders to an empty {channel} message")]
    EmptyMessage { item: String, channel: String },
    #[error("unknown channel {0:?} (known: email, push, sms, chat, web, in_app)")]
    UnknownChannel(String),
}

/// Render `item` for one recipient on `channel`. `customer` is the profile view and
/// `vars` the message request's variables; templates see them as `customer`, `vars`
/// and `item` (the item's attributes). Undefined variables render as nothing.
///
/// - `web`: `{"html"}` — an `<article>` fragment;
/// - `email`: `{"subject", "html", "text"}`;
/// - `push`: `{"title", "body", "image"?, "url"?}` within `config.push`;
/// - `sms`: `{"text", "encoding", "segments", "characters"}` within `config.sms`;
/// - `chat`: `{"type": "card", "title", "text", "image"?, "buttons"}`;
/// - `in_app`: `{"title", "body", "image"?, "button"?}`.
pub fn render(
    item: &ContentItem,
    channel: &str,
    customer: &Value,
    vars: &Value,
    config: &ContentConfig,
) -> Result<Value, ContentError> {
    let personalised = PersonalisedItem::new(item, customer, vars);
    match channel {
        "email" => html::email(&personalised),
        "push" => cards::push(&personalised, &config.push),
        "sms" => sms::render(&personalised, &config.sms),
        "chat" => cards::chat(&personalised),
        "web" => html::web(&personalised),
        "in_app" => cards::in_app(&personalised),
        other => Err(ContentError::UnknownChannel(other.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn default_item(id: &str) -> ContentItem {
        ContentConfig::default().item(id).cloned().expect("built-in item")
    }

    fn ann() -> Value {
        json!({"canonical_id": "c-42", "first_name": "Ann"})
    }

    #[test]
    fn every_listed_channel_renders_the_default_items() {
        let config = ContentConfig::default();
        for id in ["cart_reminder", "cart_discount"] {
            for channel in channels() {
                let out = render(&default_item(id), channel, &ann(), &json!({}), &config);
                assert!(out.is_ok(), "{id} on {channel}: {out:?}");
            }
        }
    }

    #[test]
    fn unknown_channel_is_an_error() {
        let out = render(&default_item("cart_reminder"), "fax", &ann(), &json!({}), &ContentConfig::default());
        assert_eq!(out, Err(ContentError::UnknownChannel("fax".into())));
    }

    #[test]
    fn channels_are_the_six_the_orchestrator_decides_for() {
        assert_eq!(channels(), ["email", "push", "sms", "chat", "web", "in_app"]);
    }

    #[test]
    fn cart_reminder_email_greets_the_customer_and_links_their_cart() {
        let out = render(&default_item("cart_reminder"), "email", &ann(), &json!({}), &ContentConfig::default())
            .expect("renders");
        assert_eq!(out["subject"], "Ann, your cart is waiting");
        let text = out["text"].as_str().expect("text part");
        assert!(text.contains("Complete your order: https://shop.example/cart?c=c-42"), "{text}");
    }

    #[test]
    fn cart_discount_push_carries_the_requested_discount() {
        let config = ContentConfig::default();
        let out = render(&default_item("cart_discount"), "push", &ann(), &json!({"discount": "15%"}), &config)
            .expect("renders");
        assert_eq!(out["title"], "Ann, take 15% off your cart");
        assert!(out["body"].as_str().expect("body").contains("save 15%"), "{out}");

        let without = render(&default_item("cart_discount"), "push", &json!({}), &json!({}), &config).expect("renders");
        assert_eq!(without["title"], "Hi, take 10% off your cart");
    }

    #[test]
    fn rendering_is_deterministic() {
        let config = ContentConfig::default();
        for channel in channels() {
            let a = render(&default_item("cart_reminder"), channel, &ann(), &json!({}), &config);
            let b = render(&default_item("cart_reminder"), channel, &ann(), &json!({}), &config);
            assert_eq!(a, b, "{channel}");
        }
    }

    #[test]
    fn markup_in_a_customer_name_is_escaped_in_html_and_kept_verbatim_in_plain_text() {
        let config = ContentConfig::default();
        let item = default_item("cart_reminder");
        let mallory = json!({"first_name": "<script>alert(1)</script>", "canonical_id": "x"});
        for channel in ["web", "email"] {
            let out = render(&item, channel, &mallory, &json!({}), &config).expect("renders");
            let html = out["html"].as_str().expect("html");
            assert!(!html.contains("<script>"), "{channel}: {html}");
            assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{channel}: {html}");
        }
        let sms = render(&item, "sms", &mallory, &json!({}), &config).expect("renders");
        assert!(sms["text"].as_str().expect("text").starts_with("<script>alert(1)</script>, your cart"));
        let push = render(&item, "push", &mallory, &json!({}), &config).expect("renders");
        assert!(push["title"].as_str().expect("title").starts_with("<script>"));
    }
}
