//! Status callbacks of data subject requests.
//!
//! Every status change of a request is a record on `privacy.results`, keyed by request
//! id. When the request named a `status_callback_url`, this dispatcher POSTs the record
//! there, signed:
//!
//! ```text
//! X-Chorus-Timestamp: <unix seconds of this attempt>
//! X-Chorus-Signature: sha256=<hex HMAC-SHA256(privacy.callbacks.secret, timestamp + "." + body)>
//! X-Chorus-Delivery:  <request_id>:<status>
//! ```
//!
//! A non-2xx answer or a network error is retried with exponential backoff
//! (`privacy.callbacks.backoff`, doubling up to `max_backoff`, `max_attempts` in all).
//! The status changes of one request are delivered in order, one at a time; different
//! requests do not wait for each other. Offsets are committed (consumer group
//! `<application>-privacy-callbacks`) only up to the last record whose delivery
//! succeeded or was given up, so a restart delivers again what was not finished:
//! delivery is at least once, and receivers deduplicate on `X-Chorus-Delivery`.

use crate::metrics::metrics;
use anyhow::{Context, Result};
use chorus_processors::privacy::{self, CallbackConfig};
use chorus_processors::topology::Topology;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Deliveries in flight at once (each a different request).
const IN_FLIGHT: usize = 256;

/// One status change to deliver.
struct Delivery {
    partition: i32,
    offset: i64,
    request_id: String,
    url: String,
    delivery_id: String,
    body: Arc<[u8]>,
}

