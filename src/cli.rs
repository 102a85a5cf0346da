//! Command line: `serve` (default), `check-config`, `tail`, `spool stats`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// cellosign-bridge: Cellosign webhooks to RabbitMQ, durable and fast.
#[derive(Debug, Parser)]
#[command(name = "cellosign-bridge", version, about)]
pub struct Cli {
    /// Extra configuration file, layered over config/default.toml and config/{BRIDGE_ENV}.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to do.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the bridge (the default).
    Serve,
    /// Print the effective configuration, secrets redacted, and exit.
    CheckConfig,
    /// Print events flowing through the exchange as JSON lines (a throw-away consumer).
    Tail {
        /// Binding key to watch, e.g. a session reference; `#` is everything.
        #[arg(long, default_value = "#")]
        binding: String,
    },
    /// Inspect the spool.
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

/// Spool subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum SpoolCommand {
    /// Depth, bytes and oldest event age. Reads the spool file when the bridge
    /// is stopped, or asks the running bridge's admin listener.
    Stats,
}

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error(
        "the spool is in use by a running bridge, and its admin listener {addr} did not answer: {reason}"
    )]
    Admin {
        addr: std::net::SocketAddr,
        reason: String,
    },
}

/// `spool stats`: from the file when the bridge is stopped, else from the running bridge.
pub async fn spool_stats(settings: &crate::config::Settings) -> Result<String, CommandError> {
    use crate::spool::{Spool, SpoolError};
    match Spool::inspect(&settings.spool.dir) {
        Ok(stats) => {
            let out = serde_json::json!({
                "source": "spool file (bridge not running)",
                "dir": settings.spool.dir,
                "events": stats.events,
                "bytes": stats.bytes,
                "max_bytes": settings.spool.max_bytes,
                "oldest_age_s": stats.oldest_age.map(|a| a.as_secs_f64()),
            });
            Ok(serde_json::to_string_pretty(&out).unwrap_or_default())
        }
        Err(SpoolError::Locked(_)) => {
            let addr = settings.admin.listen;
            let body = admin_get(addr, "/readyz")
                .await
                .map_err(|reason| CommandError::Admin { addr, reason })?;
            let readiness: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| CommandError::Admin {
                    addr,
                    reason: e.to_string(),
                })?;
            let out = serde_json::json!({
                "source": format!("running bridge, admin {addr}"),
                "dir": settings.spool.dir,
                "spool": readiness.get("spool"),
            });
            Ok(serde_json::to_string_pretty(&out).unwrap_or_default())
        }
        Err(e) => Err(e.into()),
    }
}

/// A plain HTTP/1.1 GET against the admin listener; returns the body of any answer.
async fn admin_get(addr: std::net::SocketAddr, path: &str) -> Result<bytes::Bytes, String> {
    use http_body_util::{BodyExt, Empty};
    let connect = tokio::net::TcpStream::connect(addr);
    let stream = tokio::time::timeout(std::time::Duration::from_secs(5), connect)
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(body.to_bytes())
}
