//! Message ids accepted recently or being stored right now, so that a repeated webhook
//! is answered "0" without being published twice. In memory, bounded, per process.
//!
//! Checking and claiming an id is one step ([`Dedup::check`]): of the copies of one event
//! that arrive together, exactly one claims it and stores it; the others wait for that
//! one outcome (single flight), so the event is stored and published once.
//!
//! Ids are kept as 128-bit keyed hashes, not strings: about 70 bytes an id instead
//! of 170, no allocation per request, and with a per-process random key nobody can
//! make two ids meet (by chance, two of 100 000 ids share a key with a probability
//! near 10^-29).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A time- and size-bounded set of message ids, with the ids being stored.
pub struct Dedup {
    shared: Arc<Shared>,
}

/// What [`Dedup`] and its outstanding [`Claim`]s share.
struct Shared {
    window: Duration,
    max_ids: usize,
    /// Two independently keyed SipHashes, one for each half of a [`Key`].
    keys: (RandomState, RandomState),
    state: Mutex<State>,
}

/// A message id as the set keeps it: its 128-bit keyed hash.
type Key = u128;

/// The ids, under one lock.
#[derive(Default)]
struct State {
    /// id -> where it stands.
    ids: HashMap<Key, Entry, BuildHasherDefault<KeyHasher>>,
    /// The accepted ids, oldest first, for expiry and eviction. Ids being stored are not
    /// here: they are never forgotten while their claim is out.
    order: VecDeque<(Instant, Key)>,
}

/// Hashes a [`Key`] by taking its bits: it is already a keyed hash, so hashing it
/// again would only cost time.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }

    /// Not used by [`Key`]; kept correct for any other input.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
}

/// Where one id stands.
enum Entry {
    /// Accepted (durable) at this instant.
    Done(Instant),
    /// Being stored by a [`Claim`]; the channel exists once a copy waits for it.
    Pending(Option<watch::Sender<Outcome>>),
}

/// The outcome of a claim, as its waiters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not known yet.
    Storing,
    /// Stored: answer "0".
    Durable,
    /// Storing failed or was abandoned: answer 503.
    Failed,
}

/// The answer of [`Dedup::check`].
pub enum Check {
    /// Accepted within the window: answer "0" without storing it again.
    Done,
    /// Another copy is being stored right now: wait for its outcome.
    Pending(Pending),
    /// This copy is the one to store: [`Claim::settle`] it once durable; dropping it
    /// instead releases the id (storing failed), and the waiting copies fail too.
    Claimed(Claim),
}

/// A copy waiting for the one copy of its event that is being stored.
pub struct Pending {
    rx: watch::Receiver<Outcome>,
}

impl Pending {
    /// True once the stored copy is durable; false if storing it failed.
    pub(crate) async fn durable(mut self) -> bool {
        match self.rx.wait_for(|o| *o != Outcome::Storing).await {
            Ok(outcome) => *outcome == Outcome::Durable,
            // The claim went away without a word: it did not become durable.
            Err(_) => false,
        }
    }
}

/// The right and duty to store one event. `Send + 'static`, so it can outlive the
/// request (an append that goes on after the caller was answered 503).
pub struct Claim {
    /// None when dedup is disabled, or once settled.
    held: Option<(Arc<Shared>, Key)>,
}

impl Claim {
    /// The event is durable: this id now answers "0", and so do the copies waiting.
    pub(crate) fn settle(mut self) {
        let Some((shared, id)) = self.held.take() else {
            return;
        };
        let now = Instant::now();
        let waiters = {
            let mut state = shared.lock();
            let previous = state.ids.insert(id, Entry::Done(now));
            state.order.push_back((now, id));
            state.trim(now, shared.window, shared.max_ids);
            match previous {
                Some(Entry::Pending(tx)) => tx,
                _ => None,
            }
        };
        if let Some(tx) = waiters {
            tx.send_replace(Outcome::Durable);
        }
    }
}

impl Drop for Claim {
    /// Not settled: storing failed (or was abandoned), so the id is free for a retry.
    fn drop(&mut self) {
        let Some((shared, id)) = self.held.take() else {
            return;
        };
        let waiters = match shared.lock().ids.remove(&id) {
            Some(Entry::Pending(tx)) => tx,
            _ => None,
        };
        if let Some(tx) = waiters {
            tx.send_replace(Outcome::Failed);
        }
    }
}

