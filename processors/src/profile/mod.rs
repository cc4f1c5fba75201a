//! Profile: the Customer 360 aggregate, keyed by canonical id. Each resolved event
//! updates the profile as `profile.events` in topology.yaml declares: counters (count
//! and last time) in the behavioural, transactional or interaction section, totals,
//! latest values (payment method), purchases and refunds (lifetime value is net of
//! returns), campaign interactions; traits become attributes (last write by event time
//! wins, per attribute, with its source); every event joins the bounded recent
//! activity. Consent changes and precomputed recommendations land here too. When a
//! customer merges away, its profile travels to the survivor and folds in; every event
//! was counted once on exactly one side, so the fold is a sum and nothing is counted
//! twice. The stage also keeps per-category product popularity for recommendations.

mod activity;
pub mod config;

pub use activity::Activity;

use crate::orchestrator::PurposeState;
use crate::personalisation::{popularity_key, Personaliser, Popularity, Precomputed, CONSENT_PURPOSE};
use crate::processor::{to_json_bytes, Ctx, ProcessError, Processor, Record};
use crate::resolved::{absorbed, decode, forward_state_on_merge, incoming, Kind, MergeBody, Resolved, RESOLVED_TOPIC};
use crate::rules::Vars;
use crate::segments::Segments;
use crate::task::ProcessorSpec;
use crate::topology::Topology;
use chorus_schemas::ConsentChange;
use chorus_schemas::Event;
use config::{ProfileConfig, Section};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub const NAME: &str = "profile";
pub const STORE: &str = "profiles";
pub const TOPIC: &str = "profiles";

pub const SEGMENTS_TOPIC: &str = "segments";
/// Without this consent, behavioural events stay out of the profile's aggregates.
pub const ANALYTICS_PURPOSE: &str = "analytics";

pub const RECOMMENDATIONS_TOPIC: &str = "recommendations";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    // Validated with the topology; a rule that does not compile matches nobody.
    let segments = Arc::new(Segments::compile(&topology.segments).unwrap_or_else(|_| Segments::none()));
    let personaliser = Arc::new(Personaliser::compile(&topology.personalisation));
    let config = Arc::new(topology.profile.clone());
    let default_consent = topology.default_consent(CONSENT_PURPOSE);
    let default_analytics = topology.default_consent(ANALYTICS_PURPOSE);
    let privacy = topology.privacy.clone();
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into(), RECOMMENDATIONS_TOPIC.into()],
        stores: vec![STORE],
        outputs: vec![TOPIC.into(), SEGMENTS_TOPIC.into(), RESOLVED_TOPIC.into(), RECOMMENDATIONS_TOPIC.into()],
        forwards: vec![TOPIC.into(), SEGMENTS_TOPIC.into()],
        sub_topology: crate::subtopology::CUSTOMER,
        factory: Box::new(move || {
            Box::new(ProfileStage {
                segments: segments.clone(),
                personaliser: personaliser.clone(),
                config: config.clone(),
                default_consent,
                default_analytics,
                popularity: BTreeMap::new(),
                changed: BTreeMap::new(),
                erased: crate::privacy::Erased::new(&privacy, STORE),
            })
        }),
    }
}

pub struct ProfileStage {
    segments: Arc<Segments>,
    personaliser: Arc<Personaliser>,
    config: Arc<ProfileConfig>,
    /// `consent.defaults.personalisation`.
    default_consent: bool,
    /// `consent.defaults.analytics`.
    default_analytics: bool,
    /// Popularity tables of this task, written to the store on flush (dirty ones).
    popularity: BTreeMap<String, (Popularity, bool)>,
    /// Customers whose profile changed since the last commit, with how many of
    /// their interactions changed it: the `profiles` snapshot (and its personalisation)
    /// is built once per customer per commit.
    changed: BTreeMap<String, u32>,
    erased: crate::privacy::Erased,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    pub value: Value,
    pub at: i64,
    pub source: String,
}

impl Profile {
    /// Apply a rectification: each attribute takes its corrected value as of `at` (when
    /// the request was received), so it wins over older trait values and loses to newer
    /// ones, as any update does. How many were applied and superseded.
    pub fn rectify(&mut self, changes: &Map<String, Value>, at: i64, request_id: &str) -> (u64, u64) {
        let (mut applied, mut superseded) = (0, 0);
        for (name, value) in changes {
            let newer = self.attributes.get(name).is_some_and(|a| a.at > at);
            Attribute::update(&mut self.attributes, name, value.clone(), at, PRIVACY_SOURCE);
            if matches!(name.as_str(), "timezone" | "locale") {
                Attribute::update(&mut self.preferences.settings, name, value.clone(), at, PRIVACY_SOURCE);
            }
            if newer {
                superseded += 1
            } else {
                applied += 1
            }
            self.attribute_history.push(AttributeChange {
                name: name.clone(),
                at,
                source: PRIVACY_SOURCE.to_owned(),
                request_id: request_id.to_owned(),
                superseded: newer,
            });
        }
        let excess = self.attribute_history.len().saturating_sub(ATTRIBUTE_HISTORY_KEPT);
        self.attribute_history.drain(..excess);
        (applied, superseded)
    }
}

impl Attribute {
    /// Replace with `(value, at)` when it is at least as recent.
    fn update(slot: &mut BTreeMap<String, Attribute>, name: &str, value: Value, at: i64, source: &str) {
        if slot.get(name).is_none_or(|a| at >= a.at) {
            slot.insert(name.to_owned(), Attribute { value, at, source: source.to_owned() });
        }
    }

