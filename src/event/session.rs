//! The `session` object and its `recipient` and `labels` members.

use std::borrow::Cow;

use serde::de::{IgnoredAny, MapAccess};

use super::ctx::Ctx;
use super::fields::Fields;
use super::json::{ObjectHandler, Scalar, next_object, next_scalar, skip_value};
use super::keys::{Key, KeySeed, Keys, KnownKey, object_keys};
use super::rejection::{
    LABEL_VALUES, MUST_INT, MUST_OBJECT, MUST_OBJECT_OR_NULL, MUST_STRING, MUST_STRING_OR_NULL,
    MUST_UINT, MUST_UINT_OR_NULL, Problem,
};
use super::{MAX_REFERENCE_BYTES, MAX_SESSION_ID_BYTES};

object_keys! {
    /// The keys of `session` that the validator reads.
    pub(super) enum SessionKey {
        /// `session.id`: required text, first part of the message id.
        Id = "id",
        /// `session.reference`: required text, the default routing key.
        Reference = "reference",
        /// `session.transaction_number`: a required integer >= 0.
        TransactionNumber = "transaction_number",
        /// `session.process_id`: an optional string a routing key may use.
        ProcessId = "process_id",
        /// `session.process_number`: an optional integer >= 0.
        ProcessNumber = "process_number",
        /// `session.recipient`: an optional object whose name a routing key may use.
        Recipient = "recipient",
        /// `session.labels`: an optional object of scalars.
        Labels = "labels",
    }
}

object_keys! {
    /// The keys of `session.recipient` that the validator reads.
    enum RecipientKey {
        /// `session.recipient.id`: a required integer.
        Id = "id",
        /// `session.recipient.name`: a required string a routing key may use.
        Name = "name",
    }
}

/// The `session` object: who the event is about, and what routes it.
pub(super) struct SessionHandler<'c, 'p, 'f, 'de> {
    /// Where problems are recorded.
    pub(super) ctx: &'c mut Ctx<'p>,
    /// Where the accepted values go.
    pub(super) out: &'f mut Fields<'de>,
}

impl<'de> ObjectHandler<'de> for SessionHandler<'_, '_, '_, 'de> {
    type Out = ();

    /// Checks every member the spec defines and keeps the ones a routing key
    /// or the message id may use; other keys are skipped, and only checked
    /// for duplicates.
    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ctx = self.ctx;
        let out = self.out;
        let mut keys = Keys::new("session");
        while let Some(key) = map.next_key_seed(keys.seed(ctx))? {
            let Some(key) = keys.note(key, ctx) else {
                skip_value(&mut map)?;
                continue;
            };
            match key {
                SessionKey::Id => {
                    out.session_id = next_text(&mut map, ctx, "session.id", MAX_SESSION_ID_BYTES)?;
                }
                SessionKey::Reference => {
                    out.reference =
                        next_text(&mut map, ctx, "session.reference", MAX_REFERENCE_BYTES)?;
                }
                SessionKey::TransactionNumber => {
                    if !matches!(next_scalar(&mut map, false)?, Scalar::Unsigned) {
                        ctx.flag("session.transaction_number", Problem::WrongType(MUST_UINT));
                    }
                }
                SessionKey::ProcessId => match next_scalar(&mut map, true)? {
                    Scalar::Str(s) => out.process_id = Some(s),
                    Scalar::Null => {}
                    _ => ctx.flag(
                        "session.process_id",
                        Problem::WrongType(MUST_STRING_OR_NULL),
                    ),
                },
                SessionKey::ProcessNumber => {
                    if !matches!(
                        next_scalar(&mut map, false)?,
                        Scalar::Unsigned | Scalar::Null
                    ) {
                        ctx.flag(
                            "session.process_number",
                            Problem::WrongType(MUST_UINT_OR_NULL),
                        );
                    }
                }
                SessionKey::Recipient => {
                    out.recipient_name =
                        next_object(&mut map, RecipientHandler { ctx: &mut *ctx })?;
                }
                SessionKey::Labels => next_object(&mut map, LabelsHandler { ctx: &mut *ctx })?,
            }
        }
        keys.require(
            ctx,
            &[
                (SessionKey::Id, "session.id"),
                (SessionKey::Reference, "session.reference"),
                (SessionKey::TransactionNumber, "session.transaction_number"),
            ],
        );
        Ok(())
    }

    /// `session` is required, so `null` is refused like any other non-object.
    fn not_object(self) {
        self.ctx.flag("session", Problem::WrongType(MUST_OBJECT));
    }
}

