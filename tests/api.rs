//! The Customer 360, context, recommendation and content preview endpoints through the
//! real binary on the embedded broker, and interactive queries across two instances.

mod common;

use common::*;
use serde_json::{json, Value};

fn event(id: &str, kind: &str, at: i64, fields: Value) -> Value {
    let mut e = json!({"event_id": id, "event_type": kind, "timestamp": ts(T0 + at)});
    for (k, v) in fields.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

const MIN: i64 = 60_000;

/// One customer across channels: browsing on the app anonymously, logging in on the
/// web, buying, opening a campaign email, chatting with support, being shown an offer.
fn journey() -> Vec<Value> {
    let with = |base: &Value, extra: Value| {
        let mut f = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            f[k] = v.clone();
        }
        f
    };
    let app = json!({"anonymous_id": "app-1", "channel": "mobile_app", "session_id": "s-app"});
    let web_base = json!({"customer_id": "u1", "channel": "web", "session_id": "s-web"});
    let web = |extra: Value| with(&web_base, extra);
    vec![
        event(
            "e1",
            "product.viewed",
            0,
            with(&app, json!({"payload": {"product_id": "tent-1", "category": "outdoor", "price": 300.0}})),
        ),
        event(
            "e2",
            "cart.item_added",
            MIN,
            with(
                &app,
                json!({"payload": {"product_id": "stove-2", "category": "outdoor", "price": 80.0, "quantity": 2}}),
            ),
        ),
        event(
            "e3",
            "identify",
            2 * MIN,
            web(json!({"anonymous_id": "app-1", "traits": {"email": "Ann@Example.com", "name": "Ann Lee",
                "location": {"state": "QLD", "city": "Brisbane"}, "timezone": "Australia/Brisbane",
                "preferences": {"channels": ["email", "push"]}}})),
        ),
        event(
            "e4",
            "order.completed",
            3 * MIN,
            web(
                json!({"payload": {"order_id": "o1", "total": 12000.0, "category": "outdoor", "payment_method": "card",
                "items": [{"product_id": "tent-1", "category": "outdoor", "price": 300.0, "quantity": 1}]}}),
            ),
        ),
        event("e5", "order.returned", 4 * MIN, web(json!({"payload": {"order_id": "o1", "amount": 500.0}}))),
        event("e6", "email.opened", 5 * MIN, web(json!({"channel": "email", "payload": {"campaign_id": "spring"}}))),
        event(
            "e7",
            "product.viewed",
            6 * MIN,
            web(json!({"payload": {"product_id": "kayak-3", "category": "water", "price": 900.0}})),
        ),
        event(
            "e8",
            "cart.item_added",
            7 * MIN,
            web(json!({"payload": {"product_id": "paddle-4", "category": "water", "price": 50.0, "quantity": 1}})),
        ),
        event(
            "e9",
            "support.case_opened",
            8 * MIN,
            web(json!({"channel": "chat", "payload": {"case_id": "k1", "subject": "late delivery"}})),
        ),
        event(
            "e10",
            "chat.message",
            9 * MIN,
            web(json!({"channel": "chat", "payload": {"case_id": "k1", "text": "where is my tent?", "agent": "bot"}})),
        ),
        event("e11", "offer.presented", 10 * MIN, web(json!({"payload": {"offer_id": "free-shipping"}}))),
    ]
}

