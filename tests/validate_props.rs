//! SPEC 6 "Bad bytes": the validator is cross-checked against a plain
//! `serde_json::Value` reading of the same bytes.
//!
//! The generators build webhook bodies (valid-looking envelopes with rules
//! randomly broken, arbitrary JSON, mutated and arbitrary bytes) and write
//! them with random whitespace and random `\u` escapes. A reference
//! implementation of the SPEC 1 rules, written here over a `Value` and not
//! sharing code with `src/event.rs`, gives the expected verdict: the validator
//! must accept exactly when it does (with the same routing key and message id),
//! answer 400 exactly when the bytes are not JSON, and 422 otherwise.
//!
//! Generated bodies have no duplicate keys (a `Value` cannot see them; they
//! have their own tests); where a byte edit makes one, any 422 is allowed.
//! Nesting stays shallow and numbers finite, so that every generated body that
//! is JSON can be read as a `Value`; JSON that a `Value` cannot hold (a number
//! out of f64 range, a lone surrogate escape) is left out of the comparison.
//!
//! `PROPTEST_CASES=50000 cargo test --test validate_props` runs longer.

use cellosign_bridge::{DEFAULT_ACCEPT, Event, Policy, validate};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::Value;

// ---------------------------------------------------------------------------
// Reference implementation of SPEC 1 (and the routing key of SPEC 3)
// ---------------------------------------------------------------------------

/// A part of a routing key template.
#[derive(Clone, Copy, Debug)]
enum Part {
    Lit(&'static str),
    Field(&'static str),
}

/// The operator's choices, as the reference reads them.
struct RefPolicy {
    accept: Vec<&'static str>,
    template: Vec<Part>,
}

impl RefPolicy {
    /// The same policy for the bridge: the template is written out and parsed.
    fn bridge(&self) -> Policy {
        let template: String = self
            .template
            .iter()
            .map(|p| match p {
                Part::Lit(t) => (*t).to_owned(),
                Part::Field(f) => format!("{{{f}}}"),
            })
            .collect();
        let accept = self.accept.iter().map(|t| (*t).to_owned()).collect();
        Policy::new(accept, template.parse().expect("template"))
    }
}

/// What the bridge must do with a body.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Not UTF-8 or not JSON: 400.
    NotJson,
    /// JSON by the grammar that a `Value` cannot hold (a number out of f64
    /// range, a lone surrogate escape, nesting past the recursion limit): no
    /// `Value` reading to compare with.
    Unreadable,
    /// JSON, but refused by a rule: 422.
    Invalid(&'static str),
    /// Accepted.
    Accept(Accepted),
}

#[derive(Debug, PartialEq)]
struct Accepted {
    event_type: String,
    timestamp: String,
    session_id: String,
    reference: String,
    process_id: Option<String>,
    recipient_name: Option<String>,
    routing_key: String,
    message_id: String,
}

/// Unicode Cc, as SPEC 1 spells it: C0, DEL, C1.
fn is_cc(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}')
}

/// A string of 1..=max bytes without control characters.
fn bounded_text(v: Option<&Value>, max: usize) -> Option<&str> {
    let s = v?.as_str()?;
    (!s.is_empty() && s.len() <= max && !s.chars().any(is_cc)).then_some(s)
}

fn absent_or_null(v: Option<&Value>) -> bool {
    v.is_none_or(Value::is_null)
}

/// `YYYY-MM-DDTHH:MM:SS[.fraction][Z or ±HH:MM]`, a real calendar date (SPEC 1).
/// The fraction has one digit or more; SPEC 1 sets no upper bound.
fn spec_timestamp(s: &str) -> bool {
    fn n(s: &str, len: usize) -> Option<u32> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().unwrap())
    }
    let Some((date, time)) = s.split_once('T') else {
        return false;
    };
    let date: Vec<&str> = date.split('-').collect();
    let [y, mo, d] = date[..] else {
        return false;
    };
    let (Some(y), Some(mo), Some(d)) = (n(y, 4), n(mo, 2), n(d, 2)) else {
        return false;
    };
    let (clock, zone) = match time.find(['Z', '+', '-']) {
        Some(i) => time.split_at(i),
        None => (time, ""),
    };
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) => (hms, Some(f)),
        None => (clock, None),
    };
    if fraction.is_some_and(|f| f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    let hms: Vec<&str> = hms.split(':').collect();
    let [h, mi, sec] = hms[..] else {
        return false;
    };
    let (Some(h), Some(mi), Some(sec)) = (n(h, 2), n(mi, 2), n(sec, 2)) else {
        return false;
    };
    let zone_ok = match zone {
        "" | "Z" => true,
        _ => {
            let (sign, hhmm) = zone.split_at(1);
            match hhmm.split_once(':') {
                Some((zh, zm)) if sign == "+" || sign == "-" => {
                    matches!((n(zh, 2), n(zm, 2)), (Some(zh), Some(zm)) if zh <= 23 && zm <= 59)
                }
                _ => false,
            }
        }
    };
    let leap = y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400));
    let days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    zone_ok && (1..=12).contains(&mo) && (1..=days).contains(&d) && h <= 23 && mi <= 59 && sec <= 59
}

/// The verdict of SPEC 1 and 3 on `body`, read as a plain `Value`.
fn reference(body: &[u8], policy: &RefPolicy) -> Verdict {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Verdict::Unreadable,
            Err(_) => Verdict::NotJson,
        };
    };
    match reference_value(&v, policy) {
        Ok(a) => Verdict::Accept(a),
        Err(why) => Verdict::Invalid(why),
    }
}

