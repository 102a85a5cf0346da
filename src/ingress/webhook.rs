//! The public webhook endpoint: checks in the contract's order, then validation,
//! dedup and delivery, and Cellosign's status body on every answer.
//!
//! Order (the first failing check answers): path 404, method 405, client
//! address 403, token 401, content type 415, size 413, in flight 429, JSON 400,
//! validation 422, storing 503. Everything up to 429 is decided from the head.
//! The path picks the [`Route`]: the notification path or the archive path,
//! each with its own size limit, in-flight permits and validator. The token URL
//! (`auth.token_path`), when served, is handed over before these.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::http::request::Parts;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::SemaphorePermit;
use tracing::{info, warn};

use crate::claim::{ClaimError, ClaimStore};
use crate::event::{Event, Rejection, validate, validate_archive};
use crate::http::body::{BodyError, read_body};
use crate::http::server::Handler;
use crate::http::token_endpoint::TokenEndpoint;
use crate::ingress::dedup::{Check, Dedup};
use crate::ingress::delivery::{Delivery, DeliveryError};
use crate::ingress::live::{Live, LiveConfig};
use crate::ingress::route::{PathLimits, Route};
use crate::ops::metrics::Metrics;
use crate::supervisor::Supervisor;
use crate::trace::Telemetry;
use crate::trace::export::{RequestTrace, end};

/// Seconds a caller is asked to wait after 429.
const RETRY_AFTER_BUSY_S: &str = "1";
/// Seconds a caller is asked to wait after 503.
const RETRY_AFTER_UNAVAILABLE_S: &str = "5";
/// The body of every "0" answer, the bytes `answer` would render for it: built once, not
/// serialised per accepted event.
const ACCEPTED_BODY: &[u8] = br#"{"status":"0","errordesc":""}"#;

/// Limits of the public endpoint.
#[derive(Debug, Clone)]
pub struct IngressLimits {
    /// The notification path (`http.path`, `http.max_body_bytes`, `http.max_in_flight`).
    pub notification: PathLimits,
    /// The archive path (`http.archive_*`).
    pub archive: PathLimits,
    /// `amqp.max_message_bytes`: a larger body is claim-checked on either path, or
    /// gets 413 without a store.
    pub max_message_bytes: usize,
    /// `archive.store_url` opened: where bodies over `max_message_bytes` go (SPEC 9).
    pub claim_store: Option<ClaimStore>,
    pub body_read_timeout: Duration,
}

/// The webhook handler and everything it needs.
pub struct Ingress {
    /// The notification path, then the archive path.
    routes: [Route; 2],
    /// Bodies over `max_message_bytes` are stored here, a claim check published instead.
    claim_store: Option<ClaimStore>,
    max_message_bytes: usize,
    body_read_timeout: Duration,
    /// Who may post and what is accepted: read once per request, replaced on SIGHUP.
    live: LiveConfig,
    /// The token URL, served beside the webhook when clients can fetch tokens.
    token: Option<TokenEndpoint>,
    dedup: Dedup,
    delivery: Delivery,
    metrics: Arc<Metrics>,
    /// Once a background task died nothing may be answered "0": it might never be forwarded.
    supervisor: Supervisor,
    /// Spans of each request, when exporting; the trace context is kept either way.
    telemetry: Telemetry,
}

/// A refused request: its HTTP code, the reason shown to the caller, and a metric label.
struct Refusal {
    status: StatusCode,
    /// Borrowed when fixed, so refusing a flood of requests does not allocate reasons.
    reason: Cow<'static, str>,
    metric: &'static str,
}

impl Refusal {
    fn new(status: StatusCode, reason: impl Into<Cow<'static, str>>, metric: &'static str) -> Self {
        Refusal {
            status,
            reason: reason.into(),
            metric,
        }
    }
}

impl From<Rejection> for Refusal {
    /// 400 for a malformed body, 422 for an invalid event, with the validator's reason.
    fn from(rejection: Rejection) -> Self {
        Refusal {
            status: StatusCode::from_u16(rejection.http_status())
                .unwrap_or(StatusCode::UNPROCESSABLE_ENTITY),
            reason: rejection.to_string().into(),
            metric: rejection.metric_reason(),
        }
    }
}

