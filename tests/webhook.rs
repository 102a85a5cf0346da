//! The HTTP and AMQP contract end to end: real app, real HTTP, real RabbitMQ.

mod common;
mod support;

use std::time::Duration;

use cellosign_bridge::AckMode;
use common::*;
use support::bridge_process::BridgeProcess;

const WAIT: Duration = Duration::from_secs(20);

/// Every shared vector gets its answer, and every accepted one reaches the
/// broker byte for byte with the contract's properties.
async fn vectors_through(mode: AckMode) {
    let app = spawn_app(mode, |s| s.events.dedup_window_s = 0).await;
    assert_vectors_end_to_end(&app, &app.url(), vectors()).await;
    app.stop().await;
}

#[tokio::test]
async fn vectors_spooled() {
    bounded(async {
        vectors_through(AckMode::Spooled).await;
    })
    .await;
}

#[tokio::test]
async fn vectors_confirmed() {
    bounded(async {
        vectors_through(AckMode::Confirmed).await;
    })
    .await;
}

#[tokio::test]
async fn the_same_event_again_is_answered_but_published_once() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |_| {}).await;
        let exchange = app.settings.amqp.exchange.clone();
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        let mut consumer = broker.subscribe(&exchange, "#").await;
        let body = event_body("WHEF_SESSION_CREATED", "s-dup", "ref-dup", 1);
        for _ in 0..3 {
            assert_eq!(app.post_json(&body).await.code, 200);
        }
        // Same message id, different bytes (pretty printed): still the same event.
        let pretty = serde_json::to_string_pretty(
            &serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        )
        .unwrap();
        assert_eq!(app.post_json(&pretty).await.code, 200);
        let other = event_body("WHEF_SESSION_CREATED", "s-dup", "ref-dup", 2);
        assert_eq!(app.post_json(&other).await.code, 200);
        let got = take(&mut consumer, 2, WAIT).await;
        assert_eq!(got[0].data, body.as_bytes());
        assert_eq!(got[1].data, other.as_bytes());
        assert_quiet(&mut consumer, Duration::from_millis(500)).await;
        let (_, metrics) = app.admin_get("/metrics").await;
        assert!(
            metrics.contains("cellosign_bridge_dedup_hits_total 3"),
            "{metrics}"
        );
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_queue_bound_to_one_reference_gets_only_its_events_in_order() {
    bounded(async {
        for mode in [AckMode::Spooled, AckMode::Confirmed] {
            let app = spawn_app(mode, |_| {}).await;
            let exchange = app.settings.amqp.exchange.clone();
            let broker = Broker::connect(&amqp_url()).await;
            broker.declare_exchange(&exchange).await;
            let mut only_b = broker.subscribe(&exchange, "ref-B").await;
            let mut all = broker.subscribe(&exchange, "#").await;
            let refs = ["ref-A", "ref-B", "ref-C"];
            for n in 0..60u64 {
                let r = refs[(n % 3) as usize];
                let a = app
                    .post_json(&event_body(
                        "WHEF_CLIENT_FORM_SUBMITTED",
                        &format!("s{n}"),
                        r,
                        n,
                    ))
                    .await;
                assert_eq!(a.code, 200, "{a:?}");
            }
            let got = take(&mut only_b, 20, WAIT).await;
            let numbers: Vec<u64> = got
                .iter()
                .map(|d| {
                    assert_eq!(d.routing_key.as_str(), "ref-B");
                    let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
                    v["session"]["transaction_number"].as_u64().unwrap()
                })
                .collect();
            assert_eq!(
                numbers,
                (0..60).filter(|n| n % 3 == 1).collect::<Vec<_>>(),
                "{mode:?}: in order"
            );
            assert_quiet(&mut only_b, Duration::from_millis(300)).await;
            assert_eq!(take(&mut all, 60, WAIT).await.len(), 60);
            app.stop().await;
        }
    })
    .await;
}

