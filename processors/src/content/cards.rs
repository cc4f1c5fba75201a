//! The short structured channels: push notification, in-app message and chat card.
//! Each is a small JSON payload the delivery service maps onto its provider's API
//! (APNs / FCM, an in-app SDK, a chat platform's card), so the values are plain text —
//! never HTML-escaped — and the shapes stay provider-neutral.
//!
//! Push is the only one with hard limits: devices cut titles and bodies at their own
//! length, mid-word and without warning, so they are truncated here, at a word
//! boundary with "…", to the configured number of characters (not bytes: the limits
//! are about what fits on screen).

use super::config::PushLimits;
use super::templates::{PersonalisedItem, RenderedImage, RenderedLink};
use super::text::{collapse_whitespace, truncate_chars};
use super::ContentError;
use serde_json::{json, Map, Value};

fn image_json(image: RenderedImage) -> Value {
    json!({"url": image.url, "alt": image.alt})
}

fn link_json(cta: &RenderedLink) -> Value {
    json!({"label": cta.text(), "url": cta.url})
}

/// The body of a notification-like message: the override, else the short description,
/// else the long one.
fn body(
    item: &PersonalisedItem,
    override_path: &str,
    override_source: Option<&String>,
) -> Result<String, ContentError> {
    let description = &item.item.description;
    item.first_filled(&[
        (override_path, override_source),
        ("description.short", description.short.as_ref()),
        ("description.long", description.long.as_ref()),
    ])
}

/// `{"title", "body", "image"?, "url"?}`: one line each, within `limits`; the image is
/// the primary image (else the thumbnail) and the URL the call to action's.
pub(crate) fn push(item: &PersonalisedItem, limits: &PushLimits) -> Result<Value, ContentError> {
    let overrides = &item.item.channels.push;
    let title =
        item.first_filled(&[("channels.push.title", overrides.title.as_ref()), ("title", item.item.title.as_ref())])?;
    let title = truncate_chars(&collapse_whitespace(&title), limits.title_max, "…");
    let body = truncate_chars(
        &collapse_whitespace(&body(item, "channels.push.body", overrides.body.as_ref())?),
        limits.body_max,
        "…",
    );
    if title.is_empty() && body.is_empty() {
        return Err(ContentError::EmptyMessage { item: item.id().to_owned(), channel: "push".into() });
    }
    let mut push = Map::new();
    push.insert("title".into(), title.into());
    push.insert("body".into(), body.into());
    if let Some(image) = item.hero_image()? {
        push.insert("image".into(), image.url.into());
    }
    if let Some(cta) = item.cta()? {
        push.insert("url".into(), cta.url.into());
    }
    Ok(Value::Object(push))
}

/// `{"title", "body", "image"?: {"url", "alt"}, "button"?: {"label", "url"}}`.
pub(crate) fn in_app(item: &PersonalisedItem) -> Result<Value, ContentError> {
    let overrides = &item.item.channels.in_app;
    let mut message = Map::new();
    let title =
        item.first_filled(&[("channels.in_app.title", overrides.title.as_ref()), ("title", item.item.title.as_ref())])?;
    message.insert("title".into(), title.into());
    message.insert("body".into(), body(item, "channels.in_app.body", overrides.body.as_ref())?.into());
    if let Some(image) = item.hero_image()? {
        message.insert("image".into(), image_json(image));
    }
    if let Some(cta) = item.cta()? {
        message.insert("button".into(), link_json(&cta));
    }
    Ok(Value::Object(message))
}

