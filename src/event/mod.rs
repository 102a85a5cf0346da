//! Validation of Cellosign webhook bodies and derivation of the AMQP routing key
//! and message id.
//!
//! Validation is a pure function over the body bytes. It streams the document
//! through custom serde visitors, borrowing strings from the body where it can
//! and skipping everything it does not check with
//! [`IgnoredAny`](serde::de::IgnoredAny). A semantic problem is recorded, never
//! raised, so that a syntax error anywhere in the document still wins (400
//! rather than 422).
//!
//! One idea per file:
//! * `policy`: [`Policy`], what the operator configured (accepted types, template);
//! * `template`: [`RoutingKeyTemplate`], parsed at config load and rendered per event;
//! * `rejection`: [`Rejection`] and its parts, their reason texts and metric labels;
//! * `fields`: what the streaming pass collects, and the [`Event`] built from it;
//! * `ctx`: the state of one validation, where the first problem is recorded;
//! * `json`: serde adapters that read any value without ever failing on its type;
//! * `keys`: one enum per JSON object for the keys it reads, and duplicate-key detection;
//! * `body`: the top-level object and `event`;
//! * `session`: `session`, `session.recipient` and `session.labels`;
//! * `archive`: the archive webhook's `session`, one object or an array of them;
//! * `timestamp`: the `event.timestamp` format and calendar check.
//!
//! The unit tests are in the `tests*` files beside them, one topic each.

mod archive;
mod body;
mod ctx;
pub(crate) mod envelope;
mod fields;
mod json;
mod keys;
mod policy;
mod rejection;
mod session;
mod template;
mod timestamp;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_archive;
#[cfg(test)]
mod tests_fields;
#[cfg(test)]
mod tests_keys;
#[cfg(test)]
mod tests_rejection;
#[cfg(test)]
mod tests_template;
#[cfg(test)]
mod tests_timestamp;

use serde::de::Deserializer as _;

pub use archive::{ARCHIVE_EVENT_TYPE, validate_archive};
pub use fields::Event;
pub use policy::{DEFAULT_ACCEPT, Policy};
use rejection::Malformed;
pub use rejection::Rejection;
pub use template::RoutingKeyTemplate;

use body::BodyHandler;
use ctx::{Ctx, Kind};
use json::ObjectVisitor;

/// Longest AMQP routing key (a short string on the wire).
pub const MAX_ROUTING_KEY_BYTES: usize = 255;
/// Longest accepted `session.id`, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 128;
/// Longest accepted `session.reference`, in bytes (it is the default routing key).
pub const MAX_REFERENCE_BYTES: usize = 255;

/// Longest message id: an AMQP `message_id` is a short string.
pub const MAX_MESSAGE_ID_BYTES: usize = 255;

/// Validates a webhook body against the spec and the operator's policy, and
/// derives the routing key and message id. Pure: same bytes, same answer.
///
/// ```
/// use cellosign_bridge::{validate, Policy};
/// let body = br#"{"event":{"type":"WHEF_SESSION_CREATED","timestamp":"2025-01-26T08:49:33Z"},
///                 "session":{"id":"s1","reference":"r1","transaction_number":1}}"#;
/// let event = validate(body, &Policy::default()).unwrap();
/// assert_eq!(event.routing_key, "r1");
/// assert_eq!(event.message_id, "s1:WHEF_SESSION_CREATED:2025-01-26T08:49:33Z");
///
/// let err = validate(b"[]", &Policy::default()).unwrap_err();
/// assert_eq!((err.http_status(), err.to_string().as_str()), (422, "body: not a JSON object"));
/// ```
pub fn validate<'a>(body: &'a [u8], policy: &Policy) -> Result<Event<'a>, Rejection> {
    run(body, policy, Kind::Notification)
}

/// The one validation pass of both webhooks: UTF-8, JSON, the `kind`'s rules,
/// then the routing key and message id.
fn run<'a>(body: &'a [u8], policy: &Policy, kind: Kind) -> Result<Event<'a>, Rejection> {
    let text = std::str::from_utf8(body).map_err(|e| Malformed::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    if text.trim_ascii().is_empty() {
        return Err(Malformed::Empty.into());
    }
    let mut ctx = Ctx::new(policy, kind);
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de
        .deserialize_any(ObjectVisitor(BodyHandler::new(&mut ctx)))
        .map_err(Malformed::from)?;
    de.end().map_err(Malformed::from)?;
    if let Some(invalid) = ctx.problem() {
        return Err(invalid.into());
    }
    fields.into_event(policy).map_err(Rejection::from)
}
