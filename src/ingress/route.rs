//! The webhook paths of the public listener: the notification path and the
//! archive path (SPEC 9), each with its own body limit, its own in-flight
//! permits and its own validator, behind the one check sequence of `webhook`.

use tokio::sync::Semaphore;

use crate::event::{Event, Policy, Rejection};

/// Limits of one webhook path, as configured.
#[derive(Debug, Clone)]
pub struct PathLimits {
    /// The path (`http.path`, `http.archive_path`).
    pub path: String,
    /// Largest body on this path (`http.max_body_bytes`, `http.archive_max_body_bytes`).
    pub max_body_bytes: usize,
    /// Requests handled at once on this path (`http.max_in_flight`, `http.archive_max_in_flight`).
    pub max_in_flight: usize,
}

/// A validator of one path's bodies: `validate` or `validate_archive`.
pub(super) type Validator = for<'a> fn(&'a [u8], &Policy) -> Result<Event<'a>, Rejection>;

/// One webhook path: what the checks after the path check need of it.
pub(super) struct Route {
    /// The path it answers.
    pub(super) path: String,
    /// The body limit in force: the path's own, or, without a claim-check store,
    /// `amqp.max_message_bytes` if lower, since a body over that cannot be
    /// published, so it is refused before it is read. With a store such a body is
    /// read and claim-checked.
    pub(super) max_body_bytes: usize,
    /// The 413 reason, naming the limit in force; built once.
    pub(super) too_large: String,
    /// This path's permits: a flood on one path cannot starve the other.
    pub(super) in_flight: Semaphore,
    /// The rules of this path's bodies.
    pub(super) validate: Validator,
}

impl Route {
    /// The route of `limits`, refusing bodies over `max_message_bytes` too when given
    /// (`None`: a claim-check store takes them).
    pub(super) fn new(
        limits: &PathLimits,
        max_message_bytes: Option<usize>,
        validate: Validator,
    ) -> Self {
        let (max_body_bytes, too_large) = if let Some(max_message_bytes) =
            max_message_bytes.filter(|&m| m < limits.max_body_bytes)
        {
            (
                max_message_bytes,
                format!(
                    "body larger than {max_message_bytes} bytes, the largest message \
                     (amqp.max_message_bytes)"
                ),
            )
        } else {
            let max = limits.max_body_bytes;
            (max, format!("body larger than {max} bytes"))
        };
        Route {
            path: limits.path.clone(),
            max_body_bytes,
            too_large,
            in_flight: Semaphore::new(limits.max_in_flight),
            validate,
        }
    }
}
