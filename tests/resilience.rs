//! No event answered "0" is lost: broker outages, network cuts, a full spool,
//! crashes (kill -9) and SIGTERM, with real brokers and real processes.

mod common;
mod support;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cellosign_bridge::{AckMode, QueueKind, QueueSettings};
use common::*;
use support::bridge_process::BridgeProcess;
use support::rabbit_node::RabbitNode;
use support::tcp_proxy::{CutMode, TcpProxy};

const DRAIN_WAIT: Duration = Duration::from_secs(90);

/// Consumes `queue` until every id in `expected` was seen (duplicates allowed);
/// returns every delivery as (routing key, message id), in delivery order.
/// Reconnects on errors: a restarted node may refuse consumers until its quorum
/// queues have a leader again.
async fn assert_all_arrive(
    url: &str,
    queue: &str,
    expected: &BTreeSet<String>,
) -> Vec<(String, String)> {
    use futures_util::StreamExt;
    let mut seen = HashSet::new();
    let mut delivered = Vec::new();
    let mut last_error = String::new();
    let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
    let missing = |seen: &HashSet<String>| {
        expected
            .iter()
            .filter(|id| !seen.contains(*id))
            .cloned()
            .collect::<Vec<_>>()
    };
    'connect: while !missing(&seen).is_empty() && tokio::time::Instant::now() < deadline {
        let connection = match tokio::time::timeout(
            Duration::from_secs(5),
            lapin::Connection::connect(url, Default::default()),
        )
        .await
        {
            Ok(Ok(connection)) => connection,
            other => {
                last_error = format!("connect: {:?}", other.map(|r| r.map(|_| ())));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let consumer = async {
            let channel = connection.create_channel().await?;
            channel
                .basic_consume(
                    queue.into(),
                    "".into(),
                    Default::default(),
                    Default::default(),
                )
                .await
        };
        let mut consumer = match consumer.await {
            Ok(consumer) => consumer,
            Err(e) => {
                last_error = format!("consume: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while !missing(&seen).is_empty() {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    if let Some(id) = d.properties.message_id() {
                        seen.insert(id.to_string());
                        delivered.push((d.routing_key.to_string(), id.to_string()));
                    }
                    let _ = d.ack(lapin::options::BasicAckOptions::default()).await;
                }
                Ok(_) => continue 'connect,
                Err(_) => break 'connect,
            }
        }
    }
    let missing = missing(&seen);
    assert!(
        missing.is_empty(),
        "{} of {} accepted events never arrived, e.g. {:?}; last consumer error: {last_error}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(5)]
    );
    delivered
}

fn durable_queue(name: &str) -> QueueSettings {
    QueueSettings {
        name: name.to_string(),
        kind: QueueKind::Quorum,
        bindings: vec!["#".into()],
        max_age: None,
        max_bytes: None,
    }
}

/// Nothing answered "0" is lost through a broker kill -9 and restart, and per
/// reference the first copies arrive in acceptance order (the events that waited in
/// the spool during the outage included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_nothing_and_keeps_order_per_reference() {
    bounded_within(Duration::from_secs(600), broker_outage()).await;
}

