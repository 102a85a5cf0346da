//! End-to-end numbers for the spooled path (run: `cargo bench --bench e2e`).
//!
//! 1. Answer latency and accepted/s: 64 concurrent keep-alive connections post
//!    events with varied references to the real bridge (spooled mode, real
//!    RabbitMQ), paced at 2 000 req/s in total, then unpaced.
//! 2. Drain: a spool of 100 000 events forwarded to the broker, against a plain
//!    lapin publish-with-confirms loop (same window, same messages) in the same run.
//!
//! 3. The bridge as its own process (the release binary, shipped config, spooled
//!    mode): open loop at 2 000 and 10 000 req/s and unpaced, each with latency
//!    from the due time (p50/p99/p99.9), the bridge's own CPU per event (from
//!    `/proc/<pid>/stat`) and its peak RSS (`VmHWM`, reset between runs), then its
//!    RSS at rest: the figures of cost per event and memory, without the load
//!    client's share.
//!
//! Step 1 runs with span export off and then on (`BENCH_TELEMETRY` = `both`,
//! the default, `off` or `on`): on, the bridge exports every span over OTLP to a
//! local sink started here that takes and discards them.
//!
//! Needs RabbitMQ at `AMQP_ADDR` (default the local one). Declares a unique
//! exchange and deletes it afterwards. Knobs: `BENCH_SECS` (default 10),
//! `BENCH_DRAIN_EVENTS` (default 100000), `BENCH_TELEMETRY`, `BENCH_RATES`
//! (default `2000,10000`), `BENCH_ONLY=latency|process|drain` (one part only).

#[allow(dead_code)]
#[path = "../tests/support/bridge_process.rs"]
mod bridge_process;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cellosign_bridge::Application;
use cellosign_bridge::Envelope;
use cellosign_bridge::Forwarder;
use cellosign_bridge::Link;
use cellosign_bridge::Metrics;
use cellosign_bridge::Spool;
use cellosign_bridge::TraceContext;
use cellosign_bridge::{AckMode, Settings, Sources};
use cellosign_bridge::{confirm_channel, send};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

const CONNECTIONS: usize = 64;
const PACED_RATE: f64 = 2000.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn body(n: u64) -> String {
    format!(
        r#"{{"event":{{"type":"WHEF_CLIENT_FORM_SUBMITTED","timestamp":"2025-01-26T08:49:33.{:06}"}},"session":{{"id":"s{n}","reference":"ref-{}","process_id":"7932390e-ee95-4888-ba64-9c7e6f2f5908","process_number":51,"transaction_number":{n},"recipient":{{"id":1,"name":"client"}},"labels":{{"CUSTOMER_TAG":"CUSTOMER_VALUE","REGION":"north"}}}},"client":{{"ip":"203.0.113.7","user_agent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"}}}}"#,
        n % 1_000_000,
        n % 997
    )
}

fn settings(exchange: &str, spool: &std::path::Path) -> Settings {
    let mut s = Settings::load(&Sources {
        env: Some(Default::default()),
        ..Sources::default()
    })
    .expect("defaults");
    s.http.listen = "127.0.0.1:0".parse().expect("addr");
    s.admin.listen = "127.0.0.1:0".parse().expect("addr");
    s.delivery.ack = AckMode::Spooled;
    s.spool.dir = spool.to_path_buf();
    s.amqp.urls = vec![amqp_url().into()];
    s.amqp.exchange = exchange.to_string();
    s.amqp.queues = Vec::new();
    s.events.dedup_window_s = 0;
    s.log.level = "warn".into();
    s
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Posts for `secs` from 64 connections; `rate` None = as fast as they can.
async fn load(url: &str, secs: u64, rate: Option<f64>, offset: u64) -> (Vec<Duration>, usize, f64) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .no_proxy()
                .build()
                .expect("client");
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            // Open loop: requests are due on a fixed schedule (a late one does not
            // push the next back), and latency counts from the due time.
            let mut tick = rate.map(|r| {
                let mut i = tokio::time::interval(Duration::from_secs_f64(CONNECTIONS as f64 / r));
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                i
            });
            let mut n = offset + c as u64 * 10_000_000;
            while Instant::now() < deadline {
                let t0 = match tick.as_mut() {
                    Some(t) => t.tick().await.into_std(),
                    None => Instant::now(),
                };
                n += 1;
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body(n))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        latencies.push(t0.elapsed());
                    }
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let mut all = Vec::new();
    let mut failures = 0;
    for t in tasks {
        let (l, f) = t.await.expect("task");
        all.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    (all, failures, elapsed)
}

