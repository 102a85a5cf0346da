//! The broker link: one AMQP connection, kept open over `amqp.urls` with
//! capped exponential backoff and jitter, and the topology set up on it.
//!
//! Publishers never connect themselves; they take the current connection from
//! [`Link::connection`] (or wait for one) and open their own channels on it, so
//! a reconnect is invisible to them except as failed publishes they retry.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::topology;
use crate::config::{AmqpSettings, BrokerUrl};
use crate::ops::metrics::Metrics;

/// Longest wait for one connection attempt (TCP, TLS, AMQP handshake, topology).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait for the broker to acknowledge closing the connection at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

/// The frame size asked for when a URL does not name one (`?frame_max=`). lapin keeps
/// 32 frames of the negotiated size for each direction of a connection, zero-filled:
/// at RabbitMQ's default of 128 KiB that was 8 MiB resident for the bridge's one
/// connection, at 32 KiB it is 2 MiB. Events are a few KiB; a larger message is only
/// cut into more frames.
pub const FRAME_MAX: u32 = 32 * 1024;

/// A connection that lasted this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// What the link is doing now; read by publishers and by readiness.
#[derive(Clone)]
pub enum LinkState {
    /// No usable connection; `last_error` says why, for `/readyz` and logs.
    /// `misconfigured`: a broker answered but the topology is wrong (missing
    /// exchange or plugin), which needs an operator, not a retry.
    Down {
        last_error: Option<String>,
        misconfigured: bool,
    },
    /// Connected, topology in place.
    Up {
        connection: Arc<Connection>,
        /// The URL in use, password redacted.
        url: String,
        /// Whether the broker blocked publishing (resource alarm).
        blocked: bool,
    },
}

/// Readiness detail of the link, as `/readyz` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatus {
    pub connected: bool,
    pub blocked: bool,
    pub misconfigured: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Handle to the broker link; cheap to clone.
#[derive(Clone)]
pub struct Link {
    state: watch::Receiver<LinkState>,
}

impl Link {
    /// Starts the link task; it runs until `stop` is cancelled, then closes the connection.
    pub fn start(
        amqp: AmqpSettings,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Link, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(LinkState::Down {
            last_error: None,
            misconfigured: false,
        });
        let task = tokio::spawn(async move {
            tokio::select! {
                () = maintain(amqp, metrics.clone(), &tx) => {}
                () = stop.cancelled() => {}
            }
            let previous = tx.send_replace(LinkState::Down {
                last_error: Some("stopped".into()),
                misconfigured: false,
            });
            metrics.broker_connected.set(0);
            if let LinkState::Up { connection, .. } = previous {
                // A blocked or black-holed broker never answers the close: do not wait for it.
                let close = connection.close(200, "shutting down".into());
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
            }
        });
        (Link { state: rx }, task)
    }

    /// The current connection, if the link is up and not blocked.
    pub(crate) fn connection(&self) -> Option<Arc<Connection>> {
        match &*self.state.borrow() {
            LinkState::Up {
                connection,
                blocked: false,
                ..
            } => Some(connection.clone()),
            _ => None,
        }
    }

    /// Waits until the link is up and not blocked.
    pub async fn connected(&self) -> Arc<Connection> {
        let mut rx = self.state.clone();
        loop {
            if let LinkState::Up {
                connection,
                blocked: false,
                ..
            } = &*rx.borrow_and_update()
            {
                return connection.clone();
            }
            if rx.changed().await.is_err() {
                // The link task is gone: nothing will connect again.
                std::future::pending::<()>().await;
            }
        }
    }

    /// A snapshot for `/readyz`.
    pub(crate) fn status(&self) -> LinkStatus {
        match &*self.state.borrow() {
            LinkState::Down {
                last_error,
                misconfigured,
            } => LinkStatus {
                connected: false,
                blocked: false,
                misconfigured: *misconfigured,
                url: None,
                last_error: last_error.clone(),
            },
            LinkState::Up { url, blocked, .. } => LinkStatus {
                connected: true,
                blocked: *blocked,
                misconfigured: false,
                url: Some(url.clone()),
                last_error: None,
            },
        }
    }
}

/// Reconnect delay before attempt `failures` (1-based): capped doubling with
/// "equal jitter" (half fixed, half random) so replicas do not reconnect in step.
pub(crate) fn backoff(initial: Duration, cap: Duration, failures: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << failures.saturating_sub(1).min(20));
    let base = exp.min(cap);
    let random = RandomState::new().hash_one(Instant::now()) as f64 / u64::MAX as f64;
    base / 2 + base.mul_f64(0.5 * random)
}

