//! `tail`: a throw-away consumer that prints matching events as JSON lines, so
//! operators and consumer developers can see what flows.
//!
//! It connects on its own rather than through [`crate::amqp::link::Link`]: it needs
//! one attempt and a clear failure, not the bridge's endless reconnecting, and
//! no topology of its own beyond one exclusive queue that the broker deletes
//! when `tail` goes. Reading a stream from a point of its history (`--queue`,
//! `--from`) is [`super::replay`]; both share the connecting and the printing here.

use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, Consumer};

use crate::amqp::link::{CONNECT_TIMEOUT, describe, first_that_connects, open};
use crate::config::{BrokerUrl, Settings};

/// Why `tail` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// No URL of `amqp.urls` gave a connection; one `url: reason` per URL, passwords redacted.
    #[error("no broker reachable: {0}")]
    Connect(String),
    /// The broker connected but did not finish setting up the consumer in time.
    #[error("broker {url}: no answer within {CONNECT_TIMEOUT:?} while setting up the consumer")]
    SetupTimeout { url: String },
    /// `--queue` named a queue that is not a stream: reading it would take its
    /// messages from their consumers. Nothing was acked; the broker gets them back.
    #[error(
        "queue {queue:?} is not a stream: tail --queue reads streams only, and left the queue as it was"
    )]
    NotAStream { queue: String },
    /// The broker refused or dropped something (e.g. a missing exchange or queue).
    /// Not a `source`: lapin's error already shows its cause, and `main` prints
    /// the chain, which would repeat it.
    #[error("broker: {0}")]
    Amqp(lapin::Error),
    /// stdout went away (a closed pipe): nobody is reading any more.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

impl From<lapin::Error> for TailError {
    fn from(e: lapin::Error) -> Self {
        TailError::Amqp(e)
    }
}

/// One printed line: the routing facts a consumer developer filters on, and
/// the body as JSON (or as text if it is not JSON).
pub(crate) fn render(delivery: &Delivery) -> serde_json::Value {
    let props = &delivery.properties;
    let received_at = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-received-at").cloned())
        .and_then(|v| match v {
            AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        });
    // Bodies are validated JSON; show them as JSON, or as text if not.
    let body = serde_json::from_slice::<serde_json::Value>(&delivery.data).unwrap_or_else(|_| {
        serde_json::Value::String(String::from_utf8_lossy(&delivery.data).into_owned())
    });
    serde_json::json!({
        "routing_key": delivery.routing_key.as_str(),
        "message_id": props.message_id().as_ref().map(|s| s.as_str()),
        "type": props.kind().as_ref().map(|s| s.as_str()),
        "received_at": received_at,
        "body": body,
    })
}

/// Tries each URL in order, as the bridge does, each attempt bounded by
/// [`CONNECT_TIMEOUT`]; the first that connects wins. Returns the connection and
/// its URL with the password redacted.
pub(crate) async fn connect_any(urls: &[BrokerUrl]) -> Result<(Connection, String), TailError> {
    first_that_connects(urls, |url| open(url, "cellosign-bridge tail"))
        .await
        .map_err(|failures| TailError::Connect(describe(&failures)))
}

/// Declares an exclusive, auto-delete queue, binds it to `exchange` with
/// `binding`, and consumes from it without acks (nothing is kept for `tail`).
/// Returns the queue's server-chosen name, for the operator's banner.
async fn bind(
    connection: &Connection,
    exchange: &str,
    binding: &str,
) -> Result<(String, Consumer), lapin::Error> {
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "cellosign-bridge-tail".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((queue.name().as_str().to_string(), consumer))
}

/// The next delivery, or `None` when `tail` should stop: Ctrl-C, the broker ended
/// the consumer, or (with `until_idle`) nothing arrived for that long.
pub(crate) async fn next_delivery(
    consumer: &mut Consumer,
    until_idle: Option<Duration>,
) -> Result<Option<Delivery>, TailError> {
    let next = async {
        match until_idle {
            Some(idle) => tokio::time::timeout(idle, consumer.next())
                .await
                .unwrap_or(None),
            None => consumer.next().await,
        }
    };
    tokio::select! {
        next = next => Ok(next.transpose()?),
        _ = tokio::signal::ctrl_c() => Ok(None),
    }
}

/// Writes one JSON line and flushes it, so a pipe sees each event as it comes.
pub(crate) fn print(out: &mut impl Write, line: &serde_json::Value) -> Result<(), TailError> {
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Closes the connection, bounded: a clean close hands back at once what was
/// delivered and not acked, and a broker that does not answer must not hold the exit.
pub(crate) async fn finish(connection: Connection) {
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, connection.close(200, "tail done".into())).await;
}

/// Binds an exclusive, auto-delete queue to the exchange with `binding` and
/// prints until interrupted, or with `until_idle` until nothing has arrived for
/// that long. Connecting and binding are bounded by `CONNECT_TIMEOUT`; after that
/// it waits for events as long as the operator likes.
pub async fn run(
    settings: &Settings,
    binding: &str,
    until_idle: Option<Duration>,
) -> Result<(), TailError> {
    let (connection, url) = connect_any(&settings.amqp.urls).await?;
    let exchange = settings.amqp.exchange.as_str();
    let (queue, mut consumer) =
        tokio::time::timeout(CONNECT_TIMEOUT, bind(&connection, exchange, binding))
            .await
            .map_err(|_| TailError::SetupTimeout { url })??;
    eprintln!("tail: bound {queue:?} to exchange {exchange:?} with {binding:?}; Ctrl-C to stop");
    let mut stdout = std::io::stdout();
    let result = async {
        while let Some(delivery) = next_delivery(&mut consumer, until_idle).await? {
            print(&mut stdout, &render(&delivery))?;
        }
        Ok(())
    }
    .await;
    finish(connection).await;
    result
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    // A broker that accepts TCP and never answers is covered through the binary
    // by tests/cli.rs, with the real bound.

    /// Every URL tried is named in the error, with its password redacted.
    #[tokio::test]
    async fn the_error_names_each_url_without_its_password() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        drop(listener);
        let url = format!("amqp://guest:secret@127.0.0.1:{port}/%2f");
        let result = connect_any(&[url.into()]).await;
        let Err(TailError::Connect(message)) = result else {
            panic!("expected a connect error");
        };
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
}
