//! SIGHUP: read the layered configuration again, from the sources the bridge
//! started with, and put in force what can change under load (SPEC 8). What
//! changes is decided per key:
//!
//! * applied to requests that start after the reload ([`RELOADABLE`]): the
//!   [`Live`] bundle is rebuilt and swapped whole, and `log.level` is set;
//! * every other changed key is named in one warning line (never its value: it
//!   may be a secret) as needing a restart, and keeps its running value;
//! * a config that does not load or check is refused with one error line naming
//!   the key, and nothing changes.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;
use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{ConfigError, Settings, Sources};
use crate::http::token::TokenKeys;
use crate::ingress::live::{Live, LiveConfig};
use crate::ops::metrics::Metrics;
use crate::ops::telemetry::{LevelNotApplied, LogControl};

/// The keys a reload applies; every other changed key needs a restart.
pub(crate) const RELOADABLE: [&str; 7] = [
    "auth.tokens",
    "auth.tokens_file",
    "auth.allow_from",
    "auth.allow_query_token",
    "http.trusted_proxies",
    "events.accept",
    "log.level",
];

/// What a reload needs from `main`: the sources the settings came from, the log
/// level control, and the SIGHUP handler, installed when this is made.
pub struct OnHangup {
    sources: Sources,
    log: LogControl,
    hangup: Signal,
}

impl OnHangup {
    /// Installs the SIGHUP handler now (from here on SIGHUP no longer ends the
    /// process; signals that come before the bridge serves are acted on once it
    /// does). `sources` are read again on each signal.
    pub fn install(sources: Sources, log: LogControl) -> std::io::Result<OnHangup> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(OnHangup {
            sources,
            log,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// Re-reads the configuration on demand and applies it.
pub(crate) struct Reloader {
    sources: Sources,
    /// The configuration in force: the start's, with the reloadable keys of each
    /// applied reload. Restart-only keys keep their start values, so a changed one
    /// is named again on every reload until the restart.
    running: Settings,
    live: LiveConfig,
    /// The running signing keys: the new [`Live`] verifies with them.
    keys: Option<Arc<TokenKeys>>,
    metrics: Arc<Metrics>,
    log: LogControl,
}

impl Reloader {
    /// The reloader of `on`, and the signals it waits for.
    pub(crate) fn new(
        on: OnHangup,
        running: Settings,
        live: LiveConfig,
        keys: Option<Arc<TokenKeys>>,
        metrics: Arc<Metrics>,
    ) -> (Self, Signal) {
        let reloader = Reloader {
            sources: on.sources,
            running,
            live,
            keys,
            metrics,
            log: on.log,
        };
        (reloader, on.hangup)
    }

    /// Reloads on every `hangup` until `stop`. The files are read off the runtime.
    pub(crate) async fn run(mut self, mut hangup: Signal, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                got = hangup.recv() => if got.is_none() {
                    // No more signals can come: nothing to do until the stop.
                    stop.cancelled().await;
                    return;
                },
            }
            let sources = self.sources.clone();
            match tokio::task::spawn_blocking(move || Settings::load(&sources)).await {
                Ok(loaded) => self.apply(loaded),
                Err(e) => self.refuse(&e),
            }
        }
    }

    /// Applies a freshly loaded configuration, or refuses it.
    pub(crate) fn apply(&mut self, loaded: Result<Settings, ConfigError>) {
        let new = match loaded {
            Ok(new) => new,
            Err(e) => return self.refuse(&e),
        };
        let changed = changed_keys(&self.running, &new);
        let (applied, restart): (Vec<&str>, Vec<&str>) = changed
            .iter()
            .map(String::as_str)
            .partition(|key| RELOADABLE.contains(key));
        let live = Live::build(
            &new.auth,
            &new.http.trusted_proxies,
            &new.events.accept,
            self.running.amqp.routing_key.clone(),
            self.keys.clone(),
            &self.metrics,
        );
        if live.auth.is_open() {
            warn!(
                "auth.tokens and auth.clients are empty: anyone who can reach the webhook can post events"
            );
        }
        self.live.replace(live);
        if applied.contains(&"log.level") {
            match self.log.set_level(&new.log.level) {
                Ok(()) => {}
                Err(LevelNotApplied::EnvWins) => {
                    warn!(key = "log.level", "RUST_LOG is set and wins over log.level")
                }
                Err(LevelNotApplied::Unavailable(why)) => {
                    warn!(key = "log.level", error = %why, "log.level could not be applied")
                }
            }
        }
        for key in &restart {
            warn!(
                key,
                "config reload: {key} changed and needs a restart to take effect; its running value is kept"
            );
        }
        let running = &mut self.running;
        running.auth.tokens = new.auth.tokens;
        running.auth.tokens_file = new.auth.tokens_file;
        running.auth.allow_from = new.auth.allow_from;
        running.auth.allow_query_token = new.auth.allow_query_token;
        running.http.trusted_proxies = new.http.trusted_proxies;
        running.events.accept = new.events.accept;
        running.log.level = new.log.level;
        self.metrics.config_reloads.inc();
        info!(
            applied = %applied.join(","),
            restart_needed = %restart.join(","),
            "config reloaded"
        );
    }

    /// One error line naming the key; the running configuration stays.
    fn refuse(&self, why: &dyn std::fmt::Display) {
        self.metrics.config_reload_failures.inc();
        error!(error = %why, "config reload refused, the running configuration is kept");
    }
}

/// The keys whose values differ, as dotted paths (`http.max_in_flight`; a list or
/// table of lists, such as `auth.clients`, is one key). Secrets serialize redacted,
/// so they are compared apart, by value, and named by the key that holds them.
fn changed_keys(old: &Settings, new: &Settings) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    match (serde_json::to_value(old), serde_json::to_value(new)) {
        (Ok(a), Ok(b)) => diff("", &a, &b, &mut keys),
        // Cannot happen (the settings serialize for `check-config`); claim the worst.
        _ => {
            keys.insert("(whole configuration)".to_string());
        }
    }
    if old.auth.tokens != new.auth.tokens {
        keys.insert("auth.tokens".into());
    }
    if old.auth.token_keys != new.auth.token_keys {
        keys.insert("auth.token_keys_file".into());
    }
    let secrets = |s: &Settings| -> Vec<Option<String>> {
        s.auth
            .clients
            .iter()
            .map(|c| c.secret.as_ref().map(|s| s.expose().to_owned()))
            .collect()
    };
    if secrets(old) != secrets(new) {
        keys.insert("auth.clients".into());
    }
    if old.amqp.urls != new.amqp.urls {
        keys.insert("amqp.urls".into());
    }
    keys
}

