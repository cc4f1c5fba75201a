//! The real binary against the embedded broker (`chorus up`): external clients produce
//! through the CLI, results are read back from topics and over HTTP.

mod common;

use common::*;
use serde_json::{json, Value};

#[test]
fn ten_thousand_events_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let topology = test_topology(dir.path());
    let chorus = Chorus::up(&dir.path().join("data"), &topology);
    let (events, expected) = workload(10_000, 50);
    produce(chorus.bootstrap(), "events.raw", &events);
    // Redelivered events are processed once.
    produce(chorus.bootstrap(), "events.raw", &events[5_000..5_100]);
    eventually(120, "profiles to reflect all 10,000 events", || profiles_match(chorus.http(), &expected));

    // The anonymous mobile visit merged into the customer: any identifier answers.
    let (status, by_anon) = get_json(&format!("{}/v1/profiles/anonymous_id:anon-7", chorus.http()));
    assert_eq!(status, 200);
    assert_eq!(by_anon["customer_id"], "c7");
    let canonical = by_anon["canonical_id"].as_str().unwrap();
    let (status, by_canonical) = get_json(&format!("{}/v1/profiles/{canonical}", chorus.http()));
    assert_eq!(status, 200);
    assert_eq!(by_canonical["customer_id"], "c7");
    let (status, context) = get_json(&format!("{}/v1/context/c7", chorus.http()));
    assert_eq!(status, 200, "{context}");
    assert!(context["recent_interactions"].as_array().unwrap().len() <= 50);
    let (status, missing) = get_json(&format!("{}/v1/profiles/nobody", chorus.http()));
    assert_eq!(status, 404);
    assert_eq!(missing["error"]["code"], "not_found");

    // Profiles on the topic agree with the API (latest per key).
    let records = tail(chorus.bootstrap(), "profiles", 3_000);
    let latest = latest_by_key(records);
    assert_eq!(latest.len(), expected.len());
    for p in latest.values() {
        let customer = p["customer_id"].as_str().unwrap();
        assert_eq!(totals(p), expected[customer]);
    }
    let merges = tail(chorus.bootstrap(), "identity.merges", 1_000);
    assert_eq!(merges.len(), 0, "anonymous ids were linked on first login, before any second component existed");
    chorus.stop();
}

