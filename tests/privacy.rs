//! Data subject requests through the real binary on the embedded broker: filing over
//! HTTP, status and receipts, the access export, erasure across stores and compacted
//! topics, late events, a restart, and every bad request's JSON error.

mod common;

use common::erasure::{self, completed, status_of, MIN};
use common::*;
use serde_json::{json, Value};
use std::path::Path;

const KEY: &str = "test-privacy-key";

fn topology(dir: &Path) -> std::path::PathBuf {
    let path = test_topology(dir);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("  api_key: \"\"\n"));
    std::fs::write(&path, text.replace("  api_key: \"\"\n", &format!("  api_key: {KEY}\n"))).unwrap();
    path
}

fn get_with_key(url: &str, key: Option<&str>) -> (u16, Value) {
    let client = reqwest::blocking::Client::new();
    let mut request = client.get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn erasure_and_access_through_the_api_on_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let topology = topology(dir.path());
    let data = dir.path().join("data");
    let chorus = Chorus::up(&data, &topology);
    let http = chorus.http().to_owned();
    let seeded = erasure::seed(&http, chorus.bootstrap(), &topology);
    let profile = &seeded.profile;

    // Access: the export holds every field the profile API shows.
    let (status, filed) = post_json(
        &format!("{http}/v1/privacy/requests"),
        &json!({"type": "access", "identifier": {"type": "anonymous_id", "value": "anon-zq81"}}),
    );
    assert_eq!(status, 202, "{filed}");
    let access = filed["request_id"].as_str().unwrap().to_owned();
    assert!(filed["expected_completion"].is_string());
    completed(&http, &access);
    let url = format!("{http}/v1/privacy/requests/{access}/export");
    assert_eq!(get_with_key(&url, None).0, 401, "an export takes the privacy key");
    assert_eq!(get_with_key(&url, Some("wrong")).0, 401);
    let (status, export) = get_with_key(&url, Some(KEY));
    assert_eq!(status, 200, "{export}");
    let exported = &export["profiles"][0];
    for field in profile.as_object().unwrap().keys() {
        assert!(exported.get(field).is_some(), "the export lacks profile field {field}");
    }
    assert_eq!(exported["attributes"], profile["attributes"]);
    assert_eq!(export["identity"]["identifiers"].as_array().unwrap().len(), 3, "{}", export["identity"]);
    let history = export["messaging"][0]["recipient"]["history"]
        .as_array()
        .unwrap_or_else(|| panic!("{:#}", export["messaging"]));
    assert_eq!(history.len(), 3, "the consent history");
    assert!(export.to_string().contains(erasure::SUBJECT_REQUEST), "the deferred promotion is in the export");
    assert!(!export["journeys"].as_array().unwrap().is_empty(), "the waiting journey is in the export");
    let zip = client().get(format!("{url}.zip")).bearer_auth(KEY).send().unwrap();
    assert_eq!(zip.status().as_u16(), 200);
    assert_eq!(zip.headers()["content-type"], "application/zip");
    let bytes = zip.bytes().unwrap();
    assert!(bytes.starts_with(b"PK\x03\x04"), "a zip archive");

    // Erasure.
    let (erasure_id, _) = erasure::erase(&http);
    erasure::assert_erased_online(&http, chorus.bootstrap(), &topology, &seeded);

    // Stopped: no column family of any task holds anything of theirs. Restarted on the
    // same data: still nothing, and still refused.
    chorus.stop();
    erasure::assert_no_trace_on_disk(&data, &seeded);
    let chorus = Chorus::up(&data, &topology);
    let http = chorus.http().to_owned();
    let after_restart = eventually(60, "the erasure's status after the restart", || {
        let status = status_of(&http, &erasure_id);
        (!status["status"].is_null()).then_some(status)
    });
    assert_eq!(after_restart["status"], "completed", "{after_restart}");
    let again = json!({"event_id": "zq8-late2", "event_type": "page.viewed", "timestamp": ts(T0 + 11 * MIN),
        "channel": "web", "anonymous_id": "anon-zq81"});
    assert_eq!(post_json(&format!("{http}/v1/events"), &again).0, 202);
    // The embedded broker starts empty: this letter is the only one on it.
    eventually(30, "the dead letter after the restart", || {
        let n = tail(chorus.bootstrap(), "events.dlq", 1000)
            .iter()
            .filter(|l| l["value"]["reason"] == "erased_subject")
            .count();
        (n == 1).then_some(())
    });
    assert_eq!(get_json(&format!("{http}/v1/profiles/anon-zq81")).0, 404);
    chorus.stop();
}

