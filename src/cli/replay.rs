//! `tail --queue NAME --from POINT`: reads a stream queue (SPEC 7, replay) from a
//! point of its history, printing each message as a JSON line with its offset.
//!
//! It consumes the stream itself rather than a queue of its own: reading a stream
//! takes nothing away from it, so other consumers see no difference. A queue that
//! is not a stream would give its messages up to `tail`: RabbitMQ 3.10 refuses the
//! stream offset on quorum and classic queues, and should a broker ignore it
//! instead, the first delivery without a stream offset stops `tail` before it
//! acks anything, and closing the channel hands every unacked message back.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, Consumer, ErrorKind};

use super::tail::{TailError, connect_any, finish, next_delivery, print, render};
use crate::amqp::link::CONNECT_TIMEOUT;
use crate::config::Settings;

/// Deliveries the broker may send ahead of our acks. Streams refuse a consumer
/// without a prefetch; 100 keeps a replay fast without holding much.
const PREFETCH: u16 = 100;

/// The consumer argument that says where to start reading a stream.
const OFFSET_ARG: &str = "x-stream-offset";

/// Where in a stream to start reading (`--from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOffset {
    /// The oldest message the stream still keeps.
    First,
    /// The last chunk written (a few messages back, at most one chunk).
    Last,
    /// Only messages that arrive from now on.
    Next,
    /// The first chunk written at or after this Unix time, in whole seconds (an
    /// AMQP timestamp has no fraction).
    Time(u64),
    /// The message with this offset (the `"offset"` of a printed line) and on.
    Offset(i64),
}

impl StreamOffset {
    /// The `x-stream-offset` value RabbitMQ reads: a string for the named points,
    /// an AMQP timestamp for a time, a long-long integer for an offset.
    fn amqp_value(self) -> AMQPValue {
        match self {
            StreamOffset::First => AMQPValue::LongString(LongString::from("first")),
            StreamOffset::Last => AMQPValue::LongString(LongString::from("last")),
            StreamOffset::Next => AMQPValue::LongString(LongString::from("next")),
            StreamOffset::Time(secs) => AMQPValue::Timestamp(secs),
            StreamOffset::Offset(offset) => AMQPValue::LongLongInt(offset),
        }
    }
}

impl FromStr for StreamOffset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "first" => return Ok(StreamOffset::First),
            "last" => return Ok(StreamOffset::Last),
            "next" => return Ok(StreamOffset::Next),
            _ => {}
        }
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse::<i64>()
                .map(StreamOffset::Offset)
                .map_err(|_| format!("offset {s} is over {}", i64::MAX));
        }
        let time = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
            format!(
                "{s:?} is none of first, last, next, an offset (e.g. 1234) or an RFC 3339 time (e.g. 2025-01-26T08:49:33Z): {e}"
            )
        })?;
        u64::try_from(time.timestamp())
            .map(StreamOffset::Time)
            .map_err(|_| format!("{s}: a time before 1970 is before any stream"))
    }
}

impl fmt::Display for StreamOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamOffset::First => f.write_str("first"),
            StreamOffset::Last => f.write_str("last"),
            StreamOffset::Next => f.write_str("next"),
            StreamOffset::Time(secs) => write!(f, "Unix time {secs}"),
            StreamOffset::Offset(offset) => write!(f, "offset {offset}"),
        }
    }
}

/// The stream offset RabbitMQ puts on every delivery from a stream; `None` on a
/// delivery from any other kind of queue.
pub(crate) fn stream_offset(delivery: &lapin::message::Delivery) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(OFFSET_ARG)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// True if the broker refused the consume for its `x-stream-offset`, as RabbitMQ
/// does on a queue that is not a stream ("invalid arg 'x-stream-offset' ...").
fn refuses_offset(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp) if amqp.get_message().as_str().contains(OFFSET_ARG))
}