#[test]
fn bad_input_lands_in_the_dlq_and_decisions_follow_consent() {
    let dir = tempfile::tempdir().unwrap();
    let topology = test_topology(dir.path());
    let chorus = Chorus::up(&dir.path().join("data"), &topology);
    let raw = |line: &str| {
        let mut child = std::process::Command::new(bin())
            .args([
                "produce",
                "events.raw",
                "--brokers",
                chorus.bootstrap(),
                "--topology",
                topology.to_str().unwrap(),
                "--no-validate",
            ])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(line.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());
    };
    raw("{not json\n");
    raw(&format!(
        "{}\n",
        json!({"event_id": "x1", "event_type": "teleported", "timestamp": ts(T0), "customer_id": "c1"})
    ));
    raw(&format!(
        "{}\n",
        json!({"event_id": "x2", "event_type": "page.viewed", "timestamp": "yesterday", "customer_id": "c1"})
    ));
    let dlq = eventually(60, "three DLQ records", || {
        let r = tail(chorus.bootstrap(), "events.dlq", 1_500);
        (r.len() >= 3).then_some(r)
    });
    // The DLQ is keyed by the original key, so records of different keys sit on
    // different partitions: compare as a set.
    let mut reasons: Vec<&str> = dlq.iter().map(|r| r["value"]["reason"].as_str().unwrap()).collect();
    reasons.sort();
    assert_eq!(reasons, ["invalid_event", "invalid_json", "unknown_event_type"]);
    let invalid_json = dlq.iter().find(|r| r["value"]["reason"] == "invalid_json").unwrap();
    assert_eq!(invalid_json["value"]["original_base64"], "e25vdCBqc29u");

    // HTTP intake validates before anything is written.
    let client = client();
    let bad = client
        .post(format!("{}/v1/events", chorus.http()))
        .body(r#"{"event_id":"e","event_type":"page.viewed","timestamp":5}"#)
        .send()
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let body: Value = bad.json().unwrap();
    assert_eq!(body["error"]["code"], "invalid_event");
    assert!(body["error"]["message"].as_str().unwrap().contains("timestamp"));
    let good = client
        .post(format!("{}/v1/events", chorus.http()))
        .body(json!({"batch": [{"event_id": "h1", "event_type": "identify", "timestamp": ts(T0), "customer_id": "c1", "traits": {"email": "Ann@Example.com"}}]}).to_string())
        .send()
        .unwrap();
    assert_eq!(good.status().as_u16(), 202);

    produce(
        chorus.bootstrap(),
        "messages.requests",
        &[
            json!({"request_id": "r1", "timestamp": ts(T0 + 1), "customer_id": "c1", "category": "promotional", "campaign_id": "spring", "content_id": "cart_reminder", "channels": ["email"]}),
        ],
    );
    eventually(60, "r1 suppressed", || {
        (tail(chorus.bootstrap(), "decisions.suppressed", 1_000).len() == 1).then_some(())
    });
    produce(
        chorus.bootstrap(),
        "consent",
        &[
            json!({"identifiers": {"email": "ann@example.com"}, "purpose": "marketing_email", "granted": true, "timestamp": ts(T0 + 2), "source": "web_form"}),
        ],
    );
    produce(
        chorus.bootstrap(),
        "messages.requests",
        &[
            json!({"request_id": "r2", "timestamp": ts(T0 + 3), "customer_id": "c1", "category": "promotional", "campaign_id": "spring", "content_id": "cart_reminder", "channels": ["email"]}),
        ],
    );
    // r2 waits for its one-minute coordination window; event time moves with a tick.
    eventually(60, "r2 deferred", || (tail(chorus.bootstrap(), "decisions.deferred", 1_000).len() == 1).then_some(()));
    tick(chorus.bootstrap(), &topology, T0 + 3 + 60_000);
    let sent = eventually(60, "r2 sent on email", || {
        let r = tail(chorus.bootstrap(), "decisions.email", 1_000);
        (r.len() == 1).then_some(r)
    });
    assert_eq!(sent[0]["value"]["request_id"], "r2");
    assert_eq!(sent[0]["value"]["customer_id"], "c1");
    let (_, metrics) = (0, client.get(format!("{}/metrics", chorus.http())).send().unwrap().text().unwrap());
    assert!(metrics.contains("chorus_dlq_total"), "metrics expose DLQ counts");
    assert!(metrics.contains("chorus_end_to_end_seconds"));
    chorus.stop();
}

#[test]
fn clean_restart_keeps_every_store() {
    let dir = tempfile::tempdir().unwrap();
    let topology = test_topology(dir.path());
    let data = dir.path().join("data");
    let (events, expected) = workload(4_000, 40);
    let first = Chorus::up(&data, &topology);
    produce(first.bootstrap(), "events.raw", &events[..2_000]);
    // Stop mid-stream: chorus finishes what it accepted before exiting.
    first.stop();
    let second = Chorus::up(&data, &topology);
    produce(second.bootstrap(), "events.raw", &events[2_000..]);
    // Events seen before the restart are still deduplicated after it.
    produce(second.bootstrap(), "events.raw", &events[..100]);
    eventually(120, "profiles equal to an uninterrupted run", || profiles_match(second.http(), &expected));
    second.stop();
}

#[test]
fn at_least_once_processing_gives_the_same_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let topology = test_topology(dir.path());
    let text =
        std::fs::read_to_string(&topology).unwrap().replace("processing: exactly_once", "processing: at_least_once");
    std::fs::write(&topology, text).unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &topology);
    let (events, expected) = workload(2_000, 20);
    produce(chorus.bootstrap(), "events.raw", &events);
    eventually(90, "profiles under at_least_once", || profiles_match(chorus.http(), &expected));
    chorus.stop();
}

