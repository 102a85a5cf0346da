//! The state of one validation: the policy, and the first problem seen.
//!
//! Problems are recorded here instead of being raised, so that the parser goes
//! on to the end of the document and a syntax error after them still wins.

use super::Policy;
use super::rejection::{Invalid, Problem};

/// Shared state of one validation: the policy and the first problem seen.
pub(super) struct Ctx<'p> {
    /// What the operator accepts; `event.type` is checked against it.
    pub(super) policy: &'p Policy,
    /// The first problem in document order, the one the caller is told.
    problem: Option<Invalid>,
}

impl<'p> Ctx<'p> {
    /// A validation against `policy` with no problem seen yet.
    pub(super) fn new(policy: &'p Policy) -> Self {
        Self {
            policy,
            problem: None,
        }
    }

    /// Records `problem` unless an earlier one is already recorded.
    pub(super) fn flag(&mut self, field: &'static str, problem: Problem) {
        if self.problem.is_none() {
            self.problem = Some(Invalid::new(field, problem));
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
