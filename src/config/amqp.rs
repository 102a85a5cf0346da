//! The `[amqp]` settings: the broker link, the topology, and the broker URLs, from
//! the config or from a file of their own.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BrokerUrl, ConfigError, invalid, secret_lines};
use crate::event::RoutingKeyTemplate;

/// RabbitMQ's hard cap on `max_message_size` (512 MiB): no broker takes more.
const MAX_MESSAGE_LIMIT: usize = 512 << 20;

/// RabbitMQ link and topology.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    pub urls: Vec<BrokerUrl>,
    /// A file of broker URLs, one a line (a mounted Kubernetes Secret or a systemd
    /// credential), so the password is in no config file or environment; it takes the
    /// place of `urls`, and giving both is refused.
    pub urls_file: String,
    pub exchange: String,
    /// Parsed once at load; a bad template stops the start naming the key.
    pub routing_key: RoutingKeyTemplate,
    pub declare: bool,
    pub publish_timeout_ms: u64,
    pub max_unconfirmed: usize,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    pub partitions: u16,
    /// Largest body published as one message; a larger one goes to the claim-check
    /// store (`archive.store_url`) or, without one, gets 413, so the broker never sees
    /// a message it would refuse.
    pub max_message_bytes: usize,
    pub queues: Vec<QueueSettings>,
}

impl AmqpSettings {
    /// A publish not confirmed within this counts as failed.
    pub(crate) fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }

    /// First retry delay after a failure (doubling, with jitter).
    pub(crate) fn reconnect_initial(&self) -> Duration {
        Duration::from_millis(self.reconnect_initial_ms)
    }

    /// Cap of the retry delay.
    pub(crate) fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            urls: vec![BrokerUrl::from("amqp://guest:guest@127.0.0.1:5672/%2f")],
            urls_file: String::new(),
            exchange: "cellosign.events".into(),
            routing_key: RoutingKeyTemplate::default(),
            declare: true,
            publish_timeout_ms: 5000,
            max_unconfirmed: 1024,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 30_000,
            partitions: 0,
            max_message_bytes: 16 << 20,
            queues: vec![QueueSettings {
                name: "cellosign.sessions".into(),
                kind: QueueKind::Quorum,
                bindings: vec!["#".into()],
            }],
        }
    }
}

/// A queue the bridge declares and binds to its exchange.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: QueueKind,
    #[serde(default)]
    pub bindings: Vec<String>,
}

/// RabbitMQ queue type (`x-queue-type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueKind {
    #[default]
    Quorum,
    Classic,
    Stream,
}

impl QueueKind {
    /// The value of the `x-queue-type` argument.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            QueueKind::Quorum => "quorum",
            QueueKind::Classic => "classic",
            QueueKind::Stream => "stream",
        }
    }
}

impl AmqpSettings {
    /// Reads `urls_file` in place of `urls`; `urls_given`: a source other than the
    /// shipped `default.toml` set `urls` too, which is refused.
    pub(super) fn read_urls_file(&mut self, urls_given: bool) -> Result<(), ConfigError> {
        if urls_given {
            return Err(invalid(
                "amqp.urls_file",
                "amqp.urls is set too; give the broker URLs in one of amqp.urls and amqp.urls_file",
            ));
        }
        let path = Path::new(&self.urls_file);
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                "amqp.urls_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        self.urls = secret_lines(&text).map(BrokerUrl::from).collect();
        if self.urls.is_empty() {
            return Err(invalid(
                "amqp.urls_file",
                format!("{} lists no broker URL", path.display()),
            ));
        }
        Ok(())
    }

    /// Rejects AMQP values that deserialize but cannot work.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        let amqp = self;
        // A bad URL read from the file is the file's fault.
        let urls_key = if amqp.urls_file.is_empty() {
            "amqp.urls"
        } else {
            "amqp.urls_file"
        };
        if amqp.urls.is_empty() {
            return Err(invalid(urls_key, "must list at least one broker URL"));
        }
        for url in &amqp.urls {
            if let Err(e) = url.expose().parse::<lapin::uri::AMQPUri>() {
                return Err(invalid(urls_key, format!("{url}: {e}")));
            }
        }
        if amqp.exchange.is_empty() || amqp.exchange.len() > 200 {
            return Err(invalid("amqp.exchange", "must be 1..=200 bytes"));
        }
        if amqp.publish_timeout_ms == 0 {
            return Err(invalid("amqp.publish_timeout_ms", "must be > 0"));
        }
        if amqp.max_message_bytes == 0 || amqp.max_message_bytes > MAX_MESSAGE_LIMIT {
            return Err(invalid(
                "amqp.max_message_bytes",
                format!("must be 1..={MAX_MESSAGE_LIMIT} (RabbitMQ's largest message)"),
            ));
        }
        if amqp.max_unconfirmed == 0 {
            return Err(invalid("amqp.max_unconfirmed", "must be > 0"));
        }
        if amqp.reconnect_initial_ms == 0 || amqp.reconnect_max_ms < amqp.reconnect_initial_ms {
            return Err(invalid(
                "amqp.reconnect_max_ms",
                "need 0 < reconnect_initial_ms <= reconnect_max_ms",
            ));
        }
        let mut names = HashSet::new();
        for queue in &amqp.queues {
            if queue.name.is_empty() || queue.name.len() > 255 {
                return Err(invalid("amqp.queues", "a queue name is 1..=255 bytes"));
            }
            if !names.insert(queue.name.as_str()) {
                return Err(invalid(
                    "amqp.queues",
                    format!("queue {:?} is listed twice", queue.name),
                ));
            }
            if queue.bindings.iter().any(|b| b.len() > 255) {
                return Err(invalid(
                    "amqp.queues",
                    format!("queue {:?}: a binding key is at most 255 bytes", queue.name),
                ));
            }
        }
        Ok(())
    }
}