    fn fold(slot: &mut BTreeMap<String, Attribute>, other: &BTreeMap<String, Attribute>) {
        for (name, attr) in other {
            if slot.get(name).is_none_or(|a| attr.at > a.at) {
                slot.insert(name.clone(), attr.clone());
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileIdentity {
    pub emails: Vec<String>,
    pub phones: Vec<String>,
    pub linked_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub lifetime_value: f64,
    pub purchase_count: i64,
    pub average_order_value: f64,
    pub event_count: i64,
    #[serde(default)]
    pub gross_revenue: f64,
    #[serde(default)]
    pub returns_value: f64,
    /// Category of the latest purchase, by event time.
    #[serde(default)]
    pub last_purchase_category: Option<String>,
    #[serde(default)]
    pub last_purchase_at: i64,
}

/// How often and when something happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub count: i64,
    pub last_at: i64,
}

/// One section of the profile (behavioural, transactional, interaction).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SectionData {
    pub counts: BTreeMap<String, Tally>,
    pub totals: BTreeMap<String, f64>,
    pub latest: BTreeMap<String, Attribute>,
}

impl SectionData {
    fn fold(&mut self, other: &SectionData) {
        for (name, t) in &other.counts {
            let mine = self.counts.entry(name.clone()).or_default();
            mine.count += t.count;
            mine.last_at = mine.last_at.max(t.last_at);
        }
        for (name, v) in &other.totals {
            *self.totals.entry(name.clone()).or_default() += v;
        }
        Attribute::fold(&mut self.latest, &other.latest);
    }

    fn view(&self) -> Value {
        let mut out = Map::new();
        for (name, t) in &self.counts {
            out.insert(name.clone(), serde_json::json!({"count": t.count, "last_at": t.last_at}));
        }
        for (name, v) in &self.totals {
            out.insert(name.clone(), serde_json::json!(round2(*v)));
        }
        for (name, a) in &self.latest {
            out.insert(name.clone(), a.value.clone());
        }
        Value::Object(out)
    }
}

/// Channel and communication preferences, time zone, locale, consent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Preferences {
    /// `timezone` and `locale`, from traits or the event context, latest wins.
    pub settings: BTreeMap<String, Attribute>,
    /// Events per channel, for the most used channel.
    pub channel_counts: BTreeMap<String, i64>,
    /// Consent purpose → latest change.
    pub consent: BTreeMap<String, PurposeState>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub canonical_id: String,
    pub customer_id: Option<String>,
    pub identity: ProfileIdentity,
    pub attributes: BTreeMap<String, Attribute>,
    pub metrics: Metrics,
    pub event_counts: BTreeMap<String, i64>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub last_channel: Option<String>,
    #[serde(default)]
    pub last_channel_at: i64,
    #[serde(default)]
    pub behavioural: SectionData,
    #[serde(default)]
    pub transactional: SectionData,
    #[serde(default)]
    pub interaction: SectionData,
    #[serde(default)]
    pub preferences: Preferences,
    /// Shared, not copied, when the profile is: an activity never changes once kept.
    #[serde(default)]
    pub recent_activity: Vec<Arc<Activity>>,
    /// Campaign → last interaction.
    #[serde(default)]
    pub campaigns: BTreeMap<String, i64>,
    /// Purchased product → last purchase time (bounded).
    #[serde(default)]
    pub purchased: BTreeMap<String, i64>,
    #[serde(default)]
    pub recommendations: Option<Precomputed>,
    #[serde(default)]
    pub segments: Vec<String>,
    #[serde(default)]
    pub merged_from: Vec<String>,
    /// Corrections made by rectification requests, latest last: what changed and when,
    /// never the value it replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attribute_history: Vec<AttributeChange>,
    pub updated_at: i64,
}

/// An attribute corrected by a data subject's rectification request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttributeChange {
    pub name: String,
    pub at: i64,
    pub source: String,
    pub request_id: String,
    /// A newer value (from a later event) kept its place.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub superseded: bool,
}

/// Corrections kept per profile.
const ATTRIBUTE_HISTORY_KEPT: usize = 100;

/// The source of an attribute set by a rectification request.
pub const PRIVACY_SOURCE: &str = "privacy_request";

fn payload_value<'a>(payload: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(payload, |v, part| v.get(part)).filter(|v| !v.is_null())
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|x| x.is_finite())
}

impl Profile {
    pub fn new(canonical_id: &str) -> Profile {
        Profile { canonical_id: canonical_id.to_owned(), first_seen: i64::MAX, ..Profile::default() }
    }

    fn section_mut(&mut self, section: Section) -> &mut SectionData {
        match section {
            Section::Behavioural => &mut self.behavioural,
            Section::Transactional => &mut self.transactional,
            Section::Interaction => &mut self.interaction,
        }
    }

