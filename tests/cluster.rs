//! Brokers as a cluster and as partitions (SPEC 3): failing over across `amqp.urls`
//! without losing an event answered "0", keeping each reference in one partition queue
//! in order, and failing readiness by name when the partition plugin is missing.
//!
//! Every broker here is a private node (tests/support) killed and removed by its Drop
//! guard; the shared RabbitMQ on 127.0.0.1:5672 is never touched. Booting Erlang VMs is
//! CPU bound, so the three-node cluster test runs alone (the `HEAVY` lock) while the
//! single-node tests may share the machine with each other.

mod common;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use cellosign_bridge::{AckMode, QueueKind, QueueSettings};
use cellosign_bridge::{partition_queue, unrouted_name};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::time::Instant;

use common::{Broker, TestApp, bounded_within, event_body, message_id, spawn_app, unique};
use support::rabbit_node::{RabbitCluster, RabbitNode};

/// Taken for writing by the cluster test, for reading by the single-node tests.
static HEAVY: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Generous: five VMs may boot on two cores while cargo builds next to them.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(180);

/// The plugin `amqp.partitions` needs, spelled out as an operator reads it.
const PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

const EVENT_TYPE: &str = "WHEF_SESSION_CREATED";

/// `/readyz`: HTTP code, parsed body, raw body.
async fn readyz(app: &TestApp) -> (u16, serde_json::Value, String) {
    let (code, body) = app.admin_get("/readyz").await;
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/readyz answers JSON ({e}): {body}"));
    (code, v, body)
}

/// The port of a broker URL such as `amqp://guest:<redacted>@127.0.0.1:5673/%2f`.
fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port.rsplit_once(':')?.1.parse().ok()
}

