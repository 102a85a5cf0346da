//! Why a body was refused: [`Rejection`] and its parts, with the reason text
//! sent back in `errordesc` and the label counted in the rejection metric.

use std::fmt;

use super::{MAX_MESSAGE_ID_BYTES, MAX_ROUTING_KEY_BYTES};

/// Reason text of [`Problem::WrongType`] for a required string.
pub(super) const MUST_STRING: &str = "must be a string";
/// Reason text of [`Problem::WrongType`] for an optional string.
pub(super) const MUST_STRING_OR_NULL: &str = "must be a string or null";
/// Reason text of [`Problem::WrongType`] for a required object.
pub(super) const MUST_OBJECT: &str = "must be an object";
/// Reason text of [`Problem::WrongType`] for an archive's `session`.
pub(super) const MUST_SESSIONS: &str = "must be an object or an array of objects";
/// Reason text of [`Problem::WrongType`] for an optional object.
pub(super) const MUST_OBJECT_OR_NULL: &str = "must be an object or null";
/// Reason text of [`Problem::WrongType`] for a required unsigned integer.
pub(super) const MUST_UINT: &str = "must be an integer >= 0";
/// Reason text of [`Problem::WrongType`] for an optional unsigned integer.
pub(super) const MUST_UINT_OR_NULL: &str = "must be an integer >= 0 or null";
/// Reason text of [`Problem::WrongType`] for an integer of either sign.
pub(super) const MUST_INT: &str = "must be an integer";
/// Reason text of [`Problem::WrongType`] for a label value that is an array or object.
pub(super) const LABEL_VALUES: &str = "values must be strings, numbers, booleans or null";

/// Why a body was refused. Its `Display` is the short reason sent back in
/// `errordesc`; it never echoes body content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Not UTF-8 or not JSON: HTTP 400.
    #[error(transparent)]
    Malformed(#[from] Malformed),
    /// JSON, but not an acceptable event: HTTP 422.
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

impl Rejection {
    /// The HTTP status to answer with: 400 for malformed bodies, 422 otherwise.
    pub fn http_status(&self) -> u16 {
        match self {
            Rejection::Malformed(_) => 400,
            Rejection::Invalid(_) => 422,
        }
    }

    /// A low-cardinality label for `cellosign_bridge_events_rejected_total{reason}`.
    pub(crate) fn metric_reason(&self) -> &'static str {
        match self {
            Rejection::Malformed(_) => "malformed_json",
            Rejection::Invalid(i) => i.problem.metric_reason(),
        }
    }
}

/// Why a body is not JSON at all (HTTP 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The body is not UTF-8; `valid_up_to` is the offset of the first bad byte.
    #[error("body: not UTF-8 at byte {valid_up_to}")]
    NotUtf8 {
        /// Byte offset of the first invalid sequence.
        valid_up_to: usize,
    },
    /// The body is empty or only whitespace.
    #[error("body: empty")]
    Empty,
    /// The JSON ends before the document is complete.
    #[error("body: truncated JSON at line {line} column {column}")]
    Truncated {
        /// 1-based line of the end of input.
        line: usize,
        /// 1-based column of the end of input.
        column: usize,
    },
    /// A JSON syntax error (including trailing garbage and nesting too deep).
    #[error("body: not valid JSON at line {line} column {column}")]
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
}

impl From<serde_json::Error> for Malformed {
    /// Classifies a parser error: end of input is `Truncated`, anything else `Syntax`.
    fn from(e: serde_json::Error) -> Self {
        let (line, column) = (e.line(), e.column());
        if e.is_eof() {
            Malformed::Truncated { line, column }
        } else {
            Malformed::Syntax { line, column }
        }
    }
}

/// A JSON body that is not an acceptable event (HTTP 422): which field, and what is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub struct Invalid {
    /// The field path, e.g. `session.reference`; `body` for the whole document
    /// and `routing key` for the rendered key.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: Problem,
    /// For a `session` path in an archive whose `session` is an array: the index
    /// of the session, shown as `session[1].reference`.
    pub item: Option<u32>,
}

impl Invalid {
    /// An `Invalid` for `field`; the validator's only way to make one.
    pub(super) fn new(field: &'static str, problem: Problem) -> Self {
        Self {
            field,
            problem,
            item: None,
        }
    }

    /// The same, placed in archive session `item` if its field is a `session` path.
    pub(super) fn in_item(mut self, item: Option<u32>) -> Self {
        if self.field.starts_with("session") {
            self.item = item;
        }
        self
    }
}

