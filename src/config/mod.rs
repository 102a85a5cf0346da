//! Typed settings, layered from built-in defaults, files and the environment.
//!
//! Every key is documented in `config/default.toml`. Loading fails, naming the
//! key, on unknown keys and on values that cannot work, so a typo stops the
//! start instead of silently running with a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::{ARCHIVE_EVENT_TYPE, DEFAULT_ACCEPT};
use crate::http::net::Cidr;

mod amqp;
mod archive;
mod auth;
mod secret;
mod telemetry;
#[cfg(test)]
mod tests;

pub use amqp::{AmqpSettings, QueueKind, QueueSettings};
pub use archive::{ArchiveSettings, StoreLocation};
#[cfg(test)]
pub(crate) use auth::ClientSettings;
pub use auth::{AuthSettings, ClientKind};
use secret::secret_lines;
pub use secret::{BrokerUrl, Secret};
pub use telemetry::TelemetrySettings;

/// Prefix of environment overrides: `BRIDGE_<SECTION>__<KEY>`.
const ENV_PREFIX: &str = "BRIDGE";

/// Keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &[
    "amqp.urls",
    "auth.tokens",
    "auth.allow_from",
    "http.trusted_proxies",
    "events.accept",
];

/// Longest accepted event type name; keeps the message id within an AMQP short string.
const MAX_EVENT_TYPE_LEN: usize = 64;

/// Smallest spool page cache: below it every read of a fresh record goes to the disk.
const MIN_SPOOL_CACHE: usize = 1 << 20;

/// Largest body limit: a body must fit one spool record (1 GiB) with its header.
const MAX_BODY_LIMIT: usize = (1 << 30) - (1 << 12);

/// Why the settings could not be loaded. Each message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or did not deserialize (unknown key, wrong type).
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// A value parsed but cannot work.
    #[error("{key}: {problem}")]
    Invalid { key: &'static str, problem: String },
    /// A value in a list entry (e.g. `auth.clients[0].password_file`) cannot work.
    #[error("{key}: {problem}")]
    Entry { key: String, problem: String },
    /// `auth.tokens_file` could not be read.
    #[error("auth.tokens_file: cannot read {path}: {source}")]
    TokensFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// Where settings come from, in the order they are layered.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Directory holding `default.toml` and `{BRIDGE_ENV}.toml`; `None` skips both.
    pub config_dir: Option<PathBuf>,
    /// Value of `BRIDGE_ENV` selecting an extra file in `config_dir`.
    pub environment: Option<String>,
    /// `--config FILE`.
    pub file: Option<PathBuf>,
    /// Environment variables to read overrides from; `None` reads the process environment.
    pub env: Option<std::collections::HashMap<String, String>>,
}

impl Sources {
    /// The layers used by the binary: `config/`, `BRIDGE_ENV`, an optional file, the process env.
    pub fn standard(file: Option<PathBuf>) -> Self {
        Sources {
            config_dir: Some(PathBuf::from("config")),
            environment: std::env::var("BRIDGE_ENV").ok().filter(|e| !e.is_empty()),
            file,
            env: None,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub http: HttpSettings,
    pub auth: AuthSettings,
    pub events: EventSettings,
    pub delivery: DeliverySettings,
    pub spool: SpoolSettings,
    pub amqp: AmqpSettings,
    /// The claim-check store for bodies over `amqp.max_message_bytes` (SPEC 9).
    pub archive: ArchiveSettings,
    pub admin: AdminSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
    /// Span export over OTLP (off by default).
    pub telemetry: TelemetrySettings,
}

/// The public webhook listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    pub path: String,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
    /// Path of the archive webhook (`WHP_ARCHIVE`), with its own limits below.
    pub archive_path: String,
    /// Largest archive body: archives carry the signed PDF and attachments inline.
    pub archive_max_body_bytes: usize,
    /// Archive requests handled at once, apart from `max_in_flight`: with the body
    /// limit, it bounds the memory archives can take.
    pub archive_max_in_flight: usize,
    pub header_read_timeout_ms: u64,
    pub body_read_timeout_ms: u64,
    /// A connection with no request in progress is closed after this long.
    pub idle_timeout_ms: u64,
    /// Connections open at once on the public listener; past it new ones are closed at once.
    pub max_connections: usize,
    pub trusted_proxies: Vec<Cidr>,
    pub tls: Option<TlsSettings>,
}

impl HttpSettings {
    /// A client must send a complete request head within this.
    pub(crate) fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }

