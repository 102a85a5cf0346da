//! SIGHUP reloads the configuration (SPEC 8 "Reload"), tested on the real binary:
//! tokens rotated under load without refusing a valid one, `events.accept`,
//! `allow_from` and `http.trusted_proxies` in force after a reload (for the token
//! URL too), a bad config refused with the running one kept, restart-only keys
//! named and not applied, and `log.level` changed live.

mod common;
mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use support::bridge_process::BridgeProcess;

const RELOADS: &str = "cellosign_bridge_config_reloads_total";
const FAILURES: &str = "cellosign_bridge_config_reload_failures_total";

/// Rewrites the test's config file (`--config`), as `BridgeProcess` first wrote it
/// plus `config`.
fn rewrite_config(spool: &Path, config: &str) {
    let file = spool.join("bridge-test.toml");
    std::fs::write(file, format!("[amqp]\nqueues = []\n{config}")).expect("rewrite config");
}

async fn metric(bridge: &BridgeProcess, series: &str) -> f64 {
    let text = http_client()
        .get(format!("http://{}/metrics", bridge.admin))
        .send()
        .await
        .expect("/metrics")
        .text()
        .await
        .expect("/metrics text");
    series_value(&text, series).unwrap_or(0.0)
}

/// Waits until `series` reaches `value`: how a test learns that a reload was done.
async fn wait_metric(bridge: &BridgeProcess, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = metric(bridge, series).await;
        if now >= value {
            assert_eq!(now, value, "{series} went past {value}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {now}, not {value}; log:\n{}",
            bridge.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The JSON log lines whose message contains `text`.
fn log_lines(bridge: &BridgeProcess, text: &str) -> Vec<serde_json::Value> {
    bridge
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

/// POSTs an event of `event_type` with `token` in the header; the HTTP code.
async fn post(
    bridge: &BridgeProcess,
    path: &str,
    token: &str,
    event_type: &str,
    forwarded_for: Option<&str>,
    n: u64,
) -> u16 {
    let mut request = http_client()
        .post(format!("http://{}{path}", bridge.http))
        .header("content-type", "application/json")
        .header("x-webhook-token", token)
        .body(event_body(event_type, "reload-session", "reload-ref", n));
    if let Some(address) = forwarded_for {
        request = request.header("x-forwarded-for", address);
    }
    request.send().await.expect("post").status().as_u16()
}

const PATH: &str = "/webhooks/cellosign";

async fn cleanup(exchange: &str) {
    Broker::connect(&amqp_url()).await.cleanup(exchange).await;
}

/// (1) Tokens rotated through `auth.tokens_file` while senders post without a
/// pause: old, then old + new, then new. Each sender uses a token valid when it
/// sends (it switches once the first reload is seen in `/metrics`), and none is
/// refused; after the last reload the old token gets 401, the new one 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_rotate_through_the_tokens_file_under_load() {
    bounded(async {
        const OLD: &str = "old-rotating-token";
        const NEW: &str = "new-rotating-token";
        const SENDERS: usize = 4;
        let spool = tempfile::tempdir().unwrap();
        let tokens = spool.path().join("tokens");
        std::fs::write(&tokens, format!("{OLD}\n")).unwrap();
        let exchange = unique("reload-rotate");
        let bridge = Arc::new(BridgeProcess::start(
            spool.path(),
            &amqp_url(),
            &exchange,
            "",
            &[("BRIDGE_AUTH__TOKENS_FILE", tokens.to_str().unwrap())],
        ));
        let switched = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let on_new: Arc<Vec<AtomicBool>> =
            Arc::new((0..SENDERS).map(|_| AtomicBool::new(false)).collect());
        let mut senders = Vec::new();
        for i in 0..SENDERS {
            let (bridge, switched, stop, sent, on_new) = (
                bridge.clone(),
                switched.clone(),
                stop.clone(),
                sent.clone(),
                on_new.clone(),
            );
            senders.push(tokio::spawn(async move {
                let client = http_client();
                let mut refused = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let token = if switched.load(Ordering::SeqCst) {
                        on_new[i].store(true, Ordering::SeqCst);
                        NEW
                    } else {
                        OLD
                    };
                    let r = client
                        .post(format!("http://{}{PATH}", bridge.http))
                        .header("content-type", "application/json")
                        .header("x-webhook-token", token)
                        .body(event_body(
                            "WHEF_SESSION_CREATED",
                            &format!("rotate-{i}"),
                            "rotate-ref",
                            n,
                        ))
                        .send()
                        .await
                        .expect("post");
                    let code = r.status().as_u16();
                    if code != 200 {
                        refused.push((token, n, code));
                    }
                    n += 1;
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                refused
            }));
        }
        let wait_sent = |more: u64| {
            let sent = sent.clone();
            async move {
                let target = sent.load(Ordering::SeqCst) + more;
                while sent.load(Ordering::SeqCst) < target {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        wait_sent(50).await;

        std::fs::write(&tokens, format!("{OLD}\n{NEW}\n")).unwrap();
        bridge.signal("HUP");
        wait_metric(&bridge, RELOADS, 1.0).await;
        switched.store(true, Ordering::SeqCst);
        // Every sender's requests with the old token are answered before it goes.
        while !on_new.iter().all(|s| s.load(Ordering::SeqCst)) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        wait_sent(50).await;

        std::fs::write(&tokens, format!("{NEW}\n")).unwrap();
        bridge.signal("HUP");
        wait_metric(&bridge, RELOADS, 2.0).await;
        wait_sent(50).await;
        stop.store(true, Ordering::SeqCst);
        for sender in senders {
            let refused = sender.await.unwrap();
            assert!(
                refused.is_empty(),
                "refused with a valid token: {refused:?}"
            );
        }
        assert_eq!(
            post(&bridge, PATH, OLD, "WHEF_SESSION_CREATED", None, 1).await,
            401
        );
        assert_eq!(
            post(&bridge, PATH, NEW, "WHEF_SESSION_CREATED", None, 2).await,
            200
        );
        assert_eq!(metric(&bridge, FAILURES).await, 0.0);
        let reloaded = log_lines(&bridge, "config reloaded");
        assert_eq!(reloaded.len(), 2, "{reloaded:?}");
        assert!(
            reloaded[0]["applied"]
                .as_str()
                .unwrap()
                .contains("auth.tokens"),
            "{reloaded:?}"
        );
        assert!(!bridge.log().contains(NEW), "a token reached the log");
        drop(bridge);
        cleanup(&exchange).await;
    })
    .await;
}

/// Writes a signing key and a client's password; the `[auth]` lines serving the
/// token URL to user `cs`.
fn token_url_config(dir: &Path) -> String {
    let keys = dir.join("token-keys");
    let password = dir.join("password");
    std::fs::write(&keys, "k".repeat(48)).unwrap();
    std::fs::write(&password, "cs-password").unwrap();
    format!(
        "token_keys_file = {:?}\n[[auth.clients]]\nusername = \"cs\"\npassword_file = {:?}\n",
        keys, password
    )
}

async fn fetch_token(bridge: &BridgeProcess, forwarded_for: &str) -> u16 {
    http_client()
        .post(format!("http://{}/webhooks/cellosign/token", bridge.http))
        .header("x-forwarded-for", forwarded_for)
        .json(&serde_json::json!({
            "grant_type": "password", "username": "cs", "password": "cs-password"
        }))
        .send()
        .await
        .expect("token request")
        .status()
        .as_u16()
}

/// (2) `events.accept`, `auth.allow_from` and `http.trusted_proxies` change on
/// reload: a type refused before is accepted (and counted) after; an address
/// allowed before is refused after, by the webhook and the token URL alike.
#[tokio::test]
async fn accepted_types_and_client_networks_follow_a_reload() {
    bounded(async {
        const TOKEN: &str = "reload-accept-token";
        let spool = tempfile::tempdir().unwrap();
        let exchange = unique("reload-accept");
        let auth = token_url_config(spool.path());
        let before = format!("[events]\naccept = [\"WHEF_SESSION_CREATED\"]\n[auth]\n{auth}");
        let bridge = BridgeProcess::start_configured(
            spool.path(),
            &amqp_url(),
            &exchange,
            TOKEN,
            &[],
            &before,
            |_| {},
        );
        let outsider = Some("192.0.2.9");
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_DELETED", None, 1).await,
            422
        );
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_CREATED", outsider, 2).await,
            200
        );
        assert_eq!(fetch_token(&bridge, "192.0.2.9").await, 200);

        rewrite_config(
            spool.path(),
            &format!(
                "[events]\naccept = [\"WHEF_SESSION_CREATED\", \"WHEF_SESSION_DELETED\"]\n\
                 [http]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
                 [auth]\nallow_from = [\"127.0.0.1/32\", \"10.0.0.0/8\"]\n{auth}"
            ),
        );
        bridge.signal("HUP");
        wait_metric(&bridge, RELOADS, 1.0).await;
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_DELETED", None, 3).await,
            200
        );
        assert_eq!(
            metric(
                &bridge,
                r#"cellosign_bridge_events_accepted_total{type="WHEF_SESSION_DELETED"}"#
            )
            .await,
            1.0
        );
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_CREATED", outsider, 4).await,
            403
        );
        // Behind the now trusted proxy, an allowed network.
        let inside = Some("10.1.2.3");
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_CREATED", inside, 5).await,
            200
        );
        assert_eq!(fetch_token(&bridge, "192.0.2.9").await, 403);
        assert_eq!(fetch_token(&bridge, "10.1.2.3").await, 200);
        let reloaded = log_lines(&bridge, "config reloaded");
        assert_eq!(
            reloaded[0]["applied"], "auth.allow_from,events.accept,http.trusted_proxies",
            "{reloaded:?}"
        );
        assert_eq!(reloaded[0]["restart_needed"], "", "{reloaded:?}");
        drop(bridge);
        cleanup(&exchange).await;
    })
    .await;
}

/// (3) A config that does not load is refused: one error line naming the key, the
/// failure counter up, the running tokens (and only they) still in force.
#[tokio::test]
async fn a_bad_config_is_refused_and_the_running_one_kept() {
    bounded(async {
        const TOKEN: &str = "reload-bad-token";
        let spool = tempfile::tempdir().unwrap();
        let tokens = spool.path().join("tokens");
        std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
        let exchange = unique("reload-bad");
        let bridge = BridgeProcess::start(
            spool.path(),
            &amqp_url(),
            &exchange,
            "",
            &[("BRIDGE_AUTH__TOKENS_FILE", tokens.to_str().unwrap())],
        );
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_CREATED", None, 1).await,
            200
        );

        // A tokens file that cannot be read.
        std::fs::remove_file(&tokens).unwrap();
        bridge.signal("HUP");
        wait_metric(&bridge, FAILURES, 1.0).await;
        let refused = log_lines(&bridge, "config reload refused");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0]["level"], "ERROR");
        let error = refused[0]["error"].as_str().unwrap();
        assert!(error.starts_with("auth.tokens_file: "), "{error}");
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_CREATED", None, 2).await,
            200
        );
        assert_eq!(
            post(&bridge, PATH, "wrong", "WHEF_SESSION_CREATED", None, 3).await,
            401
        );

        // A value that cannot work, in a restart-only key.
        std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
        rewrite_config(spool.path(), "[http]\nmax_in_flight = 0\n");
        bridge.signal("HUP");
        wait_metric(&bridge, FAILURES, 2.0).await;
        let refused = log_lines(&bridge, "config reload refused");
        assert_eq!(refused.len(), 2, "{refused:?}");
        let error = refused[1]["error"].as_str().unwrap();
        assert!(error.starts_with("http.max_in_flight: "), "{error}");
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_CREATED", None, 4).await,
            200
        );
        assert_eq!(
            post(&bridge, PATH, "wrong", "WHEF_SESSION_CREATED", None, 5).await,
            401
        );
        assert_eq!(metric(&bridge, RELOADS).await, 0.0);
        assert!(log_lines(&bridge, "config reloaded").is_empty());
        drop(bridge);
        cleanup(&exchange).await;
    })
    .await;
}

