//! The orchestrator's rules, in the order they apply to every request: consent,
//! suppressions, one message per campaign, quiet hours, the coordination window,
//! global frequency caps, then channel selection (preference, consent, reachability,
//! each channel's own cap, and content that renders for the channel). Pure: a function of the customer's record, the requests
//! and `now`, so every rule is tested without a broker.
//!
//! Requests are decided in batches. An arriving request of a capped category waits in
//! the customer's coordination window; when the window closes, everything in it is
//! decided together, highest priority first, so a transactional or retention message
//! takes the last slot of a cap before a promotion that arrived a few seconds earlier.
//! A request that arrives in quiet hours waits for their end and is then screened again
//! (consent may have been withdrawn meanwhile).

use super::quiet_hours::{quiet_until, zone_of};
use super::recipient::{rfc3339, Hold, Pending, Recipient, Sent, DAY_MS, WEEK_MS};
use crate::topology::{CapLimits, CategoryConfig, Topology};
use chorus_schemas::MessageRequest;
use serde_json::Value;

/// Why a request's content has nothing to send on a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ContentFailure {
    /// `unknown_content` or `content_error`.
    pub reason: &'static str,
    pub detail: String,
}

/// A request's content, as the orchestrator finds and renders it.
pub trait Render {
    /// Why the request's content cannot be sent on any channel (its item does not exist).
    fn missing(&self, request: &MessageRequest) -> Option<ContentFailure>;
    /// The content rendered for `channel`.
    fn render(&self, request: &MessageRequest, channel: &str) -> Result<Value, ContentFailure>;
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// `to` is the address the channel sends to (email, phone, push token), when the
    /// channel needs one.
    Send {
        channel: String,
        to: Option<String>,
        reasons: Vec<String>,
        /// The content rendered for the channel.
        content: Value,
    },
    /// Held back until `until`, then decided again.
    Hold {
        hold: Hold,
        until: i64,
        detail: String,
    },
    Refuse {
        reason: String,
        detail: String,
        channel: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub request: MessageRequest,
    pub customer_id: Option<String>,
    pub verdict: Verdict,
    /// Every coordination rule (quiet hours, caps, coordination window) applied to it.
    pub coordinated: bool,
}

/// A send of the batch being decided, for telling `lower_priority` from a plain cap.
struct BatchSend {
    priority: u32,
    channel: String,
    capped: bool,
}

/// Decide `items` at `now`, highest priority first (then arrival order). Sends are
/// recorded on `recipient` and holds join its waiting requests, so each decision sees
/// the ones before it. `render` renders a request's content for a channel.
pub fn decide(
    recipient: &mut Recipient,
    mut items: Vec<Pending>,
    now: i64,
    topology: &Topology,
    render: &dyn Render,
) -> Vec<Outcome> {
    let config = &topology.orchestration;
    let priority = |p: &Pending| config.categories.get(&p.request.category).map_or(u32::MAX, |c| c.priority);
    items.sort_by(|a, b| {
        priority(a)
            .cmp(&priority(b))
            .then(a.arrived.cmp(&b.arrived))
            .then_with(|| a.request.request_id.cmp(&b.request.request_id))
    });
    let mut batch: Vec<BatchSend> = Vec::new();
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        let category = config.categories.get(&item.request.category);
        let verdict = match category {
            None => Verdict::Refuse {
                reason: "unknown_category".into(),
                detail: format!("category {:?} is not declared", item.request.category),
                channel: None,
            },
            Some(category) => match render.missing(&item.request) {
                Some(failure) => Verdict::Refuse {
                    reason: failure.reason.into(),
                    detail: failure.detail,
                    channel: item.request.channels.first().cloned(),
                },
                None => decide_one(recipient, &item, category, now, topology, &batch, render),
            },
        };
        match &verdict {
            Verdict::Send { channel, .. } => {
                let capped = category.is_some_and(|c| c.capped);
                let sent = Sent {
                    at: now,
                    channel: channel.clone(),
                    category: item.request.category.clone(),
                    capped,
                    request_id: item.request.request_id.clone(),
                };
                recipient.record_send(sent, item.request.campaign_id.as_deref(), config.campaign_window.ms());
                batch.push(BatchSend { priority: priority(&item), channel: channel.clone(), capped });
            }
            Verdict::Hold { hold, until, .. } => {
                recipient.pending.push(Pending { due: *until, hold: Some(*hold), ..item.clone() });
            }
            Verdict::Refuse { .. } => {}
        }
        let coordinated = category.is_some_and(|c| c.capped && c.quiet_hours)
            && config.quiet_hours.is_some()
            && config.coordination_window.ms() > 0;
        outcomes.push(Outcome { request: item.request, customer_id: item.customer_id, verdict, coordinated });
    }
    outcomes
}

