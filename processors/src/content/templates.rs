//! An item's Jinja fields rendered for one recipient, as plain text.
//!
//! Templates never escape: where the text lands decides the escaping (HTML for web and
//! email, nothing for SMS, push and chat JSON), and only the channel renderer knows
//! that, so `html` escapes the finished text. A template that escaped for itself would
//! show `&amp;` in every SMS.
//!
//! Items come from a Kafka topic, so templates are treated as untrusted and lenient:
//! undefined variables and attributes of them render as nothing (a customer without a
//! `first_name` still gets the message), a JSON null counts as missing (so
//! `default('Hi')` applies to `"first_name": null`), and each field has a fuel budget and
//! an output cap so a runaway loop fails that one render instead of stalling a
//! partition. Fields are rendered on demand, so a broken email subject does not stop
//! the SMS.

use super::item::{ContentItem, Image};
use super::ContentError;
use minijinja::value::Value as Jinja;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// Instructions one field may execute: generous for any real template (a few dozen),
/// small enough that nested loops over `range(..)` stop within milliseconds.
const FUEL_PER_FIELD: u64 = 50_000;

/// Bytes one field may render to; far beyond any email body, far below what a
/// `{{ 'x' * 100000000 }}` would allocate on every send.
const MAX_FIELD_BYTES: usize = 256 * 1024;

/// Where the formatter keeps the bytes written so far in the current render.
const WRITTEN_TEMP: &str = "chorus.content.written";

fn environment() -> &'static Environment<'static> {
    static ENVIRONMENT: OnceLock<Environment<'static>> = OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_fuel(Some(FUEL_PER_FIELD));
        env.set_formatter(write_plain);
        env
    })
}

/// Writes a value unescaped, `none` as nothing, and refuses to write past
/// [`MAX_FIELD_BYTES`].
fn write_plain(out: &mut Output, state: &State, value: &Jinja) -> Result<(), Error> {
    if value.is_none() || value.is_undefined() {
        return Ok(());
    }
    let text = value.to_string();
    let written = state.get_temp(WRITTEN_TEMP).and_then(|v| v.as_usize()).unwrap_or(0) + text.len();
    if written > MAX_FIELD_BYTES {
        return Err(too_long());
    }
    state.set_temp(WRITTEN_TEMP, Jinja::from(written));
    out.write_str(&text).map_err(Error::from)
}

fn too_long() -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("output is longer than {MAX_FIELD_BYTES} bytes"))
}

/// Whether `source` compiles; the message says what is wrong and on which line.
pub(crate) fn check(source: &str) -> Result<(), String> {
    environment().template_from_str(source).map(|_| ()).map_err(|e| describe(&e))
}

fn describe(error: &Error) -> String {
    let mut message = error.kind().to_string();
    if let Some(detail) = error.detail() {
        message.push_str(": ");
        message.push_str(detail);
    }
    if let Some(line) = error.line() {
        message.push_str(&format!(" (line {line})"));
    }
    message
}

/// JSON nulls removed from objects, so a null field is undefined like a missing one.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// A variable for templates: a null (no profile, no variables) is an empty object so
/// `customer.first_name` is undefined rather than an attribute of `none`.
fn variable(value: &Value) -> Jinja {
    match value {
        Value::Null => Jinja::from_serialize(serde_json::Map::new()),
        other => Jinja::from_serialize(without_nulls(other)),
    }
}

/// A rendered image; only produced when its URL rendered non-empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RenderedImage {
    pub url: String,
    pub alt: String,
}

/// A rendered call to action; only produced when its URL rendered non-empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RenderedLink {
    pub label: String,
    pub url: String,
}

impl RenderedLink {
    /// What to show: the label, or the URL itself when there is none.
    pub(crate) fn text(&self) -> &str {
        if self.label.is_empty() {
            &self.url
        } else {
            &self.label
        }
    }
}

/// An item and one recipient's variables; each field is rendered when a channel asks
/// for it, trimmed, and empty when absent.
pub(crate) struct PersonalisedItem<'a> {
    pub(crate) item: &'a ContentItem,
    variables: Jinja,
}