/// Identifiers of one customer on different partitions of events.raw: the graph joins
/// them, the profile and the anonymous cart follow, the API shows how each identifier
/// was linked, and an operator's unlink splits one off for good.
#[test]
fn identity_links_across_partitions_and_unlinks_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(test_topology(dir.path())).unwrap();
    let topology = dir.path().join("topology4.yaml");
    std::fs::write(
        &topology,
        base.replace("{events.raw: 1, messages.requests: 1, consent: 1, privacy.requests: 1}", "{}"),
    )
    .unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &topology);
    let event = |id: &str, kind: &str, at: i64, ids: Value| {
        let mut e = json!({"event_id": id, "event_type": kind, "timestamp": ts(T0 + at), "payload": {"product_id": "p1", "price": 20.0, "quantity": 1}});
        for (k, v) in ids.as_object().unwrap() {
            e[k] = v.clone();
        }
        e
    };
    produce(
        chorus.bootstrap(),
        "events.raw",
        &[
            event("i1", "page.viewed", 0, json!({"anonymous_id": "web-9"})),
            event("i2", "cart.item_added", 1, json!({"anonymous_id": "app-9"})),
            event(
                "i3",
                "identify",
                2,
                json!({"customer_id": "u9", "anonymous_id": "web-9", "traits": {"email": " Nine@Example.com"}}),
            ),
            event(
                "i4",
                "app.opened",
                3,
                json!({"anonymous_id": "app-9", "identifiers": {"email": "nine@example.com"}}),
            ),
            event("i5", "page.viewed", 4, json!({"customer_id": "u9"})),
        ],
    );
    let http = chorus.http().to_owned();
    let linked = eventually(60, "four identifiers on one customer", || {
        let (status, v) = get_json(&format!("{http}/v1/identity/email/NINE@example.com"));
        (status == 200 && v["identifiers"].as_array().is_some_and(|a| a.len() == 4)).then_some(v)
    });
    assert_eq!(linked["customer_id"], "u9");
    let canonical = linked["canonical_id"].as_str().unwrap().to_owned();
    for id in linked["identifiers"].as_array().unwrap() {
        assert_eq!(id["rule"], "deterministic", "{id}");
        assert!(id["first_seen"].as_i64().unwrap() >= T0, "{id}");
    }
    // Any identifier answers with the same customer; each event counted once.
    let profile = eventually(60, "the profile to count all five events", || {
        let (status, p) = get_json(&format!("{http}/v1/profiles/anonymous_id:app-9"));
        (status == 200 && p["metrics"]["event_count"] == 5).then_some(p)
    });
    assert_eq!(profile["canonical_id"], canonical.as_str());
    // The anonymous app cart follows the customer to the web.
    let (status, context) = get_json(&format!("{http}/v1/context/web-9"));
    assert_eq!(status, 200);
    assert_eq!(context["cart"]["items"][0]["product_id"], "p1", "{context}");

    // Bad unlinks: a clear 4xx.
    let (status, e) = post_json(&format!("{http}/v1/identity/unlink"), &json!({"type": "shoe_size", "value": "9"}));
    assert_eq!((status, e["error"]["code"].as_str()), (400, Some("invalid_identifier")));
    let (status, e) =
        post_json(&format!("{http}/v1/identity/unlink"), &json!({"type": "email", "value": "nobody@x.com"}));
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, e) = post_json(&format!("{http}/v1/identity/unlink"), &json!({"value": "x"}));
    assert_eq!((status, e["error"]["code"].as_str()), (400, Some("invalid_request")));

    let (status, _) = post_json(
        &format!("{http}/v1/identity/unlink"),
        &json!({"type": "anonymous_id", "value": "app-9", "reason": "shared tablet"}),
    );
    assert_eq!(status, 202);
    let split = eventually(60, "app-9 to leave the customer", || {
        let (status, v) = get_json(&format!("{http}/v1/identity/anonymous_id/app-9"));
        (status == 200 && v["canonical_id"] != canonical.as_str()).then_some(v)
    });
    assert_eq!(split["excluded"][0], canonical.as_str());
    let merges = eventually(30, "the split on identity.merges", || {
        let r = tail(chorus.bootstrap(), "identity.merges", 1_000);
        r.iter().any(|m| m["value"]["rule"] == "unlink").then_some(r)
    });
    assert!(merges.iter().any(|m| m["value"]["rule"] == "deterministic"));
    let (_, metrics) = get_text(&format!("{http}/metrics"));
    for series in [
        "chorus_identity_merges_total{rule=\"deterministic\"}",
        "chorus_identity_resolution_rate",
        "chorus_identity_component_size_bucket",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
    chorus.stop();
}

