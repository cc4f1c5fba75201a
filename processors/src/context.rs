//! Context: what is happening with a customer right now, keyed by canonical id —
//! the current session, the cart, recent interactions across channels, and active
//! engagements (an open support case with its chat transcript, so a phone agent sees
//! the chat). Each part has its TTL from `topology.yaml`; expired parts vanish from
//! reads at once, and a durable timer rewrites (or tombstones) the `context` record when
//! they expire. On a merge the anonymous cart and session follow the customer.

use crate::privacy::{stage_order, Order};
use crate::processor::{to_json_bytes, Ctx, ProcessError, Processor, Record};
use crate::resolved::{absorbed, decode, incoming, on_merge, Kind, RESOLVED_TOPIC};
use crate::task::ProcessorSpec;
use crate::topology::{ContextConfig, Topology};
use chorus_schemas::Event;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

pub const NAME: &str = "context";
pub const STORE: &str = "context";
pub const TOPIC: &str = "context";

pub fn spec(topology: &Topology) -> ProcessorSpec {
    let config = topology.context.clone();
    let privacy = topology.privacy.clone();
    ProcessorSpec {
        name: NAME,
        inputs: vec![RESOLVED_TOPIC.into()],
        stores: vec![STORE],
        outputs: vec![TOPIC.into(), RESOLVED_TOPIC.into()],
        forwards: vec![TOPIC.into()],
        sub_topology: crate::subtopology::CUSTOMER,
        factory: Box::new(move || {
            Box::new(ContextStage {
                config: config.clone(),
                changed: Default::default(),
                erased: crate::privacy::Erased::new(&privacy, STORE),
            })
        }),
    }
}

pub struct ContextStage {
    config: ContextConfig,
    /// Customers whose context changed since the last commit: their `context` record
    /// goes out once, at the commit, however many events changed it.
    changed: std::collections::BTreeSet<String>,
    erased: crate::privacy::Erased,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    pub channel: Option<String>,
    pub device: Option<String>,
    pub started: i64,
    pub last_activity: i64,
    pub expires_at: i64,
    /// Categories viewed in this session, most recent first (recommendations boost them).
    #[serde(default)]
    pub categories: Vec<String>,
}

/// Units of one product a cart line holds at most: a larger `quantity` is taken as
/// this many (the arithmetic never overflows, whatever a producer sends).
pub const MAX_QUANTITY: i64 = 1_000_000;

/// Units an add or remove event moves: at least one, at most [`MAX_QUANTITY`].
fn line_quantity(quantity: Option<f64>) -> i64 {
    match quantity {
        Some(q) if q.is_finite() => (q as i64).clamp(1, MAX_QUANTITY),
        _ => 1,
    }
}

/// Cart value rounded to cents; a price so large that the total is not finite counts
/// as zero rather than writing a value JSON cannot hold.
fn cart_value(items: &BTreeMap<String, CartItem>) -> f64 {
    let total = (items.values().map(|i| i.price * i.quantity as f64).sum::<f64>() * 100.0).round() / 100.0;
    if total.is_finite() {
        total
    } else {
        0.0
    }
}

/// Open offers kept per customer.
const MAX_OFFERS: usize = 20;