impl<'a> PersonalisedItem<'a> {
    pub(crate) fn new(item: &'a ContentItem, customer: &Value, vars: &Value) -> PersonalisedItem<'a> {
        let variables: BTreeMap<&str, Jinja> =
            [("customer", variable(customer)), ("vars", variable(vars)), ("item", variable(&item.attributes))].into();
        PersonalisedItem { item, variables: Jinja::from_serialize(variables) }
    }

    pub(crate) fn id(&self) -> &str {
        &self.item.id
    }

    /// The field at `path` rendered; empty when the item has no such field.
    pub(crate) fn field(&self, path: &str, source: Option<&str>) -> Result<String, ContentError> {
        let Some(source) = source else { return Ok(String::new()) };
        let failed = |message: String| ContentError::RenderFailed {
            item: self.item.id.clone(),
            field: path.to_owned(),
            message,
        };
        let template = environment().template_from_str(source).map_err(|e| failed(describe(&e)))?;
        let rendered = template.render(&self.variables).map_err(|e| failed(describe(&e)))?;
        // Literal text inside a loop is written without passing the formatter.
        if rendered.len() > MAX_FIELD_BYTES {
            return Err(failed(describe(&too_long())));
        }
        Ok(rendered.trim().to_owned())
    }

    /// The first of `candidates` (path, template) that renders non-empty; empty when
    /// none does. Later candidates are not rendered once one has text.
    pub(crate) fn first_filled(&self, candidates: &[(&str, Option<&String>)]) -> Result<String, ContentError> {
        for (path, source) in candidates {
            let text = self.field(path, source.map(String::as_str))?;
            if !text.is_empty() {
                return Ok(text);
            }
        }
        Ok(String::new())
    }

    pub(crate) fn title(&self) -> Result<String, ContentError> {
        self.field("title", self.item.title.as_deref())
    }

    /// The image a single-image channel shows: the primary image, else the thumbnail.
    pub(crate) fn hero_image(&self) -> Result<Option<RenderedImage>, ContentError> {
        let images = &self.item.images;
        if let Some(primary) = images.primary.as_ref().map(|i| self.image("images.primary", i)).transpose()?.flatten() {
            return Ok(Some(primary));
        }
        Ok(images.thumbnail.as_ref().map(|i| self.image("images.thumbnail", i)).transpose()?.flatten())
    }

    pub(crate) fn gallery(&self) -> Result<Vec<RenderedImage>, ContentError> {
        let mut rendered = Vec::new();
        for (i, image) in self.item.images.gallery.iter().enumerate() {
            rendered.extend(self.image(&format!("images.gallery[{i}]"), image)?);
        }
        Ok(rendered)
    }

    pub(crate) fn cta(&self) -> Result<Option<RenderedLink>, ContentError> {
        let Some(cta) = &self.item.cta else { return Ok(None) };
        let url = self.url("cta.url", &cta.url)?;
        if url.is_empty() {
            return Ok(None);
        }
        Ok(Some(RenderedLink { label: self.field("cta.label", Some(&cta.label))?, url }))
    }

    fn image(&self, path: &str, image: &Image) -> Result<Option<RenderedImage>, ContentError> {
        let url = self.url(&format!("{path}.url"), &image.url)?;
        if url.is_empty() {
            return Ok(None);
        }
        Ok(Some(RenderedImage { url, alt: self.field(&format!("{path}.alt"), Some(&image.alt))? }))
    }

    /// A URL field, refused unless it is a link a recipient's client may follow.
    fn url(&self, path: &str, source: &str) -> Result<String, ContentError> {
        let url = self.field(path, Some(source))?;
        if is_followable_url(&url) {
            Ok(url)
        } else {
            Err(ContentError::UnsafeUrl { item: self.item.id.clone(), field: path.to_owned(), url })
        }
    }
}

/// http(s), mailto, tel, or relative (no scheme). Any control character is refused
/// outright: browsers drop tabs and newlines inside URLs, so `java\tscript:` would
/// otherwise pass as a relative link and run as `javascript:`.
fn is_followable_url(url: &str) -> bool {
    if url.chars().any(char::is_control) {
        return false;
    }
    match url.find([':', '/', '?', '#']) {
        Some(end) if url[end..].starts_with(':') => {
            matches!(url[..end].to_ascii_lowercase().as_str(), "http" | "https" | "mailto" | "tel")
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::item::CallToAction;
    use serde_json::json;

    fn item_titled(title: &str) -> ContentItem {
        ContentItem { id: "t".into(), title: Some(title.into()), ..ContentItem::default() }
    }

    fn title_for(title: &str, customer: Value, vars: Value) -> Result<String, ContentError> {
        PersonalisedItem::new(&item_titled(title), &customer, &vars).title()
    }

    #[test]
    fn customer_vars_and_item_attributes_are_rendered() {
        let mut item = item_titled(
            "{{ customer.first_name }} / {{ vars.discount }} / {{ item.sku }} / {{ customer.location.city }}",
        );
        item.attributes = json!({"sku": "W-1"});
        let customer = json!({"first_name": "Ann", "location": {"city": "Brisbane"}});
        let title = PersonalisedItem::new(&item, &customer, &json!({"discount": "15%"})).title();
        assert_eq!(title.as_deref(), Ok("Ann / 15% / W-1 / Brisbane"));
    }

    #[test]
    fn undefined_variables_render_as_nothing() {
        let source =
            "[{{ customer.first_name }}|{{ customer.address.city.zip }}|{{ vars.discount }}|{{ nope }}|{{ item.x }}]";
        assert_eq!(title_for(source, json!({}), json!({})).as_deref(), Ok("[||||]"));
        assert_eq!(title_for(source, Value::Null, Value::Null).as_deref(), Ok("[||||]"));
        let filtered =
            "{{ vars.code | upper }}{% for tag in item.tags %}{{ tag }}{% endfor %}{% if vars.vip %}VIP{% endif %}";
        assert_eq!(title_for(filtered, json!({}), json!({})).as_deref(), Ok(""));
    }

    #[test]
    fn null_counts_as_missing_so_default_applies() {
        let source = "{{ customer.first_name | default('Hi') }}, {{ customer.last_name }}.";
        let customer = json!({"first_name": null, "last_name": null});
        assert_eq!(title_for(source, customer, json!({})).as_deref(), Ok("Hi, ."));
        assert_eq!(title_for("{{ vars.discount }}", json!({}), json!({"discount": null})).as_deref(), Ok(""));
    }

    #[test]
    fn text_is_not_escaped_and_is_trimmed() {
        let customer = json!({"first_name": "<b>Tom & \"Jerry\"</b>"});
        assert_eq!(
            title_for("  {{ customer.first_name }}\n", customer, json!({})).as_deref(),
            Ok("<b>Tom & \"Jerry\"</b>")
        );
    }

    #[test]
    fn a_render_time_failure_names_the_field() {
        let item = ContentItem {
            id: "broken".into(),
            cta: Some(CallToAction { label: "{{ vars.count + 'x' }}".into(), url: "https://ok.example".into() }),
            ..ContentItem::default()
        };
        let err = PersonalisedItem::new(&item, &json!({}), &json!({"count": 2})).cta().expect_err("fails");
        let ContentError::RenderFailed { item, field, message } = err else { panic!("{err:?}") };
        assert_eq!((item.as_str(), field.as_str()), ("broken", "cta.label"));
        assert!(message.contains("invalid operation"), "{message}");
    }

    #[test]
    fn a_runaway_loop_runs_out_of_fuel() {
        let source = "{% for a in range(10000) %}{% for b in range(10000) %}x{% endfor %}{% endfor %}";
        let err = title_for(source, json!({}), json!({})).expect_err("stops");
        assert!(matches!(&err, ContentError::RenderFailed { message, .. } if message.contains("fuel")), "{err:?}");
    }

    #[test]
    fn huge_output_is_refused() {
        for source in ["{{ 'x' * 1000000 }}", "{% for i in range(3000) %}{{ 'y' * 100 }}{% endfor %}"] {
            let err = title_for(source, json!({}), json!({})).expect_err("refused");
            assert!(
                matches!(&err, ContentError::RenderFailed { message, .. } if message.contains("longer than")),
                "{err:?}"
            );
        }
        let literal = format!("{{% for i in range(300) %}}{}{{% endfor %}}", "z".repeat(1000));
        assert!(title_for(&literal, json!({}), json!({})).is_err());
    }

    #[test]
    fn only_followable_urls_are_rendered() {
        for ok in [
            "https://shop.example/cart?c=1",
            "HTTP://x.example",
            "mailto:help@shop.example",
            "tel:+15550100",
            "/cart",
            "cart?x=a:b",
            "#top",
            "//cdn.example/a.png",
        ] {
            assert!(is_followable_url(ok), "{ok}");
        }
        for bad in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "java\tscript:alert(1)",
            "data:text/html,<script>",
            "vbscript:x",
            "file:///etc/passwd",
        ] {
            assert!(!is_followable_url(bad), "{bad}");
        }
        let item = ContentItem {
            id: "x".into(),
            cta: Some(CallToAction { label: "Go".into(), url: "{{ vars.next }}".into() }),
            ..ContentItem::default()
        };
        let err = PersonalisedItem::new(&item, &json!({}), &json!({"next": "javascript:alert(1)"})).cta();
        assert!(matches!(&err, Err(ContentError::UnsafeUrl { field, .. }) if field == "cta.url"), "{err:?}");
    }

    #[test]
    fn an_empty_url_drops_the_link_or_image() {
        let item = ContentItem {
            id: "x".into(),
            cta: Some(CallToAction { label: "Go".into(), url: "{{ vars.next }}".into() }),
            images: crate::content::Images {
                primary: Some(Image { url: "{{ vars.image }}".into(), alt: "gone".into() }),
                thumbnail: Some(Image { url: "thumb.png".into(), alt: "small".into() }),
                gallery: vec![Image { url: "".into(), alt: "".into() }, Image { url: "g.png".into(), alt: "".into() }],
            },
            ..ContentItem::default()
        };
        let personalised = PersonalisedItem::new(&item, &json!({}), &json!({}));
        assert_eq!(personalised.cta(), Ok(None));
        let thumbnail = RenderedImage { url: "thumb.png".into(), alt: "small".into() };
        assert_eq!(personalised.hero_image(), Ok(Some(thumbnail)));
        assert_eq!(personalised.gallery().map(|g| g.len()), Ok(1));
    }

    #[test]
    fn first_filled_skips_fields_that_render_empty() {
        let item = ContentItem { id: "x".into(), ..ContentItem::default() };
        let personalised = PersonalisedItem::new(&item, &json!({}), &json!({}));
        let (empty, short) = (Some("{{ vars.none }}".to_owned()), Some("short".to_owned()));
        let text = personalised.first_filled(&[("a", None), ("b", empty.as_ref()), ("c", short.as_ref())]);
        assert_eq!(text.as_deref(), Ok("short"));
        assert_eq!(personalised.first_filled(&[("a", None)]).as_deref(), Ok(""));
    }
}
