//! Unit tests of each field's rules: required or optional, its JSON type,
//! integer forms, string bounds and emptiness, control characters, labels.

use serde_json::{Value, json};

use super::tests::{EV, invalid, ok, raw, rejected, remove, set};

// --- top level and missing / wrong type -------------------------------

#[test]
fn top_level_must_be_object() {
    for body in ["[1,2,3]", "\"x\"", "1", "null", "true", "[]"] {
        invalid(body.as_bytes(), "body: not a JSON object", "not_object");
    }
}

#[test]
fn each_required_field_missing() {
    for (path, reason) in [
        ("/event", "event: missing"),
        ("/session", "session: missing"),
        ("/event/type", "event.type: missing"),
        ("/event/timestamp", "event.timestamp: missing"),
        ("/session/id", "session.id: missing"),
        ("/session/reference", "session.reference: missing"),
        (
            "/session/transaction_number",
            "session.transaction_number: missing",
        ),
        ("/session/recipient/id", "session.recipient.id: missing"),
        ("/session/recipient/name", "session.recipient.name: missing"),
    ] {
        invalid(&remove(path), reason, "missing_field");
    }
}

#[test]
fn optional_fields_absent_or_null() {
    for path in [
        "/session/process_id",
        "/session/process_number",
        "/session/recipient",
        "/session/labels",
    ] {
        ok(&remove(path));
        ok(&set(path, Value::Null));
    }
    let body = set("/session/process_id", Value::Null);
    let e = ok(&body);
    assert_eq!(e.process_id, None);
    assert_eq!(
        ok(&set("/session/recipient", Value::Null)).recipient_name,
        None
    );
}

#[test]
fn wrong_types() {
    let cases: &[(&str, Value, &str)] = &[
        ("/event", json!([]), "event: must be an object"),
        ("/event", json!(null), "event: must be an object"),
        ("/session", json!("s"), "session: must be an object"),
        ("/event/type", json!(1), "event.type: must be a string"),
        ("/event/type", json!(null), "event.type: must be a string"),
        (
            "/event/timestamp",
            json!(1737881373),
            "event.timestamp: must be a string",
        ),
        ("/session/id", json!(5), "session.id: must be a string"),
        ("/session/id", json!(null), "session.id: must be a string"),
        (
            "/session/reference",
            json!({"a": 1}),
            "session.reference: must be a string",
        ),
        (
            "/session/reference",
            json!(["r"]),
            "session.reference: must be a string",
        ),
        (
            "/session/process_id",
            json!(7),
            "session.process_id: must be a string or null",
        ),
        (
            "/session/recipient",
            json!("c"),
            "session.recipient: must be an object or null",
        ),
        (
            "/session/recipient",
            json!([]),
            "session.recipient: must be an object or null",
        ),
        (
            "/session/recipient/id",
            json!("1"),
            "session.recipient.id: must be an integer",
        ),
        (
            "/session/recipient/id",
            json!(1.5),
            "session.recipient.id: must be an integer",
        ),
        (
            "/session/recipient/id",
            json!(null),
            "session.recipient.id: must be an integer",
        ),
        (
            "/session/recipient/name",
            json!(1),
            "session.recipient.name: must be a string",
        ),
        (
            "/session/recipient/name",
            json!(null),
            "session.recipient.name: must be a string",
        ),
        (
            "/session/labels",
            json!([]),
            "session.labels: must be an object or null",
        ),
        (
            "/session/labels",
            json!("l"),
            "session.labels: must be an object or null",
        ),
    ];
    for (path, value, reason) in cases {
        invalid(&set(path, value.clone()), reason, "wrong_type");
    }
}

#[test]
fn recipient_id_any_integer() {
    ok(&set("/session/recipient/id", json!(-3)));
    ok(&set("/session/recipient/id", json!(u64::MAX)));
}

