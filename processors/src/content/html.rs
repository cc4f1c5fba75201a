//! The HTML channels: a web fragment and a full email (HTML part plus plain-text part).
//!
//! This is the only place markup is written, and every rendered value goes through
//! [`escape`] on its way in — text and attribute values alike — because the values
//! come from templates over customer data: a customer named `<script>` must arrive as
//! text, not as a script. Links were already checked to be http(s), mailto, tel or
//! relative when they were rendered.
//!
//! The email is table-based with inline styles, because that is what mail clients
//! (Outlook above all) lay out reliably; `<style>` blocks and flexbox are not.

use super::templates::{PersonalisedItem, RenderedImage, RenderedLink};
use super::ContentError;
use serde_json::{json, Value};

/// `text` safe inside HTML text and double- or single-quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

/// Blank-line separated paragraphs as `<p>`, single newlines within one as `<br>`.
fn paragraphs(text: &str, style: &str) -> String {
    let mut html = String::new();
    let mut paragraph: Vec<&str> = Vec::new();
    let flush = |lines: &mut Vec<&str>, html: &mut String| {
        if !lines.is_empty() {
            let body = lines.iter().map(|line| escape(line.trim())).collect::<Vec<_>>().join("<br>");
            html.push_str(&format!("<p{style}>{body}</p>\n"));
            lines.clear();
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut paragraph, &mut html);
        } else {
            paragraph.push(line);
        }
    }
    flush(&mut paragraph, &mut html);
    html
}

fn img(image: &RenderedImage, attributes: &str) -> String {
    format!("<img src=\"{}\" alt=\"{}\"{attributes}>", escape(&image.url), escape(&image.alt))
}

fn link(cta: &RenderedLink, attributes: &str) -> String {
    format!("<a href=\"{}\"{attributes}>{}</a>", escape(&cta.url), escape(cta.text()))
}

/// The description a page or an email shows: the long one, else the short one.
fn full_description(item: &PersonalisedItem) -> Result<String, ContentError> {
    let description = &item.item.description;
    item.first_filled(&[
        ("description.long", description.long.as_ref()),
        ("description.short", description.short.as_ref()),
    ])
}

/// `{"html"}`: an `<article>` with the title, primary image, description, gallery and
/// call to action; classes, not styles, so the page's stylesheet decides the look.
pub(crate) fn web(item: &PersonalisedItem) -> Result<Value, ContentError> {
    let mut html = format!("<article class=\"chorus-content\" data-content-id=\"{}\">\n", escape(item.id()));
    let title = item.title()?;
    if !title.is_empty() {
        html.push_str(&format!("<h2 class=\"chorus-title\">{}</h2>\n", escape(&title)));
    }
    if let Some(image) = item.hero_image()? {
        html.push_str(&img(&image, " class=\"chorus-image\""));
        html.push('\n');
    }
    html.push_str(&paragraphs(&full_description(item)?, ""));
    let gallery = item.gallery()?;
    if !gallery.is_empty() {
        html.push_str("<ul class=\"chorus-gallery\">\n");
        for image in &gallery {
            html.push_str(&format!("<li>{}</li>\n", img(image, "")));
        }
        html.push_str("</ul>\n");
    }
    if let Some(cta) = item.cta()? {
        html.push_str(&format!("<p>{}</p>\n", link(&cta, " class=\"chorus-cta\"")));
    }
    html.push_str("</article>");
    Ok(json!({ "html": html }))
}

/// A centred 600px white column on a grey page, built from tables.
const EMAIL_LAYOUT_OPEN: &str = concat!(
    "<table role=\"presentation\" width=\"100%\" cellpadding=\"0\" cellspacing=\"0\" border=\"0\">",
    "<tr><td align=\"center\" style=\"padding:24px 12px;\">\n",
    "<table role=\"presentation\" width=\"600\" cellpadding=\"0\" cellspacing=\"0\" border=\"0\" ",
    "style=\"width:100%;max-width:600px;background-color:#ffffff;",
    "font-family:Arial,Helvetica,sans-serif;color:#1f2933;\">\n",
);
const EMAIL_LAYOUT_CLOSE: &str = "</table>\n</td></tr></table>\n";
const EMAIL_IMAGE: &str = " width=\"600\" style=\"display:block;width:100%;height:auto;border:0;\"";
const EMAIL_HEADING: &str = " style=\"margin:0 0 16px;font-size:24px;line-height:32px;\"";
const EMAIL_PARAGRAPH: &str = " style=\"margin:0 0 16px;font-size:16px;line-height:24px;\"";
const EMAIL_BUTTON: &str = concat!(
    " style=\"display:inline-block;padding:12px 24px;background-color:#1f6feb;color:#ffffff;",
    "text-decoration:none;border-radius:4px;font-weight:bold;\"",
);