/// Reads the next value of `map` as required text at `path`: a string, not
/// empty, at most `max` bytes, free of control characters. Gives it back only
/// if it passed; records what is wrong otherwise.
pub(super) fn next_text<'de, A: MapAccess<'de>>(
    map: &mut A,
    ctx: &mut Ctx<'_>,
    path: &'static str,
    max: usize,
) -> Result<Option<Cow<'de, str>>, A::Error> {
    Ok(match next_scalar(map, true)? {
        Scalar::Str(s) => ctx.check_text(path, &s, max).then_some(s),
        _ => {
            ctx.flag(path, Problem::WrongType(MUST_STRING));
            None
        }
    })
}

/// `session.recipient`: an object with integer `id` and string `name`, or null.
/// Other keys may repeat here (as the spec allows); a repeated `id` or `name`
/// is refused, since the name can feed the routing key.
pub(super) struct RecipientHandler<'c, 'p> {
    /// Where problems are recorded.
    pub(super) ctx: &'c mut Ctx<'p>,
}

impl<'de> ObjectHandler<'de> for RecipientHandler<'_, '_> {
    type Out = Option<Cow<'de, str>>;

    /// Checks `id` and `name` and gives back the name; unknown keys are
    /// skipped unkept, since only `id` and `name` must not repeat.
    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Out, A::Error> {
        let ctx = self.ctx;
        let (mut has_id, mut name) = (false, None);
        while let Some(key) = map.next_key_seed(KeySeed::new(false))? {
            match key {
                Key::Known(_) if ctx.failed() => skip_value(&mut map)?,
                // The name can feed the routing key: a repeat must not let a
                // consumer read another value than the one routed by.
                Key::Known(k @ RecipientKey::Id) if has_id => {
                    ctx.flag("session.recipient", Problem::DuplicateKey(Some(k.name())));
                    skip_value(&mut map)?;
                }
                Key::Known(k @ RecipientKey::Name) if name.is_some() => {
                    ctx.flag("session.recipient", Problem::DuplicateKey(Some(k.name())));
                    skip_value(&mut map)?;
                }
                Key::Known(RecipientKey::Id) => {
                    has_id = true;
                    if !matches!(
                        next_scalar(&mut map, false)?,
                        Scalar::Unsigned | Scalar::Negative
                    ) {
                        ctx.flag("session.recipient.id", Problem::WrongType(MUST_INT));
                    }
                }
                Key::Known(RecipientKey::Name) => match next_scalar(&mut map, true)? {
                    Scalar::Str(s) => name = Some(s),
                    _ => ctx.flag("session.recipient.name", Problem::WrongType(MUST_STRING)),
                },
                Key::Other(_) => skip_value(&mut map)?,
            }
        }
        if !has_id {
            ctx.flag("session.recipient.id", Problem::Missing);
        }
        if name.is_none() {
            ctx.flag("session.recipient.name", Problem::Missing);
        }
        Ok(name)
    }

    /// Neither an object nor null: refused, and no name to route by.
    fn not_object(self) -> Self::Out {
        self.ctx
            .flag("session.recipient", Problem::WrongType(MUST_OBJECT_OR_NULL));
        None
    }

    /// No recipient: allowed, but then there is no name to route by.
    fn null(self) -> Self::Out {
        None
    }
}

/// `session.labels`: an object of scalars, or null. Keys and values are never
/// kept nor echoed.
struct LabelsHandler<'c, 'p> {
    /// Where problems are recorded.
    ctx: &'c mut Ctx<'p>,
}

impl<'de> ObjectHandler<'de> for LabelsHandler<'_, '_> {
    type Out = ();

    /// Checks that every value is a scalar, reading none of them; duplicate
    /// label keys are allowed, since nothing the bridge routes by comes from them.
    fn object<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            if self.ctx.failed() {
                skip_value(&mut map)?;
            } else if matches!(next_scalar(&mut map, false)?, Scalar::Compound) {
                self.ctx
                    .flag("session.labels", Problem::WrongType(LABEL_VALUES));
            }
        }
        Ok(())
    }

    /// Neither an object nor null: refused.
    fn not_object(self) {
        self.ctx
            .flag("session.labels", Problem::WrongType(MUST_OBJECT_OR_NULL));
    }

    /// No labels: allowed.
    fn null(self) {}
}
