//! What the orchestrator knows of one customer, kept as one value per canonical id so
//! an identity merge moves all of it at once: consent with its history, the activity
//! suppressions watch, how the customer can be reached, what was sent (the rolling cap
//! windows and campaign re-eligibility), and the requests waiting for quiet hours or the
//! coordination window to end.

use crate::time::keep_latest;
pub use crate::time::rfc3339;
use crate::topology::{OrchestrationConfig, Topology};
use chorus_schemas::MessageRequest;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Consent history kept per customer.
const HISTORY_LIMIT: usize = 200;
/// The longest rolling cap window: sends older than this no longer count.
pub const WEEK_MS: i64 = 7 * DAY_MS;
pub const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurposeState {
    pub granted: bool,
    pub at: i64,
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentEntry {
    pub purpose: String,
    pub granted: bool,
    pub at: i64,
    pub source: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Recipient {
    pub purposes: BTreeMap<String, PurposeState>,
    pub history: Vec<ConsentEntry>,
    #[serde(default)]
    pub activity: Activity,
    #[serde(default)]
    pub reach: Reach,
    /// Sends of the last week, oldest first.
    #[serde(default)]
    pub sends: Vec<Sent>,
    /// Campaign → when it was last sent to the customer.
    #[serde(default)]
    pub campaigns: BTreeMap<String, i64>,
    /// Requests held back, in arrival order.
    #[serde(default)]
    pub pending: Vec<Pending>,
    /// Ids of the latest requests decided for the customer (most recent last): an
    /// erasure finds their entries in the `requests` dedupe store through it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<String>,
}

/// Request ids a recipient remembers for erasure; older ones expire from the dedupe
/// store by themselves.
const REQUESTS_KEPT: usize = 256;

impl Recipient {
    pub fn remember_request(&mut self, request_id: &str) {
        self.requests.push(request_id.to_owned());
        let excess = self.requests.len().saturating_sub(REQUESTS_KEPT);
        self.requests.drain(..excess);
    }
}

/// When the customer last did what suppressions watch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Activity {
    /// Event type → latest event time.
    pub last: BTreeMap<String, i64>,
}

/// How and when the customer can be reached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reach {
    /// Address kind (`email`, `phone`, `push_token`) → latest value.
    pub addresses: BTreeMap<String, String>,
    /// IANA time zone (`Australia/Brisbane`), latest seen.
    pub timezone: Option<String>,
    /// The channel the customer said they prefer (trait `preferred_channel`).
    pub preferred_channel: Option<String>,
    /// Channel → when the customer last engaged with a message on it.
    pub engaged: BTreeMap<String, i64>,
}

/// One message sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sent {
    pub at: i64,
    pub channel: String,
    pub category: String,
    /// Whether it counts toward frequency caps.
    pub capped: bool,
    pub request_id: String,
}

/// Why a request waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    QuietHours,
    CoordinationWindow,
}

impl Hold {
    pub fn reason(self) -> &'static str {
        match self {
            Hold::QuietHours => "quiet_hours",
            Hold::CoordinationWindow => "coordination_window",
        }
    }
}

/// A request waiting to be decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub request: MessageRequest,
    pub customer_id: Option<String>,
    pub arrived: i64,
    /// When it is decided again.
    pub due: i64,
    /// What it waits for; `None` for a request that has not been screened yet.
    pub hold: Option<Hold>,
}

impl Activity {
    pub fn record(&mut self, event_type: &str, at: i64) {
        keep_latest(&mut self.last, event_type.to_owned(), at);
    }

    fn absorb(&mut self, other: &Activity) {
        for (event_type, at) in &other.last {
            self.record(event_type, *at);
        }
    }

