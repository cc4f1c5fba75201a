use super::*;
use serde_json::json;

fn spec(name: &str) -> Value {
    let text = match name {
        "identify" => include_str!("../../tests/fixtures/segment/identify.json"),
        "track" => include_str!("../../tests/fixtures/segment/track.json"),
        "page" => include_str!("../../tests/fixtures/segment/page.json"),
        "screen" => include_str!("../../tests/fixtures/segment/screen.json"),
        "group" => include_str!("../../tests/fixtures/segment/group.json"),
        "alias" => include_str!("../../tests/fixtures/segment/alias.json"),
        "order" => include_str!("../../tests/fixtures/segment/order-completed.json"),
        _ => unreachable!(),
    };
    serde_json::from_str(text).unwrap()
}

/// 2015-02-23T22:28:55.387Z, the spec examples' receivedAt.
const RECEIVED: i64 = 1_424_730_535_387;

fn receipt() -> Receipt<'static> {
    Receipt { source: "website", channel: "web", received_at: RECEIVED, ip: Some("203.0.113.9") }
}

fn map(message: &Value, call: Option<CallType>) -> Result<Event, MessageError> {
    to_event(message, call, &BatchDefaults::default(), &receipt(), &Topology::default())
}

#[test]
fn identify_example_becomes_an_identify_event_with_traits_and_both_ids() {
    let e = map(&spec("identify"), Some(CallType::Identify)).unwrap();
    assert_eq!(e.event_id, "022bb90c-bbac-11e4-8dfc-aa07a5b093db");
    assert_eq!(e.event_type, "identify");
    assert_eq!(e.customer_id.as_deref(), Some("97980cfea0067"));
    assert_eq!(e.anonymous_id.as_deref(), Some("507f191e810c19729de860ea"));
    assert_eq!(e.channel.as_deref(), Some("web"));
    assert_eq!(e.traits["email"], "peter@example.com");
    assert_eq!(e.traits["address"]["city"], "San Francisco");
    assert_eq!(e.context.ip.as_deref(), Some("8.8.8.8"));
    assert!(e.context.user_agent.as_deref().unwrap().starts_with("Mozilla/5.0"));
    assert_eq!(e.context.source.as_deref(), Some("website"));
    // sentAt == timestamp: the event happened when chorus received it.
    assert_eq!(e.timestamp_ms, RECEIVED);
    assert_eq!(e.context.original_timestamp.as_deref(), Some("2015-02-23T22:28:55.111Z"));
}

#[test]
fn track_example_keeps_library_page_and_an_unmapped_name() {
    let e = map(&spec("track"), None).unwrap();
    assert_eq!(e.event_type, "track");
    assert_eq!(e.payload["event"], "Course Clicked");
    assert_eq!(e.payload["title"], "Intro to Analytics");
    assert_eq!(e.context.library["name"], "analytics.js");
    assert_eq!(e.context.page["url"], "https://segment.com/academy/");
    assert_eq!(e.customer_id.as_deref(), Some("AiUGstSDIg"));
}

#[test]
fn page_screen_group_and_alias_examples_map_to_their_event_types() {
    let page = map(&spec("page"), Some(CallType::Page)).unwrap();
    assert_eq!(page.event_type, "page.viewed");
    assert_eq!(page.payload["url"], "http://www.example.com");
    assert_eq!(page.payload["name"], "Home");

    let screen = map(&spec("screen"), Some(CallType::Screen)).unwrap();
    assert_eq!(screen.event_type, "screen.viewed");
    assert_eq!(screen.payload["screen"], "Home");
    assert_eq!(screen.payload["variation"], "blue signup button");

    let group = map(&spec("group"), Some(CallType::Group)).unwrap();
    assert_eq!(group.event_type, "group");
    assert_eq!(group.traits["account"]["id"], "0e8c78ea9d97a7b8185e8632");
    assert_eq!(group.traits["account"]["name"], "Initech");
    assert_eq!(group.traits["account"]["employees"], 329);

    let alias = map(&spec("alias"), Some(CallType::Alias)).unwrap();
    assert_eq!(alias.event_type, "alias");
    assert_eq!(alias.customer_id.as_deref(), Some("507f191e81"));
    // Both the message's anonymous id and the previous id link to the user.
    assert_eq!(alias.anonymous_id.as_deref(), Some("507f191e810c19729de860ea"));
    assert_eq!(alias.identifiers["anonymous_id"], "39239-239239-239239-23923");
}

