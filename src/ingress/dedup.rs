//! Message ids accepted recently or being stored right now, so that a repeated webhook
//! is answered "0" without being published twice. In memory, bounded, per process.
//!
//! Checking and claiming an id is one step ([`Dedup::check`]): of the copies of one event
//! that arrive together, exactly one claims it and stores it; the others wait for that
//! one outcome (single flight), so the event is stored and published once.
//!
//! Ids are kept as 128-bit keyed hashes, not strings: no allocation per request, and
//! with a per-process random key nobody can make two ids meet (by chance, two of
//! 100 000 ids share a key with a probability near 10^-29).
//!
//! Memory: about 70 bytes an id at `max_ids`, allocated once (README, Memory). The set
//! of accepted ids takes 17 bytes a slot and is sized for twice `max_ids` when it
//! first fills (hashbrown then reuses the room of forgotten ids in place instead of
//! doubling); the expiry queue takes 24 bytes an id, sized for `max_ids`.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
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
    /// How long an accepted id is remembered, in nanoseconds (as [`State::order`]
    /// keeps times), converted once here rather than on every check.
    window: u64,
    max_ids: usize,
    /// Two independently keyed SipHashes, one for each half of a [`Key`].
    keys: (RandomState, RandomState),
    /// Times are kept as nanoseconds since this instant: 8 bytes, not an `Instant`'s 16.
    epoch: Instant,
    state: Mutex<State>,
}

/// A message id as the set keeps it: its 128-bit keyed hash, as two `u64`s so that it
/// packs at 8-byte alignment (a `u128` would pad every queue entry to 32 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    high: u64,
    low: u64,
}

impl Hash for Key {
    /// Half of the key is already a keyed hash: [`KeyHasher`] takes it as it is.
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.low);
    }
}

/// Hashes a [`Key`] by taking its bits: it is already a keyed hash, so hashing it
/// again would only cost time.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, half: u64) {
        self.0 = half;
    }

    /// Not used by [`Key`]; kept correct for any other input.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
}

type KeyHash = BuildHasherDefault<KeyHasher>;

/// The ids, under one lock. An id is in at most one of `done` and `storing`; every id
/// in `done` is in `order` once, at the time it was accepted.
#[derive(Default)]
struct State {
    /// The accepted (durable) ids.
    done: HashSet<Key, KeyHash>,
    /// The accepted ids with the time they were accepted (nanoseconds since
    /// [`Shared::epoch`]), oldest first, for expiry and eviction.
    order: VecDeque<(u64, Key)>,
    /// The ids being stored by a [`Claim`], with the channel that exists once a copy
    /// waits for the outcome. As many as requests in flight: they are never evicted.
    storing: HashMap<Key, Option<watch::Sender<Outcome>>, KeyHash>,
    /// Whether `done` has had its full size since it was last shrunk: it then grows
    /// no more (removals leave room that hashbrown reuses in place), and before that
    /// it grows to full size in one step, not by doublings that each hold the old
    /// and the new table at once.
    sized: bool,
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
        let waiters = {
            let now = shared.now();
            let mut state = shared.lock();
            // Room first, so that the queue never outgrows `max_ids`.
            state.trim(now, shared.window, shared.max_ids.saturating_sub(1));
            state.accept(id, now, shared.max_ids);
            state.storing.remove(&id).flatten()
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
        let waiters = shared.lock().storing.remove(&id).flatten();
        if let Some(tx) = waiters {
            tx.send_replace(Outcome::Failed);
        }
    }
}

impl Shared {
    /// The key of `id`.
    fn key(&self, id: &str) -> Key {
        Key {
            high: self.keys.0.hash_one(id),
            low: self.keys.1.hash_one(id),
        }
    }

    /// Nanoseconds since [`Shared::epoch`] (u64 lasts 584 years).
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The state; a panic while holding the lock leaves it consistent, so keep using it.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    /// Forgets ids older than the window, and the oldest while more than `keep` remain.
    fn trim(&mut self, now: u64, window: u64, keep: usize) {
        while let Some(&(at, id)) = self.order.front() {
            if now.saturating_sub(at) < window && self.order.len() <= keep {
                break;
            }
            self.order.pop_front();
            self.done.remove(&id);
        }
    }

