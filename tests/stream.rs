//! Replay from a stream (SPEC 7, issue 10 point 2) on a real RabbitMQ: a stream
//! queue bound beside a quorum queue keeps every event, and `tail --queue --from`
//! (the real binary) reads it from `first`, from an offset and from a time,
//! giving exactly the events from that point, in order. Also: the retention keys
//! are refused on a queue that is not a stream, a changed retention on an
//! existing stream is named in `/readyz`, and `tail --queue` leaves a queue that
//! is not a stream as it was.

mod common;

use std::process::Stdio;
use std::time::{Duration, SystemTime};

use cellosign_bridge::{AckMode, QueueKind, QueueSettings};
use common::*;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use tokio::process::Command;

const WAIT: Duration = Duration::from_secs(20);
/// A run of `tail` with `--until-idle`: the idle time, plus a slow start.
const TAIL_BOUND: Duration = Duration::from_secs(60);
const TYPE: &str = "WHEF_SESSION_CREATED";
/// Events per batch.
const N: u64 = 20;
const SPOOL_EVENTS: &str = "cellosign_bridge_spool_events";

/// Deletes the named queues when dropped (a failed assertion included), bounded.
struct Queues(Vec<String>);

impl Drop for Queues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        clean_up_from_drop(async move {
            let url = amqp_url();
            let connect = Connection::connect(&url, ConnectionProperties::default());
            let Ok(connection) = connect.await else {
                return;
            };
            let Ok(channel) = connection.create_channel().await else {
                return;
            };
            for name in &names {
                let options = QueueDeleteOptions::default();
                let _ = channel.queue_delete(name.as_str().into(), options).await;
            }
            let _ = connection.close(200, "cleaned".into()).await;
        });
    }
}

fn queue(name: &str, kind: QueueKind, max_age: Option<&str>) -> QueueSettings {
    QueueSettings {
        name: name.to_string(),
        kind,
        bindings: vec!["#".into()],
        max_age: max_age.map(String::from),
        max_bytes: (kind == QueueKind::Stream).then_some(1 << 30),
    }
}

/// Declares `name` as a durable stream with these retention arguments, on a
/// channel of its own (a refusal closes it); true if the broker accepted. On an
/// existing queue the broker accepts exactly its own arguments: any other value,
/// or one missing or added, is PRECONDITION_FAILED.
async fn declare_stream(broker: &Broker, name: &str, max_age: &str, max_bytes: i64) -> bool {
    let Ok(channel) = broker.connection.create_channel().await else {
        return false;
    };
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    args.insert("x-max-age".into(), AMQPValue::LongString(max_age.into()));
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(max_bytes),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let ok = channel
        .queue_declare(name.into(), durable, args)
        .await
        .is_ok();
    let _ = channel.close(200, "done".into()).await;
    ok
}

/// What a run of the real binary gave.
struct Run {
    ok: bool,
    lines: Vec<Value>,
    stderr: String,
}

/// Runs `cellosign-bridge <args>` against the test broker, bounded by
/// [`TAIL_BOUND`], and parses its stdout as JSON lines.
async fn bridge(args: &[&str]) -> Run {
    let child = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"))
        .args(args)
        .env("BRIDGE_AMQP__URLS", amqp_url())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let output = tokio::time::timeout(TAIL_BOUND, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} still running after {TAIL_BOUND:?}"))
        .expect("the binary's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let lines = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}; {stderr}")))
        .collect();
    Run {
        ok: output.status.success(),
        lines,
        stderr,
    }
}

/// `tail --queue <stream> --from <from> --until-idle 2`: the lines, after checking
/// that it exited 0.
async fn replay(stream: &str, from: &str) -> Vec<Value> {
    let run = bridge(&[
        "tail",
        "--queue",
        stream,
        "--from",
        from,
        "--until-idle",
        "2",
    ])
    .await;
    assert!(run.ok, "tail --from {from} failed: {}", run.stderr);
    run.lines
}

