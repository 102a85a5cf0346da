//! Webhook auth as Cellosign's "Secrets" integration does it (SPEC 9): it POSTs
//! credentials to the token URL, gets a signed token, and sends it as Bearer on
//! every webhook. Real HTTP on port 0, real RabbitMQ; the attacks are forged,
//! expired and retired-key tokens, guessing, and secrets leaking into logs.

mod common;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cellosign_bridge::{AckMode, Settings};
use common::*;
use serde_json::{Value, json};
use support::bridge_process::BridgeProcess;

const USERNAME: &str = "cellosign-user";
const PASSWORD: &str = "pw-Xq3sLk9vR2mT";
const CLIENT_ID: &str = "cellosign-client";
const CLIENT_SECRET: &str = "cs-Hf8wPz4nJ6yB";
const KEY_OLD: &str = "old-key-uT5sE0qWm2cZr8hYk4nVb7xLp1gDj3aF";
const KEY_NEW: &str = "new-key-Nc6vB1zXq9wEr4tYu7iOp2aSd5fGh8jK";
const WAIT: Duration = Duration::from_secs(20);

/// Credentials, keys and the config file an operator would write, in one temp dir.
struct Secrets {
    dir: tempfile::TempDir,
}

impl Secrets {
    fn new(keys: &[&str]) -> Secrets {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("password"), format!("{PASSWORD}\n")).expect("write");
        std::fs::write(dir.path().join("client-secret"), CLIENT_SECRET).expect("write");
        let secrets = Secrets { dir };
        secrets.set_keys(keys);
        secrets
    }

    fn keys_file(&self) -> PathBuf {
        self.dir.path().join("token-keys")
    }

    /// Rewrites the keys file (a rotation step).
    fn set_keys(&self, keys: &[&str]) {
        let text = format!("# signing keys, first signs\n{}\n", keys.join("\n"));
        std::fs::write(self.keys_file(), text).expect("write keys");
    }

    /// The `[auth]` part of a config file: both kinds of client, these keys.
    fn config(&self, ttl_s: u64) -> String {
        let p = |name: &str| self.dir.path().join(name).display().to_string();
        format!(
            "[auth]\ntoken_keys_file = {:?}\ntoken_ttl_s = {ttl_s}\n\
             [[auth.clients]]\nusername = {USERNAME:?}\npassword_file = {:?}\n\
             [[auth.clients]]\nclient_id = {CLIENT_ID:?}\nclient_secret_file = {:?}\n",
            p("token-keys"),
            p("password"),
            p("client-secret"),
        )
    }

    /// Test settings loaded through that config file.
    fn settings(
        &self,
        spool: &Path,
        ttl_s: u64,
        configure: impl FnOnce(&mut Settings),
    ) -> Settings {
        let file = self.dir.path().join("bridge.toml");
        std::fs::write(&file, self.config(ttl_s)).expect("write config");
        let mut s = test_settings_from(Some(&file), AckMode::Spooled, spool);
        configure(&mut s);
        s
    }

    /// A running bridge with these secrets.
    async fn spawn(&self, ttl_s: u64, configure: impl FnOnce(&mut Settings)) -> TestApp {
        let spool = tempfile::tempdir().expect("temp dir");
        let settings = self.settings(spool.path(), ttl_s, configure);
        spawn_with(settings, spool).await
    }
}

fn token_url(app: &TestApp) -> String {
    format!("http://{}{}", app.http, app.settings.auth.token_path)
}

/// POSTs a JSON body to the token URL: (code, headers, parsed body).
async fn fetch_json(app: &TestApp, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let req = app.client.post(token_url(app)).json(body);
    parse(req.send().await.expect("token request")).await
}

async fn parse(r: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let code = r.status().as_u16();
    let headers = r.headers().clone();
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let body: Value = r.json().await.expect("JSON answer");
    (code, headers, body)
}

/// Cellosign's password grant, exactly as its documentation shows it.
fn password_grant() -> Value {
    json!({"username": USERNAME, "password": PASSWORD, "grant_type": "password", "scope": "webhooks"})
}

