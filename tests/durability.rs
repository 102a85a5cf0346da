//! Durability under concurrency and storage faults (SPEC 6): concurrent duplicates,
//! a full disk, an append that outlives its deadline, and a commit reported failed.
//! Real HTTP and a real RabbitMQ; a real full disk (a small tmpfs); fault points in a
//! child bridge only for what a real disk cannot do on demand (a stall, a lost commit).

mod common;
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellosign_bridge::AckMode;
use common::*;
use lapin::Consumer;
use support::bridge_process::BridgeProcess;

const TYPE: &str = "WHEF_SESSION_CREATED";

/// The ids of what arrives until nothing has for `quiet` (acking each).
async fn drain(consumer: &mut Consumer, quiet: Duration) -> Vec<String> {
    let mut ids = Vec::new();
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(quiet, futures_util::StreamExt::next(consumer)).await
    {
        let _ = d.ack(Default::default()).await;
        ids.push(id_of(&d));
    }
    ids
}

/// Declares `exchange` as the bridge would and subscribes an exclusive queue bound with `#`,
/// so every event the bridge publishes is seen from the first one on.
async fn subscribe_all(exchange: &str) -> (Broker, Consumer) {
    let broker = Broker::connect(&amqp_url()).await;
    broker.declare_exchange(exchange).await;
    let consumer = broker.subscribe(exchange, "#").await;
    (broker, consumer)
}

/// Posts `copies` identical copies of each event at the same moment (behind a barrier);
/// returns every answer with the transaction number it was for.
async fn post_at_once(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    events: u64,
    copies: usize,
) -> Vec<(u64, Answer)> {
    let barrier = Arc::new(tokio::sync::Barrier::new(events as usize * copies));
    let mut tasks = Vec::new();
    for n in 0..events {
        for _ in 0..copies {
            let (client, url, barrier) = (client.clone(), url.to_string(), barrier.clone());
            let body = event_body(TYPE, session, "r1", n);
            tasks.push(tokio::spawn(async move {
                let request = client
                    .post(url)
                    .header("content-type", "application/json")
                    .body(body);
                barrier.wait().await;
                (n, answer(request.send().await.expect("request sent")).await)
            }));
        }
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("poster"));
    }
    out
}

/// An HTTP client that opens as many connections as asked (one per concurrent post).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_are_stored_and_published_once() {
    bounded_within(Duration::from_secs(300), async {
        let exchange = unique("dup");
        let (_broker, mut consumer) = subscribe_all(&exchange).await;
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.exchange = exchange.clone();
            s.http.max_in_flight = 1000;
        })
        .await;
        app.wait_ready(true, Duration::from_secs(30)).await;
        let answers = post_at_once(&client(), &app.url(), "dup", 10, 24).await;
        assert_eq!(answers.len(), 240);
        for (n, a) in &answers {
            assert_eq!((a.code, a.status.as_str()), (200, "0"), "event {n}: {a:?}");
        }
        let got = take(&mut consumer, 10, Duration::from_secs(20)).await;
        let ids: BTreeSet<String> = got.iter().map(id_of).collect();
        let want: BTreeSet<String> = (0..10).map(|n| message_id(TYPE, "dup", n)).collect();
        assert_eq!(ids, want, "each event once");
        assert_quiet(&mut consumer, Duration::from_millis(1500)).await;
        let (_, metrics) = app.admin_get("/metrics").await;
        assert!(
            metrics.contains("cellosign_bridge_dedup_hits_total 230"),
            "230 copies answered by dedup:\n{metrics}"
        );
        app.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_all_get_503_when_the_one_store_fails() {
    bounded_within(Duration::from_secs(300), async {
        let exchange = unique("dupfull");
        let (_broker, mut consumer) = subscribe_all(&exchange).await;
        // Smaller than one envelope: every append is refused as full.
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.exchange = exchange.clone();
            s.http.max_in_flight = 1000;
            s.spool.max_bytes = 64;
        })
        .await;
        let answers = post_at_once(&client(), &app.url(), "dupfull", 4, 24).await;
        for (n, a) in &answers {
            assert_eq!(a.code, 503, "event {n}: {a:?}");
            assert!(a.headers.contains_key("retry-after"), "{a:?}");
        }
        assert_quiet(&mut consumer, Duration::from_millis(1000)).await;
        app.stop().await;
    })
    .await;
}

