//! The gauges added for the dashboard and the alert rules (issue 11): the oldest
//! spooled event's age and readiness follow the bridge's state.

mod common;
mod support;

use std::time::Duration;

use cellosign_bridge::AckMode;
use common::*;
use support::tcp_proxy::{CutMode, TcpProxy};

const WAIT: Duration = Duration::from_secs(20);

const OLDEST_AGE: &str = "cellosign_bridge_spool_oldest_age_seconds";
const READY: &str = "cellosign_bridge_ready";
const CONNECTED: &str = "cellosign_bridge_broker_connected";
const SPOOL_EVENTS: &str = "cellosign_bridge_spool_events";

// ---------------------------------------------------------------------------------
// The gauges added for them.
// ---------------------------------------------------------------------------------

/// `/readyz`'s code and the `ready` gauge read between two `/readyz` answers with the
/// same code, so that readiness held still while the gauge was read.
async fn readyz_and_gauge(app: &TestApp) -> (u16, f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (before, _) = app.admin_get("/readyz").await;
        let text = app.metrics().await;
        let (after, body) = app.admin_get("/readyz").await;
        if before == after {
            let gauge = series_value(&text, READY)
                .unwrap_or_else(|| panic!("{READY} is not exported:\n{text}"));
            return (after, gauge);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz keeps changing; last: {after} {body}"
        );
    }
}

/// Polls `/readyz` until it answers `code`.
async fn wait_readyz(app: &TestApp, code: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, body) = app.admin_get("/readyz").await;
        if got == code {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz is not {code} within {WAIT:?}: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With the broker path cut, accepted events wait in the spool and the oldest one's age
/// grows with the clock, while the bridge stays ready (spooled mode: `ready` is what
/// `/readyz` says, not whether the broker is connected); once the path is back and the
/// spool drained, the age is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_age_rises_while_events_wait_and_is_0_once_the_spool_drains() {
    bounded(async {
        let proxy = TcpProxy::to_port(5672).await.expect("proxy");
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.urls = vec![proxy.amqp_url().into()];
            s.amqp.reconnect_initial_ms = 50;
            s.amqp.reconnect_max_ms = 500;
        })
        .await;
        app.wait_ready(true, WAIT).await;
        let text = app.metrics().await;
        assert_eq!(
            series_value(&text, OLDEST_AGE),
            Some(0.0),
            "an empty spool's oldest age is 0:\n{text}"
        );
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0));
        let broker = Broker::connect(&amqp_url()).await;
        let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;

        proxy.cut(CutMode::Refuse).await;
        app.wait_metric(CONNECTED, WAIT, |v| v == 0.0).await;
        for n in 0..2 {
            let body = event_body("WHEF_SESSION_CREATED", "s-age", "r-age", n);
            assert_eq!(app.post_json(&body).await.code, 200);
        }
        let stored = std::time::Instant::now();
        assert_eq!(app.metric(SPOOL_EVENTS).await, 2.0);
        let first = app.metric(OLDEST_AGE).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let later = app.metric(OLDEST_AGE).await;
        let waited = stored.elapsed().as_secs_f64();
        assert!(
            later >= first + 1.0 && later >= waited - 0.1 && later < waited + 10.0,
            "the oldest age went from {first} to {later} s while the events waited {waited:.3} s"
        );
        // Spooled mode keeps accepting with the broker away: ready, and the gauge says so.
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0));
        assert_eq!(app.metric(CONNECTED).await, 0.0);

        proxy.restore();
        take(&mut consumer, 2, WAIT).await;
        app.wait_metric(SPOOL_EVENTS, WAIT, |v| v == 0.0).await;
        let text = app.metrics().await;
        assert_eq!(
            series_value(&text, OLDEST_AGE),
            Some(0.0),
            "the spool drained:\n{text}"
        );
        app.stop().await;
    })
    .await;
}

/// `ready` is 1 exactly when `/readyz` answers 200 and 0 when it answers 503: in
/// confirmed mode with the broker path cut and back; in spooled mode with the broker
/// connected but an event refused as larger than the whole spool (no room for it, so
/// unready), and with a misconfigured broker (the exchange missing with
/// `declare = false`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_gauge_is_1_when_readyz_is_200_and_0_when_it_is_503() {
    bounded(async {
        let proxy = TcpProxy::to_port(5672).await.expect("proxy");
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.urls = vec![proxy.amqp_url().into()];
            s.amqp.reconnect_initial_ms = 50;
            s.amqp.reconnect_max_ms = 500;
        })
        .await;
        app.wait_ready(true, WAIT).await;
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0), "connected");
        proxy.cut(CutMode::Refuse).await;
        wait_readyz(&app, 503).await;
        assert_eq!(readyz_and_gauge(&app).await, (503, 0.0), "broker cut");
        proxy.restore();
        app.wait_ready(true, WAIT).await;
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0), "broker back");
        app.stop().await;

        let app = spawn_app(AckMode::Spooled, |s| s.spool.max_bytes = 64).await;
        app.wait_ready(true, WAIT).await;
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0), "spool empty");
        let body = event_body("WHEF_SESSION_CREATED", "s-full", "r-full", 1);
        assert_eq!(
            app.post_json(&body).await.code,
            503,
            "larger than the spool"
        );
        wait_readyz(&app, 503).await;
        assert_eq!(
            readyz_and_gauge(&app).await,
            (503, 0.0),
            "no room, broker connected"
        );
        assert_eq!(app.metric(CONNECTED).await, 1.0);
        app.stop().await;

        let app = spawn_app(AckMode::Spooled, |s| s.amqp.declare = false).await;
        wait_readyz(&app, 503).await;
        let (_, body) = app.admin_get("/readyz").await;
        assert!(body.contains("\"misconfigured\":true"), "{body}");
        assert_eq!(readyz_and_gauge(&app).await, (503, 0.0), "misconfigured");
        app.stop().await;
    })
    .await;
}
