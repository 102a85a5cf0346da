//! The bridge as a process: no work at rest, a bounded shutdown whatever the
//! broker does, and an exit non-zero when a background task dies (SPEC 6 "At
//! rest, no work", "Shutdown is bounded", "Supervision").

mod common;
mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use support::bridge_process::BridgeProcess;
use support::rabbit_node::RabbitNode;
use support::tcp_proxy::{CutMode, TcpProxy};

const TOKEN: &str = "lifecycle-token";
const GRACE_MS: u64 = 3000;

/// Posts `n` distinct events of reference `reference`; returns their message ids.
async fn post_events(bridge: &BridgeProcess, tag: &str, reference: &str, n: u64) -> Vec<String> {
    let client = http_client();
    let mut ids = Vec::new();
    for i in 0..n {
        let r = client
            .post(bridge.url(TOKEN))
            .header("content-type", "application/json")
            .body(event_body("WHEF_SESSION_CREATED", tag, reference, i))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        ids.push(message_id("WHEF_SESSION_CREATED", tag, i));
    }
    ids
}

async fn readyz(bridge: &BridgeProcess) -> Option<(u16, String)> {
    let r = http_client()
        .get(format!("http://{}/readyz", bridge.admin))
        .send()
        .await
        .ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.unwrap_or_default()))
}