/// Unmounts (lazily, so an open file cannot keep it) when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `size` (e.g. "4m") on `mnt`: the only honest way to fill a disk.
fn mount_tmpfs(mnt: &Path, size: &str) -> Unmount {
    std::fs::create_dir_all(mnt).expect("mount point");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // The tests run as root here and in CI: failing to mount is a failure, not a skip.
    assert!(mounted, "needs `mount -t tmpfs` (run the tests as root)");
    Unmount(mnt.to_path_buf())
}

/// Writes `path` until the file system refuses more.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 4 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_recovers_by_itself_after_a_full_disk() {
    bounded_within(Duration::from_secs(300), async {
        let base = tempfile::tempdir().expect("temp dir");
        let mnt = base.path().join("mnt");
        let _unmount = mount_tmpfs(&mnt, "8m");
        let exchange = unique("disk");
        let (_broker, mut consumer) = subscribe_all(&exchange).await;
        let mut settings = test_settings(AckMode::Spooled, &mnt.join("spool"));
        settings.amqp.exchange = exchange.clone();
        let app = spawn_with(settings, tempfile::tempdir().expect("temp dir")).await;
        app.wait_ready(true, Duration::from_secs(30)).await;

        let mut accepted = Vec::new();
        for n in 0..5 {
            let a = app.post_json(&event_body(TYPE, "disk", "r1", n)).await;
            assert_eq!(a.code, 200, "{a:?}");
            accepted.push(message_id(TYPE, "disk", n));
        }
        let filler = mnt.join("filler");
        fill(&filler);
        let mut refused = None;
        for n in 5..2000 {
            let a = app.post_json(&event_body(TYPE, "disk", "r1", n)).await;
            match a.code {
                200 => accepted.push(message_id(TYPE, "disk", n)),
                503 => {
                    assert!(a.headers.contains_key("retry-after"), "{a:?}");
                    refused = Some(message_id(TYPE, "disk", n));
                    break;
                }
                _ => panic!("{a:?}"),
            }
        }
        let refused = refused.expect("no 503 on a full disk");
        let (code, body) = app.admin_get("/readyz").await;
        assert_eq!(code, 503, "not ready on a full disk: {body}");
        // Still full a while later: readiness must not come back while nothing fits.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let (code, body) = app.admin_get("/readyz").await;
        assert_eq!(code, 503, "still not ready while the disk is full: {body}");

        // Room again, and no webhook sent: readiness must notice by itself.
        std::fs::remove_file(&filler).expect("remove filler");
        let freed = Instant::now();
        let back = loop {
            let (code, body) = app.admin_get("/readyz").await;
            if code == 200 {
                break freed.elapsed();
            }
            assert!(
                freed.elapsed() < Duration::from_secs(6),
                "not ready {:?} after the disk had room again (no request sent): {body}",
                freed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!("ready again {back:?} after the disk had room");
        // SPEC: within 2 s; slack for a loaded CI machine.
        assert!(back < Duration::from_secs(4), "ready only after {back:?}");

        let a = app.post_json(&event_body(TYPE, "disk", "r1", 9999)).await;
        assert_eq!(a.code, 200, "{a:?}");
        accepted.push(message_id(TYPE, "disk", 9999));
        // A failed write may make the forwarder publish again from the oldest: duplicates are
        // allowed after a failure (SPEC 3), gaps and inversions are not.
        let got = take(&mut consumer, accepted.len(), Duration::from_secs(30)).await;
        let mut ids: Vec<String> = got.iter().map(id_of).collect();
        ids.extend(drain(&mut consumer, Duration::from_millis(1500)).await);
        let mut first = Vec::new();
        for id in &ids {
            if !first.contains(id) {
                first.push(id.clone());
            }
        }
        assert_eq!(first, accepted, "every event answered \"0\", in order");
        assert!(!ids.contains(&refused), "the 503'd event was published");
        eprintln!("{} deliveries for {} events", ids.len(), accepted.len());
        app.stop().await;
    })
    .await;
}

/// Polls the child's `/readyz` until 200.
async fn wait_child_ready(client: &reqwest::Client, bridge: &BridgeProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .get(format!("http://{}/readyz", bridge.admin))
            .send()
            .await;
        if let Ok(r) = r {
            let ok = r.status() == 200;
            let body = r.text().await.unwrap_or_default();
            if ok && body.contains("\"connected\":true") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "bridge not ready; log:\n{}",
            bridge.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs one event to a child bridge.
async fn post_child(client: &reqwest::Client, url: &str, body: String) -> Answer {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent");
    answer(r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_past_its_deadline_answers_503_and_is_forwarded_once() {
    bounded_within(Duration::from_secs(300), async {
        let spool = tempfile::tempdir().expect("temp dir");
        let exchange = unique("stall");
        let token = "stall-test-token";
        let (broker, mut consumer) = subscribe_all(&exchange).await;
        // Every commit takes 1.5 s; an append may take 300 ms.
        let bridge = BridgeProcess::start(
            spool.path(),
            &amqp_url(),
            &exchange,
            token,
            &[
                ("CELLOSIGN_BRIDGE_FAULTS", "spool.commit_stall=1500"),
                ("BRIDGE_SPOOL__APPEND_TIMEOUT_MS", "300"),
            ],
        );
        let client = client();
        wait_child_ready(&client, &bridge).await;
        let url = bridge.url(token);
        let body = event_body(TYPE, "stall", "r1", 1);
        let started = Instant::now();
        let a = post_child(&client, &url, body.clone()).await;
        let took = started.elapsed();
        assert_eq!(a.code, 503, "a stalled append is refused: {a:?}");
        assert!(a.headers.contains_key("retry-after"), "{a:?}");
        assert!(
            took < Duration::from_millis(1100),
            "503 after {took:?}, expected about spool.append_timeout_ms (300 ms)"
        );
        // The stall ends; the append lands; the sender's retry is a duplicate.
        tokio::time::sleep(Duration::from_millis(1600).saturating_sub(started.elapsed())).await;
        let mut retries = 0;
        loop {
            let a = post_child(&client, &url, body.clone()).await;
            if a.code == 200 {
                break;
            }
            assert_eq!(a.code, 503, "{a:?}");
            retries += 1;
            assert!(retries < 20, "retry never answered \"0\": {a:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let got = take(&mut consumer, 1, Duration::from_secs(20)).await;
        assert_eq!(id_of(&got[0]), message_id(TYPE, "stall", 1));
        assert_quiet(&mut consumer, Duration::from_millis(2000)).await;
        drop(bridge);
        broker.cleanup(&exchange).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_whose_commit_failed_are_never_published() {
    bounded_within(Duration::from_secs(300), async {
        let spool = tempfile::tempdir().expect("temp dir");
        let exchange = unique("lost");
        let token = "lost-commit-token";
        let (broker, mut consumer) = subscribe_all(&exchange).await;
        // The first commit holding appends reaches the disk but reports failure; a short
        // stall per commit makes every copy posted at once wait on that one commit.
        let faults = [
            (
                "CELLOSIGN_BRIDGE_FAULTS",
                "spool.commit_fail_after_once,spool.commit_stall=400",
            ),
            ("BRIDGE_HTTP__MAX_IN_FLIGHT", "1000"),
        ];
        let mut bridge = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, token, &faults);
        let client = client();
        wait_child_ready(&client, &bridge).await;
        let url = bridge.url(token);

        // 3 events x 8 copies at once: one group commit, reported failed.
        let answers = post_at_once(&client, &url, "lost", 3, 8).await;
        for (n, a) in &answers {
            assert_eq!(a.code, 503, "event {n}: its commit failed: {a:?}");
        }
        // Later events are accepted and published, in order.
        let mut later = Vec::new();
        for n in 10..15 {
            let a = post_child(&client, &url, event_body(TYPE, "lost", "r1", n)).await;
            assert_eq!(a.code, 200, "{a:?}");
            later.push(message_id(TYPE, "lost", n));
        }
        let got = take(&mut consumer, later.len(), Duration::from_secs(20)).await;
        assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), later);
        assert_quiet(&mut consumer, Duration::from_millis(1500)).await;

        // A restart on the same spool does not bring them back either.
        bridge.signal("KILL");
        let _ = bridge.wait_exit(Duration::from_secs(10));
        drop(bridge);
        let bridge = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, token, &[]);
        wait_child_ready(&client, &bridge).await;
        // Events 10..15 may come again (their removal may not have been durable yet).
        let seen = drain(&mut consumer, Duration::from_millis(1500)).await;
        for n in 0..3 {
            assert!(
                !seen.contains(&message_id(TYPE, "lost", n)),
                "event {n} was answered 503 but published after a restart: {seen:?}"
            );
        }
        // The refused events can be sent again, and then they are published.
        let a = post_child(
            &client,
            &bridge.url(token),
            event_body(TYPE, "lost", "r1", 0),
        )
        .await;
        assert_eq!(a.code, 200, "{a:?}");
        let got = take(&mut consumer, 1, Duration::from_secs(20)).await;
        assert_eq!(id_of(&got[0]), message_id(TYPE, "lost", 0));
        drop(bridge);
        broker.cleanup(&exchange).await;
    })
    .await;
}
