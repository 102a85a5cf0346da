//! Publishing one envelope: the AMQP message the contract describes, and what
//! the broker's answer means. Shared by the forwarder (spooled mode) and the
//! direct publisher (confirmed mode).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use tokio::time::Instant;

use crate::event::envelope::Envelope;
use crate::ops::metrics::Metrics;
use crate::trace::TraceContext;
use crate::trace::context::{TRACEPARENT, TRACESTATE};

/// `app_id` of every published message.
pub const APP_ID: &str = "cellosign-bridge";

/// Why a publish did not count as delivered. Each means: publish again later.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker unreachable")]
    Unreachable,
    #[error("broker nacked the publish")]
    Nacked,
    #[error("broker returned the message as unroutable ({code} {text})")]
    Returned { code: u16, text: String },
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
}

/// Opens a channel in confirm mode on `connection`.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// RFC 3339 UTC with milliseconds, e.g. `2025-01-26T08:49:33.626Z`.
pub(crate) fn rfc3339_millis(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        unix_ms % 1000
    )
}

/// The AMQP properties and headers of an envelope (SPEC 3), `x-claim-check`
/// for a claim-check document (SPEC 9), and its trace context (SPEC 7):
/// `traceparent` from `own` (the context of the bridge's `publish` span) if given,
/// else the envelope's, else (a record from before traces) a new trace's;
/// `tracestate` when the caller sent one.
pub(crate) fn properties(envelope: &Envelope, own: Option<&TraceContext>) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("x-event-type", envelope.event_type.as_str()),
        ("x-session-id", envelope.session_id.as_str()),
        ("x-session-reference", envelope.reference.as_str()),
        (
            "x-received-at",
            rfc3339_millis(envelope.received_at_ms).as_str(),
        ),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    // SPEC 9: the body is a claim-check document, the event's body is in the store.
    if envelope.claim_check {
        headers.insert("x-claim-check".into(), AMQPValue::Boolean(true));
    }
    let fresh;
    let trace = match own.or(envelope.trace.as_ref()) {
        Some(trace) => trace,
        None => {
            fresh = TraceContext::fresh();
            &fresh
        }
    };
    headers.insert(
        TRACEPARENT.into(),
        AMQPValue::LongString(LongString::from(trace.traceparent())),
    );
    if let Some(state) = &trace.state {
        headers.insert(
            TRACESTATE.into(),
            AMQPValue::LongString(LongString::from(state.as_str())),
        );
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(envelope.message_id.as_str().into())
        .with_correlation_id(envelope.reference.as_str().into())
        .with_type(envelope.event_type.as_str().into())
        .with_timestamp(envelope.received_at_ms / 1000)
        .with_app_id(APP_ID.into())
        .with_headers(headers)
}

/// Sends one envelope, persistent and mandatory; the returned future resolves to the broker's answer.
pub async fn send(
    channel: &Channel,
    exchange: &str,
    envelope: &Envelope,
) -> Result<PublisherConfirm, lapin::Error> {
    send_traced(channel, exchange, envelope, None).await
}

/// [`send`], the message carrying `own` as its trace context if given (see [`properties`]).
pub(crate) async fn send_traced(
    channel: &Channel,
    exchange: &str,
    envelope: &Envelope,
    own: Option<&TraceContext>,
) -> Result<PublisherConfirm, lapin::Error> {
    channel
        .basic_publish(
            exchange.into(),
            envelope.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &envelope.body,
            properties(envelope, own),
        )
        .await
}

/// A publisher confirm with the caller's tag, so a set of them can be awaited together.
pub struct Tracked<T> {
    tag: T,
    confirm: PublisherConfirm,
}

impl<T: Copy + Unpin> Tracked<T> {
    /// Tags `confirm` with `tag`.
    pub(crate) fn new(tag: T, confirm: PublisherConfirm) -> Self {
        Tracked { tag, confirm }
    }
}

impl<T: Copy + Unpin> Future for Tracked<T> {
    type Output = (T, Result<Confirmation, lapin::Error>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let tag = self.tag;
        Pin::new(&mut self.confirm).poll(cx).map(|r| (tag, r))
    }
}

/// Waits for at least one confirm of `set`, then takes every other one already resolved.
///
/// lapin hands a `basic.return` to whichever confirm it resolves next, not to the
/// publish it belongs to. The broker sends a return before the ack of the same
/// publish, so by the time that publish's confirm has resolved, the confirm that
/// carries its return has resolved too (it is the same one or an earlier one). Judging
/// a whole batch of resolved confirms at once, and matching returns by the message
/// itself ([`returned_key`]), therefore never credits a returned publish as delivered.
pub(crate) async fn settled<T: Copy + Unpin>(
    set: &mut FuturesUnordered<Tracked<T>>,
    out: &mut Vec<(T, Result<Confirmation, lapin::Error>)>,
) {
    if let Some(first) = set.next().await {
        out.push(first);
    }
    while let Some(Some(next)) = set.next().now_or_never() {
        out.push(next);
    }
}

/// Publishes in send order, to find the oldest one still unconfirmed (the next
/// to time out) without scanning every pending publish.
#[derive(Default)]
pub struct SendOrder(VecDeque<(Instant, u64)>);

impl SendOrder {
    /// Records publish `id`, sent at `at`.
    pub(crate) fn push(&mut self, at: Instant, id: u64) {
        self.0.push_back((at, id));
    }

