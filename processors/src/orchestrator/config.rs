//! The `orchestration:` section of topology.yaml: channels, message categories and
//! their priorities, the consent each channel needs, how a customer is reached on each
//! channel, suppressions, quiet hours, frequency caps, the coordination window and
//! campaign re-eligibility. The seed's rules are the defaults.

use crate::topology::{ConfigError, Duration};
use jiff::civil::Time;
use jiff::tz::TimeZone;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;

pub const DEFAULT_CHANNELS: &[&str] = &["email", "push", "sms", "chat", "web", "in_app"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrchestrationConfig {
    pub channels: Vec<String>,
    pub categories: BTreeMap<String, CategoryConfig>,
    /// Consent purpose needed to send marketing on each channel.
    pub channel_purposes: BTreeMap<String, String>,
    /// Channel → the identifier or trait a customer must have to be reached on it
    /// (`email`, `phone`, `push_token`). Channels not listed reach everyone.
    pub reachability: BTreeMap<String, String>,
    /// Reasons not to message a customer for a while, from what they did.
    pub suppressions: Vec<Suppression>,
    /// `null` turns quiet hours off.
    pub quiet_hours: Option<QuietHours>,
    pub frequency_caps: FrequencyCaps,
    /// Requests of capped categories arriving within this window are decided together,
    /// highest priority first; `0s` decides each at once.
    pub coordination_window: Duration,
    /// A customer gets one message per campaign within this window, whatever the channel.
    pub campaign_window: Duration,
    /// Most requests one customer may have waiting (quiet hours, coordination window).
    pub max_pending: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryConfig {
    /// 1 is the highest: it takes the remaining cap first.
    pub priority: u32,
    /// Whether sending needs the channel's marketing consent.
    #[serde(default = "yes")]
    pub needs_marketing_consent: bool,
    /// Whether frequency caps limit the category and its sends count toward them.
    #[serde(default = "yes")]
    pub capped: bool,
    /// Whether quiet hours hold the category back.
    #[serde(default = "yes")]
    pub quiet_hours: bool,
}

fn yes() -> bool {
    true
}

impl CategoryConfig {
    /// Whether every coordination rule applies to the category (the seed's message
    /// coordination rate counts these against those sent without coordination).
    pub fn coordinated(&self) -> bool {
        self.capped && self.quiet_hours && self.needs_marketing_consent
    }
}

/// A suppression: requests of `categories` are refused with `reason` for `for` after an
/// `after` event, or from a `from` event until an `until` event (an open support case).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suppression {
    pub reason: String,
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default, rename = "for")]
    pub duration: Option<Duration>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub until: Option<String>,
    /// Categories it applies to.
    #[serde(default = "marketing_categories")]
    pub categories: Vec<String>,
}

fn marketing_categories() -> Vec<String> {
    vec!["retention".into(), "promotional".into()]
}

impl Suppression {
    fn window(reason: &str, after: &str, duration: Duration) -> Suppression {
        Suppression {
            reason: reason.into(),
            after: Some(after.into()),
            duration: Some(duration),
            from: None,
            until: None,
            categories: marketing_categories(),
        }
    }

    /// The event types this suppression watches.
    pub fn event_types(&self) -> impl Iterator<Item = &String> {
        self.after.iter().chain(&self.from).chain(&self.until)
    }
}

/// Local hours in which messages wait: `hours: "22:00-08:00"` in the recipient's own
/// time zone (`default_timezone` when it is unknown). A window may cross midnight.
#[derive(Debug, Clone, PartialEq)]
pub struct QuietHours {
    pub start: Time,
    pub end: Time,
    pub default_timezone: TimeZone,
    /// As written, for messages.
    pub hours: String,
}

impl<'de> Deserialize<'de> for QuietHours {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Written {
            hours: String,
            #[serde(default = "utc")]
            default_timezone: String,
        }
        fn utc() -> String {
            "UTC".into()
        }
        let written = Written::deserialize(d)?;
        QuietHours::parse(&written.hours, &written.default_timezone).map_err(serde::de::Error::custom)
    }
}

impl QuietHours {
    pub fn parse(hours: &str, default_timezone: &str) -> Result<QuietHours, String> {
        let (start, end) =
            hours.split_once('-').ok_or_else(|| format!("quiet hours are written \"HH:MM-HH:MM\", got {hours:?}"))?;
        let time = |text: &str| {
            text.trim().parse::<Time>().map_err(|e| format!("{text:?} in quiet hours {hours:?} is not a time: {e}"))
        };
        let (start, end) = (time(start)?, time(end)?);
        if start == end {
            return Err(format!("quiet hours {hours:?} start and end at the same time"));
        }
        let default_timezone = TimeZone::get(default_timezone)
            .map_err(|e| format!("default_timezone {default_timezone:?} is not a known time zone: {e}"))?;
        Ok(QuietHours { start, end, default_timezone, hours: hours.to_owned() })
    }
}

/// Most sends in a rolling day (24 h) and a rolling week (7 × 24 h).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapLimits {
    pub max_per_day: Option<u32>,
    pub max_per_week: Option<u32>,
}

