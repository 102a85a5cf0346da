//! The `event.timestamp` check: ISO-8601 form, and a real calendar date and time.
//!
//! A hand-written check rather than a date library: it must accept exactly the
//! documented form, allocate nothing, and tell a malformed timestamp from one
//! that names no real date.

use super::rejection::Problem;

/// Checks `YYYY-MM-DDTHH:MM:SS[.fraction][Z|±HH:MM]` and that it names a real
/// date and time.
pub(super) fn check_timestamp(s: &str) -> Result<(), Problem> {
    let b = s.as_bytes();
    let bad = Problem::BadTimestamp;
    let (main, mut rest) = b.split_at_checked(19).ok_or(bad)?;
    for (i, &c) in main.iter().enumerate() {
        let ok = match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            _ => c.is_ascii_digit(),
        };
        if !ok {
            return Err(bad);
        }
    }
    if let Some(frac) = rest.strip_prefix(b".") {
        let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        // SPEC 1 sets no bound on the fraction; the message id length bounds it.
        if digits == 0 {
            return Err(bad);
        }
        rest = &frac[digits..];
    }
    let offset = match rest {
        [] | [b'Z'] => None,
        [b'+' | b'-', h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) =>
        {
            Some((num(&[*h1, *h2]), num(&[*m1, *m2])))
        }
        _ => return Err(bad),
    };
    let year = num(&main[0..4]);
    let month = num(&main[5..7]);
    let day = num(&main[8..10]);
    let in_range = (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && num(&main[11..13]) <= 23
        && num(&main[14..16]) <= 59
        && num(&main[17..19]) <= 59
        && offset.is_none_or(|(h, m)| h <= 23 && m <= 59);
    if in_range {
        Ok(())
    } else {
        Err(Problem::TimestampOutOfRange)
    }
}

/// Decimal value of ASCII digits (already checked).
fn num(digits: &[u8]) -> u32 {
    digits
        .iter()
        .fold(0, |n, d| n * 10 + u32::from(d.wrapping_sub(b'0')))
}

/// Days in `month` of `year`, in the Gregorian calendar (leap years included).
fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}
