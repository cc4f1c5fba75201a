//! Segments: named rule expressions over a customer (`customer.lifetime_value > 10000`,
//! `customer.last_purchase_category == "outdoor"`, `customer.location.state == "QLD"`),
//! evaluated on every profile change. The expression language is Jinja's (minijinja):
//! attribute access, comparisons, `and` / `or` / `not`, `in`, arithmetic, filters such as
//! `| length` and `| lower`. A missing attribute is undefined and compares false.

use minijinja::Environment;
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

/// The segment rules of a topology, compiled once (each as a template
/// `{% if <rule> %}1{% endif %}` kept by the environment).
pub struct Segments {
    env: Environment<'static>,
    names: Vec<String>,
}

impl Segments {
    /// Compile every rule; the error names the rule's index and what is wrong.
    pub fn compile(rules: &[SegmentRule]) -> Result<Segments, (usize, String)> {
        let mut env = Environment::new();
        for (i, r) in rules.iter().enumerate() {
            env.compile_expression(&r.rule).map_err(|e| (i, e.to_string()))?;
            env.add_template_owned(format!("segment:{i}"), format!("{{% if {} %}}1{{% endif %}}", r.rule))
                .map_err(|e| (i, e.to_string()))?;
        }
        Ok(Segments { env, names: rules.iter().map(|r| r.name.clone()).collect() })
    }

    /// No segments at all.
    pub fn none() -> Segments {
        Segments { env: Environment::new(), names: Vec::new() }
    }

    /// The segments `customer` belongs to, in rule order. A rule that fails to evaluate
    /// (a type error on this customer's data) does not match.
    pub fn evaluate(&self, customer: &Value) -> Vec<String> {
        let ctx = minijinja::context! { customer => minijinja::Value::from_serialize(customer) };
        self.names
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                self.env.get_template(&format!("segment:{i}")).and_then(|t| t.render(&ctx)).is_ok_and(|out| out == "1")
            })
            .map(|(_, name)| name.clone())
            .collect()
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