    /// Records `id` as accepted at `now`. The set is allocated at its full size the
    /// first time it fills up (see [`State::sized`]), the queue at its first id and
    /// again at the first after a shrink.
    fn accept(&mut self, id: Key, now: u64, max_ids: usize) {
        if !self.sized && self.done.len() == self.done.capacity() {
            self.done
                .reserve(max_ids.saturating_mul(2).saturating_sub(self.done.len()));
            self.sized = true;
        }
        // A no-op while there is room; after a shrink, straight back to full size.
        self.order
            .reserve_exact(max_ids.saturating_sub(self.order.len()));
        self.done.insert(id);
        self.order.push_back((now, id));
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
        if shared.window == 0 {
            return stop.cancelled().await;
        }
        let period = Duration::from_nanos(shared.window / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let now = shared.now();
                    let mut state = shared.lock();
                    state.trim(now, shared.window, shared.max_ids);
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
        if self.done.capacity() > SMALLEST && self.done.len() < self.done.capacity() / 4 {
            self.done.shrink_to(self.done.len() * 2);
            self.sized = false;
        }
        if self.order.capacity() > SMALLEST && self.order.len() < self.order.capacity() / 4 {
            self.order.shrink_to(self.order.len() * 2);
        }
        if self.storing.capacity() > SMALLEST && self.storing.len() < self.storing.capacity() / 4 {
            self.storing.shrink_to(self.storing.len() * 2);
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
                window: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
                max_ids,
                keys: (RandomState::new(), RandomState::new()),
                epoch: Instant::now(),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// In one step: whether `id` was accepted within the window, is being stored now, or
    /// is claimed by this call.
    pub(crate) fn check(&self, id: &str) -> Check {
        let shared = &self.shared;
        if shared.window == 0 {
            return Check::Claimed(Claim { held: None });
        }
        let id = shared.key(id);
        let now = shared.now();
        let mut state = shared.lock();
        state.trim(now, shared.window, shared.max_ids);
        if state.done.contains(&id) {
            return Check::Done;
        }
        match state.storing.entry(id) {
            Entry::Occupied(mut storing) => match storing.get_mut() {
                Some(tx) => Check::Pending(Pending { rx: tx.subscribe() }),
                waiters => {
                    let (tx, rx) = watch::channel(Outcome::Storing);
                    *waiters = Some(tx);
                    Check::Pending(Pending { rx })
                }
            },
            Entry::Vacant(storing) => {
                storing.insert(None);
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
        assert_eq!(d.shared.lock().done.len(), 3);
        assert!(is_done(&d, "b") && is_done(&d, "c") && is_done(&d, "d"));
        assert!(!is_done(&d, "a"));
    }

    #[test]
    fn the_key_hasher_keeps_other_input_apart_too() {
        // Only `Key` is hashed here, through `write_u64`; `write` is the trait's
        // general path, kept correct should anything else ever be hashed with it.
        let hash = |bytes: &[u8]| {
            let mut h = KeyHasher::default();
            h.write(bytes);
            h.finish()
        };
        assert_eq!(hash(b"ab"), hash(b"ab"));
        assert_ne!(hash(b"ab"), hash(b"ba"));
        // Past eight bytes the rotation brings earlier bytes back onto later ones.
        assert_ne!(hash(&[1; 8]), hash(&[1; 9]));
    }

    #[test]
    fn shrink_gives_back_what_is_mostly_unused_and_keeps_room_to_double() {
        let d = Dedup::new(Duration::from_secs(60), 10_000);
        for n in 0..3_000 {
            claim(&d, &format!("id-{n}")).settle();
        }
        let mut pending: Vec<Claim> = (0..5_000).map(|n| claim(&d, &format!("p-{n}"))).collect();
        let (order, storing, done) = {
            let mut state = d.shared.lock();
            let sizes = (
                state.order.capacity(),
                state.storing.capacity(),
                state.done.capacity(),
            );
            // More than a quarter used: the queue and the claims kept as they are.
            state.shrink();
            assert_eq!(state.order.capacity(), sizes.0, "queue shrunk at 30% use");
            assert_eq!(
                state.storing.capacity(),
                sizes.1,
                "claims shrunk at full use"
            );
            sizes
        };
        pending.truncate(1_000);
        let mut state = d.shared.lock();
        state.trim(0, 60_000_000_000, 1_000);
        // A quarter or less used: given back down to twice the length.
        state.shrink();
        let (order_now, storing_now) = (state.order.capacity(), state.storing.capacity());
        assert!(
            (2_000..order / 4).contains(&order_now),
            "{order_now} of {order}"
        );
        assert!(
            (2_000..storing).contains(&storing_now),
            "{storing_now} of {storing}"
        );
        let done_now = state.done.capacity();
        assert!((2_000..done).contains(&done_now), "{done_now} of {done}");
        drop(state);
    }

    #[test]
    fn churn_never_grows_the_tables_past_their_first_size() {
        // The sizes that README's memory figures are made of.
        assert_eq!(std::mem::size_of::<Key>(), 16);
        assert_eq!(std::mem::size_of::<(u64, Key)>(), 24);
        let max_ids = 1000;
        let d = Dedup::new(Duration::from_secs(60), max_ids);
        claim(&d, "first").settle();
        let sized = d.shared.lock().done.capacity();
        assert!(sized >= 2 * max_ids, "{sized}");
        for n in 0..20 * max_ids {
            claim(&d, &format!("id-{n}")).settle();
        }
        let state = d.shared.lock();
        assert_eq!(state.done.len(), max_ids);
        // Removals leave tombstones that lower the capacity until a rehash in place;
        // a rebuild would have raised it.
        assert!(
            state.done.capacity() <= sized,
            "rebuilt larger than {sized}"
        );
        assert_eq!(state.order.len(), max_ids);
        assert!(
            state.order.capacity() <= max_ids,
            "{}",
            state.order.capacity()
        );
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
        assert_eq!(d.shared.lock().done.len(), 1);
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
        assert_eq!(d.shared.lock().done.len(), 200_000);
        assert!(is_done(&d, &format!("{base}000042")));
    }

    #[tokio::test]
    async fn expiry_forgets_ids_at_rest_and_gives_the_table_back() {
        let d = Dedup::new(Duration::from_millis(200), 100_000);
        for n in 0..20_000 {
            claim(&d, &format!("id-{n}")).settle();
        }
        let grown = d.shared.lock().done.capacity();
        let stop = CancellationToken::new();
        let task = tokio::spawn(d.expiry().run(stop.clone()));
        // The first tick comes at once (ids still young), the next after 1 s.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        {
            let state = d.shared.lock();
            assert_eq!(state.done.len(), 0);
            assert_eq!(state.order.len(), 0);
            assert!(
                state.done.capacity() < grown / 4,
                "{} of {grown}",
                state.done.capacity()
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
        assert!(d.shared.lock().done.is_empty());
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
