//! A consumer of the events cellosign-bridge publishes to RabbitMQ: copy it to
//! start your own, and replace `handle`.
//!
//! Delivery is at least once and ordered per session reference, so this
//! consumer acks manually, dedups by `message_id`, handles one delivery at a
//! time (keeps the order), retries in place (keeps it too), stops gracefully.
//!
//! Environment (all optional):
//! - `AMQP_ADDR`: broker URI, default `amqp://guest:guest@127.0.0.1:5672/%2f`
//! - `QUEUE`: queue to consume, default `cellosign.sessions`
//! - `PARTITIONS=N` and `WORKER=i` (for the bridge's `amqp.partitions = N`):
//!   consume `cellosign.events.p{i}` instead, one partition per worker: the
//!   way to scale out in order. A partition has a single active consumer: a
//!   second worker on it is a hot standby.
//! - `PREFETCH`: deliveries the broker may send ahead of our acks, default 32
//!
//! Option `--from first|last|next|<offset>|<RFC 3339 time>`: read `QUEUE` as a
//! stream (an `[[amqp.queues]]` entry of `type = "stream"`) from that point of
//! its history, e.g. to rebuild a read model from `first`. A stream keeps its
//! messages: acking only moves us on, a failed message cannot be requeued, so
//! this consumer skips a permanent failure and stops on a transient one, naming
//! the offset to restart `--from`. Keep your own last handled offset to resume.
//!
//! A body too large for one message (an archive over the bridge's
//! `amqp.max_message_bytes`) arrives claim-checked: header `x-claim-check: true`
//! and a small document `{"claim_check": {"url", "sha256", "bytes"}, "event",
//! "session"}`. `fetch_claimed` reads the body back from the `url` (`file://`
//! on a shared volume, or `s3://` with AWS credentials from the environment the
//! usual way) and checks its SHA-256 before `handle` sees it.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Write};
use std::{env, fmt, str::FromStr, time::Duration};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use object_store::ObjectStoreExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

/// Message ids remembered for dedup; redeliveries come soon after the original.
const RECENT_IDS: usize = 10_000;
/// Tries of one delivery in place, with backoff, before handing it back.
const ATTEMPTS: u32 = 5;

/// Why `handle` failed; it decides what happens to the message.
enum HandleError {
    /// Can never succeed (e.g. body not JSON): reject, don't requeue.
    Permanent(String),
    /// May succeed later (database down, timeout): retry.
    Transient(String),
}

/// Your business logic: replace the body. Redeliveries that dedup misses
/// (after a restart) come here again, so make the effect idempotent.
fn handle(event: &Value, props: &BasicProperties) -> Result<(), HandleError> {
    // An archive (WHP_ARCHIVE) may carry an array of sessions, all of one reference.
    let first = match &event["session"] {
        Value::Array(sessions) => sessions.first().unwrap_or(&Value::Null),
        session => session,
    };
    let (Some(kind), Some(session), Some(reference)) = (
        event["event"]["type"].as_str(),
        first["id"].as_str(),
        first["reference"].as_str(),
    ) else {
        return Err(HandleError::Permanent(
            "missing event or session fields".into(),
        ));
    };
    let transaction = &first["transaction_number"];
    let received_at = header(props, "x-received-at").unwrap_or("-");
    // Stands in for your effect (a database write, an API call), whose I/O
    // errors are transient: worth retrying.
    writeln!(
        io::stdout(),
        "{kind} session={session} reference={reference} transaction_number={transaction} received_at={received_at}"
    )
    .map_err(|e| HandleError::Transient(format!("stdout: {e}")))
}

