//! Reading a request body whole, bounded in size and time: shared by the webhook
//! paths and the token URL, so none can be held by a slow or endless body, and a
//! large body is held once.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Why a body could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyError {
    /// Over the size limit (by stream; the caller checks `Content-Length` first).
    TooLarge,
    /// The connection failed or the client sent a broken body.
    Unreadable,
    /// Not all of it arrived within the time limit.
    Timeout,
}

/// The whole body, at most `max_bytes`, within `within`. `declared` is the
/// `Content-Length`, already checked against `max_bytes`, used to size the buffer.
pub(crate) async fn read_body(
    body: Incoming,
    max_bytes: usize,
    declared: Option<u64>,
    within: Duration,
) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(within, collect(body, max_bytes, declared)).await {
        Ok(read) => read,
        Err(_) => Err(BodyError::Timeout),
    }
}

/// Reads the whole body, at most `limit` bytes. A body of one frame is kept as
/// it came; a longer one is copied frame by frame into one buffer, sized from
/// `declared` when given, and each frame is freed once copied. So a large body is
/// held once, plus the frame in hand: never all its frames and a copy of them at
/// the same time.
async fn collect(
    mut body: Incoming,
    limit: usize,
    declared: Option<u64>,
) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers carry no body bytes.
        let Ok(data) = frame.map_err(|_| BodyError::Unreadable)?.into_data() else {
            continue;
        };
        let held = first.as_ref().map_or(buf.len(), Bytes::len);
        if held.saturating_add(data.len()) > limit {
            return Err(BodyError::TooLarge);
        }
        match first.take() {
            None if buf.is_empty() => first = Some(data),
            Some(head) => {
                let want = usize::try_from(declared.unwrap_or(0)).unwrap_or(limit);
                buf.reserve(want.min(limit).max(head.len() + data.len()));
                buf.extend_from_slice(&head);
                buf.extend_from_slice(&data);
            }
            None => buf.extend_from_slice(&data),
        }
    }
    Ok(first.unwrap_or_else(|| buf.freeze()))
}
