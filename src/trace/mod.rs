//! Trace context (SPEC 7): the W3C `traceparent`/`tracestate` of a request,
//! carried with its event through the spool into the published message's
//! headers ([`context`]), and, with `telemetry.otlp_endpoint`, spans of the
//! request and its publish exported over OTLP ([`export`], posting through
//! [`client`]).

mod client;
pub(crate) mod context;
pub(crate) mod export;

pub use context::TraceContext;
pub use export::{Telemetry, TelemetryError};
