//! The claim check for large bodies (SPEC 9) end to end: a body over
//! `amqp.max_message_bytes` is stored in `archive.store_url` under its SHA-256
//! before "0", and a small JSON document with `x-claim-check: true` is published
//! in its place (real app, real HTTP, real RabbitMQ, a real directory).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cellosign_bridge::AckMode;
use common::*;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(30);
const JSON: Option<&str> = Some("application/json");
/// The largest message in these tests: small, so the bodies over it stay small and fast.
const MAX_MESSAGE: usize = 64 << 10;
const TIMESTAMP: &str = "2025-01-27T14:02:11.105934";

/// An archive of two sessions of `reference`, `id` first, with about `pdf_bytes`
/// bytes of base64 inline.
fn archive_body(id: &str, reference: &str, pdf_bytes: usize) -> String {
    serde_json::json!({
        "event": {"type": "WHP_ARCHIVE", "timestamp": TIMESTAMP},
        "session": [
            {"id": id, "reference": reference, "transaction_number": 1,
             "recipient": {"id": 1, "name": "client"}},
            {"id": format!("{id}-2"), "reference": reference, "transaction_number": 2}
        ],
        "documents": [{"name": "signed.pdf", "content": "JVBERi0xLjQK".repeat(pdf_bytes / 12 + 1)}]
    })
    .to_string()
}

/// Lowercase hex SHA-256, as the bridge names stored bodies.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `x-claim-check` header of a delivery, if any.
fn claim_header(d: &Delivery) -> Option<AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-claim-check").cloned())
}

/// Asserts that `d` is the claim check of `body`, stored in `dir`: the header, the
/// document (url, sha256, bytes, event, session as sent), the SPEC 3 properties, and
/// the object itself, named by the SHA-256 and holding the exact body.
fn assert_claim_check(d: &Delivery, body: &str, dir: &Path) {
    assert_eq!(claim_header(d), Some(AMQPValue::Boolean(true)));
    assert!(d.data.len() < MAX_MESSAGE, "a small document");
    let doc: serde_json::Value = serde_json::from_slice(&d.data).expect("a JSON document");
    let sent: serde_json::Value = serde_json::from_str(body).unwrap();
    let sha = sha256_hex(body.as_bytes());
    let object = dir.join(&sha);
    let url = url::Url::from_file_path(&object).unwrap().to_string();
    assert_eq!(doc["claim_check"]["url"], url.as_str());
    assert_eq!(doc["claim_check"]["sha256"], sha.as_str());
    assert_eq!(doc["claim_check"]["bytes"], body.len());
    assert_eq!(doc["event"], sent["event"]);
    assert_eq!(doc["session"], sent["session"]);
    assert_eq!(doc.as_object().map(|o| o.len()), Some(3), "{doc}");
    assert_contract_properties(d, "claim check");
    let stored = std::fs::read(&object).expect("the object named by its SHA-256");
    assert!(stored == body.as_bytes(), "the exact body received");
    let fetched = url::Url::parse(&url).unwrap().to_file_path().unwrap();
    assert_eq!(fetched, object, "the url leads to the object");
}

/// Files in `dir`, leftovers of a failed write included.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// An app with a claim-check store, and a consumer of all it publishes.
struct WithStore {
    app: TestApp,
    consumer: Consumer,
    /// The store's directory, `archive.store_url`.
    dir: PathBuf,
    /// Keeps the consumer's connection open.
    _broker: Broker,
    /// Holds `dir`; removed when the test ends.
    _store: tempfile::TempDir,
}

/// The app with `archive.store_url` a new directory and the largest message
/// [`MAX_MESSAGE`], and a consumer of all it publishes.
async fn start_with_store(mode: AckMode) -> WithStore {
    let store = tempfile::tempdir().unwrap();
    let dir = store.path().join("claims");
    let url = url::Url::from_directory_path(&dir).unwrap().to_string();
    let app = spawn_app(mode, |s| {
        s.amqp.max_message_bytes = MAX_MESSAGE;
        s.archive.store_url = Some(url);
    })
    .await;
    let (broker, consumer) = app.subscribe("#").await;
    WithStore {
        app,
        consumer,
        dir,
        _broker: broker,
        _store: store,
    }
}

/// Runs `test` in `spooled` mode, then in `confirmed` mode.
async fn in_both_ack_modes(test: impl AsyncFn(AckMode)) {
    for mode in [AckMode::Spooled, AckMode::Confirmed] {
        test(mode).await;
    }
}

