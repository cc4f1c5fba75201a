//! Probabilistic matching (Fellegi–Sunter): each compared field falls into a level
//! (exact, similar at some threshold, different), each level carries a weight
//! `log2(m / u)`, and a pair's score is the sum of its weights over the fields both
//! records have. Candidate pairs are only those sharing a blocking key.

use super::config::{Comparison, FieldConfig, ProbabilisticConfig};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// A record kept under a blocking key: who it belongs to and its compared fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatchRecord {
    /// The customer the record resolved to when it was seen.
    pub canonical: String,
    /// The identifier the record resolved through (stable across merges).
    pub anchor: String,
    pub fields: BTreeMap<String, String>,
    pub at: i64,
}

/// A scored pair: total weight and the level of each compared field.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub score: f64,
    pub levels: BTreeMap<String, String>,
}

/// The compared fields of an event (JSON as on `events.raw`), normalised.
pub fn extract_fields(model: &ProbabilisticConfig, event: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, field) in &model.fields {
        let value = field.from.iter().find_map(|path| read_path(event, path));
        if let Some(v) = value.and_then(|v| normalise_field(field, &v)) {
            out.insert(name.clone(), v);
        }
    }
    out
}

/// `traits.address.city`, optionally with `|first_word`, `|last_word` or `|initial`.
fn read_path(root: &Value, path: &str) -> Option<String> {
    let (path, transform) = path.split_once('|').unwrap_or((path, ""));
    let mut node = root;
    for part in path.split('.') {
        node = node.get(part)?;
    }
    let text = match node {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    let picked = match transform {
        "first_word" if words.len() > 1 => words[0].to_owned(),
        "last_word" if words.len() > 1 => words[words.len() - 1].to_owned(),
        "first_word" | "last_word" => return None,
        "initial" => text.chars().next()?.to_string(),
        _ => text,
    };
    (!picked.is_empty()).then_some(picked)
}

fn normalise_field(field: &FieldConfig, raw: &str) -> Option<String> {
    let lower = raw.trim().to_lowercase();
    let collapsed: String = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    match field.compare {
        Comparison::Date => normalise_date(&collapsed),
        Comparison::Numeric => collapsed.parse::<f64>().ok().map(|n| n.to_string()),
        _ => (!collapsed.is_empty()).then_some(collapsed),
    }
}

/// `YYYY-MM-DD` from `YYYY-MM-DD`, an RFC 3339 date-time, or `YYYYMMDD`.
fn normalise_date(text: &str) -> Option<String> {
    let digits: String = text.chars().take(10).filter(char::is_ascii_digit).collect();
    if digits.len() != 8 {
        return None;
    }
    Some(format!("{}-{}-{}", &digits[..4], &digits[4..6], &digits[6..8]))
}

/// The level index of two values of one field (0 = exact, last = different).
pub fn level(field: &FieldConfig, a: &str, b: &str) -> usize {
    let last = field.levels() - 1;
    if a == b {
        return 0;
    }
    match field.compare {
        Comparison::Exact => last,
        Comparison::JaroWinkler => {
            let sim = strsim::jaro_winkler(a, b);
            field.thresholds.iter().position(|t| sim >= *t).map(|i| i + 1).unwrap_or(last)
        }
        Comparison::Numeric => match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(x), Ok(y)) => {
                let diff = (x - y).abs();
                field.thresholds.iter().position(|t| diff <= *t).map(|i| i + 1).unwrap_or(last)
            }
            _ => last,
        },
        Comparison::Date => {
            let pa: Vec<&str> = a.split('-').collect();
            let pb: Vec<&str> = b.split('-').collect();
            if pa.len() != 3 || pb.len() != 3 {
                return last;
            }
            let differing = (0..3).filter(|i| pa[*i] != pb[*i]).count();
            let swapped = pa[0] == pb[0] && pa[1] == pb[2] && pa[2] == pb[1];
            if differing == 1 || swapped {
                1
            } else {
                last
            }
        }
    }
}

/// A human-readable name of a level (`exact`, `jw>=0.94`, `within 5`, `close`, `different`).
pub fn level_name(field: &FieldConfig, level: usize) -> String {
    let last = field.levels() - 1;
    if level == 0 {
        return "exact".into();
    }
    if level == last {
        return "different".into();
    }
    match field.compare {
        Comparison::JaroWinkler => format!("jw>={}", field.thresholds[level - 1]),
        Comparison::Numeric => format!("within {}", field.thresholds[level - 1]),
        _ => "close".into(),
    }
}

/// The weight of a level: log2(m / u).
pub fn weight(field: &FieldConfig, level: usize) -> f64 {
    let m = field.m.get(level).copied().unwrap_or(1.0);
    let u = field.u.get(level).copied().unwrap_or(1.0);
    (m / u).log2()
}