#[test]
fn alias_of_the_anonymous_id_links_it_once() {
    let msg = json!({"type": "alias", "userId": "u1", "previousId": "anon-1", "anonymousId": "anon-1"});
    let e = map(&msg, None).unwrap();
    assert_eq!(e.anonymous_id.as_deref(), Some("anon-1"));
    assert!(e.identifiers.is_empty());
    let msg = json!({"type": "alias", "userId": "u1", "previousId": "anon-2"});
    assert_eq!(map(&msg, None).unwrap().anonymous_id.as_deref(), Some("anon-2"));
}

#[test]
fn ecommerce_order_gets_items_and_total_the_profile_reads() {
    let e = map(&spec("order"), None).unwrap();
    assert_eq!(e.event_type, "order.completed");
    assert_eq!(e.payload["total"], 27.5);
    assert_eq!(e.payload["items"][1]["product_id"], "505bd76785ebb509fc183733");
    assert_eq!(e.payload["items"][1]["quantity"], 2);
    assert!(!e.payload.as_object().unwrap().contains_key("event"));
    // revenue stands in for a missing total
    let msg = json!({"type": "track", "event": "Order Completed", "userId": "u1", "properties": {"revenue": 40}});
    assert_eq!(map(&msg, None).unwrap().payload["total"], 40);
    // refunds reduce lifetime value by their amount
    let msg = json!({"type": "track", "event": "Order Refunded", "userId": "u1", "properties": {"order_id": "o1", "total": 12}});
    let refund = map(&msg, None).unwrap();
    assert_eq!((refund.event_type.as_str(), &refund.payload["amount"]), ("order.returned", &json!(12)));
}

#[test]
fn spec_names_and_chorus_names_both_map() {
    for (name, want) in [
        ("Product Viewed", "product.viewed"),
        ("Product Added", "cart.item_added"),
        ("Cart Viewed", "cart.viewed"),
        ("Checkout Started", "checkout.started"),
        ("order.completed", "order.completed"),
        ("Signed Up", "track"),
    ] {
        let msg = json!({"type": "track", "event": name, "anonymousId": "a1", "properties": {"sku": "s-1"}});
        let e = map(&msg, None).unwrap();
        assert_eq!(e.event_type, want, "{name}");
        assert_eq!(e.payload["product_id"], "s-1");
    }
    let mut topology = Topology::default();
    topology.segment.other_events = config::REJECT.into();
    let msg = json!({"type": "track", "event": "Signed Up", "anonymousId": "a1"});
    let err = to_event(&msg, None, &BatchDefaults::default(), &receipt(), &topology).unwrap_err();
    assert_eq!(err.field, "event");
}

#[test]
fn a_client_clock_ten_minutes_fast_is_corrected() {
    // The client's clock runs 10 minutes ahead: it stamped the event at 10:40:00 and
    // sent it at 10:40:02, both by its own clock; chorus received it at 10:30:03.
    let received = 1_707_906_603_000; // 2024-02-14T10:30:03Z
    let msg = json!({"type": "track", "event": "Product Viewed", "anonymousId": "a1",
        "timestamp": "2024-02-14T10:40:00Z", "sentAt": "2024-02-14T10:40:02Z"});
    let receipt = Receipt { received_at: received, ..receipt() };
    let e = to_event(&msg, None, &BatchDefaults::default(), &receipt, &Topology::default()).unwrap();
    assert_eq!(e.timestamp, "2024-02-14T10:30:01Z");
    assert_eq!(e.context.original_timestamp.as_deref(), Some("2024-02-14T10:40:00Z"));
    assert_eq!(e.context.sent_at.as_deref(), Some("2024-02-14T10:40:02Z"));
    assert_eq!(e.context.received_at.as_deref(), Some("2024-02-14T10:30:03Z"));
}

