//! Bad input at the command line: one clear line on stderr, a non-zero exit, no panic.

mod common;

use common::*;
use std::process::Command;

fn chorus(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_flag_is_one_line() {
    let (code, _, err) = chorus(&["up", "--no-such-flag"]);
    assert_eq!(code, 2);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn unreachable_broker_is_one_line() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let brokers = format!("127.0.0.1:{port}");
    let topology = topology_path();
    let (code, _, err) = chorus(&["topics", "create", "--brokers", &brokers, "--topology", topology.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: cannot reach Kafka at"), "{err}");
}

#[test]
fn invalid_topology_names_every_error_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "context:\n  session_timeout: 30m\n  cart_ttl: 0d\nconsent:\n  defaults:\n    telepathy: true\n",
    )
    .unwrap();
    let (code, _, err) = chorus(&["validate", path.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("context.cart_ttl: must be positive"), "{err}");
    assert!(err.contains("consent.defaults.telepathy: is not a declared purpose"), "{err}");

    std::fs::write(&path, "clock: sometimes\n").unwrap();
    let (code, _, err) =
        chorus(&["up", "--topology", path.to_str().unwrap(), "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("clock: unknown variant `sometimes`"), "{err}");

    let (code, _, err) = chorus(&["validate", "/no/such/file.yaml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read topology /no/such/file.yaml"), "{err}");
}

#[test]
fn shipped_topology_validates() {
    let (code, out, err) = chorus(&["validate", topology_path().to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(": ok ("), "{out}");
}

#[test]
fn produce_rejects_a_bad_line_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Chorus::start(&["broker", "--port", "0", "--topology", topology_path().to_str().unwrap()], false);
    let good = format!(r#"{{"event_id":"e1","event_type":"page.viewed","timestamp":"{}","customer_id":"c1"}}"#, ts(T0));
    let input = format!("{good}\n{{\"event_id\": \"e2\", \"event_type\": \"page.viewed\", \"timestamp\": 7}}\n");
    let file = dir.path().join("in.jsonl");
    std::fs::write(&file, input).unwrap();
    let out = Command::new(bin())
        .args([
            "produce",
            "events.raw",
            "--brokers",
            broker.bootstrap(),
            "--topology",
            topology_path().to_str().unwrap(),
        ])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.trim(), "error: line 2: field `timestamp`: expected a string, got a number");
    assert!(tail(broker.bootstrap(), "events.raw", 1_500).is_empty(), "nothing was written");
}
