//! Moves spooled events to the broker and removes each only after a plain ack.
//!
//! Events are read from the spool oldest first into per-routing-key lanes. Each
//! lane has at most one unconfirmed publish: the next event of a key is
//! published only after the previous one was acked, so a nack or a return can
//! never let a later event of the same reference overtake an earlier one.
//! Lanes of different keys publish side by side, up to `amqp.max_unconfirmed`
//! events held at once, so varied references keep the pipeline full, and up to
//! [`READ_BUDGET_BYTES`] of them in bytes, so large archives waiting in the spool
//! are not all read into memory at once.
//!
//! A refused lane (nack or return) waits with capped exponential backoff that
//! resets after its next ack; a nack also retires the channel once its other
//! confirms are in (a channel that nacked can keep nacking). A lost channel or
//! a confirm timeout republishes every lane's head on a fresh channel. Either
//! way a consumer may see a duplicate, never a gap or an inversion.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::Channel;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{error, info, warn};

use crate::amqp::link::{Link, backoff};
use crate::amqp::message::{
    SendOrder, Tracked, Verdict, confirm_channel, returned_key, send_traced, settled, sleep_until,
};
use crate::config::AmqpSettings;
use crate::event::envelope::Envelope;
use crate::ops::metrics::Metrics;
use crate::spool::{Spool, SpoolError};
use crate::trace::Telemetry;
use crate::trace::export::{PublishTarget, Span, end};

/// How often `drain_until` looks at the spool depth.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Why a pass over one channel ended.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("no confirm within {0:?}")]
    Timeout(Duration),
    #[error("the channel nacked; replacing it")]
    Nacked,
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("the spool was reopened; reading it again from the oldest event")]
    Reopened,
    #[error("stopped")]
    Stopped,
}

/// Bytes of records the forwarder holds at once (read and not yet delivered); past
/// it, it reads no more until some are delivered. One record is read whatever its size.
const READ_BUDGET_BYTES: usize = 64 << 20;

/// What the forwarder needs to know about the broker side.
#[derive(Clone)]
struct Target {
    exchange: String,
    window: usize,
    publish_timeout: Duration,
    retry_initial: Duration,
    retry_max: Duration,
    /// A `publish` span per publish when exporting.
    telemetry: Telemetry,
}

/// Handle to the running forwarder task.
pub struct Forwarder {
    spool: Spool,
    stop: CancellationToken,
}

