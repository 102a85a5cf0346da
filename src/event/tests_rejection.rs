//! Unit tests of how a body is refused: 400 for what is not JSON, a syntax
//! error winning over any semantic problem, the first problem in document
//! order, and reasons that never echo body content.

use serde_json::json;

use super::tests::{EV, SE, base, invalid, malformed, ok, raw, rejected, set};

// --- malformed bodies (400) ------------------------------------------

#[test]
fn malformed_bodies() {
    assert_eq!(malformed(b""), "body: empty");
    assert_eq!(malformed(b" \n\t"), "body: empty");
    assert_eq!(
        malformed(b"this is not json"),
        "body: not valid JSON at line 1 column 2"
    );
    assert_eq!(
        malformed(b"{\"a\":"),
        "body: truncated JSON at line 1 column 5"
    );
    assert_eq!(malformed(b"\xff{}"), "body: not UTF-8 at byte 0");
    let mut body = base().to_string().into_bytes();
    body.extend_from_slice(b" x");
    assert!(malformed(&body).starts_with("body: not valid JSON"));
    body.truncate(body.len() - 2);
    body.extend_from_slice(b"{}");
    malformed(&body);
    body.truncate(body.len() - 10);
    assert!(malformed(&body).starts_with("body: truncated JSON"));
    // Invalid UTF-8 inside a string value.
    let mut body = base().to_string().into_bytes();
    let at = body.windows(6).position(|w| w == b"client").unwrap();
    body[at] = 0xC3;
    malformed(&body);
    // Raw control character inside a JSON string is a JSON syntax error.
    malformed(&raw(
        EV,
        "\"id\":\"a\u{1}b\",\"reference\":\"r\",\"transaction_number\":1",
        "",
    ));
    malformed(b"{\"a\":1,}");
    malformed(b"\xef\xbb\xbf{}");
}

#[test]
fn deep_nesting_in_skipped_values_is_fine() {
    // Skipped values are consumed without recursion, so depth costs no stack.
    let deep = format!(",\"x\":{}{}", "[".repeat(100_000), "]".repeat(100_000));
    ok(&raw(EV, SE, &deep));
    let labels = format!(
        r#"{SE},"labels":{{"k":{}{}}}"#,
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    invalid(
        &raw(EV, &labels, ""),
        "session.labels: values must be strings, numbers, booleans or null",
        "wrong_type",
    );
    malformed(&raw(EV, SE, &format!(",\"x\":{}", "[".repeat(1000))));
}

#[test]
fn number_out_of_f64_range() {
    // Skipped: fine. As a label value serde_json cannot represent it: 400.
    ok(&raw(EV, SE, r#","x":1e400"#));
    malformed(&raw(EV, &format!(r#"{SE},"labels":{{"k":1e400}}"#), ""));
}

#[test]
fn syntax_error_after_semantic_problem_wins() {
    // Semantic problems first, syntax error at the very end.
    let cases = [
        r#"[1,2,3"#,
        r#"{"event":[],"session":{"id":1},"x":[1,}"#,
        r#"{"event":{"type":"NOPE","type":"NOPE"},"session":{},"x":tru}"#,
        r#"{"event":{},"session":{"labels":{"a":{"b":[]}}}} trailing"#,
        r#"{"session":{"reference":"","reference":""},"a":1,"a":2,"z":"\x"}"#,
        r#"{"event":{"type":1,"timestamp":"bad"},"session":{"id":"","transaction_number":-1}"#,
    ];
    for body in cases {
        let r = rejected(body.as_bytes());
        assert_eq!(r.http_status(), 400, "{body}: {r}");
    }
}

#[test]
fn first_problem_in_document_order_is_reported() {
    let body =
        br#"{"session":{"id":"","reference":"","transaction_number":-1},"event":{"type":1}}"#;
    invalid(body, "session.id: empty", "empty");
}

// --- reasons ---------------------------------------------------------

#[test]
fn reasons_never_echo_body_content() {
    let secret = "SECRETVALUE";
    let bodies = [
        set("/session/labels", json!({secret: {secret: secret}})),
        set("/event/type", json!(secret)),
        set("/event/timestamp", json!(secret)),
        set("/session/reference", json!(format!("{secret}\u{1}"))),
        set("/session/id", json!(secret.repeat(20))),
        raw(EV, &format!(r#"{SE},"{secret}":1,"{secret}":2"#), ""),
    ];
    for body in bodies {
        let r = rejected(&body);
        assert!(!r.to_string().contains(secret), "{r}");
        assert!(r.to_string().len() <= 120, "{r}");
    }
}