/// Over the limit: "0" after the body is stored; the message is the claim check. The
/// same body again: "0", one object, not published twice. Under the limit: inline, as
/// before, and after the claim check of the same reference.
async fn claim_checks_a_body_over_the_largest_message(mode: AckMode) {
    let mut t = start_with_store(mode).await;

    let big = archive_body("claim-1", "ref-claim", 3 * MAX_MESSAGE);
    assert!(big.len() > MAX_MESSAGE);
    let a = t.app.post_to(&t.app.archive_url(), big.clone(), JSON).await;
    assert_eq!(a.code, 200, "{a:?}");
    // Durable before "0": the object is there as soon as the answer is.
    assert_eq!(files_in(&t.dir), vec![sha256_hex(big.as_bytes())]);
    let a = t.app.post_to(&t.app.archive_url(), big.clone(), JSON).await;
    assert_eq!(a.code, 200, "a retry: {a:?}");
    let small = archive_body("claim-2", "ref-claim", 1000);
    let a = t
        .app
        .post_to(&t.app.archive_url(), small.clone(), JSON)
        .await;
    assert_eq!(a.code, 200, "{a:?}");

    let got = take(&mut t.consumer, 2, WAIT).await;
    assert_eq!(got[0].routing_key.as_str(), "ref-claim");
    assert_claim_check(&got[0], &big, &t.dir);
    assert!(got[1].data == small.as_bytes(), "under the limit: inline");
    assert_eq!(claim_header(&got[1]), None);
    assert_quiet(&mut t.consumer, Duration::from_millis(500)).await;
    assert_eq!(
        files_in(&t.dir).len(),
        1,
        "one object for the body sent twice"
    );
    let (_, metrics) = t.app.admin_get("/metrics").await;
    assert!(
        metrics.contains("cellosign_bridge_claim_checks_total 1\n"),
        "{metrics}"
    );
    t.app.stop().await;
}

#[tokio::test]
async fn a_body_over_the_largest_message_is_claim_checked_in_both_ack_modes() {
    in_both_ack_modes(claim_checks_a_body_over_the_largest_message).await;
}

#[tokio::test]
async fn without_a_store_url_a_body_over_the_largest_message_gets_413() {
    let app = spawn_app(AckMode::Spooled, |s| s.amqp.max_message_bytes = MAX_MESSAGE).await;
    let big = archive_body("no-store", "ref-no-store", 2 * MAX_MESSAGE);
    let a = app.post_to(&app.archive_url(), big, JSON).await;
    assert_eq!(a.code, 413, "{a:?}");
    assert!(a.errordesc.contains("amqp.max_message_bytes"), "{a:?}");
    app.stop().await;
}

/// A store that cannot write (its directory replaced by a file: root ignores
/// permission bits, so a read-only directory would not do) answers 503 with
/// Retry-After and publishes nothing; once it can write again, the sender's retry
/// is stored and published once.
async fn a_failing_store_answers_503_and_publishes_nothing(mode: AckMode) {
    let mut t = start_with_store(mode).await;

    std::fs::remove_dir(&t.dir).expect("the store's directory, created at start");
    std::fs::write(&t.dir, b"not a directory").unwrap();
    let big = archive_body("broken", "ref-broken", 2 * MAX_MESSAGE);
    let a = t.app.post_to(&t.app.archive_url(), big.clone(), JSON).await;
    assert_eq!(a.code, 503, "{a:?}");
    assert_eq!(
        a.headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    assert!(a.errordesc.contains("claim-check store"), "{a:?}");
    assert_quiet(&mut t.consumer, Duration::from_millis(500)).await;

    std::fs::remove_file(&t.dir).unwrap();
    std::fs::create_dir(&t.dir).unwrap();
    let a = t.app.post_to(&t.app.archive_url(), big.clone(), JSON).await;
    assert_eq!(a.code, 200, "the retry, once the store can write: {a:?}");
    let got = take(&mut t.consumer, 1, WAIT).await;
    assert_claim_check(&got[0], &big, &t.dir);
    assert_quiet(&mut t.consumer, Duration::from_millis(300)).await;
    t.app.stop().await;
}

#[tokio::test]
async fn a_failing_store_answers_503_and_publishes_nothing_in_both_ack_modes() {
    in_both_ack_modes(a_failing_store_answers_503_and_publishes_nothing).await;
}

/// A store directory that cannot be created (under a regular file) refuses the
/// start, naming the key, before any task starts.
#[tokio::test]
async fn a_store_directory_that_cannot_be_created_refuses_the_start_naming_the_key() {
    let spool = tempfile::tempdir().unwrap();
    let file = spool.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let mut settings = test_settings(AckMode::Spooled, spool.path());
    let under_a_file = url::Url::from_directory_path(file.join("claims")).unwrap();
    settings.archive.store_url = Some(under_a_file.to_string());
    let error = match cellosign_bridge::Application::build(settings).await {
        Ok(_) => panic!("built with a store directory under a file"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.starts_with("archive.store_url: cannot create"),
        "{error}"
    );
}
