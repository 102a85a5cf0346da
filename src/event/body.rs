//! The top-level object and its `event` member.

use serde::de::MapAccess;

use super::archive::SessionsHandler;
use super::ctx::{Ctx, Kind};
use super::fields::Fields;
use super::json::{ObjectHandler, Scalar, next_object, next_scalar, skip_value};
use super::keys::{Keys, object_keys};
use super::rejection::{MUST_OBJECT, MUST_STRING, Problem};
use super::session::SessionHandler;
use super::timestamp::check_timestamp;

object_keys! {
    /// The keys of the top-level object that the validator reads.
    enum TopKey {
        /// `event`: what happened, and when.
        Event = "event",
        /// `session`: whom it happened to; the routing key comes from it.
        Session = "session",
    }
}

object_keys! {
    /// The keys of `event` that the validator reads.
    enum EventKey {
        /// `event.type`: must be in the accept list.
        Type = "type",
        /// `event.timestamp`: part of the message id.
        Timestamp = "timestamp",
    }
}

/// The top-level object: the root of the walk, yielding every collected field.
pub(super) struct BodyHandler<'c, 'p> {
    /// Where problems are recorded.
    ctx: &'c mut Ctx<'p>,
}

impl<'c, 'p> BodyHandler<'c, 'p> {
    /// The handler of a whole body validated under `ctx`.
    pub(super) fn new(ctx: &'c mut Ctx<'p>) -> Self {
        Self { ctx }
    }
}

impl<'de> ObjectHandler<'de> for BodyHandler<'_, '_> {
    type Out = Fields<'de>;

    /// Hands `event` and `session` to their handlers; other keys are skipped,
    /// and only checked for duplicates.
    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
        let ctx = self.ctx;
        let mut out = Fields::default();
        let mut keys = Keys::new("body");
        while let Some(key) = map.next_key_seed(keys.seed(ctx))? {
            match keys.note(key, ctx) {
                Some(TopKey::Event) => {
                    let handler = EventHandler {
                        ctx: &mut *ctx,
                        out: &mut out,
                    };
                    next_object(&mut map, handler)?;
                }
                Some(TopKey::Session) if ctx.kind == Kind::Archive => {
                    let handler = SessionsHandler {
                        ctx: &mut *ctx,
                        out: &mut out,
                    };
                    next_object(&mut map, handler)?;
                }
                Some(TopKey::Session) => {
                    let handler = SessionHandler {
                        ctx: &mut *ctx,
                        out: &mut out,
                    };
                    next_object(&mut map, handler)?;
                }
                None => skip_value(&mut map)?,
            }
        }
        keys.require(
            ctx,
            &[(TopKey::Event, "event"), (TopKey::Session, "session")],
        );
        Ok(out)
    }

    /// JSON that is not an object is a 422, not a 400: it parsed.
    fn not_object(self) -> Fields<'de> {
        self.ctx.flag("body", Problem::NotObject);
        Fields::default()
    }
}

/// The `event` object: the type and timestamp, which make the message id.
struct EventHandler<'c, 'p, 'f, 'de> {
    /// Where problems are recorded, and the policy the type is checked against.
    ctx: &'c mut Ctx<'p>,
    /// Where the accepted values go.
    out: &'f mut Fields<'de>,
}

impl<'de> ObjectHandler<'de> for EventHandler<'_, '_, '_, 'de> {
    type Out = ();

    /// Keeps the type if this webhook accepts it and the timestamp if it is a
    /// real date and time.
    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        let mut keys = Keys::new("event");
        while let Some(key) = map.next_key_seed(keys.seed(ctx))? {
            match keys.note(key, ctx) {
                Some(EventKey::Type) => match next_scalar(&mut map, true)? {
                    Scalar::Str(s) if ctx.accepts(&s) => self.out.event_type = Some(s),
                    Scalar::Str(_) => ctx.flag("event.type", Problem::TypeNotAccepted),
                    _ => ctx.flag("event.type", Problem::WrongType(MUST_STRING)),
                },
                Some(EventKey::Timestamp) => match next_scalar(&mut map, true)? {
                    Scalar::Str(s) => match check_timestamp(&s) {
                        Ok(()) => self.out.timestamp = Some(s),
                        Err(p) => ctx.flag("event.timestamp", p),
                    },
                    _ => ctx.flag("event.timestamp", Problem::WrongType(MUST_STRING)),
                },
                None => skip_value(&mut map)?,
            }
        }
        keys.require(
            ctx,
            &[
                (EventKey::Type, "event.type"),
                (EventKey::Timestamp, "event.timestamp"),
            ],
        );
        Ok(())
    }

    /// `event` is required, so `null` is refused like any other non-object.
    fn not_object(self) {
        self.ctx.flag("event", Problem::WrongType(MUST_OBJECT));
    }
}