/// A content item and a campaign produced at run time reach every partition: a view of
/// an outdoor product triggers the campaign, whose decision carries the item rendered
/// for email with the customer's name.
#[test]
fn campaigns_and_content_arrive_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let topology = test_topology(dir.path());
    let chorus = Chorus::up(&dir.path().join("data"), &topology);
    let item = json!({"id": "winter_sale", "title": "{{ customer.first_name | default('Hi') }}, the winter sale is on",
        "description": {"short": "Up to {{ vars.discount }} off {{ vars.event.category }} gear."},
        "cta": {"label": "Shop", "url": "https://shop.example/winter"}});
    produce_with(chorus.bootstrap(), &topology, "content", &[item]);
    let campaign = json!({"id": "outdoor_picks", "category": "service", "content": "winter_sale", "channels": ["email"],
        "trigger": {"event": "product.viewed", "if": "event.payload.category == \"outdoor\""},
        "variables": {"discount": "30%"}});
    produce_with(chorus.bootstrap(), &topology, "campaigns", &[campaign]);
    let identify = json!({"event_id": "i1", "event_type": "identify", "timestamp": ts(T0), "customer_id": "c1",
        "traits": {"email": "ann@example.com", "first_name": "Ann"}});
    produce_with(chorus.bootstrap(), &topology, "events.raw", &[identify]);
    eventually(60, "the profile", || (get_json(&format!("{}/v1/profiles/c1", chorus.http())).0 == 200).then_some(()));
    let view = |id: &str, category: &str, at: i64| {
        json!({"event_id": id, "event_type": "product.viewed", "timestamp": ts(at), "customer_id": "c1",
               "payload": {"product_id": format!("p-{id}"), "category": category}})
    };
    produce_with(
        chorus.bootstrap(),
        &topology,
        "events.raw",
        &[view("v1", "kitchen", T0 + 1_000), view("v2", "outdoor", T0 + 2_000)],
    );
    // The request waits for its coordination window; a tick moves event time past it.
    eventually(60, "the request deferred", || {
        (tail(chorus.bootstrap(), "decisions.deferred", 1_000).len() == 1).then_some(())
    });
    tick(chorus.bootstrap(), &topology, T0 + 2_000 + 60_000);
    let sent = eventually(60, "the campaign's email", || {
        let r = tail(chorus.bootstrap(), "decisions.email", 1_000);
        (r.len() == 1).then_some(r)
    });
    let decision = &sent[0]["value"];
    assert_eq!(decision["campaign_id"], "outdoor_picks");
    assert_eq!(decision["to"], "ann@example.com");
    assert_eq!(decision["content"]["content_id"], "winter_sale");
    assert_eq!(decision["content"]["subject"], "Ann, the winter sale is on");
    let text = decision["content"]["text"].as_str().unwrap();
    assert!(text.contains("Up to 30% off outdoor gear."), "{text}");
    let (_, metrics) = get_text(&format!("{}/metrics", chorus.http()));
    assert!(
        metrics.contains(r#"chorus_campaign_requests_total{campaign="outdoor_picks",trigger="event"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"chorus_catalog_changes_total{catalog="content",change="changed"} 1"#));
    chorus.stop();
}

/// Reads answer from the serving task's current state: with commits an hour apart
/// (at-least-once, so the identity stage's output is readable at once), a profile is
/// served as soon as its event is processed, while `?consistency=committed` still sees
/// nothing; after a clean stop (which commits) and a restart, committed reads see it.
#[test]
fn reads_see_processed_events_before_their_commit() {
    let dir = tempfile::tempdir().unwrap();
    let topology = test_topology(dir.path());
    let text = std::fs::read_to_string(&topology)
        .unwrap()
        .replace("processing: exactly_once", "processing: at_least_once")
        .replace("commit_interval: 100ms", "commit_interval: 1h")
        .replace("commit_latency_budget: 20ms", "commit_latency_budget: 1h");
    assert!(
        text.contains("commit_interval: 1h") && text.contains("commit_latency_budget: 1h"),
        "the shipped topology's commit settings changed: update this test"
    );
    std::fs::write(&topology, text).unwrap();
    let data = dir.path().join("data");
    let chorus = Chorus::up(&data, &topology);
    let (events, _) = workload(20, 1);
    produce(chorus.bootstrap(), "events.raw", &events);
    let http = chorus.http().to_owned();
    let live = eventually(60, "the live profile", || {
        let (status, p) = get_json(&format!("{http}/v1/profiles/c0"));
        (status == 200 && p["metrics"]["event_count"] == 20).then_some(p)
    });
    assert_eq!(live["customer_id"], "c0", "{live}");
    let (status, e) = get_json(&format!("{http}/v1/profiles/c0?consistency=committed"));
    assert_eq!((status, e["error"]["code"].as_str()), (404, Some("not_found")), "{e}");
    let (status, e) = get_json(&format!("{http}/v1/profiles/c0?consistency=sometimes"));
    assert_eq!((status, e["error"]["code"].as_str()), (400, Some("invalid_request")), "{e}");
    chorus.stop();
    let again = Chorus::up(&data, &topology);
    let url = format!("{}/v1/profiles/c0?consistency=committed", again.http());
    eventually(60, "the committed profile after the restart", || {
        let (status, p) = get_json(&url);
        (status == 200 && p["metrics"]["event_count"] == 20).then_some(())
    });
    again.stop();
}
