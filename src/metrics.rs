//! Prometheus metrics of the process, served at `/metrics`. Processors report counters
//! as plain data ([`chorus_processors::Counter`]); the runtime turns them into series
//! here, so business logic never links a metrics library.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};
use std::collections::BTreeMap;
use std::sync::OnceLock;

pub struct Metrics {
    pub registry: Registry,
    pub records_in: IntCounterVec,
    pub records_out: IntCounterVec,
    pub dlq: IntCounterVec,
    pub errors: IntCounterVec,
    pub processing_seconds: HistogramVec,
    pub end_to_end_seconds: HistogramVec,
    pub commit_seconds: HistogramVec,
    /// Each part of a commit: `flush` (the tasks' once-per-commit outputs and cache
    /// write-back), `changelog` (store writes produced), `deliveries` (acknowledgements
    /// of the transaction's records), `offsets` (send_offsets_to_transaction), `commit`
    /// (commit_transaction), `apply` (the writes into RocksDB).
    pub commit_phase_seconds: HistogramVec,
    pub lag: IntGaugeVec,
    pub store_entries: IntGaugeVec,
    pub store_bytes: IntGaugeVec,
    pub cache_bytes: IntGaugeVec,
    pub restored_records: IntCounterVec,
    pub restored_bytes: IntCounterVec,
    /// Seconds spent replaying changelogs.
    pub restore_seconds: prometheus::Counter,
    /// Changelog records a restoring store still has to replay (0 once ready).
    pub restore_remaining: IntGaugeVec,
    pub business: IntCounterVec,
    pub http_requests: IntCounterVec,
    /// Refused credentials, by reason (missing, unknown_key, bad_token, expired_token,
    /// insufficient_scope, wrong_customer, origin_not_allowed, rate_limited).
    pub auth_failures: IntCounterVec,
    /// Segment-compatible messages accepted, by source and call type.
    pub tracking_messages: IntCounterVec,
    pub identity: IdentityMetrics,
    /// Interactions (events) whose customer got personalised content, or generic.
    pub personalisation: IntCounterVec,
    /// Share of interactions that got personalised content since start.
    pub personalisation_coverage: prometheus::Gauge,
    /// API answers by endpoint and outcome (personalised or generic).
    pub personalisation_served: IntCounterVec,
    pub orchestration: OrchestrationMetrics,
    pub journeys: JourneyMetrics,
    /// Message requests campaigns made, by campaign and trigger.
    pub campaign_requests: IntCounterVec,
    /// Content items and campaigns changed or deleted at run time.
    pub catalog_changes: IntCounterVec,
    pub privacy: PrivacyMetrics,
}

/// Data subject requests: by type and status, how long they took, and the inputs
/// dropped because they named an erased subject.
pub struct PrivacyMetrics {
    pub requests: IntCounterVec,
    pub seconds: HistogramVec,
    pub suppressed_events: IntCounterVec,
    /// Records still in flight for an erased subject, dropped by the stage they reached.
    pub dropped: IntCounterVec,
    /// Status callback attempts by outcome.
    pub callbacks: IntCounterVec,
}

/// Journey progress: entries, steps, exits and conversions per step, and the seed's
/// cross-channel conversion.
pub struct JourneyMetrics {
    pub events: IntCounterVec,
    /// Conversions by whether the customer used more than one channel in the journey.
    pub conversions: IntCounterVec,
    /// Share of conversions that spanned several channels since start.
    pub cross_channel_rate: prometheus::Gauge,
}

/// The orchestrator's series: the seed's message coordination rate and suppression
/// counts among them.
pub struct OrchestrationMetrics {
    pub sends: IntCounterVec,
    pub suppressions: IntCounterVec,
    pub deferrals: IntCounterVec,
    /// Final decisions by whether every coordination rule applied to them.
    pub coordination: IntCounterVec,
    /// Share of final decisions coordinated since start.
    pub coordination_rate: prometheus::Gauge,
}