    /// Forgets every publish.
    pub(crate) fn clear(&mut self) {
        self.0.clear();
    }

    /// When the oldest publish for which `pending` holds was sent; drops the
    /// settled ones in front on the way.
    pub(crate) fn oldest(&mut self, pending: impl Fn(u64) -> bool) -> Option<Instant> {
        while let Some(&(at, id)) = self.0.front() {
            if pending(id) {
                return Some(at);
            }
            self.0.pop_front();
        }
        None
    }
}

/// Sleeps until `at`, or for ever when there is nothing to wait for (a disabled
/// `select!` timer).
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What identifies a returned message: its routing key and message id.
pub(crate) fn returned_key(
    confirmation: &Result<Confirmation, lapin::Error>,
) -> Option<ReturnedKey<'_>> {
    match confirmation {
        Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
            Some(ReturnedKey {
                routing_key: returned.routing_key.as_str(),
                message_id: returned
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str()),
                code: returned.reply_code,
                text: returned.reply_text.as_str(),
            })
        }
        _ => None,
    }
}

/// A returned message, as [`returned_key`] reads it.
#[derive(Debug, Clone, Copy)]
pub struct ReturnedKey<'a> {
    pub routing_key: &'a str,
    pub message_id: Option<&'a str>,
    pub code: u16,
    pub text: &'a str,
}

/// The broker's verdict on one publish once returns are matched to their own publish.
#[derive(Debug)]
pub enum Verdict {
    /// A plain ack: delivered.
    Delivered,
    /// Nacked (or confirms were off): publish again, on a fresh channel.
    Nacked,
    /// Returned as unroutable: publish again later.
    Returned { code: u16, text: String },
    /// The channel or connection failed before an answer.
    Failed(lapin::Error),
}

impl Verdict {
    /// The verdict on a resolved confirm, given whether its message was returned
    /// (to it or to a neighbour); counts nacks and returns.
    pub(crate) fn of(
        confirmation: Result<Confirmation, lapin::Error>,
        returned: Option<(u16, String)>,
        metrics: &Metrics,
    ) -> Verdict {
        match (confirmation, returned) {
            (Err(e), _) => Verdict::Failed(e),
            (Ok(Confirmation::Ack(_)), Some((code, text))) => {
                metrics.broker_returns.inc();
                Verdict::Returned { code, text }
            }
            (Ok(Confirmation::Ack(_)), None) => Verdict::Delivered,
            (Ok(Confirmation::Nack(_) | Confirmation::NotRequested), _) => {
                metrics.broker_nacks.inc();
                Verdict::Nacked
            }
        }
    }

    /// Why it did not count as delivered, for a span's status; `None` when delivered.
    pub(crate) fn failure(&self) -> Option<&'static str> {
        match self {
            Verdict::Delivered => None,
            Verdict::Nacked => Some("nacked"),
            Verdict::Returned { .. } => Some("returned as unroutable"),
            Verdict::Failed(_) => Some("channel failed"),
        }
    }

    /// As the error a caller sees, `None` when delivered.
    pub(crate) fn into_error(self) -> Option<PublishError> {
        match self {
            Verdict::Delivered => None,
            Verdict::Nacked => Some(PublishError::Nacked),
            Verdict::Returned { code, text } => Some(PublishError::Returned { code, text }),
            Verdict::Failed(e) => Some(PublishError::Broker(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(trace: Option<TraceContext>) -> Envelope {
        Envelope {
            routing_key: "r".into(),
            message_id: "m".into(),
            event_type: "T".into(),
            session_id: "s".into(),
            reference: "r".into(),
            received_at_ms: 0,
            body: bytes::Bytes::new(),
            claim_check: false,
            trace,
        }
    }

    fn header(p: &BasicProperties, key: &str) -> Option<String> {
        match p.headers().as_ref()?.inner().get(key)? {
            AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    /// The stored context is published; the bridge's own publish span wins over it;
    /// a record from before traces gets a new trace, never none.
    #[test]
    fn the_trace_headers_come_from_the_span_the_envelope_or_a_new_trace() {
        let stored = TraceContext {
            trace_id: [1; 16],
            span_id: [2; 8],
            flags: 1,
            state: Some("a=b".into()),
        };
        let p = properties(&envelope(Some(stored.clone())), None);
        assert_eq!(header(&p, "traceparent"), Some(stored.traceparent()));
        assert_eq!(header(&p, "tracestate").as_deref(), Some("a=b"));
        let own = TraceContext {
            span_id: [3; 8],
            state: None,
            ..stored.clone()
        };
        let p = properties(&envelope(Some(stored)), Some(&own));
        assert_eq!(header(&p, "traceparent"), Some(own.traceparent()));
        assert_eq!(header(&p, "tracestate"), None);
        let (a, b) = (
            header(&properties(&envelope(None), None), "traceparent"),
            header(&properties(&envelope(None), None), "traceparent"),
        );
        let a = a.expect("a record from before traces still gets a traceparent");
        assert!(a.len() == 55 && a.starts_with("00-"), "{a}");
        assert_ne!(Some(a), b, "a new trace each");
    }

    #[test]
    fn formats_received_at() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_737_881_373_626),
            "2025-01-26T08:49:33.626Z"
        );
        assert_eq!(rfc3339_millis(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(
            rfc3339_millis(4_102_444_799_999),
            "2099-12-31T23:59:59.999Z"
        );
    }
}
