//! Archive webhook figures (SPEC 9), run: `cargo bench --bench archive`.
//!
//! The bridge is the real binary, built with the bench (release) profile, run as a
//! child process, so that its resident memory is its own and not the load client's:
//!
//! 1. One 5 MB and one 20 MB archive: the answer latency to "0", and the bridge's
//!    peak RSS from the request until the archive has been published.
//! 2. Eight 50 MB archives posted at once: their answers and the bridge's peak RSS
//!    until all accepted ones are published, with `http.archive_max_in_flight` 4
//!    (the default: four get 429) and 8.
//!
//! Each in two setups: the shipped limits with a claim-check store (`file://` in a
//! temporary directory; 20 and 50 MB are over the 16 MiB `amqp.max_message_bytes`,
//! so they are stored and a small document is published), and without a store with
//! `amqp.max_message_bytes` raised to 64 MiB (the body itself is spooled and
//! published). Peak RSS is `VmHWM`, reset through `/proc/<pid>/clear_refs` before
//! each figure. Needs RabbitMQ at `AMQP_ADDR` (default the local one); declares a unique
//! exchange and deletes it, with its unrouted queue, afterwards.

#[allow(dead_code)]
#[path = "../tests/support/bridge_process.rs"]
mod bridge_process;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bridge_process::{BridgeProcess, reset_peak, status_mib};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};

const TOKEN: &str = "bench-archive-token";

fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// An archive of about `bytes` bytes: two sessions of `reference`, the rest a
/// signed PDF inline as base64.
fn archive(id: &str, reference: &str, bytes: usize) -> String {
    format!(
        r#"{{"event":{{"type":"WHP_ARCHIVE","timestamp":"2025-01-27T14:02:11.105934"}},"session":[{{"id":"{id}","reference":"{reference}","transaction_number":1,"recipient":{{"id":1,"name":"client"}}}},{{"id":"{id}-2","reference":"{reference}","transaction_number":2}}],"documents":[{{"name":"signed.pdf","content_type":"application/pdf","content":"{}"}}]}}"#,
        "A".repeat(bytes.saturating_sub(400))
    )
}

/// Waits until the bridge's spool is empty: everything accepted was published.
async fn drained(client: &reqwest::Client, bridge: &BridgeProcess) {
    let url = format!("http://{}/readyz", bridge.admin);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(&url).send().await
            && let Ok(v) = r.json::<serde_json::Value>().await
            && v["spool"]["events"] == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("(the spool did not drain within 120 s)");
}

/// Starts the bridge binary on its own spool and exchange.
/// Where a large body goes: to a claim-check store (the shipped 16 MiB message
/// limit), or inline into the spool and the message (the limit raised to 64 MiB).
#[derive(Clone, Copy)]
enum Setup {
    ClaimCheck,
    Inline,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::ClaimCheck => "claim check (file://, shipped limits)",
            Setup::Inline => "inline (max_message_bytes 64 MiB)",
        }
    }
}

fn start(spool: &std::path::Path, exchange: &str, in_flight: usize, setup: Setup) -> BridgeProcess {
    let in_flight = in_flight.to_string();
    let mut env = vec![
        ("BRIDGE_HTTP__ARCHIVE_MAX_IN_FLIGHT", in_flight),
        ("BRIDGE_HTTP__BODY_READ_TIMEOUT_MS", "60000".to_owned()),
    ];
    match setup {
        Setup::ClaimCheck => env.push((
            "BRIDGE_ARCHIVE__STORE_URL",
            format!("file://{}", spool.join("claims").display()),
        )),
        Setup::Inline => env.push(("BRIDGE_AMQP__MAX_MESSAGE_BYTES", "67108864".to_owned())),
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    BridgeProcess::start(spool, &amqp_url(), exchange, TOKEN, &env)
}

/// Posts `body` to the archive path: the HTTP code (0: no answer, the connection
/// failed), the reason of a refusal, and the time to the answer.
async fn post(
    client: &reqwest::Client,
    bridge: &BridgeProcess,
    body: String,
) -> (u16, String, Duration) {
    let url = format!(
        "http://{}/webhooks/cellosign/archive?token={TOKEN}",
        bridge.http
    );
    let started = Instant::now();
    let (code, reason) = match client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => {
            let code = r.status().as_u16();
            let v = r.json::<serde_json::Value>().await.unwrap_or_default();
            (code, v["errordesc"].as_str().unwrap_or_default().to_owned())
        }
        Err(e) => (0, e.to_string()),
    };
    (code, reason, started.elapsed())
}

