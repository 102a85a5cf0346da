//! An accepted event as it is stored and published: the body bytes plus what
//! the broker message needs, computed once at acceptance.
//!
//! Keeping the routing key and message id with the body means a spooled event
//! is published exactly as it was accepted, even if the configuration changes
//! before it is forwarded.
//!
//! # Record format
//!
//! `kind (u8) | received_at_ms (u64) | [trace] | 5 x (u16 len, UTF-8) | body`, big
//! endian. The kind's low bits say what the body is ([`INLINE`], [`CLAIM_CHECK`]);
//! the bit [`TRACED`] says a trace block follows the time: trace id (16 bytes),
//! span id (8), flags (1), `tracestate` (u16 len, UTF-8; 0: none). Records written
//! before trace contexts (kinds 1 and 2) decode unchanged, without a trace.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::event::Event;
use crate::trace::TraceContext;

/// First byte of a record whose body is the request body, byte for byte (the
/// format since the first release).
const INLINE: u8 = 1;
/// First byte of a record whose body is a claim-check document (SPEC 9); the
/// layout is the same, so spools written before claim checks still decode.
const CLAIM_CHECK: u8 = 2;
/// Added to the kind when a trace block follows the time.
const TRACED: u8 = 0x80;
/// Bytes of a trace block without its `tracestate`.
const TRACE_FIXED: usize = 16 + 8 + 1 + 2;

/// An event accepted for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub routing_key: String,
    pub message_id: String,
    pub event_type: String,
    pub session_id: String,
    pub reference: String,
    /// When the bridge received it, Unix milliseconds.
    pub received_at_ms: u64,
    /// The request body, byte for byte; or, when `claim_check`, the claim-check
    /// document pointing at the stored body.
    pub body: Bytes,
    /// Whether `body` is a claim-check document: published with `x-claim-check: true`.
    pub claim_check: bool,
    /// The trace it belongs to (SPEC 7); `None` only in records from before traces,
    /// whose message gets a new trace when published.
    pub trace: Option<TraceContext>,
}