impl Shared {
    /// The key of `id`.
    fn key(&self, id: &str) -> Key {
        let (high, low) = (&self.keys.0, &self.keys.1);
        (u128::from(high.hash_one(id)) << 64) | u128::from(low.hash_one(id))
    }

    /// The state; a panic while holding the lock leaves it consistent, so keep using it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Forgets ids older than the window, and the oldest beyond `max_ids`.
    fn trim(&mut self, now: Instant, window: Duration, max_ids: usize) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < window && self.order.len() <= max_ids {
                break;
            }
            if let Some((at, id)) = self.order.pop_front()
                && matches!(self.ids.get(&id), Some(Entry::Done(t)) if *t == at)
            {
                self.ids.remove(&id);
            }
        }
    }
}

/// Forgets expired ids while no request comes (requests trim as they check) and
/// gives the table's memory back once most of it is free: without it, the ids of a
/// burst, and the table grown for them, stayed until the next events arrived.
pub(crate) struct Expiry {
    shared: Arc<Shared>,
}

impl Expiry {
    /// Runs until `stop`: a tenth of the window apart (1 to 60 s), one short lock.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let shared = self.shared;
        if shared.window.is_zero() {
            return stop.cancelled().await;
        }
        let period = (shared.window / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let mut state = shared.lock();
                    state.trim(Instant::now(), shared.window, shared.max_ids);
                    state.shrink();
                }
            }
        }
    }
}

impl State {
    /// Gives memory back when at most a quarter of the table is used, keeping room to
    /// double (a smaller table is rebuilt, so this runs from [`Expiry`], not per request).
    fn shrink(&mut self) {
        const SMALLEST: usize = 1024;
        if self.ids.capacity() > SMALLEST && self.ids.len() < self.ids.capacity() / 4 {
            self.ids.shrink_to(self.ids.len() * 2);
        }
        if self.order.capacity() > SMALLEST && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to(self.order.len() * 2);
        }
    }
}

impl Dedup {
    /// The task that expires ids at rest; see [`Expiry`].
    pub(crate) fn expiry(&self) -> Expiry {
        Expiry {
            shared: self.shared.clone(),
        }
    }