    /// Apply one event, as `config.events` declares for its type.
    pub fn apply(&mut self, event: &Event, customer_id: Option<&str>, config: &ProfileConfig) {
        let at = event.timestamp_ms;
        if self.customer_id.is_none() {
            self.customer_id = customer_id.map(str::to_owned);
        }
        *self.event_counts.entry(event.event_type.clone()).or_default() += 1;
        self.metrics.event_count += 1;
        self.first_seen = self.first_seen.min(at);
        self.last_seen = self.last_seen.max(at);
        if let Some(channel) = &event.channel {
            *self.preferences.channel_counts.entry(channel.clone()).or_default() += 1;
            if at >= self.last_channel_at {
                self.last_channel = Some(channel.clone());
                self.last_channel_at = at;
            }
        }
        if let Some(effect) = config.events.get(&event.event_type) {
            let payload = &event.payload;
            let source = event.event_type.clone();
            let section = self.section_mut(effect.section);
            let counter = effect.count.clone().unwrap_or_else(|| event.event_type.clone());
            let tally = section.counts.entry(counter).or_default();
            tally.count += 1;
            tally.last_at = tally.last_at.max(at);
            for (name, path) in &effect.sum {
                if let Some(x) = payload_value(payload, path).and_then(as_f64) {
                    *section.totals.entry(name.clone()).or_default() += x;
                }
            }
            for (name, path) in &effect.latest {
                if let Some(v) = payload_value(payload, path) {
                    Attribute::update(&mut section.latest, name, v.clone(), at, &source);
                }
            }
            if let Some(fields) = &effect.purchase {
                self.apply_purchase(payload, fields, at, config.purchased_items);
            }
            if let Some(path) = &effect.refund {
                self.metrics.returns_value += payload_value(payload, path).and_then(as_f64).unwrap_or(0.0);
            }
            if let Some(campaign) =
                effect.campaign.as_deref().and_then(|p| payload_value(payload, p)).and_then(Value::as_str)
            {
                let last = self.campaigns.entry(campaign.to_owned()).or_default();
                *last = (*last).max(at);
            }
        }
        for (kind, value) in &event.identifiers {
            self.identity.add(kind, value);
        }
        for kind in ["email", "phone"] {
            if let Some(v) = event.traits.get(kind).and_then(Value::as_str) {
                self.identity.add(kind, v);
            }
        }
        if let Some(c) = &event.customer_id {
            self.identity.add("customer_id", c);
        }
        if let Some(a) = &event.anonymous_id {
            self.identity.add("anonymous_id", a);
        }
        let source = event.channel.clone().unwrap_or_else(|| event.event_type.clone());
        for (name, value) in flatten_traits(&event.traits) {
            Attribute::update(&mut self.attributes, &name, value, at, &source);
        }
        for (name, from_context) in [("timezone", &event.context.timezone), ("locale", &event.context.locale)] {
            let from_traits = event.traits.get(name).filter(|v| v.is_string()).cloned();
            if let Some(value) = from_traits.or_else(|| from_context.clone().map(Value::String)) {
                Attribute::update(&mut self.preferences.settings, name, value, at, &source);
            }
        }
        self.recent_activity.push(Arc::new(Activity::new(
            &event.event_type,
            &event.event_id,
            at,
            event.channel.as_deref(),
            &event.payload,
        )));
        self.trim(config);
        self.derive();
    }

    fn apply_purchase(&mut self, payload: &Value, fields: &config::PurchaseFields, at: i64, keep: usize) {
        self.metrics.purchase_count += 1;
        self.metrics.gross_revenue += payload_value(payload, &fields.value).and_then(as_f64).unwrap_or(0.0);
        let items: &[Value] =
            payload_value(payload, &fields.items).and_then(Value::as_array).map_or(&[], Vec::as_slice);
        let category = payload_value(payload, &fields.category)
            .and_then(Value::as_str)
            .or_else(|| items.iter().find_map(|i| i.get("category").and_then(Value::as_str)));
        if let Some(category) = category {
            if at >= self.metrics.last_purchase_at {
                self.metrics.last_purchase_category = Some(category.to_owned());
                self.metrics.last_purchase_at = at;
            }
        }
        let products = items.iter().filter_map(|i| i.get("product_id").and_then(Value::as_str));
        for product in products.chain(payload.get("product_id").and_then(Value::as_str)) {
            let last = self.purchased.entry(product.to_owned()).or_default();
            *last = (*last).max(at);
        }
        self.trim_purchased(keep);
    }

    /// Keep the `keep` most recently purchased products.
    fn trim_purchased(&mut self, keep: usize) {
        while self.purchased.len() > keep {
            let Some(oldest) = self.purchased.iter().min_by_key(|(p, at)| (**at, (*p).clone())).map(|(p, _)| p.clone())
            else {
                break;
            };
            self.purchased.remove(&oldest);
        }
    }

    /// Keep the latest `recent_activity` events, oldest first.
    fn trim(&mut self, config: &ProfileConfig) {
        self.recent_activity.sort_by(|a, b| (a.at, &a.event_id).cmp(&(b.at, &b.event_id)));
        self.recent_activity.dedup_by(|a, b| a.event_id == b.event_id);
        let max = config.recent_activity;
        if self.recent_activity.len() > max {
            let excess = self.recent_activity.len() - max;
            self.recent_activity.drain(..excess);
        }
    }

    /// A consent change; the latest per purpose wins.
    pub fn apply_consent(&mut self, purpose: &str, granted: bool, at: i64, source: Option<String>) {
        if self.preferences.consent.get(purpose).is_none_or(|p| at >= p.at) {
            self.preferences.consent.insert(purpose.to_owned(), PurposeState { granted, at, source });
        }
    }

    /// Whether the customer's data may be used to personalise: their latest consent
    /// change, else the topology's default for the purpose.
    pub fn personalisation_allowed(&self, default: bool) -> bool {
        self.consented(CONSENT_PURPOSE, default)
    }

    /// The customer's latest consent to `purpose`, else `default`.
    pub fn consented(&self, purpose: &str, default: bool) -> bool {
        self.preferences.consent.get(purpose).map_or(default, |p| p.granted)
    }