/// SPEC 3 order per reference in `confirmed` mode under concurrent requests: many
/// references at once, each posted by its own sender one event after the other
/// (each waiting for its answer); per reference the consumer's first copies come in
/// send order, and every event answered "0" arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_mode_keeps_send_order_per_reference_under_concurrent_senders() {
    bounded(async {
        const REFERENCES: u64 = 16;
        const EACH: u64 = 40;
        const TYPE: &str = "WHEF_CLIENT_FORM_SUBMITTED";
        let app = spawn_app(AckMode::Confirmed, |_| {}).await;
        let (_broker, mut consumer) = app.subscribe("#").await;
        let senders: Vec<_> = (0..REFERENCES)
            .map(|r| {
                let (client, url) = (app.client.clone(), app.url());
                tokio::spawn(async move {
                    let reference = format!("conc-{r}");
                    let session = format!("s-conc-{r}");
                    let mut sent = Vec::new();
                    for k in 0..EACH {
                        let response = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .body(event_body(TYPE, &session, &reference, k))
                            .send()
                            .await
                            .expect("request sent");
                        let a = answer(response).await;
                        assert_eq!(a.code, 200, "{reference} #{k}: {a:?}");
                        sent.push((reference.clone(), message_id(TYPE, &session, k)));
                    }
                    sent
                })
            })
            .collect();
        let mut accepted = Vec::new();
        for sender in senders {
            accepted.extend(sender.await.expect("sender task"));
        }
        let got = take(&mut consumer, accepted.len(), Duration::from_secs(60)).await;
        let delivered: Vec<(String, String)> = got
            .iter()
            .map(|d| (d.routing_key.to_string(), id_of(d)))
            .collect();
        assert_first_copies_in_order_per_key(&accepted, &delivered);
        assert_quiet(&mut consumer, Duration::from_millis(300)).await;
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn routing_key_template_uses_other_fields() {
    bounded(async {
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.routing_key = "{event.type}.{session.recipient.name}".parse().unwrap()
        })
        .await;
        let exchange = app.settings.amqp.exchange.clone();
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        let mut consumer = broker.subscribe(&exchange, "WHEF_SESSION_EXPIRED.*").await;
        assert_eq!(
            app.post_json(&event_body("WHEF_SESSION_EXPIRED", "s1", "r1", 1))
                .await
                .code,
            200
        );
        let d = take(&mut consumer, 1, WAIT).await;
        assert_eq!(d[0].routing_key.as_str(), "WHEF_SESSION_EXPIRED.client");
        // A placeholder whose field is null rejects the event, naming the field.
        let mut v: serde_json::Value =
            serde_json::from_str(&event_body("WHEF_SESSION_EXPIRED", "s2", "r2", 2)).unwrap();
        v["session"]["recipient"] = serde_json::Value::Null;
        let a = app.post_json(&v.to_string()).await;
        assert_eq!(a.code, 422);
        assert!(a.errordesc.contains("session.recipient.name"), "{a:?}");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn topology_is_declared_with_the_alternate_exchange() {
    bounded(async {
        let queue = unique("q");
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.queues = vec![cellosign_bridge::QueueSettings {
                name: queue.clone(),
                kind: cellosign_bridge::QueueKind::Quorum,
                bindings: vec!["only.this".into()],
                max_age: None,
                max_bytes: None,
            }]
        })
        .await;
        let exchange = app.settings.amqp.exchange.clone();
        // Routed by the binding to the declared queue.
        let mut v: serde_json::Value =
            serde_json::from_str(&event_body("WHEF_SESSION_CREATED", "s1", "only.this", 1))
                .unwrap();
        assert_eq!(app.post_json(&v.to_string()).await.code, 200);
        // No binding matches: the alternate exchange keeps it, and it still counts as delivered.
        v["session"]["reference"] = "nobody.listens".into();
        v["session"]["id"] = "s2".into();
        assert_eq!(app.post_json(&v.to_string()).await.code, 200);
        let broker = Broker::connect(&amqp_url()).await;
        let mut routed = broker.consume(&queue).await;
        let mut unrouted = broker.consume(&format!("{exchange}.unrouted")).await;
        assert_eq!(
            take(&mut routed, 1, WAIT).await[0].routing_key.as_str(),
            "only.this"
        );
        assert_eq!(
            take(&mut unrouted, 1, WAIT).await[0].routing_key.as_str(),
            "nobody.listens"
        );
        app.stop().await;
        let _ = broker
            .channel
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    })
    .await;
}

#[tokio::test]
async fn unreachable_broker_in_confirmed_mode_answers_503_quickly() {
    bounded(async {
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.urls = vec!["amqp://guest:guest@127.0.0.1:1/%2f".into()];
            s.amqp.publish_timeout_ms = 1000;
        })
        .await;
        let started = std::time::Instant::now();
        let a = app
            .post_json(&event_body("WHEF_SESSION_CREATED", "s1", "r1", 1))
            .await;
        assert_eq!(a.code, 503, "{a:?}");
        assert!(a.headers.contains_key("retry-after"));
        // Bounded by the publish timeout, not hanging (a generous margin: not a timing goal).
        assert!(started.elapsed() < Duration::from_secs(10));
        let (code, body) = app.admin_get("/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("\"connected\":false"), "{body}");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unreachable_broker_in_spooled_mode_still_accepts() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.urls = vec!["amqp://guest:guest@127.0.0.1:1/%2f".into()]
        })
        .await;
        for n in 0..20 {
            let a = app
                .post_json(&event_body(
                    "WHEF_SESSION_CREATED",
                    &format!("s{n}"),
                    "r1",
                    n,
                ))
                .await;
            assert_eq!(a.code, 200, "{a:?}");
        }
        let (code, body) = app.admin_get("/readyz").await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"events\":20"), "{body}");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn http_errors_follow_the_contract() {
    bounded(async {
        let app = spawn_app(AckMode::Confirmed, |_| {}).await;
        let body = event_body("WHEF_SESSION_CREATED", "s1", "r1", 1);
        let c = &app.client;
        let r = answer(
            c.post(format!("http://{}/elsewhere", app.http))
                .body(body.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.code, 404);
        let r = answer(c.get(app.url()).send().await.unwrap()).await;
        assert_eq!(r.code, 405);
        assert_eq!(r.headers.get("allow").unwrap(), "POST");
        let r = app.post(body.clone(), Some("text/plain")).await;
        assert_eq!(r.code, 415);
        // No Content-Type at all is accepted.
        let r = app.post(body.clone(), None).await;
        assert_eq!(r.code, 200, "{r:?}");
        let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(300 * 1024));
        let r = app.post_json(&big).await;
        assert_eq!(r.code, 413);
        let r = app
            .post(vec![0xff, 0xfe, b'{'], Some("application/json"))
            .await;
        assert_eq!(r.code, 400);
        // A second `session` after a valid one: a consumer could read either reference.
        let dup = format!(
            "{},\"session\":{{\"id\":\"s1\",\"reference\":\"other\",\"transaction_number\":1}}}}",
            &body[..body.len() - 1]
        );
        let r = app.post_json(&dup).await;
        assert_eq!(r.code, 422);
        assert!(r.errordesc.contains("duplicate"), "{r:?}");
        app.stop().await;
    })
    .await;
}

