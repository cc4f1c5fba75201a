//! Campaigns as data: the `campaigns:` section of topology.yaml, and the JSON records of
//! the compacted `campaigns` topic (keyed by campaign id) that add, change, pause
//! (`enabled: false`) or delete (tombstone) campaigns at run time. A record on the
//! topic overrides the topology's campaign of the same id; its tombstone brings the
//! topology's back.

use crate::topology::{ConfigError, Duration, Topology};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignConfig {
    pub id: String,
    /// A message category of `orchestration.categories` (priority, consent, caps).
    pub category: String,
    /// Content item id (topology.yaml `content.items` or the `content` topic).
    pub content: String,
    /// Channels the orchestrator may choose from, in order of preference.
    pub channels: Vec<String>,
    /// Only members of this segment; everyone when left out.
    #[serde(default)]
    pub audience: Option<String>,
    pub trigger: Trigger,
    /// Template variables of every message (`vars.*`); an event trigger adds `event`.
    #[serde(default)]
    pub variables: Value,
    /// A paused campaign sends nothing and its schedule does not run.
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// RFC 3339: nothing is sent before / after.
    #[serde(default)]
    pub starts_at: Option<String>,
    #[serde(default)]
    pub ends_at: Option<String>,
}

fn enabled() -> bool {
    true
}

/// Exactly one of: an event (`event`, with an optional condition `if` over `event`),
/// segment entry (`segment_entry`), or a schedule (`schedule`, RFC 3339, repeated
/// `every` when given).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default, rename = "if")]
    pub condition: Option<String>,
    #[serde(default)]
    pub segment_entry: Option<String>,
    #[serde(default)]
    pub schedule: Option<String>,
    #[serde(default)]
    pub every: Option<Duration>,
}

/// Shortest repeat of a scheduled campaign.
const MIN_EVERY: Duration = Duration::minutes(1);

impl CampaignConfig {
    /// Parse a `campaigns` topic record and check it against the topology; every
    /// problem is reported, each with its field.
    pub fn from_record(key: &str, bytes: &[u8], topology: &Topology) -> Result<CampaignConfig, String> {
        let campaign: CampaignConfig = crate::json::parse_object(bytes)?;
        let mut errors = campaign.check(topology, "");
        if campaign.id != key {
            errors.push(ConfigError {
                path: "id".into(),
                message: format!("{:?} differs from the key {key:?}", campaign.id),
            });
        }
        if errors.is_empty() {
            Ok(campaign)
        } else {
            Err(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        }
    }

    /// When the schedule first fires (ms), for a scheduled campaign.
    pub fn schedule_at(&self) -> Option<i64> {
        self.trigger.schedule.as_deref().and_then(|s| parse_time(s).ok())
    }

    /// Whether the campaign may send at `now`.
    pub fn live(&self, now: i64) -> bool {
        let after = |t: &Option<String>| t.as_deref().and_then(|t| parse_time(t).ok());
        self.enabled && after(&self.starts_at).is_none_or(|s| now >= s) && after(&self.ends_at).is_none_or(|e| now < e)
    }

    /// Every problem with this campaign; `path` prefixes each field (`campaigns[2].`).
    pub fn check(&self, topology: &Topology, path: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut err =
            |field: &str, message: String| errors.push(ConfigError { path: format!("{path}{field}"), message });
        if !is_campaign_id(&self.id) {
            err("id", format!("{:?} is not a valid campaign id (lowercase letters, digits, _ - .)", self.id));
        }
        for (field, message) in topology.orchestration.check_send(&self.category, &self.channels) {
            err(field, message);
        }
        if self.content.trim().is_empty() {
            err("content", "must name a content item".into());
        }
        let segment_known = |s: &str| topology.segments.iter().any(|r| r.name == s);
        if let Some(a) = self.audience.as_deref().filter(|a| !segment_known(a)) {
            err("audience", format!("{a:?} is not a segment of this topology"));
        }
        if !matches!(self.variables, Value::Null | Value::Object(_)) {
            err("variables", "must be an object".into());
        }
        for (field, value) in [("starts_at", &self.starts_at), ("ends_at", &self.ends_at)] {
            if let Some(Err(e)) = value.as_deref().map(parse_time) {
                err(field, e);
            }
        }
        let t = &self.trigger;
        let kinds = [t.event.is_some(), t.segment_entry.is_some(), t.schedule.is_some()].iter().filter(|k| **k).count();
        if kinds != 1 {
            err("trigger", "needs exactly one of event, segment_entry, schedule".into());
        }
        if let Some(event) = t.event.as_deref().filter(|e| !topology.is_known_event_type(e)) {
            err("trigger.event", format!("{event:?} is not in event_types"));
        }
        if t.condition.is_some() && t.event.is_none() {
            err("trigger.if", "applies to an event trigger only".into());
        }
        if let Some(Err(e)) = t.condition.as_deref().map(crate::rules::check) {
            err("trigger.if", e);
        }
        if let Some(s) = t.segment_entry.as_deref().filter(|s| !segment_known(s)) {
            err("trigger.segment_entry", format!("{s:?} is not a segment of this topology"));
        }
        if let Some(Err(e)) = t.schedule.as_deref().map(parse_time) {
            err("trigger.schedule", e);
        }
        match t.every {
            Some(_) if t.schedule.is_none() => err("trigger.every", "repeats a schedule only".into()),
            Some(d) if d < MIN_EVERY => err("trigger.every", "must be at least 1m".into()),
            _ => {}
        }
        errors
    }
}

pub fn is_campaign_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'))
}

