//! Configuration layering and refusal of bad settings, and the CLI around them.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use cellosign_bridge::{AckMode, ConfigError, Settings, Sources};

fn load(
    dir: Option<&Path>,
    environment: Option<&str>,
    file: Option<&Path>,
    env: &[(&str, &str)],
) -> Result<Settings, ConfigError> {
    Settings::load(&Sources {
        config_dir: dir.map(Path::to_path_buf),
        environment: environment.map(String::from),
        file: file.map(Path::to_path_buf),
        env: Some(
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
        ),
    })
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn shipped_default_toml_matches_the_built_in_defaults() {
    let shipped = load(Some(Path::new("config")), None, None, &[]).unwrap();
    let builtin = load(None, None, None, &[]).unwrap();
    assert_eq!(shipped.redacted_toml(), builtin.redacted_toml());
}

#[test]
fn layers_apply_in_order_and_environment_wins() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "default.toml",
        "[http]\npath = \"/a\"\nmax_in_flight = 10\n[amqp]\nexchange = \"from-default\"\n",
    );
    write(dir.path(), "staging.toml", "[http]\npath = \"/b\"\n");
    let extra = write(dir.path(), "extra.toml", "[http]\nmax_in_flight = 20\n");
    let s = load(
        Some(dir.path()),
        Some("staging"),
        Some(&extra),
        &[
            ("BRIDGE_AMQP__URLS", "amqp://a:5672/%2f,amqp://b:5672/%2f"),
            ("BRIDGE_DELIVERY__ACK", "confirmed"),
            ("BRIDGE_HTTP__MAX_BODY_BYTES", "1000"),
            ("BRIDGE_ENV", "staging"),
        ],
    )
    .unwrap();
    assert_eq!(s.http.path, "/b");
    assert_eq!(s.http.max_in_flight, 20);
    assert_eq!(s.amqp.exchange, "from-default");
    let urls: Vec<&str> = s.amqp.urls.iter().map(|u| u.expose()).collect();
    assert_eq!(urls, ["amqp://a:5672/%2f", "amqp://b:5672/%2f"]);
    assert_eq!(s.delivery.ack, AckMode::Confirmed);
    assert_eq!(s.http.max_body_bytes, 1000);
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "bad.toml", "[amqp]\nexchnage = \"typo\"\n");
    let err = load(None, None, Some(&file), &[]).unwrap_err().to_string();
    assert!(err.contains("exchnage"), "{err}");
    let err = load(None, None, None, &[("BRIDGE_HTTP__LISTENN", "x")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("listenn"), "{err}");
    let file = write(dir.path(), "bad2.toml", "[nosuchsection]\na = 1\n");
    let err = load(None, None, Some(&file), &[]).unwrap_err().to_string();
    assert!(err.contains("nosuchsection"), "{err}");
}

#[test]
fn bad_values_are_refused_naming_the_key() {
    for (key, value, named) in [
        ("BRIDGE_HTTP__LISTEN", "not-an-address", "listen"),
        ("BRIDGE_DELIVERY__ACK", "sometimes", "ack"),
        (
            "BRIDGE_AMQP__ROUTING_KEY",
            "{session.nope}",
            "amqp.routing_key",
        ),
        ("BRIDGE_AMQP__URLS", "http://nope", "amqp.urls"),
        ("BRIDGE_HTTP__PATH", "no-slash", "http.path"),
        ("BRIDGE_AUTH__ALLOW_FROM", "10.0.0.0/99", "allow_from"),
        ("BRIDGE_AMQP__MAX_UNCONFIRMED", "0", "amqp.max_unconfirmed"),
        ("BRIDGE_EVENTS__ACCEPT", "", "events.accept"),
        ("BRIDGE_LOG__FORMAT", "xml", "format"),
        ("BRIDGE_SPOOL__MAX_BYTES", "-5", "max_bytes"),
        ("BRIDGE_SPOOL__CACHE_BYTES", "4096", "spool.cache_bytes"),
    ] {
        let err = load(None, None, None, &[(key, value)])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(named), "{key}={value}: {err}");
    }
    let err = load(None, None, Some(Path::new("/nonexistent/bridge.toml")), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/bridge.toml"), "{err}");
}

