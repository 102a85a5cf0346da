//! Unit tests of bodies that pass, the policy, and the vectors shared with the
//! integration tests; and the helpers every `tests_*` file of this module uses.
//! The other topics: `tests_fields` (types, bounds, control characters),
//! `tests_keys` (duplicate and escaped keys), `tests_timestamp`,
//! `tests_rejection` (400 or 422, which problem wins, what a reason says) and
//! `tests_template` (the routing key).

use std::borrow::Cow;

use serde_json::{Value, json};

use super::{DEFAULT_ACCEPT, Event, Policy, Rejection, RoutingKeyTemplate, validate};

/// The seed example of the spec: every field the validator reads, all valid.
pub(super) fn base() -> Value {
    json!({
        "event": {"type": "WHEF_SESSION_CREATED", "timestamp": "2025-01-26T08:49:33.626046"},
        "session": {
            "id": "5Wkt78ciJc",
            "reference": "7932390e-ee95-4888-ba64-9c7e6f2f5908",
            "process_id": "proc-1",
            "process_number": 51,
            "transaction_number": 53,
            "recipient": {"id": 1, "name": "client"},
            "labels": {"CUSTOMER_TAG": "CUSTOMER_VALUE"}
        }
    })
}

/// The base body after `edit`, serialized.
pub(super) fn with(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = base();
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// The base body with the value at JSON pointer `path` replaced.
pub(super) fn set(path: &str, value: Value) -> Vec<u8> {
    with(|v| *v.pointer_mut(path).unwrap() = value)
}

/// The base body without the member at JSON pointer `path`.
pub(super) fn remove(path: &str) -> Vec<u8> {
    let (parent, key) = path.rsplit_once('/').unwrap();
    with(|v| {
        v.pointer_mut(parent)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove(key)
            .unwrap();
    })
}

/// The event `body` validates to under `policy`; fails the test if refused.
pub(super) fn ok_with<'a>(body: &'a [u8], policy: &Policy) -> Event<'a> {
    match validate(body, policy) {
        Ok(e) => e,
        Err(r) => panic!("rejected: {r} for {}", String::from_utf8_lossy(body)),
    }
}

/// The event `body` validates to under the default policy.
pub(super) fn ok(body: &[u8]) -> Event<'_> {
    ok_with(body, &Policy::default())
}

/// Why `body` is refused under `policy`; fails the test if accepted.
pub(super) fn rejected_with(body: &[u8], policy: &Policy) -> Rejection {
    match validate(body, policy) {
        Ok(e) => panic!("accepted: {e:?}"),
        Err(r) => r,
    }
}

/// Why `body` is refused under the default policy.
pub(super) fn rejected(body: &[u8]) -> Rejection {
    rejected_with(body, &Policy::default())
}

/// Asserts a 422 with this metric label and a reason starting with `prefix`,
/// for reasons whose tail it need not pin; gives the rejection back.
#[track_caller]
pub(super) fn invalid_prefix(body: &[u8], prefix: &str, metric: &str) -> Rejection {
    let r = rejected(body);
    assert_eq!(
        (r.http_status(), r.metric_reason()),
        (422, metric),
        "body {}",
        String::from_utf8_lossy(body)
    );
    assert!(r.to_string().starts_with(prefix), "{}", r.to_string());
    r
}

/// Asserts a 422 with this reason and metric label.
#[track_caller]
pub(super) fn invalid(body: &[u8], reason: &str, metric: &str) {
    let r = rejected(body);
    assert_eq!(
        (r.http_status(), r.to_string().as_str(), r.metric_reason()),
        (422, reason, metric),
        "body {}",
        String::from_utf8_lossy(body)
    );
}

/// Asserts a 400 and gives back its reason.
#[track_caller]
pub(super) fn malformed(body: &[u8]) -> String {
    let r = rejected(body);
    assert_eq!(
        (r.http_status(), r.metric_reason()),
        (400, "malformed_json")
    );
    r.to_string()
}

/// The default accept list with the routing key `template`.
pub(super) fn policy(template: &str) -> Policy {
    let accept = DEFAULT_ACCEPT.iter().map(|t| (*t).to_owned()).collect();
    Policy::new(accept, template.parse().unwrap())
}

/// A valid `event` object's members, for bodies written raw.
pub(super) const EV: &str = r#""type":"WHEF_SESSION_CREATED","timestamp":"2025-01-26T08:49:33Z""#;
/// A valid `session` object's required members, for bodies written raw.
pub(super) const SE: &str = r#""id":"s1","reference":"r1","transaction_number":1"#;