/// Score two records field by field (fields missing on either side count 0).
/// Agreement weights of a field group count at most the group's cap.
pub fn score(model: &ProbabilisticConfig, a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Scored {
    let mut total = 0.0;
    let mut grouped: BTreeMap<&str, f64> = BTreeMap::new();
    let mut levels = BTreeMap::new();
    for (name, field) in &model.fields {
        let (Some(x), Some(y)) = (a.get(name), b.get(name)) else { continue };
        let l = level(field, x, y);
        let w = weight(field, l);
        match (&field.group, w > 0.0) {
            (Some(g), true) => *grouped.entry(g.as_str()).or_default() += w,
            _ => total += w,
        }
        levels.insert(name.clone(), level_name(field, l));
    }
    for (group, sum) in grouped {
        total += model.group_caps.get(group).map_or(sum, |cap| sum.min(*cap));
    }
    Scored { score: total, levels }
}

/// The blocking keys of a record: `(rule, key)` for every rule whose fields it has.
pub fn blocking_keys(model: &ProbabilisticConfig, fields: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    'rules: for rule in &model.blocking {
        let mut parts = Vec::with_capacity(rule.fields.len());
        for f in &rule.fields {
            let (name, transform) = f.split_once('|').unwrap_or((f, ""));
            let Some(value) = fields.get(name) else { continue 'rules };
            let part: String = match transform {
                "initial" => value.chars().take(1).collect(),
                "year" => value.chars().take(4).collect(),
                "soundex" => soundex(value),
                _ => value.clone(),
            };
            parts.push(part);
        }
        out.push((rule.name.clone(), format!("{}:{}", rule.name, parts.join("|"))));
    }
    out
}

/// American Soundex (a letter and three digits): names that sound alike share a code,
/// so a blocking key survives most typos (`smith`, `smyth` → S530).
pub fn soundex(text: &str) -> String {
    fn code(c: char) -> Option<char> {
        match c {
            'b' | 'f' | 'p' | 'v' => Some('1'),
            'c' | 'g' | 'j' | 'k' | 'q' | 's' | 'x' | 'z' => Some('2'),
            'd' | 't' => Some('3'),
            'l' => Some('4'),
            'm' | 'n' => Some('5'),
            'r' => Some('6'),
            _ => None,
        }
    }
    let letters: Vec<char> = text.to_lowercase().chars().filter(char::is_ascii_alphabetic).collect();
    let Some(&first) = letters.first() else { return String::new() };
    let mut out = first.to_ascii_uppercase().to_string();
    let mut last = code(first);
    for &c in &letters[1..] {
        let digit = code(c);
        if digit.is_some() && digit != last {
            out.push(digit.unwrap_or('0'));
            if out.len() == 4 {
                break;
            }
        }
        // h and w do not separate equal codes; vowels do.
        if !matches!(c, 'h' | 'w') {
            last = digit;
        }
    }
    while out.len() < 4 {
        out.push('0');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_come_from_segment_traits_and_the_seed_name() {
        let model = ProbabilisticConfig::default();
        let event = json!({"traits": {"firstName": " Ann ", "lastName": "Lee", "birthday": "1980-05-17T00:00:00Z",
            "address": {"postalCode": "2000", "city": "Sydney"}}});
        let f = extract_fields(&model, &event);
        assert_eq!(f["first_name"], "ann");
        assert_eq!(f["birthday"], "1980-05-17");
        assert_eq!(f["postcode"], "2000");
        let seed = extract_fields(&model, &json!({"traits": {"name": "Jane van Doe"}}));
        assert_eq!(seed["first_name"], "jane");
        assert_eq!(seed["last_name"], "doe");
    }

    #[test]
    fn similar_records_outscore_different_ones() {
        let model = ProbabilisticConfig::default();
        let a = extract_fields(
            &model,
            &json!({"traits": {"firstName": "Katherine", "lastName": "Smith",
            "birthday": "19800517", "address": {"postalCode": "2000", "street": "12 Main St", "city": "Sydney"}}}),
        );
        let typo = extract_fields(
            &model,
            &json!({"traits": {"firstName": "Kathrine", "lastName": "Smith",
            "birthday": "19801705", "address": {"postalCode": "2000", "street": "12 Main Street", "city": "Sydney"}}}),
        );
        let other = extract_fields(
            &model,
            &json!({"traits": {"firstName": "Bob", "lastName": "Smith",
            "birthday": "19650102", "address": {"postalCode": "2000", "street": "3 High Rd", "city": "Sydney"}}}),
        );
        let close = score(&model, &a, &typo);
        let far = score(&model, &a, &other);
        assert!(close.score >= model.link_threshold, "{close:?}");
        // Same surname and address, different person (a family member): not linked.
        assert!(far.score < model.link_threshold, "{far:?}");
        assert_eq!(close.levels["birthday"], "close");
        assert_eq!(close.levels["last_name"], "exact");
    }

    #[test]
    fn soundex_codes_match_the_reference() {
        for (name, code) in [
            ("robert", "R163"),
            ("rupert", "R163"),
            ("rubin", "R150"),
            ("ashcraft", "A261"),
            ("tymczak", "T522"),
            ("pfister", "P236"),
            ("smith", "S530"),
            ("smyth", "S530"),
            ("lee", "L000"),
            ("", ""),
        ] {
            assert_eq!(soundex(name), code, "{name}");
        }
    }

    #[test]
    fn blocking_keys_need_every_field_of_a_rule() {
        let model = ProbabilisticConfig::default();
        let f = extract_fields(
            &model,
            &json!({"traits": {"firstName": "Ann", "lastName": "Lee", "birthday": "1980-05-17"}}),
        );
        let keys: Vec<String> = blocking_keys(&model, &f).into_iter().map(|(_, k)| k).collect();
        assert_eq!(keys, vec!["birthday:1980-05-17".to_string(), "full_name:A500|L000".to_string()]);
    }
}
