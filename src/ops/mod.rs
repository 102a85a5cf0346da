//! For operators: health, readiness and metrics on the admin listener ([`admin`],
//! [`metrics`]), the logs ([`telemetry`]) and the SIGHUP reload ([`reload`]).

pub(crate) mod admin;
pub(crate) mod metrics;
pub(crate) mod reload;
pub(crate) mod telemetry;