fn reference_value(v: &Value, policy: &RefPolicy) -> Result<Accepted, &'static str> {
    let top = v.as_object().ok_or("top level")?;
    let event = top.get("event").and_then(Value::as_object).ok_or("event")?;
    let session = top
        .get("session")
        .and_then(Value::as_object)
        .ok_or("session")?;

    let event_type = event
        .get("type")
        .and_then(Value::as_str)
        .filter(|t| policy.accept.contains(t))
        .ok_or("event.type")?;
    let timestamp = event
        .get("timestamp")
        .and_then(Value::as_str)
        .filter(|t| spec_timestamp(t))
        .ok_or("event.timestamp")?;

    let session_id = bounded_text(session.get("id"), 128).ok_or("session.id")?;
    let reference = bounded_text(session.get("reference"), 255).ok_or("session.reference")?;
    // An integer >= 0: a number that a Value reads as unsigned (no fraction,
    // no exponent, within u64).
    session
        .get("transaction_number")
        .and_then(Value::as_u64)
        .ok_or("session.transaction_number")?;
    let process_id = match session.get("process_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err("session.process_id"),
    };
    let pn = session.get("process_number");
    if !(absent_or_null(pn) || pn.is_some_and(Value::is_u64)) {
        return Err("session.process_number");
    }
    let recipient_name = match session.get("recipient") {
        None | Some(Value::Null) => None,
        Some(Value::Object(r)) => {
            let id = r.get("id").ok_or("session.recipient.id")?;
            if !(id.is_i64() || id.is_u64()) {
                return Err("session.recipient.id");
            }
            Some(
                r.get("name")
                    .and_then(Value::as_str)
                    .ok_or("session.recipient.name")?,
            )
        }
        Some(_) => return Err("session.recipient"),
    };
    match session.get("labels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(labels)) => {
            if labels
                .values()
                .any(|l| matches!(l, Value::Array(_) | Value::Object(_)))
            {
                return Err("session.labels");
            }
        }
        Some(_) => return Err("session.labels"),
    }

    let mut routing_key = String::new();
    for part in &policy.template {
        let value = match *part {
            Part::Lit(t) => Some(t),
            Part::Field("event.type") => Some(event_type),
            Part::Field("session.reference") => Some(reference),
            Part::Field("session.id") => Some(session_id),
            Part::Field("session.process_id") => process_id,
            Part::Field("session.recipient.name") => recipient_name,
            Part::Field(other) => panic!("unknown placeholder {other}"),
        };
        routing_key.push_str(value.ok_or("routing key: field absent")?);
    }
    if routing_key.is_empty() || routing_key.len() > 255 {
        return Err("routing key: length");
    }
    // SPEC 3: the message id is an AMQP message_id, a short string of at most 255 bytes.
    let message_id = format!("{session_id}:{event_type}:{timestamp}");
    if message_id.len() > 255 {
        return Err("message id: length");
    }
    Ok(Accepted {
        event_type: event_type.to_owned(),
        timestamp: timestamp.to_owned(),
        session_id: session_id.to_owned(),
        reference: reference.to_owned(),
        process_id: process_id.map(str::to_owned),
        recipient_name: recipient_name.map(str::to_owned),
        routing_key,
        message_id,
    })
}

fn accepted(e: &Event<'_>) -> Accepted {
    Accepted {
        event_type: e.event_type.to_string(),
        timestamp: e.timestamp.to_string(),
        session_id: e.session_id.to_string(),
        reference: e.reference.to_string(),
        process_id: e.process_id.as_deref().map(str::to_owned),
        recipient_name: e.recipient_name.as_deref().map(str::to_owned),
        routing_key: e.routing_key.clone(),
        message_id: e.message_id.clone(),
    }
}

fn policies() -> Vec<RefPolicy> {
    use Part::{Field, Lit};
    let default: Vec<&'static str> = DEFAULT_ACCEPT.to_vec();
    let mut wider = default.clone();
    wider.push("WHEF_FORM_FIELD_CHANGED");
    vec![
        RefPolicy {
            accept: default.clone(),
            template: vec![Field("session.reference")],
        },
        RefPolicy {
            accept: default.clone(),
            template: vec![
                Field("event.type"),
                Lit("."),
                Field("session.id"),
                Lit("."),
                Field("session.reference"),
            ],
        },
        RefPolicy {
            accept: wider,
            template: vec![
                Lit("r."),
                Field("session.process_id"),
                Lit("."),
                Field("session.recipient.name"),
            ],
        },
        RefPolicy {
            accept: default.clone(),
            template: vec![Field("session.process_id")],
        },
        RefPolicy {
            accept: vec!["CUSTOM_TYPE", "WHEF_SESSION_CREATED"],
            template: vec![Field("session.recipient.name")],
        },
        RefPolicy {
            accept: default,
            template: vec![Lit("x"), Field("session.reference")],
        },
        RefPolicy {
            accept: vec![],
            template: vec![Lit("constant")],
        },
    ]
}

/// Whether some object in `body`, at any depth, has a key twice.
fn has_duplicate_keys(body: &[u8]) -> bool {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use std::cell::Cell;
    use std::collections::HashSet;

    struct Scan<'a>(&'a Cell<bool>);

    impl<'de> DeserializeSeed<'de> for Scan<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Scan<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Scan(self.0))?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut keys = HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                if !keys.insert(key) {
                    self.0.set(true);
                }
                map.next_value_seed(Scan(self.0))?;
            }
            Ok(())
        }
    }

    let found = Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    Scan(&found).deserialize(&mut de).is_ok() && found.get()
}