/// An empty token would let `?token=` or an empty `X-Webhook-Token` in, and no
/// start-up warning would say the webhook is open: it stops the start naming
/// `auth.tokens`, as does a token with whitespace (which a header cannot carry intact).
#[test]
fn an_empty_or_blank_token_stops_the_start_naming_auth_tokens() {
    let dir = tempfile::tempdir().unwrap();
    for tokens in [r#"[""]"#, r#"["good", ""]"#, r#"["two words"]"#, r#"[" "]"#] {
        let file = write(
            dir.path(),
            "tokens.toml",
            &format!("[auth]\ntokens = {tokens}\n"),
        );
        let err = match load(None, None, Some(&file), &[]) {
            Ok(_) => panic!("tokens = {tokens} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("auth.tokens"), "{tokens}: {err}");
    }
    // In the environment an empty item is no token at all, not an empty token.
    let s = load(None, None, None, &[("BRIDGE_AUTH__TOKENS", "a,,b")]).unwrap();
    assert_eq!(
        s.auth.tokens.iter().map(|t| t.expose()).collect::<Vec<_>>(),
        ["a", "b"]
    );
}

#[test]
fn archive_keys_have_their_defaults_and_bad_values_are_refused_naming_the_key() {
    let s = load(None, None, None, &[]).unwrap();
    assert_eq!(s.http.archive_path, "/webhooks/cellosign/archive");
    assert_eq!(s.http.archive_max_body_bytes, 64 << 20);
    assert_eq!(s.http.archive_max_in_flight, 4);
    assert_eq!(s.amqp.max_message_bytes, 16 << 20);
    assert_eq!(
        s.http.max_body_bytes,
        256 << 10,
        "the notification path keeps its limit"
    );
    for (env, named) in [
        (
            &[("BRIDGE_HTTP__ARCHIVE_PATH", "no-slash")][..],
            "http.archive_path",
        ),
        (
            &[("BRIDGE_HTTP__ARCHIVE_PATH", "/webhooks/cellosign")][..],
            "http.archive_path",
        ),
        (
            &[
                ("BRIDGE_HTTP__PATH", "/same"),
                ("BRIDGE_HTTP__ARCHIVE_PATH", "/same"),
            ][..],
            "http.archive_path",
        ),
        (
            &[("BRIDGE_HTTP__ARCHIVE_MAX_BODY_BYTES", "0")][..],
            "http.archive_max_body_bytes",
        ),
        (
            &[("BRIDGE_HTTP__ARCHIVE_MAX_BODY_BYTES", "2147483648")][..],
            "http.archive_max_body_bytes",
        ),
        (
            &[("BRIDGE_HTTP__ARCHIVE_MAX_BODY_BYTES", "lots")][..],
            "archive_max_body_bytes",
        ),
        (
            &[("BRIDGE_HTTP__ARCHIVE_MAX_IN_FLIGHT", "0")][..],
            "http.archive_max_in_flight",
        ),
        (
            &[("BRIDGE_AMQP__MAX_MESSAGE_BYTES", "0")][..],
            "amqp.max_message_bytes",
        ),
        (
            &[("BRIDGE_AMQP__MAX_MESSAGE_BYTES", "1073741824")][..],
            "amqp.max_message_bytes",
        ),
        (
            &[("BRIDGE_EVENTS__ACCEPT", "WHEF_SESSION_CREATED,WHP_ARCHIVE")][..],
            "events.accept",
        ),
    ] {
        let err = load(None, None, None, env)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(named), "{env:?}: {err}");
    }
}

#[test]
fn the_claim_check_store_is_off_by_default_and_bad_values_are_refused_naming_the_key() {
    let s = load(None, None, None, &[]).unwrap();
    assert_eq!(s.archive.store_url, None, "without a store: 413 as before");
    assert_eq!(s.archive.store_timeout_ms, 30_000);
    for url in ["file:///var/lib/claims", "s3://bucket/cellosign/archives"] {
        let s = load(None, None, None, &[("BRIDGE_ARCHIVE__STORE_URL", url)]).unwrap();
        assert_eq!(s.archive.store_url.as_deref(), Some(url));
    }
    for (key, value, named) in [
        (
            "BRIDGE_ARCHIVE__STORE_URL",
            "/var/lib/claims",
            "archive.store_url",
        ),
        (
            "BRIDGE_ARCHIVE__STORE_URL",
            "ftp://host/x",
            "archive.store_url",
        ),
        ("BRIDGE_ARCHIVE__STORE_URL", "s3://", "archive.store_url"),
        (
            "BRIDGE_ARCHIVE__STORE_URL",
            "file://host/x",
            "archive.store_url",
        ),
        (
            "BRIDGE_ARCHIVE__STORE_URL",
            "s3://AKIA:s3cr3t@bucket/p",
            "archive.store_url",
        ),
        (
            "BRIDGE_ARCHIVE__STORE_TIMEOUT_MS",
            "0",
            "archive.store_timeout_ms",
        ),
        (
            "BRIDGE_ARCHIVE__S3_ENDPOINT",
            "minio:9000",
            "archive.s3_endpoint",
        ),
        ("BRIDGE_ARCHIVE__S3_REGION", "", "archive.s3_region"),
        ("BRIDGE_ARCHIVE__BUCKET", "b", "bucket"),
    ] {
        let err = load(None, None, None, &[(key, value)])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(named), "{key}={value}: {err}");
        assert!(!err.contains("s3cr3t"), "{err}");
    }
}