#[test]
fn every_customer_endpoint_answers_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &test_topology(dir.path()));
    let http = chorus.http().to_owned();
    produce(chorus.bootstrap(), "events.raw", &journey());
    // Personalisation reads the live context, which its own stage builds beside the
    // profile stage: wait for the context to reach the last event before reading the profile.
    let context = eventually(60, "the context to reach the last event", || {
        let (status, c) = get_json(&format!("{http}/v1/context/u1"));
        (status == 200 && c["engagements"]["offers"].as_array().is_some_and(|o| !o.is_empty())).then_some(c)
    });
    let profile = eventually(60, "every event on the profile", || {
        let (status, p) = get_json(&format!("{http}/v1/profiles/ann@example.com"));
        (status == 200 && p["metrics"]["event_count"] == 11).then_some(p)
    });
    let canonical = profile["canonical_id"].as_str().unwrap().to_owned();
    // Customer 360 in the seed's shape.
    assert_eq!(profile["customer_id"], "u1");
    assert_eq!(profile["identity"]["email"], "ann@example.com");
    assert_eq!(profile["attributes"]["location"]["state"], "QLD");
    assert_eq!(profile["metrics"]["lifetime_value"], 11500.0, "net of the return");
    assert_eq!(profile["metrics"]["purchase_count"], 1);
    assert_eq!(profile["metrics"]["last_purchase_category"], "outdoor");
    assert!(profile["metrics"]["churn_risk_score"].as_f64().unwrap() < 0.4, "{}", profile["metrics"]);
    assert_eq!(profile["behavioural"]["product_views"]["count"], 2);
    assert_eq!(profile["behavioural"]["cart_additions"]["count"], 2);
    assert_eq!(profile["transactional"]["orders"]["count"], 1);
    assert_eq!(profile["transactional"]["payment_method"], "card");
    assert_eq!(profile["transactional"]["returned_value"], 500.0);
    assert_eq!(profile["interaction"]["email_opens"]["count"], 1);
    assert_eq!(profile["preferences"]["timezone"], "Australia/Brisbane");
    assert_eq!(profile["preferences"]["communication"]["channels"], json!(["email", "push"]));
    assert_eq!(profile["recent_activity"][0]["type"], "offer.presented", "newest first");
    assert_eq!(profile["active_campaigns"][0]["campaign_id"], "spring");
    let segments = profile["segments"].as_array().unwrap();
    for s in ["high_value", "outdoor_enthusiast", "queensland"] {
        assert!(segments.contains(&json!(s)), "{s} in {segments:?}");
    }
    // Personalisation with the live context: the open support case comes first.
    let p13n = &profile["personalisation"];
    assert_eq!(p13n["personalised"], true);
    assert_eq!(p13n["next_best_action"], "resolve_support_case");
    assert_eq!(
        p13n["actions"],
        json!(["show_premium_collection", "show_outdoor_accessories", "show_local_store_promotions"])
    );
    assert_eq!(p13n["content"]["messaging"], json!({"id": "vip_tone", "source": "high_value"}));

    // Context: the anonymous app cart followed the customer to the web.
    let cart: Vec<&str> =
        context["cart"]["items"].as_array().unwrap().iter().map(|i| i["product_id"].as_str().unwrap()).collect();
    assert_eq!(cart, ["paddle-4"], "the order cleared the app cart; paddle-4 came after");
    assert_eq!(context["engagements"]["support_case"]["transcript"][0]["text"], "where is my tent?");
    assert_eq!(context["engagements"]["offers"][0]["offer_id"], "free-shipping");
    assert_eq!(context["session"]["categories"][0], "water");

    // Precomputed recommendations, adjusted in real time.
    produce(
        chorus.bootstrap(),
        "recommendations",
        &[json!({"canonical_id": canonical, "model": "als-v3", "items": [
            {"product_id": "tent-1", "score": 0.99, "category": "outdoor"},
            {"product_id": "paddle-4", "score": 0.95, "category": "water"},
            {"product_id": "lamp-5", "score": 0.9, "category": "outdoor"},
            {"product_id": "vest-6", "score": 0.7, "category": "water"}]})],
    );
    let recs = eventually(60, "the precomputed list to arrive", || {
        let (status, r) = get_json(&format!("{http}/v1/recommendations/app-1"));
        (status == 200 && r["model"] == "als-v3").then_some(r)
    });
    let ids: Vec<&str> = recs["items"].as_array().unwrap().iter().map(|i| i["product_id"].as_str().unwrap()).collect();
    assert!(!ids.contains(&"tent-1"), "purchased items are dropped: {ids:?}");
    assert!(!ids.contains(&"paddle-4"), "in-cart items are dropped: {ids:?}");
    assert_eq!(ids[..2], ["vest-6", "lamp-5"], "water was viewed this session: 0.7 × 1.5 beats 0.9");
    assert!(ids.contains(&"kayak-3"), "filled from popularity: {ids:?}");
    assert_eq!(recs["personalised"], true);

    // Consent: the defaults before any change, then a change through the API.
    let (status, consent) = get_json(&format!("{http}/v1/consent/ann@example.com"));
    assert_eq!(status, 200);
    assert_eq!(consent["purposes"]["personalisation"], json!({"granted": true, "default": true}));
    assert_eq!(consent["purposes"]["marketing_email"]["granted"], false, "marketing is opt-in");
    let put = |body: Value| {
        let r = client().put(format!("{http}/v1/consent/app-1")).json(&body).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap_or(Value::Null))
    };
    let (status, e) = put(json!({"purposes": {"marketing_fax": true}}));
    assert_eq!((status, e["error"]["code"].as_str()), (400, Some("unknown_purpose")));
    let (status, e) = put(json!({"purpose": "analytics"}));
    assert_eq!((status, e["error"]["code"].as_str()), (400, Some("invalid_request")));
    // Without personalisation consent: popular items, and the answer says so.
    let (status, accepted) = put(json!({"purposes": {"personalisation": false, "marketing_email": true},
        "source": "preference_centre", "timestamp": ts(T0 + 11 * MIN)}));
    assert_eq!(status, 202, "{accepted}");
    let consent = eventually(60, "the consent change to land", || {
        let (_, c) = get_json(&format!("{http}/v1/consent/u1"));
        (c["purposes"]["personalisation"]["granted"] == false).then_some(c)
    });
    assert_eq!(consent["purposes"]["marketing_email"]["source"], "preference_centre");
    assert_eq!(consent["purposes"]["marketing_email"]["at"], T0 + 11 * MIN);
    assert_eq!(consent["history"].as_array().unwrap().len(), 2);
    let generic = eventually(60, "consent withdrawal to apply", || {
        let (status, r) = get_json(&format!("{http}/v1/recommendations/u1"));
        (status == 200 && r["personalised"] == false).then_some(r)
    });
    assert_eq!(generic["reason"], "no_personalisation_consent");
    assert!(generic["items"].as_array().unwrap().iter().all(|i| i["source"] == "popular"));
    let (_, profile) = get_json(&format!("{http}/v1/profiles/u1"));
    assert_eq!(profile["personalisation"]["reason"], "no_personalisation_consent");

    // Errors: unknown customers are 404 with a JSON error.
    for route in ["profiles", "context", "recommendations", "consent"] {
        let (status, e) = get_json(&format!("{http}/v1/{route}/nobody@example.com"));
        assert_eq!((status, e["error"]["code"].as_str()), (404, Some("not_found")), "{route}");
    }
    let (status, members) = get_json(&format!("{http}/v1/instances"));
    assert_eq!(status, 200);
    assert_eq!(members["instances"].as_array().unwrap().len(), 1, "{members}");
    let (_, metrics) = get_text(&format!("{http}/metrics"));
    for series in [
        "chorus_personalisation_coverage",
        "chorus_personalisation_interactions_total{outcome=\"personalised\"}",
        "chorus_personalisation_served_total{endpoint=\"recommendations\",outcome=\"generic\"}",
        "chorus_store_bytes{",
        "chorus_end_to_end_seconds_bucket{processor=\"context\"",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
    // A body over the limit is refused with the API's JSON error, like every other.
    let huge = format!("{{\"batch\": [\"{}\"]}}", "x".repeat(5 << 20));
    let r = client().post(format!("{http}/v1/events")).body(huge).send().unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["code"], "payload_too_large", "{e}");
    chorus.stop();
}