/// Checks the validator against the reference on `body`, under every policy.
/// With `may_have_duplicates`, a body with a duplicate key (which a `Value`
/// cannot see) may be refused with 422 whatever the reference says.
fn check(body: &[u8], may_have_duplicates: bool) -> Result<(), TestCaseError> {
    let duplicates = may_have_duplicates && has_duplicate_keys(body);
    for policy in policies() {
        let got = validate(body, &policy.bridge());
        let want = reference(body, &policy);
        let show = || String::from_utf8_lossy(body).into_owned();
        match (&want, &got) {
            (Verdict::Unreadable, _) => {}
            (Verdict::Accept(a), Ok(e)) => prop_assert_eq!(a, &accepted(e), "{}", show()),
            (Verdict::NotJson, Err(r)) => prop_assert_eq!(r.http_status(), 400, "{} {}", r, show()),
            (Verdict::Invalid(_), Err(r)) => {
                prop_assert_eq!(r.http_status(), 422, "{} {}", r, show())
            }
            (Verdict::Accept(_), Err(r)) if duplicates && r.http_status() == 422 => {}
            _ => {
                return Err(TestCaseError::fail(format!(
                    "reference says {want:?}, validator says {:?}\nbody: {}",
                    got.as_ref()
                        .map(|e| &e.message_id)
                        .map_err(|r| r.to_string()),
                    show()
                )));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// JSON documents, written with control over the bytes
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum J {
    Null,
    Bool(bool),
    /// A number literal, written as is.
    Num(String),
    Str(String),
    Arr(Vec<J>),
    /// Members in order, keys unique.
    Obj(Vec<(String, J)>),
}

fn s(text: &str) -> J {
    J::Str(text.to_owned())
}

/// An object from optional members (absent ones left out) and extra members
/// whose key is not already taken.
fn object(known: Vec<(&str, Option<J>)>, extra: Vec<(String, J)>) -> Vec<(String, J)> {
    let mut members: Vec<(String, J)> = known
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .collect();
    for (k, v) in extra {
        if !members.iter().any(|(m, _)| *m == k) {
            members.push((k, v));
        }
    }
    members
}

/// How a document is written: in which order object members come, where
/// whitespace goes and which characters are written as `\u` escapes, from a seed.
struct Writer {
    out: String,
    rng: u64,
    /// 0: only the escapes JSON requires; 1: some; 2: every character.
    escape: u8,
    spaced: bool,
}

impl Writer {
    fn next(&mut self) -> u64 {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn coin(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }

    fn ws(&mut self) {
        if self.spaced && self.coin(3) {
            let w = [" ", "\n", "\t", "\r\n", "  "][(self.next() % 5) as usize];
            self.out.push_str(w);
        }
    }

    fn unicode_escape(&mut self, c: char) {
        let upper = self.coin(2);
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            if upper {
                self.out.push_str(&format!("\\u{:04X}", unit));
            } else {
                self.out.push_str(&format!("\\u{:04x}", unit));
            }
        }
    }

    fn string(&mut self, text: &str) {
        self.out.push('"');
        for c in text.chars() {
            let escape_anyway = match self.escape {
                0 => false,
                1 => self.coin(4),
                _ => true,
            };
            match c {
                '"' | '\\' if !escape_anyway || self.coin(2) => {
                    self.out.push('\\');
                    self.out.push(c);
                }
                '\u{8}' | '\u{c}' | '\n' | '\r' | '\t' if !escape_anyway => {
                    let short = match c {
                        '\u{8}' => "\\b",
                        '\u{c}' => "\\f",
                        '\n' => "\\n",
                        '\r' => "\\r",
                        _ => "\\t",
                    };
                    self.out.push_str(short);
                }
                '/' if escape_anyway && self.coin(2) => self.out.push_str("\\/"),
                c if escape_anyway || u32::from(c) < 0x20 => self.unicode_escape(c),
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn value(&mut self, j: &J) {
        self.ws();
        match j {
            J::Null => self.out.push_str("null"),
            J::Bool(b) => self.out.push_str(if *b { "true" } else { "false" }),
            J::Num(n) => self.out.push_str(n),
            J::Str(t) => self.string(t),
            J::Arr(items) => {
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.value(item);
                }
                self.ws();
                self.out.push(']');
            }
            J::Obj(members) => {
                // Members in a random order (Fisher-Yates).
                let mut order: Vec<usize> = (0..members.len()).collect();
                for i in (1..order.len()).rev() {
                    let j = (self.next() % (i as u64 + 1)) as usize;
                    order.swap(i, j);
                }
                self.out.push('{');
                for (i, (k, v)) in order.iter().map(|&m| &members[m]).enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.ws();
                    self.string(k);
                    self.ws();
                    self.out.push(':');
                    self.value(v);
                }
                self.ws();
                self.out.push('}');
            }
        }
        self.ws();
    }
}

#[derive(Clone, Debug)]
struct Style {
    seed: u64,
    escape: u8,
    spaced: bool,
}

fn style() -> impl Strategy<Value = Style> {
    (
        any::<u64>(),
        prop_oneof![6 => Just(0u8), 3 => Just(1u8), 1 => Just(2u8)],
        any::<bool>(),
    )
        .prop_map(|(seed, escape, spaced)| Style {
            seed,
            escape,
            spaced,
        })
}

fn write(j: &J, style: &Style) -> Vec<u8> {
    let mut w = Writer {
        out: String::new(),
        rng: style.seed | 1,
        escape: style.escape,
        spaced: style.spaced,
    };
    w.value(j);
    w.out.into_bytes()
}

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

/// Control characters (SPEC 1: C0, DEL, C1) and characters that look like
/// them but are not Cc.
const CONTROLS: [char; 11] = [
    '\u{0}', '\u{1}', '\t', '\n', '\r', '\u{1b}', '\u{1f}', '\u{7f}', '\u{80}', '\u{85}', '\u{9f}',
];
const NOT_CONTROLS: [char; 8] = [
    ' ',
    '\u{a0}',
    '\u{ad}',
    '\u{200b}',
    '\u{2028}',
    '\u{feff}',
    '\u{fffd}',
    '\u{10ffff}',
];

fn num() -> BoxedStrategy<J> {
    prop_oneof![
        (0u64..1000).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter_map("finite", serde_json::Number::from_f64)
            .prop_map(|n| n.to_string()),
        prop::sample::select(vec![
            "0",
            "-0",
            "1",
            "-1",
            "1.0",
            "0.5",
            "-0.0",
            "1e2",
            "1E+2",
            "5e-1",
            "1e308",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775808",
            "-9223372036854775809",
            "123456789012345678901234567890",
        ])
        .prop_map(str::to_owned),
    ]
    .prop_map(J::Num)
    .boxed()
}

fn any_text() -> BoxedStrategy<String> {
    prop_oneof![
        "[a-zA-Z0-9 _.-]{0,8}",
        "(?s).{0,8}",
        prop::sample::select(CONTROLS.to_vec()).prop_map(String::from),
    ]
    .boxed()
}

fn key() -> BoxedStrategy<String> {
    prop_oneof![
        prop::sample::select(vec![
            "client",
            "change",
            "fields",
            "x",
            "",
            "Type",
            "ID",
            "id ",
            "reference",
            "session",
            "event",
            "labels",
            "type",
            "name",
            "é",
            "\u{0}",
        ])
        .prop_map(str::to_owned),
        "[a-z_]{1,8}",
        any_text(),
    ]
    .boxed()
}

fn scalar() -> BoxedStrategy<J> {
    prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        num(),
        any_text().prop_map(J::Str),
    ]
    .boxed()
}

/// Any JSON value, shallow.
fn any_json() -> BoxedStrategy<J> {
    scalar()
        .prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(J::Arr),
                prop::collection::vec((key(), inner), 0..4).prop_map(|m| J::Obj(object(vec![], m))),
            ]
        })
        .boxed()
}

/// Anything but a string.
fn not_string() -> BoxedStrategy<J> {
    prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        num(),
        Just(J::Arr(vec![])),
        Just(J::Obj(vec![])),
        any_json().prop_filter("not a string", |j| !matches!(j, J::Str(_))),
    ]
    .boxed()
}

