//! `spool drain`: forward every event a spool holds, then exit, for a spool that no
//! bridge will serve again (a replica removed by a scale-down).
//!
//! It runs the bridge's own broker link and forwarder on the spool (same publishing
//! path, same confirms, same order per reference), without listeners, until the spool
//! is empty or the timeout passes. What the broker has not confirmed by then stays in
//! the spool, as at a SIGTERM, so a failed drain loses nothing and can be run again.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;
use tracing::warn;

use crate::config::Settings;
use crate::ops::metrics::Metrics;
use crate::spool::{Spool, SpoolError};
use crate::startup::{spool_options, start_forwarder, start_link};
use crate::supervisor::Supervisor;
use crate::trace::Telemetry;

/// Time given to closing the spool and ending the tasks after the drain.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Why a drain did not empty the spool.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// No spool at the configured path: a wrong path must not read as an empty spool
    /// (the operator is about to delete a volume on the strength of the answer).
    #[error("spool.dir: no spool to drain at {0}")]
    Missing(PathBuf),
    /// A running bridge holds the spool and forwards its events itself.
    #[error(
        "the spool at {0} is in use by a running bridge, which forwards it itself; stop that bridge first"
    )]
    InUse(PathBuf),
    /// The spool could not be read or opened.
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    /// Time ran out with events left; they stay in the spool.
    #[error(
        "{left} events still in the spool after {timeout:?} ({forwarded} forwarded); the broker did not take them in time (last error: {last_error}); nothing is lost, run the drain again"
    )]
    TimedOut {
        forwarded: u64,
        left: u64,
        timeout: Duration,
        last_error: String,
    },
    /// A task of the drain failed (its reason is in the log); the rest stays in the spool.
    #[error("the drain stopped: {0}")]
    Failed(String),
}

/// Forwards everything the spool at `spool.dir` holds within `timeout`; on success,
/// the report (events forwarded, left) as pretty JSON.
pub async fn run(settings: &Settings, timeout: Duration) -> Result<String, DrainError> {
    let dir = &settings.spool.dir;
    // Checked before opening, which would create an empty spool at a wrong path.
    if !Spool::exists(dir).map_err(SpoolError::from)? {
        return Err(DrainError::Missing(dir.clone()));
    }
    let spool = match Spool::open_with(dir, spool_options(settings)) {
        Err(SpoolError::Locked(_)) => return Err(DrainError::InUse(dir.clone())),
        other => other?,
    };
    // The open scanned the file once; its count is the starting point.
    let before = spool.stats().events;
    let deadline = Instant::now() + timeout;
    let metrics = Arc::new(Metrics::new());
    let supervisor = Supervisor::new();
    let (link, broker_stop) = start_link(&settings.amqp, &metrics, &supervisor);
    // No spans from a drain: its messages carry the trace context the spool kept.
    let forwarder = start_forwarder(
        &spool,
        &link,
        &settings.amqp,
        &metrics,
        &Telemetry::default(),
        &supervisor,
    );

    tokio::select! {
        () = forwarder.drain_until(deadline) => {}
        () = supervisor.failed() => {}
    }
    let left = spool.stats().events;
    let last_error = link.status().last_error.unwrap_or_else(|| "none".into());
    broker_stop.cancel();
    if tokio::time::timeout(CLOSE_LIMIT, spool.shutdown())
        .await
        .is_err()
    {
        warn!("the spool did not close in time; its committed events are safe");
    }
    supervisor.cancel_all();
    if tokio::time::timeout(CLOSE_LIMIT, supervisor.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop in time");
    }
    let forwarded = before.saturating_sub(left);
    if let Some(failure) = supervisor.failure() {
        return Err(DrainError::Failed(failure.to_string()));
    }
    if left > 0 {
        return Err(DrainError::TimedOut {
            forwarded,
            left,
            timeout,
            last_error,
        });
    }
    let report = json!({ "dir": dir, "forwarded": forwarded, "left": 0 });
    // A `Value` always serializes; the fallback only keeps this free of a panic path.
    Ok(serde_json::to_string_pretty(&report).unwrap_or_else(|_| report.to_string()))
}
