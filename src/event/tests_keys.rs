//! Unit tests of object keys: duplicates refused where a consumer could read
//! another value than the one checked, allowed deeper; escaped keys matched by
//! their unescaped name; members in any order.

use serde_json::json;

use super::keys::KnownKey;
use super::session::SessionKey;
use super::tests::{EV, SE, invalid, invalid_prefix, ok, raw, rejected, set};

#[test]
fn escaped_known_keys_are_recognised() {
    let body = raw(
        EV,
        r#""i\u0064":"s1","reference":"r1","transaction_number":1"#,
        "",
    );
    assert_eq!(ok(&body).session_id, "s1");
    let body = raw(
        EV,
        r#""i\u0064":"s1","id":"s2","reference":"r1","transaction_number":1"#,
        "",
    );
    invalid(&body, "session: duplicate key \"id\"", "duplicate_key");
}

// --- duplicate keys --------------------------------------------------

#[test]
fn duplicate_keys_rejected_at_top_event_session() {
    invalid(
        &raw(EV, SE, r#","event":{}"#),
        "body: duplicate key \"event\"",
        "duplicate_key",
    );
    invalid(
        &raw(EV, SE, r#","session":{}"#),
        "body: duplicate key \"session\"",
        "duplicate_key",
    );
    invalid(
        &raw(EV, SE, r#","x":1,"x":2"#),
        "body: duplicate key",
        "duplicate_key",
    );
    invalid(
        &raw(&format!(r#"{EV},"type":"WHEF_SESSION_DELETED""#), SE, ""),
        "event: duplicate key \"type\"",
        "duplicate_key",
    );
    invalid(
        &raw(
            &format!(r#"{EV},"timestamp":"2025-01-26T08:49:33Z""#),
            SE,
            "",
        ),
        "event: duplicate key \"timestamp\"",
        "duplicate_key",
    );
    invalid(
        &raw(&format!(r#"{EV},"y":1,"y":1"#), SE, ""),
        "event: duplicate key",
        "duplicate_key",
    );
    for key in SessionKey::ALL.iter().map(|k| k.name()) {
        let body = raw(EV, &format!(r#"{SE},"{key}":null,"{key}":null"#), "");
        let r = rejected(&body);
        assert_eq!(r.metric_reason(), "duplicate_key", "{key}");
        assert_eq!(r.to_string(), format!("session: duplicate key \"{key}\""));
    }
    invalid(
        &raw(EV, &format!(r#"{SE},"extra":1,"extra":[]"#), ""),
        "session: duplicate key",
        "duplicate_key",
    );
    // Keys differing only by escaping are the same key.
    invalid(
        &raw(EV, &format!(r#"{SE},"k\u00e9":1,"kbé":1,"ké":2"#), ""),
        "session: duplicate key",
        "duplicate_key",
    );
}

#[test]
fn duplicate_keys_deeper_allowed() {
    let session = format!(
        r#"{SE},"labels":{{"A":"1","A":"2"}},"recipient":{{"id":1,"name":"x","o":1,"o":2}},"extra":{{"z":1,"z":2}}"#
    );
    let body = raw(EV, &session, r#","client":{"ip":"a","ip":"b"}"#);
    let e = ok(&body);
    assert_eq!(e.recipient_name.as_deref(), Some("x"));
}

#[test]
fn duplicate_recipient_name_rejected() {
    // The name can be routed by, so it gets the same protection as `session`.
    for recipient in [
        r#"{"id":1,"name":"x","name":"y"}"#,
        r#"{"id":1,"id":2,"name":"x"}"#,
    ] {
        let session = format!(r#"{SE},"recipient":{recipient}"#);
        invalid_prefix(
            &raw(EV, &session, ""),
            "session.recipient: duplicate key",
            "duplicate_key",
        );
    }
}

#[test]
fn recipient_members_in_any_order() {
    let body = set("/session/recipient", json!({"name": "client", "id": 1}));
    assert_eq!(ok(&body).recipient_name.as_deref(), Some("client"));
}