fn extras() -> BoxedStrategy<Vec<(String, J)>> {
    prop::collection::vec((key(), any_json()), 0..3).boxed()
}

/// A string of exactly `len` bytes (for a `len` near a limit) made of
/// characters `width` bytes wide, padded with ASCII.
fn near_limit(limit: usize) -> BoxedStrategy<String> {
    (limit - 3..=limit + 2, 1usize..=4, any::<bool>())
        .prop_map(|(len, width, control)| {
            let c = ['a', 'é', '€', '😀'][width - 1];
            let mut out = String::new();
            while out.len() + width <= len {
                out.push(c);
            }
            while out.len() < len {
                out.push('a');
            }
            if control && len > 1 {
                out.pop();
                out.insert(0, '\u{1}');
                while out.len() < len {
                    out.push('a');
                }
            }
            out
        })
        .boxed()
}

/// `base` with one control or control-like character inserted.
fn with_odd_char(base: BoxedStrategy<String>) -> BoxedStrategy<String> {
    let odd: Vec<char> = CONTROLS.iter().chain(&NOT_CONTROLS).copied().collect();
    (
        base,
        prop::sample::select(odd),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut text, c, at)| {
            let places: Vec<usize> = text
                .char_indices()
                .map(|(i, _)| i)
                .chain([text.len()])
                .collect();
            text.insert(places[at.index(places.len())], c);
            text
        })
        .boxed()
}