    /// The first suppression of `category` in force at `now`, with its detail.
    pub fn suppressed(&self, category: &str, now: i64, topology: &Topology) -> Option<(String, String)> {
        topology.orchestration.suppressions.iter().filter(|s| s.categories.iter().any(|c| c == category)).find_map(
            |s| match (&s.after, s.duration, &s.from, &s.until) {
                (Some(after), Some(d), _, _) => {
                    let at = *self.last.get(after)?;
                    (at <= now && now < at.saturating_add(d.ms())).then(|| {
                        (s.reason.clone(), format!("{after} at {}, within {} h", rfc3339(at), d.ms() / 3_600_000))
                    })
                }
                (_, _, Some(from), Some(until)) => {
                    let opened = *self.last.get(from)?;
                    let open = self.last.get(until).is_none_or(|closed| *closed < opened);
                    open.then(|| (s.reason.clone(), format!("{from} at {} and no {until} since", rfc3339(opened))))
                }
                _ => None,
            },
        )
    }
}

/// Event types that say the customer engaged with a message on a channel.
const ENGAGEMENTS: &[(&str, &str)] =
    &[("email.opened", "email"), ("email.clicked", "email"), ("push.opened", "push"), ("sms.clicked", "sms")];

impl Reach {
    /// Learn addresses, time zone and preferences from an event (or a request's
    /// identifiers); true when anything changed.
    pub fn learn(&mut self, event: &Value, at: i64, config: &OrchestrationConfig) -> bool {
        let mut changed = false;
        let traits = event.get("traits");
        for kind in config.reachability.values() {
            let value = [event.get("identifiers"), traits]
                .into_iter()
                .flatten()
                .find_map(|source| source.get(kind).and_then(Value::as_str))
                .map(str::trim)
                .filter(|v| !v.is_empty());
            if let Some(value) = value.filter(|v| self.addresses.get(kind).map(String::as_str) != Some(*v)) {
                self.addresses.insert(kind.clone(), value.to_owned());
                changed = true;
            }
        }
        let timezone = traits
            .and_then(|t| t.get("timezone"))
            .or_else(|| event.get("context").and_then(|c| c.get("timezone")))
            .and_then(Value::as_str)
            .filter(|tz| self.timezone.as_deref() != Some(*tz));
        if let Some(tz) = timezone.filter(|tz| jiff::tz::TimeZone::get(tz).is_ok()) {
            self.timezone = Some(tz.to_owned());
            changed = true;
        }
        let preferred = traits.and_then(|t| t.get("preferred_channel")).and_then(Value::as_str);
        if let Some(channel) = preferred.filter(|c| self.preferred_channel.as_deref() != Some(*c)) {
            if config.channels.iter().any(|c| c == channel) {
                self.preferred_channel = Some(channel.to_owned());
                changed = true;
            }
        }
        let event_type = event.get("event_type").and_then(Value::as_str).unwrap_or_default();
        if let Some((_, channel)) = ENGAGEMENTS.iter().find(|(t, _)| *t == event_type) {
            changed |= keep_latest(&mut self.engaged, (*channel).to_owned(), at);
        }
        changed
    }

    /// The channel to try first: the stated preference, else the channel the customer
    /// engaged with most recently.
    pub fn preference(&self) -> Option<&str> {
        self.preferred_channel.as_deref().or_else(|| {
            self.engaged.iter().max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0))).map(|(c, _)| c.as_str())
        })
    }

    fn absorb(&mut self, other: &Reach) {
        for (kind, value) in &other.addresses {
            self.addresses.entry(kind.clone()).or_insert_with(|| value.clone());
        }
        if self.timezone.is_none() {
            self.timezone = other.timezone.clone();
        }
        if self.preferred_channel.is_none() {
            self.preferred_channel = other.preferred_channel.clone();
        }
        for (channel, at) in &other.engaged {
            keep_latest(&mut self.engaged, channel.clone(), *at);
        }
    }
}

