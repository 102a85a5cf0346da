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
                max_age: None,
                max_bytes: None,
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
    /// A stream's retention by age (`x-max-age`, RabbitMQ's syntax: `7D`, `12h`),
    /// so that replay reaches back that far and no further. Streams only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<String>,
    /// A stream's retention by size (`x-max-length-bytes`). Streams only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

/// Checks RabbitMQ's `x-max-age` syntax: a positive whole number and one unit of
/// `Y`, `M`, `D`, `h`, `m`, `s` (the broker refuses anything else, and only when
/// it is asked to declare the queue: better to stop at start). Returns the age in
/// seconds, as RabbitMQ counts it (a month 30 days, a year 365).
pub(crate) fn max_age_seconds(age: &str) -> Result<u64, String> {
    let digits = age.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = age.split_at(digits);
    let unit_seconds: u64 = match unit {
        "Y" => 365 * 86_400,
        "M" => 30 * 86_400,
        "D" => 86_400,
        "h" => 3600,
        "m" => 60,
        "s" => 1,
        _ => {
            return Err(format!(
                "{age:?}: a whole number followed by one unit of Y, M, D, h, m, s (e.g. \"7D\")"
            ));
        }
    };
    match number.parse::<u64>() {
        Ok(0) => Err(format!("{age:?}: must be more than 0")),
        Ok(n) => n
            .checked_mul(unit_seconds)
            .filter(|s| s.checked_mul(1000).is_some())
            .ok_or_else(|| format!("{age:?}: too long")),
        Err(_) if number.is_empty() => Err(format!(
            "{age:?}: a whole number followed by one unit of Y, M, D, h, m, s (e.g. \"7D\")"
        )),
        Err(_) => Err(format!("{age:?}: too long")),
    }
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

/// A bad value in the `i`th queue, named `amqp.queues[i].{name}`.
fn queue_entry(i: usize, name: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Entry {
        key: format!("amqp.queues[{i}].{name}"),
        problem: problem.into(),
    }
}

impl QueueSettings {
    /// `max_age` and `max_bytes` are stream retention: valid values, on a stream.
    fn check_retention(&self, i: usize) -> Result<(), ConfigError> {
        let not_stream = |name: &str| {
            queue_entry(
                i,
                name,
                format!(
                    "queue {:?} is of type {:?}; {name} is for type \"stream\" only",
                    self.name,
                    self.kind.as_str()
                ),
            )
        };
        if let Some(age) = &self.max_age {
            if self.kind != QueueKind::Stream {
                return Err(not_stream("max_age"));
            }
            max_age_seconds(age).map_err(|problem| queue_entry(i, "max_age", problem))?;
        }
        if let Some(bytes) = self.max_bytes {
            if self.kind != QueueKind::Stream {
                return Err(not_stream("max_bytes"));
            }
            // Declared as an AMQP long-long (signed 64 bits).
            if bytes == 0 || i64::try_from(bytes).is_err() {
                return Err(queue_entry(
                    i,
                    "max_bytes",
                    format!("must be 1..={}", i64::MAX),
                ));
            }
        }
        Ok(())
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
        for (i, queue) in amqp.queues.iter().enumerate() {
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
            queue.check_retention(i)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::verdict;

    fn queue(kind: QueueKind, max_age: Option<&str>, max_bytes: Option<u64>) -> AmqpSettings {
        AmqpSettings {
            queues: vec![
                QueueSettings {
                    name: "first".into(),
                    kind: QueueKind::Quorum,
                    bindings: vec!["#".into()],
                    max_age: None,
                    max_bytes: None,
                },
                QueueSettings {
                    name: "second".into(),
                    kind,
                    bindings: vec!["#".into()],
                    max_age: max_age.map(String::from),
                    max_bytes,
                },
            ],
            ..AmqpSettings::default()
        }
    }

    fn refusal(settings: &AmqpSettings) -> String {
        verdict(settings.check())
    }

    #[test]
    fn max_age_takes_rabbitmqs_units() {
        for (age, seconds) in [
            ("7D", 7 * 86_400),
            ("1Y", 365 * 86_400),
            ("2M", 60 * 86_400),
            ("12h", 12 * 3600),
            ("30m", 1800),
            ("45s", 45),
            ("007D", 7 * 86_400),
        ] {
            assert_eq!(max_age_seconds(age), Ok(seconds), "{age}");
        }
    }

    #[test]
    fn max_age_refuses_what_rabbitmq_refuses() {
        for age in [
            "",
            "D",
            "7",
            "0D",
            "7d",
            "7 D",
            "7DD",
            "-1D",
            "1.5D",
            " 7D",
            "7H",
            "7S",
            "1y",
            "99999999999999999999D",
            "999999999999999Y",
        ] {
            assert!(max_age_seconds(age).is_err(), "{age:?} accepted");
        }
    }

    #[test]
    fn a_stream_takes_max_age_and_max_bytes() {
        assert_eq!(
            refusal(&queue(QueueKind::Stream, Some("7D"), Some(1 << 30))),
            "accepted"
        );
        assert_eq!(refusal(&queue(QueueKind::Stream, None, None)), "accepted");
    }

    #[test]
    fn bad_retention_is_refused_naming_the_key() {
        for (kind, age, bytes, key) in [
            (
                QueueKind::Quorum,
                Some("7D"),
                None,
                "amqp.queues[1].max_age",
            ),
            (
                QueueKind::Classic,
                Some("7D"),
                None,
                "amqp.queues[1].max_age",
            ),
            (
                QueueKind::Quorum,
                None,
                Some(1000),
                "amqp.queues[1].max_bytes",
            ),
            (
                QueueKind::Classic,
                None,
                Some(1000),
                "amqp.queues[1].max_bytes",
            ),
            (
                QueueKind::Stream,
                Some("7 days"),
                None,
                "amqp.queues[1].max_age",
            ),
            (QueueKind::Stream, None, Some(0), "amqp.queues[1].max_bytes"),
            (
                QueueKind::Stream,
                None,
                Some(u64::MAX),
                "amqp.queues[1].max_bytes",
            ),
        ] {
            let err = refusal(&queue(kind, age, bytes));
            assert!(
                err.starts_with(&format!("{key}: ")),
                "{kind:?} {age:?} {bytes:?}: {err}"
            );
        }
        let err = refusal(&queue(QueueKind::Quorum, Some("7D"), None));
        assert!(
            err.contains("\"second\"") && err.contains("stream"),
            "{err}"
        );
    }

    #[test]
    fn retention_comes_from_toml_and_is_left_out_when_unset() {
        let toml = "name = \"s\"\ntype = \"stream\"\nmax_age = \"7D\"\nmax_bytes = 1000\n";
        let q: QueueSettings = toml::from_str(toml).expect("parses");
        assert_eq!(
            (q.max_age.as_deref(), q.max_bytes),
            (Some("7D"), Some(1000))
        );
        let plain = toml::to_string(&AmqpSettings::default().queues[0]).expect("serializes");
        assert!(!plain.contains("max_"), "{plain}");
    }

    #[test]
    fn max_age_names_what_is_wrong() {
        for (age, says) in [
            ("D", "a whole number followed by one unit"),
            ("7", "a whole number followed by one unit"),
            ("0D", "must be more than 0"),
            ("99999999999999999999D", "too long"),
            ("999999999999999Y", "too long"),
        ] {
            let err = max_age_seconds(age).expect_err(age);
            assert!(err.contains(says), "{age:?}: {err}");
        }
    }

    #[test]
    fn queue_types_are_rabbitmqs_names() {
        assert_eq!(QueueKind::Quorum.as_str(), "quorum");
        assert_eq!(QueueKind::Classic.as_str(), "classic");
        assert_eq!(QueueKind::Stream.as_str(), "stream");
    }

    /// A change to the default settings, named for the failure message.
    type Change = (&'static str, Box<dyn FnOnce(&mut AmqpSettings)>);

    /// The refusal of the default settings changed by `change`, or "accepted".
    fn verdict_with(change: impl FnOnce(&mut AmqpSettings)) -> String {
        let mut settings = AmqpSettings::default();
        change(&mut settings);
        refusal(&settings)
    }

    #[test]
    fn limits_stop_exactly_where_they_say() {
        let accepted: [Change; 6] = [
            (
                "exchange of 200",
                Box::new(|a| a.exchange = "x".repeat(200)),
            ),
            (
                "largest message",
                Box::new(|a| a.max_message_bytes = MAX_MESSAGE_LIMIT),
            ),
            (
                "equal reconnect delays",
                Box::new(|a| {
                    a.reconnect_initial_ms = 700;
                    a.reconnect_max_ms = 700;
                }),
            ),
            (
                "queue name of 255",
                Box::new(|a| a.queues[0].name = "q".repeat(255)),
            ),
            (
                "binding of 255",
                Box::new(|a| a.queues[0].bindings = vec!["b".repeat(255)]),
            ),
            ("the defaults", Box::new(|_| {})),
        ];
        for (what, change) in accepted {
            assert_eq!(verdict_with(change), "accepted", "{what}");
        }
        let refused: [Change; 9] = [
            ("amqp.exchange", Box::new(|a| a.exchange = "x".repeat(201))),
            ("amqp.exchange", Box::new(|a| a.exchange = String::new())),
            (
                "amqp.max_message_bytes",
                Box::new(|a| a.max_message_bytes = MAX_MESSAGE_LIMIT + 1),
            ),
            (
                "amqp.max_message_bytes",
                Box::new(|a| a.max_message_bytes = 0),
            ),
            (
                "amqp.reconnect_max_ms",
                Box::new(|a| {
                    a.reconnect_initial_ms = 700;
                    a.reconnect_max_ms = 699;
                }),
            ),
            (
                "amqp.reconnect_max_ms",
                Box::new(|a| {
                    a.reconnect_initial_ms = 0;
                    a.reconnect_max_ms = 699;
                }),
            ),
            (
                "amqp.queues",
                Box::new(|a| a.queues[0].name = "q".repeat(256)),
            ),
            (
                "amqp.queues",
                Box::new(|a| a.queues[0].name = String::new()),
            ),
            (
                "amqp.queues",
                Box::new(|a| a.queues[0].bindings = vec!["b".repeat(256)]),
            ),
        ];
        for (key, change) in refused {
            let err = verdict_with(change);
            assert!(err.starts_with(&format!("{key}: ")), "{key}: {err}");
        }
    }
}