/// A body written raw (to keep forms `serde_json::Value` would normalise or
/// refuse, such as duplicate keys): `event` and `session` members, then `extra`.
pub(super) fn raw(event: &str, session: &str, extra: &str) -> Vec<u8> {
    format!(r#"{{"event":{{{event}}},"session":{{{session}}}{extra}}}"#).into_bytes()
}

// --- accepted bodies -------------------------------------------------

#[test]
fn seed_example_accepted_and_borrowed() {
    let body = base().to_string().into_bytes();
    let e = ok(&body);
    assert_eq!(e.event_type, "WHEF_SESSION_CREATED");
    assert_eq!(e.timestamp, "2025-01-26T08:49:33.626046");
    assert_eq!(e.session_id, "5Wkt78ciJc");
    assert_eq!(e.reference, "7932390e-ee95-4888-ba64-9c7e6f2f5908");
    assert_eq!(e.process_id.as_deref(), Some("proc-1"));
    assert_eq!(e.recipient_name.as_deref(), Some("client"));
    assert_eq!(e.routing_key, "7932390e-ee95-4888-ba64-9c7e6f2f5908");
    assert_eq!(
        e.message_id,
        "5Wkt78ciJc:WHEF_SESSION_CREATED:2025-01-26T08:49:33.626046"
    );
    for c in [&e.event_type, &e.timestamp, &e.session_id, &e.reference] {
        assert!(matches!(c, Cow::Borrowed(_)));
    }
}

#[test]
fn minimal_body_accepted() {
    let body = raw(EV, SE, "");
    let e = ok(&body);
    assert_eq!(e.process_id, None);
    assert_eq!(e.recipient_name, None);
    assert_eq!(e.message_id, "s1:WHEF_SESSION_CREATED:2025-01-26T08:49:33Z");
}

#[test]
fn escapes_are_unescaped() {
    let body = raw(
        EV,
        r#""id":"s1","reference":"a\"b\u00e9c","transaction_number":1"#,
        "",
    );
    let e = ok(&body);
    assert_eq!(e.reference, "a\"béc");
    assert!(matches!(e.reference, Cow::Owned(_)));
    assert_eq!(e.routing_key, "a\"béc");
}

#[test]
fn unknown_fields_at_every_level_pass() {
    let body = with(|v| {
        v["extra"] = json!({"a": [1, {"b": null}]});
        v["client"] = json!({"ip": "127.0.0.1"});
        v["event"]["extra"] = json!([1.5, "x"]);
        v["session"]["extra"] = json!({"deep": {"deeper": true}});
        v["session"]["recipient"]["email"] = json!("a@b.c");
    });
    ok(&body);
}

#[test]
fn all_default_types_accepted_and_others_not() {
    for t in DEFAULT_ACCEPT {
        assert_eq!(ok(&set("/event/type", json!(t))).event_type, t);
    }
    for t in ["WHEF_FORM_FIELD_CHANGED", "whef_session_created", ""] {
        invalid(
            &set("/event/type", json!(t)),
            "event.type: not an accepted event type",
            "type_not_accepted",
        );
    }
    let custom = Policy::new(vec!["X".into()], RoutingKeyTemplate::default());
    assert_eq!(
        ok_with(&set("/event/type", json!("X")), &custom).event_type,
        "X"
    );
    let r = rejected_with(&base().to_string().into_bytes(), &custom);
    assert_eq!(r.metric_reason(), "type_not_accepted");
}

#[test]
fn policy_accessors() {
    let p = Policy::default();
    assert_eq!(p.accept().len(), 6);
    assert!(p.accepts("WHEF_SESSION_EXPIRED"));
    assert!(!p.accepts("WHEF_FORM_FIELD_CHANGED"));
    assert_eq!(p.routing_key().to_string(), "{session.reference}");
}

// --- shared vectors --------------------------------------------------

#[test]
fn shared_vectors() {
    let policy = Policy::default();
    let mut ran = 0;
    for line in include_str!("../../tests/vectors/cases.jsonl").lines() {
        if line.trim().is_empty() {
            continue;
        }
        let case: Value = serde_json::from_str(line).unwrap();
        let name = case["name"].as_str().unwrap();
        let expect = case["expect_http"].as_u64().unwrap();
        if ![200, 400, 422].contains(&expect) {
            continue;
        }
        let body = case["body"].as_str().unwrap().as_bytes();
        match validate(body, &policy) {
            Ok(e) => {
                assert_eq!(expect, 200, "{name}: accepted");
                assert_eq!(
                    Some(e.routing_key.as_str()),
                    case["routing_key"].as_str(),
                    "{name}"
                );
            }
            Err(r) => assert_eq!(u64::from(r.http_status()), expect, "{name}: {r}"),
        }
        ran += 1;
    }
    assert!(ran >= 23, "ran {ran}");
}
