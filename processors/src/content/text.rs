//! Plain-text shaping shared by the length-limited channels (push, SMS). A truncated
//! message ends on a whole word followed by an ellipsis, never mid-word and never on a
//! dangling comma; lengths are counted by the caller's measure (characters for push,
//! septets or UTF-16 units for SMS), so this file only decides *where* to cut.

/// Separators that read as unfinished right before an ellipsis.
fn is_dangling(c: char) -> bool {
    c.is_whitespace() || matches!(c, ',' | ';' | ':' | '-' | '–' | '—' | '(' | '/')
}

/// The longest prefix of `text[..end]` that ends at a word boundary, without trailing
/// whitespace or dangling separators. When the first word alone is longer than
/// `text[..end]` (a long URL, text without spaces) it is cut mid-word rather than
/// dropped. `end` is a char boundary.
pub(crate) fn cut_at_word(text: &str, end: usize) -> &str {
    let (head, rest) = text.split_at(end);
    let ends_a_word = rest.chars().next().is_none_or(char::is_whitespace);
    let whole_words = if ends_a_word { head } else { head.rfind(char::is_whitespace).map_or("", |i| &head[..i]) };
    match whole_words.trim_end_matches(is_dangling) {
        "" => head.trim_end(),
        cut => cut,
    }
}

/// `text` if it has at most `max_chars` characters, else its longest prefix cut at a
/// word boundary plus `ellipsis`, within `max_chars` in all.
pub(crate) fn truncate_chars(text: &str, max_chars: usize, ellipsis: &str) -> String {
    if text.chars().count() <= max_chars {
        return text.to_owned();
    }
    let keep = max_chars.saturating_sub(ellipsis.chars().count());
    let end = text.char_indices().nth(keep).map_or(text.len(), |(i, _)| i);
    format!("{}{ellipsis}", cut_at_word(text, end))
}

/// Runs of whitespace (newlines included) as single spaces, for one-line fields.
pub(crate) fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_back_to_the_last_whole_word() {
        let text = "Complete your order today";
        assert_eq!(cut_at_word(text, 12), "Complete"); // "Complete you|r"
        assert_eq!(cut_at_word(text, 13), "Complete your"); // the cut falls on a space
        assert_eq!(cut_at_word(text, text.len()), text);
    }

    #[test]
    fn drops_dangling_separators() {
        assert_eq!(cut_at_word("Hello, world", 8), "Hello");
        assert_eq!(cut_at_word("Sale - today only", 9), "Sale");
    }

    #[test]
    fn a_single_long_word_is_cut_mid_word() {
        assert_eq!(cut_at_word("https://shop.example/cart", 12), "https://shop");
        assert_eq!(cut_at_word("漢字のみの文章", "漢字の".len()), "漢字の");
    }

    #[test]
    fn truncation_counts_characters_not_bytes() {
        let accented = "é".repeat(10);
        assert_eq!(truncate_chars(&accented, 10, "…"), accented, "10 chars (20 bytes) fit in 10");
        let cut = truncate_chars(&"é".repeat(11), 10, "…");
        assert_eq!(cut, format!("{}…", "é".repeat(9)));
        assert_eq!(cut.chars().count(), 10);
    }

    #[test]
    fn truncation_ends_with_the_ellipsis_at_a_word_boundary() {
        let text = "Your cart is still waiting for you";
        assert_eq!(truncate_chars(text, 20, "…"), "Your cart is still…");
        assert_eq!(truncate_chars(text, 19, "…"), "Your cart is still…", "the cut falls right after \"still\"");
        assert_eq!(truncate_chars(text, 18, "…"), "Your cart is…");
        assert_eq!(truncate_chars(text, 1, "…"), "…");
        assert_eq!(truncate_chars(text, 20, "..."), "Your cart is...");
    }

    #[test]
    fn whitespace_runs_collapse_to_one_space() {
        assert_eq!(collapse_whitespace("  Two\n\nlines\t here "), "Two lines here");
    }
}