async fn wait_connected(bridge: &BridgeProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((200, body)) = readyz(bridge).await
            && body.contains("\"connected\":true")
        {
            return;
        }
        assert!(Instant::now() < deadline, "bridge never connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_spool_empty(bridge: &BridgeProcess) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((_, body)) = readyz(bridge).await
            && body.contains("\"events\":0,")
        {
            return;
        }
        assert!(Instant::now() < deadline, "spool never emptied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends SIGTERM and returns how long the process took to exit, and its exit code.
fn terminate(bridge: &mut BridgeProcess) -> (Duration, Option<i32>) {
    let started = Instant::now();
    bridge.signal("TERM");
    exit_after(bridge, started)
}

/// Waits for the exit of a bridge sent SIGTERM at `started`: how long it took, and
/// its exit code.
fn exit_after(bridge: &mut BridgeProcess, started: Instant) -> (Duration, Option<i32>) {
    let status = bridge.wait_exit(Duration::from_secs(60));
    let took = started.elapsed();
    eprintln!("exit {took:?} after SIGTERM");
    let status = status.unwrap_or_else(|| {
        panic!(
            "still running 60 s after SIGTERM (grace {GRACE_MS} ms); log:\n{}",
            bridge.log()
        )
    });
    (took, status.code())
}

/// The promise is grace + 1 s; the rest is room for a loaded CI machine.
fn assert_bounded(took: Duration, what: &str) {
    let bound = Duration::from_millis(GRACE_MS) + Duration::from_secs(1);
    assert!(
        took <= bound + Duration::from_millis(1500),
        "{what}: exit took {took:?}, promised within {bound:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_rest_after_a_restart_on_a_used_spool_the_bridge_uses_no_cpu() {
    bounded(async {
        let exchange = unique("rest");
        let spool = tempfile::tempdir().expect("temp dir");
        let broker = Broker::connect(&amqp_url()).await;
        {
            let mut first = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, TOKEN, &[]);
            wait_connected(&first).await;
            post_events(&first, "rest", "r-rest", 20).await;
            wait_spool_empty(&first).await;
            // A clean stop makes the removals durable: the next start finds an empty
            // spool whose sequence numbers are past zero.
            let (_, code) = terminate(&mut first);
            assert_eq!(code, Some(0));
        }
        // The spool has held events; a new process on it must sleep until one comes.
        let second = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, TOKEN, &[]);
        wait_connected(&second).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = second.cpu_time();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let used = second.cpu_time() - before;
        // 1% of a core over 5 s is 50 ms; a loop burns seconds.
        assert!(
            used <= Duration::from_millis(150),
            "idle bridge used {used:?} of CPU in 5 s"
        );
        drop(second);
        broker.cleanup(&exchange).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_in_time_while_an_alarm_blocks_publishing_and_keeps_every_event() {
    bounded(async {
        let node = RabbitNode::start().await.expect("private RabbitMQ node");
        let exchange = unique("alarm");
        let queue = unique("alarm.q");
        let spool = tempfile::tempdir().expect("temp dir");
        let broker = Broker::connect(&node.amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        broker.durable_queue(&exchange, &queue, "#").await;
        let grace = GRACE_MS.to_string();
        let env = [("BRIDGE_SHUTDOWN__GRACE_MS", grace.as_str())];
        // The alarm is on before the bridge connects: every publish it tries is blocked.
        node.set_memory_alarm(true).await.expect("memory alarm on");
        let mut bridge =
            BridgeProcess::start(spool.path(), &node.amqp_url(), &exchange, TOKEN, &env);
        let ids = post_events(&bridge, "alarm", "r-alarm", 30).await;
        // Let the forwarder run into the blocked connection.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (took, code) = terminate(&mut bridge);
        assert_eq!(code, Some(0), "exit code; log:\n{}", bridge.log());
        assert_bounded(took, "memory alarm");

        node.set_memory_alarm(false)
            .await
            .expect("memory alarm off");
        let _second = BridgeProcess::start(spool.path(), &node.amqp_url(), &exchange, TOKEN, &env);
        let mut consumer = broker.consume(&queue).await;
        // Duplicates are allowed (a publish may have landed before the block); gaps are not.
        let wanted: BTreeSet<String> = ids.into_iter().collect();
        let mut got = BTreeSet::new();
        while !wanted.is_subset(&got) {
            let d = take(&mut consumer, 1, Duration::from_secs(60)).await;
            got.extend(
                d.iter()
                    .filter_map(|d| d.properties.message_id().as_ref().map(|s| s.to_string())),
            );
        }
        assert_eq!(got, wanted);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_in_time_with_a_black_holed_broker() {
    bounded(async {
        let target = amqp_url();
        let port: u16 = target
            .rsplit(':')
            .next()
            .and_then(|p| p.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or(5672);
        let proxy = TcpProxy::to_port(port).await.expect("proxy");
        let exchange = unique("hole");
        let spool = tempfile::tempdir().expect("temp dir");
        let grace = GRACE_MS.to_string();
        let env = [("BRIDGE_SHUTDOWN__GRACE_MS", grace.as_str())];
        let mut bridge =
            BridgeProcess::start(spool.path(), &proxy.amqp_url(), &exchange, TOKEN, &env);
        wait_connected(&bridge).await;
        proxy.cut(CutMode::Blackhole).await;
        post_events(&bridge, "hole", "r-hole", 10).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let started = Instant::now();
        bridge.signal("TERM");
        // The forwarder waits on the black hole for the grace period; meanwhile
        // readiness tells load balancers to stop sending.
        let mut seen = None;
        while started.elapsed() < Duration::from_millis(GRACE_MS / 2) {
            seen = readyz(&bridge).await;
            if matches!(&seen, Some((503, _))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, body) = seen.expect("the admin listener answers while draining");
        assert_eq!(status, 503, "readiness while draining: {body}");
        assert!(body.contains("\"draining\":true"), "{body}");
        let (took, code) = exit_after(&mut bridge, started);
        assert_eq!(code, Some(0), "exit code; log:\n{}", bridge.log());
        assert_bounded(took, "black hole");
        proxy.restore();
        let events = cellosign_bridge::Spool::inspect(spool.path())
            .expect("spool readable after exit")
            .events;
        assert_eq!(events, 10, "every unforwarded event stays in the spool");
        let broker = Broker::connect(&amqp_url()).await;
        broker.cleanup(&exchange).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_background_task_turns_readiness_503_and_the_process_exits_non_zero() {
    bounded(async {
        for fault in ["forwarder.panic", "link.panic", "spool.writer_panic"] {
            let exchange = unique("supervised");
            let spool = tempfile::tempdir().expect("temp dir");
            let grace = GRACE_MS.to_string();
            let env = [
                ("BRIDGE_SHUTDOWN__GRACE_MS", grace.as_str()),
                (cellosign_bridge::FAULTS_ENV, fault),
            ];
            let mut bridge =
                BridgeProcess::start(spool.path(), &amqp_url(), &exchange, TOKEN, &env);
            // The link dies on connecting; the forwarder on its first publish; the
            // spool writer on its first write, which must then not be answered "0".
            match fault {
                "forwarder.panic" => {
                    wait_connected(&bridge).await;
                    post_events(&bridge, "sup", "r-sup", 1).await;
                }
                "spool.writer_panic" => {
                    let r = http_client()
                        .post(bridge.url(TOKEN))
                        .header("content-type", "application/json")
                        .body(event_body("WHEF_SESSION_CREATED", "sup", "r-sup", 0))
                        .send()
                        .await;
                    if let Ok(r) = r {
                        assert_ne!(
                            r.status(),
                            200,
                            "an event was answered \"0\" with no spool writer"
                        );
                    }
                }
                _ => {}
            }
            let started = Instant::now();
            let mut saw_503 = false;
            while started.elapsed() < Duration::from_secs(10) {
                match readyz(&bridge).await {
                    Some((503, body)) if body.contains("stopped unexpectedly") => {
                        saw_503 = true;
                        break;
                    }
                    None => break,
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            let status = bridge
                .wait_exit(Duration::from_millis(GRACE_MS) + Duration::from_secs(10))
                .unwrap_or_else(|| {
                    panic!("{fault}: the bridge kept running; log:\n{}", bridge.log())
                });
            assert!(
                !status.success(),
                "{fault}: exit status {status:?} after a task died"
            );
            let log = bridge.log();
            assert!(
                log.contains("a background task stopped"),
                "{fault}: no failure logged:\n{log}"
            );
            // The forwarder case leaves an event in the spool, so the drain keeps the
            // process up long enough to see readiness report the failure.
            if fault == "forwarder.panic" {
                assert!(saw_503, "{fault}: readiness never reported the failure");
            }
            let broker = Broker::connect(&amqp_url()).await;
            broker.cleanup(&exchange).await;
        }
    })
    .await;
}

/// SPEC 6 "Supervision": a start that fails leaves nothing running. The spool (then
/// the claim-check store) is the last step of `Application::build` that can fail;
/// were any task started before it, its broker connection would outlive the error.
#[tokio::test]
async fn a_failed_start_leaves_no_task_running() {
    bounded(async {
        let proxy = TcpProxy::to_port(5672).await.expect("proxy");
        let dir = tempfile::tempdir().expect("tempdir");
        let not_a_dir = dir.path().join("spool-is-a-file");
        std::fs::write(&not_a_dir, b"x").expect("write");
        let mut settings = test_settings(cellosign_bridge::AckMode::Spooled, &not_a_dir);
        settings.amqp.urls = vec![proxy.amqp_url().into()];
        let error = match cellosign_bridge::Application::build(settings).await {
            Ok(_) => panic!("built with a spool path that is a file"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("spool"), "{error}");
        // A link task would have connected within this time (the broker is local).
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            proxy.active_connections(),
            0,
            "a task started by the failed build is connected to the broker"
        );
    })
    .await;
}

/// What one request of [`send_until_signal`] got.
struct Sent {
    /// When the request started, before any byte was written.
    at: Instant,
    /// The HTTP status, or the client's error.
    outcome: Result<u16, String>,
    message_id: String,
}

/// Eight keep-alive senders posting distinct events until `stop` is set.
fn send_until_signal(
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sent>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for s in 0..8u64 {
            let (url, stop) = (url.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let client = http_client();
                let mut sent = Vec::new();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let session = format!("sig{s}");
                    let body = event_body("WHEF_SESSION_CREATED", &session, "r-sig", n);
                    let at = Instant::now();
                    let outcome = match client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                    {
                        Ok(r) => Ok(r.status().as_u16()),
                        Err(e) => Err(e.to_string()),
                    };
                    let failed = outcome.is_err();
                    sent.push(Sent {
                        at,
                        outcome,
                        message_id: message_id("WHEF_SESSION_CREATED", &session, n),
                    });
                    if failed {
                        // The listener is closed; nothing more will get in.
                        break;
                    }
                }
                sent
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    })
}

/// SIGTERM and SIGINT under load with a healthy broker: every request sent before
/// the signal gets an HTTP answer, the process exits 0 within grace + 1 s, every
/// event answered "0" reaches the queue, and the spool is empty after the exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_answers_every_request_sent_before_it_and_leaves_the_spool_empty() {
    bounded(async {
        for signal in ["TERM", "INT"] {
            let exchange = unique("signal");
            let broker = Broker::connect(&amqp_url()).await;
            broker.declare_exchange(&exchange).await;
            let mut consumer = broker.subscribe(&exchange, "#").await;
            let spool = tempfile::tempdir().expect("temp dir");
            let grace = GRACE_MS.to_string();
            let env = [("BRIDGE_SHUTDOWN__GRACE_MS", grace.as_str())];
            let mut bridge =
                BridgeProcess::start(spool.path(), &amqp_url(), &exchange, TOKEN, &env);
            wait_connected(&bridge).await;
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let sending = send_until_signal(bridge.url(TOKEN), stop.clone());
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let signalled = Instant::now();
            bridge.signal(signal);
            let (took, code) = exit_after(&mut bridge, signalled);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let sent = sending.await.expect("senders");
            assert_eq!(
                code,
                Some(0),
                "SIG{signal} exit code; log:\n{}",
                bridge.log()
            );
            assert_bounded(took, &format!("SIG{signal}"));
            let before: Vec<&Sent> = sent.iter().filter(|s| s.at < signalled).collect();
            assert!(
                before.len() > 50,
                "only {} requests before SIG{signal}",
                before.len()
            );
            let unanswered: Vec<&String> = before
                .iter()
                .filter_map(|s| s.outcome.as_ref().err())
                .collect();
            assert!(
                unanswered.is_empty(),
                "SIG{signal}: {} of {} requests sent before the signal got no answer: {:?}",
                unanswered.len(),
                before.len(),
                unanswered.first()
            );
            let accepted: BTreeSet<&str> = sent
                .iter()
                .filter(|s| s.outcome == Ok(200))
                .map(|s| s.message_id.as_str())
                .collect();
            let events = cellosign_bridge::Spool::inspect(spool.path())
                .expect("spool readable after exit")
                .events;
            assert_eq!(
                events, 0,
                "SIG{signal}: events left in the spool with a healthy broker"
            );
            let got = take(&mut consumer, accepted.len(), Duration::from_secs(30)).await;
            let ids: BTreeSet<String> = got
                .iter()
                .filter_map(|d| d.properties.message_id().as_ref().map(|m| m.to_string()))
                .collect();
            for id in &accepted {
                assert!(
                    ids.contains(*id),
                    "SIG{signal}: {id} answered \"0\" but not delivered"
                );
            }
            broker.cleanup(&exchange).await;
        }
    })
    .await;
}

/// SPEC 4: an event is removed from the spool once the broker acked it, also when
/// the channel fails between that ack and the removal. Fault point
/// `forwarder.channel_lost_before_remove` ends the forwarder's pass on the channel
/// once, just before acked events are removed, as a connection lost at that
/// moment would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acked_event_leaves_the_spool_even_when_the_channel_fails_right_after() {
    bounded(async {
        let exchange = unique("acked");
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        let mut consumer = broker.subscribe(&exchange, "#").await;
        let spool = tempfile::tempdir().expect("temp dir");
        let env = [(
            cellosign_bridge::FAULTS_ENV,
            "forwarder.channel_lost_before_remove",
        )];
        let bridge = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, TOKEN, &env);
        wait_connected(&bridge).await;
        // Several events of one reference and one of another: while the first is
        // acked, the next of its lane (or the other lane) is ready to publish.
        let mut ids = post_events(&bridge, "acked", "r-acked", 6).await;
        ids.extend(post_events(&bridge, "acked-b", "r-other", 1).await);
        // The heads in flight when the pass ends are published again: duplicates may
        // come, so take until every id has come, not a count.
        let mut delivered = BTreeSet::new();
        while !ids.iter().all(|id| delivered.contains(id)) {
            let got = take(&mut consumer, 1, Duration::from_secs(20)).await;
            delivered.extend(got.iter().map(id_of));
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some((_, body)) = readyz(&bridge).await {
                if body.contains("\"events\":0,") {
                    last.clear();
                    break;
                }
                last = body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = bridge.log();
        assert!(
            log.contains("fault injected: forwarder.channel_lost_before_remove"),
            "the fault never fired; log:\n{log}"
        );
        assert!(
            last.is_empty(),
            "delivered events stay in the spool 15 s later: {last}"
        );
        drop(bridge);
        broker.cleanup(&exchange).await;
    })
    .await;
}