/// The identity stage's own series (the seed's identity resolution rate among them).
pub struct IdentityMetrics {
    /// Inputs resolved, by `known` (the customer has a business id) or `anonymous`.
    pub resolved: IntCounterVec,
    pub merges: IntCounterVec,
    pub guard_refusals: IntCounterVec,
    pub identifier_refusals: IntCounterVec,
    pub component_size: prometheus::Histogram,
    /// Share of inputs resolved to a known customer since start.
    pub resolution_rate: prometheus::Gauge,
}

impl Metrics {
    /// Record a processor's business counter: the generic series, and the identity
    /// series it feeds.
    pub fn business(&self, processor: &str, name: &str, label: &str) {
        self.business.with_label_values(&[processor, name, label]).inc();
        let id = &self.identity;
        match name {
            "resolved" => id.resolved.with_label_values(&[label]).inc(),
            "merges" => id.merges.with_label_values(&[label]).inc(),
            "guard_refusals" => id.guard_refusals.with_label_values(&[label]).inc(),
            "identifier_refusals" => id.identifier_refusals.with_label_values(&[label]).inc(),
            "component_size" => id.component_size.observe(label.parse().unwrap_or(0.0)),
            "personalisation" => self.personalisation.with_label_values(&[label]).inc(),
            "decisions_sent" => {
                let (channel, category) = label.split_once('/').unwrap_or((label, ""));
                self.orchestration.sends.with_label_values(&[channel, category]).inc()
            }
            "suppressions" => self.orchestration.suppressions.with_label_values(&[label]).inc(),
            "deferrals" => self.orchestration.deferrals.with_label_values(&[label]).inc(),
            "coordination" => self.orchestration.coordination.with_label_values(&[label]).inc(),
            "journey_events" => {
                let mut parts = label.splitn(3, '/');
                let (journey, event, step) = (parts.next(), parts.next(), parts.next());
                let values = [journey.unwrap_or(""), event.unwrap_or(""), step.unwrap_or("")];
                self.journeys.events.with_label_values(&values).inc()
            }
            "campaign_requests" | "catalog_changes" => {
                let (first, second) = label.split_once('/').unwrap_or((label, ""));
                let series = if name == "campaign_requests" { &self.campaign_requests } else { &self.catalog_changes };
                series.with_label_values(&[first, second]).inc()
            }
            "privacy_requests" => {
                let (kind, status) = label.split_once('/').unwrap_or((label, ""));
                self.privacy.requests.with_label_values(&[kind, status]).inc()
            }
            "privacy_request_seconds" => {
                let (kind, seconds) = label.split_once('/').unwrap_or((label, "0"));
                self.privacy.seconds.with_label_values(&[kind]).observe(seconds.parse().unwrap_or(0.0))
            }
            "privacy_suppressed_events" => self.privacy.suppressed_events.with_label_values(&[label]).inc(),
            "privacy_dropped" => self.privacy.dropped.with_label_values(&[label]).inc(),
            "journey_conversions" => {
                let (journey, reach) = label.split_once('/').unwrap_or((label, ""));
                self.journeys.conversions.with_label_values(&[journey, reach]).inc()
            }
            _ => {}
        }
    }
}

/// Register a metric whose definition is fixed in this file (valid by construction).
fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: prometheus::Result<C>) -> C {
    let metric = metric.expect("valid metric definition");
    registry.register(Box::new(metric.clone())).expect("metric registered once");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    register(registry, HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels))
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

