//! Slows down guessing at the token URL: after a few wrong credentials from one
//! client address, that address is refused (429) for a while, longer after each
//! further failure. The table is bounded, so a flood of addresses costs at most
//! [`CAPACITY`] entries.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::http::net::canonical;

/// Failures answered 401 before an address is blocked: room for an operator's typo.
pub(crate) const FREE_FAILURES: u32 = 5;
/// The first block; each further failure doubles it, up to [`MAX_BLOCK`].
const FIRST_BLOCK: Duration = Duration::from_secs(1);
/// Longest block: a fixed client (Cellosign with a corrected secret) is not locked out for long.
const MAX_BLOCK: Duration = Duration::from_secs(60);
/// A failure older than this is forgotten (the count restarts).
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Most addresses remembered; when full, the eighth with the oldest failures is
/// dropped at once, so eviction costs O(1) per failure on average.
pub(crate) const CAPACITY: usize = 10_000;

/// One address's recent failures.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Instant,
}

/// Failed attempts per client address (IPv6 by /64, what one host usually holds).
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    table: Mutex<HashMap<IpAddr, Failures>>,
}

impl Throttle {
    /// How long `addr` must still wait, if it is blocked.
    pub(crate) fn blocked(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let failures = table.get(&key(addr))?;
        (failures.blocked_until > now).then(|| failures.blocked_until - now)
    }

    /// Counts a failure of `addr`; returns the block it starts, if it starts one.
    pub(crate) fn failed(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let addr = key(addr);
        if table.len() >= CAPACITY && !table.contains_key(&addr) {
            evict_oldest(&mut table);
        }
        let failures = table.entry(addr).or_insert(Failures {
            count: 0,
            last: now,
            blocked_until: now,
        });
        if now.saturating_duration_since(failures.last) > FORGET_AFTER {
            failures.count = 0;
        }
        failures.count = failures.count.saturating_add(1);
        failures.last = now;
        let over = failures.count.checked_sub(FREE_FAILURES)?;
        let block = FIRST_BLOCK
            .checked_mul(1 << over.min(16))
            .map_or(MAX_BLOCK, |b| b.min(MAX_BLOCK));
        failures.blocked_until = now + block;
        Some(block)
    }

    /// Forgets `addr`'s failures: it presented good credentials.
    pub(crate) fn succeeded(&self, addr: IpAddr) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.remove(&key(addr));
    }

    /// Addresses remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Drops the eighth of the entries whose last failure is oldest.
fn evict_oldest(table: &mut HashMap<IpAddr, Failures>) {
    let mut by_age: Vec<(Instant, IpAddr)> = table.iter().map(|(a, f)| (f.last, *a)).collect();
    let n = (by_age.len() / 8).max(1);
    if n < by_age.len() {
        by_age.select_nth_unstable(n);
    }
    for (_, addr) in by_age.iter().take(n) {
        table.remove(addr);
    }
}

/// The table key: IPv4 as is (also when IPv4-mapped), IPv6 by its /64.
fn key(addr: IpAddr) -> IpAddr {
    match canonical(addr) {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn blocks_after_the_free_failures_doubling_up_to_the_cap() {
        let t = Throttle::default();
        let a = ip("192.0.2.1");
        let mut now = Instant::now();
        for _ in 1..FREE_FAILURES {
            assert_eq!(t.failed(a, now), None);
            assert_eq!(t.blocked(a, now), None);
        }
        assert_eq!(t.failed(a, now), Some(FIRST_BLOCK));
        assert_eq!(t.blocked(a, now), Some(FIRST_BLOCK));
        assert_eq!(
            t.blocked(ip("192.0.2.2"), now),
            None,
            "others are not blocked"
        );
        let mut blocks = Vec::new();
        for _ in 0..10 {
            now += MAX_BLOCK;
            blocks.push(t.failed(a, now).map_or(0, |b| b.as_secs()));
        }
        assert_eq!(blocks, [2, 4, 8, 16, 32, 60, 60, 60, 60, 60]);
    }

    #[test]
    fn success_and_time_forget_failures() {
        let t = Throttle::default();
        let a = ip("192.0.2.1");
        let now = Instant::now();
        for _ in 0..FREE_FAILURES {
            t.failed(a, now);
        }
        t.succeeded(a);
        assert_eq!(t.blocked(a, now), None);
        for _ in 1..FREE_FAILURES {
            t.failed(a, now);
        }
        let later = now + FORGET_AFTER + Duration::from_secs(1);
        assert_eq!(t.failed(a, later), None, "old failures were forgotten");
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_ipv4_as_ipv4() {
        let t = Throttle::default();
        let now = Instant::now();
        for i in 0..FREE_FAILURES {
            t.failed(ip(&format!("2001:db8:1:2::{i:x}")), now);
        }
        assert!(t.blocked(ip("2001:db8:1:2:ffff::1"), now).is_some());
        assert!(t.blocked(ip("2001:db8:1:3::1"), now).is_none());
        for _ in 0..FREE_FAILURES {
            t.failed(ip("::ffff:192.0.2.9"), now);
        }
        assert!(t.blocked(ip("192.0.2.9"), now).is_some());
    }

    #[test]
    fn a_flood_of_addresses_stays_within_capacity() {
        let t = Throttle::default();
        let now = Instant::now();
        let addr = |i: u32| IpAddr::from((0x0a00_0000 + i).to_be_bytes());
        let n = CAPACITY as u32 * 3;
        for i in 0..n {
            t.failed(addr(i), now + Duration::from_millis(u64::from(i)));
            assert!(t.len() <= CAPACITY);
        }
        // The newest addresses are remembered, the oldest were dropped.
        let later = now + Duration::from_millis(u64::from(n));
        for _ in 1..FREE_FAILURES {
            t.failed(addr(n - 1), later);
            t.failed(addr(0), later);
        }
        assert!(t.blocked(addr(n - 1), later).is_some());
        assert!(t.blocked(addr(0), later).is_none());
    }
}