    /// A request body must arrive within this.
    pub(crate) fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    /// A connection with no request in progress is closed after this.
    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            path: "/webhooks/cellosign".into(),
            max_body_bytes: 256 * 1024,
            max_in_flight: 1024,
            archive_path: "/webhooks/cellosign/archive".into(),
            archive_max_body_bytes: 64 << 20,
            archive_max_in_flight: 4,
            header_read_timeout_ms: 5000,
            body_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 10_000,
            trusted_proxies: Vec::new(),
            tls: None,
        }
    }
}

/// PEM files for TLS on the public listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Which events are accepted and how repeats are recognised.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    pub accept: Vec<String>,
    pub dedup_window_s: u64,
    pub dedup_max_ids: usize,
}

impl Default for EventSettings {
    fn default() -> Self {
        EventSettings {
            accept: DEFAULT_ACCEPT.map(String::from).to_vec(),
            dedup_window_s: 600,
            dedup_max_ids: 100_000,
        }
    }
}

/// When the caller is answered "0".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// Once the event is fsync'd to the local spool.
    #[default]
    Spooled,
    /// Once the broker confirmed the publish.
    Confirmed,
}

/// Delivery guarantee chosen by the operator.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    pub ack: AckMode,
}

/// The durable local spool.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    /// An append not durable within this long answers 503 (a stalled disk).
    pub append_timeout_ms: u64,
    /// The spool database's page cache: resident memory that grows to this under load.
    pub cache_bytes: usize,
}

impl SpoolSettings {
    /// An append not durable within this answers 503.
    pub(crate) fn append_timeout(&self) -> Duration {
        Duration::from_millis(self.append_timeout_ms)
    }
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            dir: PathBuf::from("var/spool"),
            max_bytes: 1 << 30,
            append_timeout_ms: 2000,
            cache_bytes: 4 << 20,
        }
    }
}

/// Health, readiness and metrics listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    pub listen: SocketAddr,
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// Graceful stop.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSettings {
    pub grace_ms: u64,
}

impl ShutdownSettings {
    /// Time to drain after SIGTERM before exiting.
    pub(crate) fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings { grace_ms: 10_000 }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Settings {
    /// Layers every source, then checks values that deserialization cannot.
    pub fn load(sources: &Sources) -> Result<Settings, ConfigError> {
        let mut settings: Settings = Self::layers(sources, true)?.build()?.try_deserialize()?;
        settings.auth.load_files()?;
        if !settings.amqp.urls_file.is_empty() {
            // The shipped `default.toml` names the local broker in `urls`, so only a
            // non-empty `urls` from another source counts as given twice.
            let given = Self::layers(sources, false)?
                .build()?
                .get::<Vec<String>>("amqp.urls")
                .is_ok_and(|urls| !urls.is_empty());
            settings.amqp.read_urls_file(given)?;
        }
        settings.check()?;
        Ok(settings)
    }

    /// The sources layered in order: `default.toml` (left out with `shipped_default`
    /// false), `{BRIDGE_ENV}.toml`, `--config`, then the environment.
    fn layers(
        sources: &Sources,
        shipped_default: bool,
    ) -> Result<config::ConfigBuilder<config::builder::DefaultState>, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(dir) = &sources.config_dir {
            if shipped_default {
                builder = builder
                    .add_source(config::File::from(dir.join("default.toml")).required(false));
            }
            if let Some(env) = &sources.environment {
                builder = builder.add_source(
                    config::File::from(dir.join(format!("{env}.toml"))).required(false),
                );
            }
        }
        if let Some(file) = &sources.file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        env_overrides(builder, sources)
    }

