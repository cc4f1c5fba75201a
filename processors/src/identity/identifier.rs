//! Identifiers: typed values (`email:ann@example.com`), normalised per type and checked
//! against the guards that need no graph: declared type, shape, length, placeholders.

use super::config::{IdentifierType, IdentityConfig, Normalise};
use serde::{Deserialize, Serialize};

/// One identifier, normalised: (`email`, `ann@example.com`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

/// Why a raw identifier was not used. The label is the metric label and DLQ wording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownType,
    Placeholder,
    TooLong,
    Invalid(String),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::UnknownType => "unknown_type",
            Refusal::Placeholder => "placeholder",
            Refusal::TooLong => "too_long",
            Refusal::Invalid(_) => "invalid_shape",
        }
    }

    pub fn explain(&self, kind: &str, raw: &str) -> String {
        let shown: String = raw.chars().take(64).collect();
        match self {
            Refusal::UnknownType => format!("identifier type {kind:?} is not declared in identity.types"),
            Refusal::Placeholder => format!("{kind} {shown:?} is a placeholder value that identifies nobody"),
            Refusal::TooLong => format!("{kind} value is longer than identity.max_value_length"),
            Refusal::Invalid(why) => format!("{kind} {shown:?} {why}"),
        }
    }
}

impl Identifier {
    /// Normalise a raw value of type `kind` under the topology's rules.
    pub fn parse(config: &IdentityConfig, kind: &str, raw: &str) -> Result<Identifier, Refusal> {
        let ty = config.identifier_type(kind).ok_or(Refusal::UnknownType)?;
        if raw.len() > config.max_value_length {
            return Err(Refusal::TooLong);
        }
        let value = normalise_value(ty, &config.default_region, raw)?;
        if value.is_empty() || config.is_blocked(ty, &value) {
            return Err(Refusal::Placeholder);
        }
        Ok(Identifier { kind: kind.to_owned(), value })
    }

    /// An identifier already normalised (read back from a store or a message).
    pub fn raw(kind: &str, value: &str) -> Identifier {
        Identifier { kind: kind.to_owned(), value: value.to_owned() }
    }

    /// `type:value`, the identifier's name everywhere (store keys, graph topic keys).
    pub fn label(&self) -> String {
        format!("{}:{}", self.kind, self.value)
    }

    /// What the identifier's messages are partitioned by: its plain value, which is
    /// what producers naturally key an event by (`cust_123`, not `customer_id:cust_123`),
    /// so such an event is already on its owner's partition and resolves without a hop.
    pub fn owner_key(&self) -> &str {
        &self.value
    }

    pub fn from_label(label: &str) -> Option<Identifier> {
        let (kind, value) = label.split_once(':')?;
        Some(Identifier::raw(kind, value))
    }
}

fn normalise_value(ty: &IdentifierType, region: &str, raw: &str) -> Result<String, Refusal> {
    let trimmed = raw.trim();
    if trimmed.chars().any(char::is_control) {
        return Err(Refusal::Invalid("contains control characters".into()));
    }
    match ty.normalise {
        Normalise::Trim => Ok(trimmed.to_owned()),
        Normalise::Lowercase => Ok(trimmed.to_lowercase()),
        Normalise::Email => {
            let email = trimmed.to_lowercase();
            let shape_ok = match email.split_once('@') {
                Some((local, domain)) => {
                    !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
                }
                None => false,
            };
            if !shape_ok || email.contains(char::is_whitespace) || email.matches('@').count() != 1 {
                return Err(Refusal::Invalid("is not an email address (local@domain.tld)".into()));
            }
            Ok(email)
        }
        Normalise::Phone => normalise_phone(trimmed, region),
    }
}

/// E.164: `+` and the full number. Numbers without a country code are read in `region`.
pub fn normalise_phone(raw: &str, region: &str) -> Result<String, Refusal> {
    let digits = raw.chars().filter(char::is_ascii_digit).count();
    if !(6..=17).contains(&digits) {
        return Err(Refusal::Invalid("is not a phone number (6 to 15 digits)".into()));
    }
    let region = region.parse::<phonenumber::country::Id>().ok();
    let number =
        phonenumber::parse(region, raw).map_err(|e| Refusal::Invalid(format!("is not a phone number ({e})")))?;
    Ok(number.format().mode(phonenumber::Mode::E164).to_string())
}

/// Light normalisation without a topology (used by readers of already-resolved events).
pub fn normalise(kind: &str, raw: &str) -> Option<String> {
    let trimmed = raw.trim();
    let value = match kind {
        "email" => trimmed.to_lowercase(),
        _ => trimmed.to_owned(),
    };
    (!value.is_empty()).then_some(value)
}

/// The partitioning key of an identity actor named by an identifier label (`type:value`
/// → `value`, see [`Identifier::owner_key`]) or a canonical id (itself; canonical ids
/// hold no `:`).
pub fn owner_key(label_or_canonical: &str) -> &str {
    label_or_canonical.split_once(':').map_or(label_or_canonical, |(_, value)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kind: &str, raw: &str) -> Result<String, Refusal> {
        Identifier::parse(&IdentityConfig::default(), kind, raw).map(|i| i.value)
    }

    #[test]
    fn emails_are_trimmed_lower_cased_and_checked() {
        assert_eq!(parse("email", "  Ann@Example.COM ").unwrap(), "ann@example.com");
        assert_eq!(parse("email", "ann").unwrap_err().label(), "invalid_shape");
        assert_eq!(parse("email", "a@b@c.com").unwrap_err().label(), "invalid_shape");
        assert_eq!(parse("email", "TEST@test.com").unwrap_err(), Refusal::Placeholder);
    }

    #[test]
    fn phones_become_e164_in_the_default_region() {
        assert_eq!(parse("phone", "(415) 555-0132").unwrap(), "+14155550132");
        assert_eq!(parse("phone", "+61 412 345 678").unwrap(), "+61412345678");
        assert_eq!(parse("phone", "call me maybe").unwrap_err().label(), "invalid_shape");
        assert_eq!(parse("phone", "12").unwrap_err().label(), "invalid_shape");
        let au = IdentityConfig { default_region: "AU".into(), ..IdentityConfig::default() };
        assert_eq!(Identifier::parse(&au, "phone", "0412 345 678").unwrap().value, "+61412345678");
    }

    #[test]
    fn placeholders_unknown_types_and_long_values_are_refused() {
        for v in ["", "  ", "null", "Undefined", "anonymous", "0000", "00000000-0000-0000-0000-000000000000"] {
            assert_eq!(parse("anonymous_id", v).unwrap_err(), Refusal::Placeholder, "{v:?}");
        }
        assert_eq!(parse("shoe_size", "42").unwrap_err(), Refusal::UnknownType);
        assert_eq!(parse("customer_id", &"x".repeat(300)).unwrap_err(), Refusal::TooLong);
        assert_eq!(parse("customer_id", "a\u{0}b").unwrap_err().label(), "invalid_shape");
        assert_eq!(parse("device_id", " ABC-1 ").unwrap(), "abc-1");
    }
}