#[test]
fn settings_debug_shows_no_token_and_no_broker_password() {
    // Settings derive Debug, and a startup error or a log line may print them.
    let s = load(
        None,
        None,
        None,
        &[
            ("BRIDGE_AUTH__TOKENS", "do-not-print"),
            (
                "BRIDGE_AMQP__URLS",
                "amqp://app:url-password@rabbit-1:5672/%2f",
            ),
        ],
    )
    .unwrap();
    let shown = format!("{s:?}");
    assert!(!shown.contains("do-not-print"), "{shown}");
    assert!(!shown.contains("url-password"), "{shown}");
    assert!(
        shown.contains("amqp://app:<redacted>@rabbit-1:5672/%2f"),
        "{shown}"
    );
}

#[test]
fn tokens_come_from_config_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(
        dir.path(),
        "tokens",
        "# rotated 2026-11\nfrom-file-1\n\n  from-file-2  \n",
    );
    let s = load(
        None,
        None,
        None,
        &[
            ("BRIDGE_AUTH__TOKENS", "env-a,env-b"),
            ("BRIDGE_AUTH__TOKENS_FILE", tokens.to_str().unwrap()),
        ],
    )
    .unwrap();
    assert_eq!(
        s.auth.tokens.iter().map(|t| t.expose()).collect::<Vec<_>>(),
        ["env-a", "env-b", "from-file-1", "from-file-2"]
    );
    let err = load(
        None,
        None,
        None,
        &[("BRIDGE_AUTH__TOKENS_FILE", "/nonexistent/tokens")],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("auth.tokens_file"), "{err}");
}

#[test]
fn broker_urls_come_from_a_file_in_place_of_urls_and_never_from_both() {
    let dir = tempfile::tempdir().unwrap();
    let urls = write(
        dir.path(),
        "broker-urls",
        "# the cluster\namqp://bridge:s3cret@rabbit-0:5672/%2f\n\n  amqp://bridge:s3cret@rabbit-1:5672/%2f  \n",
    );
    let from_file = [("BRIDGE_AMQP__URLS_FILE", urls.to_str().unwrap())];
    // The shipped default.toml names the local broker in `urls`: the file replaces it.
    let s = load(Some(Path::new("config")), None, None, &from_file).unwrap();
    assert_eq!(
        s.amqp.urls.iter().map(|u| u.expose()).collect::<Vec<_>>(),
        [
            "amqp://bridge:s3cret@rabbit-0:5672/%2f",
            "amqp://bridge:s3cret@rabbit-1:5672/%2f"
        ]
    );
    assert!(!format!("{s:?}").contains("s3cret"), "{s:?}");

    // `urls` given anywhere else as well: refused, naming both keys.
    let also_env = [
        from_file[0],
        ("BRIDGE_AMQP__URLS", "amqp://guest:guest@other:5672/%2f"),
    ];
    let also_file = write(
        dir.path(),
        "also.toml",
        "[amqp]\nurls = [\"amqp://guest:guest@other:5672/%2f\"]\n",
    );
    for err in [
        load(Some(Path::new("config")), None, None, &also_env).unwrap_err(),
        load(
            Some(Path::new("config")),
            None,
            Some(&also_file),
            &from_file,
        )
        .unwrap_err(),
    ] {
        let err = err.to_string();
        assert!(
            err.starts_with("amqp.urls_file:") && err.contains("amqp.urls is set too"),
            "{err}"
        );
    }

    // A missing file, one with no URL, one with a bad URL: refused naming the file's key.
    let empty = write(dir.path(), "empty", "# none yet\n\n");
    let bad = write(dir.path(), "bad", "http://not-amqp\n");
    for (file, problem) in [
        (Path::new("/nonexistent/broker-urls"), "cannot read"),
        (empty.as_path(), "lists no broker URL"),
        (bad.as_path(), "http://not-amqp"),
    ] {
        let err = load(
            None,
            None,
            None,
            &[("BRIDGE_AMQP__URLS_FILE", file.to_str().unwrap())],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("amqp.urls_file:") && err.contains(problem),
            "{err}"
        );
    }
}

