//! The archive webhook (`WHP_ARCHIVE`, SPEC 9): the same walk as a notification
//! (`event` is checked by `body`), except that `session` is one session object or
//! a non-empty array of them, each with `id` and `reference` as in SPEC 1, all of
//! one reference. Everything else in the body, however large, passes through
//! unread: strings the walk skips are scanned, never copied.
//!
//! The routing key is the configured template rendered against the first
//! session: `{session.reference}` is the shared reference, `{session.id}` the
//! first session's id; `{session.process_id}` and `{session.recipient.name}` are
//! read from the first session only when the template names them (by the
//! SPEC 1 rules of those fields), and refuse the archive (422) when absent.

use serde::de::{MapAccess, SeqAccess};

use super::ctx::{Ctx, Kind};
use super::fields::Fields;
use super::json::{
    ObjectHandler, ObjectVisitor, Scalar, Seed, next_object, next_scalar, skip_value,
};
use super::keys::{Keys, object_keys};
use super::rejection::{MUST_OBJECT, MUST_SESSIONS, MUST_STRING_OR_NULL, Problem, Rejection};
use super::session::{RecipientHandler, next_text};
use super::template::Placeholder;
use super::{Event, MAX_REFERENCE_BYTES, MAX_SESSION_ID_BYTES, Policy};

/// The event type of the archive webhook, accepted on `http.archive_path` only.
pub const ARCHIVE_EVENT_TYPE: &str = "WHP_ARCHIVE";

/// Validates an archive webhook body (SPEC 9) and derives its routing key and
/// message id (`{first session id}:WHP_ARCHIVE:{event.timestamp}`). Pure, like
/// [`validate`](super::validate), whose rules and reasons it shares.
///
/// ```
/// use cellosign_bridge::{validate_archive, Policy};
/// let body = br#"{"event":{"type":"WHP_ARCHIVE","timestamp":"2025-01-27T14:02:11Z"},
///                 "session":[{"id":"a1","reference":"r1"},{"id":"a2","reference":"r1"}],
///                 "documents":[{"content":"JVBERi0xLjQK"}]}"#;
/// let event = validate_archive(body, &Policy::default()).unwrap();
/// assert_eq!(event.routing_key, "r1");
/// assert_eq!(event.message_id, "a1:WHP_ARCHIVE:2025-01-27T14:02:11Z");
///
/// let other = br#"{"event":{"type":"WHP_ARCHIVE","timestamp":"2025-01-27T14:02:11Z"},
///                  "session":[{"id":"a1","reference":"r1"},{"id":"a2","reference":"r2"}]}"#;
/// let err = validate_archive(other, &Policy::default()).unwrap_err();
/// assert_eq!(err.to_string(), "session[1].reference: differs from session[0].reference");
/// ```
pub fn validate_archive<'a>(body: &'a [u8], policy: &Policy) -> Result<Event<'a>, Rejection> {
    super::run(body, policy, Kind::Archive)
}

object_keys! {
    /// The keys of an archive session that the validator reads.
    enum ArchiveSessionKey {
        /// `id`: required text; the first session's is in the message id.
        Id = "id",
        /// `reference`: required text, the same in every session; the routing key.
        Reference = "reference",
        /// `process_id`: read from the first session if the routing key names it.
        ProcessId = "process_id",
        /// `recipient`: read from the first session if the routing key names its name.
        Recipient = "recipient",
    }
}

/// An archive's `session`: one session object, or a non-empty array of them.
pub(super) struct SessionsHandler<'c, 'p, 'f, 'de> {
    /// Where problems are recorded; its `item` follows the array.
    pub(super) ctx: &'c mut Ctx<'p>,
    /// Where the first session's values go.
    pub(super) out: &'f mut Fields<'de>,
}

impl<'de> ObjectHandler<'de> for SessionsHandler<'_, '_, '_, 'de> {
    type Out = ();

    /// A single session object: read as the first (and only) session.
    fn object<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        SessionHandler {
            ctx: self.ctx,
            out: self.out,
            first: true,
        }
        .object(map)
    }

    /// An array: each item a session, reasons naming its index; none is refused.
    fn array<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (ctx, out) = (self.ctx, self.out);
        out.first_item = Some(0);
        let mut index = 0u32;
        loop {
            ctx.item = Some(index);
            let handler = SessionHandler {
                ctx: &mut *ctx,
                out: &mut *out,
                first: index == 0,
            };
            if seq
                .next_element_seed(Seed(ObjectVisitor(handler)))?
                .is_none()
            {
                break;
            }
            index = index.saturating_add(1);
        }
        ctx.item = None;
        if index == 0 {
            ctx.flag("session", Problem::Empty);
        }
        Ok(())
    }

    /// Neither an object nor an array: refused (`null` included: it is required).
    fn not_object(self) {
        self.ctx.flag("session", Problem::WrongType(MUST_SESSIONS));
    }
}

/// One archive session: `id` and `reference` checked as in SPEC 1, the
/// reference compared with the first session's, the rest passed through.
struct SessionHandler<'c, 'p, 'f, 'de> {
    /// Where problems are recorded.
    ctx: &'c mut Ctx<'p>,
    /// Where the first session's values go.
    out: &'f mut Fields<'de>,
    /// Whether this is the first session, whose values make the routing key
    /// and message id.
    first: bool,
}

impl<'de> ObjectHandler<'de> for SessionHandler<'_, '_, '_, 'de> {
    type Out = ();

    /// Reads `id` and `reference` (and, in the first session, what the
    /// routing key names); every other key is skipped, and only checked for
    /// duplicates, as in a notification's session.
    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (ctx, out, first) = (self.ctx, self.out, self.first);
        let template = ctx.policy.routing_key();
        let wants_process_id = first && template.uses(Placeholder::SessionProcessId);
        let wants_recipient = first && template.uses(Placeholder::SessionRecipientName);
        let mut keys = Keys::new("session");
        while let Some(key) = map.next_key_seed(keys.seed(ctx))? {
            match keys.note(key, ctx) {
                Some(ArchiveSessionKey::Id) => {
                    let id = next_text(&mut map, ctx, "session.id", MAX_SESSION_ID_BYTES)?;
                    if first {
                        out.session_id = id;
                    }
                }
                Some(ArchiveSessionKey::Reference) => {
                    let path = "session.reference";
                    let reference = next_text(&mut map, ctx, path, MAX_REFERENCE_BYTES)?;
                    if first {
                        out.reference = reference;
                    } else if reference.is_some() && reference != out.reference {
                        ctx.flag(path, Problem::ReferenceMismatch);
                    }
                }
                Some(ArchiveSessionKey::ProcessId) if wants_process_id => {
                    match next_scalar(&mut map, true)? {
                        Scalar::Str(s) => out.process_id = Some(s),
                        Scalar::Null => {}
                        _ => ctx.flag(
                            "session.process_id",
                            Problem::WrongType(MUST_STRING_OR_NULL),
                        ),
                    }
                }
                Some(ArchiveSessionKey::Recipient) if wants_recipient => {
                    out.recipient_name =
                        next_object(&mut map, RecipientHandler { ctx: &mut *ctx })?;
                }
                _ => skip_value(&mut map)?,
            }
        }
        keys.require(
            ctx,
            &[
                (ArchiveSessionKey::Id, "session.id"),
                (ArchiveSessionKey::Reference, "session.reference"),
            ],
        );
        Ok(())
    }

    /// An item of the array that is not an object (`null` included).
    fn not_object(self) {
        self.ctx.flag("session", Problem::WrongType(MUST_OBJECT));
    }
}
