//! Helpers for integration tests: run the real `chorus` binary, talk to it through the
//! same CLI, topics and HTTP a user would use.
#![allow(dead_code)]

pub mod erasure;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const T0: i64 = 1_707_906_600_000; // 2024-02-14T10:30:00Z

/// The credentials `test_topology` configures: a source's write key, a secret key with
/// every scope (every helper here sends it), a narrow key, and the token secret.
pub const WRITE_KEY: &str = "wk_test_website_0123";
pub const SECRET_KEY: &str = "sk_test_all_scopes_0123456789";
pub const READER_KEY: &str = "sk_test_reader_0123456789abc";
pub const TOKEN_SECRET: &str = "test-token-secret-0123456789";

/// A client that authenticates with [`SECRET_KEY`].
pub fn client() -> reqwest::blocking::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {SECRET_KEY}").parse().unwrap());
    reqwest::blocking::Client::builder().default_headers(headers).build().unwrap()
}

/// The `access:` section of every test topology.
pub const TEST_ACCESS: &str = r#"
access:
  sources:
    - name: website
      write_keys: [wk_test_website_0123, wk_test_website_next]
      channel: web
      allowed_origins: ["http://127.0.0.1:*", "http://localhost:*"]
    - name: store_backend
      write_keys: [wk_test_store_0123456]
      channel: store
  api_keys:
    - { name: test, key: sk_test_all_scopes_0123456789, scopes: ["*"] }
    - { name: reader, key: sk_test_reader_0123456789abc, scopes: [read:profiles] }
  token_secret: test-token-secret-0123456789
  token_max_ttl: 1h
  cluster_secret: ""
  open: [healthz, readyz, metrics]
  failed_auth_limit: 100000
  failed_auth_window: 1m
  trusted_proxies: []
"#;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chorus"))
}

pub fn topology_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("topology.yaml")
}

pub fn ts(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).unwrap().to_string()
}

/// A running chorus process; killed on drop.
pub struct Chorus {
    pub child: Child,
    pub bootstrap: Option<String>,
    pub http: Option<String>,
    /// Every stdout line up to the `http:` one (development keys among them).
    pub printed: Vec<String>,
}

