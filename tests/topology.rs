//! The default topology on a real RabbitMQ (issue 12 point 7): the shipped
//! quorum queue bound to everything, the unrouted queue being quorum, readiness
//! with `declare = false` and the exchange missing, a dead first URL of
//! `amqp.urls` giving way to the next, and the frame size the link asks for.

mod common;
mod support;

use std::time::Duration;

use std::sync::Arc;

use cellosign_bridge::{AckMode, Link, Metrics, QueueKind, Settings, Sources};
use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use support::tcp_proxy::{CutMode, TcpProxy};

const WAIT: Duration = Duration::from_secs(20);
const TYPE: &str = "WHEF_SESSION_CREATED";

/// The settings of the shipped `config/` directory alone (no environment).
fn shipped() -> Settings {
    Settings::load(&Sources {
        config_dir: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/config").into()),
        env: Some(Default::default()),
        ..Sources::default()
    })
    .expect("the shipped config loads")
}

/// Declares `queue` durable with `x-queue-type = kind` on a channel of its own;
/// true if the broker accepted it (an existing queue of another type is refused
/// with PRECONDITION_FAILED).
async fn redeclare_as(broker: &Broker, queue: &str, kind: &str) -> bool {
    let Ok(channel) = broker.connection.create_channel().await else {
        return false;
    };
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let ok = channel
        .queue_declare(queue.into(), options, args)
        .await
        .is_ok();
    let _ = channel.close(200, "done".into()).await;
    ok
}

/// Asserts that `queue` exists and is a quorum queue: a passive declare finds it
/// (so the checks below create nothing), a quorum declare matches it and a
/// classic one does not.
async fn assert_quorum(broker: &Broker, queue: &str) {
    let channel = broker.connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .unwrap_or_else(|e| panic!("{queue} was not declared: {e}"));
    let _ = channel.close(200, "done".into()).await;
    assert!(
        redeclare_as(broker, queue, "quorum").await,
        "{queue} is not a quorum queue"
    );
    assert!(
        !redeclare_as(broker, queue, "classic").await,
        "{queue} is also taken for a classic queue: the type is not checked"
    );
}

#[test]
fn the_shipped_config_declares_the_quorum_queue_cellosign_sessions_bound_to_everything() {
    let queues = shipped().amqp.queues;
    assert_eq!(queues.len(), 1, "{queues:?}");
    assert_eq!(queues[0].name, "cellosign.sessions");
    assert_eq!(queues[0].kind, QueueKind::Quorum);
    assert_eq!(queues[0].bindings, vec!["#".to_string()]);
    assert!(shipped().amqp.declare, "the shipped config declares");
}

#[tokio::test]
async fn the_shipped_queue_is_declared_quorum_bound_to_everything_and_gets_the_event() {
    bounded(async {
        // The shipped queue as it is, under a name of its own: the shared broker's
        // `cellosign.sessions` may be someone else's.
        let mut queues = shipped().amqp.queues;
        let queue = unique("sessions");
        queues[0].name = queue.clone();
        let app = spawn_app(AckMode::Confirmed, |s| s.amqp.queues = queues).await;
        app.wait_ready(true, WAIT).await;
        let broker = Broker::connect(&amqp_url()).await;
        assert_quorum(&broker, &queue).await;
        for (n, reference) in ["r1", "any.thing.at.all"].iter().enumerate() {
            let answer = app
                .post_json(&event_body(TYPE, "s-def", reference, n as u64))
                .await;
            assert_eq!(answer.code, 200, "{answer:?}");
        }
        let mut consumer = broker.consume(&queue).await;
        let got: Vec<String> = take(&mut consumer, 2, WAIT)
            .await
            .iter()
            .map(|d| d.routing_key.to_string())
            .collect();
        assert_eq!(got, vec!["r1", "any.thing.at.all"], "`#` routes every key");
        drop(consumer);
        broker.delete_queue(&queue).await;
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn the_unrouted_queue_is_quorum() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |_| {}).await;
        app.wait_ready(true, WAIT).await;
        let broker = Broker::connect(&amqp_url()).await;
        assert_quorum(&broker, &format!("{}.unrouted", app.settings.amqp.exchange)).await;
        app.stop().await;
    })
    .await;
}

