//! [`Spool`], the handle callers hold, with its options and statistics: opening, inspecting,
//! appending, removing, reading and waiting. Writes are queued to the writer thread
//! ([`super::writer`]); reads and statistics are served from [`Shared`] directly.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Builder, DatabaseError};
use tokio::sync::oneshot;
use tracing::{debug, info};

use super::error::SpoolError;
use super::shared::{NO_RECORD, Shared};
use super::store::{self, FILE_NAME, Scan};
use super::writer::{self, Op};

/// Largest record accepted, well under redb's 3 GiB value limit.
pub const MAX_RECORD_LEN: usize = 1 << 30;

/// Default of [`SpoolOptions::append_timeout`] (`spool.append_timeout_ms`).
pub const DEFAULT_APPEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Default of [`SpoolOptions::removal_delay`]: short next to the idle flush and to what
/// an operator reads off the spool depth, long next to the gap between appends at an
/// ordinary webhook rate, so that removals nearly always ride an append's commit.
pub const DEFAULT_REMOVAL_DELAY: Duration = Duration::from_millis(20);

/// Tunables for [`Spool::open_with`]; [`SpoolOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Limit on the summed length of stored records (payload bytes, not file size: the file is
    /// larger by the B-tree overhead), checked when an append is accepted.
    pub max_bytes: u64,
    /// redb page cache size. Default 4 MiB: the spool is read back soon after it is written, and
    /// a deep backlog drains as fast from the OS page cache (bench e2e, drain part).
    pub cache_bytes: usize,
    /// redb quick repair: stores allocator state on every commit (2 fsyncs per commit) so a
    /// reopen after a crash skips the full-file check. Default off: the spool is normally small,
    /// and append latency matters more.
    pub quick_repair: bool,
    /// How long a caller waits for an append to become durable before answering 503 (the
    /// append itself goes on). Not enforced by [`Spool::append`]; see [`Spool::append_timeout`].
    pub append_timeout: Duration,
    /// How long a removal may wait to ride another commit before it is committed by
    /// itself (see [`Spool::remove_soon`]).
    pub removal_delay: Duration,
}

impl SpoolOptions {
    /// Defaults with the given byte limit.
    pub(crate) fn new(max_bytes: u64) -> Self {
        SpoolOptions {
            max_bytes,
            cache_bytes: 4 << 20,
            quick_repair: false,
            append_timeout: DEFAULT_APPEND_TIMEOUT,
            removal_delay: DEFAULT_REMOVAL_DELAY,
        }
    }
}

/// Accounting snapshot, read from memory by [`Spool::stats`] or from the file by
/// [`Spool::inspect`], for the admin endpoint, metrics and the CLI.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Records stored (accepted and not yet removed).
    pub events: u64,
    /// Summed length of the stored records, in bytes.
    pub bytes: u64,
    /// Append time of the oldest stored record, unix milliseconds.
    pub oldest_append_ms: Option<u64>,
    /// Age of the oldest stored record at the time of the call: the forwarding lag.
    pub oldest_age: Option<Duration>,
    /// Highest sequence number handed out so far (also after its record was removed).
    pub last_seq: Option<u64>,
    /// Write transactions committed since open (durable or not); shows group commit at work.
    pub commits: u64,
    /// Of those, the ones committed with `Durability::Immediate` (one fsync each).
    pub durable_commits: u64,
    /// The last write failed; cleared by the next append that is stored, or by the writer's own
    /// probe (every [`RECOVERY_INTERVAL`](super::writer::RECOVERY_INTERVAL)) once the disk takes
    /// writes again.
    pub degraded: bool,
    /// Reopens after storage errors since open. Removals not yet durable may be undone by one,
    /// so a forwarder that keeps a read cursor should restart it from `None` when this changes.
    pub reopens: u64,
    /// Whether a record as large as the last one refused as full (or of one byte, if none
    /// was) would fit now: what readiness reports.
    pub has_room: bool,
}