/// A bounded text field (`session.id`, `session.reference`) or something else.
fn text_field(good: &'static str, limit: usize) -> BoxedStrategy<Option<J>> {
    prop_oneof![
        80 => good.prop_map(|t| Some(J::Str(t))),
        2 => near_limit(limit).prop_map(|t| Some(J::Str(t))),
        2 => with_odd_char(good.boxed()).prop_map(|t| Some(J::Str(t))),
        1 => Just(Some(s(""))),
        1 => any_text().prop_map(|t| Some(J::Str(t))),
        1 => not_string().prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

fn event_type() -> BoxedStrategy<Option<J>> {
    prop_oneof![
        80 => prop::sample::select(DEFAULT_ACCEPT.to_vec()).prop_map(|t| Some(s(t))),
        2 => prop::sample::select(vec![
            "WHEF_FORM_FIELD_CHANGED",
            "CUSTOM_TYPE",
            "whef_session_created",
            "WHEF_SESSION_CREATED ",
            " WHEF_SESSION_CREATED",
            "WHEF_SESSION_CREATE",
            "WHEF_SESSION_CREATED\u{0}",
            "",
        ])
        .prop_map(|t| Some(s(t))),
        1 => any_text().prop_map(|t| Some(J::Str(t))),
        1 => not_string().prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

/// A timestamp of the SPEC 1 form, most of them real dates.
fn good_timestamp() -> BoxedStrategy<String> {
    (
        prop_oneof![3 => Just(2025u32), 1 => 0u32..10000],
        (1u32..=12, 1u32..=31),
        (0u32..=23, 0u32..=59, 0u32..=59),
        prop::option::of((1usize..=9, any::<u64>())),
        prop::sample::select(vec!["", "", "Z", "+02:00", "-05:30", "+00:00", "-23:59"]),
    )
        .prop_map(|(y, (mo, d), (h, mi, sec), fraction, zone)| {
            let fraction = fraction
                .map(|(n, seed)| format!(".{}", &format!("{seed:020}")[..n]))
                .unwrap_or_default();
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{sec:02}{fraction}{zone}")
        })
        .boxed()
}

/// A timestamp built from parts, most of them in range, some not.
fn timestamp_text() -> BoxedStrategy<String> {
    let year = prop_oneof![
        4 => Just(2025u32),
        1 => prop::sample::select(vec![2024u32, 2000, 1900, 2100, 0, 9999, 1]),
        1 => 0u32..10000,
        1 => 10000u32..100000,
    ];
    let month = prop_oneof![8 => 1u32..=12, 1 => 0u32..=99];
    let day = prop_oneof![6 => 1u32..=28, 3 => 29u32..=31, 1 => 0u32..=99];
    let hour = prop_oneof![8 => 0u32..=23, 1 => 0u32..=99];
    let minute = prop_oneof![8 => 0u32..=59, 1 => 0u32..=99];
    let second = prop_oneof![8 => 0u32..=59, 1 => 0u32..=99];
    let fraction = prop_oneof![
        3 => Just(None),
        4 => (1usize..=9, any::<u64>()).prop_map(Some),
        2 => (0usize..=14, any::<u64>()).prop_map(Some),
    ];
    let zone = prop_oneof![
        6 => Just(String::new()),
        3 => Just("Z".to_owned()),
        3 => (prop::sample::select(vec!['+', '-']), 0u32..=25, 0u32..=61)
            .prop_map(|(sign, h, m)| format!("{sign}{h:02}:{m:02}")),
        1 => prop::sample::select(vec![
            "z", "+0200", "+02", "+2:00", "Z+02:00", " Z", "UTC", "+02:00Z", "-", "ZZ",
        ])
        .prop_map(str::to_owned),
    ];
    let sep = prop_oneof![12 => Just('T'), 1 => Just('t'), 1 => Just(' ')];
    // 0: none; 1: drop a byte; 2: insert a character; 3: unpadded month.
    let mutation = prop_oneof![12 => Just((0u8, '0')), 1 => (1u8..=3, prop::sample::select(vec!['0', '5', '-', ':', 'T', '.', '２', 'Z']))];
    (
        (year, month, day),
        (hour, minute, second),
        (fraction, zone, sep),
        (mutation, any::<prop::sample::Index>()),
    )
        .prop_map(
            |((y, mo, d), (h, mi, sec), (fraction, zone, sep), ((kind, c), at))| {
                let month = if kind == 3 {
                    mo.to_string()
                } else {
                    format!("{mo:02}")
                };
                let mut t = format!("{y:04}-{month}-{d:02}{sep}{h:02}:{mi:02}:{sec:02}");
                if let Some((digits, seed)) = fraction {
                    let seed = format!("{seed:020}{seed:020}");
                    t.push('.');
                    t.push_str(&seed[..digits]);
                }
                t.push_str(&zone);
                let places: Vec<usize> = t.char_indices().map(|(i, _)| i).collect();
                let i = places[at.index(places.len())];
                match kind {
                    1 => {
                        t.remove(i);
                    }
                    2 => t.insert(i, c),
                    _ => {}
                }
                t
            },
        )
        .boxed()
}

fn timestamp() -> BoxedStrategy<Option<J>> {
    prop_oneof![
        60 => good_timestamp().prop_map(|t| Some(J::Str(t))),
        20 => timestamp_text().prop_map(|t| Some(J::Str(t))),
        2 => prop::sample::select(vec![
            "2025-01-26T08:49:33.626046",
            "2024-02-29T23:59:59Z",
            "0000-02-29T00:00:00",
            "2025-01-26T08:49:33.1234567890",
            "2025-01-26T08:49:33.5-00:00",
            "2025-01-26",
            "2023-02-29T00:00:00",
            "2025-01-26T23:59:60",
        ])
        .prop_map(|t| Some(s(t))),
        1 => any_text().prop_map(|t| Some(J::Str(t))),
        1 => not_string().prop_map(Some),
        1 => Just(None),
    ]
    .boxed()
}

/// An unsigned integer field, or a number of another kind, or another type.
fn unsigned(optional: bool) -> BoxedStrategy<Option<J>> {
    let absent = if optional { 6 } else { 1 };
    prop_oneof![
        60 => (0u64..100_000).prop_map(|n| Some(J::Num(n.to_string()))),
        absent => Just(None),
        absent => Just(Some(J::Null)),
        2 => num().prop_map(Some),
        1 => (0u64..100).prop_map(|n| Some(J::Str(n.to_string()))),
        1 => not_string().prop_map(Some),
    ]
    .boxed()
}

fn process_id() -> BoxedStrategy<Option<J>> {
    prop_oneof![
        24 => "[0-9a-f-]{1,36}".prop_map(|t| Some(J::Str(t))),
        4 => Just(None),
        2 => Just(Some(J::Null)),
        1 => Just(Some(s(""))),
        1 => near_limit(255).prop_map(|t| Some(J::Str(t))),
        1 => with_odd_char("[a-z]{0,4}".boxed()).prop_map(|t| Some(J::Str(t))),
        1 => not_string().prop_map(Some),
    ]
    .boxed()
}

fn recipient() -> BoxedStrategy<Option<J>> {
    let id = prop_oneof![
        30 => (0i64..10).prop_map(|n| Some(J::Num(n.to_string()))),
        1 => (-5i64..0).prop_map(|n| Some(J::Num(n.to_string()))),
        1 => num().prop_map(Some),
        1 => Just(Some(s("1"))),
        1 => not_string().prop_map(Some),
        1 => Just(None),
    ];
    let name = prop_oneof![
        30 => "[a-z]{1,10}".prop_map(|t| Some(J::Str(t))),
        1 => Just(Some(s(""))),
        1 => near_limit(255).prop_map(|t| Some(J::Str(t))),
        1 => with_odd_char("[a-z]{0,4}".boxed()).prop_map(|t| Some(J::Str(t))),
        1 => not_string().prop_map(Some),
        1 => Just(None),
    ];
    prop_oneof![
        30 => (id, name, extras()).prop_map(|(id, name, extra)| {
            Some(J::Obj(object(vec![("id", id), ("name", name)], extra)))
        }),
        4 => Just(None),
        2 => Just(Some(J::Null)),
        1 => not_string()
            .prop_filter("not an object", |j| !matches!(j, J::Obj(_) | J::Null))
            .prop_map(Some),
        1 => any_text().prop_map(|t| Some(J::Str(t))),
    ]
    .boxed()
}

fn labels() -> BoxedStrategy<Option<J>> {
    let entries = prop::collection::vec((key(), scalar()), 0..4);
    let compound = prop_oneof![
        Just(J::Obj(vec![])),
        Just(J::Arr(vec![])),
        any_json().prop_filter("compound", |j| matches!(j, J::Obj(_) | J::Arr(_))),
    ];
    prop_oneof![
        30 => entries.clone().prop_map(|e| Some(J::Obj(object(vec![], e)))),
        4 => Just(None),
        2 => Just(Some(J::Null)),
        2 => (entries, key(), compound)
            .prop_map(|(mut e, k, c)| {
                e.insert(0, (k, c));
                Some(J::Obj(object(vec![], e)))
            }),
        1 => any_json()
            .prop_filter("not an object", |j| !matches!(j, J::Obj(_)))
            .prop_map(Some),
    ]
    .boxed()
}

/// An object slot: mostly the object itself, sometimes another value or nothing.
fn slot(object: BoxedStrategy<J>) -> BoxedStrategy<Option<J>> {
    prop_oneof![
        100 => object.prop_map(Some),
        1 => Just(None),
        1 => not_string()
            .prop_filter("not an object", |j| !matches!(j, J::Obj(_)))
            .prop_map(Some),
        1 => any_text().prop_map(|t| Some(J::Str(t))),
    ]
    .boxed()
}

/// A webhook body: the SPEC 1 envelope, each rule broken now and then.
fn envelope() -> BoxedStrategy<J> {
    let event = (event_type(), timestamp(), extras())
        .prop_map(|(t, ts, extra)| J::Obj(object(vec![("type", t), ("timestamp", ts)], extra)))
        .boxed();
    let session = (
        (
            text_field("[A-Za-z0-9]{1,12}", 128),
            text_field(
                "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}|[A-Za-z0-9._-]{1,20}",
                255,
            ),
            unsigned(false),
        ),
        (process_id(), unsigned(true), recipient(), labels()),
        extras(),
    )
        .prop_map(|((id, reference, tn), (pid, pn, rcpt, labels), extra)| {
            J::Obj(object(
                vec![
                    ("id", id),
                    ("reference", reference),
                    ("transaction_number", tn),
                    ("process_id", pid),
                    ("process_number", pn),
                    ("recipient", rcpt),
                    ("labels", labels),
                ],
                extra,
            ))
        })
        .boxed();
    let top = (slot(event), slot(session), extras())
        .prop_map(|(e, s, extra)| J::Obj(object(vec![("event", e), ("session", s)], extra)));
    prop_oneof![
        60 => top,
        1 => any_json(),
    ]
    .boxed()
}

/// A top-level object whose members are arbitrary, `event` and `session` often among them.
fn loose_object() -> BoxedStrategy<J> {
    let k = prop_oneof![Just("event".to_owned()), Just("session".to_owned()), key()];
    prop::collection::vec((k, any_json()), 0..4)
        .prop_map(|m| J::Obj(object(vec![], m)))
        .boxed()
}

/// One small edit of a body's bytes.
#[derive(Clone, Debug)]
enum Edit {
    Truncate(prop::sample::Index),
    Delete(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Replace(prop::sample::Index, u8),
    Append(Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    let byte = prop_oneof![
        prop::sample::select(b"{}[]\",:\\0-e.tn \x00\x7f".to_vec()),
        any::<u8>(),
    ];
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Edit::Truncate),
        any::<prop::sample::Index>().prop_map(Edit::Delete),
        (any::<prop::sample::Index>(), byte.clone()).prop_map(|(i, b)| Edit::Insert(i, b)),
        (any::<prop::sample::Index>(), byte).prop_map(|(i, b)| Edit::Replace(i, b)),
        prop::sample::select(vec![
            b" ".to_vec(),
            b"\n".to_vec(),
            b"x".to_vec(),
            b"{}".to_vec(),
            b"\xef\xbb\xbf".to_vec(),
            b"\x0c".to_vec(),
        ])
        .prop_map(Edit::Append),
    ]
}

fn apply(mut body: Vec<u8>, edit: &Edit) -> Vec<u8> {
    let len = body.len();
    match edit {
        Edit::Truncate(i) => body.truncate(i.index(len + 1)),
        Edit::Delete(i) if len > 0 => {
            body.remove(i.index(len));
        }
        Edit::Insert(i, b) => body.insert(i.index(len + 1), *b),
        Edit::Replace(i, b) if len > 0 => body[i.index(len)] = *b,
        Edit::Append(tail) => body.extend_from_slice(tail),
        _ => {}
    }
    body
}

/// JSON-ish tokens, concatenated.
fn token_soup() -> BoxedStrategy<Vec<u8>> {
    let token = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        " ",
        "\"event\"",
        "\"session\"",
        "\"type\"",
        "\"id\"",
        "\"reference\"",
        "\"timestamp\"",
        "\"transaction_number\"",
        "\"labels\"",
        "\"WHEF_SESSION_CREATED\"",
        "\"2025-01-26T08:49:33\"",
        "\"r\"",
        "1",
        "-1",
        "1.5",
        "null",
        "true",
        "\"\\u0000\"",
        "\"\\\"",
        "\u{1}",
        "\u{e9}",
    ]);
    prop::collection::vec(token, 0..40)
        .prop_map(|t| t.concat().into_bytes())
        .boxed()
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

/// `cases` cases, or `PROPTEST_CASES` when set (for a longer run).
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        // Failures are not written next to the sources: a failing input is
        // printed, and worth a named test below.
        failure_persistence: None,
        // A failing envelope is large; bound the time spent shrinking it.
        max_shrink_time: 10_000,
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(5000))]

    /// Envelopes with rules randomly broken: the validator accepts exactly
    /// when the reference does, with the same routing key and message id.
    #[test]
    fn envelopes_agree_with_the_reference(doc in envelope(), style in style()) {
        check(&write(&doc, &style), false)?;
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// Arbitrary JSON, at the top level and as `event` and `session`.
    #[test]
    fn arbitrary_json_agrees(doc in prop_oneof![any_json(), loose_object()], style in style()) {
        check(&write(&doc, &style), false)?;
    }

    /// Envelopes with one byte-level edit (may break the JSON or, rarely,
    /// make a duplicate key).
    #[test]
    fn edited_bytes_agree(doc in envelope(), style in style(), edit in edit()) {
        check(&apply(write(&doc, &style), &edit), true)?;
    }

    /// Arbitrary bytes and JSON-ish token soup: never a panic, 400 exactly when not JSON.
    #[test]
    fn arbitrary_bytes_agree(
        body in prop_oneof![prop::collection::vec(any::<u8>(), 0..64), token_soup()]
    ) {
        check(&body, true)?;
    }
}

// ---------------------------------------------------------------------------
// Named cases
// ---------------------------------------------------------------------------

fn body_with(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = serde_json::json!({
        "event": {"type": "WHEF_SESSION_CREATED", "timestamp": "2025-01-26T08:49:33.626046"},
        "session": {"id": "s1", "reference": "r1", "transaction_number": 1}
    });
    edit(&mut v);
    serde_json::to_vec(&v).unwrap()
}

/// The contract vectors go through the same comparison.
#[test]
fn contract_vectors_agree() {
    let vectors = include_str!("vectors/cases.jsonl");
    let mut n = 0;
    for line in vectors.lines().filter(|l| !l.trim().is_empty()) {
        let case: Value = serde_json::from_str(line).unwrap();
        let body = case["body"].as_str().unwrap().as_bytes();
        check(body, false).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
        n += 1;
    }
    assert!(n >= 25, "{n} vectors");
}

/// The envelope generator reaches acceptance often, and breaks every rule.
#[test]
fn generators_reach_every_verdict() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeMap;
    let mut runner = TestRunner::deterministic();
    let strategy = (envelope(), style());
    let policies = policies();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let draws = 1000;
    for _ in 0..draws {
        let (doc, style) = strategy.new_tree(&mut runner).unwrap().current();
        let body = write(&doc, &style);
        for (i, policy) in policies.iter().enumerate() {
            let verdict = match reference(&body, policy) {
                Verdict::Accept(_) if i == 0 => "accepted",
                Verdict::Accept(_) => continue,
                Verdict::Invalid(why) => why,
                Verdict::NotJson => "not JSON",
                Verdict::Unreadable => "unreadable",
            };
            *seen.entry(verdict).or_default() += 1;
        }
    }
    let rules = [
        "top level",
        "event",
        "session",
        "event.type",
        "event.timestamp",
        "session.id",
        "session.reference",
        "session.transaction_number",
        "session.process_id",
        "session.process_number",
        "session.recipient",
        "session.recipient.id",
        "session.recipient.name",
        "session.labels",
        "routing key: field absent",
        "routing key: length",
    ];
    for rule in rules {
        assert!(
            seen.get(rule).copied().unwrap_or(0) >= 5,
            "{rule} broken too rarely: {seen:?}"
        );
    }
    eprintln!(
        "verdicts over {draws} bodies and {} policies: {seen:?}",
        policies.len()
    );
    let accepted = seen.get("accepted").copied().unwrap_or(0);
    assert!(
        accepted >= draws / 4,
        "{accepted} of {draws} accepted: {seen:?}"
    );
    assert!(!seen.contains_key("not JSON"), "{seen:?}");
    assert!(!seen.contains_key("unreadable"), "{seen:?}");
}