/// Adds to `keys` each leaf under `path` that differs between `a` and `b`.
fn diff(path: &str, a: &Value, b: &Value, keys: &mut BTreeSet<String>) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let names: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for name in names {
                let key = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}.{name}")
                };
                diff(
                    &key,
                    a.get(name).unwrap_or(&Value::Null),
                    b.get(name).unwrap_or(&Value::Null),
                    keys,
                );
            }
        }
        _ if a != b => {
            keys.insert(path.to_string());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_are_named_by_path_and_secrets_compared_by_value() {
        let old = Settings::default();
        let mut new = old.clone();
        assert!(changed_keys(&old, &new).is_empty());
        new.http.max_in_flight += 1;
        new.auth.tokens = vec!["a".into()];
        new.events.accept.pop();
        let keys: Vec<String> = changed_keys(&old, &new).into_iter().collect();
        assert_eq!(keys, ["auth.tokens", "events.accept", "http.max_in_flight"]);
        // Same count, other value: only the value comparison sees it.
        let mut rotated = new.clone();
        rotated.auth.tokens = vec!["b".into()];
        rotated.auth.token_keys = vec!["k".into()];
        let keys: Vec<String> = changed_keys(&new, &rotated).into_iter().collect();
        assert_eq!(keys, ["auth.token_keys_file", "auth.tokens"]);
    }
}
