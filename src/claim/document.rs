//! The claim-check message (SPEC 9): the SHA-256 that names a stored body, and
//! the small JSON document published in its place. Pure, no I/O.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// The SHA-256 of `body`, lowercase hex: the stored object's name, so a sender's
/// retry writes the same object again instead of a second one. Hashed over the
/// body in place, no copy.
pub(super) fn sha256_hex(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut hex = String::with_capacity(digest.len() * 2);
    for byte in digest {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// What the document takes from the body: `event` and `session` as they were
/// received, borrowed from the body (the rest, however large, is skipped unread).
#[derive(Deserialize)]
struct Parts<'a> {
    #[serde(borrow)]
    event: &'a RawValue,
    #[serde(borrow)]
    session: &'a RawValue,
}

/// The published document: where the body is, and the two objects consumers
/// route and filter by, so most never need to fetch the body.
#[derive(Serialize)]
struct Document<'a> {
    claim_check: ClaimCheck<'a>,
    event: &'a RawValue,
    session: &'a RawValue,
}

/// Where the body is stored and how to check what was fetched.
#[derive(Serialize)]
struct ClaimCheck<'a> {
    url: &'a str,
    sha256: &'a str,
    bytes: usize,
}

/// The claim-check document of `body`, stored at `url` under `sha256`. `body` was
/// validated, so `event` and `session` are there (each once); an error here is a bug.
pub(super) fn document(body: &[u8], url: &str, sha256: &str) -> serde_json::Result<Vec<u8>> {
    let parts: Parts<'_> = serde_json::from_slice(body)?;
    serde_json::to_vec(&Document {
        claim_check: ClaimCheck {
            url,
            sha256,
            bytes: body.len(),
        },
        event: parts.event,
        session: parts.session,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_inputs() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_document_carries_event_and_session_as_received() {
        let body = br#"{"documents":[{"content":"JVBERi0xLjQK"}],
            "session" : [ {"id":"a1","reference":"r1"}, {"id":"a2","reference":"r1"} ],
            "event": {"type":"WHP_ARCHIVE",  "timestamp":"2025-01-27T14:02:11Z"}}"#;
        let doc = document(body, "file:///claims/ab", "ab").expect("a document");
        let text = String::from_utf8(doc).expect("UTF-8");
        assert_eq!(
            text,
            format!(
                r#"{{"claim_check":{{"url":"file:///claims/ab","sha256":"ab","bytes":{}}},"event":{{"type":"WHP_ARCHIVE",  "timestamp":"2025-01-27T14:02:11Z"}},"session":[ {{"id":"a1","reference":"r1"}}, {{"id":"a2","reference":"r1"}} ]}}"#,
                body.len()
            )
        );
    }

    #[test]
    fn a_body_without_event_or_session_is_an_error_not_a_panic() {
        assert!(document(br#"{"event":{}}"#, "u", "s").is_err());
        assert!(document(b"[]", "u", "s").is_err());
    }
}