impl Recipient {
    /// Apply a consent change unless a later one for the purpose is already known.
    pub fn apply(&mut self, purpose: &str, granted: bool, at: i64, source: Option<String>) -> bool {
        if self.purposes.get(purpose).is_some_and(|p| p.at > at) {
            return false;
        }
        self.purposes.insert(purpose.to_owned(), PurposeState { granted, at, source: source.clone() });
        self.history.push(ConsentEntry { purpose: purpose.to_owned(), granted, at, source });
        self.history.sort_by_key(|h| h.at);
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
        true
    }

    pub fn granted(&self, purpose: &str, topology: &Topology) -> bool {
        match self.purposes.get(purpose) {
            Some(p) => p.granted,
            None => topology.consent.defaults.get(purpose).copied().unwrap_or(false),
        }
    }

    /// The customer withdrew `purpose` themselves (as opposed to never granting it).
    pub fn withdrew(&self, purpose: &str) -> bool {
        self.purposes.get(purpose).is_some_and(|p| !p.granted)
    }

    /// Record a send and forget what no window looks at any more.
    pub fn record_send(&mut self, sent: Sent, campaign: Option<&str>, campaign_window: i64) {
        let now = sent.at;
        if let Some(campaign) = campaign {
            self.campaigns.insert(campaign.to_owned(), now);
        }
        self.sends.push(sent);
        self.sends.sort_by_key(|s| s.at);
        self.forget_before(now, campaign_window);
    }

    fn forget_before(&mut self, now: i64, campaign_window: i64) {
        self.sends.retain(|s| s.at > now - WEEK_MS);
        self.campaigns.retain(|_, at| *at > now - campaign_window);
    }

    /// Capped sends in the rolling window `(now - window, now]`, on `channel` or on all.
    pub fn sends_within(&self, now: i64, window: i64, channel: Option<&str>) -> usize {
        self.sends
            .iter()
            .filter(|s| s.capped && s.at > now - window && s.at <= now)
            .filter(|s| channel.is_none_or(|c| s.channel == c))
            .count()
    }

    /// When `campaign` was last sent within the re-eligibility window.
    pub fn campaign_sent(&self, campaign: &str, now: i64, campaign_window: i64) -> Option<i64> {
        self.campaigns.get(campaign).copied().filter(|at| *at > now - campaign_window)
    }

    /// The end of the coordination window currently open, if any.
    pub fn open_window(&self) -> Option<i64> {
        self.pending.iter().filter(|p| p.hold == Some(Hold::CoordinationWindow)).map(|p| p.due).min()
    }

    /// When the next waiting request is due.
    pub fn next_due(&self) -> Option<i64> {
        self.pending.iter().map(|p| p.due).min()
    }

    /// Take the requests due at `now`.
    pub fn take_due(&mut self, now: i64) -> Vec<Pending> {
        let (due, waiting) = std::mem::take(&mut self.pending).into_iter().partition(|p| p.due <= now);
        self.pending = waiting;
        due
    }

    /// Merge another customer's record (an identity merge): per purpose the latest
    /// consent change wins, sends and waiting requests add up.
    pub fn absorb(&mut self, other: Recipient) {
        self.activity.absorb(&other.activity);
        self.reach.absorb(&other.reach);
        for h in other.history {
            self.apply(&h.purpose, h.granted, h.at, h.source);
        }
        for (purpose, state) in other.purposes {
            self.apply(&purpose, state.granted, state.at, state.source);
        }
        for sent in other.sends {
            if !self.sends.iter().any(|s| s.request_id == sent.request_id) {
                self.sends.push(sent);
            }
        }
        self.sends.sort_by_key(|s| s.at);
        for (campaign, at) in other.campaigns {
            keep_latest(&mut self.campaigns, campaign, at);
        }
        for request_id in &other.requests {
            self.remember_request(request_id);
        }
        for pending in other.pending {
            if !self.pending.iter().any(|p| p.request.request_id == pending.request.request_id) {
                self.pending.push(pending);
            }
        }
        self.pending.sort_by_key(|p| p.arrived);
    }
}
