//! cellosign-bridge: Cellosign webhooks in, validated, made durable, answered
//! in milliseconds, and republished to RabbitMQ routed by session reference.
//!
//! # Layout
//!
//! Data flows one way:
//!
//! * `ingress`: the public HTTP endpoint: path, method, `auth`, limits, and
//!   Cellosign's status body on every answer. Served by `server`.
//! * `event`: validation of the webhook body, pure, no I/O; yields the
//!   routing key and message id. `envelope` is the accepted event as stored
//!   and published.
//! * `delivery`: what "durable" means before the caller gets "0": the
//!   `spool` (fsync'd, group commit) or a broker confirm (`confirmed`).
//!   `publish` maps an envelope to its AMQP message and judges confirms.
//! * `forwarder`: moves spooled events to the broker in order per reference, with a
//!   window of unconfirmed publishes, and removes them only after a plain ack.
//! * `broker`: the AMQP link (connect, fail over, reconnect with backoff) and
//!   `topology` declared on it.
//!
//! Beside them: `admin` (health, readiness, metrics from `metrics`),
//! `config` (layered typed settings), `startup` (builds the application
//! for `main` and tests), `dedup`, `net` (CIDRs, forwarded-for),
//! `telemetry` (logs), the operator commands in `cli`, and `supervisor`:
//! one cancellation tree and task tracker for every task, and the rule that a
//! task dying before shutdown fails readiness and the exit code. `fault` holds
//! the test-only fault points.
//!
//! Modules are private; the few types that `main`, the tests and the benchmark
//! need are re-exported below.

mod admin;
mod auth;
mod broker;
mod cli;
mod config;
mod confirmed;
mod dedup;
mod delivery;
mod envelope;
mod event;
mod fault;
mod forwarder;
mod ingress;
mod metrics;
mod net;
mod publish;
mod server;
mod spool;
mod startup;
mod supervisor;
mod telemetry;
mod topology;

// The public surface: what `main`, the tests, the benchmark and the fuzz targets use.
// Everything else stays inside the crate, so the compiler reports what nothing calls.
pub use broker::Link;
pub use cli::spool_stats::run as spool_stats;
pub use cli::tail::run as tail;
pub use cli::{Cli, Command, SpoolCommand};
pub use config::{
    AckMode, BrokerUrl, ConfigError, QueueKind, QueueSettings, Secret, Settings, Sources,
    TlsSettings,
};
pub use envelope::{DecodeError, Envelope};
pub use event::{DEFAULT_ACCEPT, Event, Policy, Rejection, validate};
pub use fault::ENV as FAULTS_ENV;
pub use forwarder::Forwarder;
pub use metrics::Metrics;
pub use publish::{confirm_channel, send};
pub use spool::Spool;
pub use startup::Application;
pub use supervisor::Failure;
pub use telemetry::init as init_telemetry;
pub use topology::{partition_queue, unrouted_name};
