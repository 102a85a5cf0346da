//! What the bridge declares on the broker, or checks when operators declare it.

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::config::{AmqpSettings, QueueKind, QueueSettings};

/// Plugin that `amqp.partitions` needs on the broker.
pub const CONSISTENT_HASH_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";

/// Why the topology could not be set up; the link reports it and stays not ready.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("exchange {exchange:?} does not exist (amqp.declare = false): {source}")]
    ExchangeMissing {
        exchange: String,
        source: lapin::Error,
    },
    #[error("declaring {what}: {source}")]
    Declare { what: String, source: lapin::Error },
    #[error(
        "amqp.partitions needs the broker plugin {CONSISTENT_HASH_PLUGIN} (rabbitmq-plugins enable {CONSISTENT_HASH_PLUGIN}): {source}"
    )]
    PartitionPluginMissing { source: lapin::Error },
}

/// Name of the alternate exchange, and of its queue, that keeps unroutable events.
pub fn unrouted_name(exchange: &str) -> String {
    format!("{exchange}.unrouted")
}

/// Name of the consistent-hash exchange feeding the partition queues.
pub(crate) fn partitioned_exchange(exchange: &str) -> String {
    format!("{exchange}.partitioned")
}

/// Name of partition queue `i`.
pub fn partition_queue(exchange: &str, i: u16) -> String {
    format!("{exchange}.p{i}")
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    kind: QueueKind,
    extra: &[(&str, AMQPValue)],
    hint: &str,
) -> Result<(), TopologyError> {
    let mut args = vec![("x-queue-type", long(kind.as_str()))];
    args.extend(extra.iter().cloned());
    channel
        .queue_declare(name.into(), durable_queue(), table(&args))
        .await
        .map(|_| ())
        .map_err(|source| TopologyError::Declare {
            what: format!("queue {name:?}{hint}"),
            source,
        })
}

/// What an operator reads when a queue of `[[amqp.queues]]` is refused: the broker
/// compares the arguments of an existing queue and refuses any change.
const REDECLARE_HINT: &str = " (an existing queue of another type, max_age or max_bytes is refused with PRECONDITION_FAILED: delete it, or change a stream's retention with a policy)";

/// Declares a queue of `[[amqp.queues]]` with its stream retention, if any.
async fn declare_configured(channel: &Channel, queue: &QueueSettings) -> Result<(), TopologyError> {
    let mut extra = Vec::new();
    if let Some(age) = &queue.max_age {
        extra.push(("x-max-age", long(age)));
    }
    // The config check keeps max_bytes within a long-long.
    if let Some(bytes) = queue.max_bytes.and_then(|b| i64::try_from(b).ok()) {
        extra.push(("x-max-length-bytes", AMQPValue::LongLongInt(bytes)));
    }
    declare_queue(channel, &queue.name, queue.kind, &extra, REDECLARE_HINT).await
}

async fn bind_queue(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), TopologyError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError::Declare {
            what: format!("binding {queue:?} to {exchange:?} with {key:?}"),
            source,
        })
}

/// Declares (or, with `declare = false`, checks) everything publishing relies on.
///
/// Runs on a throw-away channel: a failed declaration closes the channel it ran on.
pub(crate) async fn ensure(channel: &Channel, amqp: &AmqpSettings) -> Result<(), TopologyError> {
    let exchange = amqp.exchange.as_str();
    if !amqp.declare {
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        return channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .map_err(|source| TopologyError::ExchangeMissing {
                exchange: exchange.to_string(),
                source,
            });
    }
    let unrouted = unrouted_name(exchange);
    channel
        .exchange_declare(
            unrouted.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError::Declare {
            what: format!("exchange {unrouted:?}"),
            source,
        })?;
    declare_queue(channel, &unrouted, QueueKind::Quorum, &[], "").await?;
    bind_queue(channel, &unrouted, &unrouted, "").await?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable_exchange(),
            table(&[("alternate-exchange", long(&unrouted))]),
        )
        .await
        .map_err(|source| TopologyError::Declare {
            what: format!("exchange {exchange:?} (if it exists with other arguments, delete it or set amqp.declare = false)"),
            source,
        })?;
    for queue in &amqp.queues {
        declare_configured(channel, queue).await?;
        for key in &queue.bindings {
            bind_queue(channel, &queue.name, exchange, key).await?;
        }
    }
    Ok(())
}

/// Declares the partitioned exchange and its queues (`amqp.partitions > 0`).
///
/// Separate from [`ensure`] because a broker without the plugin closes the
/// channel; the caller reports that as a readiness problem naming the plugin.
pub(crate) async fn ensure_partitions(
    channel: &Channel,
    amqp: &AmqpSettings,
) -> Result<(), TopologyError> {
    if amqp.partitions == 0 {
        return Ok(());
    }
    let exchange = amqp.exchange.as_str();
    let hashed = partitioned_exchange(exchange);
    channel
        .exchange_declare(
            hashed.as_str().into(),
            ExchangeKind::Custom("x-consistent-hash".into()),
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError::PartitionPluginMissing { source })?;
    channel
        .exchange_bind(
            hashed.as_str().into(),
            exchange.into(),
            "#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|source| TopologyError::Declare {
            what: format!("binding {hashed:?} to {exchange:?}"),
            source,
        })?;
    for i in 0..amqp.partitions {
        let queue = partition_queue(exchange, i);
        declare_queue(
            channel,
            &queue,
            QueueKind::Quorum,
            &[("x-single-active-consumer", AMQPValue::Boolean(true))],
            "",
        )
        .await?;
        // With a consistent-hash exchange the binding key is the partition's weight.
        bind_queue(channel, &queue, &hashed, "1").await?;
    }
    Ok(())
}
