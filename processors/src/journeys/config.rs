//! The `journeys:` section of topology.yaml: multi-step journeys written as data. A
//! journey starts on a trigger event, runs its steps in order (wait, check, send,
//! branch, exit), and ends converted when the customer reaches its goal. The seed's
//! cart abandonment is the default.

use crate::topology::{ConfigError, Duration};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JourneyConfig {
    pub name: String,
    /// The event that starts the journey for a customer not already in it.
    pub trigger: EventMatch,
    /// The event that ends it as converted (a purchase).
    #[serde(default)]
    pub goal: Option<EventMatch>,
    /// After leaving, a customer may enter again only this long after they entered.
    #[serde(default)]
    pub reentry_after: Option<Duration>,
    pub steps: Vec<Step>,
}

/// An event type, with a condition over `event` (the event) and `context`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventMatch {
    pub event: String,
    #[serde(default, rename = "if")]
    pub condition: Option<String>,
}

/// One step: exactly one of `wait`, `check`, `send`, `branch`, `exit`. Steps are
/// referred to by `name` (`else: reminder`); unnamed steps are `step_<n>` (from 1).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    #[serde(default)]
    pub name: Option<String>,
    /// Pause this long.
    #[serde(default)]
    pub wait: Option<Duration>,
    /// Go on when this condition holds over `context` and `journey`, else to `else`
    /// (a step name, or `exit`, the default).
    #[serde(default)]
    pub check: Option<String>,
    #[serde(default, rename = "else")]
    pub otherwise: Option<String>,
    /// Ask the orchestrator to message the customer (consent, caps and quiet hours apply).
    #[serde(default)]
    pub send: Option<SendStep>,
    /// The first branch whose condition holds says where to go; none → the next step.
    #[serde(default)]
    pub branch: Option<Vec<Branch>>,
    /// Leave the journey with this reason.
    #[serde(default)]
    pub exit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendStep {
    /// Campaign id of the message (one message per campaign per customer); the journey
    /// and step name when left out.
    #[serde(default)]
    pub campaign: Option<String>,
    pub category: String,
    pub content: String,
    pub channels: Vec<String>,
    #[serde(default)]
    pub variables: Value,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Branch {
    #[serde(rename = "if")]
    pub condition: String,
    pub goto: String,
}

impl Step {
    pub fn name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("step_{}", index + 1))
    }

    fn kinds(&self) -> usize {
        [self.wait.is_some(), self.check.is_some(), self.send.is_some(), self.branch.is_some(), self.exit.is_some()]
            .iter()
            .filter(|k| **k)
            .count()
    }
}

impl JourneyConfig {
    /// Index of the step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().enumerate().position(|(i, s)| s.name(i) == name)
    }

    /// Every condition of the journey, for compiling once.
    pub fn conditions(&self) -> Vec<&str> {
        let mut all: Vec<&str> = Vec::new();
        for m in std::iter::once(&self.trigger).chain(&self.goal) {
            all.extend(m.condition.as_deref());
        }
        for step in &self.steps {
            all.extend(step.check.as_deref());
            for b in step.branch.iter().flatten() {
                all.push(&b.condition);
            }
        }
        all
    }
}

/// The seed's cart abandonment: an item added to the cart → wait 1 h → still
/// abandoned? → email reminder → wait 24 h → still abandoned? → push with a discount;
/// a purchase ends it, converted.
pub fn default_journeys() -> Vec<JourneyConfig> {
    let still_abandoned = "context.cart and context.cart.items | length > 0";
    let step = |name: &str| Step { name: Some(name.into()), ..Step::default() };
    vec![JourneyConfig {
        name: "cart_abandonment".into(),
        trigger: EventMatch { event: "cart.item_added".into(), condition: None },
        goal: Some(EventMatch { event: "order.completed".into(), condition: None }),
        reentry_after: Some(Duration::days(7)),
        steps: vec![
            Step { wait: Some(Duration::hours(1)), ..step("wait_1h") },
            Step { check: Some(still_abandoned.into()), ..step("still_abandoned") },
            Step {
                send: Some(SendStep {
                    campaign: None,
                    category: "retention".into(),
                    content: "cart_reminder".into(),
                    channels: vec!["email".into()],
                    variables: Value::Null,
                }),
                ..step("email_reminder")
            },
            Step { wait: Some(Duration::hours(24)), ..step("wait_24h") },
            Step { check: Some(still_abandoned.into()), ..step("still_abandoned_24h") },
            Step {
                send: Some(SendStep {
                    campaign: None,
                    category: "promotional".into(),
                    content: "cart_discount".into(),
                    channels: vec!["push".into()],
                    variables: serde_json::json!({"discount": "10%"}),
                }),
                ..step("push_discount")
            },
        ],
    }]
}

pub fn validate(journeys: &[JourneyConfig], topology: &crate::topology::Topology, errors: &mut Vec<ConfigError>) {
    let err = |path: String, message: String| ConfigError { path, message };
    for (j, journey) in journeys.iter().enumerate() {
        let path = format!("journeys[{j}]");
        if !crate::topology::is_identifier_type(&journey.name) {
            errors.push(err(format!("{path}.name"), format!("{:?} is not a valid journey name", journey.name)));
        }
        if journeys[..j].iter().any(|o| o.name == journey.name) {
            errors.push(err(format!("{path}.name"), format!("{:?} is declared twice", journey.name)));
        }
        for (key, m) in [("trigger", Some(&journey.trigger)), ("goal", journey.goal.as_ref())] {
            let Some(m) = m else { continue };
            if !topology.is_known_event_type(&m.event) {
                errors.push(err(format!("{path}.{key}.event"), format!("{:?} is not in event_types", m.event)));
            }
            if let Some(Err(e)) = m.condition.as_deref().map(crate::rules::check) {
                errors.push(err(format!("{path}.{key}.if"), e));
            }
        }
        if journey.steps.is_empty() {
            errors.push(err(format!("{path}.steps"), "a journey needs at least one step".into()));
        }
        let target_ok = |name: &str| name == "exit" || journey.step_index(name).is_some();
        for (i, step) in journey.steps.iter().enumerate() {
            let path = format!("{path}.steps[{i}]");
            if step.kinds() != 1 {
                errors.push(err(path.clone(), "needs exactly one of wait, check, send, branch, exit".into()));
            }
            if journey.steps[..i].iter().enumerate().any(|(k, o)| o.name(k) == step.name(i)) {
                errors.push(err(format!("{path}.name"), format!("{:?} is used twice", step.name(i))));
            }
            if step.wait.is_some_and(|d| d.ms() <= 0) {
                errors.push(err(format!("{path}.wait"), "must be positive".into()));
            }
            if let Some(Err(e)) = step.check.as_deref().map(crate::rules::check) {
                errors.push(err(format!("{path}.check"), e));
            }
            if let Some(target) = step.otherwise.as_deref().filter(|t| !target_ok(t)) {
                errors.push(err(format!("{path}.else"), format!("{target:?} is not a step of this journey")));
            }
            for (b, branch) in step.branch.iter().flatten().enumerate() {
                if let Err(e) = crate::rules::check(&branch.condition) {
                    errors.push(err(format!("{path}.branch[{b}].if"), e));
                }
                if !target_ok(&branch.goto) {
                    errors.push(err(format!("{path}.branch[{b}].goto"), format!("{:?} is not a step", branch.goto)));
                }
            }
            if let Some(send) = &step.send {
                for (field, message) in topology.orchestration.check_send(&send.category, &send.channels) {
                    errors.push(err(format!("{path}.send.{field}"), message));
                }
            }
        }
    }
}
