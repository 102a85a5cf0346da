//! SPEC 6 "Connections": silent, idle and surplus connections are closed, a request
//! in progress never is, and running out of descriptors neither stops nor spins the
//! accept loop. Real sockets against the real application (and the real binary).

mod common;
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellosign_bridge::AckMode;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::bridge_process::{BridgeProcess, cpu_time_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client half of the HTTP/2 connection preface, then an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Reads (and discards) until the peer closes; how long that took, or `None`
/// if the connection is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    let read_to_close = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_close)
        .await
        .ok()
        .map(|()| start.elapsed())
}

/// Asserts that `conn`, idle since `since` under a 1500 ms idle timeout, is still
/// open a second in and closed by the timer, before `latest`; `what` names it.
async fn assert_closed_by_the_idle_timer(
    conn: &mut TcpStream,
    since: Instant,
    latest: Duration,
    what: &str,
) {
    let early = closed_within(conn, Duration::from_millis(1000)).await;
    assert_eq!(early, None, "{what}: closed before idle_timeout (1500 ms)");
    let late = closed_within(conn, Duration::from_secs(5)).await;
    assert!(late.is_some(), "{what}: still open after 6 s");
    let took = since.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < latest,
        "{what}: closed after {took:?}, idle_timeout is 1500 ms"
    );
}

