//! The `identity:` section of topology.yaml: identifier types with their normalisation
//! and guards, and the probabilistic matching model (fields, comparisons, m/u
//! probabilities, blocking rules, thresholds).

use crate::topology::{ConfigError, Duration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Identifier types, most specific first: an event resolves to the customer of its
    /// most specific identifier, and only declared types are accepted.
    pub types: Vec<IdentifierType>,
    /// Region for phone numbers written without a country code (ISO 3166 alpha-2).
    pub default_region: String,
    /// Placeholder values that identify nobody, refused for every type (compared
    /// case-insensitively after normalisation). Values made only of zeros are refused too.
    pub blocked_values: Vec<String>,
    /// Longest accepted identifier value, in bytes.
    pub max_value_length: usize,
    /// Most identifiers one customer may hold; a link that would exceed it is refused.
    pub max_component_size: usize,
    pub probabilistic: ProbabilisticConfig,
}

/// How an identifier value is normalised before use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalise {
    /// Trim surrounding white space only.
    #[default]
    Trim,
    /// Trim and lower-case.
    Lowercase,
    /// Trim, lower-case, and require `local@domain`.
    Email,
    /// E.164 (`+61412345678`), numbers without a country code read in `default_region`.
    Phone,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierType {
    pub name: String,
    #[serde(default)]
    pub normalise: Normalise,
    /// A customer holds at most one value of a unique type, so two customers holding
    /// different values never merge (two logged-in family members sharing a device).
    #[serde(default)]
    pub unique: bool,
    /// Most values of this type one customer may hold.
    #[serde(default)]
    pub max_per_customer: Option<usize>,
    /// Whether this identifier may merge two customers that already exist. `false`
    /// (shared devices): it joins the first customer seen with it and stays there.
    #[serde(default = "yes")]
    pub merges: bool,
    /// Extra placeholder values for this type.
    #[serde(default)]
    pub blocked_values: Vec<String>,
}

fn yes() -> bool {
    true
}

impl IdentifierType {
    fn new(name: &str, normalise: Normalise) -> Self {
        IdentifierType {
            name: name.to_owned(),
            normalise,
            unique: false,
            max_per_customer: None,
            merges: true,
            blocked_values: Vec::new(),
        }
    }

    /// The most values of this type one customer may hold (`None`: no limit).
    pub fn limit(&self) -> Option<usize> {
        if self.unique {
            Some(1)
        } else {
            self.max_per_customer
        }
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        let customer_id = IdentifierType { unique: true, ..IdentifierType::new("customer_id", Normalise::Trim) };
        let email = IdentifierType {
            max_per_customer: Some(5),
            blocked_values: ["test@test.com", "test@example.com", "noreply@example.com", "none@none.com"]
                .map(String::from)
                .to_vec(),
            ..IdentifierType::new("email", Normalise::Email)
        };
        let phone = IdentifierType { max_per_customer: Some(5), ..IdentifierType::new("phone", Normalise::Phone) };
        let loyalty = IdentifierType { unique: true, ..IdentifierType::new("loyalty_card", Normalise::Trim) };
        let device = IdentifierType {
            max_per_customer: Some(10),
            merges: false,
            ..IdentifierType::new("device_id", Normalise::Lowercase)
        };
        let anonymous =
            IdentifierType { max_per_customer: Some(100), ..IdentifierType::new("anonymous_id", Normalise::Trim) };
        IdentityConfig {
            types: vec![customer_id, email, phone, loyalty, device, anonymous],
            default_region: "US".into(),
            blocked_values: [
                "null",
                "undefined",
                "none",
                "nil",
                "nan",
                "n/a",
                "na",
                "unknown",
                "anonymous",
                "guest",
                "test",
                "[object object]",
                "-",
                "0",
            ]
            .map(String::from)
            .to_vec(),
            max_value_length: 256,
            max_component_size: 200,
            probabilistic: ProbabilisticConfig::default(),
        }
    }
}

impl IdentityConfig {
    pub fn identifier_type(&self, name: &str) -> Option<&IdentifierType> {
        self.types.iter().find(|t| t.name == name)
    }