/// One archive of each size, one after the other: latency to "0" and peak RSS.
async fn single(client: &reqwest::Client, exchange: &str, setup: Setup) {
    let spool = tempfile::tempdir().expect("tempdir");
    let bridge = start(spool.path(), exchange, 4, setup);
    // Warm up the broker link and the connection.
    post(client, &bridge, archive("warm", "ref-bench", 1000)).await;
    drained(client, &bridge).await;
    for mb in [5, 20] {
        let body = archive(&format!("single-{mb}"), "ref-bench", mb * 1_000_000);
        let before = reset_peak(bridge.pid());
        let (code, _, latency) = post(client, &bridge, body).await;
        drained(client, &bridge).await;
        println!(
            "{}: archive of {mb} MB: HTTP {code} in {:.1} ms; bridge peak RSS {:.0} MiB ({before:.0} MiB before)",
            setup.name(),
            latency.as_secs_f64() * 1e3,
            status_mib(bridge.pid(), "VmHWM"),
        );
    }
}

/// Eight 50 MB archives posted at once.
async fn eight_at_once(client: &reqwest::Client, exchange: &str, in_flight: usize, setup: Setup) {
    let spool = tempfile::tempdir().expect("tempdir");
    let bridge = start(spool.path(), exchange, in_flight, setup);
    post(client, &bridge, archive("warm", "ref-bench", 1000)).await;
    drained(client, &bridge).await;
    let bodies: Vec<String> = (0..8)
        .map(|n| {
            archive(
                &format!("eight-{in_flight}-{n}"),
                &format!("ref-{n}"),
                50 * 1_000_000,
            )
        })
        .collect();
    let before = reset_peak(bridge.pid());
    let started = Instant::now();
    let answers =
        futures_util::future::join_all(bodies.into_iter().map(|b| post(client, &bridge, b))).await;
    let answered = started.elapsed();
    drained(client, &bridge).await;
    let mut codes = BTreeMap::new();
    for (code, reason, _) in &answers {
        *codes.entry(format!("{code} {reason}")).or_insert(0) += 1;
    }
    println!(
        "{}: 8 archives of 50 MB at once, archive_max_in_flight {in_flight}: answers {codes:?} within {:.1} s; bridge peak RSS {:.0} MiB ({before:.0} MiB before)",
        setup.name(),
        answered.as_secs_f64(),
        status_mib(bridge.pid(), "VmHWM"),
    );
}

#[tokio::main]
async fn main() {
    let exchange = format!("bench.archive.{}", std::process::id());
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    for setup in [Setup::ClaimCheck, Setup::Inline] {
        single(&client, &exchange, setup).await;
        for in_flight in [4, 8] {
            eight_at_once(&client, &exchange, in_flight, setup).await;
        }
    }
    // Remove what the bridges declared (the unrouted queue holds every archive).
    if let Ok(c) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await
        && let Ok(ch) = c.create_channel().await
    {
        let unrouted = format!("{exchange}.unrouted");
        let _ = ch
            .queue_delete(unrouted.as_str().into(), QueueDeleteOptions::default())
            .await;
        for name in [exchange.as_str(), unrouted.as_str()] {
            let _ = ch
                .exchange_delete(name.into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
}
