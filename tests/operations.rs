//! The operating surface: auth, limits, timeouts, TLS, admin endpoints, metrics, tail.

mod common;
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use cellosign_bridge::AckMode;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::bridge_process::BridgeProcess;
use support::tcp_proxy::{CutMode, TcpProxy};

const WAIT: Duration = Duration::from_secs(20);

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "server did not close the connection within {within:?}; got {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn tokens_are_required_from_any_of_three_places() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.auth.tokens = vec!["t0k3n".into(), "second".into()]
        })
        .await;
        let exchange = app.settings.amqp.exchange.clone();
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        let mut consumer = broker.subscribe(&exchange, "#").await;
        let body = event_body("WHEF_SESSION_CREATED", "s1", "r1", 1);
        let post = |url: String| {
            app.client
                .post(url)
                .header("content-type", "application/json")
                .body(body.clone())
        };

        for req in [
            post(app.url()),
            post(app.url()).bearer_auth("wrong"),
            post(app.url()).header("x-webhook-token", "t0k3"),
            post(format!("{}?token=nope", app.url())),
        ] {
            let a = answer(req.send().await.unwrap()).await;
            assert_eq!(a.code, 401, "{a:?}");
            assert!(!a.errordesc.contains("t0k3n"));
        }
        // 401 publishes nothing.
        assert_quiet(&mut consumer, Duration::from_millis(500)).await;

        let accepted = [
            post(app.url()).bearer_auth("t0k3n"),
            post(app.url()).header("x-webhook-token", "second"),
            post(format!("{}?token=t0k3n", app.url())),
        ];
        for (n, req) in accepted.into_iter().enumerate() {
            // Distinct events, so dedup does not hide a publish.
            let req = req.body(event_body(
                "WHEF_SESSION_CREATED",
                &format!("ok{n}"),
                "r1",
                n as u64,
            ));
            let a = answer(req.send().await.unwrap()).await;
            assert_eq!(a.code, 200, "{a:?}");
        }
        assert_eq!(take(&mut consumer, 3, WAIT).await.len(), 3);
        let (_, metrics) = app.admin_get("/metrics").await;
        assert!(
            metrics.contains(r#"cellosign_bridge_http_requests_total{code="401"} 4"#),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"cellosign_bridge_events_rejected_total{reason="unauthorized"} 4"#),
            "{metrics}"
        );
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn query_tokens_can_be_disabled() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.auth.tokens = vec!["t0k3n".into()];
            s.auth.allow_query_token = false;
        })
        .await;
        let body = event_body("WHEF_SESSION_CREATED", "s1", "r1", 1);
        let r = app
            .client
            .post(format!("{}?token=t0k3n", app.url()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer(r).await.code, 401);
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn client_networks_are_enforced_behind_trusted_proxies() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.auth.allow_from = vec!["10.0.0.0/8".parse().unwrap()];
            s.http.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
        })
        .await;
        let body = event_body("WHEF_SESSION_CREATED", "s1", "r1", 1);
        let post = || app.client.post(app.url()).body(body.clone());
        // The test connects from 127.0.0.1, which is not allowed itself.
        assert_eq!(answer(post().send().await.unwrap()).await.code, 403);
        let r = post()
            .header("x-forwarded-for", "192.0.2.1")
            .send()
            .await
            .unwrap();
        assert_eq!(answer(r).await.code, 403);
        // The trusted proxy vouches for an allowed client.
        let r = post()
            .header("x-forwarded-for", "10.1.2.3")
            .send()
            .await
            .unwrap();
        assert_eq!(answer(r).await.code, 200);
        // A spoofed allowed address before the real (appended) one does not help.
        let r = post()
            .header("x-forwarded-for", "10.1.2.3, 192.0.2.1")
            .send()
            .await
            .unwrap();
        assert_eq!(answer(r).await.code, 403);
        // The admin listener is not affected.
        assert_eq!(app.admin_get("/healthz").await.0, 200);
        app.stop().await;
    })
    .await;
}

