//! When the broker refuses (nack from a full queue, return of an unroutable
//! message), order per reference holds, the bridge backs off instead of
//! spinning, and in `confirmed` mode each request learns its own publish's fate
//! (SPEC 6 "Order under refusal", "Backoff on refusal", "Returns in confirmed mode").
//! In `confirmed` mode a nack, a return or a withheld confirm is a 503 in time,
//! and the nack and return counters count each one.

mod common;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellosign_bridge::AckMode;
use common::*;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use support::bridge_process::BridgeProcess;
use support::rabbit_node::RabbitNode;
use support::tcp_proxy::{CutMode, TcpProxy};

/// A classic queue that holds at most `max` messages and nacks publishes beyond
/// that (`x-overflow = reject-publish`), bound to `exchange` with `#`.
async fn full_queue(broker: &Broker, exchange: &str, name: &str, max: i64) {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(max));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    broker
        .channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .expect("declare the bounded queue");
    broker
        .channel
        .queue_bind(
            name.into(),
            exchange.into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind the bounded queue");
}

/// The operators' topology with `declare = false`: a topic exchange with no
/// alternate exchange, and one queue bound to `ok.#`, so `bad.*` is unroutable.
async fn operators_exchange(broker: &Broker, exchange: &str, queue: &str) {
    broker
        .channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("exchange");
    broker
        .channel
        .queue_declare(queue.into(), Default::default(), FieldTable::default())
        .await
        .expect("queue");
    broker
        .channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "ok.#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_when_a_full_queue_nacks() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.reconnect_initial_ms = 20;
            s.amqp.reconnect_max_ms = 200;
        })
        .await;
        let exchange = app.settings.amqp.exchange.clone();
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        let queue = unique("full");
        full_queue(&broker, &exchange, &queue, 3).await;

        let mut expected = Vec::new();
        for n in 0..90 {
            let answer = app
                .post_json(&event_body("WHEF_SESSION_CREATED", "s-hot", "hot", n))
                .await;
            assert_eq!(answer.code, 200, "{}", answer.errordesc);
            expected.push(message_id("WHEF_SESSION_CREATED", "s-hot", n));
        }

        // A slow consumer: the queue stays full, so the broker keeps nacking.
        let consumer_channel = broker.connection.create_channel().await.expect("channel");
        consumer_channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                "".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut ids = Vec::new();
        let wanted: BTreeSet<&String> = expected.iter().collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
        while first_copies(&ids).len() < expected.len() {
            let delivery = tokio::time::timeout_at(deadline, consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("only {} of 90 events arrived", first_copies(&ids).len())
                })
                .expect("consumer open")
                .expect("delivery");
            tokio::time::sleep(Duration::from_millis(15)).await;
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            assert!(wanted.contains(&id), "unexpected message {id}");
            ids.push(id);
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
        }
        let firsts = first_copies(&ids);
        if let Some(at) = (0..expected.len()).find(|&i| firsts[i] != expected[i]) {
            panic!(
                "first copies out of order from position {at}: got {} where {} was due ({} deliveries in all)",
                firsts[at],
                expected[at],
                ids.len()
            );
        }
        drop(consumer);
        broker.delete_queue(&queue).await;
        app.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_keeps_refusing_costs_little_cpu_and_every_nack_is_counted() {
    bounded(async {
        let exchange = unique("refuse");
        let queue = unique("refuse.q");
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        full_queue(&broker, &exchange, &queue, 1).await;
        let spool = tempfile::tempdir().expect("temp dir");
        let token = "refusal-token";
        let bridge = BridgeProcess::start(
            spool.path(),
            &amqp_url(),
            &exchange,
            token,
            &[("BRIDGE_AMQP__RECONNECT_MAX_MS", "2000")],
        );
        let client = http_client();
        for n in 0..64u64 {
            let reference = format!("ref-{}", n % 16);
            let r = client
                .post(bridge.url(token))
                .header("content-type", "application/json")
                .body(event_body("WHEF_SESSION_CREATED", "s-refuse", &reference, n))
                .send()
                .await
                .expect("post");
            assert_eq!(r.status(), 200);
        }
        // Let the first refusals happen, then measure while the broker goes on refusing.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = bridge.cpu_time();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let used = bridge.cpu_time() - before;
        let metrics = client
            .get(format!("http://{}/metrics", bridge.admin))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        let nacks = metric_sum(&metrics, "cellosign_bridge_broker_nacks_total");
        assert!(nacks > 0.0, "no nack counted:\n{metrics}");
        assert!(
            used < Duration::from_millis(400),
            "the bridge used {used:?} of CPU in 4 s while the broker refused (more than 10% of a core)"
        );
        drop(bridge);
        broker.delete_queue(&queue).await;
        broker.cleanup(&exchange).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_mode_answers_each_request_by_its_own_publish() {
    bounded(async {
        let exchange = unique("returns");
        let queue = unique("returns.q");
        let broker = Broker::connect(&amqp_url()).await;
        operators_exchange(&broker, &exchange, &queue).await;
        let app = Arc::new(
            spawn_app(AckMode::Confirmed, |s| {
                s.amqp.declare = false;
                s.amqp.exchange = exchange.clone();
            })
            .await,
        );
        app.wait_ready(true, Duration::from_secs(20)).await;

        let mut senders = Vec::new();
        for sender in 0..16u64 {
            let app = app.clone();
            senders.push(tokio::spawn(async move {
                let mut answers = Vec::new();
                for n in 0..60u64 {
                    let routable = (sender + n) % 2 == 0;
                    let reference = if routable {
                        format!("ok.{sender}.{n}")
                    } else {
                        format!("bad.{sender}.{n}")
                    };
                    let number = sender * 1000 + n;
                    let answer = app
                        .post_json(&event_body(
                            "WHEF_SESSION_CREATED",
                            "s-ret",
                            &reference,
                            number,
                        ))
                        .await;
                    answers.push((routable, number, answer.code));
                }
                answers
            }));
        }
        let mut ok_ids = BTreeSet::new();
        let (mut lost, mut refused) = (Vec::new(), Vec::new());
        for sender in senders {
            for (routable, number, code) in sender.await.expect("sender") {
                match (routable, code) {
                    (true, 200) => {
                        ok_ids.insert(message_id("WHEF_SESSION_CREATED", "s-ret", number));
                    }
                    (true, code) => refused.push((number, code)),
                    (false, 503) => {}
                    (false, code) => lost.push((number, code)),
                }
            }
        }
        assert!(
            lost.is_empty(),
            "unroutable events not answered 503 (lost if \"0\"): {lost:?}"
        );
        assert!(
            refused.is_empty(),
            "routable events not answered \"0\": {refused:?}"
        );
        let mut consumer = broker.consume(&queue).await;
        let got: BTreeSet<String> =
            message_ids(&take(&mut consumer, ok_ids.len(), Duration::from_secs(30)).await)
                .into_iter()
                .collect();
        assert_eq!(got, ok_ids);
        drop(consumer);
        broker.delete_queue(&queue).await;
        if let Ok(app) = Arc::try_unwrap(app) {
            app.stop().await;
        }
        let _ = broker
            .channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_reference_does_not_hold_back_the_others() {
    bounded(async {
        let exchange = unique("lanes");
        let queue = unique("lanes.q");
        let broker = Broker::connect(&amqp_url()).await;
        operators_exchange(&broker, &exchange, &queue).await;
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.declare = false;
            s.amqp.exchange = exchange.clone();
            s.amqp.reconnect_initial_ms = 20;
            s.amqp.reconnect_max_ms = 200;
        })
        .await;
        let mut expected = Vec::new();
        for n in 0..20u64 {
            // Unroutable first: it stays in the spool and is retried...
            assert_eq!(
                app.post_json(&event_body("WHEF_SESSION_CREATED", "s-bad", "bad.1", n))
                    .await
                    .code,
                200
            );
            // ...while the routable reference flows, in order.
            assert_eq!(
                app.post_json(&event_body("WHEF_SESSION_CREATED", "s-ok", "ok.1", n))
                    .await
                    .code,
                200
            );
            expected.push(message_id("WHEF_SESSION_CREATED", "s-ok", n));
        }
        let mut consumer = broker.consume(&queue).await;
        let got = message_ids(&take(&mut consumer, expected.len(), Duration::from_secs(30)).await);
        assert_eq!(first_copies(&got), expected);
        let (_, metrics) = app.admin_get("/metrics").await;
        assert!(
            metric_sum(&metrics, "cellosign_bridge_broker_returns_total") > 0.0,
            "returns not counted"
        );
        drop(consumer);
        broker.delete_queue(&queue).await;
        app.stop().await;
        let _ = broker
            .channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    })
    .await;
}

const TYPE: &str = "WHEF_SESSION_CREATED";
const NACKS: &str = "cellosign_bridge_broker_nacks_total";
const RETURNS: &str = "cellosign_bridge_broker_returns_total";
const UNAVAILABLE: &str = r#"cellosign_bridge_events_rejected_total{reason="broker_unavailable"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_mode_answers_503_when_a_full_queue_nacks_and_counts_each_nack() {
    bounded(async {
        let app = spawn_app(AckMode::Confirmed, |_| {}).await;
        app.wait_ready(true, Duration::from_secs(20)).await;
        let exchange = app.settings.amqp.exchange.clone();
        let broker = Broker::connect(&amqp_url()).await;
        let queue = unique("full.confirmed");
        full_queue(&broker, &exchange, &queue, 1).await;
        assert_eq!(app.metric(NACKS).await, 0.0);

        let first = app.post_json(&event_body(TYPE, "s-full", "full", 1)).await;
        assert_eq!(first.code, 200, "the queue had room: {first:?}");
        for n in 2..5 {
            let refused = app.post_json(&event_body(TYPE, "s-full", "full", n)).await;
            assert_eq!(refused.code, 503, "a nacked publish answered {refused:?}");
        }
        assert_eq!(app.metric(NACKS).await, 3.0, "one nack per refused publish");
        assert_eq!(app.metric(UNAVAILABLE).await, 3.0);
        assert_eq!(app.metric(RETURNS).await, 0.0, "a nack is no return");

        let mut consumer = broker.consume(&queue).await;
        let got = take(&mut consumer, 1, Duration::from_secs(10)).await;
        assert_eq!(message_ids(&got), vec![message_id(TYPE, "s-full", 1)]);
        assert_quiet(&mut consumer, Duration::from_millis(500)).await;
        drop(consumer);
        broker.delete_queue(&queue).await;
        app.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_mode_answers_503_for_an_unbound_key_without_declare_and_counts_each_return() {
    bounded(async {
        let exchange = unique("unbound");
        let queue = unique("unbound.q");
        let broker = Broker::connect(&amqp_url()).await;
        operators_exchange(&broker, &exchange, &queue).await;
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.declare = false;
            s.amqp.exchange = exchange.clone();
        })
        .await;
        app.wait_ready(true, Duration::from_secs(20)).await;
        assert_eq!(app.metric(RETURNS).await, 0.0);
        for n in 0..3 {
            let refused = app.post_json(&event_body(TYPE, "s-unb", "bad.1", n)).await;
            assert_eq!(refused.code, 503, "a returned publish answered {refused:?}");
        }
        assert_eq!(app.metric(RETURNS).await, 3.0, "one return per publish");
        assert_eq!(app.metric(UNAVAILABLE).await, 3.0);
        assert_eq!(app.metric(NACKS).await, 0.0, "a return is no nack");
        let routed = app.post_json(&event_body(TYPE, "s-unb", "ok.1", 9)).await;
        assert_eq!(routed.code, 200, "{routed:?}");
        assert_eq!(app.metric(RETURNS).await, 3.0);

        let mut consumer = broker.consume(&queue).await;
        let got = take(&mut consumer, 1, Duration::from_secs(10)).await;
        assert_eq!(message_ids(&got), vec![message_id(TYPE, "s-unb", 9)]);
        drop(consumer);
        broker.delete_queue(&queue).await;
        app.stop().await;
        let _ = broker
            .channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await;
    })
    .await;
}

/// The publish timeout of the tests that time an answer.
const PUBLISH_TIMEOUT_MS: u64 = 1000;

/// An app on the broker at `url` with a publish timeout of [`PUBLISH_TIMEOUT_MS`]
/// and quick reconnects, ready and connected.
async fn short_timeout_app(mode: AckMode, url: String) -> TestApp {
    let app = spawn_app(mode, |s| {
        s.amqp.urls = vec![url.into()];
        s.amqp.publish_timeout_ms = PUBLISH_TIMEOUT_MS;
        s.amqp.reconnect_initial_ms = 50;
        s.amqp.reconnect_max_ms = 500;
    })
    .await;
    app.wait_ready(true, Duration::from_secs(30)).await;
    app
}

/// Posts event `n` of session `s-{tag}` and asserts it is answered `code` within
/// `amqp.publish_timeout_ms` + 1 s.
async fn answered_in_time(app: &TestApp, tag: &str, n: u64, code: u16) {
    let bound = Duration::from_millis(PUBLISH_TIMEOUT_MS) + Duration::from_secs(1);
    let started = Instant::now();
    let answer = app
        .post_json(&event_body(TYPE, &format!("s-{tag}"), tag, n))
        .await;
    let took = started.elapsed();
    assert!(
        took <= bound,
        "{tag}: answered {} after {took:?}, more than publish_timeout_ms + 1 s",
        answer.code
    );
    assert_eq!(answer.code, code, "{tag}: {answer:?}");
}

/// With the path to the broker black-holed, a request is answered within
/// `amqp.publish_timeout_ms` + 1 s: 503 in `confirmed` mode, "0" in `spooled`
/// mode (the spool holds it); once the path is back, the bridge publishes again.
async fn black_holed(mode: AckMode) {
    let proxy = TcpProxy::to_port(5672).await.expect("proxy");
    let app = short_timeout_app(mode, proxy.amqp_url()).await;
    let exchange = app.settings.amqp.exchange.clone();
    let broker = Broker::connect(&amqp_url()).await;
    let mut consumer = broker.subscribe(&exchange, "#").await;

    proxy.cut(CutMode::Blackhole).await;
    let expected = match mode {
        AckMode::Confirmed => 503,
        AckMode::Spooled => 200,
    };
    answered_in_time(&app, "hole", 1, expected).await;

    proxy.restore();
    app.wait_ready(true, Duration::from_secs(30)).await;
    // The path is back: the bridge publishes again. Until the link has noticed that
    // the black-holed connection is dead and replaced it (its heartbeat), a request
    // may still meet that connection and get 503 (retry later); the sender's retry
    // is answered "0". Anything but 200 or 503 fails.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let again = app.post_json(&event_body(TYPE, "s-hole", "hole", 2)).await;
        if again.code == 200 {
            break;
        }
        assert_eq!(
            again.code, 503,
            "{mode:?} after the path is back: {again:?}"
        );
        assert!(
            Instant::now() < deadline,
            "{mode:?}: still refused 30 s after the path is back: {again:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut wanted = vec![message_id(TYPE, "s-hole", 2)];
    if mode == AckMode::Spooled {
        wanted.insert(0, message_id(TYPE, "s-hole", 1));
    }
    let got = take(&mut consumer, wanted.len(), Duration::from_secs(30)).await;
    assert_eq!(message_ids(&got), wanted, "{mode:?}");
    // A refused attempt may have reached the broker before its connection died
    // (at least once): only copies of the wanted events may follow, nothing else.
    let more = take_for(&mut consumer, Duration::from_millis(500)).await;
    assert!(
        message_ids(&more).iter().all(|id| wanted.contains(id)),
        "{mode:?}: unexpected messages {:?}",
        message_ids(&more)
    );
    drop(consumer);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_path_is_answered_503_within_the_publish_timeout_in_confirmed_mode() {
    bounded(black_holed(AckMode::Confirmed)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_path_is_answered_at_once_from_the_spool_in_spooled_mode() {
    bounded(black_holed(AckMode::Spooled)).await;
}

/// A broker that withholds the confirm of a publish on a live connection (a
/// memory alarm blocks it): `confirmed` mode answers 503 within
/// `amqp.publish_timeout_ms` + 1 s, and "0" again once the alarm clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_mode_answers_503_within_the_publish_timeout_while_an_alarm_withholds_the_confirm()
 {
    bounded(async {
        let node = RabbitNode::start().await.expect("private RabbitMQ node");
        let app = short_timeout_app(AckMode::Confirmed, node.amqp_url()).await;
        let broker = Broker::connect(&node.amqp_url()).await;
        let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;
        answered_in_time(&app, "alarm", 1, 200).await;

        node.set_memory_alarm(true).await.expect("memory alarm on");
        answered_in_time(&app, "alarm", 2, 503).await;

        node.set_memory_alarm(false)
            .await
            .expect("memory alarm off");
        app.wait_ready(true, Duration::from_secs(30)).await;
        let after = app
            .post_json(&event_body(TYPE, "s-alarm", "alarm", 3))
            .await;
        assert_eq!(after.code, 200, "{after:?}");
        // The blocked publish may land once the alarm clears (its caller was told to
        // retry: a duplicate, never a loss); 1 and 3 must be there.
        let mut got = BTreeSet::new();
        let wanted = BTreeSet::from([
            message_id(TYPE, "s-alarm", 1),
            message_id(TYPE, "s-alarm", 3),
        ]);
        while !wanted.is_subset(&got) {
            got.extend(message_ids(
                &take(&mut consumer, 1, Duration::from_secs(30)).await,
            ));
        }
        drop(consumer);
        app.stop().await;
    })
    .await;
}