/// (4) Changed restart-only keys are each named in one warning, without their
/// values, and keep their running values: the webhook stays on its path.
#[tokio::test]
async fn restart_only_keys_are_named_and_not_applied() {
    bounded(async {
        const TOKEN: &str = "reload-restart-token";
        let spool = tempfile::tempdir().unwrap();
        let exchange = unique("reload-restart");
        let bridge = BridgeProcess::start(spool.path(), &amqp_url(), &exchange, TOKEN, &[]);
        rewrite_config(
            spool.path(),
            "[http]\nmax_in_flight = 777\npath = \"/webhooks/moved\"\n",
        );
        bridge.signal("HUP");
        wait_metric(&bridge, RELOADS, 1.0).await;
        let warned = log_lines(&bridge, "needs a restart");
        let keys: Vec<&str> = warned.iter().filter_map(|w| w["key"].as_str()).collect();
        assert_eq!(keys, ["http.max_in_flight", "http.path"], "{warned:?}");
        for line in &warned {
            assert_eq!(line["level"], "WARN");
            let text = line.to_string();
            assert!(!text.contains("777") && !text.contains("moved"), "{text}");
        }
        assert_eq!(
            post(&bridge, PATH, TOKEN, "WHEF_SESSION_CREATED", None, 1).await,
            200
        );
        assert_eq!(
            post(
                &bridge,
                "/webhooks/moved",
                TOKEN,
                "WHEF_SESSION_CREATED",
                None,
                2
            )
            .await,
            404
        );
        // Named again on the next reload: the running value is still the old one.
        bridge.signal("HUP");
        wait_metric(&bridge, RELOADS, 2.0).await;
        assert_eq!(log_lines(&bridge, "needs a restart").len(), 4);
        drop(bridge);
        cleanup(&exchange).await;
    })
    .await;
}