/// (message_id, offset) of each line.
fn ids_and_offsets(lines: &[Value]) -> Vec<(String, i64)> {
    lines
        .iter()
        .map(|l| {
            let id = l["message_id"].as_str().unwrap_or_else(|| panic!("{l}"));
            let offset = l["offset"].as_i64().unwrap_or_else(|| panic!("{l}"));
            (id.to_string(), offset)
        })
        .collect()
}

/// Posts events `first..first + N` all at once, each of its own reference, each
/// answered 200, and waits until the broker has confirmed them all (the spool is
/// empty). The forwarder publishes them together, so several share a chunk of the
/// stream, and reading from an offset inside a chunk gets tested. Returns their
/// message ids, sorted.
async fn post_batch(app: &TestApp, first: u64) -> Vec<String> {
    let posts = (first..first + N).map(|n| async move {
        let (session, reference) = (format!("s{n}"), format!("r{n}"));
        let answer = app
            .post_json(&event_body(TYPE, &session, &reference, n))
            .await;
        assert_eq!(answer.code, 200, "{answer:?}");
        message_id(TYPE, &session, n)
    });
    let mut ids = futures_util::future::join_all(posts).await;
    app.wait_metric(SPOOL_EVENTS, WAIT, |v| v == 0.0).await;
    ids.sort();
    ids
}

/// `ids`, sorted.
fn sorted(ids: &[String]) -> Vec<String> {
    let mut ids = ids.to_vec();
    ids.sort();
    ids
}

