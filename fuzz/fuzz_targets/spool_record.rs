//! Arbitrary bytes into the spool record decoder. It must never panic, and a
//! record it decodes must encode back to the same bytes and decode again to
//! the same fields.

#![no_main]

use bytes::Bytes;
use cellosign_bridge::Envelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|record: &[u8]| {
    let Ok(envelope) = Envelope::decode(Bytes::copy_from_slice(record)) else {
        return;
    };
    let encoded = envelope.encode();
    // The encoding is canonical: whatever decodes re-encodes byte for byte.
    assert_eq!(&encoded[..], record);
    let again = Envelope::decode(encoded).expect("an encoded envelope decodes");
    assert_eq!(again, envelope);
});
