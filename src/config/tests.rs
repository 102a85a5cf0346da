//! What the settings give the rest of the bridge: durations in the unit their keys name,
//! and limits exactly where the refusals say they are. The layering and the refusal of
//! each key through real files and environments are in `tests/config.rs`.

use std::time::Duration;

use super::*;

/// The refusal of the default settings changed by `change`, or "accepted".
fn verdict_with(change: impl FnOnce(&mut Settings)) -> String {
    let mut settings = Settings::default();
    change(&mut settings);
    settings
        .check()
        .map(|()| "accepted".to_string())
        .unwrap_or_else(|e| e.to_string())
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
