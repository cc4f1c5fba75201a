//! SMS: GSM-7 / UCS-2 detection and segment splitting (3GPP TS 23.038, TS 23.040).
//!
//! A text made only of GSM 03.38 characters travels as 7-bit septets: 160 in a single
//! message, 153 per part once it is split (the user-data header of a concatenated SMS
//! takes the rest). The extension-table characters (`€ [ ] { } ^ ~ \ |` and form feed)
//! are an escape plus a septet, so they count 2 and must never straddle two parts. Any
//! other character switches the whole message to UCS-2: 70 UTF-16 code units single,
//! 67 per part, and a surrogate pair (emoji) is never split.
//!
//! Parts are filled greedily character by character, not word by word: the handset
//! reassembles them into one text, so a word split across parts reads whole.
//! A text needing more than `max_segments` parts is truncated at a word boundary with
//! an ellipsis that keeps the encoding: "..." in GSM-7, because "…" is not in the
//! GSM alphabet and would switch the message to UCS-2, more than doubling its cost.

use super::config::SmsLimits;
use super::templates::PersonalisedItem;
use super::text::cut_at_word;
use super::ContentError;
use serde::Serialize;
use serde_json::{json, Value};

/// The GSM 03.38 default alphabet, indexed by septet value (unicode.org GSM0338
/// mapping). 0x1B is the escape to the extension table, not a character, and is never
/// matched.
const GSM7_BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', //
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1B}', 'Æ', 'æ', 'ß', 'É', //
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', //
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?', //
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', //
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§', //
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', //
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à', //
];
const GSM7_ESCAPE: usize = 0x1B;

/// The GSM 03.38 extension table as (septet after the escape, character).
const GSM7_EXTENSION: [(u8, char); 10] = [
    (0x0A, '\u{0C}'),
    (0x14, '^'),
    (0x28, '{'),
    (0x29, '}'),
    (0x2F, '\\'),
    (0x3C, '['),
    (0x3D, '~'),
    (0x3E, ']'),
    (0x40, '|'),
    (0x65, '€'),
];

/// Septets `c` takes in GSM-7: 1 in the default alphabet, 2 (escape + septet) in the
/// extension table, `None` when GSM-7 cannot carry it.
fn gsm7_septets(c: char) -> Option<usize> {
    if GSM7_BASIC.iter().enumerate().any(|(septet, &basic)| basic == c && septet != GSM7_ESCAPE) {
        Some(1)
    } else if GSM7_EXTENSION.iter().any(|&(_, extended)| extended == c) {
        Some(2)
    } else {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SmsEncoding {
    #[serde(rename = "GSM-7")]
    Gsm7,
    #[serde(rename = "UCS-2")]
    Ucs2,
}

impl SmsEncoding {
    /// The cheapest encoding that carries every character of `text`.
    pub fn of(text: &str) -> SmsEncoding {
        if text.chars().all(|c| gsm7_septets(c).is_some()) {
            SmsEncoding::Gsm7
        } else {
            SmsEncoding::Ucs2
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SmsEncoding::Gsm7 => "GSM-7",
            SmsEncoding::Ucs2 => "UCS-2",
        }
    }

    /// Units (septets or UTF-16 code units) of a single-part message.
    pub fn single_capacity(self) -> usize {
        match self {
            SmsEncoding::Gsm7 => 160,
            SmsEncoding::Ucs2 => 70,
        }
    }

    /// Units per part of a concatenated message.
    pub fn part_capacity(self) -> usize {
        match self {
            SmsEncoding::Gsm7 => 153,
            SmsEncoding::Ucs2 => 67,
        }
    }

    /// Units `c` takes; only called on text this encoding was chosen for.
    fn units(self, c: char) -> usize {
        match self {
            SmsEncoding::Gsm7 => gsm7_septets(c).unwrap_or(1),
            SmsEncoding::Ucs2 => c.len_utf16(),
        }
    }

    fn ellipsis(self) -> &'static str {
        match self {
            SmsEncoding::Gsm7 => "...",
            SmsEncoding::Ucs2 => "…",
        }
    }
}

/// A text laid out as SMS parts; the parts concatenated are `text`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SmsMessage {
    pub text: String,
    pub encoding: SmsEncoding,
    pub segments: Vec<String>,
    /// Characters (Unicode scalar values) of `text`, as a person would count them.
    pub characters: usize,
}

