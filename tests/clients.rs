//! Segment's official libraries, unchanged and from their registries, and chorus's own
//! web SDK, against the real binary (embedded broker): `segment-analytics-python`,
//! `@segment/analytics-node`, `@segment/analytics-next` in headless Chromium
//! (`tests/clients/`), and `sdk/js` (its unit tests, then its Chromium end-to-end run).
//! `scripts/setup --test` installs Node packages, the Python client and Chromium.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

/// `chorus up` with the test keys and the wall clock (the clients stamp events now).
fn chorus(dir: &Path) -> Chorus {
    let path = test_topology(dir);
    let text = std::fs::read_to_string(&path).unwrap().replace("clock: event", "clock: wall");
    std::fs::write(&path, text).unwrap();
    Chorus::up(&dir.join("data"), &path)
}

/// Run `program args` in `dir` against `http`; its output is shown, its failure fails.
fn run(dir: &str, program: &str, args: &[&str], http: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(program)
        .args(args)
        .current_dir(root.join(dir))
        .env("CHORUS_HTTP", http)
        .env("CHORUS_WRITE_KEY", WRITE_KEY)
        .env("CHORUS_SECRET_KEY", SECRET_KEY)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {program} in {dir} ({e}): run scripts/setup --test"));
    assert!(status.success(), "{program} {args:?} in {dir} failed: {status}");
}

fn installed(dir: &str, what: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(root.join(dir).join(what).exists(), "{dir}/{what} is missing: run scripts/setup --test");
}

#[test]
fn segment_official_libraries_deliver_unchanged() {
    installed("tests/clients", "node_modules/@segment/analytics-next");
    installed("tests/clients", ".venv/bin/python");
    let dir = tempfile::tempdir().unwrap();
    let chorus = chorus(dir.path());
    run("tests/clients", "bash", &["run.sh", "python", "node", "browser"], chorus.http());
}

#[test]
fn chorus_web_sdk_works_in_chromium() {
    installed("sdk/js", "node_modules/typescript");
    run("sdk/js", "npm", &["test", "--silent"], "");
    let dir = tempfile::tempdir().unwrap();
    let chorus = chorus(dir.path());
    run("sdk/js", "node", &["test/browser.e2e.mjs"], chorus.http());
}