async fn broker_outage() {
    let mut node = RabbitNode::start().await.expect("private RabbitMQ node");
    let queue = unique("outage");
    let app = spawn_app(AckMode::Spooled, |s| {
        s.amqp.urls = vec![node.amqp_url().into()];
        // Classic: on a single node a quorum queue adds nothing, and after a kill -9 it
        // can refuse consumers for a long while until its Raft log is recovered.
        s.amqp.queues = vec![QueueSettings {
            kind: QueueKind::Classic,
            ..durable_queue(&queue)
        }];
        s.amqp.reconnect_initial_ms = 100;
        s.amqp.reconnect_max_ms = 1000;
    })
    .await;
    app.wait_ready(true, Duration::from_secs(30)).await;
    // (reference, message id) in acceptance order: the posts are sequential.
    let mut order = Vec::new();
    for n in 0..50 {
        assert_eq!(
            app.post_json(&event_body("WHEF_SESSION_CREATED", "before", "r1", n))
                .await
                .code,
            200
        );
        order.push((
            "r1".to_string(),
            message_id("WHEF_SESSION_CREATED", "before", n),
        ));
    }
    node.kill().expect("kill the private node");
    for n in 0..500 {
        let reference = format!("r{}", n % 7);
        let a = app
            .post_json(&event_body("WHEF_SESSION_CREATED", "during", &reference, n))
            .await;
        assert_eq!(a.code, 200, "{a:?}");
        order.push((reference, message_id("WHEF_SESSION_CREATED", "during", n)));
    }
    let (_, body) = app.admin_get("/readyz").await;
    assert!(body.contains("\"connected\":false"), "{body}");
    node.restart().await.expect("node restarts");
    let accepted: BTreeSet<String> = order.iter().map(|(_, id)| id.clone()).collect();
    let delivered = assert_all_arrive(&node.amqp_url(), &queue, &accepted).await;
    assert_first_copies_in_order_per_key(&order, &delivered);
    // Forwarded events leave the spool.
    for _ in 0..200 {
        let (_, body) = app.admin_get("/readyz").await;
        if body.contains("\"events\":0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = app.admin_get("/readyz").await;
    assert!(body.contains("\"events\":0"), "{body}");
    let (_, metrics) = app.admin_get("/metrics").await;
    assert!(
        metrics.contains("cellosign_bridge_broker_reconnects_total 1"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_answers_503_and_recovers_after_a_network_cut() {
    bounded_within(Duration::from_secs(600), full_spool_and_network_cut()).await;
}

async fn full_spool_and_network_cut() {
    let queue = unique("full");
    let proxy = TcpProxy::to_port(5672).await.expect("proxy");
    let app = spawn_app(AckMode::Spooled, |s| {
        s.amqp.urls = vec![proxy.amqp_url().into()];
        s.amqp.queues = vec![durable_queue(&queue)];
        s.amqp.reconnect_initial_ms = 100;
        s.amqp.reconnect_max_ms = 500;
        s.spool.max_bytes = 20_000;
    })
    .await;
    app.wait_ready(true, Duration::from_secs(30)).await;
    proxy.cut(CutMode::Refuse).await;
    let mut accepted = BTreeSet::new();
    let mut refused = 0;
    for n in 0..200 {
        let a = app
            .post_json(&event_body("WHEF_SESSION_CREATED", "full", "r1", n))
            .await;
        match a.code {
            200 => {
                accepted.insert(message_id("WHEF_SESSION_CREATED", "full", n));
            }
            503 => {
                assert!(a.headers.contains_key("retry-after"), "{a:?}");
                assert!(a.errordesc.contains("spool full"), "{a:?}");
                refused += 1;
            }
            _ => panic!("{a:?}"),
        }
    }
    assert!(
        refused > 0 && !accepted.is_empty(),
        "{} accepted, {refused} refused",
        accepted.len()
    );
    let (code, body) = app.admin_get("/readyz").await;
    assert_eq!(code, 503, "a full spool is not ready: {body}");
    proxy.restore();
    assert_all_arrive(&amqp_url(), &queue, &accepted).await;
    // Room again: accepted without anyone intervening.
    app.wait_ready(true, Duration::from_secs(30)).await;
    assert_eq!(
        app.post_json(&event_body("WHEF_SESSION_CREATED", "after", "r1", 1))
            .await
            .code,
        200
    );
    app.stop().await;
    let broker = Broker::connect(&amqp_url()).await;
    let _ = broker
        .channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
}

/// `/readyz`: HTTP code and parsed body.
async fn readyz(app: &TestApp) -> (u16, serde_json::Value) {
    let (code, body) = app.admin_get("/readyz").await;
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/readyz answers JSON ({e}): {body}"));
    (code, v)
}

/// Polls `/readyz` until `wanted` holds for (code, body), at most `within`.
async fn wait_readyz(
    app: &TestApp,
    within: Duration,
    wanted: impl Fn(u16, &serde_json::Value) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (code, v) = readyz(app).await;
        if wanted(code, &v) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz not as expected within {within:?}: HTTP {code} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// README "Quick start" and "Admin listener": started while its broker path refuses
/// or black-holes every connection, the bridge in `spooled` mode answers "0", stays
/// ready (200) with `connected: false`, `last_error`, the spooled events and
/// `oldest_age_s` in `/readyz`; once the path works, every event arrives, in order
/// per reference, the link shows connected and the spool empties.
async fn started_before_its_broker_in_spooled_mode(cut: CutMode) {
    let queue = unique("nobroker");
    let proxy = TcpProxy::to_port(5672).await.expect("proxy");
    proxy.cut(cut).await;
    let app = spawn_app(AckMode::Spooled, |s| {
        s.amqp.urls = vec![proxy.amqp_url().into()];
        s.amqp.queues = vec![QueueSettings {
            kind: QueueKind::Classic,
            ..durable_queue(&queue)
        }];
        s.amqp.reconnect_initial_ms = 100;
        s.amqp.reconnect_max_ms = 500;
    })
    .await;
    let mut order = Vec::new();
    for n in 0..30u64 {
        let reference = format!("r{}", n % 3);
        let a = app
            .post_json(&event_body("WHEF_SESSION_CREATED", "early", &reference, n))
            .await;
        assert_eq!(a.code, 200, "{cut:?}: accepted with no broker: {a:?}");
        order.push((reference, message_id("WHEF_SESSION_CREATED", "early", n)));
    }
    // A black hole gives its first error only after the connect timeout (10 s).
    wait_readyz(&app, Duration::from_secs(30), |_, v| {
        v["broker"]["last_error"].is_string()
    })
    .await;
    let (code, v) = readyz(&app).await;
    assert_eq!(
        code, 200,
        "{cut:?}: an unreachable broker does not make spooled mode unready: {v}"
    );
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["mode"], "spooled", "{v}");
    assert_eq!(v["broker"]["connected"], false, "{v}");
    assert_eq!(v["spool"]["events"], 30, "{v}");
    assert!(
        v["spool"]["oldest_age_s"].as_f64().is_some(),
        "oldest_age_s while events wait: {v}"
    );
    assert_eq!(
        app.metric("cellosign_bridge_broker_connected").await,
        0.0,
        "{cut:?}"
    );

    proxy.restore();
    let accepted: BTreeSet<String> = order.iter().map(|(_, id)| id.clone()).collect();
    let delivered = assert_all_arrive(&amqp_url(), &queue, &accepted).await;
    assert_first_copies_in_order_per_key(&order, &delivered);
    wait_readyz(&app, Duration::from_secs(30), |code, v| {
        code == 200
            && v["broker"]["connected"] == true
            && v["broker"].get("last_error").is_none()
            && v["spool"]["events"] == 0
            && v["spool"].get("oldest_age_s").is_none()
    })
    .await;
    app.stop().await;
    let broker = Broker::connect(&amqp_url()).await;
    broker.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_with_its_broker_refusing_spooled_mode_accepts_stays_ready_and_forwards_all_in_order()
 {
    bounded(started_before_its_broker_in_spooled_mode(CutMode::Refuse)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_with_its_broker_black_holed_spooled_mode_accepts_stays_ready_and_forwards_all_in_order()
 {
    bounded(started_before_its_broker_in_spooled_mode(
        CutMode::Blackhole,
    ))
    .await;
}

/// README "Delivery modes" and "Admin listener": started while its broker path
/// black-holes every connection, the bridge in `confirmed` mode answers 503 with
/// Retry-After and is not ready; once the path works, readiness turns 200 and an
/// event is answered "0" and arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_with_its_broker_black_holed_confirmed_mode_answers_503_until_it_appears_then_200()
{
    bounded(async {
        let proxy = TcpProxy::to_port(5672).await.expect("proxy");
        proxy.cut(CutMode::Blackhole).await;
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.urls = vec![proxy.amqp_url().into()];
            s.amqp.reconnect_initial_ms = 100;
            s.amqp.reconnect_max_ms = 500;
            s.amqp.publish_timeout_ms = 1000;
        })
        .await;
        let a = app
            .post_json(&event_body("WHEF_SESSION_CREATED", "early", "r-early", 1))
            .await;
        assert_eq!(a.code, 503, "{a:?}");
        assert!(a.headers.contains_key("retry-after"), "{a:?}");
        let (code, v) = readyz(&app).await;
        assert_eq!(
            code, 503,
            "confirmed mode is not ready without a broker: {v}"
        );
        assert_eq!(v["ready"], false, "{v}");
        assert_eq!(v["broker"]["connected"], false, "{v}");

        // Bound before the bridge can connect: the 503'd event, were it published late,
        // would arrive first.
        let (_broker, mut consumer) = app.subscribe("#").await;
        proxy.restore();
        app.wait_ready(true, Duration::from_secs(30)).await;
        let body = event_body("WHEF_SESSION_CREATED", "late", "r-late", 2);
        let a = app.post_json(&body).await;
        assert_eq!(a.code, 200, "{a:?}");
        let got = take(&mut consumer, 1, Duration::from_secs(20)).await;
        assert_eq!(
            got[0].data,
            body.as_bytes(),
            "only the event answered \"0\" arrives"
        );
        assert_quiet(&mut consumer, Duration::from_millis(500)).await;
        app.stop().await;
    })
    .await;
}

/// Posts distinct events from 8 senders until told to stop; returns the ids answered "0".
fn senders(
    url: String,
    prefix: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<BTreeSet<String>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for s in 0..8u64 {
            let (url, stop) = (url.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let mut ok = BTreeSet::new();
                let mut n = s * 1_000_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let session = format!("{prefix}{s}");
                    let body =
                        event_body("WHEF_SESSION_CREATED", &session, &format!("r{}", n % 5), n);
                    let sent = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status() == 200 => {
                            let v: serde_json::Value = r.json().await.unwrap_or_default();
                            if v["status"] == "0" {
                                ok.insert(message_id("WHEF_SESSION_CREATED", &session, n));
                            }
                        }
                        Ok(_) => {}
                        // The bridge is gone: wait for the test to stop us.
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                ok
            }));
        }
        let mut all = BTreeSet::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    })
}

async fn crash_or_stop(signal: &str) {
    let spool = tempfile::tempdir().unwrap();
    let exchange = unique("crash");
    let queue = unique("crashq");
    let token = "crash-test-token-42";
    // The queue exists before the first bridge, so nothing is routed elsewhere.
    let broker = Broker::connect(&amqp_url()).await;
    broker.declare_exchange(&exchange).await;
    broker.durable_queue(&exchange, &queue, "#").await;

    let mut first = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, token, &[]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sending = senders(first.url(token), "crash", stop.clone());
    // Let them post a while, so the kill lands mid-stream.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let status = Command::new("kill")
        .args([signal, &first.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || {
        let exit = first.child.wait();
        (exit, first)
    });
    let (exit, first) = exit.await.unwrap();
    let exit = exit.unwrap();
    if signal == "-TERM" {
        assert!(
            exit.success(),
            "SIGTERM exits 0: {exit:?}\n{}",
            first.log.lock().unwrap()
        );
    } else {
        assert!(!exit.success());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let accepted = sending.await.unwrap();
    assert!(
        accepted.len() > 50,
        "only {} accepted before the {signal}",
        accepted.len()
    );

    // A new process on the same spool forwards what the first one kept.
    let second = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, token, &[]);
    assert_all_arrive(&amqp_url(), &queue, &accepted).await;
    for log in [&first.log, &second.log] {
        let log = log.lock().unwrap();
        assert!(!log.contains(token), "the token leaked into the logs");
        assert!(
            !log.contains("CUSTOMER_VALUE"),
            "a label value leaked into the logs"
        );
    }
    let _ = second.admin;
    drop(second);
    let _ = broker
        .channel
        .queue_delete(queue.as_str().into(), Default::default())
        .await;
    // The bridge here is a child process, not a TestApp: clean up after it.
    broker.cleanup(&exchange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_posting_loses_nothing() {
    bounded_within(Duration::from_secs(600), crash_or_stop("-KILL")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_posting_exits_0_and_loses_nothing() {
    bounded_within(Duration::from_secs(600), crash_or_stop("-TERM")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_stats_reads_the_file_or_asks_the_running_bridge() {
    let spool = tempfile::tempdir().unwrap();
    let exchange = unique("stats");
    let stats = |admin: Option<SocketAddr>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"));
        cmd.args(["spool", "stats"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("BRIDGE_SPOOL__DIR", spool.path());
        if let Some(a) = admin {
            cmd.env("BRIDGE_ADMIN__LISTEN", a.to_string());
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // No broker reachable: events stay in the spool.
    let bridge = BridgeProcess::start(
        spool.path(),
        "amqp://guest:guest@127.0.0.1:1/%2f",
        &exchange,
        "t",
        &[],
    );
    let client = http_client();
    for n in 0..3 {
        let r = client
            .post(bridge.url("t"))
            .body(event_body("WHEF_SESSION_CREATED", "st", "r", n))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let running = stats(Some(bridge.admin));
    assert!(
        running["source"].as_str().unwrap().contains("running"),
        "{running}"
    );
    assert_eq!(running["spool"]["events"], 3, "{running}");
    let mut bridge = bridge;
    Command::new("kill")
        .args(["-TERM", &bridge.child.id().to_string()])
        .status()
        .unwrap();
    let exit = tokio::task::spawn_blocking(move || bridge.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    let stopped = stats(None);
    assert!(
        stopped["source"].as_str().unwrap().contains("not running"),
        "{stopped}"
    );
    assert_eq!(stopped["events"], 3, "{stopped}");
    assert!(
        stopped["oldest_age_s"].as_f64().unwrap() >= 0.0,
        "{stopped}"
    );
}

/// Runs `cellosign-bridge spool drain` on `spool` against `amqp_url`: exit status,
/// stdout, stderr.
fn spool_drain(
    spool: &std::path::Path,
    amqp_url: &str,
    exchange: &str,
    timeout_s: u64,
) -> (bool, String, String) {
    // The shipped config declares `cellosign.sessions`; the test binds its own queue.
    let config = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(config.path(), "[amqp]\nqueues = []\n").expect("test config");
    let out = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"))
        .args(["spool", "drain", "--timeout", &timeout_s.to_string()])
        .arg("--config")
        .arg(config.path())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BRIDGE_SPOOL__DIR", spool)
        .env("BRIDGE_AMQP__URLS", amqp_url)
        .env("BRIDGE_AMQP__EXCHANGE", exchange)
        .env("BRIDGE_LOG__FORMAT", "json")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run spool drain");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_drain_forwards_a_left_spool_in_order_and_fails_losing_nothing() {
    bounded(async {
        let spool = tempfile::tempdir().unwrap();
        let exchange = unique("drain");
        let dead = "amqp://guest:guest@127.0.0.1:1/%2f";
        // A replica that could not reach its broker: its events wait in the spool.
        let mut bridge = BridgeProcess::start(spool.path(), dead, &exchange, "t", &[]);
        let client = http_client();
        let mut accepted = Vec::new();
        for n in 0..30 {
            let reference = format!("dr-{}", n % 3);
            let r = client
                .post(bridge.url("t"))
                .body(event_body("WHEF_SESSION_CREATED", "sd", &reference, n))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            accepted.push((reference, message_id("WHEF_SESSION_CREATED", "sd", n)));
        }

        // While that bridge holds the spool, drain refuses and changes nothing.
        let (ok, _, err) = spool_drain(spool.path(), &amqp_url(), &exchange, 5);
        assert!(!ok && err.contains("in use by a running bridge"), "{err}");
        bridge.signal("TERM");
        assert!(
            bridge
                .wait_exit(Duration::from_secs(20))
                .is_some_and(|s| s.success())
        );

        // A broker that cannot be reached: exit non-zero within the timeout, nothing lost.
        let started = std::time::Instant::now();
        let (ok, _, err) = spool_drain(spool.path(), dead, &exchange, 2);
        assert!(!ok, "a drain to a dead broker succeeded");
        assert!(
            err.contains("30 events still in the spool"),
            "the failure names what is left: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2 + 10),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(spool_events(spool.path()), 30);

        // A wrong path is not an empty spool.
        let nowhere = spool.path().join("nowhere");
        let (ok, _, err) = spool_drain(&nowhere, &amqp_url(), &exchange, 5);
        assert!(!ok && err.contains("no spool to drain"), "{err}");
        assert!(
            !nowhere.exists(),
            "the drain created a spool where there was none"
        );

        // The broker reachable: every event forwarded, in order per reference, spool empty.
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        let mut consumer = broker.subscribe(&exchange, "#").await;
        let (ok, out, err) = spool_drain(spool.path(), &amqp_url(), &exchange, 60);
        assert!(ok, "{err}");
        let report: serde_json::Value = serde_json::from_str(&out).expect("a JSON report");
        assert_eq!(report["forwarded"], 30, "{out}");
        assert_eq!(report["left"], 0, "{out}");
        let got = take(&mut consumer, 30, Duration::from_secs(20)).await;
        let delivered: Vec<(String, String)> = got
            .iter()
            .map(|d| (d.routing_key.to_string(), id_of(d)))
            .collect();
        assert_first_copies_in_order_per_key(&accepted, &delivered);
        assert_eq!(spool_events(spool.path()), 0);
        drop(consumer);
        broker.cleanup(&exchange).await;
    })
    .await;
}

/// Events in the spool at `dir`, read from the file (no bridge running).
fn spool_events(dir: &std::path::Path) -> u64 {
    cellosign_bridge::Spool::inspect(dir)
        .expect("the spool file")
        .events
}
