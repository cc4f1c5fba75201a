//! Data subject rights: access, portability, erasure with suppression, rectification.
//!
//! A request enters at identity (from `privacy.requests`, where the HTTP API also
//! writes), is resolved through the graph to the customer actor holding every
//! identifier and canonical id of the subject, and fans out from there: to every
//! identity partition (erasure: the suppression list, the identifiers' state) and, on
//! `events.resolved`, to each customer stage at each canonical id the subject had. Every
//! piece reports a *part* to the status actor ([`status`]), which keeps the request's
//! status and writes receipts to `privacy.results`. Each step is an ordinary task step,
//! so the deletes, the tombstones and the reports of a step commit together, once.
//!
//! Nothing this module writes outside the subject's own (deleted) state holds personal
//! data: identifiers and canonical ids appear only as [`hash`]es.

pub mod request;
pub mod status;

use crate::processor::{Ctx, ProcessError};
use crate::resolved::{Kind, Resolved, RESOLVED_TOPIC};
use crate::topology::Duration;
use hmac::Mac as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

pub use request::{FieldError, PrivacyRequest, RequestType};

pub const NAME: &str = "privacy";
pub const REQUESTS_TOPIC: &str = "privacy.requests";
pub const RESULTS_TOPIC: &str = "privacy.results";
/// The dead-letter reason of an input naming an erased subject.
pub const ERASED_SUBJECT: &str = "erased_subject";

/// The key used when the topology names none: fine for trying chorus, never for
/// production (anyone can recompute the hashes). The binary warns when it is used.
pub const DEVELOPMENT_HASH_KEY: &str = "chorus-development-privacy-key";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Key of the HMAC-SHA256 that hashes identifiers and canonical ids in the
    /// suppression list, the erasure markers and the receipts. `${VAR}` is read from
    /// the environment. Changing it forgets the suppression list.
    pub hash_key: String,
    /// Bearer key of the access and portability exports (personal data); `${VAR}` is
    /// read from the environment. Without one, exports are refused.
    pub api_key: String,
    /// How long customer stages remember an erased canonical id, dropping records still
    /// in flight for it: at least the retention of `events.resolved` plus
    /// `topics.segment` (checked), so no record older than the erasure is left there.
    pub marker_ttl: Duration,
    /// A request whose parts have not all reported by then fails, naming them.
    pub timeout: Duration,
    /// How long an access or portability export stays available.
    pub export_ttl: Duration,
    /// What `expected_completion` promises, after the request is received.
    pub expected_completion: Duration,
    /// How `status_callback_url`s are called.
    pub callbacks: CallbackConfig,
}

/// Status callbacks: every status change of a request that named a
/// `status_callback_url` is POSTed there, signed, and retried with backoff.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    /// Key of the HMAC-SHA256 in `X-Chorus-Signature`; `${VAR}` is read from the
    /// environment. Without one, callbacks are signed with [`DEVELOPMENT_CALLBACK_SECRET`].
    pub secret: String,
    /// Hosts a callback URL may name: `api.example.com`, or `*.example.com` for its
    /// subdomains. Empty allows any host.
    pub hosts: Vec<String>,
    /// Attempts per status change before it is given up (counted and logged).
    pub max_attempts: u32,
    /// The wait before the second attempt; it doubles each time, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How long one attempt may take.
    pub timeout: Duration,
}

/// The callback secret used when the topology names none; the binary warns.
pub const DEVELOPMENT_CALLBACK_SECRET: &str = "chorus-development-callback-secret";

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            secret: String::new(),
            hosts: Vec::new(),
            max_attempts: 10,
            backoff: Duration::seconds(1),
            max_backoff: Duration::hours(1),
            timeout: Duration::seconds(10),
        }
    }
}

impl CallbackConfig {
    /// Whether `url` names a host the topology allows.
    pub fn allows(&self, url: &str) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let Some(host) = request::callback_host(url) else { return false };
        let host = host.to_ascii_lowercase();
        self.hosts.iter().any(|allowed| {
            let allowed = allowed.to_ascii_lowercase();
            match allowed.strip_prefix("*.") {
                Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
                None => host == allowed,
            }
        })
    }
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            hash_key: String::new(),
            api_key: String::new(),
            marker_ttl: Duration::days(8),
            timeout: Duration::hours(1),
            export_ttl: Duration::days(7),
            expected_completion: Duration::minutes(5),
            callbacks: CallbackConfig::default(),
        }
    }
}

impl PrivacyConfig {
    pub fn hasher(&self) -> Hasher {
        let key = if self.hash_key.is_empty() { DEVELOPMENT_HASH_KEY } else { &self.hash_key };
        Hasher { key: key.as_bytes().into() }
    }

    pub fn validate(&self, errors: &mut Vec<crate::ConfigError>) {
        for (name, d) in [
            ("marker_ttl", self.marker_ttl),
            ("timeout", self.timeout),
            ("export_ttl", self.export_ttl),
            ("expected_completion", self.expected_completion),
        ] {
            if d.ms() <= 0 {
                errors.push(crate::topology::config_error(format!("privacy.{name}"), "must be positive"));
            }
        }
    }
}