/// RFC 3339 → ms since the epoch.
pub fn parse_time(text: &str) -> Result<i64, String> {
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time such as 2026-12-01T09:00:00Z: {e}"))
}

/// The `campaigns:` section: every campaign checked, ids unique.
pub fn validate(campaigns: &[CampaignConfig], topology: &Topology, errors: &mut Vec<ConfigError>) {
    for (i, campaign) in campaigns.iter().enumerate() {
        let path = format!("campaigns[{i}].");
        errors.extend(campaign.check(topology, &path));
        if campaigns[..i].iter().any(|c| c.id == campaign.id) {
            errors.push(ConfigError {
                path: format!("{path}id"),
                message: format!("{:?} is declared twice", campaign.id),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        Topology::default()
    }

    fn parse(json: &str) -> Result<CampaignConfig, String> {
        let value: Value = serde_json::from_str(json).expect("test JSON");
        let key = value["id"].as_str().unwrap_or_default().to_owned();
        CampaignConfig::from_record(&key, json.as_bytes(), &topology())
    }

    #[test]
    fn a_campaign_of_each_trigger_parses() {
        let event = r#"{"id": "outdoor", "category": "promotional", "content": "cart_reminder", "channels": ["email"],
            "trigger": {"event": "product.viewed", "if": "event.payload.category == 'outdoor'"}}"#;
        let segment = r#"{"id": "vip", "category": "retention", "content": "cart_reminder", "channels": ["email", "push"],
            "audience": "high_value", "trigger": {"segment_entry": "high_value"}}"#;
        let schedule = r#"{"id": "weekly", "category": "promotional", "content": "cart_reminder", "channels": ["push"],
            "trigger": {"schedule": "2026-12-01T09:00:00Z", "every": "7d"}, "variables": {"discount": "5%"}}"#;
        for json in [event, segment, schedule] {
            let c = parse(json).expect(json);
            assert!(c.enabled);
        }
        assert_eq!(parse(schedule).expect("parses").schedule_at(), Some(1_796_115_600_000));
    }

    #[test]
    fn every_problem_is_named() {
        let bad = r#"{"id": "Bad Id", "category": "spam", "content": " ", "channels": ["fax"], "audience": "nobody",
            "trigger": {"event": "nope", "segment_entry": "nobody", "if": "(("}, "variables": [1],
            "starts_at": "tomorrow"}"#;
        let e = parse(bad).expect_err("refused");
        for field in [
            "id:",
            "category:",
            "content:",
            "channels:",
            "audience:",
            "variables:",
            "starts_at:",
            "trigger:",
            "trigger.event:",
            "trigger.if:",
            "trigger.segment_entry:",
        ] {
            assert!(e.contains(field), "{field} in {e}");
        }
    }

    #[test]
    fn the_key_must_be_the_id_and_unknown_fields_are_refused() {
        let json = r#"{"id": "a", "category": "promotional", "content": "x", "channels": ["email"], "trigger": {"event": "product.viewed"}}"#;
        let e = CampaignConfig::from_record("b", json.as_bytes(), &topology()).expect_err("key differs");
        assert!(e.contains("differs from the key"), "{e}");
        let extra = r#"{"id": "a", "category": "promotional", "content": "x", "channels": ["email"], "trigger": {"event": "product.viewed"}, "colour": 1}"#;
        let e = CampaignConfig::from_record("a", extra.as_bytes(), &topology()).expect_err("unknown field");
        assert!(e.contains("colour"), "{e}");
        assert!(CampaignConfig::from_record("a", b"not json", &topology()).is_err());
    }

    #[test]
    fn a_repeat_needs_a_schedule_of_at_least_a_minute() {
        let json = r#"{"id": "a", "category": "promotional", "content": "x", "channels": ["email"],
            "trigger": {"schedule": "2026-12-01T09:00:00Z", "every": "30s"}}"#;
        assert!(parse(json).expect_err("too often").contains("at least 1m"));
    }

    #[test]
    fn live_between_start_and_end_when_enabled() {
        let json = r#"{"id": "a", "category": "promotional", "content": "x", "channels": ["email"],
            "trigger": {"event": "product.viewed"}, "starts_at": "2026-12-01T00:00:00Z", "ends_at": "2026-12-02T00:00:00Z"}"#;
        let mut c = parse(json).expect("parses");
        let start = parse_time("2026-12-01T00:00:00Z").expect("time");
        assert!(!c.live(start - 1));
        assert!(c.live(start));
        assert!(!c.live(start + 86_400_000));
        c.enabled = false;
        assert!(!c.live(start));
    }
}