/// The event a delivery carries: its body, or, for a claim check (header
/// `x-claim-check: true`), the stored body fetched from the document's `url`,
/// checked against its `sha256` and `bytes`. Consumers that need only `event` and
/// `session` (routing, filtering) can use the document as is and skip the fetch.
async fn event_of(data: &[u8], props: &BasicProperties) -> Result<Value, HandleError> {
    let doc: Value = serde_json::from_slice(data)
        .map_err(|e| HandleError::Permanent(format!("body is not JSON: {e}")))?;
    let claimed = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-claim-check").cloned());
    if claimed != Some(AMQPValue::Boolean(true)) {
        return Ok(doc);
    }
    let check = &doc["claim_check"];
    let (Some(url), Some(sha256), Some(bytes)) = (
        check["url"].as_str(),
        check["sha256"].as_str(),
        check["bytes"].as_u64(),
    ) else {
        return Err(HandleError::Permanent(
            "claim_check without url, sha256, bytes".into(),
        ));
    };
    let body = fetch_claimed(url).await?;
    let digest: String = Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != sha256 || body.len() as u64 != bytes {
        // Not what the bridge stored (overwritten, truncated copy): never handle it.
        return Err(HandleError::Permanent(format!(
            "{url}: sha256 or size mismatch"
        )));
    }
    serde_json::from_slice(&body)
        .map_err(|e| HandleError::Permanent(format!("{url}: stored body is not JSON: {e}")))
}

/// Reads a claim-checked body from the store the bridge wrote it to. A store that
/// cannot be read now (S3 down, volume not mounted) is a transient failure.
async fn fetch_claimed(url: &str) -> Result<bytes::Bytes, HandleError> {
    let parsed = url::Url::parse(url)
        .map_err(|e| HandleError::Permanent(format!("claim_check.url {url:?}: {e}")))?;
    match parsed.scheme() {
        // The bridge's archive.store_url = "file:///dir": the same directory, shared
        // with (or copied to) this host.
        "file" => {
            let path = parsed
                .to_file_path()
                .map_err(|()| HandleError::Permanent(format!("{url}: not a local path")))?;
            tokio::fs::read(&path)
                .await
                .map(bytes::Bytes::from)
                .map_err(|e| HandleError::Transient(format!("{url}: {e}")))
        }
        // archive.store_url = "s3://bucket/prefix": needs s3:GetObject on the bucket,
        // credentials and region from AWS_* variables or the instance role. A real
        // consumer builds the client once, not per message.
        "s3" => {
            let transient = |e: object_store::Error| HandleError::Transient(format!("{url}: {e}"));
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map_err(transient)?;
            let key = object_store::path::Path::parse(parsed.path().trim_start_matches('/'))
                .map_err(|e| HandleError::Permanent(format!("{url}: {e}")))?;
            store
                .get(&key)
                .await
                .map_err(transient)?
                .bytes()
                .await
                .map_err(transient)
        }
        other => Err(HandleError::Permanent(format!(
            "{url}: unsupported scheme {other}"
        ))),
    }
}

/// A string header the bridge sets (`x-event-type`, `x-received-at`, ...).
fn header<'a>(props: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        _ => None,
    }
}

/// Recently handled message ids, oldest forgotten first. A demo only: it is
/// lost on restart and not shared (a standby taking over starts empty). Real
/// consumers dedup in their own store, e.g. a unique constraint on message_id
/// in their database, written in the same transaction as the effect.
#[derive(Default)]
struct RecentIds {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl RecentIds {
    fn insert(&mut self, id: &str) {
        if !id.is_empty() && self.ids.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            if self.order.len() > RECENT_IDS
                && let Some(oldest) = self.order.pop_front()
            {
                self.ids.remove(&oldest);
            }
        }
    }
}

