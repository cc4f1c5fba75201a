//! The real binary against a real Apache Kafka 4.x broker (KRaft, single node) started
//! by `scripts/kafka-local` for each test: clean restart, kill -9 and rebalance between
//! two members must all end exactly where an uninterrupted run ends.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Kafka broker of this test; stopped on drop.
struct Kafka {
    dir: PathBuf,
    bootstrap: String,
}

impl Kafka {
    fn start(dir: &Path) -> Kafka {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-local");
        let out = Command::new(&script)
            .args(["start", "--dir", dir.to_str().unwrap()])
            .output()
            .expect("scripts/kafka-local runs");
        assert!(out.status.success(), "kafka-local start failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let bootstrap = stdout
            .lines()
            .find_map(|l| l.strip_prefix("bootstrap: "))
            .unwrap_or_else(|| panic!("no bootstrap line in {stdout}"))
            .trim()
            .to_owned();
        Kafka { dir: dir.to_owned(), bootstrap }
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-local");
        let _ = Command::new(script).args(["stop", "--dir", self.dir.to_str().unwrap()]).output();
    }
}

fn setup(dir: &Path) -> (Kafka, PathBuf) {
    setup_with(dir, test_topology(dir))
}

fn setup_with(dir: &Path, topology: PathBuf) -> (Kafka, PathBuf) {
    let kafka = Kafka::start(&dir.join("kafka"));
    let out = Command::new(bin())
        .args(["topics", "create", "--brokers", &kafka.bootstrap, "--topology", topology.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "topics create failed: {}", String::from_utf8_lossy(&out.stderr));
    (kafka, topology)
}

/// Every event reaches events.resolved exactly once (read_committed).
fn assert_resolved_exactly_once(bootstrap: &str, events: &[Value]) {
    let resolved = tail(bootstrap, "events.resolved", 5_000);
    let mut seen = BTreeMap::new();
    for r in &resolved {
        if r["value"]["kind"] == "event" {
            let id = r["value"]["body"]["event_id"].as_str().unwrap().to_owned();
            *seen.entry(id).or_insert(0) += 1;
        }
    }
    let duplicates: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id.clone()).collect();
    assert!(duplicates.is_empty(), "duplicated on events.resolved: {:?}", &duplicates[..duplicates.len().min(10)]);
    let want: BTreeSet<String> = events.iter().map(|e| e["event_id"].as_str().unwrap().to_owned()).collect();
    let got: BTreeSet<String> = seen.keys().cloned().collect();
    let gaps: Vec<_> = want.difference(&got).collect();
    assert!(
        gaps.is_empty(),
        "{} of {} events missing from events.resolved ({} records read): {:?}",
        gaps.len(),
        want.len(),
        resolved.len(),
        &gaps[..gaps.len().min(10)]
    );
}

#[test]
fn run_restarts_cleanly_on_real_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, topology) = setup(dir.path());
    let data = dir.path().join("data");
    let (events, expected) = workload(3_000, 30);
    produce(&kafka.bootstrap, "events.raw", &events[..1_500]);
    let first = run_member(&kafka.bootstrap, &topology, &data, "a");
    eventually(90, "first half processed", || {
        let (s, p) = get_json(&format!("{}/v1/profiles/c0", first.http()));
        (s == 200 && p["metrics"]["event_count"].as_i64() == Some(50)).then_some(())
    });
    first.stop();
    produce(&kafka.bootstrap, "events.raw", &events[1_500..]);
    let second = run_member(&kafka.bootstrap, &topology, &data, "a");
    eventually(120, "profiles equal to an uninterrupted run", || profiles_match(second.http(), &expected));
    assert_resolved_exactly_once(&kafka.bootstrap, &events);
    second.stop();
}