/// CPU time (user + system) of this process so far, from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Peak resident memory of this process, MiB (VmHWM).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Runs a load and prints its figures; CPU and memory are the whole process
/// (bridge and load client share it), so they bound the bridge's own from above.
async fn measured(name: &str, url: &str, secs: u64, rate: Option<f64>, offset: u64) {
    let cpu = cpu_time();
    let (latencies, failures, elapsed) = load(url, secs, rate, offset).await;
    let cpu = cpu_time() - cpu;
    println!(
        "{name}: {} accepted in {elapsed:.1}s = {:.0}/s, {failures} not accepted; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; process CPU {:.0} us/event, peak RSS {:.0} MiB",
        latencies.len(),
        latencies.len() as f64 / elapsed,
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e6 / latencies.len().max(1) as f64,
        peak_rss_mib(),
    );
}

/// An OTLP/HTTP sink on 127.0.0.1:0 that reads and discards every request and
/// answers 200; counts requests and bytes. Stops with the runtime.
async fn otlp_sink() -> (std::net::SocketAddr, Arc<[AtomicU64; 2]>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let counts: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let seen = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let body = req.into_body().collect().await.map(|c| c.to_bytes());
                            seen[0].fetch_add(1, Ordering::Relaxed);
                            seen[1]
                                .fetch_add(body.map_or(0, |b| b.len() as u64), Ordering::Relaxed);
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, counts)
}

/// What every event pays for its trace context with span export off: a new trace
/// (two random ids) and its `traceparent` header, timed alone over a million events.
fn trace_context_cost() {
    const N: u32 = 1_000_000;
    let started = Instant::now();
    let mut bytes = 0usize;
    for _ in 0..N {
        bytes += std::hint::black_box(TraceContext::fresh().traceparent()).len();
    }
    println!(
        "trace context without span export: {:.0} ns per event (new ids and the traceparent header; {bytes} bytes)",
        started.elapsed().as_secs_f64() * 1e9 / f64::from(N)
    );
}

async fn answer_latency(exchange: &str, telemetry: bool) {
    let spool = tempfile::tempdir().expect("tempdir");
    let mut s = settings(exchange, spool.path());
    let sink = if telemetry {
        let (addr, counts) = otlp_sink().await;
        s.telemetry.otlp_endpoint = format!("http://{addr}");
        Some(counts)
    } else {
        None
    };
    let spans = if telemetry {
        "spans exported"
    } else {
        "no span export"
    };
    let app = Application::build(s).await.expect("app");
    let url = format!("http://{}/webhooks/cellosign", app.http_addr());
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
    let secs = env_or("BENCH_SECS", 10u64);
    // Warm up connections and the broker link.
    load(&url, 1, Some(PACED_RATE), 0).await;
    measured(
        &format!("spooled, {spans}, {CONNECTIONS} connections, paced {PACED_RATE}/s"),
        &url,
        secs,
        Some(PACED_RATE),
        1,
    )
    .await;
    measured(
        &format!("spooled, {spans}, {CONNECTIONS} connections, unpaced"),
        &url,
        secs,
        None,
        2,
    )
    .await;
    // At rest: the spool has held events, the forwarder has drained them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu = cpu_time();
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "at rest after the load: {:.2}% of a core",
        (cpu_time() - cpu).as_secs_f64() / 5.0 * 100.0
    );
    stop.cancel();
    let _ = running.await;
    if let Some(counts) = sink {
        println!(
            "OTLP sink: {} export requests, {:.1} MiB of spans",
            counts[0].load(Ordering::Relaxed),
            counts[1].load(Ordering::Relaxed) as f64 / (1 << 20) as f64
        );
    }
}

