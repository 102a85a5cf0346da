//! W3C Trace Context (`traceparent`, `tracestate`): read strictly from the webhook
//! request, kept with the event through the spool, written into the AMQP headers.
//!
//! A missing or invalid `traceparent` is never a refusal: the bridge starts a new
//! trace instead, so every published message carries one.

use hyper::HeaderMap;

/// The request and AMQP header names.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Longest `tracestate` passed on; members past it are dropped from the end (W3C
/// asks for at least 512 bytes to be propagated).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// Most `tracestate` members W3C allows.
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// `trace-flags`: the caller (or the bridge, for a trace it starts) may record it.
pub const SAMPLED: u8 = 0x01;

/// The trace an event belongs to and the bridge's span in it: the parent of
/// whatever a consumer does with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The bridge's own span: the receive span when exporting, else a fresh id.
    pub span_id: [u8; 8],
    pub flags: u8,
    /// The caller's `tracestate`, bounded; only with the caller's own trace.
    pub state: Option<String>,
}

/// A valid `traceparent` (and its `tracestate`) as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: [u8; 16],
    /// The caller's span: the parent of the bridge's.
    pub parent_id: [u8; 8],
    pub flags: u8,
    pub state: Option<String>,
}

impl Incoming {
    /// The caller's trace from the request headers: `None` when `traceparent` is
    /// missing, repeated or invalid (the bridge then starts a trace of its own).
    pub fn from_headers(headers: &HeaderMap) -> Option<Incoming> {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let (trace_id, parent_id, flags) = parse_traceparent(value.as_bytes())?;
        Some(Incoming {
            trace_id,
            parent_id,
            flags,
            state: tracestate(headers),
        })
    }
}

impl TraceContext {
    /// A new trace: random ids (not all zero), sampled, so that whatever comes
    /// after the bridge may record it.
    pub fn fresh() -> TraceContext {
        TraceContext {
            trace_id: fastrand::u128(1..).to_be_bytes(),
            span_id: fresh_span_id(),
            flags: SAMPLED,
            state: None,
        }
    }

    /// The caller's trace, with a fresh span id of the bridge's.
    pub fn child_of(incoming: Incoming) -> TraceContext {
        TraceContext {
            trace_id: incoming.trace_id,
            span_id: fresh_span_id(),
            flags: incoming.flags,
            state: incoming.state,
        }
    }

    /// The trace id, 32 lowercase hex digits (for the log line), written straight
    /// into the formatter: no string per request.
    pub fn trace_id_hex(&self) -> impl std::fmt::Display + '_ {
        LowerHex(&self.trace_id)
    }

    /// `00-<trace id>-<span id>-<flags>`, lowercase hex.
    pub fn traceparent(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &self.span_id);
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }
}

/// A random span id, never all zero.
pub fn fresh_span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

/// Parses a version-00 `traceparent`: exactly 55 characters, lowercase hex, the
/// trace id and parent id not all zero. Anything else is invalid.
pub fn parse_traceparent(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if value.len() != 55 || &value[..3] != b"00-" || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut parent_id = [0u8; 8];
    let mut flags = [0u8; 1];
    hex_into(&value[3..35], &mut trace_id)?;
    hex_into(&value[36..52], &mut parent_id)?;
    hex_into(&value[53..55], &mut flags)?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags[0]))
}

/// The `tracestate` to pass on: every header line joined, members trimmed, empty
/// ones dropped, at most [`MAX_TRACESTATE_MEMBERS`] members and
/// [`MAX_TRACESTATE_BYTES`] bytes (members past either are dropped from the end).
/// A value with bytes outside printable ASCII is dropped whole.
fn tracestate(headers: &HeaderMap) -> Option<String> {
    let mut out = String::new();
    let mut members = 0;
    for value in headers.get_all(TRACESTATE) {
        let value = std::str::from_utf8(value.as_bytes()).ok()?;
        if !value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) || b == b'\t')
        {
            return None;
        }
        for member in value.split(',').map(|m| m.trim_matches([' ', '\t'])) {
            if member.is_empty() {
                continue;
            }
            let extra = member.len() + usize::from(!out.is_empty());
            if members == MAX_TRACESTATE_MEMBERS || out.len() + extra > MAX_TRACESTATE_BYTES {
                return (!out.is_empty()).then_some(out);
            }
            if !out.is_empty() {
                out.push(',');
            }
            out.push_str(member);
            members += 1;
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Lowercase hex digits into `out`; `None` on any other byte.
fn hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    fn nibble(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            _ => None,
        }
    }
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(())
}

/// Bytes shown as lowercase hex digits.
struct LowerHex<'a>(&'a [u8]);

impl std::fmt::Display for LowerHex<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_str(v).expect("a header value"));
        }
        map
    }

    #[test]
    fn a_valid_traceparent_parses_and_formats_back() {
        let (trace_id, parent_id, flags) = parse_traceparent(VALID.as_bytes()).expect("valid");
        assert_eq!(trace_id[0], 0x4b);
        assert_eq!(parent_id[7], 0xb7);
        assert_eq!(flags, 1);
        let ctx = TraceContext {
            trace_id,
            span_id: parent_id,
            flags,
            state: None,
        };
        assert_eq!(ctx.traceparent(), VALID);
        assert_eq!(ctx.trace_id_hex().to_string(), VALID[3..35]);
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn from_headers_takes_one_traceparent_and_its_tracestate() {
        let got = Incoming::from_headers(&headers(&[
            ("traceparent", VALID),
            ("tracestate", "rojo=00f067aa0ba902b7, ,congo=t61rcWkgMzE"),
            ("tracestate", "x=1"),
        ]))
        .expect("valid");
        assert_eq!(
            got.state.as_deref(),
            Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,x=1")
        );
        assert_eq!(Incoming::from_headers(&headers(&[])), None);
        assert_eq!(
            Incoming::from_headers(&headers(&[("traceparent", VALID), ("traceparent", VALID)])),
            None,
            "two traceparents are invalid"
        );
        // A tracestate without a valid traceparent is not passed on.
        assert_eq!(
            Incoming::from_headers(&headers(&[("tracestate", "a=b")])),
            None
        );
    }

    #[test]
    fn tracestate_is_bounded() {
        let member = format!("k={}", "v".repeat(98));
        let long = [member.as_str(); 8].join(",");
        let got =
            Incoming::from_headers(&headers(&[("traceparent", VALID), ("tracestate", &long)]))
                .and_then(|i| i.state)
                .expect("a state");
        assert!(got.len() <= MAX_TRACESTATE_BYTES, "{}", got.len());
        assert_eq!(
            got.split(',').count(),
            5,
            "whole members, dropped from the end"
        );
        let many = (0..40)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let got =
            Incoming::from_headers(&headers(&[("traceparent", VALID), ("tracestate", &many)]))
                .and_then(|i| i.state)
                .expect("a state");
        assert_eq!(got.split(',').count(), MAX_TRACESTATE_MEMBERS);
    }

    #[test]
    fn fresh_contexts_differ_and_are_valid() {
        let (a, b) = (TraceContext::fresh(), TraceContext::fresh());
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.trace_id, [0; 16]);
        assert_ne!(a.span_id, [0; 8]);
        assert!(parse_traceparent(a.traceparent().as_bytes()).is_some());
    }
}
