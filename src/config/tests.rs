//! What the settings give the rest of the bridge: durations in the unit their keys name,
//! and limits exactly where the refusals say they are. The layering and the refusal of
//! each key through real files and environments are in `tests/config.rs`.

use std::time::Duration;

use super::*;

/// A check's outcome as the tests compare it: "accepted", or the refusal's text
/// (which starts with the key it names). The `config` submodules' tests use it too.
pub(super) fn verdict(checked: Result<(), ConfigError>) -> String {
    checked.map_or_else(|e| e.to_string(), |()| "accepted".to_string())
}

/// The verdict on the default settings changed by `change`.
fn verdict_with(change: impl FnOnce(&mut Settings)) -> String {
    let mut settings = Settings::default();
    change(&mut settings);
    verdict(settings.check())
}

#[test]
fn every_duration_is_its_key_in_milliseconds() {
    let mut s = Settings::default();
    s.http.header_read_timeout_ms = 1_001;
    s.http.body_read_timeout_ms = 1_002;
    s.http.idle_timeout_ms = 1_003;
    s.spool.append_timeout_ms = 1_004;
    s.shutdown.grace_ms = 1_005;
    s.amqp.publish_timeout_ms = 1_006;
    s.amqp.reconnect_initial_ms = 1_007;
    s.amqp.reconnect_max_ms = 1_008;
    s.archive.store_timeout_ms = 1_009;
    s.telemetry.export_interval_ms = 1_010;
    s.telemetry.export_timeout_ms = 1_011;
    let got = [
        s.http.header_read_timeout(),
        s.http.body_read_timeout(),
        s.http.idle_timeout(),
        s.spool.append_timeout(),
        s.shutdown.grace(),
        s.amqp.publish_timeout(),
        s.amqp.reconnect_initial(),
        s.amqp.reconnect_max(),
        s.archive.store_timeout(),
        s.telemetry.export_interval(),
        s.telemetry.export_timeout(),
    ];
    let want: Vec<Duration> = (1_001..=1_011).map(Duration::from_millis).collect();
    assert_eq!(got.to_vec(), want);
}

#[test]
fn a_body_limit_may_reach_one_gib_less_a_page_and_no_further() {
    assert_eq!(MAX_BODY_LIMIT, (1 << 30) - 4096);
    assert_eq!(
        verdict_with(|s| s.http.max_body_bytes = MAX_BODY_LIMIT),
        "accepted"
    );
    assert_eq!(
        verdict_with(|s| s.http.archive_max_body_bytes = MAX_BODY_LIMIT),
        "accepted"
    );
    let over = verdict_with(|s| s.http.max_body_bytes = MAX_BODY_LIMIT + 1);
    assert!(over.starts_with("http.max_body_bytes: "), "{over}");
    let over = verdict_with(|s| s.http.archive_max_body_bytes = MAX_BODY_LIMIT + 1);
    assert!(over.starts_with("http.archive_max_body_bytes: "), "{over}");
}

#[test]
fn tls_files_must_exist() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, "cert").expect("write");
    std::fs::write(&key, "key").expect("write");
    let tls = |cert: &std::path::Path, key: &std::path::Path| {
        let tls = TlsSettings {
            cert_file: cert.to_path_buf(),
            key_file: key.to_path_buf(),
        };
        verdict_with(|s| s.http.tls = Some(tls))
    };
    assert_eq!(tls(&cert, &key), "accepted");
    let missing = dir.path().join("missing.pem");
    assert!(tls(&missing, &key).starts_with("http.tls.cert_file: "));
    assert!(tls(&cert, &missing).starts_with("http.tls.key_file: "));
}

#[test]
fn the_spool_cache_may_be_as_small_as_one_mib() {
    assert_eq!(
        verdict_with(|s| s.spool.cache_bytes = MIN_SPOOL_CACHE),
        "accepted"
    );
    let small = verdict_with(|s| s.spool.cache_bytes = MIN_SPOOL_CACHE - 1);
    assert!(small.starts_with("spool.cache_bytes: "), "{small}");
}