    /// Rejects values that deserialize but cannot work.
    fn check(&self) -> Result<(), ConfigError> {
        let http = &self.http;
        if !http.path.starts_with('/') {
            return Err(invalid("http.path", "must start with '/'"));
        }
        if http.max_body_bytes == 0 || http.max_body_bytes > MAX_BODY_LIMIT {
            return Err(invalid(
                "http.max_body_bytes",
                format!("must be 1..={MAX_BODY_LIMIT}"),
            ));
        }
        if http.max_in_flight == 0 {
            return Err(invalid("http.max_in_flight", "must be > 0"));
        }
        self.check_archive()?;
        if http.header_read_timeout_ms == 0 {
            return Err(invalid("http.header_read_timeout_ms", "must be > 0"));
        }
        if http.body_read_timeout_ms == 0 {
            return Err(invalid("http.body_read_timeout_ms", "must be > 0"));
        }
        if http.idle_timeout_ms == 0 {
            return Err(invalid("http.idle_timeout_ms", "must be > 0"));
        }
        if http.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be > 0"));
        }
        if let Some(tls) = &http.tls {
            for (key, file) in [
                ("http.tls.cert_file", &tls.cert_file),
                ("http.tls.key_file", &tls.key_file),
            ] {
                if !file.is_file() {
                    return Err(invalid(
                        key,
                        format!("{} is not a readable file", file.display()),
                    ));
                }
            }
        }
        self.auth.check(&http.path)?;
        self.check_events()?;
        if self.spool.max_bytes == 0 {
            return Err(invalid("spool.max_bytes", "must be > 0"));
        }
        if self.spool.cache_bytes < MIN_SPOOL_CACHE {
            return Err(invalid(
                "spool.cache_bytes",
                format!("must be at least {MIN_SPOOL_CACHE} (1 MiB)"),
            ));
        }
        if self.spool.append_timeout_ms == 0 {
            return Err(invalid("spool.append_timeout_ms", "must be > 0"));
        }
        if self.delivery.ack == AckMode::Spooled && self.spool.dir.as_os_str().is_empty() {
            return Err(invalid(
                "spool.dir",
                "must be set when delivery.ack = \"spooled\"",
            ));
        }
        self.amqp.check()?;
        self.archive.check()?;
        self.telemetry.check()?;
        if self.admin.listen == self.http.listen && self.http.listen.port() != 0 {
            return Err(invalid("admin.listen", "must differ from http.listen"));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("{:?} is not a level filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// The archive path's own keys: a path of its own, and limits that can work.
    fn check_archive(&self) -> Result<(), ConfigError> {
        let http = &self.http;
        if !http.archive_path.starts_with('/') {
            return Err(invalid("http.archive_path", "must start with '/'"));
        }
        if http.archive_path == http.path {
            return Err(invalid("http.archive_path", "must differ from http.path"));
        }
        if http.archive_max_body_bytes == 0 || http.archive_max_body_bytes > MAX_BODY_LIMIT {
            return Err(invalid(
                "http.archive_max_body_bytes",
                format!("must be 1..={MAX_BODY_LIMIT}"),
            ));
        }
        if http.archive_max_in_flight == 0 {
            return Err(invalid("http.archive_max_in_flight", "must be > 0"));
        }
        Ok(())
    }

    /// The accept list: known-good type names; the archive type belongs to its own path.
    fn check_events(&self) -> Result<(), ConfigError> {
        let accept = &self.events.accept;
        if accept.is_empty() {
            return Err(invalid(
                "events.accept",
                "must list at least one event type",
            ));
        }
        for t in accept {
            if t.is_empty()
                || t.len() > MAX_EVENT_TYPE_LEN
                || !t.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    "events.accept",
                    format!(
                        "{t:?}: an event type is 1..={MAX_EVENT_TYPE_LEN} printable ASCII characters"
                    ),
                ));
            }
            if t == ARCHIVE_EVENT_TYPE {
                return Err(invalid(
                    "events.accept",
                    format!("{t} is accepted on http.archive_path only; remove it from this list"),
                ));
            }
        }
        if self.events.dedup_max_ids == 0 && self.events.dedup_window_s > 0 {
            return Err(invalid(
                "events.dedup_max_ids",
                "must be > 0 while dedup_window_s > 0",
            ));
        }
        Ok(())
    }

    /// The settings as TOML with secrets redacted, for `check-config`.
    pub fn redacted_toml(&self) -> String {
        // Tokens (also those read from `tokens_file`) are redacted by their serializer.
        // URLs read from `urls_file` are left to the file, so the output loads again.
        let mut shown = self.clone();
        if !shown.amqp.urls_file.is_empty() {
            shown.amqp.urls.clear();
        }
        toml::to_string_pretty(&shown)
            .unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
    }
}

/// Applies `BRIDGE_<SECTION>__<KEY>` variables as overrides. Lists are comma
/// separated; an empty value is an empty list. Values stay strings here and
/// are converted (and checked) with the key's type on deserialization.
fn env_overrides(
    mut builder: config::ConfigBuilder<config::builder::DefaultState>,
    sources: &Sources,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, ConfigError> {
    let vars: Vec<(String, String)> = match &sources.env {
        Some(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        None => std::env::vars().collect(),
    };
    let prefix = format!("{ENV_PREFIX}_");
    for (name, value) in vars {
        // BRIDGE_ENV shares the prefix but selects a file; it is not a key.
        let Some(rest) = name.strip_prefix(&prefix).filter(|_| name != "BRIDGE_ENV") else {
            continue;
        };
        let key = rest.to_lowercase().replace("__", ".");
        builder = if ENV_LIST_KEYS.contains(&key.as_str()) {
            let list: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(String::from)
                .collect();
            builder.set_override(key, list)?
        } else {
            builder.set_override(key, value)?
        };
    }
    Ok(builder)
}