#[test]
fn content_previews_render_items_for_a_channel_and_a_customer() {
    let dir = tempfile::tempdir().unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &test_topology(dir.path()));
    let http = chorus.http().to_owned();
    let preview = |id: &str, params: &[(&str, &str)]| {
        let url = reqwest::Url::parse_with_params(&format!("{http}/v1/content/{id}"), params).unwrap();
        get_json(url.as_str())
    };

    // A built-in item without a customer: templates see no customer fields.
    let (status, p) = eventually(30, "the orchestrator's stores to be served", || {
        Some(preview("cart_reminder", &[("channel", "email")])).filter(|(status, _)| *status != 503)
    });
    assert_eq!(status, 200, "{p}");
    assert_eq!((p["content_id"].as_str(), p["channel"].as_str()), (Some("cart_reminder"), Some("email")));
    assert_eq!((&p["canonical_id"], &p["personalised"]), (&Value::Null, &json!(false)));
    assert_eq!(p["rendered"]["subject"], "Hi, your cart is waiting");
    assert_eq!(p["rendered"]["content_id"], "cart_reminder", "as a decision carries it");

    // A customer: personalised from the profile the orchestrator mirrors, by any identifier.
    let identify = event(
        "id-ann",
        "identify",
        0,
        json!({"customer_id": "u7", "traits": {"first_name": "Ann", "email": "ann@example.com"}}),
    );
    produce(chorus.bootstrap(), "events.raw", &[identify]);
    let p = eventually(30, "the preview to greet the customer", || {
        let (status, p) = preview("cart_reminder", &[("channel", "email"), ("customer", "ann@example.com")]);
        (status == 200 && p["rendered"]["subject"] == "Ann, your cart is waiting").then_some(p)
    });
    assert_eq!(p["personalised"], true);
    let canonical = p["canonical_id"].as_str().unwrap().to_owned();
    let text = p["rendered"]["text"].as_str().unwrap();
    assert!(text.contains(&format!("cart?c={canonical}")), "{text}");
    let (status, by_id) = preview("cart_reminder", &[("channel", "email"), ("customer", "u7")]);
    assert_eq!((status, &by_id), (200, &p), "the same preview by customer id");

    // Items published at run time, with the request variables.
    let winter = json!({"id": "winter_sale", "title": "{{ customer.first_name }}, the winter sale is on",
        "description": {"short": "Up to {{ vars.discount }} off coats."},
        "cta": {"label": "Shop", "url": "https://shop.example/winter"}});
    let link = json!({"id": "link_out", "title": "Go", "cta": {"label": "Open", "url": "{{ vars.link }}"}});
    produce(chorus.bootstrap(), "content", &[winter, link]);
    let vars = json!({"discount": "30%"}).to_string();
    let sms = eventually(30, "the published item to render", || {
        let (status, p) = preview("winter_sale", &[("channel", "sms"), ("customer", "u7"), ("vars", &vars)]);
        (status == 200).then_some(p)
    });
    let text = sms["rendered"]["text"].as_str().unwrap();
    assert!(text.starts_with("Ann, the winter sale is on"), "{text}");
    assert!(text.contains("Up to 30% off coats."), "{text}");
    assert_eq!(
        (sms["rendered"]["encoding"].as_str(), sms["rendered"]["content_id"].as_str()),
        (Some("GSM-7"), Some("winter_sale"))
    );
    // An item that does not render (a link from a variable that is no link): a decision
    // would be suppressed with this reason.
    eventually(30, "the second item to arrive", || (preview("link_out", &[("channel", "sms")]).0 == 200).then_some(()));
    let script = json!({"link": "javascript:alert(1)"}).to_string();
    let (status, e) = preview("link_out", &[("channel", "sms"), ("vars", &script)]);
    assert_eq!((status, e["error"]["code"].as_str()), (422, Some("content_error")), "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("`cta.url` rendered to \"javascript:alert(1)\""), "{e}");

    // Bad requests and unknown things: JSON errors.
    let error = |id: &str, params: &[(&str, &str)]| {
        let (status, e) = preview(id, params);
        (status, e["error"]["code"].as_str().unwrap_or_default().to_owned(), e["error"]["message"].clone())
    };
    let (status, code, message) = error("cart_reminder", &[("channel", "fax")]);
    assert_eq!((status, code.as_str()), (400, "invalid_channel"));
    assert!(message.as_str().unwrap().contains("email, push, sms, chat, web, in_app"), "{message}");
    let (status, code, _) = error("cart_reminder", &[]);
    assert_eq!((status, code.as_str()), (400, "invalid_request"), "no channel");
    for bad in ["not json", "[\"a list\"]"] {
        let (status, code, _) = error("cart_reminder", &[("channel", "sms"), ("vars", bad)]);
        assert_eq!((status, code.as_str()), (400, "invalid_request"), "vars={bad}");
    }
    let (status, code, _) = error("no_such_item", &[("channel", "email")]);
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (status, code, _) = error("cart_reminder", &[("channel", "email"), ("customer", "nobody@example.com")]);
    assert_eq!((status, code.as_str()), (404, "not_found"));

    // Without personalisation consent templates see who the message is for, no more.
    let withdraw = json!({"purpose": "personalisation", "granted": false});
    let r = client().put(format!("{http}/v1/consent/u7")).json(&withdraw).send().unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let generic = eventually(30, "the consent withdrawal to apply", || {
        let (status, p) = preview("cart_reminder", &[("channel", "email"), ("customer", "u7")]);
        (status == 200 && p["personalised"] == false).then_some(p)
    });
    assert_eq!(generic["rendered"]["subject"], "Hi, your cart is waiting");
    assert_eq!(generic["canonical_id"], canonical);

    let (_, metrics) = get_text(&format!("{http}/metrics"));
    for series in [
        "chorus_http_requests_total{route=\"/v1/content\",status=\"200\"}",
        "chorus_http_requests_total{route=\"/v1/content\",status=\"400\"}",
        "chorus_http_requests_total{route=\"/v1/content\",status=\"404\"}",
        "chorus_http_requests_total{route=\"/v1/content\",status=\"422\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
    chorus.stop();
}