    /// Fold another profile of the same customer into this one.
    pub fn absorb(&mut self, other: &Profile, config: &ProfileConfig) {
        if self.customer_id.is_none() {
            self.customer_id = other.customer_id.clone();
        }
        for (t, n) in &other.event_counts {
            *self.event_counts.entry(t.clone()).or_default() += n;
        }
        self.metrics.event_count += other.metrics.event_count;
        self.metrics.purchase_count += other.metrics.purchase_count;
        self.metrics.gross_revenue += other.metrics.gross_revenue;
        self.metrics.returns_value += other.metrics.returns_value;
        if other.metrics.last_purchase_category.is_some()
            && other.metrics.last_purchase_at > self.metrics.last_purchase_at
        {
            self.metrics.last_purchase_category = other.metrics.last_purchase_category.clone();
            self.metrics.last_purchase_at = other.metrics.last_purchase_at;
        }
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
        if other.last_channel.is_some() && other.last_channel_at > self.last_channel_at {
            self.last_channel = other.last_channel.clone();
            self.last_channel_at = other.last_channel_at;
        }
        Attribute::fold(&mut self.attributes, &other.attributes);
        self.behavioural.fold(&other.behavioural);
        self.transactional.fold(&other.transactional);
        self.interaction.fold(&other.interaction);
        Attribute::fold(&mut self.preferences.settings, &other.preferences.settings);
        for (channel, n) in &other.preferences.channel_counts {
            *self.preferences.channel_counts.entry(channel.clone()).or_default() += n;
        }
        for (purpose, state) in &other.preferences.consent {
            self.apply_consent(purpose, state.granted, state.at, state.source.clone());
        }
        self.recent_activity.extend(other.recent_activity.iter().cloned());
        for (campaign, at) in &other.campaigns {
            let last = self.campaigns.entry(campaign.clone()).or_default();
            *last = (*last).max(*at);
        }
        for (product, at) in &other.purchased {
            let last = self.purchased.entry(product.clone()).or_default();
            *last = (*last).max(*at);
        }
        self.trim_purchased(config.purchased_items);
        if self.recommendations.is_none() {
            self.recommendations = other.recommendations.clone();
        }
        for e in &other.identity.emails {
            self.identity.add("email", e);
        }
        for p in &other.identity.phones {
            self.identity.add("phone", p);
        }
        for l in &other.identity.linked_ids {
            if !self.identity.linked_ids.contains(l) {
                self.identity.linked_ids.push(l.clone());
            }
        }
        self.merged_from.push(other.canonical_id.clone());
        self.merged_from.extend(other.merged_from.iter().cloned());
        self.trim(config);
        self.derive();
    }

    fn derive(&mut self) {
        let m = &mut self.metrics;
        m.lifetime_value = round2(m.gross_revenue - m.returns_value);
        m.average_order_value =
            if m.purchase_count > 0 { round2(m.gross_revenue / m.purchase_count as f64) } else { 0.0 };
    }

    /// Churn risk at `now` from recency and frequency (see [`config::ChurnModel`]).
    pub fn churn_risk(&self, now: i64, config: &ProfileConfig) -> f64 {
        const DAY: f64 = 86_400_000.0;
        if self.first_seen == i64::MAX {
            return 0.0;
        }
        let days_inactive = ((now - self.last_seen).max(0) as f64) / DAY;
        let tenure_months = (((self.last_seen - self.first_seen).max(0) as f64) / (30.0 * DAY)).max(1.0);
        config.churn.score(days_inactive, self.metrics.purchase_count as f64 / tenure_months)
    }

    /// Campaigns interacted with within the window, most recent first.
    pub fn active_campaigns(&self, now: i64, config: &ProfileConfig) -> Vec<Value> {
        self.campaigns_in_window(now, config)
            .into_iter()
            .map(|(id, at)| serde_json::json!({"campaign_id": id, "last_interaction": at}))
            .collect()
    }

    /// (campaign, last interaction) within the window, most recent first.
    fn campaigns_in_window(&self, now: i64, config: &ProfileConfig) -> Vec<(&String, &i64)> {
        let window = config.campaign_window.ms();
        let mut active: Vec<(&String, &i64)> =
            self.campaigns.iter().filter(|(_, at)| at.saturating_add(window) > now).collect();
        active.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        active
    }

