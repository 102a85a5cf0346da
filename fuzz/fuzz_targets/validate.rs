//! Arbitrary bytes into the pure webhook validator (SPEC 6 "Bad bytes").
//!
//! Every input is validated under three policies (the default one and two
//! routing key templates with several placeholders). The validator must never
//! panic; on acceptance the result must keep the promises of SPEC 1 and 3,
//! checked here against a plain `serde_json::Value` reading of the same bytes.

#![no_main]

use std::sync::LazyLock;

use cellosign_bridge::{DEFAULT_ACCEPT, Event, Policy, validate};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

struct Case {
    policy: Policy,
    /// The template only names fields that are themselves control-free
    /// (`event.type`, `session.id`, `session.reference`), so the key must be too.
    control_free_key: bool,
}

fn case(accept: &[&str], template: &str, control_free_key: bool) -> Case {
    let accept = accept.iter().map(|t| (*t).to_owned()).collect();
    Case {
        policy: Policy::new(accept, template.parse().expect("template")),
        control_free_key,
    }
}

static CASES: LazyLock<Vec<Case>> = LazyLock::new(|| {
    let mut wider = DEFAULT_ACCEPT.to_vec();
    wider.push("WHEF_FORM_FIELD_CHANGED");
    vec![
        case(&DEFAULT_ACCEPT, "{session.reference}", true),
        case(
            &DEFAULT_ACCEPT,
            "{event.type}.{session.id}.{session.reference}",
            true,
        ),
        case(
            &wider,
            "r.{session.process_id}.{session.recipient.name}",
            false,
        ),
    ]
});

fn text<'v>(v: &'v Value, a: &str, b: &str) -> &'v str {
    v[a][b].as_str().expect("accepted field is a string")
}

/// Checks an accepted event against the bytes it came from.
fn check(body: &[u8], case: &Case, e: &Event<'_>) {
    let key = &e.routing_key;
    assert!(!key.is_empty(), "empty routing key");
    assert!(key.len() <= 255, "routing key of {} bytes", key.len());
    if case.control_free_key {
        assert!(!key.chars().any(char::is_control), "control char in key");
    }
    assert_eq!(
        e.message_id,
        format!("{}:{}:{}", e.session_id, e.event_type, e.timestamp)
    );
    assert!(case.policy.accepts(&e.event_type));
    assert!((1..=128).contains(&e.session_id.len()));
    assert!((1..=255).contains(&e.reference.len()));
    assert!(!e.session_id.chars().any(char::is_control));
    assert!(!e.reference.chars().any(char::is_control));

    // The same bytes read as a plain Value carry the same fields. A value
    // nested deeper than serde_json's recursion limit may be skipped by the
    // validator yet not be readable as a Value: nothing to compare then.
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(err) if err.to_string().contains("recursion limit") => return,
        Err(err) => panic!("accepted, but not JSON to serde_json: {err}"),
    };
    assert!(v.is_object());
    assert_eq!(text(&v, "event", "type"), e.event_type);
    assert_eq!(text(&v, "event", "timestamp"), e.timestamp);
    assert_eq!(text(&v, "session", "id"), e.session_id);
    assert_eq!(text(&v, "session", "reference"), e.reference);
    assert!(v["session"]["transaction_number"].is_u64());
    let pid = &v["session"]["process_id"];
    assert!(pid.is_null() || pid.is_string());
    assert_eq!(pid.as_str(), e.process_id.as_deref());
    let pn = &v["session"]["process_number"];
    assert!(pn.is_null() || pn.is_u64());
    let recipient = &v["session"]["recipient"];
    match recipient {
        Value::Null => assert_eq!(e.recipient_name, None),
        Value::Object(r) => {
            assert!(r["id"].is_i64() || r["id"].is_u64());
            assert_eq!(r["name"].as_str(), e.recipient_name.as_deref());
        }
        _ => panic!("accepted a recipient that is not an object"),
    }
    match &v["session"]["labels"] {
        Value::Null => {}
        Value::Object(labels) => assert!(
            labels
                .values()
                .all(|l| !matches!(l, Value::Array(_) | Value::Object(_)))
        ),
        _ => panic!("accepted labels that are not an object"),
    }
}

fuzz_target!(|body: &[u8]| {
    let mut first: Option<String> = None;
    for case in CASES.iter() {
        // Pure: the same bytes give the same answer.
        let verdict = validate(body, &case.policy);
        assert_eq!(verdict, validate(body, &case.policy));
        match verdict {
            Ok(e) => {
                check(body, case, &e);
                // The message id does not depend on the policy.
                match &first {
                    Some(id) => assert_eq!(id, &e.message_id),
                    None => first = Some(e.message_id.clone()),
                }
            }
            Err(r) => {
                assert!(matches!(r.http_status(), 400 | 422));
                let reason = r.to_string();
                assert!(!reason.is_empty() && reason.len() <= 120, "{reason}");
            }
        }
    }
});