/// Consumes `queue` from `from` with manual acks and a prefetch, as streams require.
async fn subscribe(
    connection: &Connection,
    queue: &str,
    from: StreamOffset,
) -> Result<Consumer, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(OFFSET_ARG.into(), from.amqp_value());
    channel
        .basic_consume(
            queue.into(),
            "cellosign-bridge-tail".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
}

/// Reads the stream `queue` from `from` and prints each message, acking it once
/// printed (for a stream an ack only asks for more). Stops on Ctrl-C, or with
/// `until_idle` once nothing has arrived for that long.
pub async fn run(
    settings: &Settings,
    queue: &str,
    from: StreamOffset,
    until_idle: Option<Duration>,
) -> Result<(), TailError> {
    let (connection, url) = connect_any(&settings.amqp.urls).await?;
    let subscribed = tokio::time::timeout(CONNECT_TIMEOUT, subscribe(&connection, queue, from))
        .await
        .map_err(|_| TailError::SetupTimeout { url })?;
    let mut consumer = subscribed.map_err(|e| {
        if refuses_offset(&e) {
            TailError::NotAStream {
                queue: queue.to_string(),
            }
        } else {
            TailError::Amqp(e)
        }
    })?;
    eprintln!("tail: reading stream {queue:?} from {from}; Ctrl-C to stop");
    let mut stdout = std::io::stdout();
    let result = async {
        while let Some(delivery) = next_delivery(&mut consumer, until_idle).await? {
            let Some(offset) = stream_offset(&delivery) else {
                return Err(TailError::NotAStream {
                    queue: queue.to_string(),
                });
            };
            let mut line = render(&delivery);
            line["offset"] = offset.into();
            print(&mut stdout, &line)?;
            delivery.ack(BasicAckOptions::default()).await?;
        }
        Ok(())
    }
    .await;
    finish(connection).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_takes_the_named_points_offsets_and_rfc3339_times() {
        for (arg, want) in [
            ("first", StreamOffset::First),
            ("last", StreamOffset::Last),
            ("next", StreamOffset::Next),
            ("0", StreamOffset::Offset(0)),
            ("1234", StreamOffset::Offset(1234)),
            ("1970-01-01T00:00:00Z", StreamOffset::Time(0)),
            ("2025-01-26T08:49:33Z", StreamOffset::Time(1_737_881_373)),
            // Fractions are cut to the second; offsets are taken into account.
            (
                "2025-01-26T08:49:33.999Z",
                StreamOffset::Time(1_737_881_373),
            ),
            (
                "2025-01-26T09:49:33+01:00",
                StreamOffset::Time(1_737_881_373),
            ),
        ] {
            assert_eq!(arg.parse::<StreamOffset>(), Ok(want), "{arg}");
        }
    }

    #[test]
    fn from_refuses_anything_else_saying_what_it_takes() {
        for arg in [
            "",
            "First",
            "-1",
            "+5",
            "1.5",
            "9223372036854775808",
            "2025-01-26",
            "1969-12-31T23:59:59Z",
        ] {
            let err = arg.parse::<StreamOffset>().expect_err(arg);
            assert!(!err.is_empty(), "{arg}");
        }
        let err = "yesterday".parse::<StreamOffset>().expect_err("refused");
        assert!(err.contains("RFC 3339") && err.contains("first"), "{err}");
    }

    #[test]
    fn each_point_is_sent_as_the_type_rabbitmq_reads() {
        assert_eq!(
            StreamOffset::First.amqp_value(),
            AMQPValue::LongString("first".into())
        );
        assert_eq!(
            StreamOffset::Next.amqp_value(),
            AMQPValue::LongString("next".into())
        );
        assert_eq!(StreamOffset::Time(7).amqp_value(), AMQPValue::Timestamp(7));
        assert_eq!(
            StreamOffset::Offset(7).amqp_value(),
            AMQPValue::LongLongInt(7)
        );
    }
}