/// The offset RabbitMQ puts on each delivery from a stream (header
/// `x-stream-offset`); `None` from any other queue.
fn stream_offset(props: &BasicProperties) -> Option<i64> {
    match props.headers().as_ref()?.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Settles one delivery with exactly one ack, reject or nack (only acks on a
/// stream, `offset` set: a stream takes no reject or nack). Errs when the channel
/// fails (the broker then redelivers what we did not ack), or on a stream when a
/// message cannot be handled now: stopping is the one way not to skip it.
async fn process(
    delivery: &Delivery,
    seen: &mut RecentIds,
    offset: Option<i64>,
) -> Result<(), Fatal> {
    let props = &delivery.properties;
    let id = props.message_id().as_ref().map_or("", |id| id.as_str());
    if !id.is_empty() && seen.ids.contains(id) {
        info!(id, "duplicate, already handled: ack and skip");
        delivery.ack(BasicAckOptions::default()).await?;
        return Ok(());
    }
    // Retry in place: the deliveries behind this one wait, so the order per
    // reference holds through the failure (a claim-checked body's fetch included).
    let mut attempt = 1;
    let result = loop {
        let outcome = match event_of(&delivery.data, props).await {
            Ok(event) => handle(&event, props),
            Err(e) => Err(e),
        };
        match outcome {
            Err(HandleError::Transient(e)) if attempt < ATTEMPTS => {
                let backoff = Duration::from_millis(100 << attempt);
                warn!(id, attempt, ?backoff, "transient failure, retrying: {e}");
                tokio::time::sleep(backoff).await;
                attempt += 1;
            }
            outcome => break outcome,
        }
    };
    match (result, offset) {
        (Ok(()), _) => {
            // Remember before acking: if the ack is lost, the redelivery is
            // skipped rather than applied twice.
            seen.insert(id);
            delivery.ack(BasicAckOptions::default()).await?;
        }
        // The stream keeps it: move on, it can be read again from its offset.
        (Err(HandleError::Permanent(e)), Some(offset)) => {
            warn!(id, offset, "permanent failure, skipping: {e}");
            delivery.ack(BasicAckOptions::default()).await?;
        }
        // Unsettled: the stream keeps it for the restart.
        (Err(HandleError::Transient(e)), Some(offset)) => {
            return Err(Fatal(format!(
                "{id}: transient failure, giving up: {e}; restart with --from {offset}"
            )));
        }
        // Dropped, or dead-lettered if a queue policy sets a
        // dead-letter-exchange: set one to keep and inspect these.
        (Err(HandleError::Permanent(e)), None) => {
            warn!(id, "permanent failure, rejecting: {e}");
            let drop_it = BasicRejectOptions { requeue: false };
            delivery.reject(drop_it).await?;
        }
        // Last resort, as requeue breaks the order of this reference: later
        // events of it are already delivered (our prefetch, other consumers)
        // and get handled before the requeued one comes back. Quorum queues
        // before RabbitMQ 4.3 also count each requeue against their
        // delivery-limit (default 20 since 4.0), then drop or dead-letter the
        // message. So rather retry longer in place.
        (Err(HandleError::Transient(e)), None) => {
            warn!(id, "transient failure, giving up, requeueing: {e}");
            let requeue = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            delivery.nack(requeue).await?;
        }
    }
    Ok(())
}

/// Returns (AMQP_ADDR, queue, PREFETCH).
fn config() -> Result<(String, String, u16), String> {
    let addr = env::var("AMQP_ADDR");
    let addr = addr.unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefetch = parse_env("PREFETCH")?.unwrap_or(32);
    if prefetch == 0 {
        return Err("PREFETCH must be at least 1 (0 means unlimited)".into());
    }
    let partitions = parse_env::<u16>("PARTITIONS")?.filter(|&n| n > 0);
    let queue = match (partitions, env::var("QUEUE")) {
        (None, queue) => queue.unwrap_or_else(|_| "cellosign.sessions".into()),
        (Some(_), Ok(_)) => return Err("set QUEUE or PARTITIONS and WORKER, not both".into()),
        (Some(n), Err(_)) => match parse_env::<u16>("WORKER")? {
            Some(i) if i < n => format!("cellosign.events.p{i}"),
            _ => return Err(format!("with PARTITIONS={n}, set WORKER to 0..={}", n - 1)),
        },
    };
    Ok((addr, queue, prefetch))
}

/// `--from POINT` (or `--from=POINT`): the `x-stream-offset` to consume a
/// stream from, typed as RabbitMQ reads it: a string for `first`, `last`,
/// `next`, a long-long integer for an offset, a timestamp (whole seconds) for a time.
fn from_arg(mut args: impl Iterator<Item = String>) -> Result<Option<AMQPValue>, String> {
    let usage = "usage: consumer [--from first|last|next|<offset>|<RFC 3339 time>]";
    let point = match (args.next(), args.next(), args.next()) {
        (None, ..) => return Ok(None),
        (Some(flag), Some(point), None) if flag == "--from" => point,
        (Some(flag), None, None) if flag.starts_with("--from=") => flag["--from=".len()..].into(),
        _ => return Err(usage.into()),
    };
    let value = match point.as_str() {
        "first" | "last" | "next" => AMQPValue::LongString(point.as_str().into()),
        _ if !point.is_empty() && point.bytes().all(|b| b.is_ascii_digit()) => {
            AMQPValue::LongLongInt(point.parse().map_err(|e| format!("--from {point}: {e}"))?)
        }
        _ => {
            let time = chrono::DateTime::parse_from_rfc3339(&point)
                .map_err(|e| format!("--from {point:?}: {e}; {usage}"))?;
            let secs = u64::try_from(time.timestamp())
                .map_err(|_| format!("--from {point}: before 1970"))?;
            AMQPValue::Timestamp(secs)
        }
    };
    Ok(Some(value))
}

fn parse_env<T: FromStr<Err: fmt::Display>>(name: &str) -> Result<Option<T>, String> {
    let parse = |value: String| value.parse().map_err(|e| format!("{name}={value:?}: {e}"));
    env::var(name).ok().map(parse).transpose()
}

/// Completes on Ctrl-C, or on SIGTERM (sent by systemd, Docker, Kubernetes).
async fn shutdown_signal() {
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => _ = sigterm.recv().await,
            Err(e) => {
                warn!("cannot listen for SIGTERM: {e}");
                std::future::pending().await
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// The error of `main`, which prints it as `Error: <message>` and exits 1.
struct Fatal(String);

impl<E: fmt::Display> From<E> for Fatal {
    fn from(e: E) -> Self {
        Fatal(e.to_string())
    }
}

impl fmt::Debug for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[tokio::main]
async fn main() -> Result<(), Fatal> {
    // Logs go to stderr, so stdout carries only the handled events.
    tracing_subscriber::fmt().with_writer(io::stderr).init();
    let (addr, queue, prefetch) = config()?;
    let from = from_arg(env::args().skip(1))?;

    // No automatic reconnect: on a lost connection we exit with an error for
    // the supervisor to restart us. Unacked messages are redelivered, and
    // dedup absorbs them.
    let props = ConnectionProperties::default().with_connection_name("cellosign-consumer".into());
    let conn = Connection::connect(&addr, props)
        .await
        .map_err(|e| format!("cannot connect to AMQP_ADDR: {e}"))?;
    let channel = conn.create_channel().await?;

    // Passive: only check that the queue exists. The bridge owns the
    // topology; declaring here could create a wrong queue (classic, without
    // single active consumer, unbound) that nothing ever feeds.
    let options = QueueDeclareOptions::default().passive();
    let found = channel
        .queue_declare(queue.as_str().into(), options, FieldTable::default())
        .await
        .map_err(|e| {
            format!("queue '{queue}' missing or not accessible (does the bridge declare it?): {e}")
        })?;
    info!(queue, messages = found.message_count(), "queue found");

    // At most `prefetch` unacked deliveries in flight: bounds our memory and
    // what a crash hands back. Default consume options: manual acks.
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let tag = ShortString::from(format!("cellosign-consumer-{}", std::process::id()));
    let options = BasicConsumeOptions::default();
    let mut args = FieldTable::default();
    if let Some(from) = &from {
        // Where in the stream to start; a stream also needs the prefetch set above.
        args.insert("x-stream-offset".into(), from.clone());
    }
    let mut consumer = channel
        .basic_consume(queue.as_str().into(), tag.clone(), options, args)
        .await?;
    // On a single-active-consumer queue we may be the standby: no deliveries
    // until the active consumer goes away.
    info!(%tag, "consuming");

    let mut seen = RecentIds::default();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        // A signal is noticed here, between deliveries: the one in hand is
        // always finished and settled first. `biased` checks the signal
        // first; otherwise select! may keep picking prefetched deliveries.
        let delivery = tokio::select! {
            biased;
            () = &mut shutdown => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return Err(format!("consumer failed: {e}").into()),
                None => return Err("the broker cancelled the consumer (queue deleted?)".into()),
            },
        };
        let offset = stream_offset(&delivery.properties);
        if from.is_some() && offset.is_none() {
            // Unsettled: closing the connection hands it back to the queue.
            return Err(
                format!("queue '{queue}' is not a stream: --from reads streams only").into(),
            );
        }
        process(&delivery, &mut seen, offset).await?;
    }

    // Stop deliveries, then close: the broker puts back what it sent ahead
    // (prefetch) that we did not ack, for the next consumer.
    info!("stopping");
    channel
        .basic_cancel(tag, BasicCancelOptions::default())
        .await?;
    channel.close(200, "bye".into()).await?;
    conn.close(200, "bye".into()).await?;
    info!("stopped");
    Ok(())
}