    /// Position of a type in `types` (lower is more specific).
    pub fn rank(&self, name: &str) -> usize {
        self.types.iter().position(|t| t.name == name).unwrap_or(usize::MAX)
    }

    /// Whether a normalised value of type `kind` is a placeholder.
    pub fn is_blocked(&self, kind: &IdentifierType, value: &str) -> bool {
        let lower = value.to_lowercase();
        let zeros = lower.chars().all(|c| matches!(c, '0' | '-' | '+' | ' ' | '.' | ':'));
        zeros
            || self.blocked_values.iter().any(|b| b.to_lowercase() == lower)
            || kind.blocked_values.iter().any(|b| b.to_lowercase() == lower)
    }

    pub(crate) fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.types.is_empty() {
            errors.push(err("identity.types", "must declare at least one identifier type"));
        }
        for (i, t) in self.types.iter().enumerate() {
            if !crate::topology::is_identifier_type(&t.name) {
                errors.push(err(
                    format!("identity.types[{i}].name"),
                    format!("{:?} is not a valid identifier type (lower-case letters, digits, _)", t.name),
                ));
            }
            if self.types[..i].iter().any(|o| o.name == t.name) {
                errors.push(err(format!("identity.types[{i}].name"), format!("{:?} is declared twice", t.name)));
            }
            if t.max_per_customer == Some(0) {
                errors.push(err(format!("identity.types[{i}].max_per_customer"), "must be at least 1"));
            }
        }
        if !self.types.iter().any(|t| t.name == "customer_id") {
            errors.push(err("identity.types", "must declare customer_id (the business's own customer id)"));
        }
        if self.default_region.len() != 2 || self.default_region.parse::<phonenumber::country::Id>().is_err() {
            errors.push(err(
                "identity.default_region",
                format!("{:?} is not an ISO 3166 alpha-2 region such as US or AU", self.default_region),
            ));
        }
        if self.max_value_length < 8 {
            errors.push(err("identity.max_value_length", "must be at least 8"));
        }
        if self.max_component_size < 2 {
            errors.push(err("identity.max_component_size", "must be at least 2"));
        }
        self.probabilistic.validate(errors);
    }
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { path: path.into(), message: message.into() }
}

/// Fellegi–Sunter matching on the traits customers send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbabilisticConfig {
    pub enabled: bool,
    /// A candidate pair scoring at least this (sum of log2 m/u weights) is linked.
    pub link_threshold: f64,
    /// Pairs scoring at least this but below `link_threshold` go to `identity.review`.
    pub review_threshold: f64,
    /// Candidates kept per blocking key (the most recent).
    pub max_block_size: usize,
    /// Most agreement weight a field group (see `fields.*.group`) may add to a score.
    pub group_caps: BTreeMap<String, f64>,
    /// Compared fields, by name.
    pub fields: BTreeMap<String, FieldConfig>,
    /// Candidate pairs are only those sharing a blocking key.
    pub blocking: Vec<BlockingRule>,
}

/// One compared field: where its value comes from and how two values compare.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// Paths into the event (`traits.firstName`, `context.ip`); the first present wins.
    /// A path may end in `|first_word`, `|last_word` or `|initial`.
    pub from: Vec<String>,
    pub compare: Comparison,
    /// For `jaro_winkler`: similarity thresholds, highest first. For `numeric`: absolute
    /// differences, smallest first. Each adds one level between exact and different.
    #[serde(default)]
    pub thresholds: Vec<f64>,
    /// P(level | same customer), one per level: exact, each threshold, different.
    pub m: Vec<f64>,
    /// P(level | different customers), one per level.
    pub u: Vec<f64>,
    /// Fields of one group describe one fact (street, city, postcode and state are one
    /// address): their agreement weights together count at most the group's cap in
    /// `group_caps`, so a household sharing an address does not look like one person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// Two levels: equal, different.
    Exact,
    /// Exact, then one level per similarity threshold, then different.
    JaroWinkler,
    /// `YYYY-MM-DD` dates: exact; day and month swapped or one part different; different.
    Date,
    /// Exact, then one level per absolute-difference threshold, then different.
    Numeric,
}