/// What the answer and its log line need of a request: borrowed from it, never copied.
struct Seen<'r> {
    /// Method and path for the log line (the path only: the query may carry the token).
    head: &'r Parts,
    /// The TCP peer, for the log line.
    peer: SocketAddr,
    /// When the request arrived, for the answer latency.
    started: Instant,
}

impl Ingress {
    /// Assembles the handler.
    pub(crate) fn new(
        limits: IngressLimits,
        live: LiveConfig,
        dedup: Dedup,
        delivery: Delivery,
        metrics: Arc<Metrics>,
        supervisor: Supervisor,
    ) -> Self {
        // Without a claim-check store a body over the largest message is refused unread.
        let cap = match limits.claim_store {
            Some(_) => None,
            None => Some(limits.max_message_bytes),
        };
        let routes = [
            Route::new(&limits.notification, cap, validate),
            Route::new(&limits.archive, cap, validate_archive),
        ];
        Ingress {
            routes,
            claim_store: limits.claim_store,
            max_message_bytes: limits.max_message_bytes,
            body_read_timeout: limits.body_read_timeout,
            live,
            token: None,
            dedup,
            delivery,
            metrics,
            supervisor,
            telemetry: Telemetry::default(),
        }
    }

    /// Exports spans of each request through `telemetry` (when it is on).
    pub(crate) fn with_telemetry(mut self, telemetry: Telemetry) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Serves the token URL too (SPEC 9).
    pub(crate) fn with_token_endpoint(mut self, endpoint: TokenEndpoint) -> Self {
        self.token = Some(endpoint);
        self
    }

