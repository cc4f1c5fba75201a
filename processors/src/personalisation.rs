//! Personalisation (the seed's "Personalisation Architecture"): rule-based actions
//! (`if: customer.lifetime_value > 10000, then: show_premium_collection`), the next best
//! action (first rule that holds), segment content variants, and hybrid
//! recommendations — a precomputed per-customer list from the compacted
//! `recommendations` topic, adjusted in real time by context (purchased and in-cart
//! items dropped, categories viewed in the current session boosted) and filled from
//! per-category popularity counted in-stream. Without `personalisation` consent every
//! answer is the generic one, and says so.

use crate::rules::{RuleSet, Vars};
use crate::topology::{ConfigError, Duration};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const CONSENT_PURPOSE: &str = "personalisation";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PersonalisationConfig {
    /// Every rule that holds adds its action.
    pub rules: Vec<ActionRule>,
    /// The first rule that holds is the next best action.
    pub next_best_action: Vec<ActionRule>,
    /// Content per slot for customers in a segment; the first listed segment the
    /// customer is in wins, per slot.
    pub variants: Vec<Variant>,
    /// Content per slot when no variant applies (and without consent).
    pub default_content: BTreeMap<String, String>,
    pub recommendations: RecommendationConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRule {
    /// An expression over `customer` and `context`.
    #[serde(rename = "if")]
    pub condition: String,
    pub then: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub segment: String,
    pub content: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecommendationConfig {
    /// Items per answer.
    pub size: usize,
    /// Score factor for items of a category viewed in the current session.
    pub session_boost: f64,
    /// Popularity halves every `half_life` without new interest.
    pub half_life: Duration,
    /// Products kept per category (and overall) in the popularity tables.
    pub per_category: usize,
    /// Event type → popularity weight of the product it names.
    pub weights: BTreeMap<String, f64>,
}

impl Default for RecommendationConfig {
    fn default() -> Self {
        let weights = [("product.viewed", 1.0), ("cart.item_added", 3.0), ("order.completed", 5.0)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        RecommendationConfig { size: 10, session_boost: 1.5, half_life: Duration::days(7), per_category: 50, weights }
    }
}

fn rule(condition: &str, then: &str) -> ActionRule {
    ActionRule { condition: condition.to_owned(), then: then.to_owned() }
}

impl Default for PersonalisationConfig {
    fn default() -> Self {
        let slots = |content: &str, offers: &str, messaging: &str| {
            [("content", content), ("offers", offers), ("messaging", messaging)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        PersonalisationConfig {
            rules: vec![
                rule("customer.lifetime_value > 10000", "show_premium_collection"),
                rule("customer.last_purchase_category == \"outdoor\"", "show_outdoor_accessories"),
                rule("customer.location.state == \"QLD\"", "show_local_store_promotions"),
            ],
            next_best_action: vec![
                rule("context.engagements.support_case", "resolve_support_case"),
                rule("context.cart and context.cart.value > 0", "complete_purchase"),
                rule("customer.churn_risk >= 0.7 and customer.purchase_count > 0", "win_back_offer"),
                rule("customer.lifetime_value > 10000", "show_premium_collection"),
                rule("customer.purchase_count == 0", "first_purchase_offer"),
            ],
            variants: vec![Variant {
                segment: "high_value".into(),
                content: slots("premium_recommendations", "exclusive_early_access", "vip_tone"),
            }],
            default_content: slots("popular_products", "standard_offers", "standard_tone"),
            recommendations: RecommendationConfig::default(),
        }
    }
}

impl PersonalisationConfig {
    pub fn validate(&self, segments: &[String], errors: &mut Vec<ConfigError>) {
        let mut err = |path: String, message: String| errors.push(ConfigError { path, message });
        for (list, rules) in [("rules", &self.rules), ("next_best_action", &self.next_best_action)] {
            for (i, r) in rules.iter().enumerate() {
                if let Err(message) = crate::rules::check(&r.condition) {
                    err(format!("personalisation.{list}[{i}].if"), message);
                }
                if r.then.trim().is_empty() {
                    err(format!("personalisation.{list}[{i}].then"), "must name an action".into());
                }
            }
        }
        for (i, v) in self.variants.iter().enumerate() {
            if !segments.contains(&v.segment) {
                err(
                    format!("personalisation.variants[{i}].segment"),
                    format!("{:?} is not a declared segment", v.segment),
                );
            }
        }
        let r = &self.recommendations;
        if r.size == 0 || r.size > 500 {
            err("personalisation.recommendations.size".into(), "must be between 1 and 500".into());
        }
        if r.per_category == 0 || r.per_category > 1000 {
            err("personalisation.recommendations.per_category".into(), "must be between 1 and 1000".into());
        }
        if !(r.session_boost.is_finite() && r.session_boost > 0.0) {
            err("personalisation.recommendations.session_boost".into(), "must be a positive number".into());
        }
        if r.half_life.ms() <= 0 {
            err("personalisation.recommendations.half_life".into(), "must be positive".into());
        }
        for (event, w) in &r.weights {
            if !w.is_finite() || *w < 0.0 {
                err(format!("personalisation.recommendations.weights.{event}"), "must be a non-negative number".into());
            }
        }
    }
}

/// The personalisation rules of a topology, compiled once.
pub struct Personaliser {
    pub config: PersonalisationConfig,
    rules: RuleSet,
    next_best_action: RuleSet,
}

/// What one customer gets right now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Personalised {
    /// Whether anything was chosen for this customer (consent given and a rule,
    /// variant or precomputed recommendation applied).
    pub personalised: bool,
    /// Why the answer is generic, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub actions: Vec<String>,
    pub next_best_action: Option<String>,
    /// Slot → content id, with the segment that chose it (`default` otherwise).
    pub content: BTreeMap<String, Value>,
}

impl Personaliser {
    pub fn compile(config: &PersonalisationConfig) -> Personaliser {
        // Validated with the topology; a rule that does not compile never holds.
        let compile = |rules: &[ActionRule]| {
            RuleSet::compile(rules.iter().map(|r| r.condition.as_str())).unwrap_or_else(|_| RuleSet::empty())
        };
        Personaliser {
            rules: compile(&config.rules),
            next_best_action: compile(&config.next_best_action),
            config: config.clone(),
        }
    }

    /// Resolve rules and variants for a customer (`customer` is the profile's rule
    /// view, `context` the context snapshot or null when not at hand).
    pub fn resolve(&self, customer: &Value, context: &Value, segments: &[String], consent: bool) -> Personalised {
        self.resolve_vars(&Vars::new(&[("customer", customer), ("context", context)]), segments, consent)
    }

    /// [`Personaliser::resolve`] over variables converted once.
    pub fn resolve_vars(&self, vars: &Vars, segments: &[String], consent: bool) -> Personalised {
        let default_content = || {
            self.config.default_content.iter().map(|(slot, id)| (slot.clone(), json!({"id": id, "source": "default"})))
        };
        if !consent {
            return Personalised {
                personalised: false,
                reason: Some("no_personalisation_consent"),
                actions: Vec::new(),
                next_best_action: None,
                content: default_content().collect(),
            };
        }
        let actions: Vec<String> = self
            .rules
            .matching_vars(vars)
            .into_iter()
            .filter_map(|i| self.config.rules.get(i).map(|r| r.then.clone()))
            .fold(Vec::new(), |mut acc, a| {
                if !acc.contains(&a) {
                    acc.push(a);
                }
                acc
            });
        let next_best_action = self
            .next_best_action
            .matching_vars(vars)
            .first()
            .and_then(|i| self.config.next_best_action.get(*i))
            .map(|r| r.then.clone());
        let mut content: BTreeMap<String, Value> = BTreeMap::new();
        for v in self.config.variants.iter().filter(|v| segments.contains(&v.segment)) {
            for (slot, id) in &v.content {
                content.entry(slot.clone()).or_insert_with(|| json!({"id": id, "source": v.segment}));
            }
        }
        let by_segment = !content.is_empty();
        for (slot, value) in default_content() {
            content.entry(slot).or_insert(value);
        }
        let personalised = by_segment || !actions.is_empty();
        Personalised {
            personalised,
            reason: (!personalised).then_some("no_rule_or_variant_applies"),
            actions,
            next_best_action,
            content,
        }
    }
}

/// One precomputed recommendation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecItem {
    pub product_id: String,
    #[serde(default)]
    pub score: f64,
    #[serde(default)]
    pub category: Option<String>,
}

/// A record of the `recommendations` topic (keyed by canonical id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Precomputed {
    /// The customer it is for (the record key is authoritative).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canonical_id: Option<String>,
    pub items: Vec<RecItem>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub generated_at: Option<String>,
}

impl Precomputed {
    pub fn parse(bytes: &[u8]) -> Result<Precomputed, String> {
        let p: Precomputed = serde_json::from_slice(bytes).map_err(|e| format!("not a recommendations record: {e}"))?;
        if p.items.len() > 1000 {
            return Err(format!("{} items; at most 1000 per customer", p.items.len()));
        }
        if let Some(bad) = p.items.iter().find(|i| i.product_id.is_empty() || !i.score.is_finite()) {
            return Err(format!("item {:?} needs a product_id and a finite score", bad.product_id));
        }
        Ok(p)
    }
}

/// Interest in products, decayed over time, for one category (or all). Scores are
/// kept as of one reference time, `base`: an item's score at time `t` is
/// `score × 2^-((t - base) / half_life)`. Every score decays at the same rate, so the
/// order never changes with time: adding is O(1) and the weakest item is found without
/// decaying anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Popularity {
    pub base: i64,
    /// product → (score at `base`, category).
    pub items: BTreeMap<String, (f64, Option<String>)>,
}

/// How much a score grows from `from` to `to` when expressed at the later time base
/// (2^((to - from) / half_life)).
fn growth(from: i64, to: i64, half_life: Duration) -> f64 {
    2f64.powf((to - from) as f64 / half_life.ms().max(1) as f64)
}

/// Rebase once scores have grown by 2^64, far from f64's limits.
const MAX_GROWTH_HALF_LIVES: f64 = 64.0;

impl Popularity {
    /// Add interest in a product at `at`, keeping the `per_category` most popular.
    pub fn add(&mut self, product: &str, category: Option<&str>, weight: f64, at: i64, config: &RecommendationConfig) {
        if self.items.is_empty() {
            self.base = at;
        }
        let half_lives = (at - self.base) as f64 / config.half_life.ms().max(1) as f64;
        if half_lives > MAX_GROWTH_HALF_LIVES {
            self.rebase(at, config);
        }
        let entry = self.items.entry(product.to_owned()).or_insert((0.0, None));
        entry.0 += weight * growth(self.base, at, config.half_life);
        if let Some(c) = category {
            entry.1 = Some(c.to_owned());
        }
        if self.items.len() > config.per_category {
            let weakest = self
                .items
                .iter()
                .min_by(|a, b| a.1 .0.total_cmp(&b.1 .0).then_with(|| b.0.cmp(a.0)))
                .map(|(p, _)| p.clone());
            if let Some(weakest) = weakest {
                self.items.remove(&weakest);
            }
        }
    }

    /// Express every score at `base` instead.
    fn rebase(&mut self, base: i64, config: &RecommendationConfig) {
        let factor = growth(base, self.base, config.half_life);
        for (score, _) in self.items.values_mut() {
            *score *= factor;
        }
        self.base = base;
    }

    /// Add another partition's table.
    pub fn merge(&mut self, other: &Popularity, config: &RecommendationConfig) {
        if self.items.is_empty() {
            self.base = other.base;
        }
        let factor = growth(self.base, other.base, config.half_life);
        for (product, (score, category)) in &other.items {
            let entry = self.items.entry(product.clone()).or_insert((0.0, None));
            entry.0 += score * factor;
            if entry.1.is_none() {
                entry.1 = category.clone();
            }
        }
    }

    /// Products by score at `now`, best first (ties by product id).
    pub fn ranked(&self, now: i64, config: &RecommendationConfig) -> Vec<(String, f64, Option<String>)> {
        let factor = growth(now, self.base, config.half_life);
        let mut out: Vec<(String, f64, Option<String>)> =
            self.items.iter().map(|(p, (s, c))| (p.clone(), s * factor, c.clone())).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }
}

/// What recommendations are adjusted with.
pub struct RecommendationInputs<'a> {
    pub precomputed: Option<&'a Precomputed>,
    pub consent: bool,
    pub purchased: &'a BTreeSet<String>,
    pub in_cart: &'a BTreeSet<String>,
    /// Categories viewed in the current session, most recent first.
    pub session_categories: &'a [String],
    /// Categories to fill from after the session's (last purchase category ...).
    pub fallback_categories: &'a [String],
    pub now: i64,
}