impl CapLimits {
    pub const fn new(max_per_day: Option<u32>, max_per_week: Option<u32>) -> Self {
        CapLimits { max_per_day, max_per_week }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FrequencyCaps {
    /// Over every channel together.
    pub global: CapLimits,
    /// Per channel.
    pub channels: BTreeMap<String, CapLimits>,
}

impl Default for FrequencyCaps {
    fn default() -> Self {
        FrequencyCaps {
            global: CapLimits::new(Some(3), Some(10)),
            channels: [
                ("push", CapLimits::new(Some(2), None)),
                ("sms", CapLimits::new(None, Some(2))),
                ("email", CapLimits::new(Some(2), None)),
            ]
            .into_iter()
            .map(|(c, l)| (c.to_owned(), l))
            .collect(),
        }
    }
}

impl Default for OrchestrationConfig {
    fn default() -> Self {
        let categories = [
            ("transactional", 1, false, false, false),
            ("service", 2, false, true, true),
            ("retention", 3, true, true, true),
            ("promotional", 4, true, true, true),
        ]
        .into_iter()
        .map(|(name, priority, needs_marketing_consent, capped, quiet_hours)| {
            (name.to_owned(), CategoryConfig { priority, needs_marketing_consent, capped, quiet_hours })
        })
        .collect();
        let pairs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
        };
        let suppressions = vec![
            Suppression::window("recent_purchase", "order.completed", Duration::hours(24)),
            Suppression::window("recent_complaint", "complaint.filed", Duration::hours(48)),
            Suppression {
                reason: "active_support_case".into(),
                after: None,
                duration: None,
                from: Some("support.case_opened".into()),
                until: Some("support.case_closed".into()),
                categories: marketing_categories(),
            },
        ];
        OrchestrationConfig {
            channels: DEFAULT_CHANNELS.iter().map(|s| s.to_string()).collect(),
            categories,
            channel_purposes: pairs(&[
                ("email", "marketing_email"),
                ("sms", "marketing_sms"),
                ("push", "marketing_push"),
                ("in_app", "personalisation"),
                ("web", "personalisation"),
                ("chat", "personalisation"),
            ]),
            reachability: pairs(&[("email", "email"), ("sms", "phone"), ("push", "push_token")]),
            suppressions,
            quiet_hours: QuietHours::parse("22:00-08:00", "UTC").ok(),
            frequency_caps: FrequencyCaps::default(),
            coordination_window: Duration::minutes(1),
            campaign_window: Duration::days(30),
            max_pending: 100,
        }
    }
}

impl OrchestrationConfig {
    /// What is wrong with a message a journey or campaign would send: an undeclared
    /// category, no channel, an undeclared channel; as (field, problem).
    pub fn check_send(&self, category: &str, channels: &[String]) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !self.categories.contains_key(category) {
            problems.push(("category", format!("{category:?} is not a category of orchestration.categories")));
        }
        if channels.is_empty() {
            problems.push(("channels", "must name at least one channel".into()));
        }
        for c in channels.iter().filter(|c| !self.channels.contains(c)) {
            problems.push(("channels", format!("{c:?} is not a declared channel")));
        }
        problems
    }

    /// The consent purpose marketing on `channel` needs.
    pub fn purpose_of(&self, channel: &str) -> &str {
        self.channel_purposes.get(channel).map(String::as_str).unwrap_or("marketing_email")
    }

    pub fn validate(&self, event_types: &[String], purposes: &[String], errors: &mut Vec<ConfigError>) {
        let err = |path: String, message: String| ConfigError { path, message };
        let is_name = crate::topology::is_identifier_type;
        if self.channels.is_empty() {
            errors.push(err("orchestration.channels".into(), "must name at least one channel".into()));
        }
        for (i, c) in self.channels.iter().enumerate() {
            if !is_name(c) {
                errors.push(err(format!("orchestration.channels[{i}]"), format!("{c:?} is not a valid channel name")));
            }
        }
        let undeclared = |section: &str, channels: &mut dyn Iterator<Item = &String>, errors: &mut Vec<ConfigError>| {
            for channel in channels.filter(|c| !self.channels.contains(c)) {
                errors.push(err(format!("orchestration.{section}.{channel}"), "is not a declared channel".into()));
            }
        };
        undeclared("channel_purposes", &mut self.channel_purposes.keys(), errors);
        undeclared("reachability", &mut self.reachability.keys(), errors);
        undeclared("frequency_caps.channels", &mut self.frequency_caps.channels.keys(), errors);
        for (channel, purpose) in &self.channel_purposes {
            if !purposes.contains(purpose) {
                errors.push(err(
                    format!("orchestration.channel_purposes.{channel}"),
                    format!("purpose {purpose:?} is not declared in consent.purposes"),
                ));
            }
        }
        if self.categories.is_empty() {
            errors.push(err("orchestration.categories".into(), "must declare at least one category".into()));
        }
        for (name, category) in &self.categories {
            if category.priority == 0 {
                errors.push(err(format!("orchestration.categories.{name}.priority"), "must be at least 1".into()));
            }
        }
        for (i, s) in self.suppressions.iter().enumerate() {
            let path = format!("orchestration.suppressions[{i}]");
            let shape = match (&s.after, s.duration, &s.from, &s.until) {
                (Some(_), Some(d), None, None) => d.ms() > 0,
                (None, None, Some(_), Some(_)) => true,
                _ => false,
            };
            if !shape {
                errors.push(err(path.clone(), "needs `after` with a positive `for`, or `from` with `until`".into()));
            }
            if !is_name(&s.reason) {
                errors.push(err(format!("{path}.reason"), format!("{:?} is not a valid reason code", s.reason)));
            }
            for t in s.event_types().filter(|t| !event_types.contains(t)) {
                errors.push(err(path.clone(), format!("event type {t:?} is not in event_types")));
            }
            for c in s.categories.iter().filter(|c| !self.categories.contains_key(*c)) {
                errors.push(err(format!("{path}.categories"), format!("{c:?} is not a declared category")));
            }
        }
        if self.coordination_window.ms() < 0 {
            errors.push(err("orchestration.coordination_window".into(), "must not be negative".into()));
        }
        if self.campaign_window.ms() <= 0 {
            errors.push(err("orchestration.campaign_window".into(), "must be positive".into()));
        }
        if self.max_pending == 0 {
            errors.push(err("orchestration.max_pending".into(), "must be at least 1".into()));
        }
    }
}
