//! The step between validation and the caller's "0": make the event durable,
//! either in the local spool (`spooled`) or on the broker (`confirmed`).

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::amqp::confirmed::DirectPublisher;
use crate::amqp::message::PublishError;
use crate::event::Event;
use crate::event::envelope::{Envelope, encode_head};
use crate::ingress::dedup::{Claim, Pending};
use crate::spool::{Spool, SpoolError};
use crate::trace::export::{PublishTarget, RequestTrace, end};

/// Why an event could not be made durable now; the caller gets 503 and retries.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// `spool.max_bytes` reached.
    #[error("spool full, retry later")]
    Full,
    /// The spool's disk failed.
    #[error("spool cannot store events now, retry later")]
    Storage(#[source] SpoolError),
    /// Not durable within `spool.append_timeout_ms`. The append goes on: if it lands,
    /// the event is forwarded once and a retry is answered "0".
    #[error("spool too slow to store events now, retry later")]
    Timeout(Duration),
    /// Another copy of this event was being stored, and that failed.
    #[error("storing this event failed, retry later")]
    CopyFailed,
    /// `confirmed` mode: the broker did not confirm it.
    #[error("broker cannot take events now ({0}), retry later")]
    Publish(#[source] PublishError),
}

/// Where accepted events go before the caller is answered.
pub enum Delivery {
    /// fsync'd to the spool; a forwarder publishes it later.
    Spooled(Spool),
    /// Published and confirmed by the broker before answering.
    Confirmed(Box<DirectPublisher>),
}

impl DeliveryError {
    /// Its reason in the rejection metric, and the status of a failed span.
    pub(crate) fn metric(&self) -> &'static str {
        match self {
            DeliveryError::Full => "spool_full",
            DeliveryError::Storage(_) => "spool_error",
            DeliveryError::Timeout(_) => "spool_timeout",
            DeliveryError::CopyFailed => "copy_failed",
            DeliveryError::Publish(_) => "broker_unavailable",
        }
    }
}

impl Delivery {
    /// Makes the validated `event` (with its `body`, received at `received_at_ms`) durable,
    /// or says why not; settles `claim` once it is durable. Takes the event borrowed: the
    /// spool record is encoded straight from it, and only `confirmed` mode builds an
    /// [`Envelope`]. `claim_check`: `body` is the claim-check document of a stored body.
    /// `trace` is the request's: its context is stored and published with the event,
    /// and with export on this step gets a span (`store`, or `publish` when confirmed).
    pub(crate) async fn accept(
        &self,
        event: &Event<'_>,
        body: &Bytes,
        claim_check: bool,
        received_at_ms: u64,
        claim: Claim,
        trace: &RequestTrace,
    ) -> Result<(), DeliveryError> {
        match self {
            Delivery::Spooled(spool) => {
                let span = trace.step("store");
                let head = encode_head(event, received_at_ms, trace.context(), claim_check);
                let result = append(spool, head, body, claim).await;
                end(span, result.as_ref().err().map(DeliveryError::metric));
                result
            }
            Delivery::Confirmed(publisher) => {
                let (span, context) = trace.publish(&PublishTarget {
                    exchange: publisher.exchange(),
                    routing_key: &event.routing_key,
                    message_id: &event.message_id,
                });
                let envelope = Envelope {
                    claim_check,
                    trace: Some(context),
                    ..Envelope::new(event, body.clone(), received_at_ms)
                };
                let result = publisher
                    .publish(&envelope)
                    .await
                    .map_err(DeliveryError::Publish);
                end(span, result.as_ref().err().map(DeliveryError::metric));
                result?;
                claim.settle();
                Ok(())
            }
        }
    }

    /// Waits for the copy of the same event that another request is storing: Ok once it
    /// is durable. In `spooled` mode no longer than the append timeout; in `confirmed`
    /// mode that publish is bounded by its own timeout.
    pub(crate) async fn await_copy(&self, pending: Pending) -> Result<(), DeliveryError> {
        let durable = match self {
            Delivery::Spooled(spool) => {
                let limit = spool.append_timeout();
                tokio::time::timeout(limit, pending.durable())
                    .await
                    .map_err(|_| DeliveryError::Timeout(limit))?
            }
            Delivery::Confirmed(_) => pending.durable().await,
        };
        if durable {
            Ok(())
        } else {
            Err(DeliveryError::CopyFailed)
        }
    }
}

/// `spooled` mode: appends the record (`head`, then `body`) and waits for it to be
/// durable, at most the append timeout; settles `claim` by the real outcome.
async fn append(
    spool: &Spool,
    head: Bytes,
    body: &Bytes,
    claim: Claim,
) -> Result<(), DeliveryError> {
    let limit = spool.append_timeout();
    let (tx, rx) = oneshot::channel();
    let spool = spool.clone();
    // Shares the body's memory: it is copied once, into the spool's page.
    let body = body.clone();
    // The append runs to its end even when the caller is answered (or gone) first,
    // so the claim always ends up settled or released by the real outcome.
    tokio::spawn(async move {
        let result = spool.append_parts(head, body).await;
        if result.is_ok() {
            claim.settle();
        } else {
            drop(claim);
        }
        let _ = tx.send(result);
    });
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(Ok(_seq))) => Ok(()),
        Ok(Ok(Err(SpoolError::Full { .. }))) => Err(DeliveryError::Full),
        Ok(Ok(Err(e))) => Err(DeliveryError::Storage(e)),
        // The task ended without an answer: only a panic gets here.
        Ok(Err(_)) => Err(DeliveryError::Storage(SpoolError::Closed)),
        Err(_) => Err(DeliveryError::Timeout(limit)),
    }
}
