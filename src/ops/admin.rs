//! The admin listener: liveness, readiness and metrics, never on the public port.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::amqp::link::{Link, LinkStatus};
use crate::config::AckMode;
use crate::http::server::Handler;
use crate::ops::metrics::Metrics;
use crate::spool::Spool;
use crate::supervisor::Supervisor;

/// Spool detail of `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct SpoolStatus {
    pub events: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_age_s: Option<f64>,
    /// The last write failed; the spool reopens its file before the next one.
    pub degraded: bool,
    /// An event as large as the last one refused as full would fit now.
    pub has_room: bool,
}

/// The `/readyz` body.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Shutdown started: the public listener no longer accepts.
    pub draining: bool,
    /// A background task stopped: the bridge is exiting to be restarted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    pub mode: AckMode,
    pub broker: LinkStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolStatus>,
}

/// Handler of the admin listener.
pub struct Admin {
    link: Link,
    spool: Option<(Spool, u64)>,
    metrics: Arc<Metrics>,
    supervisor: Supervisor,
}

impl Admin {
    /// `spool` is the spool and its byte limit in spooled mode, `None` in confirmed
    /// mode: the one fact the mode is read from.
    pub(crate) fn new(
        link: Link,
        spool: Option<(Spool, u64)>,
        metrics: Arc<Metrics>,
        supervisor: Supervisor,
    ) -> Self {
        Admin {
            link,
            spool,
            metrics,
            supervisor,
        }
    }

    /// Whether an event posted now would be accepted, and why (not).
    pub(crate) fn readiness(&self) -> Readiness {
        let broker = self.link.status();
        let spool = self.spool.as_ref().map(|(spool, max_bytes)| {
            let stats = spool.stats();
            SpoolStatus {
                events: stats.events,
                bytes: stats.bytes,
                max_bytes: *max_bytes,
                oldest_age_s: stats.oldest_age.map(|a| a.as_secs_f64()),
                degraded: stats.degraded,
                has_room: stats.has_room,
            }
        });
        let (mode, ready) = match &spool {
            // Spooled: accepting needs a healthy spool with room; the broker may be away,
            // but not misconfigured, since then nothing spooled could ever leave.
            Some(s) => (
                AckMode::Spooled,
                !s.degraded && s.has_room && !broker.misconfigured,
            ),
            None => (AckMode::Confirmed, broker.connected && !broker.blocked),
        };
        let draining = self.supervisor.is_stopping();
        let failure = self.supervisor.failure().map(|f| f.to_string());
        Readiness {
            ready: ready && !draining && failure.is_none(),
            draining,
            failure,
            mode,
            broker,
            spool,
        }
    }

    /// Sets the gauges read from state at scrape time: readiness, from the decision
    /// `/readyz` answers with, and the spool's depth, bytes and oldest event's age from
    /// the one snapshot that decision read.
    fn refresh_gauges(&self) {
        let readiness = self.readiness();
        self.metrics.ready.set(i64::from(readiness.ready));
        if let Some(spool) = &readiness.spool {
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.metrics.spool_events.set(gauge(spool.events));
            self.metrics.spool_bytes.set(gauge(spool.bytes));
            self.metrics
                .spool_oldest_age
                .set(spool.oldest_age_s.unwrap_or(0.0));
        }
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

impl Handler for Admin {
    async fn handle(&self, req: Request<Incoming>, _peer: SocketAddr) -> Response<Full<Bytes>> {
        // The path first, as on the public listener: an unknown path is 404 whatever
        // the method, and 405 (with `Allow`) is for a known one.
        let known = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
        if known && req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use GET\n".into(),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        match req.uri().path() {
            "/healthz" => respond(
                StatusCode::OK,
                "application/json",
                "{\"alive\":true}".into(),
            ),
            "/readyz" => {
                let readiness = self.readiness();
                let status = if readiness.ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::to_string(&readiness).unwrap_or_default();
                respond(status, "application/json", body)
            }
            "/metrics" => {
                self.refresh_gauges();
                respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.render(),
                )
            }
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}
