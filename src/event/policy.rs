//! What the operator configured that validation depends on.

use super::RoutingKeyTemplate;

/// Event types accepted when the operator configures none: the documented
/// asynchronous ones (`WHEF_FORM_FIELD_CHANGED` expects data back, so it is left out).
pub const DEFAULT_ACCEPT: [&str; 6] = [
    "WHEF_SESSION_CREATED",
    "WHEF_SESSION_DELETED",
    "WHEF_SESSION_EXPIRED",
    "WHEF_CLIENT_LOGGED_IN",
    "WHEF_CLIENT_FORM_LOADED",
    "WHEF_CLIENT_FORM_SUBMITTED",
];

/// What the operator configured that validation depends on: which event types
/// are accepted and how the routing key is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The accepted event types, compared byte for byte with `event.type`.
    accept: Vec<String>,
    /// How the routing key is built from the validated fields.
    routing_key: RoutingKeyTemplate,
}

impl Policy {
    /// Builds a policy from the configured accept list and routing key template.
    pub fn new(accept: Vec<String>, routing_key: RoutingKeyTemplate) -> Self {
        Self {
            accept,
            routing_key,
        }
    }

    /// Whether events of type `event_type` are accepted.
    pub fn accepts(&self, event_type: &str) -> bool {
        self.accept.iter().any(|t| t == event_type)
    }

    /// The accepted event types, as configured (for `check-config` and logs).
    pub(crate) fn accept(&self) -> &[String] {
        &self.accept
    }

    /// The routing key template, as configured.
    pub(crate) fn routing_key(&self) -> &RoutingKeyTemplate {
        &self.routing_key
    }
}

impl Default for Policy {
    /// The spec's defaults: [`DEFAULT_ACCEPT`] and `DEFAULT_ROUTING_KEY` (`{session.reference}`).
    fn default() -> Self {
        Self::new(
            DEFAULT_ACCEPT.iter().map(|t| (*t).to_owned()).collect(),
            RoutingKeyTemplate::default(),
        )
    }
}