/// Keyed hashes of identifiers and canonical ids: `hex(HMAC-SHA256(key, text))`, cut to
/// 128 bits. Without the key nobody can tell which email a hash stands for.
#[derive(Clone)]
pub struct Hasher {
    key: std::sync::Arc<[u8]>,
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hasher(..)")
    }
}

impl Hasher {
    pub fn hash(&self, text: &str) -> String {
        hex(&hmac_sha256(&self.key, &[text.as_bytes()])[..16])
    }
}

/// HMAC-SHA256 under `key` of the concatenated `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a request asks of one stage, travelling with it through the pipeline. It holds
/// no identifier: the stage is addressed by the canonical id it is keyed by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub request_id: String,
    #[serde(rename = "type")]
    pub kind: RequestType,
    /// Rectification: flattened attribute name → value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<serde_json::Map<String, Value>>,
    pub received_at: i64,
}

impl Order {
    pub fn erases(&self) -> bool {
        self.kind == RequestType::Erasure
    }

    /// The `events.resolved` record carrying this order to every customer stage at
    /// canonical id `target`.
    pub fn to_stages(&self, target: &str, at: i64) -> Resolved {
        Resolved {
            kind: Kind::Privacy,
            canonical_id: target.to_owned(),
            customer_id: None,
            at,
            body: serde_json::to_value(self).unwrap_or(Value::Null),
            stage: None,
        }
    }
}

/// One piece of a request's work, reported to the status actor. A request is complete
/// once its root (the customer actor's plan) and every part the root planned are in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub request_id: String,
    /// `admit` (intake), `root` (the plan), `identity/<partition>`, `<stage>/<hash>`.
    pub part: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,
    /// The root: every part that will report.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub planned: Vec<String>,
    /// The root: hashes of the subject's identifiers and canonical ids.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_hashes: Vec<String>,
    /// The root: why there is nothing to do (`never_seen`, `already_erased`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(flatten)]
    pub counts: Counts,
    /// Access and portability: this part's share of the export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<Value>,
}

/// What one part did, counted: the receipt adds them up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// `processor/store` → entries deleted (erasure) or read (access).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stores: BTreeMap<String, u64>,
    /// Topic → tombstones (or null records) written.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topics: BTreeMap<String, u64>,
    /// What was in flight and will not happen: `deferred_messages`, `journey_timers`, ...
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stopped: BTreeMap<String, u64>,
}

/// What intake knows of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Admission {
    #[serde(rename = "type")]
    pub kind: RequestType,
    /// Hash of the identifier the request named.
    pub subject: String,
    pub received_at: i64,
    pub expected_completion: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<String>,
}

impl Report {
    pub fn new(request_id: &str, part: impl Into<String>) -> Report {
        Report { request_id: request_id.to_owned(), part: part.into(), ..Report::default() }
    }

    /// The part id of `stage`'s work at canonical id `target`.
    pub fn stage_part(stage: &str, hasher: &Hasher, target: &str) -> String {
        format!("{stage}/{}", hasher.hash(target))
    }

    pub fn deleted(&mut self, processor: &str, store: &str, n: u64) {
        if n > 0 {
            *self.counts.stores.entry(format!("{processor}/{store}")).or_default() += n;
        }
    }

    pub fn tombstoned(&mut self, topic: &str, n: u64) {
        if n > 0 {
            *self.counts.topics.entry(topic.to_owned()).or_default() += n;
        }
    }

    pub fn stopped(&mut self, what: &str, n: u64) {
        if n > 0 {
            *self.counts.stopped.entry(what.to_owned()).or_default() += n;
        }
    }

    /// Send the report to the status actor (keyed by request id on `events.resolved`).
    pub fn send(&self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        ctx.emit_json(RESOLVED_TOPIC, &self.request_id, &self.to_resolved(ctx.now))
    }

    /// Send the report to the status actor of every partition.
    pub fn broadcast(&self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        let bytes = serde_json::to_vec(&self.to_resolved(ctx.now))
            .map_err(|e| ProcessError::Encode { what: RESOLVED_TOPIC.into(), message: e.to_string() })?;
        for partition in 0..ctx.partitions(RESOLVED_TOPIC) {
            ctx.emit(RESOLVED_TOPIC, self.request_id.as_bytes(), Some(bytes.clone()), Some(partition));
        }
        Ok(())
    }

    fn to_resolved(&self, at: i64) -> Resolved {
        Resolved {
            kind: Kind::PrivacyReport,
            canonical_id: self.request_id.clone(),
            customer_id: None,
            at,
            body: serde_json::to_value(self).unwrap_or(Value::Null),
            stage: Some(NAME.to_owned()),
        }
    }
}

/// Store key prefix of erasure markers in every customer stage's store.
const MARKER_PREFIX: &str = "erased:";

/// The canonical ids a customer stage has erased, by hash, with when each marker
/// expires: records still in flight for them (forwarded after a merge, resolved before
/// the erasure reached identity) are dropped instead of recreating the customer. Kept
/// in memory, loaded from the stage's store when the task starts.
#[derive(Debug)]
pub struct Erased {
    hasher: Hasher,
    ttl: i64,
    store: &'static str,
    markers: HashMap<String, i64>,
}