/// The popularity table key of a category, or of every product.
pub fn popularity_key(category: Option<&str>) -> String {
    format!("pop:{}", category.unwrap_or("*"))
}

/// The hybrid list: precomputed items adjusted by context, filled from popularity.
/// `popular(category)` gives the popularity table of a category (`None` = overall).
pub fn recommend(
    config: &RecommendationConfig,
    inputs: &RecommendationInputs<'_>,
    popular: impl Fn(Option<&str>) -> Option<Popularity>,
) -> Value {
    let mut list = Picks { items: Vec::new(), seen: BTreeSet::new(), size: config.size };
    // Without consent the customer's purchases and cart are not used either: the list
    // is the same for everyone.
    let excluded = |p: &str| inputs.consent && (inputs.purchased.contains(p) || inputs.in_cart.contains(p));
    let fill = |list: &mut Picks, category: Option<&str>| {
        let Some(table) = popular(category) else { return };
        let reason = category.map_or_else(|| "popular overall".to_owned(), |c| format!("popular in {c}"));
        for (product, score, cat) in table.ranked(inputs.now, config) {
            if !excluded(&product) {
                list.push(product, cat, score, "popular", &reason);
            }
        }
    };
    if !inputs.consent {
        fill(&mut list, None);
        return json!({"personalised": false, "reason": "no_personalisation_consent", "items": list.items});
    }
    let mut base: Vec<(RecItem, f64, bool)> = inputs
        .precomputed
        .map(|p| p.items.iter().filter(|i| !excluded(&i.product_id)).cloned().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|item| {
            let boosted = item.category.as_ref().is_some_and(|c| inputs.session_categories.contains(c));
            let score = if boosted { item.score * config.session_boost } else { item.score };
            (item, score, boosted)
        })
        .collect();
    base.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.product_id.cmp(&b.0.product_id)));
    for (item, score, boosted) in base {
        let reason = if boosted { "precomputed, boosted: category viewed this session" } else { "precomputed" };
        list.push(item.product_id, item.category, score, "precomputed", reason);
    }
    for c in inputs.session_categories.iter().chain(inputs.fallback_categories) {
        fill(&mut list, Some(c));
    }
    fill(&mut list, None);
    let personalised = inputs.precomputed.is_some() || !inputs.session_categories.is_empty();
    let mut answer = json!({
        "personalised": personalised,
        "model": inputs.precomputed.and_then(|p| p.model.clone()),
        "generated_at": inputs.precomputed.and_then(|p| p.generated_at.clone()),
        "items": list.items,
    });
    if !personalised {
        answer["reason"] = json!("no_precomputed_list_or_session");
    }
    answer
}