/// Polls `/readyz` until the broker link is up on a port `accept` agrees to; returns it.
async fn wait_connected(app: &TestApp, within: Duration, accept: impl Fn(u16) -> bool) -> u16 {
    let deadline = Instant::now() + within;
    loop {
        let (_, v, body) = readyz(app).await;
        if v["broker"]["connected"] == true {
            let url = v["broker"]["url"]
                .as_str()
                .unwrap_or_else(|| panic!("a connected link shows its url: {body}"));
            assert!(
                url.contains("<redacted>") && !url.contains(":guest@"),
                "the password is redacted: {body}"
            );
            let port = url_port(url).unwrap_or_else(|| panic!("a port in {url:?}"));
            if accept(port) {
                return port;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the link was not connected as expected within {within:?}; last /readyz: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a consumer read from one delivery.
#[derive(Debug)]
struct Seen {
    message_id: String,
    reference: String,
    transaction_number: u64,
}

fn seen(d: &Delivery) -> Seen {
    let v: serde_json::Value =
        serde_json::from_slice(&d.data).expect("the body is the JSON posted");
    Seen {
        message_id: d
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .expect("every event carries a message_id"),
        reference: v["session"]["reference"]
            .as_str()
            .expect("session.reference")
            .to_string(),
        transaction_number: v["session"]["transaction_number"]
            .as_u64()
            .expect("session.transaction_number"),
    }
}

/// An event the bridge answered "0" for.
#[derive(Debug)]
struct Accepted {
    message_id: String,
}

/// Posts distinct events of one session, one after the other, until `stop`; event `k`
/// (from 0) has transaction number `k * stride + lane + 1`, so that several senders with
/// distinct lanes never share a message id. Returns the accepted events and a line per
/// refusal or transport error.
async fn send_until_stopped(
    client: reqwest::Client,
    url: String,
    (session_id, reference): (String, String),
    (lane, stride): (u64, u64),
    stop: Arc<AtomicBool>,
    accepted_count: Arc<AtomicUsize>,
) -> (Vec<Accepted>, Vec<String>) {
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = k * stride + lane + 1;
        k += 1;
        let body = event_body(EVENT_TYPE, &session_id, &reference, n);
        let sent = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) => {
                let a = common::answer(response).await;
                if a.code == 200 {
                    accepted.push(Accepted {
                        message_id: message_id(EVENT_TYPE, &session_id, n),
                    });
                    accepted_count.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.push(format!("#{n}: HTTP {} {}", a.code, a.errordesc));
                }
            }
            Err(e) => refused.push(format!("#{n}: {e}")),
        }
    }
    (accepted, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_loses_nothing() {
    bounded_within(Duration::from_secs(420), async {
    let _alone = HEAVY.write().await;
    let mut cluster =
        RabbitCluster::start_with(3, RabbitNode::builder().start_timeout(NODE_START_TIMEOUT))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    let ports: Vec<u16> = cluster.nodes().iter().map(RabbitNode::port).collect();
    // Declared by the bridge once connected, after the cluster formed: a member on every node.
    let queue = unique("failover");
    let app = spawn_app(AckMode::Spooled, |s| {
        s.amqp.urls = cluster.urls().into_iter().map(Into::into).collect();
        s.amqp.queues = vec![QueueSettings {
            name: queue.clone(),
            kind: QueueKind::Quorum,
            bindings: vec!["#".into()],
            max_age: None,
            max_bytes: None,
        }];
        s.amqp.reconnect_initial_ms = 100;
        s.amqp.reconnect_max_ms = 1000;
        s.amqp.publish_timeout_ms = 3000;
    })
    .await;
    let first = wait_connected(&app, Duration::from_secs(60), |p| ports.contains(&p)).await;
    let victim = ports.iter().position(|&p| p == first).unwrap();

    let tag = unique("fo");
    let sessions: Vec<(String, String)> = (0..4)
        .map(|r| (format!("s{r}-{tag}"), format!("ref{r}-{tag}")))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    // One sequential sender per reference, all at once: the forwarder has publishes in
    // flight when the node dies, and each reference has a well-defined acceptance order.
    let senders: Vec<_> = sessions
        .iter()
        .enumerate()
        .map(|(lane, session)| {
            tokio::spawn(send_until_stopped(
                app.client.clone(),
                app.url(),
                session.clone(),
                (lane as u64, sessions.len() as u64),
                stop.clone(),
                count.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::Relaxed) < 200 {
        assert!(
            Instant::now() < deadline && !senders.iter().any(|s| s.is_finished()),
            "200 events accepted within 30 s before the kill; got {}",
            count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster
        .node_mut(victim)
        .kill()
        .unwrap_or_else(|e| panic!("{e}"));
    let at_kill = count.load(Ordering::Relaxed);
    // Spooled mode accepts with the connected node gone, before and during the failover.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for sender in senders {
        let (a, r) = sender.await.expect("sender task");
        accepted.extend(a);
        refused.extend(r);
    }
    assert!(
        refused.is_empty(),
        "spooled mode answers 200 while the broker fails over; refused: {refused:?}"
    );
    assert!(
        accepted.len() >= at_kill + 20,
        "events were accepted after the kill too: {at_kill} before it, {} in all",
        accepted.len()
    );

    let now = wait_connected(&app, Duration::from_secs(90), |p| p != first).await;
    let survivor = ports
        .iter()
        .position(|&p| p == now)
        .unwrap_or_else(|| panic!("reconnected to port {now}, not a cluster node {ports:?}"));
    let node = cluster.node(survivor);
    node.wait_for_quorum_leader(&queue, Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let broker = Broker::connect(&node.amqp_url()).await;
    let mut consumer = broker.consume(&queue).await;
    let all: HashSet<&str> = accepted.iter().map(|a| a.message_id.as_str()).collect();
    let mut missing = all.clone();
    let mut first_seen: HashSet<String> = HashSet::new();
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    let mut deliveries = 0usize;
    let within = Duration::from_secs(90);
    let deadline = Instant::now() + within;
    while !missing.is_empty() {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                d.ack(BasicAckOptions::default()).await.expect("ack");
                deliveries += 1;
                let s = seen(&d);
                assert!(
                    all.contains(s.message_id.as_str()),
                    "only accepted events reach the queue; got {s:?}"
                );
                missing.remove(s.message_id.as_str());
                if first_seen.insert(s.message_id) {
                    order
                        .entry(s.reference)
                        .or_default()
                        .push(s.transaction_number);
                }
            }
            Ok(Some(Err(e))) => panic!("consumer error: {e}"),
            Ok(None) => panic!("consumer ended with {} events missing", missing.len()),
            Err(_) => {
                let (_, _, body) = readyz(&app).await;
                let mut sample: Vec<&&str> = missing.iter().collect();
                sample.sort();
                sample.truncate(5);
                panic!(
                    "{} of {} accepted events never arrived within {within:?} (e.g. {sample:?}); /readyz: {body}",
                    missing.len(),
                    all.len()
                );
            }
        }
    }
    // A duplicate may re-deliver an older event later; only first occurrences are ordered.
    for (reference, numbers) in &order {
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "events of {reference} arrived out of order: {numbers:?}"
        );
    }
    assert_eq!(order.len(), sessions.len(), "every reference arrived");
    eprintln!(
        "failover: {} accepted ({at_kill} before the kill), {deliveries} delivered, {} duplicates; port {first} -> {now}",
        all.len(),
        deliveries - all.len()
    );

    // Everything confirmed leaves the spool.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v, body) = readyz(&app).await;
        if v["spool"]["events"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the spool drains once the broker confirmed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(consumer);
    let _ = broker.connection.close(200, "done".into()).await;
    app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn partitions_keep_each_reference_in_one_queue_in_order() {
    bounded_within(Duration::from_secs(420), async {
        let _shared = HEAVY.read().await;
        let node = RabbitNode::builder()
            .plugins(&[PLUGIN])
            .start_timeout(NODE_START_TIMEOUT)
            .start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        const PARTITIONS: u16 = 4;
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.urls = vec![node.amqp_url().into()];
            s.amqp.partitions = PARTITIONS;
            s.amqp.queues = Vec::new();
        })
        .await;
        app.wait_ready(false, Duration::from_secs(60)).await;
        let exchange = app.settings.amqp.exchange.clone();

        let tag = unique("part");
        let sessions: Vec<(String, String)> = (0..20)
            .map(|r| (format!("s{r}-{tag}"), format!("ref{r}-{tag}")))
            .collect();
        let mut n = 0u64;
        for _round in 0..5 {
            for (session_id, reference) in &sessions {
                n += 1;
                let a = app
                    .post_json(&event_body(EVENT_TYPE, session_id, reference, n))
                    .await;
                assert_eq!(a.code, 200, "#{n}: {}", a.errordesc);
            }
        }
        let total = n as usize;

        let broker = Broker::connect(&node.amqp_url()).await;
        let mut consumers = Vec::new();
        for i in 0..PARTITIONS {
            let consumer = broker.consume(&partition_queue(&exchange, i)).await;
            consumers.push(consumer.map(move |d| (i, d)));
        }
        let mut all = futures_util::stream::select_all(consumers);
        let mut got: Vec<(u16, Seen)> = Vec::new();
        let within = Duration::from_secs(30);
        let deadline = Instant::now() + within;
        while got.len() < total {
            match tokio::time::timeout_at(deadline, all.next()).await {
                Ok(Some((i, Ok(d)))) => {
                    d.ack(BasicAckOptions::default()).await.expect("ack");
                    got.push((i, seen(&d)));
                }
                Ok(Some((i, Err(e)))) => panic!("consumer of p{i}: {e}"),
                Ok(None) => panic!("consumers ended after {} of {total}", got.len()),
                Err(_) => panic!(
                    "only {} of {total} events reached the partition queues within {within:?}",
                    got.len()
                ),
            }
        }
        if let Ok(Some((i, d))) = tokio::time::timeout(Duration::from_secs(1), all.next()).await {
            panic!(
                "more than {total} events in the partitions: p{i} {:?}",
                d.map(|d| seen(&d))
            );
        }
        let ids: HashSet<&str> = got.iter().map(|(_, s)| s.message_id.as_str()).collect();
        assert_eq!(ids.len(), total, "each event exactly once");

        let mut by_reference: BTreeMap<&str, (HashSet<u16>, Vec<u64>)> = BTreeMap::new();
        for (i, s) in &got {
            let (partitions, numbers) = by_reference.entry(s.reference.as_str()).or_default();
            partitions.insert(*i);
            numbers.push(s.transaction_number);
        }
        assert_eq!(
            by_reference.len(),
            sessions.len(),
            "every reference arrived"
        );
        let mut used = HashSet::new();
        for (reference, (partitions, numbers)) in &by_reference {
            assert_eq!(
                partitions.len(),
                1,
                "{reference} is spread over partitions {partitions:?}"
            );
            used.extend(partitions.iter().copied());
            assert_eq!(numbers.len(), 5, "{reference}: {numbers:?}");
            assert!(
                numbers.windows(2).all(|w| w[0] < w[1]),
                "events of {reference} out of order in its partition: {numbers:?}"
            );
        }
        assert!(
            used.len() > 1,
            "20 references hash onto more than one of {PARTITIONS} partitions; used {used:?}"
        );
        // Everything was routed by the partitions; nothing fell through to the alternate exchange.
        let unrouted = broker
            .channel
            .queue_declare(
                unrouted_name(&exchange).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the unrouted queue exists");
        assert_eq!(unrouted.message_count(), 0, "nothing unrouted");

        drop(all);
        let _ = broker.connection.close(200, "done".into()).await;
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn partitions_without_the_plugin_fail_readiness_naming_it() {
    bounded_within(Duration::from_secs(420), async {
        let _shared = HEAVY.read().await;
        let node = RabbitNode::builder()
            .start_timeout(NODE_START_TIMEOUT)
            .start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.urls = vec![node.amqp_url().into()];
            s.amqp.partitions = 2;
            s.amqp.reconnect_initial_ms = 100;
            s.amqp.reconnect_max_ms = 1000;
        })
        .await;

        let within = Duration::from_secs(60);
        let deadline = Instant::now() + within;
        loop {
            let (code, v, body) = readyz(&app).await;
            if v["broker"]["misconfigured"] == true {
                assert_eq!(code, 503, "a misconfigured broker fails readiness: {body}");
                assert_eq!(v["ready"], false, "{body}");
                assert_eq!(v["broker"]["connected"], false, "{body}");
                assert!(body.contains(PLUGIN), "readiness names the plugin: {body}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz did not report the missing plugin within {within:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The process keeps serving; events wait in the spool for an operator to fix the broker.
        let (code, body) = app.admin_get("/healthz").await;
        assert_eq!(code, 200, "{body}");
        let tag = unique("noplugin");
        for n in 1..=3 {
            let a = app
                .post_json(&event_body(
                    EVENT_TYPE,
                    &format!("s-{tag}"),
                    &format!("ref-{tag}"),
                    n,
                ))
                .await;
            assert_eq!(a.code, 200, "spooled mode still accepts: {}", a.errordesc);
        }
        // Retries keep failing the same way; nothing leaves the spool.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (code, v, body) = readyz(&app).await;
        assert_eq!(code, 503, "{body}");
        assert_eq!(v["broker"]["misconfigured"], true, "{body}");
        assert!(body.contains(PLUGIN), "{body}");
        assert_eq!(
            v["spool"]["events"], 3,
            "the events wait in the spool: {body}"
        );

        app.stop().await;
    })
    .await;
}