/// A webhook POST as raw HTTP/1.1 bytes (keep-alive).
fn raw_post(body: &str) -> String {
    format!(
        "POST /webhooks/cellosign HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Reads one HTTP/1.1 response (head and Content-Length body); returns its status code.
async fn read_response(stream: &mut TcpStream) -> u16 {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    let code: u16 = head[9..12].parse().expect("status code");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("content-length"))
        .unwrap_or(0);
    while got.len() < head_end + length {
        let n = stream.read(&mut buf).await.expect("read body");
        assert!(n > 0, "closed inside the body");
        got.extend_from_slice(&buf[..n]);
    }
    code
}

/// An HTTP/2 (prior knowledge) client connection; the task ends when the connection does.
async fn h2_connect(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, Infallible>,
    >,
    tokio::task::JoinHandle<Instant>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    (send, ended)
}

/// An HTTP/2 webhook POST with `body`.
fn h2_post(
    addr: SocketAddr,
    body: http_body_util::combinators::BoxBody<Bytes, Infallible>,
) -> hyper::Request<http_body_util::combinators::BoxBody<Bytes, Infallible>> {
    hyper::Request::post(format!("http://{addr}/webhooks/cellosign"))
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.http.header_read_timeout_ms = 300;
            s.http.idle_timeout_ms = 5000;
        })
        .await;
        let mut silent = TcpStream::connect(app.http).await.unwrap();
        let took = closed_within(&mut silent, Duration::from_secs(5)).await;
        let took = took.expect("a connection that sends nothing is still open after 5 s");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_millis(1800),
            "closed after {took:?}, header_read_timeout is 300 ms"
        );
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn only_the_http2_preface_is_closed_after_the_idle_timeout() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.http.header_read_timeout_ms = 300;
            s.http.idle_timeout_ms = 1500;
        })
        .await;
        let mut preface = TcpStream::connect(app.http).await.unwrap();
        let start = Instant::now();
        preface.write_all(H2_PREFACE).await.unwrap();
        let what = "a connection with only the HTTP/2 preface";
        assert_closed_by_the_idle_timer(&mut preface, start, Duration::from_millis(4000), what)
            .await;
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn http1_keep_alive_is_closed_after_the_idle_timeout_not_the_header_timeout() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.http.header_read_timeout_ms = 300;
            s.http.idle_timeout_ms = 1500;
        })
        .await;
        let mut conn = TcpStream::connect(app.http).await.unwrap();
        let body = event_body("WHEF_SESSION_CREATED", "ka", "r1", 1);
        conn.write_all(raw_post(&body).as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut conn).await, 200);
        // Idle longer than the header timeout: still open, and still usable.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let body = event_body("WHEF_SESSION_CREATED", "ka", "r1", 2);
        conn.write_all(raw_post(&body).as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut conn).await, 200);
        let answered = Instant::now();
        let what = "an idle keep-alive connection";
        assert_closed_by_the_idle_timer(&mut conn, answered, Duration::from_millis(3500), what)
            .await;
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn http2_with_no_open_stream_is_closed_after_the_idle_timeout() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.http.header_read_timeout_ms = 300;
            s.http.idle_timeout_ms = 1500;
        })
        .await;
        let (mut send, ended) = h2_connect(app.http).await;
        let body = event_body("WHEF_SESSION_CREATED", "h2", "r1", 1);
        let r = send
            .send_request(h2_post(app.http, Full::new(Bytes::from(body)).boxed()))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let _ = r.into_body().collect().await;
        let answered = Instant::now();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(
            !ended.is_finished(),
            "an HTTP/2 connection was closed before idle_timeout (1500 ms)"
        );
        let ended = tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("an HTTP/2 connection with no open stream is still open after 6 s")
            .unwrap();
        let took = ended - answered;
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_millis(3500),
            "closed {took:?} after the last answer, idle_timeout is 1500 ms"
        );
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_request_in_progress_is_never_cut_by_the_idle_timer() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.http.header_read_timeout_ms = 300;
            s.http.idle_timeout_ms = 400;
            s.http.body_read_timeout_ms = 10_000;
        })
        .await;
        // HTTP/1: the body trickles in for about 2 s, well past both timeouts.
        let body = event_body("WHEF_SESSION_CREATED", "slow", "r1", 1);
        let request = raw_post(&body);
        let (head, body_bytes) = request.split_at(request.len() - body.len());
        let mut conn = TcpStream::connect(app.http).await.unwrap();
        conn.write_all(head.as_bytes()).await.unwrap();
        let chunks: Vec<&[u8]> = body_bytes.as_bytes().chunks(body.len() / 8 + 1).collect();
        for chunk in &chunks {
            tokio::time::sleep(Duration::from_millis(250)).await;
            conn.write_all(chunk).await.unwrap();
        }
        assert_eq!(read_response(&mut conn).await, 200, "HTTP/1 trickled body");

        // HTTP/2: the same, on a stream.
        let (mut send, _ended) = h2_connect(app.http).await;
        let body = event_body("WHEF_SESSION_CREATED", "slow", "r1", 2);
        let parts: Vec<Bytes> = body
            .as_bytes()
            .chunks(body.len() / 8 + 1)
            .map(Bytes::copy_from_slice)
            .collect();
        let stream = futures_util::stream::unfold(parts.into_iter(), |mut parts| async move {
            let part = parts.next()?;
            tokio::time::sleep(Duration::from_millis(250)).await;
            Some((Ok::<_, Infallible>(Frame::data(part)), parts))
        });
        let r = send
            .send_request(h2_post(app.http, StreamBody::new(stream).boxed()))
            .await
            .expect("HTTP/2 stream answered");
        assert_eq!(r.status(), 200, "HTTP/2 trickled body");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn past_max_connections_new_ones_are_closed_at_once() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |s| {
            s.http.max_connections = 4;
            s.http.header_read_timeout_ms = 10_000;
            s.http.idle_timeout_ms = 10_000;
        })
        .await;
        let mut open = Vec::new();
        for _ in 0..4 {
            open.push(TcpStream::connect(app.http).await.unwrap());
            // One at a time, so these four are the ones accepted first.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut fifth = TcpStream::connect(app.http).await.unwrap();
        let took = closed_within(&mut fifth, Duration::from_secs(1)).await;
        assert!(
            took.is_some(),
            "a fifth connection (max_connections = 4) is still open after 1 s"
        );
        for (n, conn) in open.iter_mut().enumerate() {
            let body = event_body("WHEF_SESSION_CREATED", "max", "r1", n as u64);
            conn.write_all(raw_post(&body).as_bytes()).await.unwrap();
            assert_eq!(read_response(conn).await, 200, "open connection {n}");
        }
        // Closing them frees their places.
        drop(open);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let a = app
            .post_json(&event_body("WHEF_SESSION_CREATED", "max", "r1", 9))
            .await;
        assert_eq!(a.code, 200);
        app.stop().await;
    })
    .await;
}