/// Start the dispatcher on a thread of its own; it stops when `stop` is set, leaving
/// unfinished deliveries uncommitted.
pub fn start(brokers: &str, topology: &Topology, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let topic = topology.physical_topic(privacy::RESULTS_TOPIC).into_owned();
    let consumer: StreamConsumer = crate::kafka::client_config(brokers)
        .set("group.id", format!("{}-privacy-callbacks", topology.application_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .context("cannot create the privacy callback consumer")?;
    consumer.subscribe(&[&topic]).with_context(|| format!("cannot subscribe the privacy callbacks to {topic}"))?;
    let config = topology.privacy.callbacks.clone();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let dispatcher = Dispatcher::new(config)?;
    Ok(std::thread::Builder::new()
        .name("chorus-privacy-callbacks".into())
        .spawn(move || runtime.block_on(dispatcher.run(consumer, topic, stop)))?)
}

struct Dispatcher {
    client: reqwest::Client,
    config: Arc<CallbackConfig>,
    secret: Arc<[u8]>,
}

impl Dispatcher {
    fn new(config: CallbackConfig) -> Result<Dispatcher> {
        let secret = match config.secret.as_str() {
            "" => privacy::DEVELOPMENT_CALLBACK_SECRET.as_bytes().into(),
            secret => secret.as_bytes().into(),
        };
        let client = reqwest::Client::builder()
            .user_agent(concat!("chorus/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_millis(config.timeout.ms().max(1) as u64))
            .build()
            .context("cannot create the privacy callback client")?;
        Ok(Dispatcher { client, config: Arc::new(config), secret })
    }

    async fn run(self, consumer: StreamConsumer, topic: String, stop: Arc<AtomicBool>) {
        let mut ledger = Ledger::default();
        // Deliveries waiting behind an earlier status change of the same request.
        let mut queued: HashMap<String, VecDeque<Delivery>> = HashMap::new();
        let mut in_flight = FuturesUnordered::new();
        while !stop.load(Ordering::SeqCst) {
            tokio::select! {
                message = consumer.recv(), if in_flight.len() < IN_FLIGHT => match message {
                    Ok(m) => {
                        let Some(delivery) = self.delivery_of(&m) else {
                            ledger.read(m.partition(), m.offset(), true);
                            continue;
                        };
                        ledger.read(delivery.partition, delivery.offset, false);
                        let waiting = queued.entry(delivery.request_id.clone()).or_default();
                        waiting.push_back(delivery);
                        if waiting.len() == 1 {
                            let first = waiting.front().map(|d| self.attempts(d));
                            in_flight.extend(first);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "privacy callbacks: cannot read {topic}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                Some((partition, offset, request_id)) = in_flight.next() => {
                    ledger.finished(partition, offset);
                    if let Some(waiting) = queued.get_mut(&request_id) {
                        waiting.pop_front();
                        match waiting.front() {
                            Some(next) => in_flight.push(self.attempts(next)),
                            None => { queued.remove(&request_id); }
                        }
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            ledger.commit(&consumer, &topic);
        }
    }

    /// The delivery a `privacy.results` record asks for, if it names a callback URL.
    fn delivery_of(&self, message: &rdkafka::message::BorrowedMessage<'_>) -> Option<Delivery> {
        let body = message.payload()?;
        let receipt: serde_json::Value = serde_json::from_slice(body).ok()?;
        let url = receipt.get("status_callback_url")?.as_str()?.to_owned();
        let request_id = receipt.get("request_id")?.as_str()?.to_owned();
        let status = receipt.get("status").and_then(|s| s.as_str()).unwrap_or("unknown");
        if !self.config.allows(&url) {
            metrics().privacy.callbacks.with_label_values(&["refused"]).inc();
            tracing::warn!(%request_id, "privacy callback refused: its host is not in privacy.callbacks.hosts");
            return None;
        }
        Some(Delivery {
            partition: message.partition(),
            offset: message.offset(),
            delivery_id: format!("{request_id}:{status}"),
            request_id,
            url,
            body: body.into(),
        })
    }

    /// Every attempt at one delivery, with backoff between them; resolves to the
    /// record's position and request once delivered or given up.
    fn attempts(&self, delivery: &Delivery) -> impl std::future::Future<Output = (i32, i64, String)> + 'static {
        let client = self.client.clone();
        let config = self.config.clone();
        let secret = self.secret.clone();
        let (partition, offset, request_id) = (delivery.partition, delivery.offset, delivery.request_id.clone());
        let (url, delivery_id, body) = (delivery.url.clone(), delivery.delivery_id.clone(), delivery.body.clone());
        async move {
            let attempts = config.max_attempts.max(1);
            for attempt in 1..=attempts {
                let outcome = post(&client, &secret, &url, &delivery_id, &body).await;
                match outcome {
                    Ok(()) => {
                        metrics().privacy.callbacks.with_label_values(&["delivered"]).inc();
                        tracing::debug!(delivery = %delivery_id, attempt, "privacy callback delivered");
                        return (partition, offset, request_id);
                    }
                    Err(reason) if attempt < attempts => {
                        metrics().privacy.callbacks.with_label_values(&["retried"]).inc();
                        let wait = backoff(&config, attempt);
                        tracing::info!(delivery = %delivery_id, attempt, %reason, retry_in_ms = wait.as_millis() as u64, "privacy callback failed");
                        tokio::time::sleep(wait).await;
                    }
                    Err(reason) => {
                        metrics().privacy.callbacks.with_label_values(&["failed"]).inc();
                        tracing::warn!(delivery = %delivery_id, attempts, %reason, "privacy callback given up");
                    }
                }
            }
            (partition, offset, request_id)
        }
    }
}

/// The wait after failed attempt `attempt` (1-based): `backoff · 2^(attempt-1)`, at most
/// `max_backoff`.
fn backoff(config: &CallbackConfig, attempt: u32) -> Duration {
    let base = config.backoff.ms().max(1) as u64;
    let cap = config.max_backoff.ms().max(1) as u64;
    Duration::from_millis(base.saturating_mul(1u64 << (attempt - 1).min(40)).min(cap))
}

/// One signed POST; the reason it failed, without the URL (it may carry a token).
async fn post(
    client: &reqwest::Client,
    secret: &[u8],
    url: &str,
    delivery_id: &str,
    body: &Arc<[u8]>,
) -> Result<(), String> {
    let timestamp = (crate::kafka::now_ms() / 1000).to_string();
    let signature = signature(secret, &timestamp, body);
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-chorus-timestamp", &timestamp)
        .header("x-chorus-signature", format!("sha256={signature}"))
        .header("x-chorus-delivery", delivery_id)
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    match response.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("answered {status}")),
    }
}

/// `hex(HMAC-SHA256(secret, timestamp + "." + body))`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    privacy::hex(&privacy::hmac_sha256(secret, &[timestamp.as_bytes(), b".", body]))
}

/// Per partition, the offsets read and whether their delivery is finished: the
/// committed offset never passes an unfinished one.
#[derive(Default)]
struct Ledger {
    partitions: BTreeMap<i32, BTreeMap<i64, bool>>,
}

impl Ledger {
    fn read(&mut self, partition: i32, offset: i64, finished: bool) {
        self.partitions.entry(partition).or_default().insert(offset, finished);
    }

    fn finished(&mut self, partition: i32, offset: i64) {
        if let Some(done) = self.partitions.get_mut(&partition).and_then(|p| p.get_mut(&offset)) {
            *done = true;
        }
    }

    /// Forget the finished offsets at the head of each partition; the offsets to commit
    /// (one past the last of them) for the partitions that advanced.
    fn advance(&mut self) -> BTreeMap<i32, i64> {
        let mut committable = BTreeMap::new();
        for (partition, offsets) in &mut self.partitions {
            while let Some(entry) = offsets.first_entry() {
                if !*entry.get() {
                    break;
                }
                committable.insert(*partition, *entry.key() + 1);
                entry.remove();
            }
        }
        committable
    }

    /// Commit each partition up to its first unfinished offset.
    fn commit(&mut self, consumer: &StreamConsumer, topic: &str) {
        let committable = self.advance();
        if committable.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in committable {
            let _ = list.add_partition_offset(topic, partition, Offset::Offset(offset));
        }
        if let Err(e) = consumer.commit(&list, CommitMode::Async) {
            // A partition moved to another member: it delivers from the last commit.
            tracing::debug!(error = %e, "privacy callbacks: commit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // The expected value is Python's hmac.new(key, ts + b"." + body, sha256).hexdigest().
        let body = br#"{"request_id":"r1","status":"completed"}"#;
        assert_eq!(
            signature(b"whsec_test", "1700000000", body),
            "b72cfb40e62f299fc7c1351c1eb7c0b902645f5aa28228fd94aedeec9f5dd7f2"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = CallbackConfig {
            backoff: chorus_processors::topology::Duration::parse("1s").unwrap(),
            max_backoff: chorus_processors::topology::Duration::parse("5s").unwrap(),
            ..CallbackConfig::default()
        };
        let waits: Vec<u64> = (1..=5).map(|a| backoff(&config, a).as_millis() as u64).collect();
        assert_eq!(waits, [1_000, 2_000, 4_000, 5_000, 5_000]);
        assert_eq!(backoff(&config, 64).as_millis(), 5_000);
    }

    #[test]
    fn ledger_commits_only_past_finished_offsets() {
        let mut ledger = Ledger::default();
        for offset in 0..4 {
            ledger.read(0, offset, offset == 1);
        }
        ledger.read(1, 7, true);
        ledger.finished(0, 2);
        assert_eq!(ledger.advance(), BTreeMap::from([(1, 8)]), "offset 0 is unfinished: nothing passes it");
        ledger.finished(0, 0);
        assert_eq!(ledger.advance(), BTreeMap::from([(0, 3)]), "0, 1 and 2 are finished, 3 is not");
        assert_eq!(ledger.advance(), BTreeMap::new());
        ledger.finished(0, 3);
        assert_eq!(ledger.advance(), BTreeMap::from([(0, 4)]));
    }
}