/// `{"subject", "html", "text"}`: the subject (the `channels.email.subject` override,
/// else the title), a complete HTML document, and a plain-text part for clients that
/// do not show HTML, with the call to action spelled out as `label: url`.
pub(crate) fn email(item: &PersonalisedItem) -> Result<Value, ContentError> {
    let title = item.title()?;
    let subject = item.first_filled(&[
        ("channels.email.subject", item.item.channels.email.subject.as_ref()),
        ("title", item.item.title.as_ref()),
    ])?;
    let description = full_description(item)?;
    // The inbox preview line; hidden in the body itself.
    let preheader = item.field("description.short", item.item.description.short.as_deref())?;
    let image = item.hero_image()?;
    let cta = item.cta()?;

    let mut html = String::from("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n");
    html.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    html.push_str(&format!("<title>{}</title>\n</head>\n", escape(&subject)));
    html.push_str("<body style=\"margin:0;padding:0;background-color:#f4f5f7;\">\n");
    if !preheader.is_empty() {
        html.push_str(&format!(
            "<div style=\"display:none;max-height:0;overflow:hidden;\">{}</div>\n",
            escape(&preheader)
        ));
    }
    html.push_str(EMAIL_LAYOUT_OPEN);
    if let Some(image) = &image {
        html.push_str(&format!("<tr><td>{}</td></tr>\n", img(image, EMAIL_IMAGE)));
    }
    html.push_str("<tr><td style=\"padding:32px;\">\n");
    if !title.is_empty() {
        html.push_str(&format!("<h1{EMAIL_HEADING}>{}</h1>\n", escape(&title)));
    }
    html.push_str(&paragraphs(&description, EMAIL_PARAGRAPH));
    if let Some(cta) = &cta {
        html.push_str(&format!("<p style=\"margin:24px 0 0;\">{}</p>\n", link(cta, EMAIL_BUTTON)));
    }
    html.push_str("</td></tr>\n");
    html.push_str(EMAIL_LAYOUT_CLOSE);
    html.push_str("</body>\n</html>\n");

    let call_to_action =
        cta.map(|cta| if cta.label.is_empty() { cta.url } else { format!("{}: {}", cta.label, cta.url) });
    let text = [Some(title), Some(description), call_to_action]
        .into_iter()
        .flatten()
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("\n\n");
    Ok(json!({ "subject": subject, "html": html, "text": text }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{CallToAction, ContentItem, Description, EmailOverrides, Image, Images};

    fn card() -> ContentItem {
        ContentItem {
            id: "card".into(),
            title: Some("Hello {{ customer.first_name }}".into()),
            description: Description {
                short: Some("Short & sweet".into()),
                long: Some("First paragraph,\nsecond line.\n\nSecond paragraph.".into()),
                chat: None,
            },
            images: Images {
                primary: Some(Image { url: "https://cdn.example/p.png?a=1&b=2".into(), alt: "A \"big\" cart".into() }),
                thumbnail: None,
                gallery: vec![Image { url: "https://cdn.example/g1.png".into(), alt: "one".into() }],
            },
            cta: Some(CallToAction {
                label: "Complete your order".into(),
                url: "https://shop.example/cart?c={{ customer.canonical_id }}&x=1".into(),
            }),
            ..ContentItem::default()
        }
    }

    fn render_with(
        channel: fn(&PersonalisedItem) -> Result<Value, ContentError>,
        item: &ContentItem,
        customer: Value,
    ) -> Value {
        channel(&PersonalisedItem::new(item, &customer, &json!({}))).expect("renders")
    }

    fn ann() -> Value {
        json!({"first_name": "Ann", "canonical_id": "c-42"})
    }

    #[test]
    fn escape_covers_text_and_attribute_metacharacters() {
        assert_eq!(
            escape(r#"<a href="x" title='y'>&amp;</a>"#),
            "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
        );
        assert_eq!(escape("plain € text"), "plain € text");
    }

    #[test]
    fn the_web_fragment_has_title_image_description_gallery_and_link() {
        let html = render_with(web, &card(), ann())["html"].as_str().expect("html").to_owned();
        let expected = "<article class=\"chorus-content\" data-content-id=\"card\">\n\
            <h2 class=\"chorus-title\">Hello Ann</h2>\n\
            <img src=\"https://cdn.example/p.png?a=1&amp;b=2\" alt=\"A &quot;big&quot; cart\" class=\"chorus-image\">\n\
            <p>First paragraph,<br>second line.</p>\n\
            <p>Second paragraph.</p>\n\
            <ul class=\"chorus-gallery\">\n\
            <li><img src=\"https://cdn.example/g1.png\" alt=\"one\"></li>\n\
            </ul>\n\
            <p><a href=\"https://shop.example/cart?c=c-42&amp;x=1\" class=\"chorus-cta\">Complete your order</a></p>\n\
            </article>";
        assert_eq!(html, expected);
    }

    #[test]
    fn the_web_fragment_falls_back_to_the_short_description_and_omits_what_is_missing() {
        let bare = ContentItem {
            id: "bare".into(),
            description: Description { short: Some("Only short".into()), ..Description::default() },
            ..ContentItem::default()
        };
        let html = render_with(web, &bare, json!({}))["html"].as_str().expect("html").to_owned();
        assert_eq!(html, "<article class=\"chorus-content\" data-content-id=\"bare\">\n<p>Only short</p>\n</article>");
    }

    #[test]
    fn customer_markup_cannot_escape_into_html() {
        let mut item = card();
        item.images.primary = Some(Image { url: "/p.png".into(), alt: "{{ customer.first_name }}".into() });
        let mallory =
            json!({"first_name": "<script>alert('x')</script>\" onerror=\"alert(1)", "canonical_id": "\"><b>"});
        for out in [render_with(web, &item, mallory.clone()), render_with(email, &item, mallory)] {
            let html = out["html"].as_str().expect("html");
            assert!(!html.contains("<script"), "{html}");
            assert!(!html.contains("\" onerror"), "{html}");
            assert!(!html.contains("<b>"), "{html}");
            assert!(
                html.contains("Hello &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot; onerror=&quot;alert(1)"),
                "{html}"
            );
        }
    }

    #[test]
    fn the_email_has_subject_html_document_and_plain_text() {
        let out = render_with(email, &card(), ann());
        assert_eq!(out["subject"], "Hello Ann");
        let html = out["html"].as_str().expect("html");
        assert!(html.starts_with("<!DOCTYPE html>\n<html>"), "{html}");
        assert!(html.contains("<title>Hello Ann</title>"));
        assert!(html.contains("overflow:hidden;\">Short &amp; sweet</div>"), "the preheader: {html}");
        assert!(html.contains(">Hello Ann</h1>"));
        assert!(html.contains("alt=\"A &quot;big&quot; cart\""));
        assert!(html.contains("<a href=\"https://shop.example/cart?c=c-42&amp;x=1\""));
        assert!(html.ends_with("</html>\n"));
        assert_eq!(
            out["text"],
            "Hello Ann\n\nFirst paragraph,\nsecond line.\n\nSecond paragraph.\n\nComplete your order: https://shop.example/cart?c=c-42&x=1"
        );
    }

    #[test]
    fn the_plain_text_part_has_no_markup_and_no_entities() {
        let text = render_with(email, &card(), ann())["text"].as_str().expect("text").to_owned();
        assert!(!text.contains('<') && !text.contains('>') && !text.contains("&amp;"), "{text}");
    }

    #[test]
    fn the_subject_override_wins_and_a_bare_link_is_spelled_once() {
        let mut item = card();
        item.channels.email = EmailOverrides { subject: Some("{{ customer.first_name }}, still there?".into()) };
        item.cta = Some(CallToAction { label: String::new(), url: "https://shop.example".into() });
        let out = render_with(email, &item, ann());
        assert_eq!(out["subject"], "Ann, still there?");
        let html = out["html"].as_str().expect("html");
        assert!(html.contains("<title>Ann, still there?</title>"), "{html}");
        assert!(html.contains(&format!("<h1{EMAIL_HEADING}>Hello Ann</h1>")), "the heading stays the title: {html}");
        assert!(html.contains(">https://shop.example</a>"), "{html}");
        assert!(out["text"].as_str().expect("text").ends_with("\n\nhttps://shop.example"), "{}", out["text"]);
    }
}