fn refuse(reason: &str, detail: impl Into<String>, channel: Option<&String>) -> Verdict {
    Verdict::Refuse { reason: reason.into(), detail: detail.into(), channel: channel.cloned() }
}

fn decide_one(
    recipient: &Recipient,
    item: &Pending,
    category: &CategoryConfig,
    now: i64,
    topology: &Topology,
    batch: &[BatchSend],
    render: &dyn Render,
) -> Verdict {
    let config = &topology.orchestration;
    let request = &item.request;
    let my_priority = category.priority;

    // 1. Consent: some requested channel must be allowed.
    let consented: Vec<&String> = request
        .channels
        .iter()
        .filter(|c| !category.needs_marketing_consent || recipient.granted(config.purpose_of(c), topology))
        .collect();
    let Some(first) = consented.first().copied() else {
        let refused: Vec<String> = request.channels.iter().map(|c| format!("{c} ({})", config.purpose_of(c))).collect();
        // Every channel refused by the customer's own withdrawal: opted out; otherwise
        // the customer never gave consent (marketing is opt-in).
        let opted_out = request.channels.iter().all(|c| recipient.withdrew(config.purpose_of(c)));
        return refuse(
            if opted_out { "opted_out" } else { "no_consent" },
            format!("no consent for any requested channel: {}", refused.join(", ")),
            request.channels.first(),
        );
    };

    // 2. Suppressions: what the customer just did.
    if let Some((reason, detail)) = recipient.activity.suppressed(&request.category, now, topology) {
        return refuse(&reason, detail, Some(first));
    }

    // 3. One message per campaign per customer, whatever the channel.
    if let Some(campaign) = &request.campaign_id {
        if let Some(at) = recipient.campaign_sent(campaign, now, config.campaign_window.ms()) {
            return refuse(
                "duplicate_campaign",
                format!("campaign {campaign} was sent at {}", rfc3339(at)),
                Some(first),
            );
        }
        let waiting = recipient
            .pending
            .iter()
            .find(|p| p.request.campaign_id.as_ref() == Some(campaign) && p.request.request_id != request.request_id);
        if let Some(other) = waiting {
            return refuse(
                "duplicate_campaign",
                format!("campaign {campaign} is already waiting as request {}", other.request.request_id),
                Some(first),
            );
        }
    }

    // 4. Quiet hours in the recipient's own time zone.
    if let Some(quiet) = config.quiet_hours.as_ref().filter(|_| category.quiet_hours) {
        let zone = zone_of(recipient.reach.timezone.as_deref(), quiet);
        if let Some(until) = quiet_until(now, &zone, quiet) {
            let zone_name = zone.iana_name().unwrap_or("UTC");
            let detail = format!("quiet hours {} in {zone_name}", quiet.hours);
            return hold(recipient, Hold::QuietHours, until, detail, topology);
        }
    }

    // 5. The coordination window: decided together with what else arrives in it.
    let window = config.coordination_window.ms();
    if category.capped && window > 0 && item.hold != Some(Hold::CoordinationWindow) {
        let until = recipient.open_window().unwrap_or(now.saturating_add(window));
        let detail = format!("coordination window of {} s", window / 1000);
        return hold(recipient, Hold::CoordinationWindow, until, detail, topology);
    }

    // 6. Global frequency caps over rolling windows.
    if category.capped {
        if let Some((reason, detail)) = cap_reached(recipient, &config.frequency_caps.global, None, now) {
            let taken = batch.iter().any(|b| b.capped && b.priority < my_priority);
            return if taken {
                refuse(
                    "lower_priority",
                    format!("{detail}; the last slot went to a higher-priority message"),
                    Some(first),
                )
            } else {
                refuse(reason, detail, Some(first))
            };
        }
    }

    // 7. Channel: preference first, then the requested order; each must have consent,
    //    reach the customer, be under its own cap and have content that renders for it.
    let preference = recipient.reach.preference().filter(|p| request.channels.iter().any(|c| c == p));
    let mut order: Vec<&String> = request.channels.iter().filter(|c| Some(c.as_str()) == preference).collect();
    order.extend(request.channels.iter().filter(|c| Some(c.as_str()) != preference));
    let mut skipped: Vec<String> = Vec::new();
    let (mut reachable, mut taken_by_batch, mut capped_out) = (false, false, false);
    let mut content_failure: Option<ContentFailure> = None;
    for channel in order {
        let purpose = config.purpose_of(channel);
        if category.needs_marketing_consent && !recipient.granted(purpose, topology) {
            skipped.push(format!("{channel}: no {purpose} consent"));
            continue;
        }
        let address = config.reachability.get(channel);
        if let Some(kind) = address.filter(|k| !recipient.reach.addresses.contains_key(*k)) {
            skipped.push(format!("{channel}: no {kind} on file"));
            continue;
        }
        reachable = true;
        let limits = config.frequency_caps.channels.get(channel).filter(|_| category.capped);
        if let Some((_, detail)) = limits.and_then(|l| cap_reached(recipient, l, Some(channel), now)) {
            taken_by_batch |= batch.iter().any(|b| b.capped && b.priority < my_priority && &b.channel == channel);
            capped_out = true;
            skipped.push(detail);
            continue;
        }
        let content = match render.render(request, channel) {
            Ok(content) => content,
            Err(failure) => {
                skipped.push(format!("{channel}: {}", failure.detail));
                content_failure.get_or_insert(failure);
                continue;
            }
        };
        let mut reasons = vec![if Some(channel.as_str()) == preference {
            format!("preferred channel: {channel}")
        } else {
            format!("requested channel: {channel}")
        }];
        reasons.push(if category.needs_marketing_consent {
            format!("consent {purpose} granted")
        } else {
            format!("category {} needs no marketing consent", request.category)
        });
        if let Some(kind) = address {
            reasons.push(format!("{kind} on file"));
        }
        if category.capped {
            reasons.push(cap_usage(recipient, &config.frequency_caps.global, None, now));
            if let Some(limits) = limits {
                reasons.push(cap_usage(recipient, limits, Some(channel), now));
            }
        }
        reasons.extend(skipped.into_iter().map(|s| format!("skipped {s}")));
        let to = address.and_then(|kind| recipient.reach.addresses.get(kind)).cloned();
        return Verdict::Send { channel: channel.clone(), to, reasons, content };
    }
    let detail = skipped.join("; ");
    if !reachable {
        refuse("unreachable", detail, Some(first))
    } else if taken_by_batch {
        refuse("lower_priority", format!("{detail}; the last slot went to a higher-priority message"), Some(first))
    } else if let Some(failure) = content_failure.filter(|_| !capped_out) {
        refuse(failure.reason, detail, Some(first))
    } else {
        refuse("channel_cap", detail, Some(first))
    }
}