/// Now as RFC 3339 with milliseconds (tail cuts it to the second).
fn now_rfc3339() -> String {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    let secs = i64::try_from(since.as_secs()).expect("in range");
    chrono::DateTime::from_timestamp(secs, since.subsec_nanos())
        .expect("a time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test]
async fn a_stream_beside_the_quorum_queue_keeps_every_event_and_replays_from_any_point() {
    bounded(async {
        let (stream, quorum) = (unique("stream"), unique("quorum"));
        let _cleanup = Queues(vec![stream.clone(), quorum.clone()]);
        let queues = vec![
            queue(&quorum, QueueKind::Quorum, None),
            queue(&stream, QueueKind::Stream, Some("1D")),
        ];
        let app = spawn_app(AckMode::Spooled, |s| s.amqp.queues = queues).await;
        app.wait_ready(true, WAIT).await;
        let broker = Broker::connect(&amqp_url()).await;
        assert!(
            declare_stream(&broker, &stream, "1D", 1 << 30).await,
            "the stream is not declared with x-max-age 1D and x-max-length-bytes 2^30"
        );
        assert!(
            !declare_stream(&broker, &stream, "2D", 1 << 30).await
                && !declare_stream(&broker, &stream, "1D", 1 << 29).await,
            "the retention arguments are not checked"
        );

        // Two batches with a clear gap around the time noted between them: a
        // timestamp offset starts at the first chunk written at or after that
        // second, so every chunk of the first batch is before it (all its events
        // were confirmed, hence written, over a second earlier) and every chunk
        // of the second after it.
        let mut posted = post_batch(&app, 0).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let middle = now_rfc3339();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        posted.extend(post_batch(&app, N).await);

        // The stream has every event once, at increasing offsets...
        let all = ids_and_offsets(&replay(&stream, "first").await);
        let ids: Vec<String> = all.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(sorted(&ids), sorted(&posted), "the stream read from first");
        assert!(
            all.windows(2).all(|w| w[0].1 < w[1].1),
            "offsets increase: {all:?}"
        );
        // ...in the order the quorum queue beside it got them (one channel
        // publishes to both).
        let mut consumer = broker.consume(&quorum).await;
        let got = take(&mut consumer, posted.len(), WAIT).await;
        assert_eq!(message_ids(&got), ids, "the quorum queue");
        assert_quiet(&mut consumer, Duration::from_millis(500)).await;

        // From an offset: exactly the events from it on, wherever it falls in a chunk.
        for k in [1, 2, 3, N as usize + 1, N as usize + 2] {
            let (_, offset) = all[k];
            let from_offset = ids_and_offsets(&replay(&stream, &offset.to_string()).await);
            assert_eq!(from_offset, all[k..], "from offset {offset} (event {k})");
        }

        // From the time between the batches: exactly the second batch.
        let from_time = ids_and_offsets(&replay(&stream, &middle).await);
        assert_eq!(from_time, all[N as usize..], "from {middle}");
        let second: Vec<String> = from_time.into_iter().map(|(id, _)| id).collect();
        assert_eq!(
            sorted(&second),
            posted[N as usize..],
            "the second batch is the one after {middle}"
        );

        // Each line is tail's line plus the offset.
        let line = &replay(&stream, "first").await[0];
        let (id, offset) = &all[0];
        assert_eq!(line["message_id"], id.as_str(), "{line}");
        assert_eq!(line["offset"], *offset, "{line}");
        assert_eq!(line["type"], TYPE, "{line}");
        let key = line["routing_key"].as_str().unwrap_or_default();
        assert_eq!(line["body"]["session"]["reference"], key, "{line}");
        assert!(line["received_at"].is_string(), "{line}");

        drop(consumer);
        app.stop().await;
    })
    .await;
}

/// Publishes `n` messages to `stream` at once (every publish sent before any
/// confirm is awaited), ids `{tag}-{i}`; returns the ids.
async fn burst(channel: &lapin::Channel, stream: &str, tag: usize, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("{tag}-{i:04}")).collect();
    // Polled together, the publishes queue their frames before lapin's I/O thread
    // writes them, so the broker gets them in large reads and writes large chunks;
    // awaited one by one, the last few often trickled in and made a chunk each (the
    // test failed that way 4 times in 9 here). Order holds: each publish queues its
    // frames on its first poll, and `join_all` polls them first in order.
    let publishes = ids.iter().map(|id| {
        let properties = lapin::BasicProperties::default().with_message_id(id.as_str().into());
        channel.basic_publish(
            "".into(),
            stream.into(),
            lapin::options::BasicPublishOptions::default(),
            b"{}",
            properties,
        )
    });
    let confirms = futures_util::future::join_all(publishes).await;
    for confirm in confirms {
        let confirm = confirm.expect("publish");
        assert!(confirm.await.expect("confirm").is_ack(), "nacked");
    }
    ids
}

/// The broker writes what arrives together as one chunk, and attaches a reader
/// at a chunk: `--from <offset>` inside a chunk must still start at that very
/// message. `--from last` (the last chunk, whole) finds a chunk of several.
#[tokio::test]
async fn reading_from_an_offset_inside_a_chunk_starts_at_that_message() {
    bounded(async {
        let stream = unique("chunks");
        let _cleanup = Queues(vec![stream.clone()]);
        let broker = Broker::connect(&amqp_url()).await;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        broker
            .channel
            .queue_declare(stream.as_str().into(), durable, args)
            .await
            .expect("declare the stream");
        let channel = cellosign_bridge::confirm_channel(&broker.connection)
            .await
            .expect("confirm channel");
        // Bursts until the last chunk holds several messages (almost always the first).
        let mut sent = Vec::new();
        let mut last = Vec::new();
        for tag in 0..5 {
            sent.extend(burst(&channel, &stream, tag, 1000).await);
            last = ids_and_offsets(&replay(&stream, "last").await);
            if last.len() >= 3 {
                break;
            }
        }
        assert!(last.len() >= 3, "no chunk of several messages: {last:?}");
        let all = ids_and_offsets(&replay(&stream, "first").await);
        let ids: Vec<String> = all.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(ids, sent, "the stream read from first");
        assert_eq!(last, all[all.len() - last.len()..], "the last chunk");
        let chunk_start = all.len() - last.len();
        for k in [chunk_start + 1, all.len() - 1] {
            let (_, offset) = all[k];
            let from = ids_and_offsets(&replay(&stream, &offset.to_string()).await);
            assert_eq!(
                from,
                all[k..],
                "from offset {offset}, inside the last chunk"
            );
        }
    })
    .await;
}

/// `tail --queue` on a quorum or a classic queue: the broker refuses the stream
/// offset, `tail` says the queue is not a stream, prints and acks nothing, and
/// the queue keeps its events.
#[tokio::test]
async fn tail_queue_refuses_a_queue_that_is_not_a_stream_and_leaves_its_events() {
    bounded(async {
        let (quorum, classic) = (unique("quorum"), unique("classic"));
        let _cleanup = Queues(vec![quorum.clone(), classic.clone()]);
        let queues = vec![
            queue(&quorum, QueueKind::Quorum, None),
            queue(&classic, QueueKind::Classic, None),
        ];
        let app = spawn_app(AckMode::Confirmed, |s| s.amqp.queues = queues).await;
        app.wait_ready(true, WAIT).await;
        let posted = post_batch(&app, 0).await;
        let broker = Broker::connect(&amqp_url()).await;
        for name in [&quorum, &classic] {
            let run = bridge(&["tail", "--queue", name, "--from", "first"]).await;
            assert!(!run.ok, "tail read {name}: {:?}", run.lines);
            assert!(run.lines.is_empty(), "printed {:?}", run.lines);
            assert!(
                run.stderr.contains("not a stream") && run.stderr.contains(name.as_str()),
                "{}",
                run.stderr
            );
            // Everything is still there for the queue's real consumers.
            let mut consumer = broker.consume(name).await;
            let got = take(&mut consumer, posted.len(), WAIT).await;
            assert_eq!(sorted(&message_ids(&got)), posted, "{name}");
            assert_quiet(&mut consumer, Duration::from_millis(300)).await;
        }
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn max_age_on_a_queue_that_is_not_a_stream_stops_the_start_naming_the_key() {
    bounded(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("bridge.toml");
        let spool = dir.path().join("spool");
        let text = format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [spool]\ndir = {spool:?}\n[amqp]\nexchange = {exchange:?}\ndeclare = false\n\
             [[amqp.queues]]\nname = {name:?}\ntype = \"quorum\"\nbindings = [\"#\"]\nmax_age = \"7D\"\n",
            exchange = unique("ex"),
            name = unique("q"),
        );
        std::fs::write(&config, text).expect("write config");
        let config = config.to_str().expect("utf-8 path");
        // declare = false: should the check ever let it start, it declares nothing.
        let run = bridge(&["serve", "--config", config]).await;
        assert!(!run.ok, "started: {}", run.stderr);
        assert!(
            run.stderr.contains("amqp.queues[0].max_age") && run.stderr.contains("stream"),
            "{}",
            run.stderr
        );
    })
    .await;
}

#[tokio::test]
async fn a_changed_retention_on_an_existing_stream_is_named_in_readyz() {
    bounded(async {
        let stream = unique("retention");
        let _cleanup = Queues(vec![stream.clone()]);
        // The stream as an earlier configuration declared it.
        let broker = Broker::connect(&amqp_url()).await;
        assert!(declare_stream(&broker, &stream, "1D", 1 << 30).await);
        let queues = vec![queue(&stream, QueueKind::Stream, Some("2D"))];
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.queues = queues;
            s.amqp.reconnect_initial_ms = 50;
            s.amqp.reconnect_max_ms = 300;
        })
        .await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (code, body) = app.admin_get("/readyz").await;
            if body.contains("\"misconfigured\":true") {
                assert_eq!(code, 503, "{body}");
                assert!(
                    body.contains("PRECONDITION_FAILED")
                        && body.contains("x-max-age")
                        && body.contains("max_age"),
                    "{body}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the changed max_age not reported within {WAIT:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app.stop().await;
    })
    .await;
}