    /// `window` zero disables it: every copy is stored.
    pub(crate) fn new(window: Duration, max_ids: usize) -> Self {
        Dedup {
            shared: Arc::new(Shared {
                window,
                max_ids,
                keys: (RandomState::new(), RandomState::new()),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// In one step: whether `id` was accepted within the window, is being stored now, or
    /// is claimed by this call.
    pub(crate) fn check(&self, id: &str) -> Check {
        let shared = &self.shared;
        if shared.window.is_zero() {
            return Check::Claimed(Claim { held: None });
        }
        let id = shared.key(id);
        let now = Instant::now();
        let mut state = shared.lock();
        state.trim(now, shared.window, shared.max_ids);
        match state.ids.get_mut(&id) {
            Some(Entry::Done(_)) => Check::Done,
            Some(Entry::Pending(Some(tx))) => Check::Pending(Pending { rx: tx.subscribe() }),
            Some(Entry::Pending(waiters)) => {
                let (tx, rx) = watch::channel(Outcome::Storing);
                *waiters = Some(tx);
                Check::Pending(Pending { rx })
            }
            None => {
                state.ids.insert(id, Entry::Pending(None));
                Check::Claimed(Claim {
                    held: Some((shared.clone(), id)),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(d: &Dedup, id: &str) -> Claim {
        match d.check(id) {
            Check::Claimed(c) => c,
            Check::Done => panic!("{id}: done"),
            Check::Pending(_) => panic!("{id}: pending"),
        }
    }

    fn is_done(d: &Dedup, id: &str) -> bool {
        match d.check(id) {
            Check::Done => true,
            Check::Pending(_) => panic!("{id}: pending"),
            // Dropped at once: released again.
            Check::Claimed(_) => false,
        }
    }

    #[test]
    fn remembers_within_the_window() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        claim(&d, "a").settle();
        assert!(is_done(&d, "a"));
        assert!(!is_done(&d, "b"));
    }

    #[test]
    fn forgets_after_the_window() {
        let d = Dedup::new(Duration::from_millis(20), 10);
        claim(&d, "a").settle();
        std::thread::sleep(Duration::from_millis(40));
        assert!(!is_done(&d, "a"));
    }

    #[test]
    fn evicts_the_oldest_beyond_the_bound() {
        let d = Dedup::new(Duration::from_secs(60), 3);
        for id in ["a", "b", "c", "d"] {
            claim(&d, id).settle();
        }
        assert_eq!(d.shared.lock().ids.len(), 3);
        assert!(is_done(&d, "b") && is_done(&d, "c") && is_done(&d, "d"));
        assert!(!is_done(&d, "a"));
    }

    #[test]
    fn an_id_being_stored_is_never_evicted() {
        let d = Dedup::new(Duration::from_secs(60), 1);
        let a = claim(&d, "a");
        for id in ["b", "c", "d"] {
            claim(&d, id).settle();
        }
        assert!(matches!(d.check("a"), Check::Pending(_)));
        a.settle();
        assert!(is_done(&d, "a"));
        assert_eq!(d.shared.lock().ids.len(), 1);
    }

    #[test]
    fn distinct_ids_never_meet() {
        // The keys must depend on every byte of the id: ids that differ only at the
        // end, or only in length, stay apart.
        let d = Dedup::new(Duration::from_secs(60), 300_000);
        let base =
            "3fa85f64-5717-4562-b3fc-2c963f66afa6:WHEF_CLIENT_FORM_SUBMITTED:2025-01-26T08:49:33.";
        for n in 0..100_000u32 {
            claim(&d, &format!("{base}{n:06}")).settle();
            claim(&d, &format!("{base}{n}x")).settle();
        }
        assert_eq!(d.shared.lock().ids.len(), 200_000);
        assert!(is_done(&d, &format!("{base}000042")));
    }

    #[tokio::test]
    async fn expiry_forgets_ids_at_rest_and_gives_the_table_back() {
        let d = Dedup::new(Duration::from_millis(200), 100_000);
        for n in 0..20_000 {
            claim(&d, &format!("id-{n}")).settle();
        }
        let grown = d.shared.lock().ids.capacity();
        let stop = CancellationToken::new();
        let task = tokio::spawn(d.expiry().run(stop.clone()));
        // The first tick comes at once (ids still young), the next after 1 s.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        {
            let state = d.shared.lock();
            assert_eq!(state.ids.len(), 0);
            assert_eq!(state.order.len(), 0);
            assert!(
                state.ids.capacity() < grown / 4,
                "{} of {grown}",
                state.ids.capacity()
            );
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops when told")
            .expect("no panic");
    }

    #[test]
    fn zero_window_disables() {
        let d = Dedup::new(Duration::ZERO, 10);
        let first = claim(&d, "a");
        let second = claim(&d, "a");
        first.settle();
        second.settle();
        assert!(!is_done(&d, "a"));
        assert!(d.shared.lock().ids.is_empty());
    }

    #[tokio::test]
    async fn copies_wait_for_the_stored_one() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        let c = claim(&d, "a");
        let waiters: Vec<_> = (0..5)
            .map(|_| match d.check("a") {
                Check::Pending(p) => tokio::spawn(p.durable()),
                _ => panic!("expected pending"),
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(waiters.iter().all(|w| !w.is_finished()));
        c.settle();
        for w in waiters {
            assert!(w.await.unwrap());
        }
        assert!(is_done(&d, "a"));
    }

    #[tokio::test]
    async fn a_failed_store_fails_its_copies_and_frees_the_id() {
        let d = Dedup::new(Duration::from_secs(60), 10);
        let c = claim(&d, "a");
        let Check::Pending(p) = d.check("a") else {
            panic!("expected pending");
        };
        let Check::Pending(q) = d.check("a") else {
            panic!("expected pending");
        };
        drop(c);
        assert!(!p.durable().await);
        assert!(!q.durable().await);
        // A later retry stores it.
        claim(&d, "a").settle();
        assert!(is_done(&d, "a"));
    }

    #[test]
    fn one_claim_among_racing_copies() {
        let d = Arc::new(Dedup::new(Duration::from_secs(60), 100));
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|_| {
                let (d, barrier) = (d.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    match d.check("same") {
                        // Held past the race, so every other copy sees it pending.
                        Check::Claimed(c) => Some(c),
                        _ => None,
                    }
                })
            })
            .collect();
        let claims: Vec<Claim> = threads
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(claims.len(), 1);
    }
}
