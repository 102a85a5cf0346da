//! Writes the seed corpus of both fuzz targets from the contract vectors:
//! `fuzz/corpus/validate/seed-NN` (every vector body) and
//! `fuzz/corpus/spool_record/seed-NN` (the envelope of every accepted one, every
//! other one with a trace context).
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --bin seed_corpus`

use std::fs;
use std::path::Path;

use bytes::Bytes;
use cellosign_bridge::{Envelope, TraceContext};
use cellosign_bridge::{Policy, validate};
use serde_json::Value;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let vectors = root.join("../tests/vectors/cases.jsonl");
    let vectors = fs::read_to_string(&vectors).expect("tests/vectors/cases.jsonl");
    let validate_dir = root.join("corpus/validate");
    let spool_dir = root.join("corpus/spool_record");
    fs::create_dir_all(&validate_dir).unwrap();
    fs::create_dir_all(&spool_dir).unwrap();
    let policy = Policy::default();
    let (mut bodies, mut records) = (0, 0);
    for (i, line) in vectors.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let case: Value = serde_json::from_str(line).expect("vector line");
        let body = case["body"].as_str().expect("body").as_bytes();
        fs::write(validate_dir.join(format!("seed-{i:02}")), body).unwrap();
        bodies += 1;
        if let Ok(event) = validate(body, &policy) {
            let received_at_ms = 1_737_881_373_626 + i as u64;
            let mut envelope = Envelope::new(&event, Bytes::copy_from_slice(body), received_at_ms);
            // Every other seed carries a trace context (a fixed one: seeds are reproducible).
            if i % 2 == 1 {
                envelope.trace = Some(TraceContext {
                    trace_id: *b"trace-id-16bytes",
                    span_id: *b"span-id8",
                    flags: 1,
                    state: (i % 4 == 1).then(|| "rojo=00f067aa0ba902b7".to_string()),
                });
            }
            fs::write(spool_dir.join(format!("seed-{i:02}")), envelope.encode()).unwrap();
            records += 1;
        }
    }
    println!("{bodies} validate seeds, {records} spool_record seeds");
}
