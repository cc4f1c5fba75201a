//! The content item: one channel-agnostic source of truth per message, as it arrives as
//! JSON on the compacted `content` topic (keyed by id) or is declared under
//! `content.items` in topology.yaml.
//!
//! Every text field is a Jinja template over `customer`, `vars` and `item` (the
//! attributes); `id`, `name` and `attributes` are data. The shape is strict
//! (`deny_unknown_fields`): a misspelt `titel` is refused with its path instead of
//! silently sending a message without a title; `attributes` is the open-ended part.
//! Every template is compiled when the item arrives, so a broken item is refused
//! (dead-lettered) naming the field, rather than failing later on every send.

use super::templates;
use super::ContentError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContentItem {
    /// What a message request's `content_id` names; the `content` topic key.
    pub id: String,
    /// A label for the people managing content; never rendered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "is_default")]
    pub description: Description,
    #[serde(skip_serializing_if = "is_default")]
    pub images: Images,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cta: Option<CallToAction>,
    /// Free-form item data (price, sku, ...), seen by templates as `item`.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub attributes: Value,
    /// Per-channel replacements for the fields a channel would otherwise derive.
    #[serde(skip_serializing_if = "is_default")]
    pub channels: ChannelOverrides,
}

/// Descriptions by length; each channel takes the one that suits it and falls back to
/// the others.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Description {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub long: Option<String>,
    /// Conversational wording for chat cards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Images {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<Image>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<Image>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gallery: Vec<Image>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub url: String,
    /// Alternative text; empty marks the image as decorative.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub alt: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallToAction {
    /// The link text; the URL itself when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    pub url: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelOverrides {
    #[serde(skip_serializing_if = "is_default")]
    pub email: EmailOverrides,
    #[serde(skip_serializing_if = "is_default")]
    pub push: PushOverrides,
    #[serde(skip_serializing_if = "is_default")]
    pub sms: SmsOverrides,
    #[serde(skip_serializing_if = "is_default")]
    pub chat: ChatOverrides,
    #[serde(skip_serializing_if = "is_default")]
    pub in_app: InAppOverrides,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailOverrides {
    /// Instead of the title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushOverrides {
    /// Instead of the title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Instead of the short (else long) description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmsOverrides {
    /// The whole message, instead of title + short description + CTA URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatOverrides {
    /// Instead of the chat (else short) description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InAppOverrides {
    /// Instead of the title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Instead of the short (else long) description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl ContentItem {
    /// A `content` topic record: JSON of the item's shape with a non-empty `id` and
    /// templates that compile. The error names the first field at fault.
    pub fn parse(bytes: &[u8]) -> Result<ContentItem, ContentError> {
        let item: ContentItem = crate::json::parse_object(bytes).map_err(ContentError::Malformed)?;
        if item.id.trim().is_empty() {
            return Err(ContentError::MissingId);
        }
        match item.template_errors().into_iter().next() {
            Some((field, message)) => Err(ContentError::BadTemplate { item: item.id, field, message }),
            None => Ok(item),
        }
    }

    /// Every template that does not compile, as (field path, what is wrong), in field
    /// order.
    pub(crate) fn template_errors(&self) -> Vec<(String, String)> {
        self.templates()
            .into_iter()
            .filter_map(|(field, source)| templates::check(source).err().map(|message| (field, message)))
            .collect()
    }

    /// Every template field with its path as written in JSON / YAML.
    fn templates(&self) -> Vec<(String, &str)> {
        let description = &self.description;
        let mut fields: Vec<(String, Option<&String>)> = vec![
            ("title".into(), self.title.as_ref()),
            ("description.short".into(), description.short.as_ref()),
            ("description.long".into(), description.long.as_ref()),
            ("description.chat".into(), description.chat.as_ref()),
        ];
        let images = [
            ("images.primary".to_owned(), &self.images.primary),
            ("images.thumbnail".to_owned(), &self.images.thumbnail),
        ]
        .into_iter()
        .filter_map(|(path, image)| Some((path, image.as_ref()?)))
        .chain(self.images.gallery.iter().enumerate().map(|(i, image)| (format!("images.gallery[{i}]"), image)));
        for (path, image) in images {
            fields.push((format!("{path}.url"), Some(&image.url)));
            fields.push((format!("{path}.alt"), Some(&image.alt)));
        }
        if let Some(cta) = &self.cta {
            fields.push(("cta.label".into(), Some(&cta.label)));
            fields.push(("cta.url".into(), Some(&cta.url)));
        }
        let overrides = &self.channels;
        fields.extend([
            ("channels.email.subject".into(), overrides.email.subject.as_ref()),
            ("channels.push.title".into(), overrides.push.title.as_ref()),
            ("channels.push.body".into(), overrides.push.body.as_ref()),
            ("channels.sms.text".into(), overrides.sms.text.as_ref()),
            ("channels.chat.text".into(), overrides.chat.text.as_ref()),
            ("channels.in_app.title".into(), overrides.in_app.title.as_ref()),
            ("channels.in_app.body".into(), overrides.in_app.body.as_ref()),
        ]);
        fields.into_iter().filter_map(|(path, source)| Some((path, source?.as_str()))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SEED_SHAPED: &str = r#"{
        "id": "cart_reminder",
        "name": "Cart reminder",
        "title": "{{ customer.first_name | default('Hi') }}, your cart is waiting",
        "description": {"short": "Still thinking?", "long": "Your items are saved.", "chat": "Want to finish your order?"},
        "images": {
            "primary": {"url": "https://cdn.example/cart.png", "alt": "A cart"},
            "thumbnail": {"url": "https://cdn.example/cart-small.png"},
            "gallery": [{"url": "https://cdn.example/1.png", "alt": "one"}, {"url": "https://cdn.example/2.png", "alt": "two"}]
        },
        "cta": {"label": "Complete your order", "url": "https://shop.example/cart?c={{ customer.canonical_id }}"},
        "attributes": {"sku": "W-1", "price": 19.5},
        "channels": {"sms": {"text": "Your cart: {{ cta_url }}"}, "push": {"title": "Cart", "body": "Come back"}, "email": {"subject": "Your cart"}}
    }"#;

    fn parse_error(json: &str) -> ContentError {
        ContentItem::parse(json.as_bytes()).expect_err("refused")
    }

    #[test]
    fn parses_the_seed_shape() {
        let item = ContentItem::parse(SEED_SHAPED.as_bytes()).expect("parses");
        assert_eq!(item.id, "cart_reminder");
        assert_eq!(item.description.chat.as_deref(), Some("Want to finish your order?"));
        assert_eq!(item.images.thumbnail.as_ref().map(|i| i.alt.as_str()), Some(""));
        assert_eq!(item.images.gallery.len(), 2);
        assert_eq!(item.cta.as_ref().map(|c| c.label.as_str()), Some("Complete your order"));
        assert_eq!(item.attributes, json!({"sku": "W-1", "price": 19.5}));
        assert_eq!(item.channels.push.body.as_deref(), Some("Come back"));
        assert_eq!(item.channels.chat, ChatOverrides::default());
    }

    #[test]
    fn only_the_id_is_required() {
        let item = ContentItem::parse(br#"{"id": "bare"}"#).expect("parses");
        assert_eq!(item, ContentItem { id: "bare".into(), ..ContentItem::default() });
    }

    #[test]
    fn serialising_and_parsing_again_gives_the_same_item() {
        let item = ContentItem::parse(SEED_SHAPED.as_bytes()).expect("parses");
        let bytes = serde_json::to_vec(&item).expect("serialises");
        assert_eq!(ContentItem::parse(&bytes), Ok(item));
        let bare =
            serde_json::to_value(ContentItem { id: "bare".into(), ..ContentItem::default() }).expect("serialises");
        assert_eq!(bare, json!({"id": "bare"}), "absent fields stay absent");
    }

    #[test]
    fn a_missing_or_blank_id_is_refused() {
        assert_eq!(parse_error(r#"{"title": "Hello"}"#), ContentError::MissingId);
        assert_eq!(parse_error(r#"{"id": "  ", "title": "Hello"}"#), ContentError::MissingId);
    }

    #[test]
    fn a_bad_template_is_refused_naming_its_field() {
        let err = parse_error(r#"{"id": "x", "title": "ok", "description": {"long": "Hi {{ customer.name "}}"#);
        let ContentError::BadTemplate { item, field, message } = err else { panic!("{err:?}") };
        assert_eq!((item.as_str(), field.as_str()), ("x", "description.long"));
        assert!(message.contains("syntax error"), "{message}");

        let err = parse_error(
            r#"{"id": "x", "images": {"gallery": [{"url": "a.png"}, {"url": "b.png", "alt": "{% if %}"}]}}"#,
        );
        assert!(matches!(&err, ContentError::BadTemplate { field, .. } if field == "images.gallery[1].alt"), "{err:?}");

        let err = parse_error(r#"{"id": "x", "channels": {"sms": {"text": "{{ vars.code | }}"}}}"#);
        assert!(matches!(&err, ContentError::BadTemplate { field, .. } if field == "channels.sms.text"), "{err:?}");
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_path() {
        let err = parse_error(r#"{"id": "x", "description": {"shrt": "typo"}}"#);
        let ContentError::Malformed(message) = err else { panic!("{err:?}") };
        assert!(message.starts_with("description.shrt: unknown field `shrt`"), "{message}");
    }

    #[test]
    fn an_image_needs_a_url_and_a_cta_needs_a_url() {
        let err = parse_error(r#"{"id": "x", "images": {"primary": {"alt": "no url"}}}"#);
        assert!(matches!(&err, ContentError::Malformed(m) if m.contains("missing field `url`")), "{err:?}");
        let err = parse_error(r#"{"id": "x", "cta": {"label": "Go"}}"#);
        assert!(matches!(&err, ContentError::Malformed(m) if m.contains("missing field `url`")), "{err:?}");
    }

    #[test]
    fn not_json_or_trailing_bytes_are_malformed() {
        assert!(matches!(parse_error("not json"), ContentError::Malformed(_)));
        assert!(matches!(parse_error(r#"{"id": "x"} {"id": "y"}"#), ContentError::Malformed(_)));
        assert_eq!(parse_error(r#"["x"]"#), ContentError::Malformed("expected a JSON object".into()));
        assert!(matches!(parse_error(r#"{"id": "x""#), ContentError::Malformed(_)));
    }

    #[test]
    fn template_errors_lists_every_bad_field() {
        let item = ContentItem {
            id: "x".into(),
            title: Some("{{".into()),
            cta: Some(CallToAction { label: "{% for %}".into(), url: "https://ok.example".into() }),
            ..ContentItem::default()
        };
        let fields: Vec<String> = item.template_errors().into_iter().map(|(field, _)| field).collect();
        assert_eq!(fields, ["title", "cta.label"]);
    }
}