    /// The checks decided from the head, up to 429, then the body: the route, the body
    /// and the route's in-flight permit, which the caller holds until the event is stored.
    async fn admit(
        &self,
        live: &Live,
        head: &Parts,
        body: Incoming,
        peer: SocketAddr,
    ) -> Result<(&Route, SemaphorePermit<'_>, Bytes), Refusal> {
        let Some(route) = self.routes.iter().find(|r| r.path == head.uri.path()) else {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown path",
                "not_found",
            ));
        };
        if head.method != Method::POST {
            return Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed, use POST",
                "method",
            ));
        }
        if !live.auth.client_allowed(peer.ip(), &head.headers) {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "client address not allowed",
                "forbidden",
            ));
        }
        if !live.auth.token_valid(&head.headers, head.uri.query()) {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                "missing or invalid token",
                "unauthorized",
            ));
        }
        if let Some(ct) = head.headers.get(CONTENT_TYPE)
            && !is_json(ct)
        {
            return Err(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content type must be application/json",
                "content_type",
            ));
        }
        let declared = head
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > route.max_body_bytes as u64) {
            return Err(too_large(route));
        }
        let permit = route.in_flight.try_acquire().map_err(|_| {
            Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too many requests in flight",
                "overloaded",
            )
        })?;
        let body = self.read_body(route, body, declared).await?;
        Ok((route, permit, body))
    }

    /// Dedup, claim check (a body over the largest message, with a store) and delivery of
    /// a validated event: Ok once it is durable (or was already).
    async fn store(
        &self,
        live: &Live,
        event: &Event<'_>,
        body: &Bytes,
        received_at_ms: u64,
        trace: &RequestTrace,
    ) -> Result<(), Refusal> {
        let unavailable = |e: DeliveryError| {
            Refusal::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), e.metric())
        };
        if self.supervisor.has_failed() {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bridge is restarting after an internal failure, retry later",
                "failed",
            ));
        }
        // One step: accepted before, being stored by another copy now, or ours to store.
        let claim = match self.dedup.check(&event.message_id) {
            Check::Done => {
                self.metrics.dedup_hits.inc();
                return Ok(());
            }
            Check::Pending(pending) => {
                self.delivery
                    .await_copy(pending)
                    .await
                    .map_err(unavailable)?;
                self.metrics.dedup_hits.inc();
                return Ok(());
            }
            Check::Claimed(claim) => claim,
        };
        // A body too large to publish is stored first; on failure the dedup claim is
        // dropped (released) and nothing is published.
        let (payload, claim_check) = match &self.claim_store {
            Some(store) if body.len() > self.max_message_bytes => {
                let document = store.check_in(body).await.map_err(claim_refusal)?;
                self.metrics.claim_checks.inc();
                (document, true)
            }
            _ => (body.clone(), false),
        };
        self.delivery
            .accept(event, &payload, claim_check, received_at_ms, claim, trace)
            .await
            .map_err(unavailable)?;
        live.accepted.count(&event.event_type);
        Ok(())
    }

    /// Reads the whole body, at most the route's limit, within the body timeout.
    async fn read_body(
        &self,
        route: &Route,
        body: Incoming,
        declared: Option<u64>,
    ) -> Result<Bytes, Refusal> {
        let read = read_body(body, route.max_body_bytes, declared, self.body_read_timeout);
        read.await.map_err(|e| match e {
            BodyError::TooLarge => too_large(route),
            BodyError::Unreadable => Refusal::new(
                StatusCode::BAD_REQUEST,
                "body: could not be read",
                "body_error",
            ),
            BodyError::Timeout => Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "body: not received in time",
                "body_timeout",
            ),
        })
    }

    /// The answer to a request, its metrics, its log line and the end of its `receive`
    /// span. `event` is the validated event, once there is one: the log line borrows
    /// its fields.
    fn respond(
        &self,
        seen: &Seen<'_>,
        event: Option<&Event<'_>>,
        result: Result<(), Refusal>,
        trace: RequestTrace,
    ) -> Response<Full<Bytes>> {
        let response = match &result {
            Ok(()) => {
                self.metrics
                    .ack_latency
                    .observe(seen.started.elapsed().as_secs_f64());
                answer(StatusCode::OK, "")
            }
            Err(refusal) => {
                self.metrics.count_rejection(refusal.metric);
                let mut response = answer(refusal.status, &refusal.reason);
                let headers = response.headers_mut();
                match refusal.status {
                    StatusCode::METHOD_NOT_ALLOWED => {
                        headers.insert(ALLOW, HeaderValue::from_static("POST"));
                    }
                    StatusCode::TOO_MANY_REQUESTS => {
                        headers.insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_BUSY_S));
                    }
                    StatusCode::SERVICE_UNAVAILABLE => {
                        headers.insert(
                            RETRY_AFTER,
                            HeaderValue::from_static(RETRY_AFTER_UNAVAILABLE_S),
                        );
                    }
                    // The rest of the body was not read: the connection cannot be reused.
                    StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => {
                        headers.insert(CONNECTION, HeaderValue::from_static("close"));
                    }
                    _ => {}
                }
                response
            }
        };
        let code = response.status().as_u16();
        self.metrics.count_request(code);
        info!(
            target: "cellosign_bridge::request",
            method = %seen.head.method,
            path = %seen.head.uri.path(),
            peer = %seen.peer.ip(),
            code,
            event_type = event.map_or("-", |e| &e.event_type),
            session_id = event.map_or("-", |e| &e.session_id),
            reference = event.map_or("-", |e| &e.reference),
            latency_ms = seen.started.elapsed().as_secs_f64() * 1000.0,
            reason = result.as_ref().err().map_or("", |r| &r.reason),
            trace_id = %trace.context().trace_id_hex(),
            "webhook"
        );
        trace.finish(code);
        response
    }
}