/// README "HTTP contract": without `http.trusted_proxies` the client address checked
/// against `auth.allow_from` is the socket peer, over IPv4 and IPv6, and an
/// `X-Forwarded-For` from that (untrusted) peer changes nothing either way.
#[tokio::test]
async fn allow_from_checks_the_socket_peer_over_ipv4_and_ipv6_without_trusted_proxies() {
    bounded(async {
        // (listener, allow_from, expected code, an X-Forwarded-For that must not change it)
        let cases = [
            ("127.0.0.1:0", "127.0.0.1/32", 200, "192.0.2.1"),
            ("127.0.0.1:0", "10.0.0.0/8", 403, "10.1.2.3"),
            ("[::1]:0", "::1/128", 200, "2001:db8::1"),
            ("[::1]:0", "fd00::/8", 403, "fd00::1"),
        ];
        for (n, (listen, allowed, expect, forwarded)) in cases.into_iter().enumerate() {
            let app = spawn_app(AckMode::Spooled, |s| {
                s.http.listen = listen.parse().expect("listen address");
                s.auth.allow_from = vec![allowed.parse().expect("cidr")];
            })
            .await;
            assert!(app.settings.http.trusted_proxies.is_empty());
            assert_eq!(
                app.http.is_ipv6(),
                listen.starts_with('['),
                "listening on {}",
                app.http
            );
            let case = format!("peer {} with allow_from [{allowed}]", app.http.ip());
            let body =
                |k: u64| event_body("WHEF_SESSION_CREATED", &format!("peer{n}"), "r-peer", k);
            let a = app.post_json(&body(1)).await;
            assert_eq!(a.code, expect, "{case}: {a:?}");
            let r = app
                .client
                .post(app.url())
                .header("content-type", "application/json")
                .header("x-forwarded-for", forwarded)
                .body(body(2))
                .send()
                .await
                .expect("request sent");
            let a = answer(r).await;
            assert_eq!(
                a.code, expect,
                "{case} and X-Forwarded-For {forwarded} from an untrusted peer: {a:?}"
            );
            if expect == 403 {
                assert_eq!(a.errordesc, "client address not allowed", "{case}");
                assert_eq!(
                    app.metric(r#"cellosign_bridge_events_rejected_total{reason="forbidden"}"#)
                        .await,
                    2.0,
                    "{case}"
                );
            }
            app.stop().await;
        }
    })
    .await;
}

/// The bridge's request log lines (target `cellosign_bridge::request`, message
/// `webhook`) in its JSON log, once there are `n` of them (at most 10 s).
async fn request_lines(bridge: &BridgeProcess, n: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = bridge.log();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "cellosign_bridge::request" && v["message"] == "webhook")
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} request lines logged:\n{log}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// README "Logs": one JSON line per request, target `cellosign_bridge::request`, with
/// method, path (never the query, which may hold the token), peer, HTTP code, event
/// type, session id, reference, latency and reason; from a real bridge's log.
#[tokio::test]
async fn each_request_logs_one_line_with_the_documented_fields_and_never_the_query() {
    bounded(async {
        const TOKEN: &str = "log-line-token-9Qz";
        let exchange = unique("logline");
        let spool = tempfile::tempdir().expect("temp dir");
        let bridge = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, TOKEN, &[]);
        let client = http_client();
        let plain_url = format!("http://{}/webhooks/cellosign", bridge.http);
        let post = |url: &str, body: String| {
            client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
        };
        // Accepted, with the token in the query.
        let accepted = event_body("WHEF_CLIENT_FORM_LOADED", "s-logline", "r-logline", 1);
        let a = answer(post(&bridge.url(TOKEN), accepted).send().await.expect("post")).await;
        assert_eq!(a.code, 200, "{a:?}");
        // Refused before the body: no token.
        let body = event_body("WHEF_CLIENT_FORM_LOADED", "s-logline", "r-logline", 2);
        let a = answer(post(&plain_url, body).send().await.expect("post")).await;
        assert_eq!(a.code, 401, "{a:?}");
        // Refused by validation: no reference.
        let invalid = r#"{"event":{"type":"WHEF_SESSION_CREATED","timestamp":"2025-01-26T08:49:33.626046"},"session":{"id":"s-bad","transaction_number":1}}"#;
        let a = answer(
            post(&plain_url, invalid.to_string())
                .header("x-webhook-token", TOKEN)
                .send()
                .await
                .expect("post"),
        )
        .await;
        assert_eq!(a.code, 422, "{a:?}");
        let reason_422 = a.errordesc;

        request_lines(&bridge, 3).await;
        // No more come: one line per request, in the order they were answered.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let lines = request_lines(&bridge, 3).await;
        assert_eq!(lines.len(), 3, "one line per request: {lines:?}");
        let expected = [
            (200, "WHEF_CLIENT_FORM_LOADED", "s-logline", "r-logline", ""),
            (401, "-", "-", "-", "missing or invalid token"),
            (422, "-", "-", "-", reason_422.as_str()),
        ];
        for (line, (code, event_type, session_id, reference, reason)) in
            lines.iter().zip(expected)
        {
            assert_eq!(line["level"], "INFO", "{line}");
            assert_eq!(line["method"], "POST", "{line}");
            assert_eq!(
                line["path"], "/webhooks/cellosign",
                "the path, never the query: {line}"
            );
            assert_eq!(line["peer"], "127.0.0.1", "{line}");
            assert_eq!(line["code"], code, "{line}");
            assert_eq!(line["event_type"], event_type, "{line}");
            assert_eq!(line["session_id"], session_id, "{line}");
            assert_eq!(line["reference"], reference, "{line}");
            assert_eq!(line["reason"], reason, "{line}");
            let latency = line["latency_ms"].as_f64().unwrap_or(-1.0);
            assert!(
                (0.0..REQUEST_TIMEOUT.as_secs_f64() * 1000.0).contains(&latency),
                "latency_ms: {line}"
            );
        }
        assert!(reason_422.contains("session.reference"), "{reason_422}");
        let log = bridge.log();
        assert!(!log.contains(TOKEN), "the token is in the log:\n{log}");
        drop(bridge);
        Broker::connect(&amqp_url()).await.cleanup(&exchange).await;
    })
    .await;
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413_without_the_rest_being_read() {
    bounded(async {
    let app = spawn_app(AckMode::Spooled, |s| s.http.max_body_bytes = 1024).await;
    let mut stream = TcpStream::connect(app.http).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        app.settings.http.path
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("400\r\n{}\r\n", "x".repeat(0x400));
    // 2 KiB sent; the chunked body never ends, yet the answer comes and the connection closes.
    stream.write_all(chunk.as_bytes()).await.unwrap();
    stream.write_all(chunk.as_bytes()).await.unwrap();
    let got = read_to_close(&mut stream, WAIT).await;
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(got.contains(r#"{"status":"-1""#), "{got}");
    // Declared too large: refused from the head alone.
    let big = vec![b' '; 2048];
    assert_eq!(app.post(big, Some("application/json")).await.code, 413);
    app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_slow_client_is_cut() {
    bounded(async {
    let app = spawn_app(AckMode::Spooled, |s| {
        s.http.header_read_timeout_ms = 300;
        s.http.body_read_timeout_ms = 300;
    })
    .await;
    // Each cut comes after its timeout (300 ms), never much later: the bound is the
    // setting plus what a loaded two-core machine needs, far below the defaults
    // (5 s and 10 s) that would pass were the settings ignored.
    let (setting, margin) = (Duration::from_millis(300), Duration::from_millis(1500));
    // Headers that never finish.
    let mut stream = TcpStream::connect(app.http).await.unwrap();
    let started = std::time::Instant::now();
    stream
        .write_all(b"POST /webhooks/cellosign HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    read_to_close(&mut stream, WAIT).await;
    let took = started.elapsed();
    assert!(
        took >= setting - Duration::from_millis(50) && took <= setting + margin,
        "unfinished headers cut after {took:?}, header_read_timeout_ms = 300"
    );
    // A body that never finishes: answered 408 and closed.
    let mut stream = TcpStream::connect(app.http).await.unwrap();
    let started = std::time::Instant::now();
    let head = "POST /webhooks/cellosign HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"event\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    let got = read_to_close(&mut stream, WAIT).await;
    let took = started.elapsed();
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(
        took >= setting - Duration::from_millis(50) && took <= setting + margin,
        "unfinished body cut after {took:?}, body_read_timeout_ms = 300"
    );
    // Malformed HTTP does not take the process down.
    let mut stream = TcpStream::connect(app.http).await.unwrap();
    stream
        .write_all(b"\x00\x01GARBAGE / HTTP/9.9\r\n\r\n")
        .await
        .unwrap();
    read_to_close(&mut stream, WAIT).await;
    assert_eq!(
        app.post_json(&event_body("WHEF_SESSION_CREATED", "s1", "r1", 1))
            .await
            .code,
        200
    );
    app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn requests_over_the_in_flight_limit_get_429() {
    bounded(async {
    let app = spawn_app(AckMode::Spooled, |s| s.http.max_in_flight = 1).await;
    // Hold the only slot: a request whose body is still coming.
    let mut holder = TcpStream::connect(app.http).await.unwrap();
    let head = "POST /webhooks/cellosign HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
    holder.write_all(head.as_bytes()).await.unwrap();
    // The slot is taken once the server read the head; poll until the limit shows.
    let mut seen = None;
    for _ in 0..100 {
        let a = app
            .post_json(&event_body("WHEF_SESSION_CREATED", "s1", "r1", 1))
            .await;
        if a.code == 429 {
            seen = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = seen.expect("a second request is refused while the first holds the only slot");
    assert_eq!(a.headers.get("retry-after").unwrap(), "1");
    drop(holder);
    app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |_| {}).await;
        let (code, body) = app.admin_get("/healthz").await;
        assert_eq!(code, 200, "{body}");
        let (code, body) = app.admin_get("/readyz").await;
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["ready"], true);
        assert_eq!(v["mode"], "spooled");
        assert!(v["spool"]["max_bytes"].as_u64().is_some(), "{body}");
        assert!(v["broker"]["connected"].is_boolean(), "{body}");

        assert_eq!(
            app.post_json(&event_body("WHEF_SESSION_CREATED", "s1", "r1", 1))
                .await
                .code,
            200
        );
        assert_eq!(app.post_json("{").await.code, 400);
        let (code, metrics) = app.admin_get("/metrics").await;
        assert_eq!(code, 200);
        for line in [
            r#"cellosign_bridge_http_requests_total{code="200"} 1"#,
            r#"cellosign_bridge_http_requests_total{code="400"} 1"#,
            r#"cellosign_bridge_events_accepted_total{type="WHEF_SESSION_CREATED"} 1"#,
            r#"cellosign_bridge_events_rejected_total{reason="malformed_json"} 1"#,
            "cellosign_bridge_ack_latency_seconds_count 1",
        ] {
            assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
        }
        for name in [
            "cellosign_bridge_publish_confirm_seconds",
            "cellosign_bridge_spool_events",
            "cellosign_bridge_spool_bytes",
            "cellosign_bridge_broker_connected",
            "cellosign_bridge_broker_reconnects_total",
            "cellosign_bridge_broker_nacks_total",
            "cellosign_bridge_broker_returns_total",
            "cellosign_bridge_dedup_hits_total",
        ] {
            assert!(metrics.contains(name), "missing {name} in\n{metrics}");
        }
        assert_eq!(app.admin_get("/nope").await.0, 404);
        app.stop().await;
    })
    .await;
}

/// TLS on the public listener: a webhook over TLS is answered "0" and its event
/// reaches the broker byte for byte, with its routing key and the contract's
/// properties; plain HTTP on the TLS port gets nowhere.
#[tokio::test]
async fn tls_on_the_public_listener_takes_the_event_to_the_broker_byte_for_byte() {
    bounded(async {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let app = spawn_app(AckMode::Spooled, |s| {
        s.http.tls = Some(cellosign_bridge::TlsSettings {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
        })
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(cert.cert.der().to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let (_broker, mut consumer) = app.subscribe("#").await;
    let tcp = TcpStream::connect(app.http).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    // Whitespace, escapes and multi-byte UTF-8 the bridge must pass on untouched.
    let body = concat!(
        "{ \"event\": {\"type\":\"WHEF_SESSION_CREATED\", \"timestamp\":\"2025-01-26T08:49:33.626046\"},\n",
        "  \"session\": {\"id\":\"s-tls\",\"reference\":\"r-tls\",\"transaction_number\":1,",
        "\"labels\":{\"NOTE\":\"caf\\u00e9 \u{05e9}\u{05dc}\u{05d5}\u{05dd}\"}},\n",
        "  \"extra\": [1, 2.50, null] }"
    );
    let req = format!(
        "POST {} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        app.settings.http.path,
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut out))
        .await
        .expect("the TLS answer within 20 s")
        .unwrap();
    let got = String::from_utf8_lossy(&out);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with(r#"{"status":"0","errordesc":""}"#), "{got}");
    let delivered = take(&mut consumer, 1, WAIT).await;
    let d = &delivered[0];
    assert_eq!(
        std::str::from_utf8(&d.data),
        Ok(body),
        "the body over TLS, byte for byte"
    );
    assert_eq!(d.routing_key.as_str(), "r-tls");
    assert_contract_properties(d, "over TLS");
    // Plain HTTP on the TLS port gets nowhere.
    let plain = app.client.post(app.url()).body(body).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    assert_quiet(&mut consumer, Duration::from_millis(300)).await;
    app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn tail_prints_events_posted_through_the_bridge() {
    bounded(async {
        let app = spawn_app(AckMode::Confirmed, |_| {}).await;
        let exchange = app.settings.amqp.exchange.clone();
        // The bridge declares the exchange once connected.
        app.wait_ready(true, WAIT).await;
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"))
            .args(["tail", "--binding", "ref-tail"])
            .env("BRIDGE_AMQP__URLS", amqp_url())
            .env("BRIDGE_AMQP__EXCHANGE", &exchange)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stderr).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(WAIT, ready)
            .await
            .expect("tail starts")
            .unwrap()
            .unwrap();
        assert!(line.contains("bound"), "{line}");
        let body = event_body("WHEF_CLIENT_FORM_LOADED", "s-tail", "ref-tail", 7);
        assert_eq!(
            app.post_json(&event_body(
                "WHEF_CLIENT_FORM_LOADED",
                "s-other",
                "ref-other",
                8
            ))
            .await
            .code,
            200
        );
        assert_eq!(app.post_json(&body).await.code, 200);
        let stdout = child.stdout.take().unwrap();
        let printed = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(WAIT, printed)
            .await
            .expect("tail prints")
            .unwrap()
            .unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["routing_key"], "ref-tail");
        assert_eq!(v["type"], "WHEF_CLIENT_FORM_LOADED");
        assert_eq!(
            v["message_id"],
            "s-tail:WHEF_CLIENT_FORM_LOADED:2025-01-26T08:49:33.000007"
        );
        assert!(v["received_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(
            v["body"],
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        );
        app.stop().await;
    })
    .await;
}

const CONFIRMS: &str = "cellosign_bridge_publish_confirm_seconds_count";
const CONNECTED: &str = "cellosign_bridge_broker_connected";
const RECONNECTS: &str = "cellosign_bridge_broker_reconnects_total";
const SPOOL_EVENTS: &str = "cellosign_bridge_spool_events";
const SPOOL_BYTES: &str = "cellosign_bridge_spool_bytes";

/// Each confirmed publish is one observation of the confirm histogram.
async fn confirms_observed(mode: AckMode) {
    let app = spawn_app(mode, |_| {}).await;
    app.wait_ready(true, WAIT).await;
    let broker = Broker::connect(&amqp_url()).await;
    let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;
    assert_eq!(
        app.metric(CONFIRMS).await,
        0.0,
        "{mode:?}: nothing published yet"
    );
    for n in 0..3 {
        let body = event_body("WHEF_SESSION_CREATED", "s-hist", "r-hist", n);
        assert_eq!(app.post_json(&body).await.code, 200);
    }
    take(&mut consumer, 3, WAIT).await;
    app.wait_metric(CONFIRMS, WAIT, |v| v == 3.0).await;
    let sum = app
        .metric("cellosign_bridge_publish_confirm_seconds_sum")
        .await;
    assert!(sum > 0.0, "{mode:?}: three confirms took no time at all");
    app.stop().await;
}

#[tokio::test]
async fn a_publish_moves_the_confirm_histogram_in_spooled_mode() {
    bounded(confirms_observed(AckMode::Spooled)).await;
}

#[tokio::test]
async fn a_publish_moves_the_confirm_histogram_in_confirmed_mode() {
    bounded(confirms_observed(AckMode::Confirmed)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_flips_broker_connected_counts_a_reconnect_and_the_spool_gauges_follow() {
    bounded(async {
        let proxy = TcpProxy::to_port(5672).await.expect("proxy");
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.urls = vec![proxy.amqp_url().into()];
            s.amqp.reconnect_initial_ms = 50;
            s.amqp.reconnect_max_ms = 500;
        })
        .await;
        app.wait_ready(true, WAIT).await;
        assert_eq!(app.metric(CONNECTED).await, 1.0);
        assert_eq!(app.metric(RECONNECTS).await, 0.0, "the first connection");
        assert_eq!(app.metric(SPOOL_EVENTS).await, 0.0);
        assert_eq!(app.metric(SPOOL_BYTES).await, 0.0);
        let broker = Broker::connect(&amqp_url()).await;
        let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;

        proxy.cut(CutMode::Refuse).await;
        app.wait_metric(CONNECTED, WAIT, |v| v == 0.0).await;
        let mut bytes = 0;
        for n in 0..3 {
            let body = event_body("WHEF_SESSION_CREATED", "s-out", "r-out", n);
            bytes += body.len();
            assert_eq!(app.post_json(&body).await.code, 200);
        }
        assert_eq!(app.metric(SPOOL_EVENTS).await, 3.0, "the spool holds 3");
        let spooled = app.metric(SPOOL_BYTES).await;
        assert!(
            spooled >= bytes as f64,
            "spool_bytes {spooled} below the {bytes} bytes of the 3 bodies"
        );
        assert_eq!(app.metric(RECONNECTS).await, 0.0, "no connection yet");

        proxy.restore();
        app.wait_metric(CONNECTED, WAIT, |v| v == 1.0).await;
        assert_eq!(app.metric(RECONNECTS).await, 1.0, "one reconnect");
        take(&mut consumer, 3, WAIT).await;
        app.wait_metric(SPOOL_EVENTS, WAIT, |v| v == 0.0).await;
        assert_eq!(app.metric(SPOOL_BYTES).await, 0.0, "the spool is empty");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn refusals_are_counted_by_reason() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |_| {}).await;
        assert_eq!(app.post_json("{").await.code, 400);
        assert_eq!(app.post_json("[1").await.code, 400);
        assert_eq!(app.post_json("[]").await.code, 422);
        let text = event_body("WHEF_SESSION_CREATED", "s-r", "r", 1);
        assert_eq!(app.post(text, Some("text/plain")).await.code, 415);
        let got = app.client.get(app.url()).send().await.expect("GET");
        assert_eq!(got.status().as_u16(), 405);
        let elsewhere = format!("http://{}/elsewhere", app.http);
        let got = app.client.post(elsewhere).send().await.expect("POST");
        assert_eq!(got.status().as_u16(), 404);

        let metrics = app.metrics().await;
        let rejected = |reason: &str| {
            series_value(
                &metrics,
                &format!("cellosign_bridge_events_rejected_total{{reason=\"{reason}\"}}"),
            )
        };
        assert_eq!(rejected("malformed_json"), Some(2.0), "{metrics}");
        assert_eq!(rejected("not_object"), Some(1.0), "{metrics}");
        assert_eq!(rejected("content_type"), Some(1.0), "{metrics}");
        assert_eq!(rejected("method"), Some(1.0), "{metrics}");
        assert_eq!(rejected("not_found"), Some(1.0), "{metrics}");
        assert_eq!(
            metric_sum(&metrics, "cellosign_bridge_events_rejected_total"),
            6.0,
            "each refusal counted once, under one reason:\n{metrics}"
        );
        assert_eq!(
            metric_sum(&metrics, "cellosign_bridge_events_accepted_total"),
            0.0
        );
        app.stop().await;
    })
    .await;
}
