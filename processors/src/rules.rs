//! Rule expressions of topology.yaml (segments, personalisation rules, next best
//! action): Jinja expressions (minijinja) over named variables such as `customer` and
//! `context`. Attribute access, comparisons, `and` / `or` / `not`, `in`, arithmetic and
//! filters such as `| length` and `| lower` work; a missing attribute is undefined and
//! compares false.

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

/// Rules compiled once, each kept as a template `{% if <rule> %}1{% endif %}`, and
/// all of them as one template printing a 1 or 0 per rule (one render per set; the
/// per-rule templates are the fallback when a rule fails on some customer's data).
pub struct RuleSet {
    env: Environment<'static>,
    len: usize,
}

/// The variables rules see (`customer`, `context`), converted once for many rule sets.
pub struct Vars(minijinja::Value);

impl Vars {
    pub fn new(vars: &[(&str, &Value)]) -> Vars {
        let ctx: std::collections::BTreeMap<&str, minijinja::Value> =
            vars.iter().map(|(name, v)| (*name, minijinja::Value::from_serialize(v))).collect();
        Vars(minijinja::Value::from_serialize(&ctx))
    }
}

impl RuleSet {
    /// Compile every expression; the error names the first bad one's index and what
    /// is wrong with it.
    pub fn compile<'a>(expressions: impl IntoIterator<Item = &'a str>) -> Result<RuleSet, (usize, String)> {
        let mut env = Environment::new();
        // `customer.location.state` on a customer without a location is undefined (so
        // `!= "QLD"` holds), not an error that makes every rule over it false.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        let mut len = 0;
        let mut all = String::new();
        for (i, rule) in expressions.into_iter().enumerate() {
            env.compile_expression(rule).map_err(|e| (i, e.to_string()))?;
            env.add_template_owned(format!("rule:{i}"), format!("{{% if {rule} %}}1{{% endif %}}"))
                .map_err(|e| (i, e.to_string()))?;
            all.push_str(&format!("{{% if {rule} %}}1{{% else %}}0{{% endif %}}"));
            len = i + 1;
        }
        env.add_template_owned("all", all).map_err(|e| (0, e.to_string()))?;
        Ok(RuleSet { env, len })
    }

    pub fn empty() -> RuleSet {
        RuleSet { env: Environment::new(), len: 0 }
    }

    /// Indexes of the rules that hold over `vars` (name → value), in rule order. A rule
    /// that fails to evaluate (a type error on this customer's data) does not hold.
    pub fn matching(&self, vars: &[(&str, &Value)]) -> Vec<usize> {
        self.matching_vars(&Vars::new(vars))
    }

    /// [`RuleSet::matching`] over variables converted once.
    pub fn matching_vars(&self, vars: &Vars) -> Vec<usize> {
        if self.len == 0 {
            return Vec::new();
        }
        let all = self.env.get_template("all").and_then(|t| t.render(&vars.0));
        match all {
            Ok(bits) if bits.len() == self.len => {
                bits.bytes().enumerate().filter(|(_, b)| *b == b'1').map(|(i, _)| i).collect()
            }
            // A rule failed on this data: evaluate each alone, the failing one is false.
            _ => (0..self.len)
                .filter(|i| {
                    self.env
                        .get_template(&format!("rule:{i}"))
                        .and_then(|t| t.render(&vars.0))
                        .is_ok_and(|out| out == "1")
                })
                .collect(),
        }
    }
}

/// Check one expression, for config validation.
pub fn check(expression: &str) -> Result<(), String> {
    RuleSet::compile([expression]).map(|_| ()).map_err(|(_, e)| e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `customer.location.state != "QLD"` holds for a customer without a location, as
    /// the module documents: a missing attribute is undefined, also one level down.
    #[test]
    fn a_missing_nested_attribute_is_undefined_not_an_error() {
        let rules = RuleSet::compile([
            "customer.location.state == \"QLD\"",
            "customer.location.state != \"QLD\"",
            "not customer.location.state",
            "customer.behavioural.product_views.count >= 3",
            "not (customer.behavioural.product_views.count >= 3)",
            "context.cart and context.cart.value > 0",
        ])
        .unwrap();
        let nobody = json!({"lifetime_value": 5});
        assert_eq!(rules.matching(&[("customer", &nobody), ("context", &Value::Null)]), vec![1, 2, 4]);
        let browser = json!({"location": {"state": "QLD"}, "behavioural": {"product_views": {"count": 3}}});
        let cart = json!({"cart": {"value": 12.5}});
        assert_eq!(rules.matching(&[("customer", &browser), ("context", &cart)]), vec![0, 3, 5]);
    }
}