/// Opens a connection and sends nothing: the bridge closes it after the header
/// timeout, a debug line.
async fn silent_connection(bridge: &BridgeProcess) {
    let _conn = tokio::net::TcpStream::connect(bridge.http).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
}

/// (5) `log.level` set to debug on reload: a debug line appears after it, none before.
#[tokio::test]
async fn log_level_follows_a_reload() {
    bounded(async {
        const TOKEN: &str = "reload-log-token";
        let spool = tempfile::tempdir().unwrap();
        let exchange = unique("reload-log");
        let bridge = BridgeProcess::start_configured(
            spool.path(),
            &amqp_url(),
            &exchange,
            TOKEN,
            &[("BRIDGE_HTTP__HEADER_READ_TIMEOUT_MS", "200")],
            "[log]\nlevel = \"info\"\n",
            |cmd| {
                cmd.env_remove("BRIDGE_LOG__LEVEL");
            },
        );
        silent_connection(&bridge).await;
        assert!(log_lines(&bridge, "connection closed").is_empty());
        rewrite_config(
            spool.path(),
            "[log]\nlevel = \"info,cellosign_bridge=debug\"\n",
        );
        bridge.signal("HUP");
        wait_metric(&bridge, RELOADS, 1.0).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            silent_connection(&bridge).await;
            let closed = log_lines(&bridge, "connection closed");
            if let Some(line) = closed.first() {
                assert_eq!(line["level"], "DEBUG");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no debug line:\n{}",
                bridge.log()
            );
        }
        drop(bridge);
        cleanup(&exchange).await;
    })
    .await;
}
