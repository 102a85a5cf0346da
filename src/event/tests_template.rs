//! Unit tests of the routing key template: each placeholder, a missing field,
//! the key's bounds, parse errors, and `Display` giving back the source.

use serde_json::{Value, json};

use super::template::{DEFAULT_ROUTING_KEY, RoutingKeyTemplate, TemplateError};
use super::tests::{base, ok, ok_with, policy, rejected_with, remove, set};

// --- routing key template --------------------------------------------

#[test]
fn template_each_placeholder() {
    let body = base().to_string().into_bytes();
    for (template, key) in [
        ("{event.type}", "WHEF_SESSION_CREATED"),
        (
            "{session.reference}",
            "7932390e-ee95-4888-ba64-9c7e6f2f5908",
        ),
        ("{session.id}", "5Wkt78ciJc"),
        ("{session.process_id}", "proc-1"),
        ("{session.recipient.name}", "client"),
        (
            "cellosign.{event.type}.{session.id}!",
            "cellosign.WHEF_SESSION_CREATED.5Wkt78ciJc!",
        ),
        ("{session.id}{session.id}", "5Wkt78ciJc5Wkt78ciJc"),
        ("constant", "constant"),
        ("é.{session.recipient.name}", "é.client"),
    ] {
        assert_eq!(
            ok_with(&body, &policy(template)).routing_key,
            key,
            "{template}"
        );
    }
}

#[test]
fn template_missing_field_rejects() {
    let p = policy("x.{session.process_id}");
    for body in [
        remove("/session/process_id"),
        set("/session/process_id", Value::Null),
    ] {
        let r = rejected_with(&body, &p);
        assert_eq!(
            (r.http_status(), r.to_string().as_str(), r.metric_reason()),
            (
                422,
                "session.process_id: missing, needed by amqp.routing_key",
                "routing_key"
            )
        );
    }
    let p = policy("{session.recipient.name}");
    for body in [
        remove("/session/recipient"),
        set("/session/recipient", Value::Null),
    ] {
        assert_eq!(
            rejected_with(&body, &p).to_string(),
            "session.recipient.name: missing, needed by amqp.routing_key"
        );
    }
}

#[test]
fn template_empty_and_too_long_keys() {
    let p = policy("{session.process_id}");
    let r = rejected_with(&set("/session/process_id", json!("")), &p);
    assert_eq!(
        (r.to_string().as_str(), r.metric_reason()),
        ("routing key: empty", "routing_key")
    );
    let p = policy("{session.process_id}.{session.reference}");
    let long = set("/session/process_id", json!("p".repeat(254)));
    let r = rejected_with(&long, &p);
    assert_eq!(
        (r.to_string().as_str(), r.metric_reason()),
        ("routing key: longer than 255 bytes", "routing_key")
    );
    let fits = set("/session/process_id", json!("p".repeat(254 - 36)));
    assert_eq!(ok_with(&fits, &p).routing_key.len(), 255);
    // Reference at its own limit still fits the default template.
    let body = set("/session/reference", json!("r".repeat(255)));
    assert_eq!(ok(&body).routing_key.len(), 255);
    let p = policy("x{session.reference}");
    assert_eq!(
        rejected_with(&body, &p).to_string(),
        "routing key: longer than 255 bytes"
    );
}

#[test]
fn template_parse_errors() {
    let parse = |t: &str| t.parse::<RoutingKeyTemplate>();
    assert_eq!(parse(""), Err(TemplateError::Empty));
    assert_eq!(
        parse("{session.foo}"),
        Err(TemplateError::UnknownPlaceholder("session.foo".into()))
    );
    assert_eq!(
        parse("{}"),
        Err(TemplateError::UnknownPlaceholder(String::new()))
    );
    assert_eq!(
        parse("a{session.id"),
        Err(TemplateError::UnbalancedBrace(1))
    );
    assert_eq!(parse("a}b"), Err(TemplateError::UnbalancedBrace(1)));
    assert_eq!(
        parse("{session.id}}"),
        Err(TemplateError::UnbalancedBrace(12))
    );
    assert_eq!(
        parse("{a{session.id}}"),
        Err(TemplateError::UnbalancedBrace(0))
    );
    assert_eq!(parse(&"x".repeat(256)), Err(TemplateError::LiteralTooLong));
    // The literal text is counted across placeholders, and 255 bytes of it fit.
    let split = |before: usize, after: usize| {
        parse(&format!(
            "{}{{session.id}}{}",
            "x".repeat(before),
            "y".repeat(after)
        ))
    };
    assert_eq!(split(200, 56), Err(TemplateError::LiteralTooLong));
    assert!(split(200, 55).is_ok());
    let e = parse("{bogus}").unwrap_err().to_string();
    assert!(e.contains("unknown placeholder {bogus}"), "{e}");
    assert!(e.contains("{session.recipient.name}"), "{e}");
}

#[test]
fn template_display_round_trips() {
    for t in [
        "{session.reference}",
        "a.{event.type}-{session.id}.b",
        "plain",
    ] {
        let parsed: RoutingKeyTemplate = t.parse().unwrap();
        assert_eq!(parsed.to_string(), t);
        assert_eq!(
            parsed.to_string().parse::<RoutingKeyTemplate>().unwrap(),
            parsed
        );
    }
    assert_eq!(
        RoutingKeyTemplate::default().to_string(),
        DEFAULT_ROUTING_KEY
    );
    assert_eq!(
        RoutingKeyTemplate::default(),
        DEFAULT_ROUTING_KEY.parse().unwrap()
    );
}