/// Connects, sets up topology, watches the connection, and starts over when it fails.
async fn maintain(amqp: AmqpSettings, metrics: Arc<Metrics>, tx: &watch::Sender<LinkState>) {
    let initial = amqp.reconnect_initial();
    let cap = amqp.reconnect_max();
    let mut failures = 0u32;
    let mut ever_connected = false;
    loop {
        match connect_any(&amqp).await {
            Ok((connection, url)) => {
                if ever_connected {
                    metrics.broker_reconnects.inc();
                }
                ever_connected = true;
                info!(url = %url, "broker connected");
                if crate::fault::armed("link.panic").is_some() {
                    panic!("fault injected: link.panic");
                }
                let since = Instant::now();
                let error = watch_connection(connection, url, tx, &metrics).await;
                metrics.broker_connected.set(0);
                warn!(error = %error, "broker connection lost");
                tx.send_replace(LinkState::Down {
                    last_error: Some(error),
                    misconfigured: false,
                });
                if since.elapsed() >= STABLE_AFTER {
                    failures = 0;
                }
            }
            Err((error, misconfigured)) => {
                warn!(error = %error, "no broker usable");
                tx.send_replace(LinkState::Down {
                    last_error: Some(error),
                    misconfigured,
                });
            }
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(backoff(initial, cap, failures)).await;
    }
}

/// Tries each URL in order, each attempt bounded by [`CONNECT_TIMEOUT`] so a silent
/// broker is reported like a refusing one; the first that succeeds wins, returned
/// with its URL (password redacted). Shared by the link and `tail`.
pub(crate) async fn first_that_connects<'a, T, E, F, Fut>(
    urls: &'a [BrokerUrl],
    mut attempt: F,
) -> Result<(T, String), Vec<(String, Attempt<E>)>>
where
    F: FnMut(&'a str) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut failures = Vec::new();
    for url in urls {
        let shown = url.shown().to_string();
        match tokio::time::timeout(CONNECT_TIMEOUT, attempt(url.expose())).await {
            Ok(Ok(connected)) => return Ok((connected, shown)),
            Ok(Err(e)) => failures.push((shown, Attempt::Failed(e))),
            Err(_) => failures.push((shown, Attempt::TimedOut)),
        }
    }
    Err(failures)
}

/// Why one URL of [`first_that_connects`] gave nothing.
#[derive(Debug)]
pub enum Attempt<E> {
    /// The broker answered with a failure.
    Failed(E),
    /// No answer within [`CONNECT_TIMEOUT`].
    TimedOut,
}

impl<E: std::fmt::Display> std::fmt::Display for Attempt<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attempt::Failed(e) => e.fmt(f),
            Attempt::TimedOut => write!(f, "no answer within {CONNECT_TIMEOUT:?}"),
        }
    }
}

/// One `url: reason` per failed URL, for logs and errors.
pub(crate) fn describe<E: std::fmt::Display>(failures: &[(String, Attempt<E>)]) -> String {
    failures
        .iter()
        .map(|(url, why)| format!("{url}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The link's attempt: connect and set up the topology. The error tells whether
/// any broker answered with a topology problem (an operator's to fix, not a retry's).
async fn connect_any(amqp: &AmqpSettings) -> Result<(Connection, String), (String, bool)> {
    first_that_connects(&amqp.urls, |url| connect_one(url, amqp))
        .await
        .map_err(|failures| {
            let misconfigured = failures
                .iter()
                .any(|(_, why)| matches!(why, Attempt::Failed(ConnectError::Topology(_))));
            (describe(&failures), misconfigured)
        })
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("{0}")]
    Topology(#[from] topology::TopologyError),
}

/// Opens a connection to `url` named `name` (as the broker's connection list shows it),
/// asking for frames of [`FRAME_MAX`] unless the URL names its own size.
pub(crate) async fn open(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|why: String| lapin::Error::from(std::io::Error::other(why)))?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(uri, properties).await
}

async fn connect_one(url: &str, amqp: &AmqpSettings) -> Result<Connection, ConnectError> {
    let connection = open(url, "cellosign-bridge").await?;
    let channel = connection.create_channel().await?;
    topology::ensure(&channel, amqp).await?;
    if amqp.partitions > 0 {
        // A missing plugin closes this channel; use a fresh one so the error is the plugin's.
        let channel = connection.create_channel().await?;
        topology::ensure_partitions(&channel, amqp).await?;
        let _ = channel.close(200, "topology done".into()).await;
    }
    let _ = channel.close(200, "topology done".into()).await;
    Ok(connection)
}

/// Publishes the connection as up and follows its events until it fails; returns why.
async fn watch_connection(
    connection: Connection,
    url: String,
    tx: &watch::Sender<LinkState>,
    metrics: &Metrics,
) -> String {
    let mut events = connection.events_listener();
    let connection = Arc::new(connection);
    let set = |blocked: bool| {
        tx.send_replace(LinkState::Up {
            connection: connection.clone(),
            url: url.clone(),
            blocked,
        });
    };
    set(false);
    metrics.broker_connected.set(1);
    // Events report most failures; the periodic check catches a connection that
    // died without one.
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = check.tick() => {
                if connection.status().connected() {
                    continue;
                }
                return "connection closed".into();
            }
        };
        match event {
            Some(lapin::Event::ConnectionBlocked(reason)) => {
                warn!(%reason, "broker blocked publishing");
                set(true);
            }
            Some(lapin::Event::ConnectionUnblocked) => {
                info!("broker unblocked publishing");
                set(false);
            }
            Some(lapin::Event::Error(e)) => return e.to_string(),
            Some(_) => {}
            None => return "connection closed".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let initial = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for failures in 1..40 {
            let d = backoff(initial, cap, failures);
            let base = (initial * 2u32.pow((failures - 1).min(20))).min(cap);
            assert!(
                d >= base / 2 && d <= base,
                "{failures}: {d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
    }
}