/// With `declare = false` and no exchange, the bridge is not ready in either mode
/// (nothing it accepted could leave); once operators declare the exchange, it is.
async fn missing_exchange(mode: AckMode) {
    let exchange = unique("missing");
    let app = spawn_app(mode, |s| {
        s.amqp.declare = false;
        s.amqp.exchange = exchange.clone();
        s.amqp.reconnect_initial_ms = 50;
        s.amqp.reconnect_max_ms = 300;
    })
    .await;
    // Not ready once a connection found no exchange (before the first attempt the
    // bridge cannot know)...
    let first = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = app.admin_get("/readyz").await;
        if body.contains("\"misconfigured\":true") {
            assert_eq!(code, 503, "{mode:?}: ready though misconfigured: {body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < first,
            "{mode:?}: the missing exchange not seen within {WAIT:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and for as long as it stays missing, over several connection attempts.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let (code, body) = app.admin_get("/readyz").await;
        assert_eq!(code, 503, "{mode:?}: ready without the exchange: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let broker = Broker::connect(&amqp_url()).await;
    broker.declare_exchange(&exchange).await;
    app.wait_ready(true, WAIT).await;
    app.stop().await;
}

#[tokio::test]
async fn declare_false_with_the_exchange_missing_is_not_ready_in_spooled_mode() {
    bounded(missing_exchange(AckMode::Spooled)).await;
}

#[tokio::test]
async fn declare_false_with_the_exchange_missing_is_not_ready_in_confirmed_mode() {
    bounded(missing_exchange(AckMode::Confirmed)).await;
}

#[tokio::test]
async fn a_dead_first_url_gives_way_to_the_second() {
    bounded(async {
        // A port that resets every connection: dead, yet not free for anyone to reuse.
        let dead = TcpProxy::to_port(5672).await.expect("proxy");
        dead.cut(CutMode::Refuse).await;
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.urls = vec![dead.amqp_url().into(), amqp_url().into()];
        })
        .await;
        app.wait_ready(true, WAIT).await;
        let broker = Broker::connect(&amqp_url()).await;
        let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;
        let answer = app.post_json(&event_body(TYPE, "s-fo", "fo", 1)).await;
        assert_eq!(answer.code, 200, "{answer:?}");
        let got = take(&mut consumer, 1, WAIT).await;
        assert_eq!(message_ids(&got), vec![message_id(TYPE, "s-fo", 1)]);
        assert_eq!(
            dead.active_connections(),
            0,
            "nothing goes through the dead URL"
        );
        app.stop().await;
    })
    .await;
}

/// The frame size the link negotiates with the broker for `url`.
async fn negotiated_frame_max(url: String) -> u32 {
    let spool = tempfile::tempdir().expect("tempdir");
    let mut s = test_settings(AckMode::Spooled, spool.path());
    s.amqp.urls = vec![url.into()];
    let stop = tokio_util::sync::CancellationToken::new();
    let (link, task) = Link::start(s.amqp, Arc::new(Metrics::new()), stop.clone());
    let connection = tokio::time::timeout(WAIT, link.connected())
        .await
        .expect("the link connects");
    let frame_max = connection.configuration().frame_max();
    stop.cancel();
    let _ = task.await;
    frame_max
}

/// lapin keeps 32 frames of the negotiated size resident for each direction, so the
/// broker's 128 KiB default cost 8 MiB: the link asks for 32 KiB, unless the URL
/// names its own size, which it keeps.
#[tokio::test]
async fn the_link_asks_for_32_kib_frames_unless_the_url_names_a_size() {
    bounded(async {
        let url = amqp_url();
        let sep = if url.contains('?') { '&' } else { '?' };
        assert_eq!(negotiated_frame_max(url.clone()).await, 32 * 1024);
        assert_eq!(
            negotiated_frame_max(format!("{url}{sep}frame_max=65536")).await,
            65536
        );
    })
    .await;
}
