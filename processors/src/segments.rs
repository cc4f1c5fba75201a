//! Segments: named rule expressions over a customer (`customer.lifetime_value > 10000`,
//! `customer.last_purchase_category == "outdoor"`, `customer.location.state == "QLD"`),
//! evaluated once per changed customer per commit, when the profile stage publishes the
//! customer's snapshot (see [`crate::rules`] for the expression language).

use crate::rules::{RuleSet, Vars};
use serde::Deserialize;
use serde_json::Value;

/// One segment of topology.yaml.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentRule {
    pub name: String,
    /// An expression over `customer` (the profile, see [`crate::profile::Profile::customer_view`]).
    pub rule: String,
}

/// The segment rules of a topology, compiled once.
pub struct Segments {
    rules: RuleSet,
    names: Vec<String>,
}

impl Segments {
    /// Compile every rule; the error names the rule's index and what is wrong.
    pub fn compile(rules: &[SegmentRule]) -> Result<Segments, (usize, String)> {
        let compiled = RuleSet::compile(rules.iter().map(|r| r.rule.as_str()))?;
        Ok(Segments { rules: compiled, names: rules.iter().map(|r| r.name.clone()).collect() })
    }

    /// No segments at all.
    pub fn none() -> Segments {
        Segments { rules: RuleSet::empty(), names: Vec::new() }
    }

    /// The segments `customer` belongs to, in rule order.
    pub fn evaluate(&self, customer: &Value) -> Vec<String> {
        self.evaluate_vars(&Vars::new(&[("customer", customer)]))
    }

    /// [`Segments::evaluate`] over variables converted once.
    pub fn evaluate_vars(&self, vars: &Vars) -> Vec<String> {
        self.rules.matching_vars(vars).into_iter().filter_map(|i| self.names.get(i).cloned()).collect()
    }
}

/// The seed's segments.
pub fn default_rules() -> Vec<SegmentRule> {
    [
        ("high_value", "customer.lifetime_value > 10000"),
        ("outdoor_enthusiast", "customer.last_purchase_category == \"outdoor\""),
        ("queensland", "customer.location.state == \"QLD\""),
    ]
    .into_iter()
    .map(|(name, rule)| SegmentRule { name: name.into(), rule: rule.into() })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_seed_examples_work_as_written() {
        let s = Segments::compile(&default_rules()).unwrap();
        let rich =
            json!({"lifetime_value": 12000.5, "last_purchase_category": "outdoor", "location": {"state": "QLD"}});
        assert_eq!(s.evaluate(&rich), ["high_value", "outdoor_enthusiast", "queensland"]);
        let other = json!({"lifetime_value": 10000, "last_purchase_category": "books"});
        assert!(s.evaluate(&other).is_empty(), "missing attributes compare false");
    }

    #[test]
    fn bad_rules_are_reported_with_their_index() {
        let rules = vec![
            SegmentRule { name: "ok".into(), rule: "customer.purchase_count >= 3 and not customer.churned".into() },
            SegmentRule { name: "bad".into(), rule: "customer.lifetime_value >".into() },
        ];
        let (i, message) = Segments::compile(&rules).err().unwrap();
        assert_eq!(i, 1);
        assert!(message.contains("syntax") || message.contains("unexpected"), "{message}");
    }
}