#[test]
fn batch_sent_at_applies_and_future_times_are_clamped() {
    let received = 1_707_906_603_000;
    let receipt = Receipt { received_at: received, ..receipt() };
    let sent_at = json!("2024-02-14T10:30:02Z");
    let defaults = BatchDefaults { context: None, sent_at: Some(&sent_at) };
    let msg = json!({"type": "page", "anonymousId": "a1", "timestamp": "2024-02-14T10:29:02Z"});
    let e = to_event(&msg, None, &defaults, &receipt, &Topology::default()).unwrap();
    assert_eq!(e.timestamp, "2024-02-14T10:29:03Z");
    // No sentAt at all, and a timestamp an hour ahead: clamped to the receipt.
    let msg = json!({"type": "page", "anonymousId": "a1", "timestamp": "2024-02-14T11:30:00Z"});
    let e = to_event(&msg, None, &BatchDefaults::default(), &receipt, &Topology::default()).unwrap();
    assert_eq!(e.timestamp_ms, received);
    // No timestamp: the receipt.
    let msg = json!({"type": "page", "anonymousId": "a1"});
    assert_eq!(map(&msg, None).unwrap().timestamp_ms, RECEIVED);
    // A date-time without offset, as some server libraries send, is UTC.
    let msg = json!({"type": "page", "anonymousId": "a1", "timestamp": "2015-02-23T22:00:00.000"});
    assert_eq!(map(&msg, None).unwrap().timestamp, "2015-02-23T22:00:00Z");
}

#[test]
fn context_maps_device_campaign_and_the_callers_address() {
    let msg = json!({"type": "track", "event": "Application Opened", "userId": 42,
        "context": {"device": {"id": "dev-1", "type": "ios", "token": "apns-abc"}, "app": {"version": "3.2"},
                    "campaign": {"name": "spring", "source": "newsletter"}, "locale": "en-AU",
                    "timezone": "Australia/Brisbane", "location": {"city": "Brisbane"}}});
    let e = map(&msg, None).unwrap();
    assert_eq!(e.customer_id.as_deref(), Some("42"));
    assert_eq!(e.event_type, "app.opened");
    assert_eq!(e.context.device_id.as_deref(), Some("dev-1"));
    assert_eq!(e.context.device_type.as_deref(), Some("ios"));
    assert_eq!(e.context.app_version.as_deref(), Some("3.2"));
    assert_eq!(e.context.campaign["name"], "spring");
    assert_eq!(e.context.timezone.as_deref(), Some("Australia/Brisbane"));
    assert_eq!(e.context.geo["city"], "Brisbane");
    assert_eq!(e.traits["push_token"], "apns-abc");
    // Without context.ip, the caller's address, as Segment fills it in.
    assert_eq!(e.context.ip.as_deref(), Some("203.0.113.9"));
}

#[test]
fn batch_context_is_shared_and_the_message_wins() {
    let batch_context = json!({"library": {"name": "analytics-python", "version": "2.3"}, "locale": "fr-FR"});
    let defaults = BatchDefaults { context: batch_context.as_object(), sent_at: None };
    let msg = json!({"type": "identify", "userId": "u1", "context": {"locale": "en-GB"}});
    let e = to_event(&msg, None, &defaults, &receipt(), &Topology::default()).unwrap();
    assert_eq!(e.context.library["name"], "analytics-python");
    assert_eq!(e.context.locale.as_deref(), Some("en-GB"));
}

#[test]
fn unknown_fields_are_ignored_and_a_missing_message_id_is_derived_stably() {
    let msg = json!({"type": "track", "event": "Product Viewed", "anonymousId": "a1", "_metadata": {"bundled": []},
                     "integrations": {"All": true}, "writeKey": "x", "someFutureField": [1, 2]});
    let a = map(&msg, None).unwrap();
    let b = map(&msg, None).unwrap();
    assert_eq!(a.event_id, b.event_id);
    assert!(a.event_id.starts_with("chorus-"));
    let other = json!({"type": "track", "event": "Product Viewed", "anonymousId": "a2"});
    assert_ne!(map(&other, None).unwrap().event_id, a.event_id);
}

