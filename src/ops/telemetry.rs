//! Log output: text or JSON lines, level from `log.level` unless `RUST_LOG` is set.
//! The level filter sits behind a reload handle, so SIGHUP can change `log.level`.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{LogFormat, LogSettings};

/// Changes the level filter of the subscriber [`init`] installed.
#[derive(Clone)]
pub struct LogControl {
    /// `None` when this process did not install the subscriber (a second `init`).
    handle: Option<reload::Handle<EnvFilter, Registry>>,
    /// `RUST_LOG` chose the filter: it wins over `log.level`, on reload too.
    from_env: bool,
}

/// Why a new level was not applied.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LevelNotApplied {
    /// `RUST_LOG` is set and keeps precedence.
    EnvWins,
    /// The filter did not parse, or no subscriber of ours is installed.
    Unavailable(String),
}

impl LogControl {
    /// Sets the level filter to `level` (`log.level` syntax) for every later event.
    pub(crate) fn set_level(&self, level: &str) -> Result<(), LevelNotApplied> {
        if self.from_env {
            return Err(LevelNotApplied::EnvWins);
        }
        let Some(handle) = &self.handle else {
            return Err(LevelNotApplied::Unavailable(
                "no reloadable subscriber".into(),
            ));
        };
        let filter =
            EnvFilter::try_new(level).map_err(|e| LevelNotApplied::Unavailable(e.to_string()))?;
        handle
            .reload(filter)
            .map_err(|e| LevelNotApplied::Unavailable(e.to_string()))
    }
}

/// Installs the global subscriber; a second call (tests) installs nothing and
/// returns a control that cannot change the level.
pub fn init(log: &LogSettings) -> LogControl {
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, true),
        Err(_) => (EnvFilter::new(&log.level), false),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match log.format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    LogControl {
        handle: installed.is_ok().then_some(handle),
        from_env,
    }
}