/// The workload with merges: each customer also browses anonymously on the web first,
/// and a later login carries that web id, so the web visitor's customer merges into the
/// customer's (one merge per customer).
fn workload_with_merges(n: usize, customers: usize) -> (Vec<Value>, Expected) {
    let (mut events, mut expected) = workload(n, customers);
    let event = |id: String, at: i64, ids: Value| {
        let mut e = json!({"event_id": id, "event_type": "page.viewed", "timestamp": ts(T0 + at), "channel": "web", "payload": {}});
        for (k, v) in ids.as_object().unwrap() {
            e[k] = v.clone();
        }
        e
    };
    let web: Vec<Value> = (0..customers)
        .map(|c| event(format!("web-{c}"), c as i64, json!({"anonymous_id": format!("web-{c}")})))
        .collect();
    let logins: Vec<Value> = (0..customers)
        .map(|c| {
            event(
                format!("weblogin-{c}"),
                30_000 + c as i64,
                json!({"customer_id": format!("c{c}"), "anonymous_id": format!("web-{c}")}),
            )
        })
        .collect();
    let middle = events.len() / 2;
    events.splice(middle..middle, logins);
    events.splice(0..0, web);
    for c in 0..customers {
        expected.get_mut(&format!("c{c}")).unwrap().0 += 2;
    }
    (events, expected)
}

#[test]
fn kill_9_mid_stream_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, topology) = setup_with(dir.path(), four_partitions(dir.path()));
    let data = dir.path().join("data");
    let (events, expected) = workload_with_merges(6_000, 40);
    produce(&kafka.bootstrap, "events.raw", &events);
    let first = run_member(&kafka.bootstrap, &topology, &data, "a");
    eventually(90, "some progress", || {
        let (s, _) = get_json(&format!("{}/v1/profiles/c0", first.http()));
        (s == 200).then_some(())
    });
    first.kill9();
    let second = run_member(&kafka.bootstrap, &topology, &data, "a");
    eventually(180, "profiles equal to an uninterrupted run", || profiles_match(second.http(), &expected));
    assert_resolved_exactly_once(&kafka.bootstrap, &events);
    // The profile table on the topic agrees too (latest committed value per key).
    let latest = latest_by_key(tail(&kafka.bootstrap, "profiles", 3_000));
    for p in latest.values() {
        assert_eq!(totals(p), expected[p["customer_id"].as_str().unwrap()]);
    }
    // Each web visitor's customer merged exactly once, across the crash.
    let merges = tail(&kafka.bootstrap, "identity.merges", 3_000);
    let froms: BTreeSet<String> = merges.iter().map(|m| m["value"]["from"].as_str().unwrap().to_owned()).collect();
    assert_eq!((merges.len(), froms.len()), (40, 40), "one merge per customer, none repeated");
    second.stop();
}

#[test]
fn two_members_split_partitions_and_hand_over_state() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, topology) = setup_with(dir.path(), four_partitions(dir.path()));
    let (events, expected) = workload_with_merges(3_000, 30);
    let one = run_member(&kafka.bootstrap, &topology, &dir.path().join("one"), "one");
    let two = run_member(&kafka.bootstrap, &topology, &dir.path().join("two"), "two");
    produce(&kafka.bootstrap, "events.raw", &events[..1_500]);
    // Both members own part of the identity and of the profile partitions: the identity
    // graph's messages cross between the two processes.
    eventually(90, "both members processing", || {
        let owned = |http: &str, processor: &str, store: &str| {
            let text = client().get(format!("{http}/metrics")).send().ok()?.text().ok()?;
            let (p, s) = (format!("processor=\"{processor}\""), format!("store=\"{store}\""));
            Some(
                text.lines()
                    .filter(|l| l.starts_with("chorus_store_entries{") && l.contains(&p) && l.contains(&s))
                    .count(),
            )
        };
        for (processor, store) in [("profile", "profiles"), ("identity", "identity")] {
            let (a, b) = (owned(one.http(), processor, store)?, owned(two.http(), processor, store)?);
            if !(a > 0 && b > 0 && a + b == 4) {
                return None;
            }
        }
        Some(())
    });
    // Interactive queries: either member answers for every customer, wherever the
    // customer's partitions are, with the same profile.
    eventually(90, "the same profiles through either member", || {
        expected
            .keys()
            .all(|c| {
                let (s1, a) = get_json(&format!("{}/v1/profiles/{c}", one.http()));
                let (s2, b) = get_json(&format!("{}/v1/profiles/{c}", two.http()));
                s1 == 200 && s2 == 200 && totals(&a) == totals(&b)
            })
            .then_some(())
    });
    two.stop();
    produce(&kafka.bootstrap, "events.raw", &events[1_500..]);
    eventually(180, "member one serves every profile, equal to an uninterrupted run", || {
        profiles_match(one.http(), &expected)
    });
    assert_resolved_exactly_once(&kafka.bootstrap, &events);
    let merges = tail(&kafka.bootstrap, "identity.merges", 3_000);
    let froms: BTreeSet<String> = merges.iter().map(|m| m["value"]["from"].as_str().unwrap().to_owned()).collect();
    assert_eq!((merges.len(), froms.len()), (30, 30), "one merge per customer, none repeated");
    one.stop();
}

