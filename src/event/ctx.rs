//! The state of one validation: the policy, and the first problem seen.
//!
//! Problems are recorded here instead of being raised, so that the parser goes
//! on to the end of the document and a syntax error after them still wins.

use super::rejection::{Invalid, Problem};
use super::{ARCHIVE_EVENT_TYPE, Policy};

/// Which webhook a body came to: it decides the accepted `event.type` and the
/// shape of `session`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// `http.path`: one session object, a type from `events.accept`.
    Notification,
    /// `http.archive_path`: `WHP_ARCHIVE`, one session object or an array of them.
    Archive,
}

/// Shared state of one validation: the policy and the first problem seen.
pub(super) struct Ctx<'p> {
    /// What the operator accepts; `event.type` is checked against it.
    pub(super) policy: &'p Policy,
    /// The webhook the body came to.
    pub(super) kind: Kind,
    /// The index of the archive session being read, stamped on the `session`
    /// paths flagged meanwhile (`session[1].reference`).
    pub(super) item: Option<u32>,
    /// The first problem in document order, the one the caller is told.
    problem: Option<Invalid>,
}

impl<'p> Ctx<'p> {
    /// A validation of a `kind` body against `policy` with no problem seen yet.
    pub(super) fn new(policy: &'p Policy, kind: Kind) -> Self {
        Self {
            policy,
            kind,
            item: None,
            problem: None,
        }
    }

    /// Whether `event_type` is accepted on this webhook: `WHP_ARCHIVE` on the
    /// archive path only, the policy's types on the notification path.
    pub(super) fn accepts(&self, event_type: &str) -> bool {
        match self.kind {
            Kind::Notification => {
                event_type != ARCHIVE_EVENT_TYPE && self.policy.accepts(event_type)
            }
            Kind::Archive => event_type == ARCHIVE_EVENT_TYPE,
        }
    }

    /// Records `problem` unless an earlier one is already recorded.
    pub(super) fn flag(&mut self, field: &'static str, problem: Problem) {
        if self.problem.is_none() {
            self.problem = Some(Invalid::new(field, problem).in_item(self.item));
        }
    }

    /// Whether a problem is recorded: later values then need no checks, only
    /// parsing, since the answer is decided unless the syntax fails.
    pub(super) fn failed(&self) -> bool {
        self.problem.is_some()
    }

    /// The recorded problem, if any.
    pub(super) fn problem(&self) -> Option<Invalid> {
        self.problem
    }

    /// Checks a required, bounded, control-free string field; records what is
    /// wrong and says whether it passed.
    pub(super) fn check_text(&mut self, path: &'static str, s: &str, max: usize) -> bool {
        let problem = if s.is_empty() {
            Problem::Empty
        } else if s.len() > max {
            Problem::TooLong(max)
        } else if s.chars().any(char::is_control) {
            Problem::ControlCharacter
        } else {
            return true;
        };
        self.flag(path, problem);
        false
    }
}