/// Handle to an open spool. Cheap to clone (an `Arc`), `Send + Sync`. Dropping the last clone
/// only signals the writer thread and does not wait: the writer then finishes its queued
/// operations, closes the file and exits by itself. To know the file is closed (its lock
/// released), call [`Spool::shutdown`] (async code should, before dropping) or await
/// `Spool::writer_stopped`.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.inner.shared.path)
            .field("max_bytes", &self.inner.shared.max_bytes)
            .finish_non_exhaustive()
    }
}

/// What the clones of one [`Spool`] share. No `Drop`: dropping it drops `tx`, which closes the
/// writer's channel, and that is the whole signal; nothing here waits for the writer.
struct Inner {
    /// The writer's queue.
    tx: mpsc::Sender<Op>,
    /// State read without the writer.
    shared: Arc<Shared>,
}

impl Spool {
    /// Opens (creating if needed, each new directory fsync'd into its parent) the spool in `dir`
    /// with default options and the given byte limit. Blocking: repairs the file after a crash
    /// and scans it once for the accounting.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        Self::open_with(dir, SpoolOptions::new(max_bytes))
    }

    /// Like [`Spool::open`] with explicit options. Returns [`SpoolError::Locked`] when another
    /// process has the file open.
    pub(crate) fn open_with(dir: &Path, opts: SpoolOptions) -> Result<Spool, SpoolError> {
        store::create_dir_durable(dir)?;
        let path = dir.join(FILE_NAME);
        let db = store::open_database(&path, &opts)?;
        let scan = store::scan(&db)?;
        info!(
            path = %path.display(),
            events = scan.events,
            bytes = scan.bytes,
            next_seq = scan.next_seq,
            "spool opened"
        );
        let shared = Arc::new(Shared::new(path, opts, db, &scan));
        let tx = writer::spawn(shared.clone(), scan.next_seq)?;
        Ok(Spool {
            inner: Arc::new(Inner { tx, shared }),
        })
    }

    /// Whether `dir` holds a spool file, without opening (or creating) anything.
    pub(crate) fn exists(dir: &Path) -> io::Result<bool> {
        dir.join(FILE_NAME).try_exists()
    }

    /// Reads the accounting of the spool in `dir` without starting a writer, for a CLI. Opens
    /// read-only when the file was closed cleanly, otherwise opens it writable so redb repairs
    /// it. Returns [`SpoolError::Locked`] while the server has it open.
    pub fn inspect(dir: &Path) -> Result<SpoolStats, SpoolError> {
        let path = dir.join(FILE_NAME);
        if !path.try_exists()? {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no spool file at {}", path.display()),
            )
            .into());
        }
        let scan = match Builder::new().open_read_only(&path) {
            Ok(db) => {
                let scan = store::scan(&db);
                if let Err(e) = db.close() {
                    debug!("closing read-only spool: {e}");
                }
                scan?
            }
            Err(DatabaseError::RepairAborted) => {
                let db = store::open_database(&path, &SpoolOptions::new(0))?;
                let scan = store::scan(&db);
                db.close()
                    .map_err(|e| SpoolError::from_database(e, &path))?;
                scan?
            }
            Err(e) => return Err(SpoolError::from_database(e, &path)),
        };
        Ok(stats_of_scan(&scan))
    }

    /// Stores `record` and returns its sequence number once it is durable (fsynced). Fails at
    /// once with [`SpoolError::Full`] over the limit. Dropping the future does not cancel the
    /// write: the record may still be stored and will be forwarded.
    pub async fn append(&self, record: impl Into<Bytes>) -> Result<u64, SpoolError> {
        self.append_parts(record.into(), Bytes::new()).await
    }

    /// [`Spool::append`] of the record `head` followed by `body`, without joining them in
    /// memory: an event's body is copied once, into the database, however large it is.
    pub(crate) async fn append_parts(&self, head: Bytes, body: Bytes) -> Result<u64, SpoolError> {
        let shared = &self.inner.shared;
        let total = head.len().saturating_add(body.len());
        if total > MAX_RECORD_LEN {
            return Err(SpoolError::TooLarge {
                len: total,
                max: MAX_RECORD_LEN,
            });
        }
        let data = [head, body];
        let len = total as u64;
        let mut used = shared.reserved.load(Ordering::Acquire);
        loop {
            let new = used.saturating_add(len);
            if new > shared.max_bytes {
                shared.refused_len.store(len, Ordering::Release);
                return Err(SpoolError::Full {
                    len,
                    used,
                    max: shared.max_bytes,
                });
            }
            match shared.reserved.compare_exchange_weak(
                used,
                new,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    shared.refused_len.store(0, Ordering::Release);
                    break;
                }
                Err(actual) => used = actual,
            }
        }
        let (reply, rx) = oneshot::channel();
        let op = Op::Append {
            data,
            ts_ms: now_ms(),
            reply,
        };
        if self.send(op).is_err() {
            shared.release(len);
            return Err(SpoolError::Closed);
        }
        // A dropped reply means the writer exited without handling the op (after shutdown); its
        // reservation no longer matters then.
        rx.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Deletes the given records and waits for the commit; returns how many existed.
    /// Committed without fsync: visible at once, durable with the next durable commit, so a crash
    /// can bring a few back (a duplicate publish, never a loss).
    #[cfg(test)]
    pub(crate) async fn remove(&self, seqs: Vec<u64>) -> Result<usize, SpoolError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        self.request(|reply| Op::Remove { seqs, reply }).await
    }

    /// Deletes the records in `seqs` (drained, so the caller's buffer is kept) after the
    /// broker confirmed them, without waiting: they ride the writer's next commit, or are
    /// committed by themselves within [`SpoolOptions::removal_delay`], without fsync either
    /// way, so a crash can bring a few back (a duplicate publish, never a loss). At most one
    /// message per delay wakes the writer for them. A commit that fails reopens the spool,
    /// which [`Spool::wait_for_new`] reports, and its removals come back to be forwarded again.
    pub(crate) fn remove_soon(&self, seqs: &mut Vec<u64>) -> Result<(), SpoolError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let shared = &self.inner.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        shared
            .removals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .append(seqs);
        // Added before telling: the writer clears the flag before it takes the list, so
        // what it does not take, a later message tells it about.
        if shared.removals_told.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.send(Op::RemoveSoon)
    }

    /// Finishes queued operations, commits durably, closes the file and stops the writer. Later
    /// calls on any clone fail with [`SpoolError::Closed`]; the file lock is released on return.
    pub async fn shutdown(&self) -> Result<(), SpoolError> {
        self.request(|reply| Op::Shutdown { reply }).await
    }

    /// Up to `limit` records with a sequence number above `after` (all when `None`), in order,
    /// from the latest committed snapshot. Runs on tokio's blocking pool.
    #[cfg(test)]
    pub(crate) async fn read_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, SpoolError> {
        self.read_after_within(after, limit, usize::MAX).await
    }

    /// [`Spool::read_after`] that stops once the records read sum to `max_bytes` or more
    /// (one record at least, however large): the forwarder bounds what it holds in bytes.
    pub(crate) async fn read_after_within(
        &self,
        after: Option<u64>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, SpoolError> {
        let this = self.clone();
        let read = move || this.read_blocking(after, limit, max_bytes);
        match tokio::task::spawn_blocking(read).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(SpoolError::Closed),
        }
    }

    /// Synchronous [`Spool::read_after`], for callers already off the async executor.
    #[cfg(test)]
    pub(crate) fn read_after_blocking(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, SpoolError> {
        self.read_blocking(after, limit, usize::MAX)
    }

    /// The read of [`Spool::read_after_within`], on the calling thread.
    fn read_blocking(
        &self,
        after: Option<u64>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, SpoolError> {
        let start = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(a) => a + 1,
        };
        let shared = &self.inner.shared;
        // Held through the read so the writer cannot swap the database underneath.
        let guard = shared.read_db();
        let Some(db) = guard.as_ref() else {
            return Err(if shared.closed.load(Ordering::Acquire) {
                SpoolError::Closed
            } else {
                SpoolError::not_open()
            });
        };
        store::read_from(db, start, limit, max_bytes)
    }

    /// Waits until a record with a sequence number above `after` has been committed, or the
    /// spool was reopened after a storage error since it had been reopened `reopens` times
    /// (the caller's read cursor is stale then), so the forwarder sleeps instead of polling;
    /// returns the highest committed sequence number. Returns at once if either already
    /// happened, and [`SpoolError::Closed`] after shutdown.
    pub(crate) async fn wait_for_new(
        &self,
        after: Option<u64>,
        reopens: u64,
    ) -> Result<u64, SpoolError> {
        let shared = &self.inner.shared;
        let floor = after.unwrap_or(0);
        let woken = |last: u64| last > floor || shared.reopens.load(Ordering::Acquire) != reopens;
        let mut rx = shared.last_seq.subscribe();
        let last = *rx
            .wait_for(|&last| woken(last) || shared.closed.load(Ordering::Acquire))
            .await
            .map_err(|_| SpoolError::Closed)?;
        if woken(last) {
            Ok(last)
        } else {
            Err(SpoolError::Closed)
        }
    }

    /// Current accounting, from atomics (no I/O).
    pub fn stats(&self) -> SpoolStats {
        let s = &self.inner.shared;
        let oldest = s.oldest_ms.load(Ordering::Acquire);
        let oldest_append_ms = (oldest != NO_RECORD).then_some(oldest);
        SpoolStats {
            events: s.events.load(Ordering::Acquire),
            bytes: s.bytes.load(Ordering::Acquire),
            oldest_append_ms,
            oldest_age: oldest_append_ms.map(age_of),
            last_seq: seq_if_any(*s.last_seq.borrow()),
            commits: s.commits.load(Ordering::Acquire),
            durable_commits: s.durable_commits.load(Ordering::Acquire),
            degraded: s.degraded.load(Ordering::Acquire),
            reopens: s.reopens.load(Ordering::Acquire),
            has_room: s
                .reserved
                .load(Ordering::Acquire)
                .saturating_add(s.refused_len.load(Ordering::Acquire).max(1))
                <= s.max_bytes,
        }
    }

    /// Resolves when the writer thread has ended (after shutdown, after the last handle was
    /// dropped, or because it died), so a supervisor can tell that nothing will be stored any
    /// more. By then the file is closed, unless the writer died.
    pub(crate) fn writer_stopped(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.inner.shared.writer_gone.clone().cancelled_owned()
    }

    /// [`SpoolOptions::append_timeout`]: how long a caller should wait for an append.
    pub(crate) fn append_timeout(&self) -> Duration {
        self.inner.shared.opts.append_timeout
    }

    /// The state behind this handle, for unit tests that need to hold the writer up.
    #[cfg(test)]
    pub(super) fn shared(&self) -> Arc<Shared> {
        self.inner.shared.clone()
    }

    /// Queues `op` for the writer; fails once the writer is gone.
    pub(super) fn send(&self, op: Op) -> Result<(), SpoolError> {
        self.inner.tx.send(op).map_err(|_| SpoolError::Closed)
    }

    /// Queues the op `make` builds around a reply channel and waits for the writer's answer;
    /// [`SpoolError::Closed`] if the writer is gone or exits without answering.
    async fn request<T>(&self, make: impl FnOnce(writer::Reply<T>) -> Op) -> Result<T, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.unwrap_or(Err(SpoolError::Closed))
    }
}

/// [`SpoolStats`] of a file read by [`Spool::inspect`]: no writer, so no commit counters.
fn stats_of_scan(scan: &Scan) -> SpoolStats {
    SpoolStats {
        events: scan.events,
        bytes: scan.bytes,
        oldest_append_ms: scan.oldest_ms,
        oldest_age: scan.oldest_ms.map(age_of),
        last_seq: seq_if_any(scan.next_seq - 1),
        ..SpoolStats::default()
    }
}

/// A sequence number kept as 0 for "none yet", as an `Option`.
fn seq_if_any(seq: u64) -> Option<u64> {
    (seq > 0).then_some(seq)
}

/// Wall-clock time in unix milliseconds, the append time stored with each record.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long ago `ts_ms` was (zero if in the future: the clock may step back).
fn age_of(ts_ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ts_ms))
}