/// A token for the password client.
async fn token(app: &TestApp) -> String {
    let (code, _, body) = fetch_json(app, &password_grant()).await;
    assert_eq!(code, 200, "{body}");
    body["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// POSTs an event to the webhook with `Authorization: Bearer <token>`.
async fn post_with(app: &TestApp, bearer: Option<&str>, n: u64) -> Answer {
    let mut req = app
        .client
        .post(app.url())
        .header("content-type", "application/json")
        .body(event_body("WHEF_SESSION_CREATED", "s-tok", "r-tok", n));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    answer(req.send().await.expect("webhook request")).await
}

/// A bridge behind a trusted proxy (the test), so requests can come "from" any address.
async fn behind_proxy(secrets: &Secrets) -> TestApp {
    let proxy = "127.0.0.1".parse().expect("an address");
    secrets
        .spawn(3600, |s| s.http.trusted_proxies = vec![proxy])
        .await
}

/// A token request as forwarded for the client address `addr`.
fn from(app: &TestApp, addr: &str, body: &Value) -> reqwest::RequestBuilder {
    let req = app.client.post(token_url(app));
    req.header("x-forwarded-for", addr).json(body)
}

/// A consumer of everything `app` publishes (the broker connection must live as long).
async fn subscribe(app: &TestApp) -> (Broker, lapin::Consumer) {
    let broker = Broker::connect(&amqp_url()).await;
    broker.declare_exchange(&app.settings.amqp.exchange).await;
    let consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;
    (broker, consumer)
}

fn assert_granted(code: u16, headers: &reqwest::header::HeaderMap, body: &Value, ttl_s: u64) {
    assert_eq!(code, 200, "{body}");
    let token = body["access_token"].as_str().unwrap_or_default();
    assert!(token.len() > 40, "{body}");
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "URL-safe: {token}"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], ttl_s);
    assert_eq!(headers["cache-control"], "no-store");
}

