//! SPEC 2's check order, shown with two faults per request: the earlier check
//! must answer. One fault at a time proves each check, not their order.

mod common;

use std::time::{Duration, Instant};

use cellosign_bridge::AckMode;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "order-token";
/// The body timeout the apps run with; an answer decided from the head comes long before.
const BODY_TIMEOUT_MS: u64 = 10_000;

/// Sends `request` as is on a new connection and returns the status code and the
/// whole answer; the request asks the server to close after answering.
async fn raw(app: &TestApp, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(app.http).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    // Only the head counts: the server may answer and close before reading a body.
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to {request:?}: {text:?}"));
    (code, text)
}

/// A request head (and optional body) with `connection: close`.
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut r = format!("{method} {path} HTTP/1.1\r\nhost: bridge\r\nconnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

/// Holds the only in-flight slot of `app`: a request whose body never finishes.
async fn hold_the_only_slot(app: &TestApp) -> TcpStream {
    let mut holder = TcpStream::connect(app.http).await.expect("connect");
    let auth = format!("Bearer {TOKEN}");
    let head = request(
        "POST",
        "/webhooks/cellosign",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("content-length", "100"),
        ],
        "{",
    );
    holder.write_all(head.as_bytes()).await.expect("write");
    // The slot is taken once the server has read the head; wait until 429 shows.
    for _ in 0..200 {
        let (code, _) = raw(app, &valid_post()).await;
        if code == 429 {
            return holder;
        }
        assert_eq!(code, 200, "a valid event while the slot is still free");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the in-flight limit never showed");
}

/// One row of a table: a request with two faults and the answer it must get.
struct Case<'a> {
    what: &'a str,
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: &'a str,
    expect: u16,
}

/// A POST to the webhook path.
fn post<'a>(
    what: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: &'a str,
    expect: u16,
) -> Case<'a> {
    Case {
        what,
        method: "POST",
        path: "/webhooks/cellosign",
        headers,
        body,
        expect,
    }
}

/// A request that passes every check.
fn valid_post() -> String {
    let body = event_body("WHEF_SESSION_CREATED", "order", "order-ref", 1);
    let auth = format!("Bearer {TOKEN}");
    let len = body.len().to_string();
    request(
        "POST",
        "/webhooks/cellosign",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("content-length", &len),
        ],
        &body,
    )
}

#[tokio::test]
async fn with_two_faults_the_earlier_check_answers() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.auth.tokens = vec![TOKEN.into()];
            s.http.max_body_bytes = 1024;
            s.http.max_in_flight = 1;
            s.http.body_read_timeout_ms = BODY_TIMEOUT_MS;
        })
        .await;
        let good = format!("Bearer {TOKEN}");
        let bad = "Bearer wrong";
        let huge = "100000";
        let table = [
            Case {
                what: "unknown path and GET",
                method: "GET",
                path: "/elsewhere",
                headers: vec![("authorization", bad)],
                body: "",
                expect: 404,
            },
            Case {
                what: "GET with a bad token",
                method: "GET",
                path: "/webhooks/cellosign",
                headers: vec![("authorization", bad)],
                body: "",
                expect: 405,
            },
            post(
                "bad token and text/plain",
                vec![
                    ("authorization", bad),
                    ("content-type", "text/plain"),
                    ("content-length", "2"),
                ],
                "{}",
                401,
            ),
            post(
                "text/plain and an oversized body",
                vec![
                    ("authorization", &good),
                    ("content-type", "text/plain"),
                    ("content-length", huge),
                ],
                "",
                415,
            ),
            post(
                "bad token and an oversized body",
                vec![
                    ("authorization", bad),
                    ("content-type", "application/json"),
                    ("content-length", huge),
                ],
                "",
                401,
            ),
            post(
                "no token and not JSON",
                vec![
                    ("content-type", "application/json"),
                    ("content-length", "3"),
                ],
                "{{{",
                401,
            ),
            post(
                "not JSON and not valid",
                vec![
                    ("authorization", &good),
                    ("content-type", "application/json"),
                    ("content-length", "23"),
                ],
                "{\"event\": 1, \"session\":",
                400,
            ),
        ];
        for case in &table {
            let request = request(case.method, case.path, &case.headers, case.body);
            let (code, text) = raw(&app, &request).await;
            assert_eq!(code, case.expect, "{}: {text}", case.what);
            if case.expect == 405 {
                assert!(
                    text.to_ascii_lowercase().contains("allow: post"),
                    "{}: {text}",
                    case.what
                );
            }
        }

        // With the only in-flight slot held: size still comes before the limit,
        // and the limit before anything read from the body.
        let holder = hold_the_only_slot(&app).await;
        let in_flight_full = [
            post(
                "oversized body while in flight is full",
                vec![
                    ("authorization", &good),
                    ("content-type", "application/json"),
                    ("content-length", huge),
                ],
                "",
                413,
            ),
            post(
                "bad token while in flight is full",
                vec![
                    ("authorization", bad),
                    ("content-type", "application/json"),
                    ("content-length", "3"),
                ],
                "{{{",
                401,
            ),
            post(
                "not JSON while in flight is full",
                vec![
                    ("authorization", &good),
                    ("content-type", "application/json"),
                    ("content-length", "3"),
                ],
                "{{{",
                429,
            ),
        ];
        for case in &in_flight_full {
            let request = request(case.method, case.path, &case.headers, case.body);
            let (code, text) = raw(&app, &request).await;
            assert_eq!(code, case.expect, "{}: {text}", case.what);
        }
        drop(holder);
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_refused_address_is_answered_before_the_token() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.auth.tokens = vec![TOKEN.into()];
            s.auth.allow_from = vec!["10.0.0.0/8".parse().expect("cidr")];
        })
        .await;
        let (code, text) = raw(
            &app,
            &request(
                "POST",
                "/webhooks/cellosign",
                &[("content-type", "text/plain"), ("content-length", "2")],
                "{}",
            ),
        )
        .await;
        assert_eq!(code, 403, "no token, text/plain, from 127.0.0.1: {text}");
        app.stop().await;
    })
    .await;
}

/// Auth is decided from the head: a bad token with a body announced but never
/// sent is answered at once, not after the body timeout.
#[tokio::test]
async fn a_bad_token_is_answered_without_waiting_for_the_body() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.auth.tokens = vec![TOKEN.into()];
            s.http.body_read_timeout_ms = BODY_TIMEOUT_MS;
        })
        .await;
        let started = Instant::now();
        let (code, text) = raw(
            &app,
            &request(
                "POST",
                "/webhooks/cellosign",
                &[
                    ("authorization", "Bearer wrong"),
                    ("content-type", "application/json"),
                    ("content-length", "100"),
                ],
                "",
            ),
        )
        .await;
        let took = started.elapsed();
        assert_eq!(code, 401, "{text}");
        // Half the body timeout is far more than a loaded machine needs to answer
        // from the head, and far less than waiting for the body would take.
        assert!(
            took < Duration::from_millis(BODY_TIMEOUT_MS / 2),
            "401 came after {took:?}: the server waited for the body"
        );
        app.stop().await;
    })
    .await;
}