/// The cart-abandonment journey's one-hour wait is pending when the process dies
/// (kill -9): the restarted member restores the timer from the changelog and the
/// reminder goes out once, decided once, on real Kafka.
#[test]
fn a_pending_journey_timer_survives_kill_9_on_real_kafka() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, topology) = setup(dir.path());
    let data = dir.path().join("data");
    let shopper = json!({"event_id": "id-1", "event_type": "identify", "timestamp": ts(T0 - 60_000), "customer_id": "c1",
                         "traits": {"email": "c1@example.com"}});
    let cart = json!({"event_id": "cart-1", "event_type": "cart.item_added", "timestamp": ts(T0), "customer_id": "c1",
                      "channel": "mobile_app", "payload": {"product_id": "tent", "price": 300.0, "quantity": 1}});
    produce(&kafka.bootstrap, "events.raw", &[shopper]);
    let grant =
        json!({"customer_id": "c1", "purpose": "marketing_email", "granted": true, "timestamp": ts(T0 - 60_000)});
    produce(&kafka.bootstrap, "consent", &[grant]);
    produce(&kafka.bootstrap, "events.raw", &[cart]);
    let first = run_member(&kafka.bootstrap, &topology, &data, "a");
    eventually(90, "journey entered and waiting", || {
        let events = tail(&kafka.bootstrap, "journeys.events", 1_000);
        events.iter().any(|e| e["value"]["event"] == "step" && e["value"]["step"] == "wait_1h").then_some(())
    });
    first.kill9();
    let second = run_member(&kafka.bootstrap, &topology, &data, "a");
    tick(&kafka.bootstrap, &topology, T0 + 3_600_000);
    eventually(90, "reminder requested", || {
        let d = tail(&kafka.bootstrap, "decisions.deferred", 1_000);
        (!d.is_empty()).then_some(())
    });
    tick(&kafka.bootstrap, &topology, T0 + 3_600_000 + 60_000);
    let sent = eventually(90, "reminder sent", || {
        let r = tail(&kafka.bootstrap, "decisions.email", 1_000);
        (!r.is_empty()).then_some(r)
    });
    // Let anything duplicated show up before counting.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let sent_again = tail(&kafka.bootstrap, "decisions.email", 1_000);
    assert_eq!((sent.len(), sent_again.len()), (1, 1), "one reminder: {sent_again:?}");
    assert_eq!(sent_again[0]["value"]["journey_id"], "cart_abandonment");
    assert_eq!(sent_again[0]["value"]["to"], "c1@example.com");
    let steps: Vec<Value> = tail(&kafka.bootstrap, "journeys.events", 1_000)
        .into_iter()
        .filter(|e| e["value"]["step"] == "email_reminder")
        .collect();
    assert_eq!(steps.len(), 1, "the reminder step ran once: {steps:?}");
    second.stop();
}

