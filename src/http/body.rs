//! Reading a request body whole, bounded in size and time: shared by the webhook
//! and the token URL, so neither can be held by a slow or endless body.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
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

/// The whole body, at most `max_bytes`, within `within`.
pub(crate) async fn read_body(
    body: Incoming,
    max_bytes: usize,
    within: Duration,
) -> Result<Bytes, BodyError> {
    let limited = Limited::new(body, max_bytes);
    match tokio::time::timeout(within, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(_)) => Err(BodyError::Unreadable),
        Err(_) => Err(BodyError::Timeout),
    }
}
