//! cellosign-bridge: Cellosign webhooks in, validated, made durable, answered
//! in milliseconds, and republished to RabbitMQ routed by session reference.
//!
//! # Layout
//!
//! Data flows one way, a folder per stage:
//!
//! ```text
//! http/     ->  ingress/      ->  event/        ->  spool/     ->  forwarder  ->  amqp/
//! serve,        webhook checks,    validate,         group-commit   per-key        link, topology,
//! TLS, auth,    dedup, delivery    envelope          log (redb)     lanes          message, confirmed
//! limits            |
//!                   +-> claim/: a body too large to publish goes to an object store first
//! ```
//!
//! * `http`: accepting connections for both listeners (`server`), their limits
//!   and timers (`conn_guard`), bounded body reads (`body`), tokens and allowed
//!   networks (`auth`, `net`), and the signed tokens Cellosign fetches: their
//!   codec (`token`), the token URL (`token_endpoint`) and its brake on
//!   guessing (`throttle`).
//! * `ingress`: the public webhook endpoint: the contract's checks in order,
//!   Cellosign's status body on every answer (`webhook`), for the notification
//!   and the archive path, each with its own limits and validator (`route`);
//!   copies of one message id stored once (`dedup`); what "durable" means before
//!   the caller gets "0" (`delivery`: the spool, or a broker confirm in
//!   `confirmed` mode).
//! * `claim`: the claim check (SPEC 9): a body over `amqp.max_message_bytes`
//!   is stored durably in `archive.store_url` (a directory or S3) under its
//!   SHA-256, and a small JSON document pointing at it is delivered instead.
//! * `event`: validation of the webhook body (a notification, or an archive:
//!   `archive`), pure, no I/O, yielding the routing key and message id;
//!   `envelope` is the accepted event as stored and published.
//! * `spool`: the durable queue on disk, one writer thread, group commit.
//! * `forwarder`: moves spooled events to the broker, in order per reference, one
//!   unconfirmed publish per reference, and removes them only after a plain ack.
//! * `amqp`: the broker link (connect, fail over, reconnect with backoff), the
//!   topology declared on it, the AMQP message of an envelope and the judging of
//!   confirms (`message`), and the publisher of `confirmed` mode.
//!
//! * `trace`: the W3C trace context of each request, kept with its event through the
//!   spool into the message headers, and, with `telemetry.otlp_endpoint`, spans of
//!   receive, validate, store and publish exported over OTLP.
//!
//! Beside them: `ops` (health, readiness, metrics, logs, the SIGHUP reload),
//! `config` (layered typed settings, secrets that redact themselves), `startup`
//! (builds the application for `main` and tests alike), `supervisor` (one cancellation tree
//! and task tracker for every task, and the rule that a task dying before
//! shutdown fails readiness and the exit code), `cli` (the operator commands),
//! and `fault` (test-only fault points).
//!
//! Modules are private; the few items that `main`, the tests, the benchmark and
//! the fuzz targets need are re-exported below, so the compiler reports what
//! nothing calls.

mod amqp;
mod claim;
mod cli;
mod config;
mod event;
mod fault;
mod forwarder;
mod http;
mod ingress;
mod ops;
mod spool;
mod startup;
mod supervisor;
mod trace;

pub use amqp::link::Link;
pub use amqp::message::{confirm_channel, send};
pub use amqp::topology::{partition_queue, unrouted_name};
pub use cli::replay::{StreamOffset, run as replay};
pub use cli::spool_drain::run as spool_drain;
pub use cli::spool_stats::run as spool_stats;
pub use cli::tail::run as tail;
pub use cli::{Cli, Command, SpoolCommand};
pub use config::{
    AckMode, BrokerUrl, ConfigError, QueueKind, QueueSettings, Secret, Settings, Sources,
    TlsSettings,
};
pub use event::envelope::{DecodeError, Envelope};
pub use event::{
    ARCHIVE_EVENT_TYPE, DEFAULT_ACCEPT, Event, Policy, Rejection, validate, validate_archive,
};
pub use fault::ENV as FAULTS_ENV;
pub use forwarder::Forwarder;
pub use ops::metrics::Metrics;
pub use ops::reload::OnHangup;
pub use ops::telemetry::{LogControl, init as init_telemetry};
pub use spool::{Spool, SpoolError};
pub use startup::Application;
pub use supervisor::Failure;
pub use trace::TraceContext;