/// Lowers the child's open-files limits before it runs.
fn limit_nofile(cmd: &mut std::process::Command, soft: u64, hard: u64) {
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_bridge_neither_stops_nor_spins_and_recovers() {
    bounded(async {
    let spool = tempfile::tempdir().unwrap();
    let token = "fd-test-token";
    // No broker needed: spooled mode answers "0" once the event is on disk.
    let mut bridge = BridgeProcess::start_with(
        spool.path(),
        "amqp://guest:guest@127.0.0.1:1/%2f",
        &unique("fd"),
        token,
        &[("BRIDGE_HTTP__HEADER_READ_TIMEOUT_MS", "2500")],
        |cmd| limit_nofile(cmd, 32, 64),
    );
    let started = Instant::now();
    let mut problems = Vec::new();

    // Raised at start, soft to hard, and both logged (by the first listener to start:
    // the line may come just after "serving").
    let limits_now = || {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", bridge.pid())).unwrap();
        limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    let logged = || {
        bridge.log().lines().any(|l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("open-files"))
                    && v["soft"] == 64
                    && v["hard"] == 64
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while !(logged() && limits_now().starts_with("Max open files 64 64"))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !limits_now().starts_with("Max open files 64 64") {
        problems.push(format!(
            "soft limit not raised to the hard limit: {}",
            limits_now()
        ));
    }
    if !logged() {
        problems.push("no log line with the open-files limits (soft and hard)".into());
    }

    // Far more silent connections than descriptors: the kernel backlog takes the rest.
    let mut silent = Vec::new();
    for _ in 0..150 {
        match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(bridge.http)).await {
            Ok(Ok(s)) => silent.push(s),
            _ => break,
        }
    }
    assert!(
        silent.len() >= 100,
        "only {} connections opened",
        silent.len()
    );
    let opened = Instant::now();

    // Exhausted: the accept loop waits, it does not spin.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = cpu_time_of(bridge.pid());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_time_of(bridge.pid()) - before;
    if cpu >= Duration::from_millis(300) {
        problems.push(format!("{cpu:?} of CPU in 2 s while out of descriptors"));
    }
    if bridge.child.try_wait().ok().flatten().is_some() {
        problems.push("the bridge exited while out of descriptors".into());
    }

    // The header timeout frees descriptors by itself.
    let watchers: Vec<_> = silent
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                closed_within(&mut s, Duration::from_secs(6))
                    .await
                    .is_some()
            })
        })
        .collect();
    let mut closed = 0;
    for w in watchers {
        closed += usize::from(w.await.unwrap());
    }
    if closed == 0 {
        problems.push(format!(
            "no silent connection closed by the bridge within {:?}",
            opened.elapsed()
        ));
    }

    // Answers again once descriptors are free (the test's sockets are all closed now).
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let posting = Instant::now();
    let posted = client
        .post(bridge.url(token))
        .header("content-type", "application/json")
        .body(event_body("WHEF_SESSION_CREATED", "fd", "r1", 1))
        .send()
        .await;
    match posted {
        Ok(r) if r.status() == 200 => {}
        other => problems.push(format!(
            "webhook after the flood: {:?} after {:?}",
            other.map(|r| r.status()),
            posting.elapsed()
        )),
    }
    // Logged, but not on every failed accept.
    let warnings = bridge.log().matches("accept failed").count();
    let seconds = started.elapsed().as_secs() as usize;
    if warnings == 0 || warnings > seconds + 2 {
        problems.push(format!(
            "{warnings} \"accept failed\" warnings in {seconds} s (expected some, at most one a second)"
        ));
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\nbridge log:\n{}",
        bridge.log()
    );
    })
    .await;
}
