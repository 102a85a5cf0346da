//! Unit tests of the archive webhook's validation (SPEC 9): one session or an
//! array, one reference, the archive type on its own path only, and the rest
//! passed through.

use serde_json::{Value, json};

use super::{Policy, RoutingKeyTemplate, validate, validate_archive};

/// An archive of two sessions of one process, with content the bridge must not read.
fn archive() -> Value {
    json!({
        "event": {"type": "WHP_ARCHIVE", "timestamp": "2025-01-27T14:02:11.105934"},
        "session": [
            {"id": "Arc1", "author": "ops", "reference": "ref-1", "transaction_number": 101,
             "recipient": {"id": 1, "name": "client"}, "labels": {"K": "V"}},
            {"id": "Arc2", "reference": "ref-1", "transaction_number": "not checked",
             "recipient": {"name": ["not", "checked"]}, "labels": {"K": {"nested": true}}}
        ],
        "form": {"fields": [{"id": "full_name", "value": "Dana Levi"}]},
        "documents": [{"name": "contract.pdf", "content": "JVBERi0xLjQK"}]
    })
}

/// The archive after `edit`, serialized.
fn edited(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = archive();
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// The reason `body` is refused for on the archive path, with its HTTP status.
fn refused(body: &[u8], policy: &Policy) -> (u16, String) {
    match validate_archive(body, policy) {
        Ok(e) => panic!("accepted: {e:?}"),
        Err(r) => (r.http_status(), r.to_string()),
    }
}

#[test]
fn an_array_of_sessions_routes_by_their_reference_and_ids_by_the_first() {
    let body = edited(|_| {});
    let e = validate_archive(&body, &Policy::default()).unwrap();
    assert_eq!(e.routing_key, "ref-1");
    assert_eq!(e.event_type, "WHP_ARCHIVE");
    assert_eq!(e.session_id, "Arc1");
    assert_eq!(e.reference, "ref-1");
    assert_eq!(e.message_id, "Arc1:WHP_ARCHIVE:2025-01-27T14:02:11.105934");
}

#[test]
fn a_single_session_object_is_an_archive_of_one() {
    let body = edited(|v| v["session"] = v["session"][0].take());
    let e = validate_archive(&body, &Policy::default()).unwrap();
    assert_eq!(
        (e.routing_key.as_str(), e.message_id.as_str()),
        ("ref-1", "Arc1:WHP_ARCHIVE:2025-01-27T14:02:11.105934")
    );
}

#[test]
fn references_must_all_be_equal_and_the_reason_names_the_item() {
    let body = edited(|v| v["session"][1]["reference"] = "ref-2".into());
    assert_eq!(
        refused(&body, &Policy::default()),
        (
            422,
            "session[1].reference: differs from session[0].reference".into()
        )
    );
    // Equal once unescaped: the same reference.
    let body = edited(|_| {});
    let escaped = String::from_utf8(body)
        .unwrap()
        .replacen("\"ref-1\"", "\"ref\\u002d1\"", 2);
    assert!(validate_archive(escaped.as_bytes(), &Policy::default()).is_ok());
}

#[test]
fn each_session_needs_an_id_and_a_reference_by_the_spec_1_rules() {
    let p = Policy::default();
    let no_ref = edited(|v| {
        v["session"][1].as_object_mut().unwrap().remove("reference");
    });
    assert_eq!(
        refused(&no_ref, &p).1,
        "session[1].reference: missing".to_string()
    );
    let no_id = edited(|v| {
        v["session"][0].as_object_mut().unwrap().remove("id");
    });
    assert_eq!(refused(&no_id, &p).1, "session[0].id: missing");
    let control = edited(|v| v["session"][1]["id"] = "a\u{7}b".into());
    assert_eq!(
        refused(&control, &p).1,
        "session[1].id: contains a control character"
    );
    let long = edited(|v| v["session"][0]["reference"] = "r".repeat(256).into());
    assert_eq!(
        refused(&long, &p).1,
        "session[0].reference: longer than 255 bytes"
    );
    let single = edited(|v| {
        let mut s = v["session"][0].take();
        s.as_object_mut().unwrap().remove("reference");
        v["session"] = s;
    });
    assert_eq!(refused(&single, &p).1, "session.reference: missing");
}

#[test]
fn session_must_be_an_object_or_a_non_empty_array_of_objects() {
    let p = Policy::default();
    let empty = edited(|v| v["session"] = json!([]));
    assert_eq!(refused(&empty, &p), (422, "session: empty".into()));
    let scalar = edited(|v| v["session"] = json!("s"));
    assert_eq!(
        refused(&scalar, &p).1,
        "session: must be an object or an array of objects"
    );
    let null = edited(|v| v["session"] = Value::Null);
    assert_eq!(
        refused(&null, &p).1,
        "session: must be an object or an array of objects"
    );
    let item = edited(|v| v["session"][1] = json!(7));
    assert_eq!(refused(&item, &p).1, "session[1]: must be an object");
    let missing = edited(|v| {
        v.as_object_mut().unwrap().remove("session");
    });
    assert_eq!(refused(&missing, &p).1, "session: missing");
}

#[test]
fn duplicate_keys_in_a_session_or_at_the_top_are_refused() {
    let p = Policy::default();
    let body = String::from_utf8(edited(|_| {})).unwrap();
    let dup = body.replacen(
        "\"reference\":\"ref-1\"",
        "\"reference\":\"ref-1\",\"reference\":\"ref-9\"",
        2,
    );
    let (code, reason) = refused(dup.as_bytes(), &p);
    assert_eq!(code, 422);
    assert!(reason.starts_with("session[0]: duplicate key"), "{reason}");
    let top = format!("{},\"session\":{{}}}}", &body[..body.len() - 1]);
    assert!(refused(top.as_bytes(), &p).1.contains("duplicate key"));
}

#[test]
fn the_archive_type_is_accepted_on_the_archive_path_only() {
    let p = Policy::default();
    let notification = edited(|v| v["event"]["type"] = "WHEF_SESSION_CREATED".into());
    assert_eq!(
        refused(&notification, &p).1,
        "event.type: not an accepted event type"
    );
    // On the notification path, even a policy listing it does not accept it.
    let archive = edited(|v| v["session"] = v["session"][0].take());
    let listed = Policy::new(vec!["WHP_ARCHIVE".into()], RoutingKeyTemplate::default());
    let err = validate(&archive, &listed).unwrap_err();
    assert_eq!(err.to_string(), "event.type: not an accepted event type");
}

#[test]
fn the_timestamp_and_syntax_rules_are_the_notifications() {
    let p = Policy::default();
    let ts = edited(|v| v["event"]["timestamp"] = "2025-02-30T00:00:00".into());
    assert_eq!(
        refused(&ts, &p).1,
        "event.timestamp: not a real calendar date and time"
    );
    let body = edited(|_| {});
    assert_eq!(refused(&body[..body.len() - 1], &p).0, 400);
    // A syntax error after a semantic problem still wins.
    let late = String::from_utf8(edited(|v| v["session"] = json!([]))).unwrap() + "x";
    assert_eq!(refused(late.as_bytes(), &p).0, 400);
}

#[test]
fn the_template_renders_against_the_first_session() {
    let policy = |t: &str| Policy::new(Vec::new(), t.parse().unwrap());
    let body = edited(|_| {});
    let e = validate_archive(
        &body,
        &policy("{event.type}.{session.id}.{session.recipient.name}"),
    )
    .unwrap();
    assert_eq!(e.routing_key, "WHP_ARCHIVE.Arc1.client");
    // Absent in the first session: refused, naming it.
    let (code, reason) = refused(&body, &policy("{session.process_id}"));
    assert_eq!(code, 422);
    assert_eq!(
        reason,
        "session[0].process_id: missing, needed by amqp.routing_key"
    );
    let with_pid = edited(|v| v["session"][0]["process_id"] = "p-1".into());
    let e = validate_archive(&with_pid, &policy("{session.process_id}")).unwrap();
    assert_eq!(e.routing_key, "p-1");
}

#[test]
fn only_the_first_session_and_only_what_the_template_names_is_read() {
    let policy = |t: &str| Policy::new(Vec::new(), t.parse().unwrap());
    // The second session's process id is not the routing key's.
    let both = edited(|v| {
        v["session"][0]["process_id"] = "p-1".into();
        v["session"][1]["process_id"] = "p-2".into();
    });
    let e = validate_archive(&both, &policy("{session.process_id}")).unwrap();
    assert_eq!(e.routing_key, "p-1");
    // null is allowed, and is as good as absent for the template.
    let null = edited(|v| v["session"][0]["process_id"] = Value::Null);
    assert_eq!(
        refused(&null, &policy("{session.process_id}")).1,
        "session[0].process_id: missing, needed by amqp.routing_key"
    );
    let number = edited(|v| v["session"][0]["process_id"] = 5.into());
    assert_eq!(refused(&number, &policy("{session.process_id}")).0, 422);
    // Keys the template does not name are passed through unread, whatever they hold.
    let odd = edited(|v| {
        v["session"][0]["process_id"] = 5.into();
        v["session"][0]["recipient"] = json!({"name": 7});
    });
    assert!(validate_archive(&odd, &Policy::default()).is_ok());
    // A later session's recipient is not read even when the template names it.
    let later = edited(|v| v["session"][1]["recipient"] = json!({"name": 7}));
    let e = validate_archive(&later, &policy("{session.recipient.name}")).unwrap();
    assert_eq!(e.routing_key, "client");
}

/// Checks an accepted archive against a plain `Value` reading of its bytes.
fn agrees_with_a_plain_reading(body: &[u8], e: &super::Event<'_>) {
    let v: Value = serde_json::from_slice(body).expect("accepted, so JSON");
    assert_eq!(v["event"]["type"], "WHP_ARCHIVE");
    let sessions = match &v["session"] {
        Value::Array(items) => items.iter().collect::<Vec<_>>(),
        one @ Value::Object(_) => vec![one],
        other => panic!("accepted a session that is {other}"),
    };
    assert!(!sessions.is_empty());
    for s in &sessions {
        assert_eq!(s["reference"].as_str(), Some(&*e.reference));
        assert!(s["id"].is_string());
    }
    assert_eq!(sessions[0]["id"].as_str(), Some(&*e.session_id));
    assert_eq!(e.routing_key, e.reference);
    let ts = v["event"]["timestamp"].as_str().expect("a timestamp");
    assert_eq!(e.message_id, format!("{}:WHP_ARCHIVE:{ts}", e.session_id));
}

#[test]
fn bad_bytes_never_panic_and_what_passes_agrees_with_a_plain_reading() {
    let p = Policy::default();
    let body = edited(|_| {});
    // Every truncation, and byte edits at every position (a small deterministic
    // stand-in for the fuzz target, which covers `validate`).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut accepted = 0;
    for cut in 0..body.len() {
        assert!(validate_archive(&body[..cut], &p).is_err());
    }
    for at in 0..body.len() {
        for replacement in [b'"', b'[', b'{', b']', b'}', b',', b':', b'0', b'\\', 0xff] {
            let mut bad = body.clone();
            bad[at] = replacement;
            if at % 3 == 0 {
                let extra = (next() % body.len() as u64) as usize;
                bad.insert(extra, replacement);
            }
            match validate_archive(&bad, &p) {
                Ok(e) => {
                    accepted += 1;
                    agrees_with_a_plain_reading(&bad, &e);
                }
                Err(r) => assert!(matches!(r.http_status(), 400 | 422)),
            }
        }
    }
    assert!(accepted > 0, "some edits (inside content) still pass");
}
