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

fn bridge(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run the binary")
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("super-secret-token")
            && !text.contains("hunter2")
            && !text.contains("aws-secret-key"),
        "{text}"
    );
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
