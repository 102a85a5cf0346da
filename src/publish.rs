//! Publishing one envelope: the AMQP message the contract describes, and what
//! the broker's answer means. Shared by the forwarder (spooled mode) and the
//! direct publisher (confirmed mode).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::Mutex;

use crate::broker::Link;
use crate::envelope::Envelope;
use crate::metrics::Metrics;

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
pub fn rfc3339_millis(unix_ms: u64) -> String {
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

/// The AMQP properties and headers of an envelope (SPEC 3).
pub fn properties(envelope: &Envelope) -> BasicProperties {
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
    channel
        .basic_publish(
            exchange.into(),
            envelope.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &envelope.body,
            properties(envelope),
        )
        .await
}

/// Only a plain ack is a delivery: an ack carrying a returned message was not routed.
pub fn outcome(confirmation: Confirmation, metrics: &Metrics) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            metrics.broker_returns.inc();
            Err(PublishError::Returned {
                code: returned.reply_code,
                text: returned.reply_text.to_string(),
            })
        }
        Confirmation::Nack(None) => {
            metrics.broker_nacks.inc();
            Err(PublishError::Nacked)
        }
        // confirm_select was not in effect: nothing was confirmed.
        Confirmation::NotRequested => Err(PublishError::Nacked),
    }
}

/// Confirmed mode: publishes each request's event and waits for its confirm.
///
/// Requests share one channel and publish pipelined; the lock only covers
/// getting the channel, never a confirm. A channel that nacked is replaced,
/// since after a node loss such a channel can keep nacking while a fresh one works.
pub struct DirectPublisher {
    link: Link,
    exchange: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
    channel: Mutex<Option<Channel>>,
}

impl DirectPublisher {
    /// A publisher on `link`; `timeout` bounds each publish from start to confirm.
    pub fn new(link: Link, exchange: String, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        DirectPublisher {
            link,
            exchange,
            timeout,
            metrics,
            channel: Mutex::new(None),
        }
    }

    /// Publishes and waits for a plain ack, at most the publish timeout.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        let started = Instant::now();
        let mut used = None;
        let attempt = async {
            let channel = self.channel().await?;
            used = Some(channel.id());
            let confirm = send(&channel, &self.exchange, envelope).await?;
            outcome(confirm.await?, &self.metrics)
        };
        let result = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result,
            Err(_) if self.link.connection().is_none() => Err(PublishError::Unreachable),
            Err(_) => Err(PublishError::Timeout(self.timeout)),
        };
        match &result {
            Ok(()) => self
                .metrics
                .publish_confirm
                .observe(started.elapsed().as_secs_f64()),
            Err(PublishError::Returned { .. }) | Err(PublishError::Unreachable) => {}
            // The channel may be the problem: the next publish opens a fresh one,
            // unless another request already replaced it.
            Err(_) => {
                let mut slot = self.channel.lock().await;
                if used.is_some() && slot.as_ref().map(Channel::id) == used {
                    *slot = None;
                }
            }
        }
        result
    }

    async fn channel(&self) -> Result<Channel, PublishError> {
        // Rides out a reconnect (or the start) within the publish timeout
        // instead of failing at once; the caller's timeout bounds the wait.
        let connection = match self.link.connection() {
            Some(connection) => connection,
            None => self.link.connected().await,
        };
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = confirm_channel(&connection).await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