#[test]
fn only_spooled_mode_needs_a_spool_directory() {
    let no_dir = |ack| {
        verdict_with(|s| {
            s.delivery.ack = ack;
            s.spool.dir = PathBuf::new();
        })
    };
    assert_eq!(no_dir(AckMode::Confirmed), "accepted");
    assert!(no_dir(AckMode::Spooled).starts_with("spool.dir: "));
}

#[test]
fn an_event_type_is_one_to_64_printable_characters() {
    let accept = |t: &str| verdict_with(|s| s.events.accept = vec![t.to_string()]);
    assert_eq!(accept(&"A".repeat(MAX_EVENT_TYPE_LEN)), "accepted");
    assert_eq!(accept("A"), "accepted");
    for refused in [
        String::new(),
        "A".repeat(MAX_EVENT_TYPE_LEN + 1),
        "WHEF SESSION".to_string(),
        "WHEF_\u{e9}".to_string(),
    ] {
        assert!(
            accept(&refused).starts_with("events.accept: "),
            "{refused:?} accepted"
        );
    }
}

#[test]
fn dedup_needs_room_for_ids_only_while_it_is_on() {
    let dedup = |window, ids| {
        verdict_with(|s| {
            s.events.dedup_window_s = window;
            s.events.dedup_max_ids = ids;
        })
    };
    assert_eq!(dedup(0, 0), "accepted", "dedup off needs no ids");
    assert_eq!(dedup(1, 1), "accepted");
    assert!(dedup(1, 0).starts_with("events.dedup_max_ids: "));
}

#[test]
fn a_client_is_a_user_or_a_client_id_never_both() {
    let client = |user: Option<&str>, id: Option<&str>| ClientSettings {
        username: user.map(String::from),
        client_id: id.map(String::from),
        ..ClientSettings::default()
    };
    assert_eq!(
        client(Some("u"), None).identity(),
        Some((ClientKind::User, "u"))
    );
    assert_eq!(
        client(None, Some("c")).identity(),
        Some((ClientKind::Client, "c"))
    );
    assert_eq!(client(Some("u"), Some("c")).identity(), None);
    assert_eq!(client(None, None).identity(), None);
}

#[test]
fn each_client_kind_reads_its_own_secret_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("secret");
    std::fs::write(&file, "s3cret\n").expect("write");
    let load = |client: ClientSettings| {
        let mut auth = AuthSettings {
            clients: vec![client],
            ..AuthSettings::default()
        };
        auth.load_files()
            .map(|()| {
                auth.clients[0]
                    .secret
                    .as_ref()
                    .map(|s| s.expose().to_string())
            })
            .map_err(|e| e.to_string())
    };
    let user = ClientSettings {
        username: Some("u".into()),
        password_file: Some(file.clone()),
        ..ClientSettings::default()
    };
    let id = ClientSettings {
        client_id: Some("c".into()),
        client_secret_file: Some(file.clone()),
        ..ClientSettings::default()
    };
    assert_eq!(load(user), Ok(Some("s3cret".to_string())));
    assert_eq!(load(id), Ok(Some("s3cret".to_string())));
    let no_password = ClientSettings {
        username: Some("u".into()),
        ..ClientSettings::default()
    };
    let no_secret = ClientSettings {
        client_id: Some("c".into()),
        ..ClientSettings::default()
    };
    assert_eq!(
        load(no_password),
        Err("auth.clients[0].password_file: missing".to_string())
    );
    assert_eq!(
        load(no_secret),
        Err("auth.clients[0].client_secret_file: missing".to_string())
    );
}

#[test]
fn a_client_name_is_1_to_128_bytes_without_control_characters() {
    let named = |name: &str| {
        let mut auth = AuthSettings {
            clients: vec![ClientSettings {
                client_id: Some(name.to_string()),
                ..ClientSettings::default()
            }],
            ..AuthSettings::default()
        };
        auth.token_keys = vec![Secret::from("k".repeat(32))];
        verdict(auth.check("/webhooks/cellosign"))
    };
    assert_eq!(named(&"c".repeat(128)), "accepted");
    assert_eq!(named("c"), "accepted");
    for bad in [String::new(), "c".repeat(129), "c\u{7}".to_string()] {
        assert!(
            named(&bad).starts_with("auth.clients[0].client_id: "),
            "{bad:?}: {}",
            named(&bad)
        );
    }
}
