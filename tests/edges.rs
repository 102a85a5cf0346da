//! Promises of SPEC 2-5 at their edges, over real HTTP and RabbitMQ: dedup in
//! time and in size, 429 giving way once a slot frees, each listener answering
//! only its own paths, and the receive time in `x-received-at`.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellosign_bridge::AckMode;
use common::*;
use lapin::types::AMQPValue;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

/// The message ids of what `consumer` gets within a short quiet period.
async fn ids_delivered(consumer: &mut lapin::Consumer, n: usize) -> Vec<String> {
    let got = take(consumer, n, WAIT).await;
    assert_quiet(consumer, Duration::from_millis(700)).await;
    message_ids(&got)
}

#[tokio::test]
async fn a_copy_after_the_dedup_window_is_published_again() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| s.events.dedup_window_s = 1).await;
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&app.settings.amqp.exchange).await;
        let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;
        let body = event_body("WHEF_SESSION_CREATED", "window", "r-window", 1);
        let id = message_id("WHEF_SESSION_CREATED", "window", 1);
        assert_eq!(app.post_json(&body).await.code, 200);
        assert_eq!(
            app.post_json(&body).await.code,
            200,
            "a copy within the window"
        );
        assert_eq!(
            ids_delivered(&mut consumer, 1).await,
            std::slice::from_ref(&id)
        );
        // Past the one-second window the id is forgotten: the copy is new again.
        tokio::time::sleep(Duration::from_millis(1300)).await;
        assert_eq!(app.post_json(&body).await.code, 200);
        assert_eq!(ids_delivered(&mut consumer, 1).await, [id]);
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn dedup_forgets_the_oldest_id_past_its_size_limit() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| s.events.dedup_max_ids = 2).await;
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&app.settings.amqp.exchange).await;
        let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;
        let body = |n| event_body("WHEF_SESSION_CREATED", "size", "r-size", n);
        let id = |n| message_id("WHEF_SESSION_CREATED", "size", n);
        for n in 1..=3 {
            assert_eq!(app.post_json(&body(n)).await.code, 200);
        }
        assert_eq!(ids_delivered(&mut consumer, 3).await, [id(1), id(2), id(3)]);
        // 3 is remembered (one of the last two); 1 was pushed out by 3.
        assert_eq!(app.post_json(&body(3)).await.code, 200);
        assert_eq!(app.post_json(&body(1)).await.code, 200);
        assert_eq!(ids_delivered(&mut consumer, 1).await, [id(1)]);
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_freed_slot_ends_the_429s() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| s.http.max_in_flight = 1).await;
        let body = event_body("WHEF_SESSION_CREATED", "slot", "r-slot", 1);
        let mut holder = TcpStream::connect(app.http).await.expect("connect");
        let head = "POST /webhooks/cellosign HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
        holder.write_all(head.as_bytes()).await.expect("write");
        let mut limited = false;
        for _ in 0..200 {
            if app.post_json(&body).await.code == 429 {
                limited = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(limited, "the held slot never gave 429");
        // The holder goes away: its slot is free at once, not after the body timeout.
        drop(holder);
        let mut answered = None;
        for _ in 0..100 {
            let code = app.post_json(&body).await.code;
            if code != 429 {
                answered = Some(code);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(answered, Some(200), "still 429 two seconds after the slot was freed");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn each_listener_answers_only_its_own_paths() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |_| {}).await;
        for path in ["/healthz", "/readyz", "/metrics"] {
            let r = app
                .client
                .get(format!("http://{}{path}", app.http))
                .send()
                .await
                .expect("public listener");
            assert_eq!(r.status(), 404, "{path} on the public listener");
            let (code, _) = app.admin_get(path).await;
            assert_eq!(code, 200, "{path} on the admin listener");
        }
        let body = event_body("WHEF_SESSION_CREATED", "paths", "r-paths", 1);
        let r = app
            .client
            .post(format!("http://{}{}", app.admin, app.settings.http.path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("admin listener");
        assert_eq!(r.status(), 404, "the webhook on the admin listener");
        let r = app
            .client
            .post(format!("http://{}/readyz", app.admin))
            .send()
            .await
            .expect("admin listener");
        assert_eq!(r.status(), 405, "POST on a known admin path");
        assert_eq!(
            r.headers().get("allow").and_then(|v| v.to_str().ok()),
            Some("GET, HEAD")
        );
        app.stop().await;
    })
    .await;
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time with milliseconds
/// (`2025-01-26T08:49:33.626Z`), the form `x-received-at` promises.
fn rfc3339_millis(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 24 || b[10] != b'T' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss, ms) = (n(11..13)?, n(14..16)?, n(17..19)?, n(20..23)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs * 1000 + ms).ok()
}

#[tokio::test]
async fn x_received_at_is_the_time_the_event_came_in() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |_| {}).await;
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&app.settings.amqp.exchange).await;
        let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;
        let now_ms = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let before = now_ms();
        let body = event_body("WHEF_SESSION_CREATED", "recv", "r-recv", 1);
        assert_eq!(app.post_json(&body).await.code, 200);
        let after = now_ms();
        let got = take(&mut consumer, 1, WAIT).await;
        let header = got[0]
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-received-at").cloned());
        let Some(AMQPValue::LongString(at)) = header else {
            panic!("no x-received-at: {header:?}");
        };
        let at = at.to_string();
        let ms = rfc3339_millis(&at).unwrap_or_else(|| panic!("not RFC 3339 millis UTC: {at}"));
        // The clock reading happens between the request's start and its answer.
        assert!(
            (before.saturating_sub(5)..=after + 5).contains(&ms),
            "x-received-at {at} is not between the request's start and its answer"
        );
        let timestamp = got[0].properties.timestamp().unwrap_or_default();
        assert_eq!(
            timestamp,
            ms / 1000,
            "the timestamp property is the same instant"
        );
        app.stop().await;
    })
    .await;
}

/// Point 9 of issue 12: a test that panics (or never calls `stop`) still leaves
/// nothing on the shared broker: `TestApp` cleans up when dropped.
#[tokio::test]
async fn a_dropped_app_removes_what_it_declared() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |_| {}).await;
        app.wait_ready(true, WAIT).await;
        let exchange = app.settings.amqp.exchange.clone();
        let broker = Broker::connect(&amqp_url()).await;
        assert!(
            broker.exchange_exists(&exchange).await,
            "declared at connect"
        );
        let unrouted = format!("{exchange}.unrouted");
        assert!(broker.exchange_exists(&unrouted).await);
        drop(app);
        assert!(
            !broker.exchange_exists(&exchange).await,
            "{exchange} left on the broker by a dropped app"
        );
        assert!(!broker.exchange_exists(&unrouted).await);
    })
    .await;
}