impl SmsMessage {
    /// `text` in at most `max_segments` parts (at least one), truncated at a word
    /// boundary with an ellipsis when it needs more.
    pub fn new(text: &str, max_segments: usize) -> SmsMessage {
        SmsMessage::keeping_suffix(text, "", max_segments)
    }

    /// `body` + `suffix` in at most `max_segments` parts, truncating the body rather
    /// than the suffix: a link cut in half is worse than no link, and worse than a
    /// shorter description. Only when the suffix alone does not fit is the whole text
    /// truncated.
    fn keeping_suffix(body: &str, suffix: &str, max_segments: usize) -> SmsMessage {
        let max_segments = max_segments.max(1);
        let full = format!("{body}{suffix}");
        let encoding = SmsEncoding::of(&full);
        let text = if segments(&full, encoding).len() <= max_segments {
            full
        } else {
            truncated(body, suffix, encoding, max_segments)
                .or_else(|| truncated(&full, "", encoding, max_segments))
                .unwrap_or_default()
        };
        let segments = segments(&text, encoding);
        SmsMessage { characters: text.chars().count(), text, encoding, segments }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "text": self.text,
            "encoding": self.encoding.as_str(),
            "segments": self.segments,
            "characters": self.characters,
        })
    }
}

/// `text` split into parts: one part when it fits a single message, else greedy parts
/// of [`SmsEncoding::part_capacity`]. No parts for an empty text.
fn segments(text: &str, encoding: SmsEncoding) -> Vec<String> {
    if text.is_empty() {
        return Vec::new();
    }
    let units: usize = text.chars().map(|c| encoding.units(c)).sum();
    if units <= encoding.single_capacity() {
        return vec![text.to_owned()];
    }
    let capacity = encoding.part_capacity();
    let mut parts = Vec::new();
    let (mut part, mut used) = (String::new(), 0);
    for c in text.chars() {
        let needed = encoding.units(c);
        // An escape + septet or a surrogate pair that does not fit moves whole to the
        // next part; the unit left over stays unused.
        if used + needed > capacity {
            parts.push(std::mem::take(&mut part));
            used = 0;
        }
        part.push(c);
        used += needed;
    }
    parts.push(part);
    parts
}

/// The longest word-boundary prefix of `body`, then the ellipsis, then `suffix`, that
/// fits `max_segments`; `None` when not even the ellipsis and suffix do.
fn truncated(body: &str, suffix: &str, encoding: SmsEncoding, max_segments: usize) -> Option<String> {
    let ellipsis = encoding.ellipsis();
    let fits = |end: usize| segments(&format!("{}{ellipsis}{suffix}", &body[..end]), encoding).len() <= max_segments;
    let ends: Vec<usize> = body.char_indices().map(|(i, _)| i).chain([body.len()]).collect();
    // Whether a prefix fits only gets worse as it grows, so the fitting ones come first.
    let fitting = ends.partition_point(|&end| fits(end));
    let end = *ends.get(fitting.checked_sub(1)?)?;
    Some(format!("{}{ellipsis}{suffix}", cut_at_word(body, end)))
}