/// A rejected record of nearly a megabyte: its dead letter (cut to 64 KiB with the
/// record's size and digest) is accepted by the broker, so the task neither aborts nor
/// stalls, and the events after it are processed.
#[test]
fn a_large_rejected_record_does_not_stall_the_pipeline() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let (kafka, topology) = setup(dir.path());
    let big = json!({"event_id": "big-1", "event_type": "no.such.type", "timestamp": ts(T0), "customer_id": "c1",
        "payload": {"blob": "y".repeat(900 * 1024)}});
    let next = json!({"event_id": "after-1", "event_type": "page.viewed", "timestamp": ts(T0 + 1), "customer_id": "c1",
        "payload": {"url": "/"}});
    let mut produce = Command::new(bin())
        .args(["produce", "events.raw", "--no-validate", "--brokers", &kafka.bootstrap, "--topology"])
        .arg(&topology)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    produce.stdin.take().unwrap().write_all(format!("{big}\n{next}\n").as_bytes()).unwrap();
    let out = produce.wait_with_output().unwrap();
    assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
    let member = run_member(&kafka.bootstrap, &topology, &dir.path().join("data"), "a");
    eventually(90, "the event after the large one to be processed", || {
        let (s, p) = get_json(&format!("{}/v1/profiles/c1", member.http()));
        (s == 200 && p["metrics"]["event_count"].as_i64() == Some(1)).then_some(())
    });
    let letters = tail(&kafka.bootstrap, "events.dlq", 3_000);
    assert_eq!(letters.len(), 1, "{} letters", letters.len());
    let letter = &letters[0]["value"];
    assert_eq!(letter["reason"], "unknown_event_type");
    assert_eq!(letter["original_truncated"], true);
    assert!(letter["original_bytes"].as_i64().unwrap() > 900 * 1024);
    assert!(letter["original_base64"].as_str().unwrap().len() < 100 * 1024);
    member.stop();
}

/// Every changelog topic of the topology.
fn changelog_topics(topology: &Path) -> Vec<String> {
    let out = Command::new(bin()).args(["topics", "list", "--topology", topology.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "topics list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["topic"].as_str().unwrap().to_owned())
        .filter(|t| t.ends_with("-changelog"))
        .collect()
}

/// The erasure scenario on real Kafka: after the erasure no store, no compacted topic
/// and no changelog holds anything of the subject's (the latest record of each of their
/// keys is a tombstone), nothing of theirs comes out, and a member that lost its whole
/// state dir restores from the changelogs with no trace of them either.
#[test]
fn erasure_leaves_no_trace_on_real_kafka_even_after_a_full_restore() {
    let dir = tempfile::tempdir().unwrap();
    let (kafka, topology) = setup(dir.path());
    let data = dir.path().join("data");
    let member = run_member(&kafka.bootstrap, &topology, &data, "a");
    let http = member.http().to_owned();
    let seeded = erasure::seed(&http, &kafka.bootstrap, &topology);
    let changelogs = changelog_topics(&topology);
    assert!(changelogs.len() >= 8, "{changelogs:?}");
    let mentions = |v: &Value| seeded.needles.iter().any(|n| v.to_string().contains(n.as_str()));
    let held: usize = changelogs
        .iter()
        .map(|t| latest_by_key(tail(&kafka.bootstrap, t, 500)).iter().filter(|(k, v)| mentions(&json!([k, v]))).count())
        .sum();
    assert!(held > 0, "the changelogs held the subject before the erasure");

    erasure::erase(&http);
    erasure::assert_erased_online(&http, &kafka.bootstrap, &topology, &seeded);
    for topic in &changelogs {
        let records = tail(&kafka.bootstrap, topic, 500);
        let keys: BTreeSet<String> = records
            .iter()
            .filter(|r| mentions(&r["key"]) || mentions(&r["value"]))
            .filter_map(|r| r["key"].as_str().map(str::to_owned))
            .collect();
        let latest = latest_by_key(records);
        let left: Vec<&String> = keys.iter().filter(|k| latest.contains_key(*k)).collect();
        assert!(left.is_empty(), "{topic}: the latest record of {left:?} is not a tombstone");
        let named: Vec<&String> = latest.iter().filter(|(k, v)| mentions(&json!([k, v]))).map(|(k, _)| k).collect();
        assert!(named.is_empty(), "{topic} still names the subject under {named:?}");
    }
    member.stop();
    erasure::assert_no_trace_on_disk(&data, &seeded);

    // The state dir is lost: the member restores every store from its changelog.
    std::fs::remove_dir_all(data.join("state")).unwrap();
    let member = run_member(&kafka.bootstrap, &topology, &data, "a");
    let http = member.http().to_owned();
    eventually(120, "the other customer restored", || {
        let (status, p) = get_json(&format!("{http}/v1/profiles/other1@example.com"));
        (status == 200 && p["metrics"]["event_count"] == 2).then_some(())
    });
    assert_eq!(get_json(&format!("{http}/v1/profiles/zq83@example.com")).0, 404);
    member.stop();
    erasure::assert_no_trace_on_disk(&data, &seeded);
}