#[test]
fn wrong_types_and_missing_ids_name_the_segment_field() {
    let cases = [
        (json!({"type": "track", "event": "x"}), "userId"),
        (json!({"type": "track", "event": "x", "userId": {"id": 1}}), "userId"),
        (json!({"type": "track", "event": "x", "anonymousId": true}), "anonymousId"),
        (json!({"type": "track", "userId": "u"}), "event"),
        (json!({"type": "track", "event": 5, "userId": "u"}), "event"),
        (json!({"type": "track", "event": "x", "userId": "u", "properties": [1]}), "properties"),
        (json!({"type": "identify", "userId": "u", "traits": "vip"}), "traits"),
        (json!({"type": "identify", "userId": "u", "context": 1}), "context"),
        (json!({"type": "identify", "userId": "u", "timestamp": "yesterday"}), "timestamp"),
        (json!({"type": "identify", "userId": "u", "sentAt": 17}), "sentAt"),
        (json!({"type": "identify", "userId": "u", "messageId": ["m"]}), "messageId"),
        (json!({"type": "group", "userId": "u"}), "groupId"),
        (json!({"type": "alias", "userId": "u"}), "previousId"),
        (json!({"type": "alias", "anonymousId": "a", "previousId": "p"}), "userId"),
        (json!({"type": "purchase", "userId": "u"}), "type"),
        (json!({"type": 3, "userId": "u"}), "type"),
        (json!({"userId": "u"}), "type"),
        (json!({"type": "identify", "userId": "u", "context": {"userAgent": 7}}), "context.userAgent"),
        (json!({"type": "identify", "userId": "u", "context": {"timezone": "Mars/Olympus"}}), "context.timezone"),
    ];
    for (msg, field) in cases {
        let err = map(&msg, None).unwrap_err();
        assert_eq!(err.field, field, "{msg}: {err}");
    }
    // The route says the type; a message saying another is refused, naming `type`.
    let err = map(&json!({"type": "identify", "userId": "u"}), Some(CallType::Track)).unwrap_err();
    assert_eq!(err.field, "type");
    assert!(map(&json!(["not", "an", "object"]), Some(CallType::Track)).is_err());
}

#[test]
fn short_route_names_are_the_call_types() {
    for (short, long) in
        [("i", "identify"), ("t", "track"), ("p", "page"), ("s", "screen"), ("g", "group"), ("a", "alias")]
    {
        assert_eq!(CallType::parse(short), CallType::parse(long));
        assert_eq!(CallType::parse(long).unwrap().as_str(), long);
    }
    assert_eq!(CallType::parse("b"), None);
}

mod never_panics {
    use super::*;
    use proptest::prelude::*;

    /// Any JSON value, a few levels deep.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
            Just(json!("2024-02-14T10:30:00Z")),
            Just(json!("Order Completed")),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,8}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A message whose spec fields hold anything.
    fn message() -> impl Strategy<Value = Value> {
        let fields = [
            "type",
            "userId",
            "anonymousId",
            "messageId",
            "event",
            "name",
            "properties",
            "traits",
            "context",
            "timestamp",
            "sentAt",
            "groupId",
            "previousId",
            "category",
        ];
        let kinds = prop_oneof![
            Just(json!("identify")),
            Just(json!("track")),
            Just(json!("page")),
            Just(json!("screen")),
            Just(json!("group")),
            Just(json!("alias")),
        ];
        (kinds, prop::collection::vec((0..fields.len(), any_json()), 0..10), ".{1,8}").prop_map(
            move |(kind, values, id)| {
                let mut m = json!({"type": kind, "userId": id});
                for (i, v) in values {
                    m[fields[i]] = v;
                }
                m
            },
        )
    }

    proptest! {
        #[test]
        fn any_message_maps_or_is_refused_with_a_field(msg in message(), batch_context in any_json(), route in 0..7usize) {
            let call = [None, Some(CallType::Identify), Some(CallType::Track), Some(CallType::Page),
                        Some(CallType::Screen), Some(CallType::Group), Some(CallType::Alias)][route];
            let defaults = BatchDefaults { context: batch_context.as_object(), sent_at: None };
            match to_event(&msg, call, &defaults, &receipt(), &Topology::default()) {
                // What is accepted is a valid standard event, and stays one on the wire.
                Ok(event) => {
                    let wire = serde_json::to_value(&event).unwrap();
                    prop_assert_eq!(Event::from_json(&wire).unwrap(), event);
                }
                Err(e) => prop_assert!(!e.message.is_empty()),
            }
        }

        #[test]
        fn any_json_is_mapped_or_refused(value in any_json()) {
            let _ = to_event(&value, None, &BatchDefaults::default(), &receipt(), &Topology::default());
        }
    }
}