impl Forwarder {
    /// Starts forwarding whatever the spool holds, then whatever arrives, until
    /// `stop` is cancelled; the handle is the task, for its supervisor.
    pub fn start(
        spool: Spool,
        link: Link,
        amqp: &AmqpSettings,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> (Forwarder, JoinHandle<()>) {
        Self::start_traced(spool, link, amqp, metrics, Telemetry::default(), stop)
    }

    /// [`Forwarder::start`], each publish a span of `telemetry` when it exports.
    pub(crate) fn start_traced(
        spool: Spool,
        link: Link,
        amqp: &AmqpSettings,
        metrics: Arc<Metrics>,
        telemetry: Telemetry,
        stop: CancellationToken,
    ) -> (Forwarder, JoinHandle<()>) {
        let target = Target {
            exchange: amqp.exchange.clone(),
            window: amqp.max_unconfirmed,
            publish_timeout: amqp.publish_timeout(),
            retry_initial: amqp.reconnect_initial(),
            retry_max: amqp.reconnect_max(),
            telemetry,
        };
        let task = tokio::spawn(run(spool.clone(), link, target, metrics, stop.clone()));
        (Forwarder { spool, stop }, task)
    }

    /// Keeps forwarding until the spool is empty or `deadline` passes, then stops.
    /// Whatever is left stays in the spool for the next start.
    pub async fn drain_until(&self, deadline: Instant) {
        while self.spool.stats().events > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
        self.stop.cancel();
    }
}

/// One routing key's events, oldest first; the head is the one being published.
struct Lane {
    key: Arc<str>,
    events: VecDeque<(u64, Envelope)>,
    state: LaneState,
    /// Refusals since the last ack, for the backoff.
    refusals: u32,
    /// A return for the head arrived (possibly on a neighbour's confirm).
    returned: Option<(u16, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneState {
    /// In the ready queue.
    Ready,
    /// Its head is published and unconfirmed.
    InFlight,
    /// Backing off after a refusal.
    Waiting,
}

/// Everything the forwarder holds between the spool and the broker. It outlives
/// channels: a new channel republishes the heads, nothing is read twice.
struct Lanes {
    lanes: HashMap<Arc<str>, Lane>,
    ready: VecDeque<Arc<str>>,
    waiting: DelayQueue<Arc<str>>,
    /// Publishes in flight on the current channel: seq -> (key, sent at, its span).
    in_flight: HashMap<u64, (Arc<str>, Instant, Option<Span>)>,
    /// Seqs in send order, to find the oldest unconfirmed one.
    sent: SendOrder,
    /// Events read from the spool and not yet handed back to it for removal.
    held: usize,
    /// Bytes of the bodies of the `held` events.
    held_bytes: usize,
    /// Highest seq read from the spool.
    cursor: Option<u64>,
    /// Acked events not yet removed from the spool. Kept across passes: the cursor is
    /// past them, so one dropped here would stay in the spool until a restart.
    delivered: Vec<u64>,
}

impl Lanes {
    fn new() -> Self {
        Lanes {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            waiting: DelayQueue::new(),
            in_flight: HashMap::new(),
            sent: SendOrder::default(),
            held: 0,
            held_bytes: 0,
            cursor: None,
            delivered: Vec::new(),
        }
    }

    /// Adds an event read from the spool behind the others of its key.
    fn push(&mut self, seq: u64, envelope: Envelope) {
        self.cursor = Some(seq);
        self.held += 1;
        self.held_bytes = self.held_bytes.saturating_add(envelope.body.len());
        match self.lanes.get_mut(envelope.routing_key.as_str()) {
            Some(lane) => lane.events.push_back((seq, envelope)),
            None => {
                let key: Arc<str> = Arc::from(envelope.routing_key.as_str());
                let mut events = VecDeque::with_capacity(1);
                events.push_back((seq, envelope));
                self.lanes.insert(
                    key.clone(),
                    Lane {
                        key: key.clone(),
                        events,
                        state: LaneState::Ready,
                        refusals: 0,
                        returned: None,
                    },
                );
                self.ready.push_back(key);
            }
        }
    }

    /// Whether more may be read: fewer than `window` events and [`READ_BUDGET_BYTES`] held.
    fn has_room(&self, window: usize) -> bool {
        self.held < window && self.held_bytes < READ_BUDGET_BYTES
    }

    /// After a channel is lost: every head in flight goes back to ready.
    fn channel_lost(&mut self) {
        for (_, (key, _, span)) in self.in_flight.drain() {
            end(span, Some("channel lost"));
            if let Some(lane) = self.lanes.get_mut(&key) {
                lane.state = LaneState::Ready;
                lane.returned = None;
                self.ready.push_back(key);
            }
        }
        self.sent.clear();
    }

    fn oldest_unconfirmed(&mut self) -> Option<Instant> {
        let in_flight = &self.in_flight;
        self.sent.oldest(|seq| in_flight.contains_key(&seq))
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
    let mut lanes = Lanes::new();
    let mut reopens = spool.stats().reopens;
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
        let mut pass = Pass {
            spool: &spool,
            channel: &channel,
            target: &target,
            metrics: &metrics,
            lanes: &mut lanes,
            failures: &mut failures,
            reopens,
        };
        let result = tokio::select! {
            r = pass.run(&stop) => r,
            // A publish blocked by the broker (an alarm) must not hold up a stop.
            () = stop.cancelled() => PassError::Stopped,
        };
        // Never reuse a channel that failed or nacked.
        tokio::spawn(async move {
            let _ = channel
                .close(200, "republishing on a fresh channel".into())
                .await;
        });
        lanes.channel_lost();
        let delay = match &result {
            PassError::Stopped => return,
            PassError::Nacked => Duration::ZERO,
            PassError::Reopened => {
                lanes = Lanes::new();
                reopens = spool.stats().reopens;
                Duration::ZERO
            }
            PassError::Spool(e) => {
                failures = failures.saturating_add(1);
                error!(error = %e, "cannot read the spool");
                backoff(target.retry_initial, target.retry_max, failures)
            }
            other => {
                failures = failures.saturating_add(1);
                warn!(error = %other, "publishing interrupted; republishing the unconfirmed events on a fresh channel");
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

/// Publishing on one channel until it fails.
struct Pass<'a> {
    spool: &'a Spool,
    channel: &'a Channel,
    target: &'a Target,
    metrics: &'a Metrics,
    lanes: &'a mut Lanes,
    failures: &'a mut u32,
    reopens: u64,
}

impl Pass<'_> {
    async fn run(&mut self, stop: &CancellationToken) -> PassError {
        let mut confirms: FuturesUnordered<Tracked<u64>> = FuturesUnordered::new();
        let mut batch = Vec::new();
        // The spool has nothing past the cursor as of `known_last`.
        let mut exhausted = false;
        let mut known_last = 0u64;
        let mut nacked = false;
        loop {
            if self.spool.stats().reopens != self.reopens {
                return PassError::Reopened;
            }
            // Read more while there is room.
            if !exhausted && self.lanes.has_room(self.target.window) {
                let last = self.spool.stats().last_seq.unwrap_or(0);
                let room = self.target.window - self.lanes.held;
                let room_bytes = READ_BUDGET_BYTES - self.lanes.held_bytes;
                let read = self
                    .spool
                    .read_after_within(self.lanes.cursor, room, room_bytes);
                let read = match read.await {
                    Ok(read) => read,
                    Err(e) => return e.into(),
                };
                let read_bytes = read.iter().map(|(_, r)| r.len()).sum::<usize>();
                // Short of both limits: the spool had no more.
                if read.len() < room && read_bytes < room_bytes {
                    exhausted = true;
                    known_last = last.max(self.lanes.cursor.unwrap_or(0));
                }
                for (seq, record) in read {
                    match Envelope::decode(record) {
                        Ok(envelope) => self.lanes.push(seq, envelope),
                        Err(e) => {
                            // Only a bug or a foreign file gets here; keeping it would block its key.
                            error!(seq, error = %e, "dropping an undecodable spool record");
                            self.lanes.cursor = Some(seq);
                            self.lanes.held += 1;
                            self.lanes.delivered.push(seq);
                        }
                    }
                }
            }
            // Publish the head of every ready lane.
            while !nacked && let Some(key) = self.lanes.ready.pop_front() {
                let Some(lane) = self.lanes.lanes.get_mut(&key) else {
                    continue;
                };
                let Some((seq, envelope)) = lane.events.front() else {
                    continue;
                };
                if crate::fault::armed("forwarder.panic").is_some() {
                    panic!("fault injected: forwarder.panic");
                }
                let exchange = self.target.exchange.as_str();
                let (span, own) = match self.target.telemetry.publish(
                    envelope.trace.as_ref(),
                    &PublishTarget {
                        exchange,
                        routing_key: &envelope.routing_key,
                        message_id: &envelope.message_id,
                    },
                ) {
                    Some((span, own)) => (Some(span), Some(own)),
                    None => (None, None),
                };
                let sent = send_traced(self.channel, exchange, envelope, own.as_ref()).await;
                let confirm = match sent {
                    Ok(confirm) => confirm,
                    Err(e) => {
                        end(span, Some("broker error"));
                        self.lanes.ready.push_front(key);
                        return e.into();
                    }
                };
                lane.state = LaneState::InFlight;
                let now = Instant::now();
                confirms.push(Tracked::new(*seq, confirm));
                self.lanes.sent.push(now, *seq);
                self.lanes.in_flight.insert(*seq, (key, now, span));
            }
            if !self.lanes.delivered.is_empty() {
                if crate::fault::once("forwarder.channel_lost_before_remove") {
                    // As a connection lost between an ack and its removal.
                    warn!("fault injected: forwarder.channel_lost_before_remove");
                    return PassError::Timeout(Duration::ZERO);
                }
                let removed = self.lanes.delivered.len();
                // Not waited for: a failed commit reopens the spool, which wakes this
                // pass, and the next reads it again from the oldest event, so these
                // come back as duplicates.
                if let Err(e) = self.spool.remove_soon(&mut self.lanes.delivered) {
                    return e.into();
                }
                self.lanes.held = self.lanes.held.saturating_sub(removed);
                continue;
            }
            if nacked && confirms.is_empty() {
                return PassError::Nacked;
            }
            let stalled_at = self
                .lanes
                .oldest_unconfirmed()
                .map(|at| at + self.target.publish_timeout);
            let can_read = exhausted && self.lanes.has_room(self.target.window);
            tokio::select! {
                () = stop.cancelled() => return PassError::Stopped,
                () = settled(&mut confirms, &mut batch), if !confirms.is_empty() => {
                    nacked |= self.judge(&mut batch);
                }
                Some(expired) = self.lanes.waiting.next(), if !self.lanes.waiting.is_empty() => {
                    let key = expired.into_inner();
                    if let Some(lane) = self.lanes.lanes.get_mut(&key) {
                        lane.state = LaneState::Ready;
                        self.lanes.ready.push_back(key);
                    }
                }
                r = self.spool.wait_for_new(Some(known_last), self.reopens), if can_read => {
                    if let Err(e) = r {
                        return e.into();
                    }
                    exhausted = false;
                }
                () = sleep_until(stalled_at), if stalled_at.is_some() => {
                    return PassError::Timeout(self.target.publish_timeout);
                }
            }
        }
    }

    /// Settles a batch of resolved confirms: returns first, then each verdict.
    /// True if the broker nacked (the channel must be replaced).
    fn judge(&mut self, batch: &mut Vec<(u64, Result<lapin::Confirmation, lapin::Error>)>) -> bool {
        for (_, confirmation) in batch.iter() {
            let Some(returned) = returned_key(confirmation) else {
                continue;
            };
            // At most one publish per key is in flight: the key names it.
            if let Some(lane) = self.lanes.lanes.get_mut(returned.routing_key)
                && lane.state == LaneState::InFlight
            {
                lane.returned = Some((returned.code, returned.text.to_string()));
            }
        }
        let mut nacked = false;
        for (seq, confirmation) in batch.drain(..) {
            let Some((key, sent_at, span)) = self.lanes.in_flight.remove(&seq) else {
                continue;
            };
            let Some(lane) = self.lanes.lanes.get_mut(&key) else {
                continue;
            };
            let verdict = Verdict::of(confirmation, lane.returned.take(), self.metrics);
            end(span, verdict.failure());
            match verdict {
                Verdict::Delivered => {
                    self.metrics
                        .publish_confirm
                        .observe(sent_at.elapsed().as_secs_f64());
                    if *self.failures > 0 {
                        info!("forwarding again");
                        *self.failures = 0;
                    }
                    if let Some((_, envelope)) = lane.events.pop_front() {
                        let len = envelope.body.len();
                        self.lanes.held_bytes = self.lanes.held_bytes.saturating_sub(len);
                    }
                    lane.refusals = 0;
                    self.lanes.delivered.push(seq);
                    if lane.events.is_empty() {
                        self.lanes.lanes.remove(&key);
                    } else {
                        lane.state = LaneState::Ready;
                        self.lanes.ready.push_back(key);
                    }
                }
                Verdict::Failed(e) => {
                    // The channel is gone; the pass ends on the next send or timeout.
                    warn!(error = %e, "publish failed");
                    lane.state = LaneState::Ready;
                    self.lanes.ready.push_back(key);
                    nacked = true;
                }
                refused => {
                    lane.refusals = lane.refusals.saturating_add(1);
                    let delay = backoff(
                        self.target.retry_initial,
                        self.target.retry_max,
                        lane.refusals,
                    );
                    match &refused {
                        Verdict::Returned { code, text } => warn!(
                            routing_key = %lane.key, code, text = %text, retry_in = ?delay,
                            "broker returned an event as unroutable; it stays in the spool (check the bindings or the alternate exchange)"
                        ),
                        _ => {
                            nacked = true;
                            warn!(routing_key = %lane.key, retry_in = ?delay, "broker nacked an event; republishing it on a fresh channel");
                        }
                    }
                    lane.state = LaneState::Waiting;
                    self.lanes.waiting.insert(key, delay);
                }
            }
        }
        nacked
    }
}