impl Chorus {
    /// Start `chorus <args>` and wait for its `bootstrap:` / `http:` lines.
    pub fn start(args: &[&str], want_http: bool) -> Chorus {
        let mut child = Command::new(bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("chorus binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut me = Chorus { child, bootstrap: None, http: None, printed: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if me.http.is_some() || (!want_http && me.bootstrap.is_some()) {
                break;
            }
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                if let Some(b) = line.strip_prefix("bootstrap: ") {
                    me.bootstrap = Some(b.trim().to_owned());
                }
                if let Some(h) = line.strip_prefix("http: ") {
                    me.http = Some(h.trim().to_owned());
                }
                me.printed.push(line);
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!("chorus {args:?} exited early: {status}");
            }
        }
        assert!(me.http.is_some() || !want_http, "chorus {args:?} printed no http line");
        me
    }

    /// `chorus up` with this topology and data dir, ready to serve.
    pub fn up(data_dir: &Path, topology: &Path) -> Chorus {
        let c = Chorus::start(
            &[
                "up",
                "--topology",
                topology.to_str().unwrap(),
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--http",
                "127.0.0.1:0",
            ],
            true,
        );
        c.wait_ready();
        c
    }

    /// The value of a printed `name: value  # ...` line (`write_key`, `secret_key`).
    pub fn printed_value(&self, name: &str) -> Option<String> {
        self.printed.iter().find_map(|l| {
            l.strip_prefix(&format!("{name}: ")).and_then(|rest| rest.split_whitespace().next()).map(str::to_owned)
        })
    }

    pub fn bootstrap(&self) -> &str {
        self.bootstrap.as_deref().expect("bootstrap printed")
    }

    pub fn http(&self) -> &str {
        self.http.as_deref().expect("http printed")
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::blocking::get(format!("{}/readyz", self.http())) {
                if r.status().is_success() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("chorus never became ready");
    }

    /// Ctrl-C and wait for a clean exit.
    pub fn stop(mut self) {
        let pid = self.child.id() as i32;
        unsafe_kill(pid, "INT");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "chorus exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("chorus did not stop within 60 s");
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: i32, signal: &str) {
    let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

impl Drop for Chorus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `chorus produce TOPIC` with these JSON lines.
pub fn produce(bootstrap: &str, topic: &str, lines: &[Value]) {
    produce_with(bootstrap, &topology_path(), topic, lines)
}

/// Move event time to `at` on every partition: a `system.tick` through `chorus produce`,
/// which sends it to each partition of `events.raw` as `topology` counts them.
pub fn tick(bootstrap: &str, topology: &Path, at: i64) {
    let tick = json!({"event_id": format!("tick-{at}"), "event_type": "system.tick",
                                  "timestamp": ts(at), "customer_id": "system"});
    produce_with(bootstrap, topology, "events.raw", &[tick]);
}

/// `chorus produce TOPIC --topology TOPOLOGY` with these JSON lines.
pub fn produce_with(bootstrap: &str, topology: &Path, topic: &str, lines: &[Value]) {
    let mut child = Command::new(bin())
        .args(["produce", topic, "--brokers", bootstrap, "--topology", topology.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        let mut text = String::new();
        for l in lines {
            text.push_str(&l.to_string());
            text.push('\n');
        }
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "produce failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// `chorus tail TOPIC --from-beginning` until idle.
pub fn tail(bootstrap: &str, topic: &str, idle_ms: u64) -> Vec<Value> {
    let out = Command::new(bin())
        .args(["tail", topic, "--brokers", bootstrap, "--from-beginning", "--timeout-ms", &idle_ms.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "tail failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

pub fn get_json(url: &str) -> (u16, Value) {
    let r = client().get(url).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

pub fn get_text(url: &str) -> (u16, String) {
    let r = client().get(url).send().unwrap();
    let status = r.status().as_u16();
    (status, r.text().unwrap_or_default())
}

pub fn post_json(url: &str, body: &Value) -> (u16, Value) {
    let r = client().post(url).json(body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// Poll until `check` holds or fail after `secs`.
pub fn eventually<T>(secs: u64, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A deterministic workload: `n` events over `customers` customers, a few anonymous
/// visitors who later log in, orders with totals. Returns the events and the expected
/// (event_count, purchase_count, lifetime_value in cents) per customer id.
/// Customer id → (event_count, purchase_count, lifetime value in cents).
pub type Expected = std::collections::BTreeMap<String, (i64, i64, i64)>;

pub fn workload(n: usize, customers: usize) -> (Vec<Value>, Expected) {
    let mut events = Vec::with_capacity(n);
    let mut expected = std::collections::BTreeMap::new();
    for i in 0..n {
        let c = i % customers;
        let customer = format!("c{c}");
        let at = T0 + i as i64 * 10;
        let kind = ["page.viewed", "product.viewed", "cart.item_added", "order.completed"][i % 4];
        let anonymous = i < customers; // each customer's first event is anonymous on mobile
        let mut e = json!({"event_id": format!("evt-{i}"), "event_type": kind, "timestamp": ts(at), "channel": if anonymous {"mobile_app"} else {"web"},
            "payload": {"product_id": format!("p{}", i % 13), "category": "outdoor", "price": 10.0, "quantity": 1, "total": (i % 7) as f64 * 10.0 + 5.0}});
        if anonymous {
            e["anonymous_id"] = json!(format!("anon-{c}"));
        } else if i < 2 * customers {
            // first known event: login linking the anonymous id
            e["customer_id"] = json!(customer);
            e["anonymous_id"] = json!(format!("anon-{c}"));
        } else {
            e["customer_id"] = json!(customer);
        }
        let entry: &mut (i64, i64, i64) = expected.entry(customer).or_default();
        entry.0 += 1;
        if kind == "order.completed" {
            entry.1 += 1;
            entry.2 += (((i % 7) as f64 * 10.0 + 5.0) * 100.0) as i64;
        }
        events.push(e);
    }
    (events, expected)
}

/// (event_count, purchase_count, lifetime_value in cents) of a profile.
pub fn totals(profile: &Value) -> (i64, i64, i64) {
    (
        profile["metrics"]["event_count"].as_i64().unwrap_or(-1),
        profile["metrics"]["purchase_count"].as_i64().unwrap_or(-1),
        (profile["metrics"]["lifetime_value"].as_f64().unwrap_or(-1.0) * 100.0).round() as i64,
    )
}

/// The shipped topology under `clock: event`, with one partition for the identity stage's
/// inputs (it links identifiers within one partition) and four downstream.
pub fn test_topology(dir: &Path) -> PathBuf {
    let base = std::fs::read_to_string(topology_path()).unwrap();
    let text = base
        .replace("clock: wall", "clock: event")
        .replace(
            "  partitions: {}",
            "  partitions: {events.raw: 1, messages.requests: 1, consent: 1, privacy.requests: 1}",
        )
        .replace("default_partitions: 8", "default_partitions: 4");
    let path = dir.join("topology.yaml");
    std::fs::write(&path, with_access(&text)).unwrap();
    path
}

/// A topology text with the shipped `access:` section replaced by [`TEST_ACCESS`].
pub fn with_access(text: &str) -> String {
    let start = text.find("\naccess:\n").expect("the topology has an access section") + 1;
    let end = text[start..].find("\n\n").map_or(text.len(), |e| start + e + 1);
    let mut out = text[..start].to_owned();
    out.push_str(TEST_ACCESS.trim_start());
    out.push_str(&text[end..]);
    out
}

/// Whether every customer's profile, read over HTTP, has the expected totals.
pub fn profiles_match(http: &str, expected: &Expected) -> Option<()> {
    for (customer, want) in expected {
        let (status, profile) = get_json(&format!("{http}/v1/profiles/{customer}"));
        if status != 200 || totals(&profile) != *want {
            return None;
        }
    }
    Some(())
}

/// What a compacted topic holds: the latest value per key of tailed records.
pub fn latest_by_key(records: Vec<Value>) -> std::collections::BTreeMap<String, Value> {
    let mut latest = std::collections::BTreeMap::new();
    for r in records {
        let key = r["key"].as_str().unwrap_or_default().to_owned();
        if r["value"].is_null() {
            latest.remove(&key);
        } else {
            latest.insert(key, r["value"].clone());
        }
    }
    latest
}

/// The test topology with every topic at four partitions, identity included (the
/// identity graph's messages cross partitions, and processes).
pub fn four_partitions(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(test_topology(dir)).unwrap();
    let path = dir.join("topology-4.yaml");
    std::fs::write(&path, text.replace("{events.raw: 1, messages.requests: 1, consent: 1, privacy.requests: 1}", "{}"))
        .unwrap();
    path
}

/// `chorus run` as one member against these brokers, ready to serve.
pub fn run_member(bootstrap: &str, topology: &Path, data: &Path, instance: &str) -> Chorus {
    let c = Chorus::start(
        &[
            "run",
            "--brokers",
            bootstrap,
            "--topology",
            topology.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--instance-id",
            instance,
            "--http",
            "127.0.0.1:0",
        ],
        true,
    );
    c.wait_ready();
    c
}