impl FieldConfig {
    pub fn levels(&self) -> usize {
        match self.compare {
            Comparison::Exact => 2,
            Comparison::Date => 3,
            Comparison::JaroWinkler | Comparison::Numeric => self.thresholds.len() + 2,
        }
    }
}

/// Records sharing the values of `fields` (after their transforms) are candidates.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlockingRule {
    pub name: String,
    /// Field names, each optionally with `|initial` (first letter), `|year` (first four
    /// characters) or `|soundex` (the American Soundex code, robust to typos).
    pub fields: Vec<String>,
    /// Candidates older than this are not compared (IP + user agent within 30 minutes).
    #[serde(default)]
    pub window: Option<Duration>,
}

impl Default for ProbabilisticConfig {
    fn default() -> Self {
        default_model()
    }
}

impl ProbabilisticConfig {
    fn validate(&self, errors: &mut Vec<ConfigError>) {
        if self.review_threshold > self.link_threshold {
            errors.push(err("identity.probabilistic.review_threshold", "must not exceed link_threshold"));
        }
        if self.max_block_size == 0 {
            errors.push(err("identity.probabilistic.max_block_size", "must be at least 1"));
        }
        for (name, f) in &self.fields {
            let path = format!("identity.probabilistic.fields.{name}");
            if f.from.is_empty() {
                errors.push(err(format!("{path}.from"), "must name at least one path"));
            }
            for (i, p) in f.from.iter().enumerate() {
                if let Some((_, transform)) = p.split_once('|') {
                    if !matches!(transform, "first_word" | "last_word" | "initial") {
                        errors.push(err(
                            format!("{path}.from[{i}]"),
                            format!("unknown transform {transform:?} (first_word, last_word or initial)"),
                        ));
                    }
                }
            }
            let levels = f.levels();
            for (which, probs) in [("m", &f.m), ("u", &f.u)] {
                if probs.len() != levels {
                    errors.push(err(
                        format!("{path}.{which}"),
                        format!("needs {levels} probabilities (one per comparison level), got {}", probs.len()),
                    ));
                }
                if probs.iter().any(|p| !(*p > 0.0 && *p <= 1.0)) {
                    errors.push(err(format!("{path}.{which}"), "probabilities must be in (0, 1]"));
                }
            }
            if let Some(g) = &f.group {
                if !self.group_caps.contains_key(g) {
                    errors.push(err(format!("{path}.group"), format!("group {g:?} has no cap in group_caps")));
                }
            }
            if matches!(f.compare, Comparison::Exact | Comparison::Date) && !f.thresholds.is_empty() {
                errors.push(err(format!("{path}.thresholds"), "only jaro_winkler and numeric take thresholds"));
            }
        }
        for (i, rule) in self.blocking.iter().enumerate() {
            let path = format!("identity.probabilistic.blocking[{i}]");
            if rule.fields.is_empty() {
                errors.push(err(format!("{path}.fields"), "must name at least one field"));
            }
            for (j, f) in rule.fields.iter().enumerate() {
                let (name, transform) = f.split_once('|').unwrap_or((f, ""));
                if !self.fields.contains_key(name) {
                    errors.push(err(format!("{path}.fields[{j}]"), format!("{name:?} is not a declared field")));
                }
                if !matches!(transform, "" | "initial" | "year" | "soundex") {
                    errors.push(err(
                        format!("{path}.fields[{j}]"),
                        format!("unknown transform {transform:?} (initial, year or soundex)"),
                    ));
                }
            }
            if self.blocking[..i].iter().any(|o| o.name == rule.name) {
                errors.push(err(format!("{path}.name"), format!("{:?} is declared twice", rule.name)));
            }
        }
    }
}

fn field(from: &[&str], compare: Comparison, thresholds: &[f64], m: &[f64], u: &[f64]) -> FieldConfig {
    FieldConfig {
        from: from.iter().map(|s| s.to_string()).collect(),
        compare,
        thresholds: thresholds.to_vec(),
        m: m.to_vec(),
        u: u.to_vec(),
        group: None,
    }
}