/// The SMS of an item: the `channels.sms.text` override, else the title and short
/// (else long) description on their own lines followed by the CTA URL, which is kept
/// whole when the text has to be shortened.
pub(crate) fn render(item: &PersonalisedItem, limits: &SmsLimits) -> Result<Value, ContentError> {
    let overrides = &item.item.channels.sms;
    let message = match item.field("channels.sms.text", overrides.text.as_deref())? {
        text if !text.is_empty() => SmsMessage::new(&text, limits.max_segments),
        _ => {
            let description = &item.item.description;
            let summary = item.first_filled(&[
                ("description.short", description.short.as_ref()),
                ("description.long", description.long.as_ref()),
            ])?;
            let body = [item.title()?, summary].into_iter().filter(|t| !t.is_empty()).collect::<Vec<_>>().join("\n");
            let suffix = match (item.cta()?, body.is_empty()) {
                (Some(cta), true) => cta.url,
                (Some(cta), false) => format!("\n{}", cta.url),
                (None, _) => String::new(),
            };
            SmsMessage::keeping_suffix(&body, &suffix, limits.max_segments)
        }
    };
    if message.text.is_empty() {
        return Err(ContentError::EmptyMessage { item: item.id().to_owned(), channel: "sms".into() });
    }
    Ok(message.to_json())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{CallToAction, ContentItem, Description, SmsOverrides};
    use proptest::prelude::*;
    use serde_json::json;

    fn units(text: &str, encoding: SmsEncoding) -> usize {
        text.chars().map(|c| encoding.units(c)).sum()
    }

    fn part_units(message: &SmsMessage) -> Vec<usize> {
        message.segments.iter().map(|s| units(s, message.encoding)).collect()
    }

    #[test]
    fn the_tables_are_the_gsm_03_38_alphabet() {
        let mut basic: Vec<char> = GSM7_BASIC.to_vec();
        basic.sort_unstable();
        basic.dedup();
        assert_eq!(basic.len(), 128, "no character twice");
        assert_eq!(GSM7_BASIC[0x00], '@');
        assert_eq!(GSM7_BASIC[0x11], '_');
        assert_eq!(GSM7_BASIC[0x24], '¤');
        assert_eq!(GSM7_BASIC[0x40], '¡');
        assert_eq!(GSM7_BASIC[0x7F], 'à');
        assert_eq!(gsm7_septets('\u{1B}'), None, "the escape is not a character");
        for c in ['€', '[', ']', '{', '}', '^', '~', '\\', '|', '\u{0C}'] {
            assert_eq!(gsm7_septets(c), Some(2), "{c:?}");
        }
        for c in ['@', '£', 'Δ', 'ß', 'É', 'Ç', '\n', 'ñ', 'à', '§'] {
            assert_eq!(gsm7_septets(c), Some(1), "{c:?}");
        }
        for c in ['`', 'ç', 'á', 'ê', '…', '’', '“', '😀', '中', '\t'] {
            assert_eq!(gsm7_septets(c), None, "{c:?}");
        }
    }

    #[test]
    fn encoding_is_gsm7_unless_a_character_needs_ucs2() {
        assert_eq!(SmsEncoding::of("Hi Ann, 10% off: €5 [today] {only} ^~\\|"), SmsEncoding::Gsm7);
        assert_eq!(SmsEncoding::of("Ça coûte 5€"), SmsEncoding::Ucs2, "û is not GSM-7");
        assert_eq!(SmsEncoding::of("It’s here"), SmsEncoding::Ucs2, "curly apostrophe");
        assert_eq!(SmsEncoding::of("Cart 🛒"), SmsEncoding::Ucs2);
        assert_eq!(SmsEncoding::of("`code`"), SmsEncoding::Ucs2);
    }

    #[test]
    fn exactly_160_septets_is_one_segment_and_161_is_two() {
        let m = SmsMessage::new(&"a".repeat(160), 3);
        assert_eq!((m.encoding, m.segments.len(), m.characters), (SmsEncoding::Gsm7, 1, 160));

        let m = SmsMessage::new(&"a".repeat(161), 3);
        assert_eq!(part_units(&m), [153, 8]);
        assert_eq!(m.segments.concat(), "a".repeat(161));
    }

    #[test]
    fn extension_characters_count_two_septets() {
        let m = SmsMessage::new(&format!("{}€", "a".repeat(158)), 3);
        assert_eq!((m.segments.len(), m.characters), (1, 159), "158 + 2 = 160 septets");
        let m = SmsMessage::new(&format!("{}€", "a".repeat(159)), 3);
        assert_eq!(part_units(&m), [153, 8], "159 + 2 = 161 septets");
    }

    #[test]
    fn an_extension_character_never_straddles_two_segments() {
        let text = format!("{}{{{}", "a".repeat(152), "b".repeat(20));
        let m = SmsMessage::new(&text, 3);
        assert_eq!(m.segments[0], "a".repeat(152), "the escape + '{{' would need septets 153 and 154");
        assert_eq!(m.segments[1], format!("{{{}", "b".repeat(20)));
        assert_eq!(part_units(&m), [152, 22]);
        assert_eq!(m.segments.concat(), text);

        let fits = format!("{}€{}", "a".repeat(151), "b".repeat(20));
        assert_eq!(part_units(&SmsMessage::new(&fits, 3)), [153, 20], "septets 152 and 153");
    }

    #[test]
    fn ucs2_allows_70_units_single_and_67_per_part() {
        let m = SmsMessage::new(&"ж".repeat(70), 3);
        assert_eq!((m.encoding, m.segments.len()), (SmsEncoding::Ucs2, 1));
        let m = SmsMessage::new(&"ж".repeat(71), 3);
        assert_eq!(part_units(&m), [67, 4]);
    }

    #[test]
    fn emoji_count_two_units_and_are_never_split() {
        let m = SmsMessage::new(&"😀".repeat(35), 3);
        assert_eq!((m.segments.len(), m.characters), (1, 35), "35 surrogate pairs = 70 units");
        let m = SmsMessage::new(&"😀".repeat(36), 3);
        assert_eq!(part_units(&m), [66, 6], "a pair never takes unit 67 alone");

        let text = format!("{}😀{}", "a".repeat(66), "b".repeat(10));
        let m = SmsMessage::new(&text, 3);
        assert_eq!(m.segments[0], "a".repeat(66));
        assert!(m.segments[1].starts_with('😀'));
        assert_eq!(m.segments.concat(), text);
    }

    /// `truncated` is a prefix of `original` ending where a word ends, then `ellipsis`.
    fn assert_cut_on_a_word(original: &str, truncated: &str, ellipsis: &str) {
        let kept = truncated.strip_suffix(ellipsis).unwrap_or_else(|| panic!("no {ellipsis:?}: {truncated}"));
        assert!(original.starts_with(kept), "{kept:?}");
        assert!(original[kept.len()..].starts_with([' ', '.']), "cut mid-word: {kept:?}");
    }

    #[test]
    fn a_long_gsm7_text_is_truncated_at_a_word_with_three_dots() {
        let text = "Your cart is waiting for you. ".repeat(30);
        let m = SmsMessage::new(&text, 3);
        assert_eq!(m.encoding, SmsEncoding::Gsm7, "the ellipsis keeps GSM-7");
        assert_eq!(m.segments.len(), 3);
        assert!(m.text.ends_with("..."), "{}", m.text);
        assert_cut_on_a_word(&text, &m.text, "...");
        assert!(part_units(&m).iter().all(|&u| u <= 153));
        assert!(units(&m.text, m.encoding) > 3 * 153 - 10, "nothing much wasted");
    }

    #[test]
    fn a_long_ucs2_text_is_truncated_with_an_ellipsis_character() {
        let text = "Ваша корзина ждёт вас. ".repeat(20);
        let m = SmsMessage::new(&text, 2);
        assert_eq!((m.encoding, m.segments.len()), (SmsEncoding::Ucs2, 2));
        assert_cut_on_a_word(&text, &m.text, "…");
        assert!(part_units(&m).iter().all(|&u| u <= 67));
    }

    #[test]
    fn one_segment_allowed_means_the_single_message_limit() {
        let m = SmsMessage::new(&"word ".repeat(50), 1);
        assert_eq!(m.segments.len(), 1);
        assert_eq!(
            m.text,
            format!("{}...", "word ".repeat(31).trim_end()),
            "31 words (154 septets) and 3 dots; a 32nd word would need 162"
        );
        assert!(units(&m.text, m.encoding) <= 160);
    }

    #[test]
    fn the_empty_text_has_no_segments() {
        assert_eq!(SmsMessage::new("", 3).segments, Vec::<String>::new());
    }

    fn item(title: &str, short: &str, url: Option<&str>) -> ContentItem {
        ContentItem {
            id: "sms".into(),
            title: Some(title.into()),
            description: Description { short: Some(short.into()), ..Description::default() },
            cta: url.map(|u| CallToAction { label: "Go".into(), url: u.into() }),
            ..ContentItem::default()
        }
    }

    fn render_sms(item: &ContentItem, max_segments: usize) -> Value {
        let personalised = PersonalisedItem::new(item, &json!({"first_name": "Ann"}), &json!({}));
        render(&personalised, &SmsLimits { max_segments }).expect("renders")
    }

    #[test]
    fn the_default_text_is_title_description_and_link() {
        let out =
            render_sms(&item("Hi {{ customer.first_name }}", "Your cart is waiting.", Some("https://s.example/c")), 3);
        assert_eq!(
            out,
            json!({
                "text": "Hi Ann\nYour cart is waiting.\nhttps://s.example/c",
                "encoding": "GSM-7",
                "segments": ["Hi Ann\nYour cart is waiting.\nhttps://s.example/c"],
                "characters": 48,
            })
        );
    }

    #[test]
    fn shortening_keeps_the_link_whole() {
        let url = "https://shop.example/cart?c=c-42";
        let out = render_sms(&item("Hi", &"Lots of words here. ".repeat(40), Some(url)), 2);
        let text = out["text"].as_str().expect("text");
        assert!(text.ends_with(&format!("...\n{url}")), "{text}");
        assert_eq!(out["segments"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn the_override_replaces_the_default_text_unescaped() {
        let mut sms = item("Title", "Short", Some("https://s.example"));
        sms.channels.sms = SmsOverrides { text: Some("{{ customer.first_name }} & co: <b>50%</b> off".into()) };
        assert_eq!(render_sms(&sms, 3)["text"], "Ann & co: <b>50%</b> off");
    }

    #[test]
    fn an_item_with_nothing_to_say_is_an_error() {
        let empty =
            ContentItem { id: "empty".into(), title: Some("{{ customer.nope }}".into()), ..ContentItem::default() };
        let personalised = PersonalisedItem::new(&empty, &json!({}), &json!({}));
        let err = render(&personalised, &SmsLimits { max_segments: 3 });
        assert_eq!(err, Err(ContentError::EmptyMessage { item: "empty".into(), channel: "sms".into() }));
    }

    fn sms_text() -> impl Strategy<Value = String> {
        let alphabet =
            prop::sample::select(vec!['a', 'Z', ' ', ' ', '\n', '.', '€', '{', '|', 'é', 'Δ', 'ж', 'ç', '😀', '中']);
        prop::collection::vec(alphabet, 0..700).prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #[test]
        fn segments_always_respect_the_limits(text in sms_text(), max_segments in 1usize..5) {
            let m = SmsMessage::new(&text, max_segments);
            prop_assert_eq!(m.segments.concat(), m.text.clone());
            prop_assert!(m.segments.len() <= max_segments);
            prop_assert_eq!(m.characters, m.text.chars().count());
            prop_assert_eq!(m.encoding, SmsEncoding::of(&text));
            let total = units(&m.text, m.encoding);
            if m.segments.len() == 1 {
                prop_assert!(total <= m.encoding.single_capacity());
            } else {
                prop_assert!(part_units(&m).iter().all(|&u| u <= m.encoding.part_capacity()));
            }
            if segments(&text, SmsEncoding::of(&text)).len() <= max_segments {
                prop_assert_eq!(m.text, text);
            } else {
                prop_assert!(m.text.ends_with(m.encoding.ellipsis()));
            }
        }
    }
}