impl fmt::Display for Invalid {
    /// `field: problem`, with the session index after `session` when there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.item, self.field.strip_prefix("session")) {
            (Some(i), Some(rest)) => write!(f, "session[{i}]{rest}: {}", self.problem),
            _ => write!(f, "{}: {}", self.field, self.problem),
        }
    }
}

/// What is wrong with a field; its `Display` is the part of the reason after the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// The top level is not a JSON object.
    NotObject,
    /// A required field is absent.
    Missing,
    /// The field has the wrong JSON type; the text says what it must be.
    WrongType(&'static str),
    /// A key occurs twice; names it when it is one the bridge reads.
    DuplicateKey(Option<&'static str>),
    /// `event.timestamp` is not of the form `YYYY-MM-DDTHH:MM:SS[.fraction][Z|±HH:MM]`.
    BadTimestamp,
    /// `event.timestamp` has the right form but is not a real date or time.
    TimestampOutOfRange,
    /// `event.type` is not in the accept list.
    TypeNotAccepted,
    /// A string is longer than its limit, in bytes.
    TooLong(usize),
    /// A string contains a Unicode control character (Cc).
    ControlCharacter,
    /// A string that must not be empty is empty.
    Empty,
    /// A field the routing key template needs is absent or null.
    MissingForRoutingKey,
    /// The rendered routing key is empty.
    RoutingKeyEmpty,
    /// The rendered routing key is longer than 255 bytes.
    RoutingKeyTooLong,
    /// The message id `{session.id}:{event.type}:{event.timestamp}` would not fit an
    /// AMQP short string (255 bytes); only a very long timestamp fraction gets here.
    MessageIdTooLong,
    /// An archive session's reference differs from the first session's: the
    /// archive could not be routed by one reference.
    ReferenceMismatch,
}

impl Problem {
    /// The Prometheus label for this kind of problem.
    pub(crate) fn metric_reason(&self) -> &'static str {
        match self {
            Problem::NotObject => "not_object",
            Problem::Missing => "missing_field",
            Problem::WrongType(_) => "wrong_type",
            Problem::DuplicateKey(_) => "duplicate_key",
            Problem::BadTimestamp | Problem::TimestampOutOfRange => "bad_timestamp",
            Problem::TypeNotAccepted => "type_not_accepted",
            Problem::TooLong(_) | Problem::MessageIdTooLong => "too_long",
            Problem::ControlCharacter => "control_character",
            Problem::Empty => "empty",
            Problem::MissingForRoutingKey
            | Problem::RoutingKeyEmpty
            | Problem::RoutingKeyTooLong => "routing_key",
            Problem::ReferenceMismatch => "reference_mismatch",
        }
    }
}

impl fmt::Display for Problem {
    /// The reason after the field path: short, and never any body content.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotObject => f.write_str("not a JSON object"),
            Problem::Missing => f.write_str("missing"),
            Problem::WrongType(expected) => f.write_str(expected),
            Problem::DuplicateKey(Some(key)) => write!(f, "duplicate key \"{key}\""),
            Problem::DuplicateKey(None) => f.write_str("duplicate key"),
            Problem::BadTimestamp => f.write_str(
                "must be an ISO-8601 date-time YYYY-MM-DDTHH:MM:SS[.fraction][Z|±HH:MM]",
            ),
            Problem::TimestampOutOfRange => f.write_str("not a real calendar date and time"),
            Problem::TypeNotAccepted => f.write_str("not an accepted event type"),
            Problem::TooLong(max) => write!(f, "longer than {max} bytes"),
            Problem::ControlCharacter => f.write_str("contains a control character"),
            Problem::Empty => f.write_str("empty"),
            Problem::MissingForRoutingKey => f.write_str("missing, needed by amqp.routing_key"),
            Problem::RoutingKeyEmpty => f.write_str("empty"),
            Problem::MessageIdTooLong => write!(
                f,
                "too long: the message id {{session.id}}:{{event.type}}:{{event.timestamp}} would exceed {MAX_MESSAGE_ID_BYTES} bytes"
            ),
            Problem::RoutingKeyTooLong => {
                write!(f, "longer than {MAX_ROUTING_KEY_BYTES} bytes")
            }
            Problem::ReferenceMismatch => f.write_str("differs from session[0].reference"),
        }
    }
}