impl Erased {
    pub fn new(config: &PrivacyConfig, store: &'static str) -> Erased {
        Erased { hasher: config.hasher(), ttl: config.marker_ttl.ms(), store, markers: HashMap::new() }
    }

    pub fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    /// Read the markers of this task's store (from `Processor::init`).
    pub fn load(&mut self, ctx: &mut Ctx<'_>) -> Result<(), ProcessError> {
        self.markers.clear();
        let mut after: Option<String> = None;
        loop {
            let rows = ctx.scan_after(self.store, MARKER_PREFIX, after.as_deref(), 1024)?;
            let Some((last, _)) = rows.last() else { return Ok(()) };
            after = Some(last.clone());
            for (key, bytes) in &rows {
                let until: i64 = crate::cache::decode(bytes).unwrap_or(i64::MAX);
                self.markers.insert(key[MARKER_PREFIX.len()..].to_owned(), until);
            }
        }
    }

    /// Remember that `canonical` was erased (a changelogged, expiring store entry).
    pub fn mark(&mut self, ctx: &mut Ctx<'_>, canonical: &str) -> Result<(), ProcessError> {
        let hash = self.hasher.hash(canonical);
        let until = ctx.now.saturating_add(self.ttl);
        ctx.put_json_expiring(self.store, &format!("{MARKER_PREFIX}{hash}"), &until, until)?;
        self.markers.insert(hash, until);
        Ok(())
    }

    /// Whether a record for `canonical` must be dropped. Costs nothing until something
    /// was erased.
    pub fn holds(&self, canonical: &str, now: i64) -> bool {
        !self.markers.is_empty() && self.markers.get(&self.hasher.hash(canonical)).is_some_and(|until| *until > now)
    }

    /// The sweep deleted a marker.
    pub fn forget_expired(&mut self, key: &[u8]) {
        if let Some(hash) = key.strip_prefix(MARKER_PREFIX.as_bytes()) {
            self.markers.remove(String::from_utf8_lossy(hash).as_ref());
        }
    }
}

/// Delete `key` from `store` if present; 1 when something was deleted.
pub fn delete_counted(ctx: &mut Ctx<'_>, store: &str, key: &str) -> Result<u64, ProcessError> {
    if ctx.get_bytes(store, key.as_bytes())?.is_none() {
        return Ok(0);
    }
    ctx.delete(store, key)?;
    Ok(1)
}

/// Cancel every timer of `key` in this member; how many there were.
pub fn cancel_timers(ctx: &mut Ctx<'_>, key: &str) -> Result<u64, ProcessError> {
    let due = ctx.timers_for(key.as_bytes())?;
    for at in &due {
        ctx.cancel(*at, key.as_bytes())?;
    }
    Ok(due.len() as u64)
}

/// A customer stage's share of an order at canonical id `target`, for a stage that keeps
/// the customer under `target` in `store`: the state is read (access, portability) or
/// deleted with its forwarding pointer and timers, and the marker set (erasure). The
/// caller adds what is particular to it (its output topic, other stores) to the report,
/// then sends it. Returns the report and the state found.
pub fn stage_order(
    ctx: &mut Ctx<'_>,
    stage: &str,
    store: &str,
    erased: &mut Erased,
    order: &Order,
    target: &str,
) -> Result<(Report, Option<Value>), ProcessError> {
    let mut report = Report::new(&order.request_id, Report::stage_part(stage, erased.hasher(), target));
    let state = ctx.read_json(store, target, |v: &Value| v.clone())?;
    if order.erases() {
        let forward = crate::resolved::forward_key(target);
        let deleted = delete_counted(ctx, store, target)? + delete_counted(ctx, store, &forward)?;
        report.deleted(stage, store, deleted);
        report.stopped(&format!("{stage}_timers"), cancel_timers(ctx, target)?);
        erased.mark(ctx, target)?;
    } else if order.kind.exports() && state.is_some() {
        report.deleted(stage, store, 1);
    }
    Ok((report, state))
}

#[cfg(test)]
mod tests {
    use super::CallbackConfig;

    #[test]
    fn callback_hosts_allow_exact_names_and_subdomains_only() {
        let open = CallbackConfig::default();
        assert!(open.allows("https://anything.test/hook"));
        let config = CallbackConfig { hosts: vec!["hooks.example.com".into(), "*.corp.test".into()], ..open };
        assert!(config.allows("https://hooks.example.com/privacy"));
        assert!(config.allows("https://HOOKS.example.com:8443/privacy"));
        assert!(config.allows("https://a.corp.test/x"));
        assert!(config.allows("https://a.b.corp.test/x"));
        assert!(!config.allows("https://corp.test/x"));
        assert!(!config.allows("https://evilcorp.test/x"));
        assert!(!config.allows("https://hooks.example.com.evil.test/x"));
        assert!(!config.allows("https://hooks.example.com@evil.test/x"));
        assert!(!config.allows("https://169.254.169.254/latest"));
    }
}