/// SPEC 1: `[.fraction]` is one digit or more, with no upper bound.
#[test]
fn spec_timestamp_fraction_has_no_upper_bound() {
    let body = body_with(|v| v["event"]["timestamp"] = "2025-01-26T08:49:33.1234567890".into());
    check(&body, false).unwrap();
}

/// SPEC 1: `session.recipient` is an object with integer `id` and string
/// `name`; the order of its members does not matter.
#[test]
fn spec_recipient_members_in_any_order() {
    for recipient in [r#"{"id":1,"name":"client"}"#, r#"{"name":"client","id":1}"#] {
        let body = format!(
            r#"{{"event":{{"type":"WHEF_SESSION_CREATED","timestamp":"2025-01-26T08:49:33"}},"session":{{"id":"s1","reference":"r1","transaction_number":1,"recipient":{recipient}}}}}"#
        );
        check(body.as_bytes(), false).unwrap();
    }
}

#[test]
fn reference_timestamps() {
    for good in [
        "2025-01-26T08:49:33",
        "2025-01-26T08:49:33.626046",
        "2025-01-26T08:49:33Z",
        "2025-01-26T08:49:33.5+02:00",
        "2025-01-26T08:49:33-05:30",
        "2024-02-29T00:00:00",
        "2000-02-29T23:59:59+23:59",
    ] {
        assert!(spec_timestamp(good), "{good}");
    }
    for bad in [
        "2025-01-26",
        "2025-01-26 08:49:33",
        "2025-01-26t08:49:33",
        "2025-01-26T08:49:33z",
        "2025-01-26T08:49:33.",
        "2025-01-26T08:49:33+0200",
        "2025-01-26T08:49:33+02",
        "2025-01-26T08:49:33+24:00",
        "2025-01-26T08:49:33+02:60",
        "2025-01-26T08:49:33Z+02:00",
        "2023-02-29T00:00:00",
        "1900-02-29T00:00:00",
        "2025-04-31T00:00:00",
        "2025-13-01T00:00:00",
        "2025-00-01T00:00:00",
        "2025-01-00T00:00:00",
        "2025-01-26T24:00:00",
        "2025-01-26T23:60:00",
        "2025-01-26T23:59:60",
        "+2025-01-26T08:49:33",
        "２025-01-26T08:49:33",
        "20250-01-26T08:49:33",
    ] {
        assert!(!spec_timestamp(bad), "{bad}");
    }
}

