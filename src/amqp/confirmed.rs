//! `confirmed` mode: each request's event is published and the request is
//! answered only once the broker has acked that very publish with no return.
//!
//! One task owns the channel and every confirm on it, so that it sees every
//! confirm as soon as lapin resolves it. That is what lets it match a
//! `basic.return` to its own publish by the message (see [`settled`]): were
//! confirms awaited by the requests themselves, a return lapin attached to a
//! neighbour's confirm could be missed and an unroutable event answered "0".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use lapin::{BasicProperties, Channel};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::amqp::link::Link;
use crate::amqp::message::{
    PublishError, SendOrder, Tracked, Verdict, confirm_channel, properties, returned_key, settled,
    sleep_until,
};
use crate::event::envelope::Envelope;
use crate::ops::metrics::Metrics;

/// Requests queued for the publishing task before senders wait.
const QUEUE: usize = 1024;

/// One request's publish, handed to the publishing task.
struct Job {
    routing_key: String,
    message_id: String,
    body: bytes::Bytes,
    properties: BasicProperties,
    /// After this the caller has given up: do not publish.
    deadline: Instant,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

/// Publishes events and waits for their own confirm; cheap to share.
pub struct DirectPublisher {
    jobs: mpsc::Sender<Job>,
    link: Link,
    timeout: Duration,
    /// Where it publishes, for the attributes of a `publish` span.
    exchange: String,
}

impl DirectPublisher {
    /// Starts the publishing task on `link`; it runs until `stop` is cancelled.
    /// `timeout` bounds each publish from the request to its confirm.
    pub(crate) fn start(
        link: Link,
        exchange: String,
        timeout: Duration,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (DirectPublisher, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = Dispatcher {
            link: link.clone(),
            exchange: exchange.clone(),
            timeout,
            metrics,
            channel: None,
            poisoned: false,
            in_flight: FuturesUnordered::new(),
            pending: HashMap::new(),
            sent: SendOrder::default(),
            next_id: 0,
        };
        let handle = tokio::spawn(task.run(rx, stop));
        (
            DirectPublisher {
                jobs: tx,
                link,
                timeout,
                exchange,
            },
            handle,
        )
    }

    /// The exchange it publishes to.
    pub(crate) fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Publishes and waits for a plain ack of this publish, at most the publish timeout.
    pub(crate) async fn publish(&self, envelope: &Envelope) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.timeout;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            routing_key: envelope.routing_key.clone(),
            message_id: envelope.message_id.clone(),
            body: envelope.body.clone(),
            properties: properties(envelope, None),
            deadline,
            reply,
        };
        let attempt = async {
            self.jobs
                .send(job)
                .await
                .map_err(|_| PublishError::Unreachable)?;
            answer.await.unwrap_or(Err(PublishError::Unreachable))
        };
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(result) => result,
            Err(_) if self.link.connection().is_none() => Err(PublishError::Unreachable),
            Err(_) => Err(PublishError::Timeout(self.timeout)),
        }
    }
}

/// A publish waiting for its confirm.
struct Pending {
    message_id: String,
    routing_key: String,
    sent_at: Instant,
    /// Set when a return for this message arrived (on any confirm).
    returned: Option<(u16, String)>,
    reply: oneshot::Sender<Result<(), PublishError>>,
}

/// The task that owns the channel and its confirms.
struct Dispatcher {
    link: Link,
    exchange: String,
    timeout: Duration,
    metrics: Arc<Metrics>,
    channel: Option<Channel>,
    /// The channel nacked or stalled: publish nothing more on it, replace it once
    /// its confirms are in (a channel that nacked can go on nacking).
    poisoned: bool,
    in_flight: FuturesUnordered<Tracked<u64>>,
    pending: HashMap<u64, Pending>,
    /// Publish ids in send order, to find the oldest unconfirmed one.
    sent: SendOrder,
    next_id: u64,
}