impl Handler for Ingress {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        // Taken once: this request keeps these rules to its end, whatever a reload does.
        let live = self.live.current();
        if let Some(token) = &self.token
            && req.uri().path() == token.path()
        {
            return token.handle(req, peer, &live.auth).await;
        }
        let started = Instant::now();
        // The head stays here until the log line, which borrows method and path from it.
        let (head, body) = req.into_parts();
        let trace = self.telemetry.receive(&head);
        let seen = Seen {
            head: &head,
            peer,
            started,
        };
        let (route, permit, body) = match self.admit(&live, &head, body, peer).await {
            Ok(admitted) => admitted,
            Err(refusal) => return self.respond(&seen, None, Err(refusal), trace),
        };
        let received_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Kept until the log line, which borrows its fields instead of copying them.
        let validating = trace.step("validate");
        let event = match (route.validate)(&body, &live.policy) {
            Ok(event) => {
                end(validating, None);
                event
            }
            Err(rejection) => {
                end(validating, Some(rejection.metric_reason()));
                drop(permit);
                return self.respond(&seen, None, Err(rejection.into()), trace);
            }
        };
        let result = self
            .store(&live, &event, &body, received_at_ms, &trace)
            .await;
        drop(permit);
        self.respond(&seen, Some(&event), result, trace)
    }
}

/// 413, naming the limit in force on `route`.
fn too_large(route: &Route) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        route.too_large.clone(),
        "too_large",
    )
}

/// A body that could not be claim-checked: 413 if even its claim check is too large
/// to publish, else 503 (the store failed or was too slow; the sender retries).
fn claim_refusal(e: ClaimError) -> Refusal {
    let (status, metric) = match e {
        ClaimError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        ClaimError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "claim_store_error"),
        ClaimError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "claim_store_timeout"),
        ClaimError::Internal(_) => (StatusCode::SERVICE_UNAVAILABLE, "claim_check_failed"),
    };
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // The caller sees the short reason; the log has the store's own error.
        warn!(error = ?e, "claim check failed");
    }
    Refusal::new(status, e.to_string(), metric)
}

/// `application/json`, with any parameters.
fn is_json(value: &HeaderValue) -> bool {
    value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Cellosign's status body: `{"status":"0","errordesc":""}` or `"-1"` with a reason.
/// The constant "0" body is [`ACCEPTED_BODY`], not serialised again.
pub(crate) fn answer(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    /// Field order as Cellosign documents it.
    #[derive(serde::Serialize)]
    struct StatusBody<'a> {
        status: &'static str,
        errordesc: &'a str,
    }
    let body = if status == StatusCode::OK && reason.is_empty() {
        Bytes::from_static(ACCEPTED_BODY)
    } else {
        let code = if status == StatusCode::OK { "0" } else { "-1" };
        let body = serde_json::to_string(&StatusBody {
            status: code,
            errordesc: reason,
        })
        .unwrap_or_default();
        Bytes::from(body)
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON;x=y",
        ] {
            assert!(is_json(&HeaderValue::from_static(ok)), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/jsonx",
            "application/x-www-form-urlencoded",
            "",
        ] {
            assert!(!is_json(&HeaderValue::from_static(bad)), "{bad}");
        }
    }

    #[test]
    fn status_body_escapes_reasons() {
        let r = answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            "event: duplicate key \"type\"",
        );
        assert_eq!(r.status(), 422);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");
        let ok = answer(StatusCode::OK, "");
        let body = http_body_util::BodyExt::collect(ok.into_body()).now_or_never();
        let bytes = body.and_then(Result::ok).map(|c| c.to_bytes());
        assert_eq!(
            bytes.as_deref(),
            Some(&br#"{"status":"0","errordesc":""}"#[..])
        );
    }

    #[test]
    fn the_prebuilt_accepted_body_is_what_serde_renders() {
        #[derive(serde::Serialize)]
        struct StatusBody {
            status: &'static str,
            errordesc: &'static str,
        }
        let rendered = serde_json::to_vec(&StatusBody {
            status: "0",
            errordesc: "",
        });
        assert_eq!(rendered.ok().as_deref(), Some(ACCEPTED_BODY));
        // A 200 with a reason (no caller sends one) is still rendered, not the constant.
        let with_reason = answer(StatusCode::OK, "x");
        let body = http_body_util::BodyExt::collect(with_reason.into_body()).now_or_never();
        let bytes = body.and_then(Result::ok).map(|c| c.to_bytes());
        assert_eq!(
            bytes.as_deref(),
            Some(&br#"{"status":"0","errordesc":"x"}"#[..])
        );
    }
}