    /// The most used channel.
    pub fn preferred_channel(&self) -> Option<&String> {
        self.preferences.channel_counts.iter().max_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0))).map(|(c, _)| c)
    }

    /// What rules see as `customer`: the metrics at the top level
    /// (`customer.lifetime_value`, `customer.churn_risk`), the attributes as nested
    /// objects (`customer.location.state`), the sections
    /// (`customer.behavioural.product_views.count`), identity, counts and times.
    pub fn customer_view(&self, now: i64, config: &ProfileConfig) -> Value {
        let mut view = Map::new();
        for (name, attr) in &self.attributes {
            let parts: Vec<&str> = name.split('.').collect();
            insert_path(&mut view, &parts, attr.value.clone());
        }
        let m = &self.metrics;
        let churn = self.churn_risk(now, config);
        let campaigns: Vec<&String> = self.campaigns_in_window(now, config).into_iter().map(|(id, _)| id).collect();
        for (k, v) in [
            ("canonical_id", serde_json::json!(self.canonical_id)),
            ("customer_id", serde_json::json!(self.customer_id)),
            ("lifetime_value", serde_json::json!(m.lifetime_value)),
            ("purchase_count", serde_json::json!(m.purchase_count)),
            ("average_order_value", serde_json::json!(m.average_order_value)),
            ("event_count", serde_json::json!(m.event_count)),
            ("last_purchase_category", serde_json::json!(m.last_purchase_category)),
            ("churn_risk", serde_json::json!(churn)),
            ("churn_level", serde_json::json!(config.churn.level(churn))),
            ("behavioural", self.behavioural.view()),
            ("transactional", self.transactional.view()),
            ("interaction", self.interaction.view()),
            ("preferred_channel", serde_json::json!(self.preferred_channel())),
            ("active_campaigns", serde_json::json!(campaigns)),
            ("event_counts", serde_json::json!(self.event_counts)),
            ("emails", serde_json::json!(self.identity.emails)),
            ("phones", serde_json::json!(self.identity.phones)),
            ("first_seen", serde_json::json!(self.first_seen)),
            ("last_seen", serde_json::json!(self.last_seen)),
            ("last_channel", serde_json::json!(self.last_channel)),
            ("segments", serde_json::json!(self.segments)),
        ] {
            view.insert(k.to_owned(), v);
        }
        Value::Object(view)
    }

    /// The Customer 360 record published on `profiles` and served by the API, at `now`
    /// (churn risk and active campaigns depend on it).
    pub fn snapshot(&self, now: i64, config: &ProfileConfig) -> Value {
        serde_json::to_value(self.snapshot_view(now, config)).unwrap_or(Value::Null)
    }

    /// [`Profile::snapshot`] as a view borrowing from the profile: serialised as it is,
    /// without building (and dropping) a JSON tree of the whole document.
    pub fn snapshot_view<'a>(&'a self, now: i64, config: &'a ProfileConfig) -> Snapshot<'a> {
        let mut attributes = Map::new();
        for (name, attr) in &self.attributes {
            let parts: Vec<&str> = name.split('.').collect();
            insert_path(&mut attributes, &parts, attr.value.clone());
        }
        let churn = self.churn_risk(now, config);
        let setting = |name: &str| self.preferences.settings.get(name).map(|a| &a.value);
        Snapshot {
            canonical_id: &self.canonical_id,
            customer_id: self.customer_id.as_deref(),
            identity: SnapshotIdentity {
                email: self.identity.emails.first(),
                phone: self.identity.phones.first(),
                emails: &self.identity.emails,
                phones: &self.identity.phones,
                linked_ids: &self.identity.linked_ids,
            },
            preferences: SnapshotPreferences {
                communication: attributes.get("preferences").cloned(),
                timezone: setting("timezone"),
                locale: setting("locale"),
                preferred_channel: self.preferred_channel(),
                channel_counts: &self.preferences.channel_counts,
                consent: &self.preferences.consent,
            },
            attributes,
            attribute_sources: &self.attributes,
            metrics: SnapshotMetrics {
                lifetime_value: self.metrics.lifetime_value,
                purchase_count: self.metrics.purchase_count,
                average_order_value: self.metrics.average_order_value,
                gross_revenue: round2(self.metrics.gross_revenue),
                returns_value: round2(self.metrics.returns_value),
                event_count: self.metrics.event_count,
                last_purchase_category: self.metrics.last_purchase_category.as_deref(),
                churn_risk_score: churn,
                churn_risk: config.churn.level(churn),
            },
            behavioural: self.behavioural.view(),
            transactional: self.transactional.view(),
            interaction: self.interaction.view(),
            event_counts: &self.event_counts,
            first_seen: if self.first_seen == i64::MAX { 0 } else { self.first_seen },
            last_seen: self.last_seen,
            last_channel: self.last_channel.as_deref(),
            recent_activity: self.recent_activity.iter().rev().map(|a| &**a).collect(),
            segments: &self.segments,
            active_campaigns: self.active_campaigns(now, config),
            recommendations: self.recommendations.as_ref(),
            merged_from: &self.merged_from,
            updated_at: self.updated_at,
            personalisation: None,
        }
    }
}

/// The Customer 360 record as published (see [`Profile::snapshot_view`]).
#[derive(Serialize)]
pub struct Snapshot<'a> {
    canonical_id: &'a str,
    customer_id: Option<&'a str>,
    identity: SnapshotIdentity<'a>,
    attributes: Map<String, Value>,
    attribute_sources: &'a BTreeMap<String, Attribute>,
    metrics: SnapshotMetrics<'a>,
    behavioural: Value,
    transactional: Value,
    interaction: Value,
    preferences: SnapshotPreferences<'a>,
    event_counts: &'a BTreeMap<String, i64>,
    first_seen: i64,
    last_seen: i64,
    last_channel: Option<&'a str>,
    recent_activity: Vec<&'a Activity>,
    segments: &'a [String],
    active_campaigns: Vec<Value>,
    recommendations: Option<&'a Precomputed>,
    merged_from: &'a [String],
    updated_at: i64,
    /// Set by the profile stage when it publishes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub personalisation: Option<Value>,
}

#[derive(Serialize)]
struct SnapshotIdentity<'a> {
    email: Option<&'a String>,
    phone: Option<&'a String>,
    emails: &'a [String],
    phones: &'a [String],
    linked_ids: &'a [String],
}

#[derive(Serialize)]
struct SnapshotMetrics<'a> {
    lifetime_value: f64,
    purchase_count: i64,
    average_order_value: f64,
    gross_revenue: f64,
    returns_value: f64,
    event_count: i64,
    last_purchase_category: Option<&'a str>,
    churn_risk_score: f64,
    churn_risk: &'a str,
}

#[derive(Serialize)]
struct SnapshotPreferences<'a> {
    communication: Option<Value>,
    timezone: Option<&'a Value>,
    locale: Option<&'a Value>,
    preferred_channel: Option<&'a String>,
    channel_counts: &'a BTreeMap<String, i64>,
    consent: &'a BTreeMap<String, PurposeState>,
}

/// What content templates see as `customer`, from a Customer 360 snapshot as published
/// on `profiles`: the customer's attributes (traits such as `first_name`) at the top
/// level, then their metrics (`lifetime_value`, `last_purchase_category`, `churn_risk`,
/// …), ids, email and phone, segments, preferred channel, time zone and locale. What
/// moves with every event (`event_count`, the churn score) is left out: it says nothing
/// a message should, and without it most events leave the view unchanged.
pub fn template_view(snapshot: &Value) -> Value {
    match TemplateSource::deserialize(snapshot) {
        Ok(source) => source.view(),
        Err(_) => TemplateSource::default().view(),
    }
}