fn hold(recipient: &Recipient, hold: Hold, until: i64, detail: String, topology: &Topology) -> Verdict {
    let max = topology.orchestration.max_pending;
    if recipient.pending.len() >= max {
        return refuse("too_many_pending", format!("{max} requests already wait for this customer"), None);
    }
    Verdict::Hold { hold, until, detail }
}

/// The limits of `limits` (day, week) with what `(now - window, now]` used.
fn usage<'a>(
    recipient: &'a Recipient,
    limits: &'a CapLimits,
    channel: Option<&'a str>,
    now: i64,
) -> impl Iterator<Item = (&'static str, u32, usize)> + 'a {
    [("day", limits.max_per_day, DAY_MS), ("week", limits.max_per_week, WEEK_MS)].into_iter().filter_map(
        move |(period, max, window)| max.map(|max| (period, max, recipient.sends_within(now, window, channel))),
    )
}

/// The first cap of `limits` already used up: (reason, detail).
fn cap_reached(
    recipient: &Recipient,
    limits: &CapLimits,
    channel: Option<&str>,
    now: i64,
) -> Option<(&'static str, String)> {
    usage(recipient, limits, channel, now).find(|(_, max, used)| *used >= *max as usize).map(|(period, max, used)| {
        match channel {
            None => (
                if period == "day" { "global_cap_day" } else { "global_cap_week" },
                format!("{used} of {max} messages per {period} already sent"),
            ),
            Some(channel) => ("channel_cap", format!("{channel}: {used} of {max} per {period} already sent")),
        }
    })
}

fn cap_usage(recipient: &Recipient, limits: &CapLimits, channel: Option<&str>, now: i64) -> String {
    let parts: Vec<String> = usage(recipient, limits, channel, now)
        .map(|(period, max, used)| format!("{used} of {max} per {period}"))
        .collect();
    format!("{} cap: {} used before this", channel.unwrap_or("global"), parts.join(", "))
}
