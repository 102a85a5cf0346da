//! cellosign-bridge: Cellosign webhooks in, validated, made durable, answered
//! in milliseconds, and republished to RabbitMQ routed by session reference.
//!
//! # Layout
//!
//! Data flows one way:
//!
//! * [`ingress`]: the public HTTP endpoint: path, method, [`auth`], limits, and
//!   Cellosign's status body on every answer. Served by [`server`].
//! * [`event`]: validation of the webhook body, pure, no I/O; yields the
//!   routing key and message id. [`envelope`] is the accepted event as stored
//!   and published.
//! * [`delivery`]: what "durable" means before the caller gets "0": the
//!   [`spool`] (fsync'd, group commit) or a broker confirm ([`confirmed`]).
//!   [`publish`] maps an envelope to its AMQP message and judges confirms.
//! * [`forwarder`]: moves spooled events to the broker in order per reference, with a
//!   window of unconfirmed publishes, and removes them only after a plain ack.
//! * [`broker`]: the AMQP link (connect, fail over, reconnect with backoff) and
//!   [`topology`] declared on it.
//!
//! Beside them: [`admin`] (health, readiness, metrics from [`metrics`]),
//! [`config`] (layered typed settings), [`startup`] (builds the application
//! for `main` and tests), [`dedup`], [`net`] (CIDRs, forwarded-for),
//! [`telemetry`] (logs), the operator commands in [`cli`], and [`supervisor`]:
//! one cancellation tree and task tracker for every task, and the rule that a
//! task dying before shutdown fails readiness and the exit code. [`fault`] holds
//! the test-only fault points.

pub mod admin;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod confirmed;
pub mod dedup;
pub mod delivery;
pub mod envelope;
pub mod event;
pub mod fault;
pub mod forwarder;
pub mod ingress;
pub mod metrics;
pub mod net;
pub mod publish;
pub mod server;
pub mod spool;
pub mod startup;
pub mod supervisor;
pub mod telemetry;
pub mod topology;