/// A stored record that cannot be decoded (a bug or a foreign file, never a torn write:
/// the spool only hands out committed records).
#[derive(Debug, thiserror::Error)]
#[error("spool record is not a valid envelope ({0})")]
pub struct DecodeError(&'static str);

impl Envelope {
    /// Builds the envelope of a validated event (`confirmed` mode publishes it as is; the
    /// spooled path needs only its bytes: `encode_head`, then the body).
    pub fn new(event: &Event<'_>, body: Bytes, received_at_ms: u64) -> Self {
        Envelope {
            routing_key: event.routing_key.clone(),
            message_id: event.message_id.clone(),
            event_type: event.event_type.to_string(),
            session_id: event.session_id.to_string(),
            reference: event.reference.to_string(),
            received_at_ms,
            body,
            claim_check: false,
            trace: None,
        }
    }

    /// The five strings, in record order.
    fn fields(&self) -> [&str; 5] {
        [
            &self.routing_key,
            &self.message_id,
            &self.event_type,
            &self.session_id,
            &self.reference,
        ]
    }

    /// Serialises for the spool (see the [record format](self)).
    pub fn encode(&self) -> Bytes {
        encode_record(
            self.claim_check,
            self.received_at_ms,
            self.trace.as_ref(),
            self.fields(),
            &self.body,
        )
    }

    /// Reverses [`Envelope::encode`]; the body shares `record`'s memory.
    pub fn decode(mut record: Bytes) -> Result<Self, DecodeError> {
        if record.remaining() < 9 {
            return Err(DecodeError("truncated"));
        }
        let kind = record.get_u8();
        let claim_check = match kind & !TRACED {
            INLINE => false,
            CLAIM_CHECK => true,
            _ => return Err(DecodeError("unknown version")),
        };
        let received_at_ms = record.get_u64();
        let trace = if kind & TRACED != 0 {
            Some(take_trace(&mut record)?)
        } else {
            None
        };
        let mut take = || take_string(&mut record);
        Ok(Envelope {
            routing_key: take()?,
            message_id: take()?,
            event_type: take()?,
            session_id: take()?,
            reference: take()?,
            received_at_ms,
            body: record,
            claim_check,
            trace,
        })
    }
}

/// A u16-length-prefixed UTF-8 string.
fn take_string(record: &mut Bytes) -> Result<String, DecodeError> {
    if record.remaining() < 2 {
        return Err(DecodeError("truncated"));
    }
    let len = usize::from(record.get_u16());
    if record.remaining() < len {
        return Err(DecodeError("truncated"));
    }
    String::from_utf8(record.split_to(len).to_vec()).map_err(|_| DecodeError("not UTF-8"))
}

/// A trace block; an empty `tracestate` is none (so every record has one encoding).
fn take_trace(record: &mut Bytes) -> Result<TraceContext, DecodeError> {
    if record.remaining() < TRACE_FIXED {
        return Err(DecodeError("truncated"));
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    record.copy_to_slice(&mut trace_id);
    record.copy_to_slice(&mut span_id);
    let flags = record.get_u8();
    let state = take_string(record)?;
    Ok(TraceContext {
        trace_id,
        span_id,
        flags,
        state: (!state.is_empty()).then_some(state),
    })
}

/// The head of the spool record of a validated event: the bytes `Envelope::new(event, ..)
/// .encode()` gives before the body, written straight from the event's fields, so accepting
/// an event does not copy five strings into an envelope only to copy them again. The body
/// follows it in the record (`Spool::append_parts`) and is not copied here: an archive of
/// many megabytes is not held twice while it is stored. `claim_check`: the body to follow is
/// a claim-check document.
pub(crate) fn encode_head(
    event: &Event<'_>,
    received_at_ms: u64,
    trace: &TraceContext,
    claim_check: bool,
) -> Bytes {
    let fields = [
        event.routing_key.as_str(),
        event.message_id.as_str(),
        &event.event_type,
        &event.session_id,
        &event.reference,
    ];
    encode_record(claim_check, received_at_ms, Some(trace), fields, &[])
}

/// The one writer of the record format, in one allocation: kind (what the body is,
/// whether a trace follows), time, the trace block, the five strings of
/// [`Envelope::fields`] (that order), each with a u16 length, then the body.
fn encode_record(
    claim_check: bool,
    received_at_ms: u64,
    trace: Option<&TraceContext>,
    fields: [&str; 5],
    body: &[u8],
) -> Bytes {
    // A tracestate is bounded (512 bytes) where it is read; a longer one is not stored.
    let state = trace
        .and_then(|t| t.state.as_deref())
        .filter(|s| s.len() <= usize::from(u16::MAX))
        .unwrap_or("");
    let trace_len = trace.map_or(0, |_| TRACE_FIXED + state.len());
    let len = 1 + 8 + trace_len + fields.iter().map(|f| 2 + f.len()).sum::<usize>() + body.len();
    let mut out = BytesMut::with_capacity(len);
    let kind = if claim_check { CLAIM_CHECK } else { INLINE };
    out.put_u8(if trace.is_some() { kind | TRACED } else { kind });
    out.put_u64(received_at_ms);
    if let Some(t) = trace {
        out.put_slice(&t.trace_id);
        out.put_slice(&t.span_id);
        out.put_u8(t.flags);
        out.put_u16(state.len() as u16);
        out.put_slice(state.as_bytes());
    }
    for f in fields {
        // Every field is bounded by validation to at most 255 bytes.
        out.put_u16(f.len() as u16);
        out.put_slice(f.as_bytes());
    }
    out.put_slice(body);
    // The size computed up front is exact, so the record took one allocation.
    debug_assert_eq!(out.len(), len, "record size computed wrongly");
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Policy, validate};

    fn sample() -> Envelope {
        Envelope {
            routing_key: "ref-1".into(),
            message_id: "s1:WHEF_SESSION_CREATED:2025-01-26T08:49:33.626046".into(),
            event_type: "WHEF_SESSION_CREATED".into(),
            session_id: "s1".into(),
            reference: "ref-é".into(),
            received_at_ms: 1_737_881_373_626,
            body: Bytes::from_static(b"{\"a\": 1}\n"),
            claim_check: false,
            trace: None,
        }
    }

    fn traced() -> Envelope {
        Envelope {
            trace: Some(TraceContext {
                trace_id: *b"0123456789abcdef",
                span_id: *b"spanspan",
                flags: 1,
                state: Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".into()),
            }),
            ..sample()
        }
    }

    #[test]
    fn round_trips() {
        let e = sample();
        assert_eq!(Envelope::decode(e.encode()).unwrap(), e);
    }

    #[test]
    fn a_claim_check_round_trips_and_an_inline_record_keeps_format_1() {
        let inline = sample().encode();
        assert_eq!(
            inline[0], 1,
            "records written before claim checks still decode"
        );
        let claimed = Envelope {
            claim_check: true,
            ..sample()
        };
        let record = claimed.encode();
        assert_eq!(record[0], 2);
        assert_eq!(Envelope::decode(record).unwrap(), claimed);
    }

    #[test]
    fn rejects_truncated_and_foreign_records() {
        let encoded = sample().encode();
        assert!(Envelope::decode(encoded.slice(..12)).is_err());
        assert!(Envelope::decode(Bytes::from_static(b"\x09garbage-garbage")).is_err());
        assert!(Envelope::decode(Bytes::new()).is_err());
    }

    /// Every cut inside the head (before the body) is refused, never read past its end.
    #[test]
    fn every_truncation_of_the_head_is_refused() {
        for e in [sample(), traced()] {
            let record = e.encode();
            let head = record.len() - e.body.len();
            for cut in 0..head {
                assert!(
                    Envelope::decode(record.slice(..cut)).is_err(),
                    "a record cut at byte {cut} of its {head}-byte head decoded"
                );
            }
        }
    }

    /// The smallest record: empty strings and an empty body, each read to its last byte.
    #[test]
    fn empty_fields_and_an_empty_body_round_trip() {
        let empty = Envelope {
            routing_key: String::new(),
            message_id: String::new(),
            event_type: String::new(),
            session_id: String::new(),
            reference: String::new(),
            received_at_ms: 0,
            body: Bytes::new(),
            claim_check: false,
            trace: None,
        };
        assert_eq!(Envelope::decode(empty.encode()).unwrap(), empty);
        let last_field_ends_the_record = Envelope {
            reference: "r".into(),
            ..empty
        };
        assert_eq!(
            Envelope::decode(last_field_ends_the_record.encode()).unwrap(),
            last_field_ends_the_record
        );
    }

    #[test]
    fn encoding_an_event_matches_encoding_its_envelope() {
        let body = Bytes::from_static(
            br#"{"event":{"type":"WHEF_SESSION_CREATED","timestamp":"2025-01-26T08:49:33.626046"},
                "session":{"id":"s\u00e91","reference":"ref-\u00e9","transaction_number":1}}"#,
        );
        let event = validate(&body, &Policy::default()).expect("a valid event");
        let trace = TraceContext::fresh();
        let head = encode_head(&event, 1_737_881_373_626, &trace, false);
        let record = Bytes::from([&head[..], &body[..]].concat());
        let envelope = Envelope {
            trace: Some(trace),
            ..Envelope::new(&event, body.clone(), 1_737_881_373_626)
        };
        assert_eq!(record, envelope.encode());
        assert_eq!(Envelope::decode(record).expect("decodes"), envelope);
    }

    #[test]
    fn a_traced_record_round_trips_in_both_kinds() {
        for claim_check in [false, true] {
            let e = Envelope {
                claim_check,
                ..traced()
            };
            let record = e.encode();
            assert_eq!(record[0], if claim_check { 0x82 } else { 0x81 });
            assert_eq!(Envelope::decode(record).unwrap(), e);
        }
        let no_state = Envelope {
            trace: traced().trace.map(|t| TraceContext { state: None, ..t }),
            ..sample()
        };
        assert_eq!(Envelope::decode(no_state.encode()).unwrap(), no_state);
    }

    /// A record as the bridge wrote it before trace contexts, byte for byte (not made
    /// by today's encoder): it still decodes, without a trace.
    #[test]
    fn a_record_from_before_traces_still_decodes() {
        let mut old = vec![1u8];
        old.extend_from_slice(&1_737_881_373_626u64.to_be_bytes());
        for f in ["ref-1", "s1:T:ts", "T", "s1", "ref-1"] {
            old.extend_from_slice(&(f.len() as u16).to_be_bytes());
            old.extend_from_slice(f.as_bytes());
        }
        old.extend_from_slice(b"{}");
        let e = Envelope::decode(Bytes::from(old.clone())).expect("an old record decodes");
        assert_eq!(e.trace, None);
        assert_eq!(
            (e.routing_key.as_str(), e.message_id.as_str()),
            ("ref-1", "s1:T:ts")
        );
        assert_eq!(&e.body[..], b"{}");
        assert_eq!(
            &e.encode()[..],
            &old[..],
            "and encodes back to the old format"
        );
        old[0] = 2;
        assert!(Envelope::decode(Bytes::from(old)).unwrap().claim_check);
    }

    #[test]
    fn unknown_kinds_are_refused() {
        let mut record = traced().encode().to_vec();
        for kind in [0u8, 3, 0x40, 0x83, 0xff] {
            record[0] = kind;
            assert!(
                Envelope::decode(Bytes::from(record.clone())).is_err(),
                "{kind:#x}"
            );
        }
    }
}
