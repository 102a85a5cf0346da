//! Recently accepted message ids, so a repeated webhook is answered "0" without
//! being published twice. In memory, bounded, per process.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A time- and size-bounded set of message ids.
pub struct Dedup {
    window: Duration,
    max_ids: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// id -> when it was accepted.
    seen: HashMap<String, Instant>,
    /// The same ids, oldest first, for expiry and eviction.
    order: VecDeque<(Instant, String)>,
}

impl Inner {
    /// Forgets ids older than the window, and the oldest beyond `max_ids`.
    fn trim(&mut self, now: Instant, window: Duration, max_ids: usize) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < window && self.order.len() <= max_ids {
                break;
            }
            if let Some((at, id)) = self.order.pop_front() {
                // A re-accepted id has a newer entry; remove only the one we pop.
                if self.seen.get(&id) == Some(&at) {
                    self.seen.remove(&id);
                }
            }
        }
    }
}

impl Dedup {
    /// `window` zero disables it.
    pub fn new(window: Duration, max_ids: usize) -> Self {
        Dedup {
            window,
            max_ids,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent map; keep using it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` was accepted within the window.
    pub fn seen(&self, id: &str) -> bool {
        if self.window.is_zero() {
            return false;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        inner.trim(now, self.window, self.max_ids);
        inner.seen.contains_key(id)
    }

    /// Records `id` as accepted now. Call only once the event is durable.
    pub fn remember(&self, id: &str) {
        if self.window.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        inner.seen.insert(id.to_string(), now);
        inner.order.push_back((now, id.to_string()));
        inner.trim(now, self.window, self.max_ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_window() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        assert!(!d.seen("a"));
        d.remember("a");
        assert!(d.seen("a"));
        assert!(!d.seen("b"));
    }

    #[test]
    fn forgets_after_the_window() {
        let d = Dedup::new(Duration::from_millis(20), 10);
        d.remember("a");
        std::thread::sleep(Duration::from_millis(40));
        assert!(!d.seen("a"));
    }

    #[test]
    fn evicts_the_oldest_beyond_the_bound() {
        let d = Dedup::new(Duration::from_secs(60), 3);
        for id in ["a", "b", "c", "d"] {
            d.remember(id);
        }
        assert!(!d.seen("a"));
        assert!(d.seen("b") && d.seen("c") && d.seen("d"));
        assert_eq!(d.lock().seen.len(), 3);
    }

    #[test]
    fn re_accepting_keeps_the_newer_entry() {
        let d = Dedup::new(Duration::from_secs(60), 2);
        d.remember("a");
        d.remember("a");
        d.remember("b");
        // The first "a" entry is evicted; the second still stands.
        assert!(d.seen("a"));
    }

    #[test]
    fn zero_window_disables() {
        let d = Dedup::new(Duration::ZERO, 10);
        d.remember("a");
        assert!(!d.seen("a"));
    }
}
