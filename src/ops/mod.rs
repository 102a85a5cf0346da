//! For operators: health, readiness and metrics on the admin listener ([`admin`],
//! [`metrics`]) and the logs ([`telemetry`]).

pub(crate) mod admin;
pub(crate) mod metrics;
pub(crate) mod telemetry;