/// [`template_view`] of a published snapshot's bytes, reading only the parts templates
/// see (the recent activity, sections and attribute sources are skipped, not built).
pub fn template_view_of(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<TemplateSource>(bytes).map(TemplateSource::view)
}

/// What [`template_view`] reads of a snapshot.
#[derive(Default, Deserialize)]
#[serde(default)]
struct TemplateSource {
    attributes: Option<Map<String, Value>>,
    metrics: Option<Map<String, Value>>,
    canonical_id: Value,
    customer_id: Value,
    identity: Option<TemplateIdentity>,
    segments: Value,
    preferences: Option<TemplatePreferences>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct TemplateIdentity {
    email: Value,
    phone: Value,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct TemplatePreferences {
    preferred_channel: Value,
    timezone: Value,
    locale: Value,
}

impl TemplateSource {
    fn view(self) -> Value {
        let mut view = self.attributes.unwrap_or_default();
        if let Some(metrics) = self.metrics {
            let lasting =
                metrics.into_iter().filter(|(k, _)| !matches!(k.as_str(), "event_count" | "churn_risk_score"));
            view.extend(lasting);
        }
        let identity = self.identity.unwrap_or_default();
        let preferences = self.preferences.unwrap_or_default();
        for (name, value) in [
            ("canonical_id", self.canonical_id),
            ("customer_id", self.customer_id),
            ("email", identity.email),
            ("phone", identity.phone),
            ("segments", self.segments),
            ("preferred_channel", preferences.preferred_channel),
            ("timezone", preferences.timezone),
            ("locale", preferences.locale),
        ] {
            view.insert(name.to_owned(), value);
        }
        Value::Object(view)
    }
}

impl ProfileIdentity {
    fn add(&mut self, kind: &str, raw: &str) {
        let Some(value) = crate::identity::normalise(kind, raw) else { return };
        let list = match kind {
            "email" => Some(&mut self.emails),
            "phone" => Some(&mut self.phones),
            _ => None,
        };
        if let Some(list) = list {
            if !list.contains(&value) {
                list.push(value.clone());
            }
        }
        let label = format!("{kind}:{value}");
        if !self.linked_ids.contains(&label) {
            self.linked_ids.push(label);
        }
    }
}

/// Set `a.b.c` in a JSON object, creating (or replacing non-object) parents.
fn insert_path(map: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            map.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = map.entry((*first).to_owned()).or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Traits as attributes: nested objects one level deep become `address.city` style
/// names so each attribute has its own last-write time.
fn flatten_traits(traits: &Map<String, Value>) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (k, v) in traits {
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                for (ik, iv) in inner {
                    out.push((format!("{k}.{ik}"), iv.clone()));
                }
            }
            _ => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// A `segments` record: the customer entered or exited a segment.
fn emit_segment_change(
    ctx: &mut Ctx<'_>,
    canonical_id: &str,
    customer_id: Option<&str>,
    segment: &str,
    change: &'static str,
) -> Result<(), ProcessError> {
    ctx.count("segment_changes", change);
    let record = serde_json::json!({"canonical_id": canonical_id, "customer_id": customer_id,
        "segment": segment, "change": change, "at": ctx.now});
    ctx.emit_json(SEGMENTS_TOPIC, canonical_id, &record)
}

impl Processor for ProfileStage {
    fn flush(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        for (key, (table, dirty)) in self.popularity.iter_mut().filter(|(_, (_, dirty))| *dirty) {
            ctx.put_json(STORE, key, table)?;
            *dirty = false;
        }
        for (id, interactions) in std::mem::take(&mut self.changed) {
            let now = ctx.now;
            let Some(publication) = ctx.read_json(STORE, &id, |profile: &Profile| self.publication(profile, now))?
            else {
                continue;
            };
            let Publication { snapshot, outcome, customer_id, segments, changes } = publication?;
            for (segment, change) in &changes {
                emit_segment_change(ctx, &id, customer_id.as_deref(), segment, change)?;
            }
            if let Some(segments) = segments {
                ctx.update_json(STORE, &id, || Profile::new(&id), |profile: &mut Profile| profile.segments = segments)?;
            }
            // Coverage: did these interactions' customer get personalised content?
            for _ in 0..interactions {
                ctx.count("personalisation", outcome);
            }
            ctx.emit(TOPIC, id.as_bytes(), Some(snapshot), None);
        }
        Ok(())
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        if record.topic == RECOMMENDATIONS_TOPIC {
            return self.recommendations(ctx, record);
        }
        let Some(resolved) = incoming(ctx, record, NAME, STORE, &self.erased)? else { return Ok(()) };
        let id = resolved.canonical_id.clone();
        match resolved.kind {
            Kind::Privacy => self.on_privacy(ctx, &id, decode(&resolved.body)?),
            Kind::Event => {
                let mut event: Event = decode(&resolved.body)?;
                event.timestamp_ms = resolved.at;
                let behavioural =
                    self.config.events.get(&event.event_type).is_some_and(|e| e.section == Section::Behavioural);
                let analytics = ctx
                    .read_json(STORE, &id, |p: &Profile| p.consented(ANALYTICS_PURPOSE, self.default_analytics))?
                    .unwrap_or(self.default_analytics);
                if behavioural && !analytics {
                    // `analytics: false`: browsing is not aggregated (nor counted in
                    // popularity); orders, returns and interactions still are.
                    ctx.count("analytics_opt_out", event.event_type.clone());
                    return Ok(());
                }
                let config = self.config.clone();
                self.update(ctx, &id, true, |profile| profile.apply(&event, resolved.customer_id.as_deref(), &config))?;
                self.count_popularity(ctx, &event)?;
                ctx.mark_visible(resolved.at);
                Ok(())
            }
            Kind::Consent => {
                let change: ConsentChange = decode(&resolved.body)?;
                self.update(ctx, &id, false, |profile| {
                    profile.apply_consent(&change.purpose, change.granted, resolved.at, change.source)
                })
            }
            Kind::Recommendations => {
                let list = decode::<Option<Precomputed>>(&resolved.body)?;
                if list.is_none() && ctx.read_json(STORE, &id, |_: &Profile| ())?.is_none() {
                    // Clearing the list of an id never seen here: no empty profile for it.
                    return Ok(());
                }
                self.update(ctx, &id, false, |profile| profile.recommendations = list)
            }
            Kind::Merge => {
                let merge: MergeBody = decode(&resolved.body)?;
                // The merged-away id leaves the segments it was last published in (the
                // survivor enters them, if it qualifies, when the profile folds in);
                // else consumers of `segments` would count it a member forever.
                let gone = ctx.read_json(STORE, &merge.from, |gone: &Profile| {
                    (gone.customer_id.clone(), gone.segments.clone())
                })?;
                if let Some((customer_id, segments)) = gone {
                    for segment in &segments {
                        emit_segment_change(ctx, &merge.from, customer_id.as_deref(), segment, "exited")?;
                    }
                }
                forward_state_on_merge(ctx, NAME, STORE, &merge, Some(TOPIC))
            }
            Kind::Absorb => {
                let Some(other) = absorbed::<Profile>(&resolved.body, NAME)? else { return Ok(()) };
                let config = self.config.clone();
                self.update(ctx, &id, false, |profile| profile.absorb(&other, &config))
            }
            Kind::Request | Kind::Tick | Kind::Content | Kind::Campaign | Kind::PrivacyReport => Ok(()),
        }
    }

    fn init(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        self.erased.load(ctx)
    }

    fn on_expired(&mut self, _ctx: &mut Ctx<'_>, _store: &str, key: &[u8]) -> Result<(), ProcessError> {
        self.erased.forget_expired(key);
        Ok(())
    }
}

impl ProfileStage {
    /// A data subject request at `id`: the profile is exported, corrected or deleted
    /// (with its `profiles` record; the customer leaves its segments without a record
    /// naming them).
    fn on_privacy(&mut self, ctx: &mut Ctx<'_>, id: &str, order: crate::privacy::Order) -> Result<(), ProcessError> {
        let (mut report, state) = crate::privacy::stage_order(ctx, NAME, STORE, &mut self.erased, &order, id)?;
        match (order.kind, &order.changes) {
            (crate::privacy::RequestType::Erasure, _) => {
                self.changed.remove(id);
                ctx.emit_tombstone(TOPIC, id);
                report.tombstoned(TOPIC, 1);
                // A precomputed list is the customer's too (a job's, on a compacted
                // topic keyed by canonical id); the tombstone comes back here and is
                // dropped by the erasure marker.
                ctx.emit_tombstone(RECOMMENDATIONS_TOPIC, id);
                report.tombstoned(RECOMMENDATIONS_TOPIC, 1);
            }
            (crate::privacy::RequestType::Rectification, Some(changes)) if state.is_some() => {
                let at = order.received_at;
                let (applied, superseded) =
                    self.update(ctx, id, false, |profile| profile.rectify(changes, at, &order.request_id))?;
                report.stopped("attributes_rectified", applied);
                report.stopped("attributes_superseded", superseded);
            }
            (kind, _) if kind.exports() => report.export = state,
            _ => {}
        }
        report.send(ctx)
    }

    /// Change the customer's profile (a new one when there is none) in place; its
    /// segments, personalisation and snapshot are brought up to date once, when the task
    /// commits (see [`Processor::flush`]). `interaction`: an event of the customer's,
    /// counted for personalisation coverage.
    fn update<R>(
        &mut self,
        ctx: &mut Ctx<'_>,
        id: &str,
        interaction: bool,
        f: impl FnOnce(&mut Profile) -> R,
    ) -> Result<R, ProcessError> {
        let now = ctx.now;
        let result = ctx.update_json(
            STORE,
            id,
            || Profile::new(id),
            |profile: &mut Profile| {
                let result = f(profile);
                profile.updated_at = now;
                result
            },
        )?;
        *self.changed.entry(id.to_owned()).or_default() += u32::from(interaction);
        Ok(result)
    }

    /// A record of the compacted `recommendations` topic: the customer's precomputed
    /// list (a tombstone clears it). Sent through `events.resolved` so that a list
    /// addressed to a merged-away id reaches the survivor.
    fn recommendations(&self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let Some(key) = record.key.as_deref().map(String::from_utf8_lossy).filter(|k| !k.is_empty()) else {
            return Err(ProcessError::reject("missing_key", "a recommendations record needs the canonical id as key"));
        };
        let list = match record.value.as_deref() {
            None => None,
            Some(bytes) => {
                Some(Precomputed::parse(bytes).map_err(|e| ProcessError::reject("invalid_recommendations", e))?)
            }
        };
        let resolved = Resolved {
            kind: Kind::Recommendations,
            canonical_id: key.into_owned(),
            customer_id: None,
            at: ctx.now,
            body: serde_json::to_value(list).unwrap_or(Value::Null),
            stage: Some(NAME.to_owned()),
        };
        ctx.emit_json(RESOLVED_TOPIC, &resolved.canonical_id.clone(), &resolved)
    }

    /// Interest in the event's product, overall and in its category.
    fn count_popularity(&mut self, ctx: &mut Ctx<'_>, event: &Event) -> Result<(), ProcessError> {
        let config = &self.personaliser.config.recommendations;
        let Some(weight) = config.weights.get(&event.event_type).copied().filter(|w| *w > 0.0) else { return Ok(()) };
        let mut products: Vec<(String, Option<String>)> = Vec::new();
        if let Some(p) = event.payload_str("product_id") {
            products.push((p.to_owned(), event.payload_str("category").map(str::to_owned)));
        }
        for item in event.payload.get("items").and_then(Value::as_array).into_iter().flatten() {
            if let Some(p) = item.get("product_id").and_then(Value::as_str) {
                let category = item.get("category").and_then(Value::as_str).or(event.payload_str("category"));
                products.push((p.to_owned(), category.map(str::to_owned)));
            }
        }
        for (product, category) in products {
            for key in [popularity_key(None), popularity_key(category.as_deref())].into_iter().collect::<BTreeSet<_>>()
            {
                if !self.popularity.contains_key(&key) {
                    let stored = ctx.get_json::<Popularity>(STORE, &key)?.unwrap_or_default();
                    self.popularity.insert(key.clone(), (stored, false));
                }
                if let Some((table, dirty)) = self.popularity.get_mut(&key) {
                    table.add(&product, category.as_deref(), weight, event.timestamp_ms, config);
                    *dirty = true;
                }
            }
        }
        Ok(())
    }

    /// What a changed profile publishes at the commit: its segments now (the changes
    /// since it was last published), its `profiles` snapshot with its personalisation,
    /// and whether it is personalised. One customer view serves the segments and the
    /// personalisation rules.
    fn publication(&self, profile: &Profile, now: i64) -> Result<Publication, ProcessError> {
        let mut view = profile.customer_view(now, &self.config);
        let mut vars = Vars::new(&[("customer", &view), ("context", &Value::Null)]);
        let segments = self.segments.evaluate_vars(&vars);
        if segments != profile.segments {
            // Personalisation rules see the segments the customer is in now.
            view["segments"] = serde_json::json!(segments);
            vars = Vars::new(&[("customer", &view), ("context", &Value::Null)]);
        }
        let consent = profile.personalisation_allowed(self.default_consent);
        let personalised = self.personaliser.resolve_vars(&vars, &segments, consent);
        let outcome = if personalised.personalised || (consent && profile.recommendations.is_some()) {
            "personalised"
        } else {
            "generic"
        };
        let mut snapshot = profile.snapshot_view(now, &self.config);
        snapshot.segments = &segments;
        snapshot.personalisation = Some(serde_json::to_value(&personalised).unwrap_or(Value::Null));
        let snapshot = to_json_bytes(&snapshot, TOPIC)?;
        let changes: Vec<(String, &'static str)> = profile
            .segments
            .iter()
            .filter(|s| !segments.contains(s))
            .map(|s| (s.clone(), "exited"))
            .chain(segments.iter().filter(|s| !profile.segments.contains(s)).map(|s| (s.clone(), "entered")))
            .collect();
        let customer_id = profile.customer_id.clone();
        Ok(Publication { snapshot, outcome, customer_id, segments: (!changes.is_empty()).then_some(segments), changes })
    }
}

/// See [`ProfileStage::publication`].
struct Publication {
    snapshot: Vec<u8>,
    outcome: &'static str,
    customer_id: Option<String>,
    /// The segments now, when they changed.
    segments: Option<Vec<String>>,
    changes: Vec<(String, &'static str)>,
}

#[cfg(test)]
mod tests {
    use super::template_view;
    use serde_json::json;

    fn snapshot(event_count: u64, churn: f64) -> serde_json::Value {
        json!({"canonical_id": "c-1", "customer_id": "u1",
               "identity": {"email": "ann@example.com", "phone": null},
               "attributes": {"first_name": "Ann", "location": {"state": "QLD"}, "customer_id": "spoofed"},
               "metrics": {"lifetime_value": 120.0, "event_count": event_count, "churn_risk_score": churn, "churn_risk": "low"},
               "preferences": {"timezone": "Australia/Brisbane", "locale": "en-AU", "preferred_channel": "email"},
               "segments": ["queensland"]})
    }

    #[test]
    fn the_view_read_from_bytes_is_the_view_of_the_parsed_snapshot() {
        let snapshot = snapshot(3, 0.1);
        let bytes = serde_json::to_vec(&snapshot).unwrap();
        assert_eq!(super::template_view_of(&bytes).unwrap(), template_view(&snapshot));
        let sparse = json!({"canonical_id": "c-2", "recent_activity": [{"type": "x"}]});
        assert_eq!(super::template_view_of(&serde_json::to_vec(&sparse).unwrap()).unwrap(), template_view(&sparse));
        assert_eq!(template_view(&sparse)["email"], serde_json::Value::Null);
        assert!(super::template_view_of(b"{not json").is_err());
    }

    #[test]
    fn templates_see_traits_metrics_and_ids_with_the_ids_winning() {
        let view = template_view(&snapshot(3, 0.1));
        assert_eq!(view["first_name"], "Ann");
        assert_eq!(view["location"]["state"], "QLD");
        assert_eq!(view["lifetime_value"], 120.0);
        assert_eq!(view["churn_risk"], "low");
        assert_eq!(view["customer_id"], "u1", "a trait cannot pose as the customer id");
        assert_eq!(view["email"], "ann@example.com");
        assert_eq!(view["timezone"], "Australia/Brisbane");
        assert_eq!(view["segments"], json!(["queensland"]));
    }

    #[test]
    fn what_moves_with_every_event_leaves_the_view_unchanged() {
        assert_eq!(template_view(&snapshot(3, 0.1)), template_view(&snapshot(4, 0.12)));
        assert_ne!(template_view(&snapshot(3, 0.1)), template_view(&json!({"canonical_id": "c-1"})));
    }
}