/// Categories remembered per session.
const SESSION_CATEGORIES: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CartItem {
    pub product_id: String,
    pub category: Option<String>,
    pub price: f64,
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cart {
    pub items: BTreeMap<String, CartItem>,
    pub value: f64,
    pub channel: Option<String>,
    pub updated_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub event_type: String,
    pub channel: Option<String>,
    pub at: i64,
    pub details: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptLine {
    pub at: i64,
    pub channel: Option<String>,
    pub agent: Option<String>,
    pub text: Option<String>,
    pub duration_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SupportCase {
    pub case_id: String,
    pub subject: Option<String>,
    pub opened_at: i64,
    pub channel: Option<String>,
    pub transcript: Vec<TranscriptLine>,
}

/// An offer shown to the customer and not yet redeemed, dismissed or expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub offer_id: String,
    pub channel: Option<String>,
    pub presented_at: i64,
    pub expires_at: i64,
    pub details: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Engagements {
    pub support_case: Option<SupportCase>,
    #[serde(default)]
    pub offers: Vec<Offer>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomerContext {
    pub canonical_id: String,
    pub session: Option<Session>,
    pub cart: Option<Cart>,
    pub recent_interactions: Vec<Interaction>,
    pub engagements: Engagements,
    pub updated_at: i64,
    /// When the expiry timer is set for, so it can be moved.
    #[serde(default)]
    pub timer_at: Option<i64>,
}

impl CustomerContext {
    fn new(id: &str) -> Self {
        CustomerContext { canonical_id: id.to_owned(), ..Default::default() }
    }

    /// Drop what has expired at `now`. Returns whether anything changed.
    pub fn expire(&mut self, now: i64, config: &ContextConfig) -> bool {
        let before = (
            self.session.is_some(),
            self.cart.is_some(),
            self.recent_interactions.len(),
            self.engagements.offers.len(),
        );
        if self.session.as_ref().is_some_and(|s| s.expires_at <= now) {
            self.session = None;
        }
        if self.cart.as_ref().is_some_and(|c| c.expires_at <= now) {
            self.cart = None;
        }
        let ttl = config.recent_interactions.ttl.ms();
        self.recent_interactions.retain(|i| i.at.saturating_add(ttl) > now);
        self.engagements.offers.retain(|o| o.expires_at > now);
        before
            != (
                self.session.is_some(),
                self.cart.is_some(),
                self.recent_interactions.len(),
                self.engagements.offers.len(),
            )
    }

    pub fn is_empty(&self) -> bool {
        self.session.is_none()
            && self.cart.is_none()
            && self.recent_interactions.is_empty()
            && self.engagements.support_case.is_none()
            && self.engagements.offers.is_empty()
    }

    /// The earliest time something in here expires.
    fn next_expiry(&self, config: &ContextConfig) -> Option<i64> {
        let ttl = config.recent_interactions.ttl.ms();
        [
            self.session.as_ref().map(|s| s.expires_at),
            self.cart.as_ref().map(|c| c.expires_at),
            self.recent_interactions.iter().map(|i| i.at.saturating_add(ttl)).min(),
            self.engagements.offers.iter().map(|o| o.expires_at).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn apply(&mut self, event: &Event, now: i64, config: &ContextConfig) {
        let at = event.timestamp_ms;
        self.expire(now, config);
        // A late event from a session that has already timed out must not replace the
        // live session with an expired one.
        if at.saturating_add(config.session_timeout.ms()) > now {
            self.touch_session(event, config);
        }
        match event.event_type.as_str() {
            "cart.item_added" | "cart.item_removed" => self.update_cart(event, config),
            "order.completed" => self.cart = None,
            "support.case_opened" => {
                self.engagements.support_case = Some(SupportCase {
                    case_id: event.payload_str("case_id").unwrap_or(&event.event_id).to_owned(),
                    subject: event.payload_str("subject").map(str::to_owned),
                    opened_at: at,
                    channel: event.channel.clone(),
                    transcript: Vec::new(),
                })
            }
            "support.case_closed" => {
                let closes = match (&self.engagements.support_case, event.payload_str("case_id")) {
                    (Some(case), Some(id)) => case.case_id == id,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if closes {
                    self.engagements.support_case = None;
                }
            }
            "offer.presented" => {
                let offer_id = event.payload_str("offer_id").unwrap_or(&event.event_id).to_owned();
                let default_expiry = at.saturating_add(config.offer_ttl.ms());
                let expires_at = event
                    .payload_str("expires_at")
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .map_or(default_expiry, |t| t.as_millisecond().min(default_expiry));
                let offers = &mut self.engagements.offers;
                offers.retain(|o| o.offer_id != offer_id);
                offers.push(Offer {
                    offer_id,
                    channel: event.channel.clone(),
                    presented_at: at,
                    expires_at,
                    details: event.payload.clone(),
                });
                offers.sort_by_key(|o| o.presented_at);
                if offers.len() > MAX_OFFERS {
                    let excess = offers.len() - MAX_OFFERS;
                    offers.drain(..excess);
                }
            }
            "offer.redeemed" | "offer.dismissed" => {
                if let Some(id) = event.payload_str("offer_id") {
                    self.engagements.offers.retain(|o| o.offer_id != id);
                }
            }
            "chat.message" | "call.completed" => {
                if let Some(case) = self.engagements.support_case.as_mut() {
                    let same_case = event.payload_str("case_id").is_none_or(|id| id == case.case_id);
                    if same_case {
                        case.transcript.push(TranscriptLine {
                            at,
                            channel: event.channel.clone(),
                            agent: event.payload_str("agent").map(str::to_owned),
                            text: event.payload_str("text").map(str::to_owned),
                            duration_s: event.payload_f64("duration_s"),
                        });
                    }
                }
            }
            _ => {}
        }
        self.recent_interactions.push(Interaction {
            event_type: event.event_type.clone(),
            channel: event.channel.clone(),
            at,
            details: event.payload.clone(),
        });
        self.recent_interactions.sort_by_key(|i| i.at);
        let max = config.recent_interactions.max;
        if self.recent_interactions.len() > max {
            let excess = self.recent_interactions.len() - max;
            self.recent_interactions.drain(..excess);
        }
        // What a late event added may be expired already (a cart or interaction older
        // than its TTL); it is not published.
        self.expire(now, config);
    }

    fn touch_session(&mut self, event: &Event, config: &ContextConfig) {
        self.touch_session_times(event, config);
        let viewed = matches!(
            event.event_type.as_str(),
            "product.viewed" | "page.viewed" | "screen.viewed" | "content.viewed" | "cart.item_added"
        );
        if let (true, Some(category), Some(s)) = (viewed, event.payload_str("category"), self.session.as_mut()) {
            s.categories.retain(|c| c != category);
            s.categories.insert(0, category.to_owned());
            s.categories.truncate(SESSION_CATEGORIES);
        }
    }

    fn touch_session_times(&mut self, event: &Event, config: &ContextConfig) {
        let at = event.timestamp_ms;
        let timeout = config.session_timeout.ms();
        let continues = match (&self.session, &event.session_id) {
            (Some(s), Some(id)) => &s.id == id,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if continues {
            if let Some(s) = self.session.as_mut() {
                s.last_activity = s.last_activity.max(at);
                s.expires_at = s.last_activity.saturating_add(timeout);
                if event.channel.is_some() {
                    s.channel = event.channel.clone();
                }
                if event.context.device_type.is_some() {
                    s.device = event.context.device_type.clone();
                }
            }
        } else {
            self.session = Some(Session {
                id: event.session_id.clone().unwrap_or_else(|| format!("s_{}", event.event_id)),
                channel: event.channel.clone(),
                device: event.context.device_type.clone(),
                started: at,
                last_activity: at,
                expires_at: at.saturating_add(timeout),
                categories: Vec::new(),
            });
        }
    }

    fn update_cart(&mut self, event: &Event, config: &ContextConfig) {
        let at = event.timestamp_ms;
        let Some(product_id) = event.payload_str("product_id") else { return };
        let quantity = line_quantity(event.payload_f64("quantity"));
        let cart = self.cart.get_or_insert_with(|| Cart {
            items: BTreeMap::new(),
            value: 0.0,
            channel: None,
            updated_at: at,
            expires_at: at,
        });
        if event.event_type == "cart.item_added" {
            let item = cart.items.entry(product_id.to_owned()).or_insert_with(|| CartItem {
                product_id: product_id.to_owned(),
                category: event.payload_str("category").map(str::to_owned),
                price: event.payload_f64("price").unwrap_or(0.0),
                quantity: 0,
            });
            item.quantity = item.quantity.saturating_add(quantity).min(MAX_QUANTITY);
            if let Some(price) = event.payload_f64("price") {
                item.price = price;
            }
        } else if let Some(item) = cart.items.get_mut(product_id) {
            item.quantity = item.quantity.saturating_sub(quantity);
            if item.quantity <= 0 {
                cart.items.remove(product_id);
            }
        }
        cart.channel = event.channel.clone().or(cart.channel.take());
        cart.updated_at = cart.updated_at.max(at);
        cart.expires_at = cart.updated_at.saturating_add(config.cart_ttl.ms());
        cart.value = cart_value(&cart.items);
        if cart.items.is_empty() {
            self.cart = None;
        }
    }

    /// Fold the context of a merged-away id of the same customer into this one.
    pub fn absorb(&mut self, other: CustomerContext, config: &ContextConfig) {
        match (&self.session, other.session) {
            (Some(mine), Some(theirs)) if theirs.last_activity > mine.last_activity => self.session = Some(theirs),
            (None, theirs) => self.session = theirs,
            _ => {}
        }
        if let Some(theirs) = other.cart {
            match self.cart.as_mut() {
                None => self.cart = Some(theirs),
                Some(mine) => {
                    for (id, item) in theirs.items {
                        mine.items
                            .entry(id)
                            .and_modify(|i| i.quantity = i.quantity.saturating_add(item.quantity).min(MAX_QUANTITY))
                            .or_insert(item);
                    }
                    mine.updated_at = mine.updated_at.max(theirs.updated_at);
                    mine.expires_at = mine.updated_at.saturating_add(config.cart_ttl.ms());
                    mine.value = cart_value(&mine.items);
                }
            }
        }
        self.recent_interactions.extend(other.recent_interactions);
        self.recent_interactions.sort_by_key(|i| i.at);
        let max = config.recent_interactions.max;
        if self.recent_interactions.len() > max {
            let excess = self.recent_interactions.len() - max;
            self.recent_interactions.drain(..excess);
        }
        if self.engagements.support_case.is_none() {
            self.engagements.support_case = other.engagements.support_case;
        }
        for offer in other.engagements.offers {
            if !self.engagements.offers.iter().any(|o| o.offer_id == offer.offer_id) {
                self.engagements.offers.push(offer);
            }
        }
        self.engagements.offers.sort_by_key(|o| o.presented_at);
    }

    /// The record published on `context` and served by the API.
    pub fn snapshot(&self) -> Value {
        serde_json::to_value(self.snapshot_view()).unwrap_or(Value::Null)
    }

    /// [`CustomerContext::snapshot`] borrowing from the state, serialised as it is.
    pub fn snapshot_view(&self) -> ContextSnapshot<'_> {
        ContextSnapshot {
            canonical_id: &self.canonical_id,
            session: self.session.as_ref(),
            cart: self.cart.as_ref().map(|c| CartSnapshot {
                items: c.items.values().collect(),
                value: c.value,
                channel: c.channel.as_deref(),
                updated_at: c.updated_at,
                expires_at: c.expires_at,
            }),
            recent_interactions: &self.recent_interactions,
            engagements: &self.engagements,
            updated_at: self.updated_at,
        }
    }
}

/// The `context` record as published (see [`CustomerContext::snapshot_view`]).
#[derive(Serialize)]
pub struct ContextSnapshot<'a> {
    canonical_id: &'a str,
    session: Option<&'a Session>,
    cart: Option<CartSnapshot<'a>>,
    recent_interactions: &'a [Interaction],
    engagements: &'a Engagements,
    updated_at: i64,
}

#[derive(Serialize)]
struct CartSnapshot<'a> {
    items: Vec<&'a CartItem>,
    value: f64,
    channel: Option<&'a str>,
    updated_at: i64,
    expires_at: i64,
}

impl Processor for ContextStage {
    /// Publish each changed customer's context once per commit.
    fn flush(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        for id in std::mem::take(&mut self.changed) {
            let bytes = ctx.read_json(STORE, &id, |c: &CustomerContext| to_json_bytes(&c.snapshot_view(), TOPIC))?;
            if let Some(bytes) = bytes {
                ctx.emit(TOPIC, id.as_bytes(), Some(bytes?), None);
            }
        }
        Ok(())
    }

    fn process(&mut self, ctx: &mut Ctx<'_>, record: &Record) -> Result<(), ProcessError> {
        let Some(resolved) = incoming(ctx, record, NAME, STORE, &self.erased)? else { return Ok(()) };
        match resolved.kind {
            Kind::Event => {
                let mut event: Event = decode(&resolved.body)?;
                event.timestamp_ms = resolved.at;
                if event.event_type == "identify" {
                    return Ok(());
                }
                let id = &resolved.canonical_id;
                let mut context = self.load(ctx, id)?;
                context.apply(&event, ctx.now, &self.config);
                ctx.mark_visible(resolved.at);
                self.save(ctx, context)
            }
            Kind::Merge => on_merge(ctx, NAME, STORE, &resolved.body, Some(TOPIC)),
            Kind::Absorb => {
                let Some(other) = absorbed::<CustomerContext>(&resolved.body, NAME)? else { return Ok(()) };
                let mut context = self.load(ctx, &resolved.canonical_id)?;
                context.absorb(other, &self.config);
                context.expire(ctx.now, &self.config);
                self.save(ctx, context)
            }
            Kind::Privacy => {
                let order: Order = decode(&resolved.body)?;
                let target = &resolved.canonical_id;
                let (mut report, state) = stage_order(ctx, NAME, STORE, &mut self.erased, &order, target)?;
                if order.erases() {
                    self.changed.remove(target);
                    ctx.emit_tombstone(TOPIC, target);
                    report.tombstoned(TOPIC, 1);
                } else if order.kind.exports() {
                    report.export = state;
                }
                report.send(ctx)
            }
            Kind::Request
            | Kind::Consent
            | Kind::Tick
            | Kind::Recommendations
            | Kind::Content
            | Kind::Campaign
            | Kind::PrivacyReport => Ok(()),
        }
    }

    fn init(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        self.erased.load(ctx)
    }

    fn on_expired(&mut self, _ctx: &mut Ctx<'_>, _store: &str, key: &[u8]) -> Result<(), ProcessError> {
        self.erased.forget_expired(key);
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_>, key: &[u8], _payload: &[u8]) -> Result<(), ProcessError> {
        let id = String::from_utf8_lossy(key).into_owned();
        let Some(mut context) = ctx.get_json::<CustomerContext>(STORE, &id)? else { return Ok(()) };
        context.timer_at = None;
        if !context.expire(ctx.now, &self.config) {
            // Early: what it was set for has moved later since (a session that went on).
            // Set it for the expiry now due; nothing changed for readers.
            let next = context.next_expiry(&self.config);
            set_timer(ctx, &mut context, next)?;
            return ctx.put_json_owned(STORE, &id, context);
        }
        self.save(ctx, context)
    }
}

impl ContextStage {
    fn load(&self, ctx: &mut Ctx<'_>, id: &str) -> Result<CustomerContext, ProcessError> {
        Ok(ctx.get_json::<CustomerContext>(STORE, id)?.unwrap_or_else(|| CustomerContext::new(id)))
    }

    /// Persist, mark for publishing, and make sure the expiry timer fires no later than
    /// the next expiry. An emptied context is tombstoned at once (so it stays in order
    /// with what follows).
    ///
    /// A timer set no later than needed stays where it is: a session that every event
    /// extends would otherwise move its timer at every event (a tombstone and a new
    /// timer, two changelog records each); one that fires early is set again then.
    fn save(&mut self, ctx: &mut Ctx<'_>, mut context: CustomerContext) -> Result<(), ProcessError> {
        let id = context.canonical_id.clone();
        let next = if context.is_empty() { None } else { context.next_expiry(&self.config) };
        set_timer(ctx, &mut context, next)?;
        if context.is_empty() {
            self.changed.remove(&id);
            ctx.delete(STORE, &id)?;
            ctx.emit_tombstone(TOPIC, &id);
            return Ok(());
        }
        context.updated_at = ctx.now;
        ctx.put_json_owned(STORE, &id, context)?;
        self.changed.insert(id);
        Ok(())
    }
}

/// Make the context's expiry timer fire no later than `next` (none: no timer). A timer
/// already set no later than that stays.
fn set_timer(ctx: &mut Ctx<'_>, context: &mut CustomerContext, next: Option<i64>) -> Result<(), ProcessError> {
    let id = context.canonical_id.as_bytes();
    match (context.timer_at, next) {
        (Some(set), Some(next)) if set <= next => {}
        (set, next) => {
            if let Some(set) = set {
                ctx.cancel(set, id)?;
            }
            if let Some(at) = next {
                ctx.schedule(at, id, &[])?;
            }
            context.timer_at = next;
        }
    }
    Ok(())
}