fn bridge(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    output_within(&mut cmd)
}

/// Runs `cmd` to its end like `Command::output`, but kills it and fails after 10 s
/// (the commands here end in milliseconds; the bound is for a loaded machine):
/// a command that serves instead of exiting (a broken config read as "serve")
/// fails the test instead of hanging it.
fn output_within(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the binary");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(out) => out.expect("the binary's output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not exit within 10 s");
        }
    }
}

/// What a successful `check-config` printed, checked to show none of `secrets`.
fn shown_without(out: &std::process::Output, secrets: &[&str]) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for secret in secrets {
        assert!(!text.contains(secret), "{secret} shown:\n{text}");
    }
    text
}

#[test]
fn check_config_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = write(dir.path(), "tokens", "file-secret-token\n");
    let out = bridge(
        &["check-config"],
        &[
            ("BRIDGE_AUTH__TOKENS_FILE", tokens.to_str().unwrap()),
            ("BRIDGE_AUTH__TOKENS", "super-secret-token"),
            ("BRIDGE_AMQP__URLS", "amqp://user:hunter2@broker:5672/%2f"),
            ("BRIDGE_ARCHIVE__STORE_URL", "s3://claims/cellosign"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret-key"),
        ],
    );
    let text = shown_without(&out, &["super-secret-token", "hunter2", "aws-secret-key"]);
    assert!(
        text.contains("<redacted>") && text.contains("amqp://user:<redacted>@broker:5672/%2f"),
        "{text}"
    );
    assert!(
        text.contains("store_url = \"s3://claims/cellosign\""),
        "{text}"
    );
    // What it prints is a config file the bridge accepts.
    let file = write(dir.path(), "effective.toml", &text);
    assert!(load(None, None, Some(&file), &[]).is_ok());
}

#[test]
fn check_config_with_a_urls_file_shows_the_file_not_the_urls_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let urls = write(
        dir.path(),
        "broker-urls",
        "amqp://u:file-pass@rabbit:5672/%2f\n",
    );
    let out = bridge(
        &["check-config"],
        &[("BRIDGE_AMQP__URLS_FILE", urls.to_str().unwrap())],
    );
    let text = shown_without(&out, &["file-pass", "rabbit:5672"]);
    assert!(
        text.contains(&format!("urls_file = \"{}\"", urls.display())) && text.contains("urls = []"),
        "{text}"
    );
    let file = write(dir.path(), "effective.toml", &text);
    let again = load(Some(Path::new("config")), None, Some(&file), &[]).unwrap();
    assert_eq!(
        again.amqp.urls[0].expose(),
        "amqp://u:file-pass@rabbit:5672/%2f"
    );
}