const LATENCY_BUCKETS: [f64; 20] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let registry = Registry::new_custom(Some("chorus".into()), None).expect("valid registry prefix");
        let pl = &["processor", "partition"];
        Metrics {
            records_in: counter(&registry, "records_in_total", "Records consumed", pl),
            records_out: counter(&registry, "records_out_total", "Records produced, by topic", &["processor", "topic"]),
            dlq: counter(&registry, "dlq_total", "Records sent to events.dlq, by reason", &["processor", "reason"]),
            errors: counter(&registry, "errors_total", "Transaction aborts and task failures", &["processor", "kind"]),
            processing_seconds: histogram(&registry, "processing_seconds", "Time to process one record", pl, LATENCY_BUCKETS.to_vec()),
            end_to_end_seconds: histogram(
                &registry,
                "end_to_end_seconds",
                "Event timestamp to its effect being readable (profile, context)",
                &["processor"],
                LATENCY_BUCKETS.to_vec(),
            ),
            commit_seconds: histogram(&registry, "commit_seconds", "Time to commit one transaction", &["processor"], LATENCY_BUCKETS.to_vec()),
            commit_phase_seconds: histogram(
                &registry,
                "commit_phase_seconds",
                "Time of each part of a commit",
                &["processor", "phase"],
                LATENCY_BUCKETS.to_vec(),
            ),
            lag: gauge(&registry, "consumer_lag", "Records behind the end of each input partition", &["processor", "topic", "partition"]),
            store_entries: gauge(&registry, "store_entries", "Approximate entries per store and partition", &["processor", "store", "partition"]),
            store_bytes: gauge(&registry, "store_bytes", "Approximate bytes per store and partition (live SST data and memtables)", &["processor", "store", "partition"]),
            cache_bytes: gauge(&registry, "cache_bytes", "Estimated memory of the decoded values each processor keeps per partition (bounded by state.processor_cache_mb)", &["processor", "partition"]),
            restored_records: counter(&registry, "restored_records_total", "Changelog records replayed into stores", &["processor", "store"]),
            restored_bytes: counter(&registry, "restored_bytes_total", "Bytes (keys and values) of the changelog records replayed into stores", &["processor", "store"]),
            restore_seconds: register(
                &registry,
                prometheus::Counter::new("restore_seconds_total", "Seconds spent replaying changelogs into stores"),
            ),
            restore_remaining: register(
                &registry,
                IntGaugeVec::new(
                    Opts::new("restore_remaining_records", "Changelog records a restoring store still has to replay"),
                    &["processor", "store", "partition"],
                ),
            ),
            business: counter(
                &registry,
                "events_total",
                "Business counters reported by processors (resolved, merges, duplicates, decisions_sent, suppressions, ...)",
                &["processor", "name", "label"],
            ),
            http_requests: counter(&registry, "http_requests_total", "HTTP requests by route and status", &["route", "status"]),
            auth_failures: counter(&registry, "auth_failures_total", "Requests refused for their credentials, by reason", &["reason"]),
            tracking_messages: counter(&registry, "tracking_messages_total", "Segment-compatible messages accepted, by source and call type", &["source", "type"]),
            identity: IdentityMetrics {
                resolved: counter(&registry, "identity_resolved_total", "Inputs resolved, by known (customer has a business id) or anonymous", &["result"]),
                merges: counter(&registry, "identity_merges_total", "Customers merged, by rule", &["rule"]),
                guard_refusals: counter(&registry, "identity_guard_refusals_total", "Links refused by a guard", &["guard"]),
                identifier_refusals: counter(&registry, "identity_identifier_refusals_total", "Identifiers not used: unknown type, placeholder, bad shape, too long", &["reason"]),
                component_size: register(
                    &registry,
                    prometheus::Histogram::with_opts(
                        HistogramOpts::new("identity_component_size", "Identifiers per customer, observed each time a customer is created or grows")
                            .buckets(vec![1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]),
                    ),
                ),
                resolution_rate: register(
                    &registry,
                    prometheus::Gauge::new("identity_resolution_rate", "Share of inputs resolved to a known customer since this process started"),
                ),
            },
            personalisation: counter(&registry, "personalisation_interactions_total", "Interactions whose customer got personalised content (rules, segment variants or precomputed recommendations, with consent), or generic", &["outcome"]),
            personalisation_coverage: register(
                &registry,
                prometheus::Gauge::new("personalisation_coverage", "Share of interactions that got personalised content since this process started"),
            ),
            personalisation_served: counter(&registry, "personalisation_served_total", "Profile and recommendation answers by endpoint and outcome", &["endpoint", "outcome"]),
            orchestration: OrchestrationMetrics {
                sends: counter(&registry, "orchestration_sends_total", "Messages sent, by channel and category", &["channel", "category"]),
                suppressions: counter(&registry, "orchestration_suppressions_total", "Requests finally not sent, by reason code", &["reason"]),
                deferrals: counter(&registry, "orchestration_deferrals_total", "Requests held back, by reason (quiet_hours, coordination_window)", &["reason"]),
                coordination: counter(&registry, "orchestration_coordination_total", "Final decisions: coordinated (consent, suppressions, quiet hours, caps and the coordination window all applied) or uncoordinated (a category exempt from some)", &["outcome"]),
                coordination_rate: register(
                    &registry,
                    prometheus::Gauge::new("message_coordination_rate", "Share of final decisions coordinated since this process started"),
                ),
            },
            campaign_requests: counter(&registry, "campaign_requests_total", "Message requests made by campaigns, by campaign and trigger (event, segment_entry, schedule)", &["campaign", "trigger"]),
            catalog_changes: counter(&registry, "catalog_changes_total", "Content items and campaigns received at run time, by catalog (content, campaign) and change (changed, deleted)", &["catalog", "change"]),
            journeys: JourneyMetrics {
                events: counter(&registry, "journey_events_total", "Journey progress: entered, step, exited and converted, by journey and step", &["journey", "event", "step"]),
                conversions: counter(&registry, "journey_conversions_total", "Journey conversions, by whether the customer used several channels in the journey (cross_channel) or one", &["journey", "reach"]),
                cross_channel_rate: register(
                    &registry,
                    prometheus::Gauge::new("cross_channel_conversion_rate", "Share of journey conversions that spanned several channels since this process started"),
                ),
            },
            privacy: PrivacyMetrics {
                requests: counter(&registry, "privacy_requests_total", "Data subject requests by type (access, portability, erasure, rectification, unsuppress) and status (received, completed, failed)", &["type", "status"]),
                seconds: histogram(&registry, "privacy_request_seconds", "Seconds from receipt to completion (or failure) of data subject requests, by type", &["type"], vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]),
                suppressed_events: counter(&registry, "privacy_suppressed_events_total", "Inputs dropped at intake because they named an erased subject, by topic", &["topic"]),
                dropped: counter(&registry, "privacy_dropped_total", "Records still in flight for an erased subject, dropped by the stage they reached", &["stage"]),
                callbacks: counter(&registry, "privacy_callbacks_total", "Status callbacks of data subject requests by outcome: delivered, retried (an attempt failed), failed (attempts exhausted), refused (host not allowed)", &["outcome"]),
            },
            registry,
        }
    })
}

