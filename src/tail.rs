//! `tail`: a throw-away consumer that prints matching events as JSON lines, so
//! operators and consumer developers can see what flows.

use std::io::Write;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};

use crate::config::{Settings, redact_url};

/// Why `tail` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("no broker reachable: {0}")]
    Connect(String),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

/// One printed line.
pub fn render(delivery: &lapin::message::Delivery) -> serde_json::Value {
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

/// Binds an exclusive, auto-delete queue to the exchange with `binding` and prints until interrupted.
pub async fn run(settings: &Settings, binding: &str) -> Result<(), TailError> {
    let mut errors = Vec::new();
    let mut connection = None;
    for url in &settings.amqp.urls {
        let props =
            ConnectionProperties::default().with_connection_name("cellosign-bridge tail".into());
        match Connection::connect(url, props).await {
            Ok(c) => {
                connection = Some(c);
                break;
            }
            Err(e) => errors.push(format!("{}: {e}", redact_url(url))),
        }
    }
    let connection = connection.ok_or_else(|| TailError::Connect(errors.join("; ")))?;
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
            settings.amqp.exchange.as_str().into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
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
    eprintln!(
        "tail: bound {:?} to exchange {:?} with {binding:?}; Ctrl-C to stop",
        queue.name().as_str(),
        settings.amqp.exchange
    );
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            next = consumer.next() => match next {
                Some(delivery) => {
                    let delivery = delivery?;
                    writeln!(stdout, "{}", render(&delivery))?;
                    stdout.flush()?;
                }
                None => return Ok(()),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