impl Dispatcher {
    async fn run(mut self, mut jobs: mpsc::Receiver<Job>, stop: CancellationToken) {
        let mut batch = Vec::new();
        loop {
            let pending = &self.pending;
            let stalled_at = self
                .sent
                .oldest(|id| pending.contains_key(&id))
                .map(|at| at + self.timeout);
            tokio::select! {
                () = stop.cancelled() => break,
                job = jobs.recv(), if !self.poisoned => match job {
                    Some(job) => self.publish(job).await,
                    None => break,
                },
                () = settled(&mut self.in_flight, &mut batch), if !self.in_flight.is_empty() => {
                    self.judge(&mut batch);
                }
                () = sleep_until(stalled_at), if stalled_at.is_some() => {
                    warn!(timeout = ?self.timeout, "no confirm in time; replacing the publishing channel");
                    self.poisoned = true;
                    self.close_channel();
                }
            }
            if self.poisoned && self.in_flight.is_empty() {
                self.close_channel();
                self.poisoned = false;
            }
        }
        for (_, pending) in self.pending.drain() {
            let _ = pending.reply.send(Err(PublishError::Unreachable));
        }
        self.close_channel();
    }

    fn close_channel(&mut self) {
        if let Some(channel) = self.channel.take() {
            // Closing fails every confirm still open on it, which settles their requests.
            tokio::spawn(async move {
                let _ = channel.close(200, "replacing the channel".into()).await;
            });
        }
    }

    async fn channel(&mut self, deadline: Instant) -> Result<Channel, PublishError> {
        if let Some(channel) = self.channel.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        // Rides out a reconnect within the request's time instead of failing at once.
        let connection = match self.link.connection() {
            Some(connection) => connection,
            None => tokio::time::timeout_at(deadline, self.link.connected())
                .await
                .map_err(|_| PublishError::Unreachable)?,
        };
        let channel = tokio::time::timeout_at(deadline, confirm_channel(&connection))
            .await
            .map_err(|_| PublishError::Timeout(self.timeout))??;
        self.channel = Some(channel.clone());
        Ok(channel)
    }

    async fn publish(&mut self, job: Job) {
        if Instant::now() >= job.deadline || job.reply.is_closed() {
            return;
        }
        let channel = match self.channel(job.deadline).await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = job.reply.send(Err(e));
                return;
            }
        };
        let sent = channel
            .basic_publish(
                self.exchange.as_str().into(),
                job.routing_key.as_str().into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &job.body,
                job.properties,
            )
            .await;
        match sent {
            Ok(confirm) => {
                let id = self.next_id;
                self.next_id += 1;
                let now = Instant::now();
                self.in_flight.push(Tracked::new(id, confirm));
                self.sent.push(now, id);
                self.pending.insert(
                    id,
                    Pending {
                        message_id: job.message_id,
                        routing_key: job.routing_key,
                        sent_at: now,
                        returned: None,
                        reply: job.reply,
                    },
                );
            }
            Err(e) => {
                self.close_channel();
                let _ = job.reply.send(Err(PublishError::Broker(e)));
            }
        }
    }

    /// Answers every request of a batch of resolved confirms, returns matched first.
    fn judge(&mut self, batch: &mut Vec<(u64, Result<lapin::Confirmation, lapin::Error>)>) {
        for (_, confirmation) in batch.iter() {
            let Some(returned) = returned_key(confirmation) else {
                continue;
            };
            let mut matched = false;
            // Message ids are unique among publishes in flight (dedup holds
            // concurrent copies back); should two match anyway, both count as
            // returned: a 503 and a retry, never a loss.
            for pending in self.pending.values_mut() {
                if pending.routing_key == returned.routing_key
                    && returned
                        .message_id
                        .is_none_or(|id| id == pending.message_id)
                {
                    pending.returned = Some((returned.code, returned.text.to_string()));
                    matched = true;
                }
            }
            if !matched {
                debug!(
                    routing_key = returned.routing_key,
                    "a return matched no publish in flight"
                );
            }
        }
        for (id, confirmation) in batch.drain(..) {
            let Some(mut pending) = self.pending.remove(&id) else {
                continue;
            };
            let verdict = Verdict::of(confirmation, pending.returned.take(), &self.metrics);
            match &verdict {
                Verdict::Delivered => self
                    .metrics
                    .publish_confirm
                    .observe(pending.sent_at.elapsed().as_secs_f64()),
                Verdict::Nacked | Verdict::Failed(_) => self.poisoned = true,
                Verdict::Returned { .. } => {}
            }
            let _ = pending.reply.send(verdict.into_error().map_or(Ok(()), Err));
        }
    }
}
