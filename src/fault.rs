//! Fault injection for the tests that break things on purpose.
//!
//! Some failures cannot be produced on demand with real parts (an fsync that
//! stalls, a task that panics, a commit that fails after reaching the disk).
//! Builds with the `fault-injection` feature (the test suite's, never a
//! release's) read `CELLOSIGN_BRIDGE_FAULTS` once, a comma list of
//! `point` or `point=millis`; without the feature every check is a constant
//! `None` and compiles away.

use std::time::Duration;

/// The environment variable that names the faults to inject.
pub const ENV: &str = "CELLOSIGN_BRIDGE_FAULTS";

/// Whether fault `point` is on; with a value when one was given (`point=ms`).
#[cfg(feature = "fault-injection")]
pub(crate) fn armed(point: &str) -> Option<Duration> {
    use std::sync::OnceLock;
    static FAULTS: OnceLock<Vec<(String, Duration)>> = OnceLock::new();
    FAULTS
        .get_or_init(|| {
            std::env::var(ENV)
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| match s.split_once('=') {
                    Some((name, ms)) => (
                        name.trim().to_string(),
                        Duration::from_millis(ms.trim().parse().unwrap_or(0)),
                    ),
                    None => (s.trim().to_string(), Duration::ZERO),
                })
                .collect()
        })
        .iter()
        .find(|(name, _)| name == point)
        .map(|(_, d)| *d)
}

/// Whether fault `point` is on: never, in a build without `fault-injection`.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn armed(_point: &str) -> Option<Duration> {
    None
}

/// Whether one-shot fault `point` fires now: true the first time it is asked while
/// armed, false ever after (e.g. "fail the first commit holding appends").
#[cfg(feature = "fault-injection")]
pub(crate) fn once(point: &str) -> bool {
    use std::sync::Mutex;
    static FIRED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if armed(point).is_none() {
        return false;
    }
    let mut fired = FIRED.lock().unwrap_or_else(|p| p.into_inner());
    if fired.iter().any(|p| p == point) {
        return false;
    }
    fired.push(point.to_string());
    true
}

/// Whether one-shot fault `point` fires now: never, in a build without `fault-injection`.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn once(_point: &str) -> bool {
    false
}