#[tokio::test]
async fn the_documented_request_shapes_get_a_bearer_token() {
    bounded(async {
        let secrets = Secrets::new(&[KEY_NEW]);
        let app = secrets.spawn(3600, |_| {}).await;
        // JSON, password grant.
        let (code, headers, body) = fetch_json(&app, &password_grant()).await;
        assert_granted(code, &headers, &body, 3600);
        // JSON, client credentials.
        let client = json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                        "scope": "webhooks", "grant_type": "client_credentials"});
        let (code, headers, body) = fetch_json(&app, &client).await;
        assert_granted(code, &headers, &body, 3600);
        // Form-encoded, both kinds.
        for form in [
            format!("grant_type=password&username={USERNAME}&password={PASSWORD}&scope=webhooks"),
            format!(
                "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
            ),
        ] {
            let req = app
                .client
                .post(token_url(&app))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form);
            let (code, headers, body) = parse(req.send().await.expect("request")).await;
            assert_granted(code, &headers, &body, 3600);
        }
        // JSON without a content type, as a minimal client may send it.
        let req = app
            .client
            .post(token_url(&app))
            .body(password_grant().to_string());
        let (code, headers, body) = parse(req.send().await.expect("request")).await;
        assert_granted(code, &headers, &body, 3600);
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wrong_credentials_get_401_and_malformed_requests_400() {
    bounded(async {
        let secrets = Secrets::new(&[KEY_NEW]);
        // Each wrong try from its own address, so none is slowed down.
        let app = behind_proxy(&secrets).await;
        for (i, wrong) in [
            json!({"username": USERNAME, "password": "guess", "grant_type": "password"}),
            json!({"username": "nobody", "password": PASSWORD, "grant_type": "password"}),
            // The client secret is not the password client's password, nor the reverse.
            json!({"username": CLIENT_ID, "password": CLIENT_SECRET}),
            json!({"client_id": USERNAME, "client_secret": PASSWORD}),
            json!({"client_id": CLIENT_ID, "client_secret": ""}),
        ]
        .iter()
        .enumerate()
        {
            let req = from(&app, &format!("192.0.2.{i}"), wrong);
            let (code, _, body) = parse(req.send().await.expect("request")).await;
            assert_eq!(
                (code, &body),
                (401, &json!({"error": "invalid_client"})),
                "{wrong}"
            );
        }
        for malformed in [
            json!({"username": USERNAME}),
            json!({"password": PASSWORD, "client_secret": CLIENT_SECRET}),
            json!(["not", "an", "object"]),
            json!({"username": USERNAME, "password": 12345}),
        ] {
            let (code, _, body) = fetch_json(&app, &malformed).await;
            assert_eq!(
                (code, &body["error"]),
                (400, &json!("invalid_request")),
                "{malformed}"
            );
            assert!(!body.to_string().contains(PASSWORD), "{body}");
        }
        let grant =
            json!({"username": USERNAME, "password": PASSWORD, "grant_type": "refresh_token"});
        let (code, _, body) = fetch_json(&app, &grant).await;
        assert_eq!(
            (code, &body["error"]),
            (400, &json!("unsupported_grant_type"))
        );
        let big = json!({"username": USERNAME, "password": "x".repeat(9000)});
        let (code, _, body) = fetch_json(&app, &big).await;
        assert_eq!((code, &body["error"]), (413, &json!("invalid_request")));
        let text = app
            .client
            .post(token_url(&app))
            .header("content-type", "text/plain");
        let r = text.body(password_grant().to_string()).send().await;
        let (code, _, body) = parse(r.expect("request")).await;
        assert_eq!((code, &body["error"]), (400, &json!("invalid_request")));
        let r = app.client.get(token_url(&app)).send().await.expect("GET");
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "POST");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_webhook_with_a_fetched_token_is_accepted_and_one_without_or_forged_is_not() {
    bounded(async {
        let secrets = Secrets::new(&[KEY_NEW]);
        let app = secrets.spawn(3600, |_| {}).await;
        let (_broker, mut consumer) = subscribe(&app).await;
        let token = token(&app).await;

        // Forged: a token signed with a key this bridge does not have, and every part tampered.
        let other = Secrets::new(&[KEY_OLD]);
        let stranger = other.spawn(3600, |_| {}).await;
        let foreign = self::token(&stranger).await;
        stranger.stop().await;
        let flip = |i: usize| {
            let mut b = token.clone().into_bytes();
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            String::from_utf8(b).unwrap_or_default()
        };
        let tag_start = token.rfind('.').unwrap_or(0) + 1;
        let payload_start = token.find('.').unwrap_or(0) + 1;
        for (what, bad) in [
            ("no token", None),
            ("another key's token", Some(foreign.clone())),
            ("key id changed", Some(flip(0))),
            ("payload changed", Some(flip(payload_start + 2))),
            ("tag changed", Some(flip(tag_start + 2))),
            ("tag cut", Some(token[..token.len() - 1].to_string())),
            ("not a token", Some("x.y.z".to_string())),
        ] {
            let a = post_with(&app, bad.as_deref(), 1).await;
            assert_eq!(a.code, 401, "{what}: {a:?}");
        }
        // A signed token is taken from Authorization only, never from the URL.
        let in_query = app
            .client
            .post(format!("{}?token={token}", app.url()))
            .header("content-type", "application/json")
            .body(event_body("WHEF_SESSION_CREATED", "s-tok", "r-tok", 1));
        assert_eq!(
            answer(in_query.send().await.expect("request")).await.code,
            401
        );
        assert_quiet(&mut consumer, Duration::from_millis(300)).await;

        let a = post_with(&app, Some(&token), 2).await;
        assert_eq!(a.code, 200, "{a:?}");
        let got = take(&mut consumer, 1, WAIT).await;
        assert_eq!(
            got[0]
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string()),
            Some(message_id("WHEF_SESSION_CREATED", "s-tok", 2))
        );
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_expired_token_gets_401() {
    bounded(async {
        let secrets = Secrets::new(&[KEY_NEW]);
        // Expiry is in whole seconds: a 2 s token lives 1 to 2 s.
        let app = secrets.spawn(2, |_| {}).await;
        let token = token(&app).await;
        assert_eq!(post_with(&app, Some(&token), 1).await.code, 200);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let a = post_with(&app, Some(&token), 2).await;
        assert_eq!(a.code, 401, "{a:?}");
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_second_bridge_sharing_the_keys_accepts_the_first_ones_token() {
    bounded(async {
        let secrets = Secrets::new(&[KEY_NEW]);
        let first = secrets.spawn(3600, |_| {}).await;
        let second = secrets.spawn(3600, |_| {}).await;
        let (_broker, mut consumer) = subscribe(&second).await;

        let token = token(&first).await;
        let a = post_with(&second, Some(&token), 7).await;
        assert_eq!(a.code, 200, "{a:?}");
        take(&mut consumer, 1, WAIT).await;
        first.stop().await;
        second.stop().await;
    })
    .await;
}

#[tokio::test]
async fn key_rotation_keeps_old_tokens_until_the_old_key_is_removed() {
    bounded(async {
        let secrets = Secrets::new(&[KEY_OLD]);
        let before = secrets.spawn(3600, |_| {}).await;
        let old_token = token(&before).await;
        before.stop().await;

        // Step 1: the new key first, the old one after it. Old tokens still pass.
        secrets.set_keys(&[KEY_NEW, KEY_OLD]);
        let rotating = secrets.spawn(3600, |_| {}).await;
        assert_eq!(post_with(&rotating, Some(&old_token), 1).await.code, 200);
        let new_token = token(&rotating).await;
        assert_ne!(new_token, old_token);
        rotating.stop().await;

        // Step 2, a TTL later: the old key removed. Its tokens are refused, new ones pass.
        secrets.set_keys(&[KEY_NEW]);
        let after = secrets.spawn(3600, |_| {}).await;
        let a = post_with(&after, Some(&old_token), 2).await;
        assert_eq!(a.code, 401, "{a:?}");
        assert_eq!(post_with(&after, Some(&new_token), 3).await.code, 200);
        after.stop().await;
    })
    .await;
}

#[tokio::test]
async fn guessing_credentials_is_slowed_down_with_429_and_retry_after() {
    bounded(async {
        let secrets = Secrets::new(&[KEY_NEW]);
        let app = behind_proxy(&secrets).await;
        let from = |addr: &str, body: &Value| from(&app, addr, body);
        let wrong = json!({"username": USERNAME, "password": "guess"});
        let mut codes = Vec::new();
        for _ in 0..8 {
            codes.push(
                from("192.0.2.66", &wrong)
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16(),
            );
        }
        assert_eq!(codes, [401, 401, 401, 401, 401, 429, 429, 429]);
        // Blocked means blocked: even the right password waits.
        let r = from("192.0.2.66", &password_grant())
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 429);
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        let (_, _, body) = parse(r).await;
        assert_eq!(body["error"], "slow_down");
        // Another address is not affected.
        let r = from("192.0.2.67", &password_grant())
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        // After the wait, the right password is accepted and clears the count.
        tokio::time::sleep(Duration::from_secs(retry) + Duration::from_millis(100)).await;
        let r = from("192.0.2.66", &password_grant())
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 200);
        let r = from("192.0.2.66", &wrong).send().await.expect("request");
        assert_eq!(r.status(), 401);
        app.stop().await;
    })
    .await;
}

#[tokio::test]
async fn no_password_client_secret_key_or_token_appears_in_the_debug_log() {
    bounded(async {
    let secrets = Secrets::new(&[KEY_NEW, KEY_OLD]);
    let spool = tempfile::tempdir().expect("temp dir");
    let exchange = unique("ex");
    let bridge = BridgeProcess::start_configured(
        spool.path(),
        &amqp_url(),
        &exchange,
        "static-token-7Yq2",
        &[("BRIDGE_LOG__LEVEL", "debug")],
        &secrets.config(3600),
        |_| {},
    );
    let client = http_client();
    let url = format!("http://{}/webhooks/cellosign/token", bridge.http);
    let mut tokens = Vec::new();
    for body in [
        password_grant(),
        json!({"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "grant_type": "client_credentials"}),
    ] {
        let (code, _, body) =
            parse(client.post(&url).json(&body).send().await.expect("request")).await;
        assert_eq!(code, 200, "{body}");
        tokens.push(
            body["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let form = format!("username={USERNAME}&password={PASSWORD}");
    let r = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    // Wrong secrets, near misses of the real ones, until the address is slowed down.
    for _ in 0..7 {
        let near = json!({"username": USERNAME, "password": format!("{PASSWORD}x")});
        client.post(&url).json(&near).send().await.expect("request");
    }
    let webhook = format!("http://{}/webhooks/cellosign", bridge.http);
    let forged = format!("{}x", tokens[0]);
    for bearer in [&tokens[0], &tokens[1], &forged] {
        let r = client
            .post(&webhook)
            .bearer_auth(bearer)
            .header("content-type", "application/json")
            .body(event_body("WHEF_SESSION_CREATED", "s-log", "r-log", 1))
            .send()
            .await
            .expect("webhook");
        assert!(r.status() == 200 || bearer == &forged, "{}", r.status());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = bridge.log();
    assert!(log.contains("\"DEBUG\""), "the log is at debug level");
    assert!(
        log.contains("\"message\":\"token\""),
        "token requests are logged"
    );
    assert!(log.contains("slowed down"), "the block is logged");
    let mut secrets_shown = vec![PASSWORD, CLIENT_SECRET, KEY_NEW, KEY_OLD];
    // A token, and each of its parts (the payload holds only public data, but the tag
    // would let anyone holding the payload rebuild the token).
    for t in &tokens {
        secrets_shown.push(t);
        secrets_shown.push(t.rsplit('.').next().unwrap_or(t));
    }
    for secret in secrets_shown {
        assert!(!log.contains(secret), "{secret:?} is in the log:\n{log}");
    }
    drop(bridge);
    let broker = Broker::connect(&amqp_url()).await;
    broker.cleanup(&exchange).await;
    })
    .await;
}

/// The start-up warning that the webhook is open (`src/startup.rs`).
const OPEN_WARNING: &str =
    "auth.tokens and auth.clients are empty: anyone who can reach the webhook can post events";

/// README "Configuration" and `config/default.toml` `[auth] tokens`: with no token
/// (an empty `BRIDGE_AUTH__TOKENS` is an empty list) and no `[[auth.clients]]`, the
/// webhook is open and the bridge warns once at start; with a static token, or with
/// clients that fetch signed tokens, it does not warn and a webhook without a token
/// gets 401.
#[tokio::test]
async fn the_start_warns_that_the_webhook_is_open_exactly_when_no_token_and_no_client_is_configured()
 {
    bounded(async {
        let secrets = Secrets::new(&[KEY_NEW]);
        let exchange = unique("open");
        let client = http_client();
        // (BRIDGE_AUTH__TOKENS, extra config, whether the webhook is open)
        let cases = [
            ("", String::new(), true),
            ("static-token-3Kd8", String::new(), false),
            ("", secrets.config(3600), false),
        ];
        for (n, (token, config, open)) in cases.into_iter().enumerate() {
            let spool = tempfile::tempdir().expect("temp dir");
            let bridge = BridgeProcess::start_configured(
                spool.path(),
                &amqp_url(),
                &exchange,
                token,
                &[],
                &config,
                |_| {},
            );
            let case = format!(
                "tokens {token:?}, clients configured: {}",
                !config.is_empty()
            );
            // Start-up lines come before the "serving" line `start` waited for.
            let log = bridge.log();
            let warnings: Vec<Value> = log
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["message"] == OPEN_WARNING)
                .collect();
            assert_eq!(warnings.len(), usize::from(open), "{case}:\n{log}");
            for w in &warnings {
                assert_eq!(w["level"], "WARN", "{case}: {w}");
            }
            // The warning tells the truth: a webhook without a token gets in exactly then.
            let r = client
                .post(format!("http://{}/webhooks/cellosign", bridge.http))
                .header("content-type", "application/json")
                .body(event_body(
                    "WHEF_SESSION_CREATED",
                    "s-open",
                    "r-open",
                    n as u64,
                ))
                .send()
                .await
                .expect("webhook");
            let code = answer(r).await.code;
            assert_eq!(code, if open { 200 } else { 401 }, "{case}");
            drop(bridge);
        }
        Broker::connect(&amqp_url()).await.cleanup(&exchange).await;
    })
    .await;
}
