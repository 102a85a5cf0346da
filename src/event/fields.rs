//! What validation yields: the fields collected while streaming, and the
//! [`Event`] built from them once the whole document passed.

use std::borrow::Cow;

use super::rejection::{Invalid, Problem};
use super::template::Placeholder;
use super::{MAX_MESSAGE_ID_BYTES, Policy};

/// A validated event: the fields the bridge publishes with, borrowed from the
/// body where no JSON escape forced a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// `event.type`, one of the accepted types.
    pub event_type: Cow<'a, str>,
    /// `event.timestamp`, as sent (a valid ISO-8601 date-time).
    pub timestamp: Cow<'a, str>,
    /// `session.id`.
    pub session_id: Cow<'a, str>,
    /// `session.reference` (the AMQP correlation id).
    pub reference: Cow<'a, str>,
    /// `session.process_id`, if present and not null.
    pub process_id: Option<Cow<'a, str>>,
    /// `session.recipient.name`, if a recipient is present and not null.
    pub recipient_name: Option<Cow<'a, str>>,
    /// The routing key, rendered from the policy's template.
    pub routing_key: String,
    /// `{session.id}:{event.type}:{event.timestamp}`: the AMQP message id and
    /// the de-duplication key.
    pub message_id: String,
}

/// The fields collected while streaming; complete only if no problem was
/// recorded. Each is set only once its value passed its checks, so a field
/// that is `None` here was absent, null or refused.
#[derive(Default)]
pub(super) struct Fields<'a> {
    /// `event.type`, once accepted by the policy.
    pub(super) event_type: Option<Cow<'a, str>>,
    /// `event.timestamp`, once its format and calendar check passed.
    pub(super) timestamp: Option<Cow<'a, str>>,
    /// `session.id`, once non-empty, bounded and free of control characters.
    pub(super) session_id: Option<Cow<'a, str>>,
    /// `session.reference`, with the same checks as `session_id`.
    pub(super) reference: Option<Cow<'a, str>>,
    /// `session.process_id`, when a string.
    pub(super) process_id: Option<Cow<'a, str>>,
    /// `session.recipient.name`, when a string.
    pub(super) recipient_name: Option<Cow<'a, str>>,
    /// `Some(0)` when an archive's `session` is an array: the session fields
    /// above are its first item's, and a reason about them names `session[0]`.
    pub(super) first_item: Option<u32>,
}

impl<'a> Fields<'a> {
    /// The value a routing key placeholder stands for, if the body had it.
    pub(super) fn get(&self, p: Placeholder) -> Option<&str> {
        match p {
            Placeholder::EventType => self.event_type.as_deref(),
            Placeholder::SessionReference => self.reference.as_deref(),
            Placeholder::SessionId => self.session_id.as_deref(),
            Placeholder::SessionProcessId => self.process_id.as_deref(),
            Placeholder::SessionRecipientName => self.recipient_name.as_deref(),
        }
    }

    /// Turns the collected fields into an [`Event`]; only called when no
    /// problem was recorded.
    pub(super) fn into_event(self, policy: &Policy) -> Result<Event<'a>, Invalid> {
        let item = self.first_item;
        self.build(policy).map_err(|e| e.in_item(item))
    }

    /// [`Fields::into_event`], with reasons not yet placed in an archive session.
    fn build(self, policy: &Policy) -> Result<Event<'a>, Invalid> {
        let routing_key = policy.routing_key().render(&self)?;
        let need = |v: Option<Cow<'a, str>>, path| v.ok_or(Invalid::new(path, Problem::Missing));
        let event_type = need(self.event_type, "event.type")?;
        let timestamp = need(self.timestamp, "event.timestamp")?;
        let session_id = need(self.session_id, "session.id")?;
        let reference = need(self.reference, "session.reference")?;
        let message_id = format!("{session_id}:{event_type}:{timestamp}");
        if message_id.len() > MAX_MESSAGE_ID_BYTES {
            return Err(Invalid::new("event.timestamp", Problem::MessageIdTooLong));
        }
        Ok(Event {
            event_type,
            timestamp,
            session_id,
            reference,
            process_id: self.process_id,
            recipient_name: self.recipient_name,
            routing_key,
            message_id,
        })
    }
}