#[test]
fn escaped_keys_and_values_are_read_as_decoded() {
    let body = br#"{"\u0065vent":{"type":"WHEF_SESSION_\u0043REATED","timestamp":"2025-01-26T08:49:33"},
                    "session":{"\u0069d":"s\u00e9","reference":"r\ud83d\ude00","transaction_number":0}}"#;
    check(body, false).unwrap();
    let e = validate(body, &Policy::default()).unwrap();
    assert_eq!(e.routing_key, "r😀");
    assert_eq!(e.message_id, "sé:WHEF_SESSION_CREATED:2025-01-26T08:49:33");
}

/// JSON that a `Value` cannot hold is refused with 400 where the validator
/// reads the value. (Where it only skips the value, in a field it does not
/// check, such a body is accepted: see the report of the "Bad bytes" work.)
#[test]
fn unreadable_values_in_read_fields_are_refused() {
    let surrogate = Value::String("SURROGATE".into());
    let huge = Value::String("HUGE".into());
    for (path, marker) in [
        ("/session/reference", &surrogate),
        ("/session/process_id", &surrogate),
        ("/session/labels", &surrogate),
        ("/event/timestamp", &surrogate),
        ("/session/transaction_number", &huge),
        ("/session/process_number", &huge),
        ("/session/labels", &huge),
    ] {
        let body = body_with(|v| {
            let value = if path == "/session/labels" {
                serde_json::json!({ "k": marker })
            } else {
                marker.clone()
            };
            match v.pointer_mut(path) {
                Some(slot) => *slot = value,
                None => {
                    let key = path.rsplit('/').next().unwrap();
                    v["session"][key] = value;
                }
            }
        });
        let body = String::from_utf8(body)
            .unwrap()
            .replace("\"SURROGATE\"", "\"a\\ud800b\"")
            .replace("\"HUGE\"", "1e400");
        assert!(matches!(
            reference(body.as_bytes(), &policies()[0]),
            Verdict::Unreadable
        ));
        let r = validate(body.as_bytes(), &Policy::default()).expect_err(&body);
        assert_eq!(r.http_status(), 400, "{body}: {r}");
    }
}

#[test]
fn duplicate_key_detector() {
    assert!(has_duplicate_keys(br#"{"a":1,"a":2}"#));
    assert!(has_duplicate_keys(br#"[{"x":{"a":1,"\u0061":2}}]"#));
    assert!(!has_duplicate_keys(
        br#"{"a":{"a":1},"b":[{"a":1},{"a":2}]}"#
    ));
    assert!(!has_duplicate_keys(br#"{"a":1,"a":2"#));
}
