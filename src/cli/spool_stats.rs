//! `spool stats`: how much is waiting to be forwarded, for an operator deciding
//! whether the broker is keeping up.
//!
//! The spool file allows one opener. A stopped bridge leaves it free, so the
//! command reads the file itself; a running bridge holds it, so the command asks
//! that bridge's admin `/readyz`, which carries the same figures from memory.

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::admin_client;
use crate::config::Settings;
use crate::spool::{Spool, SpoolError};

/// Why `spool stats` could not report.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The file could not be read for a reason other than a running bridge holding it.
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    /// A running bridge holds the file, and asking it failed: the operator must
    /// know both facts to look in the right place.
    #[error(
        "the spool is in use by a running bridge, and its admin listener {addr} did not answer: {reason}"
    )]
    Admin { addr: SocketAddr, reason: String },
}

/// The report as pretty JSON: from the file when the bridge is stopped, else
/// from the running bridge. `source` in the output says which, since the two
/// differ in detail.
pub async fn run(settings: &Settings) -> Result<String, StatsError> {
    let report = match Spool::inspect(&settings.spool.dir) {
        Ok(stats) => json!({
            "source": "spool file (bridge not running)",
            "dir": settings.spool.dir,
            "events": stats.events,
            "bytes": stats.bytes,
            "max_bytes": settings.spool.max_bytes,
            "oldest_age_s": stats.oldest_age.map(|a| a.as_secs_f64()),
        }),
        Err(SpoolError::Locked(_)) => from_running_bridge(settings).await?,
        Err(e) => return Err(e.into()),
    };
    // A `Value` always serializes; the fallback only keeps this free of a panic path.
    Ok(serde_json::to_string_pretty(&report).unwrap_or_else(|_| report.to_string()))
}

/// Asks the running bridge's admin listener for the spool part of its readiness.
async fn from_running_bridge(settings: &Settings) -> Result<Value, StatsError> {
    let addr = settings.admin.listen;
    let failed = |reason: String| StatsError::Admin { addr, reason };
    let body = admin_client::get(addr, "/readyz")
        .await
        .map_err(|e| failed(e.to_string()))?;
    let readiness: Value = serde_json::from_slice(&body).map_err(|e| failed(e.to_string()))?;
    Ok(json!({
        "source": format!("running bridge, admin {addr}"),
        "dir": settings.spool.dir,
        "spool": readiness.get("spool"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with no spool file is an operator's wrong path: say so, do not
    /// report an empty spool or ask a bridge.
    #[tokio::test]
    async fn a_missing_spool_is_a_spool_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::default();
        settings.spool.dir = dir.path().join("nowhere");
        let result = run(&settings).await;
        assert!(matches!(result, Err(StatsError::Spool(_))), "{result:?}");
    }
}