#[test]
fn bad_privacy_requests_get_json_errors_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &topology(dir.path()));
    let http = chorus.http().to_owned();
    let url = format!("{http}/v1/privacy/requests");
    let cases = [
        (json!({"identifier": {"type": "email", "value": "a@b.co"}}), 400, "invalid_request", "type"),
        (json!({"type": "erase", "identifier": {"type": "email", "value": "a@b.co"}}), 400, "invalid_request", "type"),
        (
            json!({"type": "erasure", "identifier": {"type": "shoe", "value": "x"}}),
            400,
            "unknown_identifier_type",
            "identifier.type",
        ),
        (
            json!({"type": "erasure", "identifier": {"type": "email", "value": "nope"}}),
            400,
            "invalid_identifier",
            "identifier.value",
        ),
        (json!({"type": "erasure"}), 400, "invalid_request", "identifier"),
        (
            json!({"type": "erasure", "identifier": {"type": "email", "value": "a@b.co"}, "colour": 1}),
            400,
            "invalid_request",
            "colour",
        ),
        (
            json!({"type": "rectification", "identifier": {"type": "email", "value": "a@b.co"}, "changes": {"email": "x@y.co"}}),
            422,
            "invalid_changes",
            "changes.email",
        ),
        (
            json!({"type": "access", "identifier": {"type": "email", "value": "a@b.co"}, "request_id": "0190a2b4-0000-7000-8000-000000000001"}),
            400,
            "invalid_request",
            "request_id",
        ),
    ];
    for (body, status, code, field) in cases {
        let (got, answer) = post_json(&url, &body);
        assert_eq!(
            (got, answer["error"]["code"].as_str(), answer["error"]["field"].as_str()),
            (status, Some(code), Some(field)),
            "{body}: {answer}"
        );
    }
    let response = client().post(&url).body("{nope").send().unwrap();
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(response.json::<Value>().unwrap()["error"]["code"], "invalid_json");
    // Nothing was filed.
    assert!(tail(chorus.bootstrap(), "privacy.requests", 1000).is_empty());
    let (status, answer) = get_json(&format!("{http}/v1/privacy/requests/not-a-uuid"));
    assert_eq!((status, answer["error"]["field"].as_str()), (400, Some("request_id")));
    let (status, answer) = get_json(&format!("{http}/v1/privacy/requests/0190a2b4-0000-7000-8000-000000000001"));
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("unknown_request")));
    // A subject chorus never saw: completed, with an empty receipt.
    let (status, filed) =
        post_json(&url, &json!({"type": "erasure", "identifier": {"type": "email", "value": "nobody@example.com"}}));
    assert_eq!(status, 202);
    let receipt = completed(&http, filed["request_id"].as_str().unwrap());
    assert_eq!(receipt["note"], "never_seen");
    assert_eq!(receipt["stores"], json!([]));
    chorus.stop();
}

/// A webhook receiver on a local port: it answers 500 to its first `failures` calls and
/// 200 after, and hands each call's headers and body to the test.
struct Receiver {
    url: String,
    calls: std::sync::mpsc::Receiver<(std::collections::BTreeMap<String, String>, Vec<u8>)>,
}

impl Receiver {
    fn start(failures: usize) -> Receiver {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks/privacy", listener.local_addr().unwrap());
        let (tx, calls) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut headers = std::collections::BTreeMap::new();
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                headers.insert("request-line".to_owned(), line.trim().to_owned());
                loop {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                    let Some((name, value)) = line.trim_end().split_once(": ") else { break };
                    headers.insert(name.to_ascii_lowercase(), value.to_owned());
                }
                let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let status = if n < failures { "500 Internal Server Error" } else { "200 OK" };
                let _ = write!(stream, "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                if tx.send((headers, body)).is_err() {
                    break;
                }
            }
        });
        Receiver { url, calls }
    }
}

#[test]
fn status_changes_are_posted_signed_and_retried() {
    use hmac::Mac as _;
    const SECRET: &str = "whsec-test-callbacks";
    let dir = tempfile::tempdir().unwrap();
    let path = topology(dir.path());
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("    secret: \"\"\n", &format!("    secret: {SECRET}\n"))
        .replace("    hosts: []\n", "    hosts: [127.0.0.1]\n")
        .replace("    backoff: 1s\n", "    backoff: 100ms\n")
        .replace("    max_backoff: 1h\n", "    max_backoff: 1s\n");
    assert!(text.contains(SECRET) && text.contains("max_backoff: 1s"));
    std::fs::write(&path, text).unwrap();
    let chorus = Chorus::up(&dir.path().join("data"), &path);
    let http = chorus.http().to_owned();
    let receiver = Receiver::start(2);
    let url = format!("{http}/v1/privacy/requests");
    let refused = json!({"type": "access", "identifier": {"type": "email", "value": "cb@example.com"},
        "status_callback_url": "https://elsewhere.test/hook"});
    let (status, answer) = post_json(&url, &refused);
    assert_eq!((status, answer["error"]["field"].as_str()), (400, Some("status_callback_url")), "{answer}");

    let (status, filed) = post_json(
        &url,
        &json!({"type": "erasure", "identifier": {"type": "email", "value": "cb@example.com"},
            "status_callback_url": receiver.url}),
    );
    assert_eq!(status, 202, "{filed}");
    let id = filed["request_id"].as_str().unwrap();
    let mut delivered: Vec<String> = Vec::new();
    for attempt in 1.. {
        let (headers, body) = receiver.calls.recv_timeout(std::time::Duration::from_secs(60)).expect("a callback");
        assert_eq!(headers["request-line"], "POST /hooks/privacy HTTP/1.1");
        let timestamp = &headers["x-chorus-timestamp"];
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(&body);
        let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(headers["x-chorus-signature"], format!("sha256={expected}"));
        let receipt: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(receipt["request_id"], id);
        let status = receipt["status"].as_str().unwrap().to_owned();
        assert_eq!(headers["x-chorus-delivery"], format!("{id}:{status}"));
        assert!(!String::from_utf8_lossy(&body).contains("cb@example.com"), "a receipt holds no identifier");
        if attempt <= 2 {
            assert_eq!(status, "pending", "the first status change is retried until it is delivered");
            continue;
        }
        let done = status == "completed";
        delivered.push(status);
        if done {
            break;
        }
    }
    let rank = |s: &String| ["pending", "in_progress", "completed"].iter().position(|x| x == s).unwrap();
    assert_eq!(delivered.first().map(String::as_str), Some("pending"), "{delivered:?}");
    assert!(delivered.windows(2).all(|w| rank(&w[0]) < rank(&w[1])), "in order, once each: {delivered:?}");
    let metrics = client().get(format!("{http}/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("privacy_callbacks_total{outcome=\"retried\"} 2"), "{metrics}");
    chorus.stop();
}
