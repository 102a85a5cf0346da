//! Moves spooled events to the broker, oldest first, with a bounded window of
//! unconfirmed publishes, and removes each only after a plain ack.
//!
//! Any failure (nack, return, timeout, lost connection) abandons the channel
//! and starts again from the oldest event still in the spool on a fresh
//! channel ("go back N"). Events therefore reach the broker in acceptance
//! order, at least once: a consumer may see a duplicate after a failure,
//! never a gap or an inversion.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::Channel;
use lapin::PublisherConfirm;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::broker::{Link, backoff};
use crate::config::AmqpSettings;
use crate::envelope::Envelope;
use crate::metrics::Metrics;
use crate::publish::{PublishError, confirm_channel, outcome, send};
use crate::spool::{Spool, SpoolError};

/// How often `drain_until` looks at the spool depth.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Why a pass over the spool ended.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
}

impl From<lapin::Error> for PassError {
    fn from(e: lapin::Error) -> Self {
        PassError::Publish(PublishError::Broker(e))
    }
}

/// What the forwarder needs to know about the broker side.
#[derive(Clone)]
struct Target {
    exchange: String,
    window: usize,
    publish_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
}

/// Handle to the running forwarder task.
pub struct Forwarder {
    spool: Spool,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Forwarder {
    /// Starts forwarding whatever the spool holds, then whatever arrives.
    pub fn start(
        spool: Spool,
        link: Link,
        amqp: &AmqpSettings,
        metrics: Arc<Metrics>,
    ) -> Forwarder {
        let target = Target {
            exchange: amqp.exchange.clone(),
            window: amqp.max_unconfirmed,
            publish_timeout: Duration::from_millis(amqp.publish_timeout_ms),
            retry_initial: Duration::from_millis(amqp.reconnect_initial_ms),
            retry_max: Duration::from_millis(amqp.reconnect_max_ms),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(spool.clone(), link, target, metrics, stop.clone()));
        Forwarder { spool, stop, task }
    }

    /// Keeps forwarding until the spool is empty or `deadline` passes, then stops.
    /// Whatever is left stays in the spool for the next start.
    pub async fn drain_until(self, deadline: Instant) {
        while self.spool.stats().events > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn run(
    spool: Spool,
    link: Link,
    target: Target,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let connection = tokio::select! {
            c = link.connected() => c,
            () = stop.cancelled() => return,
        };
        let channel = match confirm_channel(&connection).await {
            Ok(channel) => channel,
            Err(e) => {
                failures = failures.saturating_add(1);
                warn!(error = %e, "cannot open a publishing channel");
                if pause(
                    &stop,
                    backoff(target.retry_initial, target.retry_max, failures),
                )
                .await
                {
                    return;
                }
                continue;
            }
        };
        let result = tokio::select! {
            r = pass(&spool, &channel, &target, &metrics, &mut failures) => r,
            () = stop.cancelled() => return,
        };
        // A channel that failed once may keep failing (e.g. nacking after a node
        // loss) while a fresh one works: never reuse it.
        tokio::spawn(async move {
            let _ = channel
                .close(200, "republishing on a fresh channel".into())
                .await;
        });
        failures = failures.saturating_add(1);
        let delay = match &result {
            PassError::Publish(PublishError::Returned { code, text }) => {
                warn!(code, text = %text, "broker returned an event as unroutable; it stays in the spool and is retried (check the exchange bindings or its alternate exchange)");
                backoff(target.retry_initial, target.retry_max, failures)
            }
            PassError::Publish(PublishError::Nacked) => {
                warn!(
                    "broker nacked an event; republishing from the oldest unconfirmed on a fresh channel"
                );
                Duration::ZERO
            }
            PassError::Spool(e) => {
                error!(error = %e, "cannot read the spool");
                backoff(target.retry_initial, target.retry_max, failures)
            }
            other => {
                warn!(error = %other, "publishing interrupted; republishing from the oldest unconfirmed");
                backoff(target.retry_initial, target.retry_max, failures.min(3))
            }
        };
        if pause(&stop, delay).await {
            return;
        }
    }
}

/// Sleeps; true if stopped meanwhile.
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stop.cancelled() => true,
    }
}

/// One publishing pass on one channel, from the oldest spooled event on; ends only on failure.
async fn pass(
    spool: &Spool,
    channel: &Channel,
    target: &Target,
    metrics: &Metrics,
    failures: &mut u32,
) -> PassError {
    match pass_inner(spool, channel, target, metrics, failures).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn pass_inner(
    spool: &Spool,
    channel: &Channel,
    target: &Target,
    metrics: &Metrics,
    failures: &mut u32,
) -> Result<std::convert::Infallible, PassError> {
    let mut cursor: Option<u64> = None;
    // A spool reopen after a disk error can bring back removed records below the
    // cursor; a new pass from the oldest picks them up.
    let reopens = spool.stats().reopens;
    let mut in_flight: VecDeque<(u64, Instant, PublisherConfirm)> =
        VecDeque::with_capacity(target.window);
    let mut delivered = Vec::with_capacity(target.window);
    loop {
        // Fill the window with the next events in order.
        if in_flight.len() < target.window {
            let batch = spool
                .read_after(cursor, target.window - in_flight.len())
                .await?;
            if batch.is_empty() && in_flight.is_empty() {
                spool.wait_for_new(cursor).await?;
                continue;
            }
            for (seq, record) in batch {
                cursor = Some(seq);
                let envelope = match Envelope::decode(record) {
                    Ok(envelope) => envelope,
                    Err(e) => {
                        // Only a bug or a foreign file gets here; keeping it would block every later event.
                        error!(seq, error = %e, "dropping an undecodable spool record");
                        delivered.push(seq);
                        continue;
                    }
                };
                let confirm = send(channel, &target.exchange, &envelope).await?;
                in_flight.push_back((seq, Instant::now(), confirm));
            }
        }
        // Wait for the oldest confirm, then take every confirm already there.
        if let Some((seq, sent_at, confirm)) = in_flight.pop_front() {
            let left = target.publish_timeout.saturating_sub(sent_at.elapsed());
            let confirmation = tokio::time::timeout(left, confirm)
                .await
                .map_err(|_| PublishError::Timeout(target.publish_timeout))??;
            outcome(confirmation, metrics)?;
            metrics
                .publish_confirm
                .observe(sent_at.elapsed().as_secs_f64());
            delivered.push(seq);
        }
        while let Some((_, _, confirm)) = in_flight.front_mut() {
            let Some(confirmation) = confirm.now_or_never() else {
                break;
            };
            let Some((seq, sent_at, _)) = in_flight.pop_front() else {
                break;
            };
            outcome(confirmation?, metrics)?;
            metrics
                .publish_confirm
                .observe(sent_at.elapsed().as_secs_f64());
            delivered.push(seq);
        }
        if !delivered.is_empty() {
            if *failures > 0 {
                info!("forwarding again");
                *failures = 0;
            }
            spool.remove(std::mem::take(&mut delivered)).await?;
        }
        if spool.stats().reopens != reopens {
            return Err(PassError::Spool(SpoolError::Closed));
        }
    }
}