#[test]
fn a_bad_config_stops_the_start_naming_the_key() {
    let out = bridge(&["serve"], &[("BRIDGE_AMQP__PUBLISH_TIMEOUT_MS", "0")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("amqp.publish_timeout_ms"), "{err}");
    // --config is accepted after the subcommand too.
    let out = bridge(&["check-config", "--config", "/nonexistent.toml"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.toml"));
}

#[test]
fn version_and_help() {
    let out = bridge(&["--version"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = bridge(&["--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "check-config", "tail", "spool"] {
        assert!(help.contains(cmd), "{help}");
    }
}

/// A config file with one password client and a keys file, plus `extra` TOML.
fn token_config(dir: &Path, keys: &str, extra: &str) -> std::path::PathBuf {
    let password = write(dir, "password", "pass-Wd93kq\n");
    let keys = write(dir, "keys", keys);
    write(
        dir,
        "token.toml",
        &format!(
            "[auth]\ntoken_keys_file = {keys:?}\n{extra}\n[[auth.clients]]\nusername = \"cellosign\"\npassword_file = {password:?}\n"
        ),
    )
}

const GOOD_KEY: &str = "k3y-0123456789abcdef0123456789abcdef\n";

#[test]
fn token_clients_and_keys_load_from_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = token_config(
        dir.path(),
        &format!("# rotated\n{GOOD_KEY}\nold-{GOOD_KEY}"),
        "",
    );
    let s = load(None, None, Some(&file), &[]).unwrap();
    assert_eq!(s.auth.token_path, "/webhooks/cellosign/token");
    assert_eq!(s.auth.token_ttl_s, 3600);
    let secret = s.auth.clients[0].secret.as_ref().map(|s| s.expose());
    assert_eq!(
        secret,
        Some("pass-Wd93kq"),
        "one line end is not part of it"
    );
    assert_eq!(s.auth.token_keys.len(), 2);
    let shown = format!("{s:?}");
    assert!(
        !shown.contains("pass-Wd93kq") && !shown.contains("k3y-0123"),
        "{shown}"
    );
}

#[test]
fn bad_token_clients_and_keys_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let empty = write(d, "empty", "\n");
    let twice = format!("{GOOD_KEY}{GOOD_KEY}");
    for (keys, extra, key) in [
        ("too-short\n", "", "auth.token_keys_file"),
        (twice.as_str(), "", "auth.token_keys_file"),
        (GOOD_KEY, "token_ttl_s = 0", "auth.token_ttl_s"),
        (
            GOOD_KEY,
            "token_path = \"/webhooks/cellosign\"",
            "auth.token_path",
        ),
    ] {
        let file = token_config(d, keys, extra);
        let err = load(None, None, Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    let keys = write(d, "good-keys", GOOD_KEY);
    for (entries, key) in [
        (
            "username = \"u\"\npassword_file = \"/nonexistent/pw\"".to_string(),
            "auth.clients[0].password_file",
        ),
        (
            format!("username = \"u\"\npassword_file = {empty:?}"),
            "auth.clients[0].password_file",
        ),
        (
            "username = \"u\"".to_string(),
            "auth.clients[0].password_file",
        ),
        (
            format!("client_id = \"c\"\npassword_file = {empty:?}"),
            "auth.clients[0]",
        ),
        (
            "client_id = \"c\"\nclient_secret_filee = \"x\"".to_string(),
            "client_secret_filee",
        ),
    ] {
        let file = write(
            d,
            "client.toml",
            &format!("[auth]\ntoken_keys_file = {keys:?}\n[[auth.clients]]\n{entries}\n"),
        );
        let err = load(None, None, Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    // Clients need keys; keys need clients.
    let pw = write(d, "pw", "secret");
    let no_keys = write(
        d,
        "no-keys.toml",
        &format!("[[auth.clients]]\nusername = \"u\"\npassword_file = {pw:?}\n"),
    );
    let err = load(None, None, Some(&no_keys), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("auth.token_keys_file"), "{err}");
    let keys_only = [("BRIDGE_AUTH__TOKEN_KEYS_FILE", keys.to_str().unwrap())];
    let err = load(None, None, None, &keys_only).unwrap_err().to_string();
    assert!(err.contains("auth.token_keys_file"), "{err}");
}

#[test]
fn check_config_with_token_clients_redacts_and_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let file = token_config(dir.path(), GOOD_KEY, "token_ttl_s = 600");
    let out = bridge(&["check-config", "--config", file.to_str().unwrap()], &[]);
    let text = shown_without(&out, &["pass-Wd93kq", "k3y-0123"]);
    assert!(
        text.contains("[[auth.clients]]") && text.contains("password_file"),
        "{text}"
    );
    let effective = write(dir.path(), "effective.toml", &text);
    let s = load(None, None, Some(&effective), &[]).unwrap();
    assert_eq!(s.auth.token_ttl_s, 600);
    assert_eq!(s.auth.clients.len(), 1);
}

/// Every key path of a TOML table, `section.key` (arrays of tables by their first
/// element, enough for the shipped file).
fn key_paths(table: &toml::Table, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        match value {
            toml::Value::Table(inner) => key_paths(inner, &format!("{path}."), out),
            toml::Value::Array(items) => {
                if let Some(toml::Value::Table(first)) = items.first() {
                    key_paths(first, &format!("{path}[]."), out);
                }
                out.insert(path);
            }
            _ => {
                out.insert(path);
            }
        }
    }
}

#[test]
fn default_toml_names_every_key() {
    let shipped: toml::Table =
        toml::from_str(&std::fs::read_to_string("config/default.toml").unwrap()).unwrap();
    let builtin: toml::Table =
        toml::from_str(&load(None, None, None, &[]).unwrap().redacted_toml()).unwrap();
    let (mut in_file, mut in_code) = Default::default();
    key_paths(&shipped, "", &mut in_file);
    key_paths(&builtin, "", &mut in_code);
    let missing: Vec<_> = in_code.difference(&in_file).collect();
    assert!(
        missing.is_empty(),
        "keys with a built-in default that config/default.toml does not show: {missing:?}"
    );
}

#[test]
fn the_environment_wins_over_every_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "default.toml",
        "[http]\npath = \"/from-default\"\n",
    );
    write(
        dir.path(),
        "staging.toml",
        "[http]\npath = \"/from-staging\"\n",
    );
    let extra = write(dir.path(), "extra.toml", "[http]\npath = \"/from-flag\"\n");
    let layered = |env: &[(&str, &str)]| {
        load(Some(dir.path()), Some("staging"), Some(&extra), env)
            .unwrap()
            .http
            .path
    };
    assert_eq!(layered(&[]), "/from-flag");
    assert_eq!(layered(&[("BRIDGE_HTTP__PATH", "/from-env")]), "/from-env");
}

#[test]
fn comma_lists_come_from_the_environment() {
    let s = load(
        None,
        None,
        None,
        &[
            ("BRIDGE_AUTH__ALLOW_FROM", "10.0.0.0/8,192.168.1.0/24"),
            ("BRIDGE_HTTP__TRUSTED_PROXIES", "127.0.0.1/32,::1/128"),
            (
                "BRIDGE_EVENTS__ACCEPT",
                "WHEF_SESSION_CREATED,WHEF_SESSION_DELETED",
            ),
        ],
    )
    .unwrap();
    let shown = |v: &[_]| {
        v.iter()
            .map(|c: &_| format!("{c}"))
            .collect::<Vec<String>>()
    };
    assert_eq!(shown(&s.auth.allow_from), ["10.0.0.0/8", "192.168.1.0/24"]);
    assert_eq!(shown(&s.http.trusted_proxies), ["127.0.0.1/32", "::1/128"]);
    assert_eq!(
        s.events.accept,
        ["WHEF_SESSION_CREATED", "WHEF_SESSION_DELETED"]
    );
}

#[test]
fn bridge_env_is_read_from_the_process_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    write(
        &dir.path().join("config"),
        "staging.toml",
        "[http]\npath = \"/from-staging\"\n",
    );
    let out = output_within(
        Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"))
            .arg("check-config")
            .current_dir(dir.path())
            .env("BRIDGE_ENV", "staging"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("path = \"/from-staging\""), "{text}");
}

#[test]
fn config_before_the_subcommand_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "flag.toml", "[http]\npath = \"/via-flag\"\n");
    let out = bridge(&["--config", file.to_str().unwrap(), "check-config"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("path = \"/via-flag\""), "{text}");
}

#[test]
fn serve_is_the_default_command() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let overrides = write(dir.path(), "test.toml", "[amqp]\nqueues = []\n");
    let exchange = format!("default-cmd.{}", std::process::id());
    let amqp = std::env::var("AMQP_ADDR")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"))
        .args(["--config", overrides.to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("BRIDGE_HTTP__LISTEN", "127.0.0.1:0")
        .env("BRIDGE_ADMIN__LISTEN", "127.0.0.1:0")
        .env("BRIDGE_SPOOL__DIR", dir.path().join("spool"))
        .env("BRIDGE_AMQP__URLS", &amqp)
        .env("BRIDGE_AMQP__EXCHANGE", &exchange)
        .env("BRIDGE_AMQP__DECLARE", "false")
        .env("BRIDGE_LOG__FORMAT", "json")
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start the bridge");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("cellosign-bridge serving") {
                let _ = tx.send(());
            }
        }
    });
    let served = rx.recv_timeout(std::time::Duration::from_secs(30)).is_ok();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(served, "no subcommand did not start serving");
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {status:?}"
    );
}
