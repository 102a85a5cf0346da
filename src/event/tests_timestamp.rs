//! Unit tests of `event.timestamp`: the accepted form, real calendar dates and
//! times, and the bound the message id sets on the fraction.

use serde_json::json;

use super::tests::{invalid, invalid_prefix, ok, set};

// --- timestamps ------------------------------------------------------

#[test]
fn a_fraction_too_long_for_the_message_id_is_refused_naming_the_timestamp() {
    let long = format!("2025-01-26T08:49:33.{}", "1".repeat(300));
    invalid_prefix(
        &set("/event/timestamp", json!(long)),
        "event.timestamp: too long",
        "too_long",
    );
}

#[test]
fn timestamps() {
    let good = [
        "2025-01-26T08:49:33",
        "2025-01-26T08:49:33.6",
        "2025-01-26T08:49:33.626046",
        "2025-01-26T08:49:33.123456789",
        "2025-01-26T08:49:33.1234567890123",
        "2025-01-26T08:49:33Z",
        "2025-01-26T08:49:33.5Z",
        "2025-01-26T08:49:33+02:00",
        "2025-01-26T08:49:33.626046-05:30",
        "2024-02-29T00:00:00",
        "2000-02-29T23:59:59",
        "2025-12-31T23:59:59+23:59",
        "2025-04-30T12:00:00",
    ];
    for t in good {
        assert_eq!(ok(&set("/event/timestamp", json!(t))).timestamp, t);
    }
    let format = [
        "yesterday",
        "",
        "2025-01-26",
        "2025-01-26 08:49:33",
        "2025-01-26t08:49:33",
        "2025-01-26T08:49:33z",
        "2025-01-26T08:49",
        "2025-1-26T08:49:33",
        "2025-01-26T08:49:33.",
        "2025-01-26T08:49:33+0200",
        "2025-01-26T08:49:33+02",
        "2025-01-26T08:49:33 ",
        "2025-01-26T08:49:33ZZ",
        "+2025-01-26T08:49:33",
        "2025-01-26T08:49:33.5+02:00Z",
        "2025-01-26T08:49:33+0a:00",
        "2025-01-26T08:49:33-02:x0",
        "２025-01-26T08:49:33",
    ];
    for t in format {
        let r = invalid_prefix(
            &set("/event/timestamp", json!(t)),
            "event.timestamp: must be an ISO-8601",
            "bad_timestamp",
        );
        assert!(r.to_string().len() <= 120);
    }
    let range = [
        "2023-02-29T00:00:00",
        "1900-02-29T00:00:00",
        "2025-13-01T00:00:00",
        "2025-00-10T00:00:00",
        "2025-04-31T00:00:00",
        "2025-01-00T00:00:00",
        "2025-01-32T00:00:00",
        "2025-01-26T24:00:00",
        "2025-01-26T23:60:00",
        "2025-01-26T23:59:60",
        "2025-01-26T23:59:59+24:00",
        "2025-01-26T23:59:59-05:60",
    ];
    for t in range {
        invalid(
            &set("/event/timestamp", json!(t)),
            "event.timestamp: not a real calendar date and time",
            "bad_timestamp",
        );
    }
}