/// `yes / (yes + no)` of a counter with those two label values (0 before any).
fn share(counter: &IntCounterVec, yes: &str, no: &str) -> f64 {
    let yes = counter.with_label_values(&[yes]).get() as f64;
    let no = counter.with_label_values(&[no]).get() as f64;
    yes / (yes + no).max(1.0)
}

pub fn render() -> String {
    // Derived at scrape time, not on every input.
    let m = metrics();
    m.identity.resolution_rate.set(share(&m.identity.resolved, "known", "anonymous"));
    m.personalisation_coverage.set(share(&m.personalisation, "personalised", "generic"));
    m.orchestration.coordination_rate.set(share(&m.orchestration.coordination, "coordinated", "uncoordinated"));
    use prometheus::core::Collector;
    let conversions = &m.journeys.conversions;
    let cross =
        conversions.collect().iter().flat_map(|f| f.get_metric().to_vec()).fold((0.0, 0.0), |(x, all), metric| {
            let value = metric.get_counter().get_value();
            let is_cross = metric.get_label().iter().any(|l| l.name() == "reach" && l.value() == "cross_channel");
            (x + if is_cross { value } else { 0.0 }, all + value)
        });
    m.journeys.cross_channel_rate.set(cross.0 / cross.1.max(1.0));
    let families = m.registry.gather();
    TextEncoder::new().encode_to_string(&families).unwrap_or_default()
}

/// Every series of a counter family, named by its label values joined with `/`.
pub fn counter_series(family: &IntCounterVec) -> BTreeMap<String, u64> {
    use prometheus::core::Collector;
    let mut out = BTreeMap::new();
    for metric in family.collect().iter().flat_map(|f| f.get_metric().iter()) {
        let name: Vec<&str> = metric.get_label().iter().map(|l| l.value()).collect();
        *out.entry(name.join("/")).or_insert(0) += metric.get_counter().get_value() as u64;
    }
    out
}