/// Tasks of a processor open on an instance, from its `/v1/instances` entry.
fn tasks_of(http: &str, instance: &str, processor: &str) -> usize {
    let (_, v) = get_json(&format!("{http}/v1/instances"));
    v["instances"]
        .as_array()
        .and_then(|all| all.iter().find(|m| m["instance_id"] == instance))
        .and_then(|m| m["tasks"][processor].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn two_instances_answer_for_every_customer() {
    let dir = tempfile::tempdir().unwrap();
    let topology = four_partitions(dir.path());
    let broker = Chorus::start(&["broker", "--port", "0", "--topology", topology.to_str().unwrap()], false);
    let bootstrap = broker.bootstrap().to_owned();
    let one = run_member(&bootstrap, &topology, &dir.path().join("one"), "one");
    let two = run_member(&bootstrap, &topology, &dir.path().join("two"), "two");
    eventually(90, "both instances to serve part of every stage", || {
        ["identity", "profile", "context"]
            .iter()
            .all(|p| {
                let (a, b) = (tasks_of(one.http(), "one", p), tasks_of(one.http(), "two", p));
                a > 0 && b > 0 && a + b == 4
            })
            .then_some(())
    });
    let (events, expected) = workload(2_000, 40);
    produce(&bootstrap, "events.raw", &events);
    // Each instance answers for every customer, whichever instance holds the state.
    for http in [one.http(), two.http()] {
        eventually(120, "every profile from this instance", || profiles_match(http, &expected));
    }
    for c in 0..40 {
        let (s1, a) = get_json(&format!("{}/v1/context/c{c}", one.http()));
        let (s2, b) = get_json(&format!("{}/v1/context/anon-{c}", two.http()));
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(a, b, "the same context through either instance and either identifier");
        // Popularity adds up over every partition. In the workload every customer does
        // one kind of thing: those adding to carts (c % 4 == 2) hold all thirteen
        // products in their cart, buyers (c % 4 == 3) bought them all: nothing is left.
        let (s, r) = get_json(&format!("{}/v1/recommendations/c{c}", two.http()));
        assert_eq!(s, 200);
        let items = r["items"].as_array().unwrap();
        assert_eq!(items.is_empty(), c % 4 >= 2, "c{c}: {r}");
        assert!(items.iter().all(|i| i["source"] == "popular"));
    }
    // While the second instance leaves, answers are right or 503 with a retry hint,
    // never a stale profile.
    let stopper = std::thread::spawn(move || two.stop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut unavailable = 0;
    let mut settled = 0;
    while std::time::Instant::now() < deadline && settled < 20 {
        let before = unavailable;
        for (customer, want) in expected.iter().take(10) {
            let r = client().get(format!("{}/v1/profiles/{customer}", one.http())).send().unwrap();
            match r.status().as_u16() {
                200 => assert_eq!(totals(&r.json::<Value>().unwrap()), *want, "{customer}"),
                503 => {
                    assert!(r.headers().contains_key("retry-after"));
                    unavailable += 1;
                }
                other => panic!("{customer}: unexpected status {other}"),
            }
        }
        settled = if stopper.is_finished() && unavailable == before { settled + 1 } else { 0 };
    }
    stopper.join().unwrap();
    eprintln!("503 answers while the second instance left: {unavailable}");
    eventually(120, "every profile from the remaining instance", || profiles_match(one.http(), &expected));
    one.stop();
    drop(broker);
}
