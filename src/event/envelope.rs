//! An accepted event as it is stored and published: the body bytes plus what
//! the broker message needs, computed once at acceptance.
//!
//! Keeping the routing key and message id with the body means a spooled event
//! is published exactly as it was accepted, even if the configuration changes
//! before it is forwarded.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::event::Event;

/// First byte of a record whose body is the request body, byte for byte (the
/// format since the first release).
const INLINE: u8 = 1;
/// First byte of a record whose body is a claim-check document (SPEC 9); the
/// layout is the same, so spools written before claim checks still decode.
const CLAIM_CHECK: u8 = 2;

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

    /// Serialises for the spool: version, time, five length-prefixed strings, then the body.
    pub fn encode(&self) -> Bytes {
        encode_record(
            self.claim_check,
            self.received_at_ms,
            self.fields(),
            &self.body,
        )
    }

    /// Reverses [`Envelope::encode`]; the body shares `record`'s memory.
    pub fn decode(mut record: Bytes) -> Result<Self, DecodeError> {
        if record.remaining() < 9 {
            return Err(DecodeError("truncated"));
        }
        let claim_check = match record.get_u8() {
            INLINE => false,
            CLAIM_CHECK => true,
            _ => return Err(DecodeError("unknown version")),
        };
        let received_at_ms = record.get_u64();
        let mut take = || -> Result<String, DecodeError> {
            if record.remaining() < 2 {
                return Err(DecodeError("truncated"));
            }
            let len = usize::from(record.get_u16());
            if record.remaining() < len {
                return Err(DecodeError("truncated"));
            }
            String::from_utf8(record.split_to(len).to_vec()).map_err(|_| DecodeError("not UTF-8"))
        };
        Ok(Envelope {
            routing_key: take()?,
            message_id: take()?,
            event_type: take()?,
            session_id: take()?,
            reference: take()?,
            received_at_ms,
            body: record,
            claim_check,
        })
    }
}

/// The head of the spool record of a validated event: the bytes `Envelope::new(event, ..)
/// .encode()` gives before the body, written straight from the event's fields, so accepting
/// an event does not copy five strings into an envelope only to copy them again. The body
/// follows it in the record (`Spool::append_parts`) and is not copied here: an archive of
/// many megabytes is not held twice while it is stored. `claim_check`: the body to follow is
/// a claim-check document.
pub(crate) fn encode_head(event: &Event<'_>, received_at_ms: u64, claim_check: bool) -> Bytes {
    let fields = [
        event.routing_key.as_str(),
        event.message_id.as_str(),
        &event.event_type,
        &event.session_id,
        &event.reference,
    ];
    encode_record(claim_check, received_at_ms, fields, &[])
}

/// The one writer of the record format, in one allocation: version (what the body is),
/// time, the five strings of [`Envelope::fields`] (that order), each with a u16 length,
/// then the body.
fn encode_record(claim_check: bool, received_at_ms: u64, fields: [&str; 5], body: &[u8]) -> Bytes {
    let len = 1 + 8 + fields.iter().map(|f| 2 + f.len()).sum::<usize>() + body.len();
    let mut out = BytesMut::with_capacity(len);
    out.put_u8(if claim_check { CLAIM_CHECK } else { INLINE });
    out.put_u64(received_at_ms);
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
        let e = sample();
        let record = e.encode();
        let head = record.len() - e.body.len();
        for cut in 0..head {
            assert!(
                Envelope::decode(record.slice(..cut)).is_err(),
                "a record cut at byte {cut} of its {head}-byte head decoded"
            );
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
        let head = encode_head(&event, 1_737_881_373_626, false);
        let record = Bytes::from([&head[..], &body[..]].concat());
        let envelope = Envelope::new(&event, body.clone(), 1_737_881_373_626);
        assert_eq!(record, envelope.encode());
        assert_eq!(Envelope::decode(record).expect("decodes"), envelope);
    }
}