fn envelope(n: u64) -> Envelope {
    envelope_of(n, 997)
}

/// Event `n`, its reference one of `references`.
fn envelope_of(n: u64, references: u64) -> Envelope {
    Envelope {
        routing_key: format!("ref-{}", n % references),
        message_id: format!(
            "s{n}:WHEF_CLIENT_FORM_SUBMITTED:2025-01-26T08:49:33.{:06}",
            n % 1_000_000
        ),
        event_type: "WHEF_CLIENT_FORM_SUBMITTED".into(),
        session_id: format!("s{n}"),
        reference: format!("ref-{}", n % references),
        received_at_ms: 1_737_881_373_626,
        body: Bytes::from(body(n)),
        claim_check: false,
        trace: Some(TraceContext::fresh()),
    }
}

/// Publishes `events` with confirms and a window of `window`, as simply as lapin allows.
async fn plain_lapin(connection: &Connection, exchange: &str, events: u64, window: usize) -> f64 {
    let channel = confirm_channel(connection).await.expect("channel");
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(window);
    for n in 0..events {
        if pending.len() == window {
            let confirm: lapin::PublisherConfirm = pending.pop_front().expect("pending");
            assert!(confirm.await.expect("confirm").is_ack());
        }
        pending.push_back(
            send(&channel, exchange, &envelope(n))
                .await
                .expect("publish"),
        );
    }
    for confirm in pending {
        assert!(confirm.await.expect("confirm").is_ack());
    }
    started.elapsed().as_secs_f64()
}

async fn drain(exchange: &str, events: u64, references: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = settings(exchange, dir.path());
    let spool = Spool::open(dir.path(), u64::MAX).expect("spool");
    let fill = Instant::now();
    let mut batch = Vec::new();
    for n in 0..events {
        let spool = spool.clone();
        batch.push(tokio::spawn(async move {
            spool.append(envelope_of(n, references).encode()).await
        }));
        if batch.len() == 512 {
            for t in batch.drain(..) {
                t.await.expect("task").expect("append");
            }
        }
    }
    for t in batch.drain(..) {
        t.await.expect("task").expect("append");
    }
    println!(
        "filled a spool with {events} events in {:.1}s",
        fill.elapsed().as_secs_f64()
    );

    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();
    let (link, link_task) = Link::start(s.amqp.clone(), metrics.clone(), stop.clone());
    let connection = link.connected().await;
    let started = Instant::now();
    let (forwarder, forwarding) = Forwarder::start(
        spool.clone(),
        link.clone(),
        &s.amqp,
        metrics,
        stop.child_token(),
    );
    while spool.stats().events > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let bridge = started.elapsed().as_secs_f64();
    forwarder.drain_until(tokio::time::Instant::now()).await;
    let _ = forwarding.await;
    stop.cancel();
    let _ = link_task.await;
    let _ = spool.shutdown().await;
    drop(connection);
    bridge
}