/// `{"type": "card", "title", "text", "image"?: {"url", "alt"}, "buttons": [{"type":
/// "link", "label", "url"}]}`; the text is the chat override, else the conversational
/// description, else the short or long one.
pub(crate) fn chat(item: &PersonalisedItem) -> Result<Value, ContentError> {
    let description = &item.item.description;
    let text = item.first_filled(&[
        ("channels.chat.text", item.item.channels.chat.text.as_ref()),
        ("description.chat", description.chat.as_ref()),
        ("description.short", description.short.as_ref()),
        ("description.long", description.long.as_ref()),
    ])?;
    let mut card = Map::new();
    card.insert("type".into(), "card".into());
    card.insert("title".into(), item.title()?.into());
    card.insert("text".into(), text.into());
    if let Some(image) = item.hero_image()? {
        card.insert("image".into(), image_json(image));
    }
    let buttons: Vec<Value> =
        item.cta()?.iter().map(|cta| json!({"type": "link", "label": cta.text(), "url": cta.url})).collect();
    card.insert("buttons".into(), buttons.into());
    Ok(Value::Object(card))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{
        CallToAction, ChatOverrides, ContentItem, Description, Image, Images, InAppOverrides, PushOverrides,
    };

    fn card() -> ContentItem {
        ContentItem {
            id: "card".into(),
            title: Some("Hi {{ customer.first_name }}".into()),
            description: Description {
                short: Some("Your <cart> & more".into()),
                long: Some("A long\n\ndescription".into()),
                chat: Some("Want to finish your order, {{ customer.first_name }}?".into()),
            },
            images: Images {
                primary: None,
                thumbnail: Some(Image { url: "https://cdn.example/t.png".into(), alt: "Cart".into() }),
                gallery: Vec::new(),
            },
            cta: Some(CallToAction {
                label: "Complete your order".into(),
                url: "https://shop.example/cart?a=1&b=2".into(),
            }),
            ..ContentItem::default()
        }
    }

    fn limits() -> PushLimits {
        PushLimits { title_max: 65, body_max: 240 }
    }

    fn for_ann(item: &ContentItem) -> PersonalisedItem<'_> {
        PersonalisedItem::new(item, &json!({"first_name": "Ann"}), &json!({}))
    }

    #[test]
    fn push_has_title_body_image_and_url_unescaped() {
        let out = push(&for_ann(&card()), &limits()).expect("renders");
        assert_eq!(
            out,
            json!({
                "title": "Hi Ann",
                "body": "Your <cart> & more",
                "image": "https://cdn.example/t.png",
                "url": "https://shop.example/cart?a=1&b=2",
            })
        );
    }

    #[test]
    fn push_truncates_at_a_word_boundary_counting_characters() {
        let mut item = card();
        item.channels.push = PushOverrides {
            title: Some("Ann, the items in your cart are going fast — complete your order now".into()),
            body: Some("Ünïcödéx ".repeat(40)),
        };
        let out = push(&for_ann(&item), &limits()).expect("renders");
        let title = out["title"].as_str().expect("title");
        assert_eq!(title, "Ann, the items in your cart are going fast — complete your order…");
        assert!(title.chars().count() <= 65 && title.len() > 65, "65 characters, more bytes");
        let body = out["body"].as_str().expect("body");
        assert_eq!(body, format!("{}…", "Ünïcödéx ".repeat(26).trim_end()), "the 27th word would end at 242");
        assert!(body.chars().count() <= 240);
    }

    #[test]
    fn push_title_and_body_are_one_line_each() {
        let mut item = card();
        item.title = Some("Two\nlines".into());
        item.description.short = None;
        let out = push(&for_ann(&item), &limits()).expect("renders");
        assert_eq!((out["title"].as_str(), out["body"].as_str()), (Some("Two lines"), Some("A long description")));
    }

    #[test]
    fn push_without_image_or_link_leaves_them_out() {
        let item = ContentItem { id: "x".into(), title: Some("Only a title".into()), ..ContentItem::default() };
        assert_eq!(push(&for_ann(&item), &limits()), Ok(json!({"title": "Only a title", "body": ""})));
    }

    #[test]
    fn push_with_neither_title_nor_body_is_an_error() {
        let item = ContentItem { id: "x".into(), title: Some("{{ vars.missing }}".into()), ..ContentItem::default() };
        let err = push(&for_ann(&item), &limits());
        assert_eq!(err, Err(ContentError::EmptyMessage { item: "x".into(), channel: "push".into() }));
    }

    #[test]
    fn chat_is_a_card_with_the_conversational_text_and_a_link_button() {
        let out = chat(&for_ann(&card())).expect("renders");
        assert_eq!(
            out,
            json!({
                "type": "card",
                "title": "Hi Ann",
                "text": "Want to finish your order, Ann?",
                "image": {"url": "https://cdn.example/t.png", "alt": "Cart"},
                "buttons": [{"type": "link", "label": "Complete your order", "url": "https://shop.example/cart?a=1&b=2"}],
            })
        );
    }

    #[test]
    fn chat_falls_back_to_the_short_description_and_may_have_no_buttons() {
        let mut item = card();
        item.description.chat = None;
        item.cta = None;
        item.images = Images::default();
        let out = chat(&for_ann(&item)).expect("renders");
        assert_eq!(out, json!({"type": "card", "title": "Hi Ann", "text": "Your <cart> & more", "buttons": []}));

        item.channels.chat = ChatOverrides { text: Some("Override".into()) };
        assert_eq!(chat(&for_ann(&item)).expect("renders")["text"], "Override");
    }

    #[test]
    fn in_app_has_title_body_image_and_button() {
        let out = in_app(&for_ann(&card())).expect("renders");
        assert_eq!(
            out,
            json!({
                "title": "Hi Ann",
                "body": "Your <cart> & more",
                "image": {"url": "https://cdn.example/t.png", "alt": "Cart"},
                "button": {"label": "Complete your order", "url": "https://shop.example/cart?a=1&b=2"},
            })
        );
        let mut item = card();
        item.channels.in_app = InAppOverrides { title: Some("In-app title".into()), body: None };
        item.cta = None;
        let out = in_app(&for_ann(&item)).expect("renders");
        assert_eq!(out["title"], "In-app title");
        assert!(out.get("button").is_none());
    }
}