/// A recommendation list being filled: each product once, at most `size`.
struct Picks {
    items: Vec<Value>,
    seen: BTreeSet<String>,
    size: usize,
}

impl Picks {
    fn push(&mut self, product: String, category: Option<String>, score: f64, source: &str, reason: &str) {
        if self.items.len() < self.size && self.seen.insert(product.clone()) {
            self.items.push(json!({"product_id": product, "category": category, "score": round3(score),
                "source": source, "reason": reason}));
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn personaliser() -> Personaliser {
        Personaliser::compile(&PersonalisationConfig {
            rules: vec![
                rule("customer.lifetime_value > 1000", "show_premium"),
                rule("customer.location.state == \"QLD\"", "show_local"),
                rule("customer.lifetime_value > 500", "show_premium"),
            ],
            next_best_action: vec![
                rule("context.cart and context.cart.value > 0", "complete_purchase"),
                rule("customer.lifetime_value > 1000", "upsell"),
                rule("customer.purchase_count == 0", "first_purchase_offer"),
                rule("true", "browse"),
            ],
            variants: vec![
                Variant { segment: "vip".into(), content: slots(&[("content", "vip_picks")]) },
                Variant {
                    segment: "outdoor".into(),
                    content: slots(&[("content", "outdoor_picks"), ("offers", "gear_discount")]),
                },
            ],
            default_content: slots(&[("content", "popular"), ("offers", "standard"), ("messaging", "standard_tone")]),
            recommendations: RecommendationConfig::default(),
        })
    }

    fn segments(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn content(p: &Personalised) -> Vec<(String, String, String)> {
        p.content
            .iter()
            .map(|(slot, v)| {
                (slot.clone(), v["id"].as_str().unwrap().to_owned(), v["source"].as_str().unwrap().to_owned())
            })
            .collect()
    }

    fn row(slot: &str, id: &str, source: &str) -> (String, String, String) {
        (slot.to_owned(), id.to_owned(), source.to_owned())
    }

    #[test]
    fn every_rule_that_holds_adds_its_action_once() {
        let customer = json!({"lifetime_value": 2000.0, "purchase_count": 3, "location": {"state": "QLD"}});
        let p = personaliser().resolve(&customer, &Value::Null, &[], true);
        assert!(p.personalised);
        assert_eq!(p.reason, None);
        assert_eq!(p.actions, ["show_premium", "show_local"]);
        assert_eq!(p.next_best_action.as_deref(), Some("upsell"));
    }

    #[test]
    fn without_consent_the_answer_is_generic_and_says_so() {
        let customer = json!({"lifetime_value": 2000.0, "purchase_count": 3, "location": {"state": "QLD"}});
        let p = personaliser().resolve(&customer, &json!({"cart": {"value": 10.0}}), &segments(&["vip"]), false);
        assert!(!p.personalised);
        assert_eq!(p.reason, Some("no_personalisation_consent"));
        assert!(p.actions.is_empty());
        assert_eq!(p.next_best_action, None);
        assert_eq!(
            content(&p),
            [
                row("content", "popular", "default"),
                row("messaging", "standard_tone", "default"),
                row("offers", "standard", "default")
            ]
        );
    }

    #[test]
    fn variants_follow_the_configured_segment_order_per_slot_with_default_fallback() {
        let customer = json!({"lifetime_value": 10.0, "purchase_count": 1});
        let personaliser = personaliser();
        // The customer's own segment order does not matter: `vip` is listed first.
        let p = personaliser.resolve(&customer, &Value::Null, &segments(&["outdoor", "vip"]), true);
        assert_eq!(
            content(&p),
            [
                row("content", "vip_picks", "vip"),
                row("messaging", "standard_tone", "default"),
                row("offers", "gear_discount", "outdoor")
            ]
        );
        assert!(p.personalised, "a variant applies");
        let p = personaliser.resolve(&customer, &Value::Null, &segments(&["outdoor"]), true);
        assert_eq!(p.content["content"], json!({"id": "outdoor_picks", "source": "outdoor"}));
        let p = personaliser.resolve(&customer, &Value::Null, &segments(&["unlisted"]), true);
        assert!(content(&p).iter().all(|(_, _, source)| source == "default"));
        assert!(!p.personalised);
        assert_eq!(p.reason, Some("no_rule_or_variant_applies"));
    }

    #[test]
    fn next_best_action_is_the_first_rule_that_holds() {
        let personaliser = personaliser();
        let nba =
            |customer: Value, context: Value| personaliser.resolve(&customer, &context, &[], true).next_best_action;
        let rich = json!({"lifetime_value": 5000.0, "purchase_count": 4});
        assert_eq!(nba(rich.clone(), json!({"cart": {"value": 25.0}})).as_deref(), Some("complete_purchase"));
        assert_eq!(nba(rich.clone(), json!({"cart": {"value": 0}})).as_deref(), Some("upsell"));
        assert_eq!(nba(rich, Value::Null).as_deref(), Some("upsell"));
        assert_eq!(
            nba(json!({"lifetime_value": 0, "purchase_count": 0}), Value::Null).as_deref(),
            Some("first_purchase_offer")
        );
        assert_eq!(nba(json!({"lifetime_value": 50, "purchase_count": 2}), Value::Null).as_deref(), Some("browse"));
    }

    fn rec_config(size: usize) -> RecommendationConfig {
        RecommendationConfig { size, per_category: 10, ..RecommendationConfig::default() }
    }

    fn item(product: &str, score: f64, category: &str) -> RecItem {
        RecItem { product_id: product.into(), score, category: Some(category.into()) }
    }

    fn precomputed() -> Precomputed {
        Precomputed {
            canonical_id: None,
            items: vec![
                item("novel", 0.9, "books"),
                item("tent", 0.8, "outdoor"),
                item("atlas", 0.7, "books"),
                item("pan", 0.6, "kitchen"),
            ],
            model: Some("als".into()),
            generated_at: None,
        }
    }

    const T: i64 = 1_707_906_600_000;

    /// Overall popularity: novel (already recommended), stove, atlas (purchased),
    /// lamp, rope — best first.
    fn popular(category: Option<&str>) -> Option<Popularity> {
        let config = rec_config(10);
        let mut table = Popularity::default();
        if category.is_none() {
            for (product, weight) in [("novel", 9.0), ("stove", 8.0), ("atlas", 7.0), ("lamp", 6.0), ("rope", 5.0)] {
                table.add(product, Some("misc"), weight, T, &config);
            }
        }
        Some(table)
    }

    fn ids(answer: &Value) -> Vec<&str> {
        answer["items"].as_array().unwrap().iter().map(|i| i["product_id"].as_str().unwrap()).collect()
    }

    fn inputs<'a>(
        precomputed: &'a Precomputed,
        purchased: &'a BTreeSet<String>,
        in_cart: &'a BTreeSet<String>,
        session: &'a [String],
    ) -> RecommendationInputs<'a> {
        RecommendationInputs {
            precomputed: Some(precomputed),
            consent: true,
            purchased,
            in_cart,
            session_categories: session,
            fallback_categories: &[],
            now: T,
        }
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn recommend_drops_purchased_and_in_cart_items() {
        let (p, purchased, cart) = (precomputed(), set(&["atlas"]), set(&["pan"]));
        let answer = recommend(&rec_config(2), &inputs(&p, &purchased, &cart, &[]), popular);
        assert_eq!(ids(&answer), ["novel", "tent"]);
        assert_eq!(answer["personalised"], true);
        assert_eq!(answer["model"], "als");
        let answer = recommend(&rec_config(4), &inputs(&p, &set(&[]), &set(&[]), &[]), |_| None);
        assert_eq!(ids(&answer), ["novel", "tent", "atlas", "pan"], "nothing dropped without purchases or cart");
    }

    #[test]
    fn recommend_boosts_categories_viewed_this_session() {
        let (p, none) = (precomputed(), set(&[]));
        let plain = recommend(&rec_config(2), &inputs(&p, &none, &none, &[]), |_| None);
        assert_eq!(ids(&plain), ["novel", "tent"]);
        let session = ["outdoor".to_owned()];
        let boosted = recommend(&rec_config(2), &inputs(&p, &none, &none, &session), |_| None);
        assert_eq!(ids(&boosted), ["tent", "novel"], "0.8 × 1.5 beats 0.9");
        assert_eq!(boosted["items"][0]["score"], 1.2);
        assert_eq!(boosted["items"][0]["reason"], "precomputed, boosted: category viewed this session");
        assert_eq!(boosted["items"][1]["reason"], "precomputed");
    }

    #[test]
    fn recommend_fills_from_popularity_without_duplicates_up_to_size() {
        let (p, purchased, cart) = (precomputed(), set(&["atlas"]), set(&["pan"]));
        let answer = recommend(&rec_config(4), &inputs(&p, &purchased, &cart, &[]), popular);
        assert_eq!(ids(&answer), ["novel", "tent", "stove", "lamp"]);
        let sources: Vec<&str> =
            answer["items"].as_array().unwrap().iter().map(|i| i["source"].as_str().unwrap()).collect();
        assert_eq!(sources, ["precomputed", "precomputed", "popular", "popular"]);
        assert_eq!(answer["items"][2]["reason"], "popular overall");
        let all = recommend(&rec_config(50), &inputs(&p, &purchased, &cart, &[]), popular);
        assert_eq!(ids(&all), ["novel", "tent", "stove", "lamp", "rope"], "each product once");
    }

    #[test]
    fn recommend_without_consent_is_the_generic_popular_list_and_says_so() {
        let p = precomputed();
        let (purchased, cart) = (set(&["stove"]), set(&["novel"]));
        let session = ["outdoor".to_owned()];
        let mut refused = inputs(&p, &purchased, &cart, &session);
        refused.consent = false;
        let answer = recommend(&rec_config(3), &refused, popular);
        assert_eq!(answer["personalised"], false);
        assert_eq!(answer["reason"], "no_personalisation_consent");
        // The same list for everyone: the customer's purchases and cart are not used.
        assert_eq!(ids(&answer), ["novel", "stove", "atlas"]);
        assert!(answer["items"].as_array().unwrap().iter().all(|i| i["source"] == "popular"));
    }

    #[test]
    fn without_a_list_or_a_session_the_answer_says_why_it_is_generic() {
        let p = precomputed();
        let (purchased, cart) = (set(&["stove"]), set(&[]));
        let mut bare = inputs(&p, &purchased, &cart, &[]);
        bare.precomputed = None;
        let answer = recommend(&rec_config(3), &bare, popular);
        assert_eq!(answer["personalised"], false);
        assert_eq!(answer["reason"], "no_precomputed_list_or_session");
        assert_eq!(ids(&answer), ["novel", "atlas", "lamp"], "the customer's purchases are still left out");
        let listed = recommend(&rec_config(3), &inputs(&p, &purchased, &cart, &[]), popular);
        assert_eq!((listed["personalised"].as_bool(), listed.get("reason")), (Some(true), None));
    }

    #[test]
    fn popularity_halves_every_half_life() {
        let config = rec_config(10);
        let half_life = config.half_life.ms();
        let mut table = Popularity::default();
        table.add("tent", Some("outdoor"), 4.0, T, &config);
        let score = |table: &Popularity, now: i64| table.ranked(now, &config)[0].1;
        assert_eq!(score(&table, T), 4.0);
        assert_eq!(score(&table, T + half_life), 2.0);
        assert_eq!(score(&table, T + 2 * half_life), 1.0);
        // Later interest adds at full weight; interest arriving late adds decayed.
        table.add("tent", None, 1.0, T + half_life, &config);
        assert_eq!(score(&table, T + half_life), 3.0);
        table.add("tent", None, 2.0, T, &config);
        assert_eq!(score(&table, T + half_life), 4.0);
        assert_eq!(table.ranked(T, &config)[0].2.as_deref(), Some("outdoor"), "the category is kept");
    }

    #[test]
    fn popularity_keeps_the_top_per_category() {
        let config = RecommendationConfig { per_category: 2, ..rec_config(10) };
        let mut table = Popularity::default();
        for (product, weight) in [("a", 1.0), ("b", 3.0), ("c", 2.0), ("d", 0.5)] {
            table.add(product, None, weight, T, &config);
        }
        assert_eq!(table.items.keys().collect::<Vec<_>>(), ["b", "c"]);
        // Out of order: `a` at T, `b` a half life later; late interest in `c` at T is
        // worth 3.5 by the time `a` is worth 5 and `b` 6, so `c` is the one to go.
        let half_life = config.half_life.ms();
        let mut table = Popularity::default();
        table.add("a", None, 10.0, T, &config);
        table.add("b", None, 6.0, T + half_life, &config);
        table.add("c", None, 7.0, T, &config);
        assert_eq!(table.items.keys().collect::<Vec<_>>(), ["a", "b"]);
    }
}