/// Part 3: the release binary as a child, so CPU and memory are the bridge's alone.
async fn process(exchange: &str) {
    let spool = tempfile::tempdir().expect("tempdir");
    let token = "bench-e2e-token";
    let log_level = if std::env::var("BENCH_REQUEST_LOG").is_ok_and(|v| v == "1") {
        "info"
    } else {
        "info,cellosign_bridge::request=warn"
    };
    let bridge = bridge_process::BridgeProcess::start(
        spool.path(),
        &amqp_url(),
        exchange,
        token,
        &[
            // Startup lines only: the per-request line would cost the pipe and this
            // process more than the bridge (`BENCH_REQUEST_LOG=1` keeps it).
            ("BRIDGE_LOG__LEVEL", log_level),
        ],
    );
    let pid = bridge.pid();
    let url = bridge.url(token);
    let secs = env_or("BENCH_SECS", 10u64);
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "bridge process at start: RSS {:.1} MiB (anonymous {:.1}, file {:.1})",
        bridge_process::status_mib(pid, "VmRSS"),
        bridge_process::status_mib(pid, "RssAnon"),
        bridge_process::status_mib(pid, "RssFile")
    );
    load(&url, 1, Some(PACED_RATE), 10).await;
    let rates: Vec<Option<f64>> = std::env::var("BENCH_RATES")
        .unwrap_or_else(|_| "2000,10000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .map(Some)
        .chain([None])
        .collect();
    println!(
        "| bridge process, {CONNECTIONS} connections | accepted/s | p50 | p99 | p99.9 | max | bridge CPU | CPU/event | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, rate) in rates.into_iter().enumerate() {
        // Let the previous run's spool drain and its connections settle first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = bridge_process::reset_peak(pid);
        let cpu = bridge_process::cpu_time_of(pid);
        let (latencies, failures, elapsed) = load(&url, secs, rate, 20 + i as u64).await;
        let cpu = bridge_process::cpu_time_of(pid) - cpu;
        let ms = |p| percentile(&latencies, p).as_secs_f64() * 1e3;
        println!(
            "| {} | {:.0}{} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} core | {:.0} us | {:.1} MiB |",
            rate.map_or("unpaced".to_string(), |r| format!("open loop {r:.0}/s")),
            latencies.len() as f64 / elapsed,
            if failures > 0 {
                format!(" ({failures} not accepted)")
            } else {
                String::new()
            },
            ms(0.50),
            ms(0.99),
            ms(0.999),
            latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            cpu.as_secs_f64() / elapsed,
            cpu.as_secs_f64() * 1e6 / latencies.len().max(1) as f64,
            bridge_process::status_mib(pid, "VmHWM"),
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let cpu = bridge_process::cpu_time_of(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "bridge process at rest after the load: RSS {:.1} MiB (anonymous {:.1}, file {:.1}), {:.2}% of a core",
        bridge_process::status_mib(pid, "VmRSS"),
        bridge_process::status_mib(pid, "RssAnon"),
        bridge_process::status_mib(pid, "RssFile"),
        (bridge_process::cpu_time_of(pid) - cpu).as_secs_f64() / 5.0 * 100.0
    );
}

#[tokio::main]
async fn main() {
    let exchange = format!("bench.e2e.{}", std::process::id());
    // One part only: `latency`, `process` or `drain`; all three without it.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only == name;
    if part("latency") {
        trace_context_cost();
        let telemetry = std::env::var("BENCH_TELEMETRY").unwrap_or_else(|_| "both".into());
        if telemetry != "on" {
            answer_latency(&exchange, false).await;
        }
        if telemetry != "off" {
            answer_latency(&exchange, true).await;
        }
    }
    if part("process") {
        process(&exchange).await;
    }
    if !part("drain") {
        cleanup(&exchange).await;
        return;
    }
    let events = env_or("BENCH_DRAIN_EVENTS", 100_000u64);
    let bridge = drain(&exchange, events, 997).await;
    let plain = {
        let s = settings(&exchange, std::path::Path::new("/nonexistent"));
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("connect");
        plain_lapin(&connection, &exchange, events, s.amqp.max_unconfirmed).await
    };
    println!(
        "drain of {events} events, 997 references: forwarder {bridge:.2}s = {:.0}/s; plain lapin loop {plain:.2}s = {:.0}/s; ratio {:.0}%",
        events as f64 / bridge,
        events as f64 / plain,
        100.0 * plain / bridge
    );
    let hot = env_or("BENCH_HOT_EVENTS", 5_000u64);
    let one = drain(&exchange, hot, 1).await;
    println!(
        "drain of {hot} events, one reference (one publish in flight at a time): {one:.2}s = {:.0}/s",
        hot as f64 / one
    );
    cleanup(&exchange).await;
}

/// Removes what the bench declared (the unrouted queue holds every message).
async fn cleanup(exchange: &str) {
    if let Ok(c) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await
        && let Ok(ch) = c.create_channel().await
    {
        let unrouted = format!("{exchange}.unrouted");
        let _ = ch
            .queue_purge(unrouted.as_str().into(), QueuePurgeOptions::default())
            .await;
        let _ = ch
            .queue_delete(unrouted.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
        let _ = ch
            .exchange_delete(unrouted.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}