/// SPEC 9 `client`: the client object of `WHEF_CLIENT_*` events (personal data:
/// an IP address, a browser) reaches consumers byte for byte and never appears in
/// the bridge's log at its default level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_object_passes_through_and_is_never_logged() {
    bounded(async {
    const TOKEN: &str = "client-token";
    const IP: &str = "198.51.100.77";
    const AGENT: &str = "CanaryAgent/7.7 (client-object-test)";
    let exchange = unique("client");
    let broker = Broker::connect(&amqp_url()).await;
    broker.declare_exchange(&exchange).await;
    let mut consumer = broker.subscribe(&exchange, "#").await;
    let spool = tempfile::tempdir().expect("temp dir");
    let bridge = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, TOKEN, &[]);
    let client = http_client();
    let types = [
        "WHEF_CLIENT_LOGGED_IN",
        "WHEF_CLIENT_FORM_LOADED",
        "WHEF_CLIENT_FORM_SUBMITTED",
    ];
    let mut sent = Vec::new();
    for (i, event_type) in types.into_iter().enumerate() {
        let body = format!(
            r#"{{"event":{{"type":"{event_type}","timestamp":"2025-01-26T08:49:33.62604{i}"}},"session":{{"id":"cl{i}","reference":"client-ref","transaction_number":{i}}},"client":{{"ip":"{IP}","user_agent":"{AGENT}","geo":{{"country":"IL"}}}}}}"#
        );
        let r = client
            .post(bridge.url(TOKEN))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("post");
        assert_eq!(
            r.status(),
            200,
            "{event_type}: {}",
            r.text().await.unwrap_or_default()
        );
        sent.push(body);
    }
    let got = take(&mut consumer, sent.len(), WAIT).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|d| String::from_utf8_lossy(&d.data).into_owned())
        .collect();
    assert_eq!(bodies, sent, "published bodies differ from those posted");
    let log = bridge.log();
    assert!(
        log.contains("client-ref"),
        "no request line was logged:\n{log}"
    );
    assert!(!log.contains(IP), "the client IP is in the log:\n{log}");
    assert!(
        !log.contains("CanaryAgent"),
        "the user agent is in the log:\n{log}"
    );
    drop(bridge);
    broker.cleanup(&exchange).await;
    })
    .await;
}