#[test]
fn integers_not_strings_floats_or_negatives() {
    let tn = "session.transaction_number: must be an integer >= 0";
    let pn = "session.process_number: must be an integer >= 0 or null";
    for bad in [
        json!("53"),
        json!(53.0),
        json!(-1),
        json!(1e3),
        json!(true),
        json!(null),
    ] {
        invalid(
            &set("/session/transaction_number", bad.clone()),
            tn,
            "wrong_type",
        );
        if !bad.is_null() {
            invalid(&set("/session/process_number", bad), pn, "wrong_type");
        }
    }
    // Raw forms that serde_json::Value would normalise.
    for bad in ["53.0", "5.3e1", "-0", "18446744073709551616"] {
        let body = raw(
            EV,
            &format!(r#""id":"s","reference":"r","transaction_number":{bad}"#),
            "",
        );
        invalid(&body, tn, "wrong_type");
    }
    for good in ["0", "18446744073709551615"] {
        ok(&raw(
            EV,
            &format!(r#""id":"s","reference":"r","transaction_number":{good}"#),
            "",
        ));
        ok(&set(
            "/session/process_number",
            serde_json::from_str(good).unwrap(),
        ));
    }
}

// --- strings: bounds, emptiness, control characters ---------------------

/// Asserts the bounds of the required text at JSON pointer `pointer` (reason
/// path `path`): `max` bytes fit and one more does not, counted in bytes also
/// when `wide`, a multi-byte character, fills the `max` bytes; empty is refused.
#[track_caller]
fn text_bounds(pointer: &str, path: &str, max: usize, wide: &str) {
    let too_long = format!("{path}: longer than {max} bytes");
    ok(&set(pointer, json!("a".repeat(max))));
    invalid(
        &set(pointer, json!("a".repeat(max + 1))),
        &too_long,
        "too_long",
    );
    let full = wide.repeat(max / wide.len());
    assert_eq!(full.len(), max, "{wide:?} must fill {max} bytes exactly");
    ok(&set(pointer, json!(full)));
    invalid(
        &set(pointer, json!(format!("{full}a"))),
        &too_long,
        "too_long",
    );
    invalid(&set(pointer, json!("")), &format!("{path}: empty"), "empty");
}

#[test]
fn session_id_bounds() {
    // 64 two-byte characters = 128 bytes; one more byte is too many.
    text_bounds("/session/id", "session.id", 128, "é");
}

#[test]
fn reference_bounds() {
    // 85 three-byte characters = 255 bytes.
    text_bounds("/session/reference", "session.reference", 255, "€");
}

#[test]
fn control_characters_rejected() {
    for esc in [
        r"\u0001", r"\u0000", r"\n", r"\t", r"\u007f", r"\u0085", r"\u009f",
    ] {
        let bad = format!("a{esc}b");
        for (session, path) in [
            (
                format!(r#""id":"{bad}","reference":"r","transaction_number":1"#),
                "session.id",
            ),
            (
                format!(r#""id":"s","reference":"{bad}","transaction_number":1"#),
                "session.reference",
            ),
        ] {
            let reason = format!("{path}: contains a control character");
            invalid(&raw(EV, &session, ""), &reason, "control_character");
        }
    }
    // Raw (unescaped) C1 and DEL characters too.
    invalid(
        &set("/session/reference", json!("a\u{85}b")),
        "session.reference: contains a control character",
        "control_character",
    );
    invalid(
        &set("/session/id", json!("a\u{7f}b")),
        "session.id: contains a control character",
        "control_character",
    );
    // Non-Cc characters (format, separators) are fine.
    ok(&set(
        "/session/reference",
        json!("a\u{200b}b\u{2028}c\u{a0}"),
    ));
}

// --- labels ----------------------------------------------------------

#[test]
fn labels_values_must_be_scalars() {
    ok(&set(
        "/session/labels",
        json!({"s": "v", "n": 1, "f": -1.5, "b": false, "z": null}),
    ));
    ok(&set("/session/labels", json!({})));
    for bad in [json!({"SECRET": {"nested": 1}}), json!({"SECRET": ["v"]})] {
        let body = set("/session/labels", bad);
        let r = rejected(&body);
        assert_eq!(
            r.to_string(),
            "session.labels: values must be strings, numbers, booleans or null"
        );
        assert_eq!(r.metric_reason(), "wrong_type");
        assert!(!r.to_string().contains("SECRET"));
    }
}

#[test]
fn the_message_id_may_be_255_bytes_and_no_more() {
    // "5Wkt78ciJc:WHEF_SESSION_CREATED:" is 32 bytes, the timestamp's fixed part 20.
    let stamp = |digits: usize| json!(format!("2025-01-26T08:49:33.{}", "1".repeat(digits)));
    let at_limit = set("/event/timestamp", stamp(255 - 32 - 20));
    assert_eq!(ok(&at_limit).message_id.len(), 255);
    invalid(
        &set("/event/timestamp", stamp(255 - 32 - 20 + 1)),
        "event.timestamp: too long: the message id {session.id}:{event.type}:{event.timestamp} would exceed 255 bytes",
        "too_long",
    );
}