fn grouped(group: &str, field: FieldConfig) -> FieldConfig {
    FieldConfig { group: Some(group.to_owned()), ..field }
}

/// The shipped model: Segment's reserved identify traits and the seed's `name` and
/// `location`. m/u of names, birthday and address were estimated by
/// `chorus identity train` on FEBRL4 (scripts/febrl4.py); the address fields form one
/// capped group; email, phone, ip and user agent are set by hand.
fn default_model() -> ProbabilisticConfig {
    use Comparison::*;
    let fields = [
        (
            "first_name",
            field(
                &["traits.firstName", "traits.first_name", "traits.name|first_word"],
                JaroWinkler,
                &[0.94, 0.88],
                &[0.762, 0.099, 0.038, 0.101],
                &[0.0033, 0.00094, 0.0016, 0.99416],
            ),
        ),
        (
            "last_name",
            field(
                &["traits.lastName", "traits.last_name", "traits.name|last_word"],
                JaroWinkler,
                &[0.94, 0.88],
                &[0.778, 0.13, 0.034, 0.058],
                &[0.0037, 0.00063, 0.00082, 0.99485],
            ),
        ),
        (
            "birthday",
            field(&["traits.birthday", "traits.dob"], Date, &[], &[0.879, 0.018, 0.103], &[0.00016, 0.0037, 0.99614]),
        ),
        (
            "street",
            grouped(
                "address",
                field(
                    &["traits.address.street", "traits.location.street"],
                    JaroWinkler,
                    &[0.94, 0.88],
                    &[0.246, 0.45, 0.129, 0.175],
                    &[6e-05, 7e-05, 1.5e-05, 0.999855],
                ),
            ),
        ),
        (
            "city",
            grouped(
                "address",
                field(
                    &["traits.address.city", "traits.location.city"],
                    JaroWinkler,
                    &[0.94, 0.88],
                    &[0.715, 0.161, 0.022, 0.102],
                    &[0.00097, 0.0002, 0.0004, 0.99843],
                ),
            ),
        ),
        (
            "postcode",
            grouped(
                "address",
                field(
                    &["traits.address.postalCode", "traits.location.postcode", "traits.location.postalCode"],
                    Exact,
                    &[],
                    &[0.769, 0.231],
                    &[0.0011, 0.9989],
                ),
            ),
        ),
        (
            "state",
            grouped(
                "address",
                field(&["traits.address.state", "traits.location.state"], Exact, &[], &[0.934, 0.066], &[0.224, 0.776]),
            ),
        ),
        ("email", field(&["traits.email"], Exact, &[], &[0.8, 0.2], &[1e-05, 0.99999])),
        ("phone", field(&["traits.phone"], Exact, &[], &[0.75, 0.25], &[1e-05, 0.99999])),
        ("ip", field(&["context.ip"], Exact, &[], &[0.6, 0.4], &[0.001, 0.999])),
        ("user_agent", field(&["context.user_agent"], Exact, &[], &[0.9, 0.1], &[0.05, 0.95])),
    ];
    let blocking = [
        ("birthday", vec!["birthday"], None),
        ("surname_postcode", vec!["last_name|soundex", "postcode"], None),
        ("given_name_postcode", vec!["first_name|soundex", "postcode"], None),
        ("street_postcode", vec!["street|soundex", "postcode"], None),
        ("full_name", vec!["first_name|soundex", "last_name|soundex"], None),
        ("surname_city", vec!["last_name|soundex", "city"], None),
        ("ip_user_agent", vec!["ip", "user_agent"], Some(Duration::minutes(30))),
    ];
    ProbabilisticConfig {
        enabled: true,
        link_threshold: 17.0,
        review_threshold: 10.0,
        max_block_size: 50,
        group_caps: [("address".to_owned(), 14.0)].into_iter().collect(),
        fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        blocking: blocking
            .into_iter()
            .map(|(name, fields, window)| BlockingRule {
                name: name.to_owned(),
                fields: fields.into_iter().map(String::from).collect(),
                window,
            })
            .collect(),
    }
}
