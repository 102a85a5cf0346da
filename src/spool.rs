//! Durable local store-and-forward spool.
//!
//! Webhook events are appended here before the HTTP request is answered, and the forwarder
//! removes them once RabbitMQ has confirmed them. The store is one redb file, `spool.redb`.
//!
//! * One writer thread owns every write transaction. All appends queued at one moment share one
//!   write transaction and one `Durability::Immediate` commit (one fsync): group commit.
//! * Removals ride the same thread, committed with `Durability::None` (a lost removal only means
//!   a duplicate publish). redb makes a `None` commit durable with the next `Immediate` commit, or
//!   when the database is closed; the writer forces an `Immediate` commit after
//!   [`MAX_NONDURABLE_STREAK`] `None` commits in a row, after [`IDLE_FLUSH`] without work, and on
//!   [`Spool::flush`] / [`Spool::shutdown`].
//! * redb refuses further write transactions after a failed commit until the database is closed
//!   and reopened, so after any write error the writer reopens the file at once (and before the
//!   next batch, while that fails), durably deletes whatever the failed batch may have left on
//!   disk before any reader sees the reopened file, and rescans the accounting.
//! * While writes fail the spool reports itself degraded; the writer probes for room every
//!   [`RECOVERY_INTERVAL`] by itself, so readiness comes back with no request to wake it.
//!
//! Each value is `[append time, unix millis, u64 LE][record bytes]`, keyed by its sequence number.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{
    Builder, Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition,
    TableError,
};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::fault;

/// Name of the database file inside the spool directory.
pub const FILE_NAME: &str = "spool.redb";

/// Largest record accepted, well under redb's 3 GiB value limit.
pub const MAX_RECORD_LEN: usize = 1 << 30;

/// `None` commits in a row after which the writer commits durably anyway, so that a crash loses
/// a bounded number of removals and redb can reclaim the freed pages.
pub const MAX_NONDURABLE_STREAK: u32 = 32;

/// Idle time after which pending `None` commits are made durable by an empty `Immediate` commit.
pub const IDLE_FLUSH: Duration = Duration::from_millis(250);

/// While degraded, how often the writer checks by itself whether writes work again. Readiness
/// promises to come back within 2 s of the disk having room.
pub const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);

/// Default of [`SpoolOptions::append_timeout`] (`spool.append_timeout_ms`).
pub const DEFAULT_APPEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes the recovery probe writes and fsyncs beside the database: room for a few events.
const PROBE_BYTES: usize = 64 << 10;

/// Name of the recovery probe's scratch file inside the spool directory.
const PROBE_FILE: &str = "spool.probe";

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_NEXT_SEQ: &str = "next_seq";
const TS_LEN: usize = 8;
const NO_RECORD: u64 = u64::MAX;

/// Errors of the spool. Cloneable, because one failed group commit answers many waiters.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// The record would take the spool past `max_bytes`; nothing was written. Callers should
    /// shed load (e.g. HTTP 503) rather than retry at once.
    #[error("spool full: {used} bytes used + {len} bytes would exceed the limit of {max} bytes")]
    Full {
        /// Length of the rejected record.
        len: u64,
        /// Bytes already held or being written.
        used: u64,
        /// The configured limit.
        max: u64,
    },
    /// The record is longer than [`MAX_RECORD_LEN`]; nothing was written.
    #[error("record of {len} bytes exceeds the maximum record size of {max} bytes")]
    TooLarge {
        /// Length of the rejected record.
        len: usize,
        /// [`MAX_RECORD_LEN`].
        max: usize,
    },
    /// The disk or redb failed (ENOSPC, EIO, corruption). For an append this means the record
    /// was not accepted: should the failed commit have reached the disk anyway, the spool deletes
    /// it durably when it reopens the file, before any reader can see it (only a crash before
    /// that can bring it back, as a duplicate). The spool reopens its file by itself.
    #[error("spool storage error: {0}")]
    Storage(#[source] Arc<redb::Error>),
    /// A file-system operation outside redb failed (creating the directory, the writer thread).
    #[error("spool I/O error: {0}")]
    Io(#[source] Arc<io::Error>),
    /// Another process (normally the running server) holds the spool file open, so a CLI must
    /// ask that process instead.
    #[error(
        "spool {} is locked by another process: the server is running; ask its admin endpoint",
        .0.display()
    )]
    Locked(PathBuf),
    /// The spool was shut down or its writer thread is gone.
    #[error("spool is closed")]
    Closed,
    /// A stored value is shorter than its timestamp prefix: the file was altered outside redb.
    #[error("spool record {seq} is corrupt")]
    Corrupt {
        /// Sequence number of the bad record.
        seq: u64,
    },
}

impl SpoolError {
    /// True when the underlying cause is a full disk, so a server can answer 507 and alert on it.
    pub fn is_no_space(&self) -> bool {
        let io = match self {
            SpoolError::Storage(e) => match e.as_ref() {
                redb::Error::Io(io) => io,
                _ => return false,
            },
            SpoolError::Io(io) => io.as_ref(),
            _ => return false,
        };
        io.kind() == io::ErrorKind::StorageFull || io.raw_os_error() == Some(28)
    }
}

impl From<redb::Error> for SpoolError {
    fn from(e: redb::Error) -> Self {
        SpoolError::Storage(Arc::new(e))
    }
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        SpoolError::Io(Arc::new(e))
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for SpoolError {
            fn from(e: $t) -> Self {
                SpoolError::Storage(Arc::new(redb::Error::from(e)))
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError,
    redb::SetDurabilityError
);

fn db_error(e: DatabaseError, path: &Path) -> SpoolError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            SpoolError::Locked(path.to_path_buf())
        }
        e => SpoolError::Storage(Arc::new(e.into())),
    }
}

/// Tunables for [`Spool::open_with`]; [`SpoolOptions::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Limit on the summed length of stored records (payload bytes, not file size: the file is
    /// larger by the B-tree overhead), checked when an append is accepted.
    pub max_bytes: u64,
    /// redb page cache size. Default 64 MiB: the spool is read back soon after it is written.
    pub cache_bytes: usize,
    /// redb quick repair: stores allocator state on every commit (2 fsyncs per commit) so a
    /// reopen after a crash skips the full-file check. Default off: the spool is normally small,
    /// and append latency matters more.
    pub quick_repair: bool,
    /// How long a caller waits for an append to become durable before answering 503 (the
    /// append itself goes on). Not enforced by [`Spool::append`]; see [`Spool::append_timeout`].
    pub append_timeout: Duration,
}

impl SpoolOptions {
    /// Defaults with the given byte limit.
    pub fn new(max_bytes: u64) -> Self {
        SpoolOptions {
            max_bytes,
            cache_bytes: 64 << 20,
            quick_repair: false,
            append_timeout: DEFAULT_APPEND_TIMEOUT,
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
    /// probe (every [`RECOVERY_INTERVAL`]) once the disk takes writes again.
    pub degraded: bool,
    /// Reopens after storage errors since open. Removals not yet durable may be undone by one,
    /// so a forwarder that keeps a read cursor should restart it from `None` when this changes.
    pub reopens: u64,
    /// Whether a record as large as the last one refused as full (or of one byte, if none
    /// was) would fit now: what readiness reports.
    pub has_room: bool,
}

/// Handle to an open spool. Cheap to clone (an `Arc`), `Send + Sync`. The writer thread ends,
/// after finishing its queued operations and closing the file, when the last clone is dropped;
/// that drop blocks until then, so async code should call [`Spool::shutdown`] first.
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

struct Inner {
    tx: Option<mpsc::Sender<Op>>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel lets the writer drain what is queued, close the file and exit;
        // joining makes sure the file lock is released when the last handle is gone.
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("spool writer thread panicked");
        }
    }
}

struct Shared {
    /// Cancelled when the writer thread ends, however it ends (a panic included).
    writer_gone: tokio_util::sync::CancellationToken,
    path: PathBuf,
    max_bytes: u64,
    opts: SpoolOptions,
    // None only while a reopen after a storage error has not succeeded yet.
    db: RwLock<Option<Database>>,
    events: AtomicU64,
    bytes: AtomicU64,
    // bytes + bytes of appends accepted but not yet committed: what max_bytes is checked against.
    reserved: AtomicU64,
    // Length of the last record refused as Full, 0 once an append fits again.
    refused_len: AtomicU64,
    // NO_RECORD when empty.
    oldest_ms: AtomicU64,
    commits: AtomicU64,
    durable_commits: AtomicU64,
    reopens: AtomicU64,
    degraded: AtomicBool,
    closed: AtomicBool,
    // Highest committed sequence number, 0 = none yet.
    last_seq: watch::Sender<u64>,
}

impl Shared {
    /// The spool directory (the database file's).
    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        }
    }

    fn read_db(&self) -> RwLockReadGuard<'_, Option<Database>> {
        self.db.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, len: u64) {
        self.reserved.fetch_sub(len, Ordering::AcqRel);
    }

    // Replaces the byte and event accounting with a fresh scan, keeping in-flight reservations.
    fn apply_scan(&self, scan: &Scan) {
        let old = self.bytes.swap(scan.bytes, Ordering::AcqRel);
        if scan.bytes >= old {
            self.reserved.fetch_add(scan.bytes - old, Ordering::AcqRel);
        } else {
            self.reserved.fetch_sub(old - scan.bytes, Ordering::AcqRel);
        }
        self.events.store(scan.events, Ordering::Release);
        self.oldest_ms
            .store(scan.oldest_ms.unwrap_or(NO_RECORD), Ordering::Release);
    }
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Op {
    Append {
        data: Bytes,
        ts_ms: u64,
        reply: Reply<u64>,
    },
    Remove {
        seqs: Vec<u64>,
        reply: Reply<usize>,
    },
    Flush {
        reply: Reply<()>,
    },
    Shutdown {
        reply: Reply<()>,
    },
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
    pub fn open_with(dir: &Path, opts: SpoolOptions) -> Result<Spool, SpoolError> {
        create_dir_durable(dir)?;
        let path = dir.join(FILE_NAME);
        let db = open_database(&path, &opts)?;
        let scan = scan(&db)?;
        info!(
            path = %path.display(),
            events = scan.events,
            bytes = scan.bytes,
            next_seq = scan.next_seq,
            "spool opened"
        );
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            writer_gone: tokio_util::sync::CancellationToken::new(),
            path,
            max_bytes: opts.max_bytes,
            opts,
            db: RwLock::new(Some(db)),
            events: AtomicU64::new(scan.events),
            bytes: AtomicU64::new(scan.bytes),
            reserved: AtomicU64::new(scan.bytes),
            refused_len: AtomicU64::new(0),
            oldest_ms: AtomicU64::new(scan.oldest_ms.unwrap_or(NO_RECORD)),
            commits: AtomicU64::new(0),
            durable_commits: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
            degraded: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_seq: watch::Sender::new(scan.next_seq - 1),
        });
        let writer = Writer {
            shared: shared.clone(),
            rx,
            next_seq: scan.next_seq,
            needs_reopen: false,
            purge: Vec::new(),
            nondurable_streak: 0,
            next_probe: None,
        };
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                // Signals the end of the thread even when it unwinds.
                let _gone = writer.shared.writer_gone.clone().drop_guard();
                writer.run()
            })?;
        Ok(Spool {
            inner: Arc::new(Inner {
                tx: Some(tx),
                thread: Some(thread),
                shared,
            }),
        })
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
                let scan = scan(&db);
                if let Err(e) = db.close() {
                    debug!("closing read-only spool: {e}");
                }
                scan?
            }
            Err(DatabaseError::RepairAborted) => {
                let db = open_database(&path, &SpoolOptions::new(0))?;
                let scan = scan(&db);
                db.close().map_err(|e| db_error(e, &path))?;
                scan?
            }
            Err(e) => return Err(db_error(e, &path)),
        };
        let last = scan.next_seq - 1;
        Ok(SpoolStats {
            events: scan.events,
            bytes: scan.bytes,
            oldest_append_ms: scan.oldest_ms,
            oldest_age: scan.oldest_ms.map(age_of),
            last_seq: (last > 0).then_some(last),
            ..SpoolStats::default()
        })
    }

    /// Stores `record` and returns its sequence number once it is durable (fsynced). Fails at
    /// once with [`SpoolError::Full`] over the limit. Dropping the future does not cancel the
    /// write: the record may still be stored and will be forwarded.
    pub async fn append(&self, record: impl Into<Bytes>) -> Result<u64, SpoolError> {
        let data = record.into();
        let shared = &self.inner.shared;
        if data.len() > MAX_RECORD_LEN {
            return Err(SpoolError::TooLarge {
                len: data.len(),
                max: MAX_RECORD_LEN,
            });
        }
        let len = data.len() as u64;
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

    /// Deletes the given records after the broker confirmed them; returns how many existed.
    /// Committed without fsync: visible at once, durable with the next durable commit, so a crash
    /// can bring a few back (a duplicate publish, never a loss).
    pub async fn remove(&self, seqs: Vec<u64>) -> Result<usize, SpoolError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Op::Remove { seqs, reply })
            .map_err(|_| SpoolError::Closed)?;
        rx.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Makes all earlier removals durable with one `Immediate` commit.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Flush { reply })
            .map_err(|_| SpoolError::Closed)?;
        rx.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Finishes queued operations, commits durably, closes the file and stops the writer. Later
    /// calls on any clone fail with [`SpoolError::Closed`]; the file lock is released on return.
    pub async fn shutdown(&self) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Shutdown { reply })
            .map_err(|_| SpoolError::Closed)?;
        rx.await.unwrap_or(Err(SpoolError::Closed))
    }

    /// Up to `limit` records with a sequence number above `after` (all when `None`), in order,
    /// from the latest committed snapshot. Runs on tokio's blocking pool.
    pub async fn read_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, SpoolError> {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.read_after_blocking(after, limit)).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(SpoolError::Closed),
        }
    }

    /// Synchronous [`Spool::read_after`], for callers already off the async executor.
    pub fn read_after_blocking(
        &self,
        after: Option<u64>,
        limit: usize,
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
                not_open_error()
            });
        };
        let txn = db.begin_read()?;
        let table = match txn.open_table(RECORDS) {
            Ok(t) => t,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::with_capacity(limit.min(4096));
        for entry in table.range(start..)?.take(limit) {
            let (k, v) = entry?;
            let seq = k.value();
            let value = v.value();
            if value.len() < TS_LEN {
                return Err(SpoolError::Corrupt { seq });
            }
            out.push((seq, Bytes::copy_from_slice(&value[TS_LEN..])));
        }
        Ok(out)
    }

    /// Waits until a record with a sequence number above `after` has been committed, so the
    /// forwarder sleeps instead of polling; returns the highest committed sequence number.
    /// Returns at once if there already is one, and [`SpoolError::Closed`] after shutdown.
    pub async fn wait_for_new(&self, after: Option<u64>) -> Result<u64, SpoolError> {
        let shared = &self.inner.shared;
        let floor = after.unwrap_or(0);
        let mut rx = shared.last_seq.subscribe();
        let last = *rx
            .wait_for(|&last| last > floor || shared.closed.load(Ordering::Acquire))
            .await
            .map_err(|_| SpoolError::Closed)?;
        if last > floor {
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
        let last = *s.last_seq.borrow();
        SpoolStats {
            events: s.events.load(Ordering::Acquire),
            bytes: s.bytes.load(Ordering::Acquire),
            oldest_append_ms,
            oldest_age: oldest_append_ms.map(age_of),
            last_seq: (last > 0).then_some(last),
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

    /// Resolves when the writer thread has ended (after shutdown, or because it died), so a
    /// supervisor can tell that nothing will be stored any more.
    pub fn writer_stopped(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.inner.shared.writer_gone.clone().cancelled_owned()
    }

    /// [`SpoolOptions::append_timeout`]: how long a caller should wait for an append.
    pub fn append_timeout(&self) -> Duration {
        self.inner.shared.opts.append_timeout
    }

    /// The configured byte limit, for reporting next to [`Spool::stats`].
    pub fn max_bytes(&self) -> u64 {
        self.inner.shared.max_bytes
    }

    /// Path of the database file, for logs and the admin endpoint.
    pub fn path(&self) -> &Path {
        &self.inner.shared.path
    }

    fn send(&self, op: Op) -> Result<(), ()> {
        match &self.inner.tx {
            Some(tx) => tx.send(op).map_err(|_| ()),
            None => Err(()),
        }
    }
}

fn not_open_error() -> SpoolError {
    SpoolError::Storage(Arc::new(redb::Error::Io(io::Error::other(
        "spool database is not open: reopening after a storage error failed; retried on next write",
    ))))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn age_of(ts_ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(ts_ms))
}

fn ts_of(value: &[u8]) -> Option<u64> {
    let prefix: [u8; TS_LEN] = value.get(..TS_LEN)?.try_into().ok()?;
    Some(u64::from_le_bytes(prefix))
}

/// Creates `dir` and its missing ancestors, and fsyncs the parent of each directory it created:
/// without that, a crash can lose the new directory entry, and the spool file with it (the file
/// itself is fsync'd into `dir` by [`open_database`]). Returns the directories it created.
fn create_dir_durable(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut next = Some(dir);
    while let Some(d) = next {
        if d.as_os_str().is_empty() || d.try_exists()? {
            break;
        }
        missing.push(d.to_path_buf());
        next = d.parent();
    }
    missing.reverse();
    for d in &missing {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            // Created meanwhile by someone else: its entry still needs to be durable.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
            Err(e) => return Err(e),
        }
        sync_dir(d.parent())?;
    }
    Ok(missing)
}

/// fsyncs a directory, so the entries created in it survive a crash. `None` or `""` is the
/// current directory.
fn sync_dir(dir: Option<&Path>) -> io::Result<()> {
    let dir = match dir {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

/// Whether the file system under `dir` takes [`PROBE_BYTES`] more, fsync'd: a cheap check
/// before the writer reopens the database (a repair scans the whole file) after a failure.
fn probe_room(dir: &Path) -> io::Result<()> {
    use std::io::Write;
    static ZEROS: [u8; PROBE_BYTES] = [0; PROBE_BYTES];
    let path = dir.join(PROBE_FILE);
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&ZEROS)?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&path);
    written?;
    // A probe file left behind would hold the very room being probed for.
    removed
}

fn open_database(path: &Path, opts: &SpoolOptions) -> Result<Database, SpoolError> {
    let existed = path.try_exists()?;
    let mut builder = Builder::new();
    builder.set_cache_size(opts.cache_bytes);
    let repair_path = path.to_path_buf();
    let logged = AtomicBool::new(false);
    builder.set_repair_callback(move |_session| {
        // Called repeatedly during a repair; log once.
        if !logged.swap(true, Ordering::Relaxed) {
            warn!(path = %repair_path.display(), "spool was not closed cleanly; repairing");
        }
    });
    let db = builder.create(path).map_err(|e| db_error(e, path))?;
    if !existed {
        // Make the new file's directory entry durable too.
        sync_dir(path.parent())?;
    }
    Ok(db)
}

#[derive(Debug)]
struct Scan {
    events: u64,
    bytes: u64,
    oldest_ms: Option<u64>,
    next_seq: u64,
}

fn scan(db: &impl ReadableDatabase) -> Result<Scan, SpoolError> {
    let txn = db.begin_read()?;
    let mut s = Scan {
        events: 0,
        bytes: 0,
        oldest_ms: None,
        next_seq: 1,
    };
    match txn.open_table(META) {
        Ok(meta) => {
            if let Some(v) = meta.get(META_NEXT_SEQ)? {
                s.next_seq = s.next_seq.max(v.value());
            }
        }
        Err(TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let table = match txn.open_table(RECORDS) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(s),
        Err(e) => return Err(e.into()),
    };
    let mut last = 0;
    for entry in table.iter()? {
        let (k, v) = entry?;
        let seq = k.value();
        let value = v.value();
        let ts = ts_of(value).ok_or(SpoolError::Corrupt { seq })?;
        if s.oldest_ms.is_none() {
            s.oldest_ms = Some(ts);
        }
        s.events += 1;
        s.bytes += (value.len() - TS_LEN) as u64;
        last = seq;
    }
    s.next_seq = s.next_seq.max(last + 1);
    Ok(s)
}

#[derive(Default)]
struct Batch {
    appends: Vec<(Bytes, u64, Reply<u64>)>,
    removes: Vec<(Vec<u64>, Reply<usize>)>,
    flushes: Vec<Reply<()>>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.appends.is_empty() && self.removes.is_empty() && self.flushes.is_empty()
    }

    fn append_bytes(&self) -> u64 {
        self.appends.iter().map(|(d, _, _)| d.len() as u64).sum()
    }

    fn fail(self, e: &SpoolError) {
        for (_, _, reply) in self.appends {
            let _ = reply.send(Err(e.clone()));
        }
        for (_, reply) in self.removes {
            let _ = reply.send(Err(e.clone()));
        }
        for reply in self.flushes {
            let _ = reply.send(Err(e.clone()));
        }
    }
}

#[derive(Default)]
struct Outcome {
    removed_events: u64,
    removed_bytes: u64,
    remove_counts: Vec<usize>,
    oldest_ms: Option<u64>,
}

type RecordTable<'t> = redb::Table<'t, u64, &'static [u8]>;

// Shortest run of consecutive seqs deleted with one range scan instead of key by key.
const MIN_RANGE_RUN: usize = 8;

// Deletes the given seqs, returning how many existed; consecutive runs go through retain_in.
fn remove_seqs(
    table: &mut RecordTable<'_>,
    seqs: &[u64],
    out: &mut Outcome,
) -> Result<usize, SpoolError> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let before = out.removed_events;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i + 1;
        while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
            j += 1;
        }
        if j - i >= MIN_RANGE_RUN {
            remove_range(table, sorted[i], sorted[j - 1], out)?;
        } else {
            for &seq in &sorted[i..j] {
                if let Some(v) = table.remove(seq)? {
                    out.removed_events += 1;
                    out.removed_bytes += v.value().len().saturating_sub(TS_LEN) as u64;
                }
            }
        }
        i = j;
    }
    Ok((out.removed_events - before) as usize)
}

fn remove_range(
    table: &mut RecordTable<'_>,
    lo: u64,
    hi: u64,
    out: &mut Outcome,
) -> Result<(), SpoolError> {
    let (mut events, mut bytes) = (0u64, 0u64);
    table.retain_in(lo..=hi, |_, v: &[u8]| {
        events += 1;
        bytes += v.len().saturating_sub(TS_LEN) as u64;
        false
    })?;
    out.removed_events += events;
    out.removed_bytes += bytes;
    Ok(())
}

/// The writer thread's state: the only place that writes the database.
struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Op>,
    next_seq: u64,
    needs_reopen: bool,
    // Inclusive seq ranges of failed batches: a failed commit may still have reached the disk.
    // The next reopen deletes them durably, before readers can see the reopened file.
    purge: Vec<(u64, u64)>,
    nondurable_streak: u32,
    // While degraded: when the writer next checks by itself whether writes work again.
    next_probe: Option<Instant>,
}

impl Writer {
    /// Runs batches until every handle is gone or [`Spool::shutdown`], then closes the file.
    fn run(mut self) {
        let mut shutdown = None;
        loop {
            let first = match self.wake_in() {
                Some(wait) => match self.rx.recv_timeout(wait) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match self.rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                },
            };
            // Checked on every wake-up, so a steady trickle of work cannot postpone it.
            self.probe_if_due();
            let Some(first) = first else {
                // Idle: make the pending `None` commits durable (a no-op if there are none).
                if !self.needs_reopen {
                    self.execute(Batch::default(), true);
                }
                continue;
            };
            if fault::armed("spool.writer_panic").is_some() {
                panic!("fault injected: spool.writer_panic");
            }
            if let Some(stall) = fault::armed("spool.commit_stall") {
                // A slow disk: what arrives meanwhile joins this batch, as it would.
                std::thread::sleep(stall);
            }
            // Group commit: everything queued right now goes into one transaction.
            let mut batch = Batch::default();
            let mut next = Some(first);
            while let Some(op) = next {
                match op {
                    Op::Append { data, ts_ms, reply } => batch.appends.push((data, ts_ms, reply)),
                    Op::Remove { seqs, reply } => batch.removes.push((seqs, reply)),
                    Op::Flush { reply } => batch.flushes.push(reply),
                    Op::Shutdown { reply } => shutdown = Some(reply),
                }
                next = self.rx.try_recv().ok();
            }
            let force = shutdown.is_some();
            self.execute(batch, force);
            if shutdown.is_some() {
                break;
            }
        }
        self.shared.closed.store(true, Ordering::Release);
        let result = self.close();
        // Wake wait_for_new() callers so they see `closed`.
        self.shared.last_seq.send_modify(|_| {});
        match shutdown {
            Some(reply) => {
                let _ = reply.send(result);
            }
            None => {
                if let Err(e) = result {
                    error!("closing spool: {e}");
                }
            }
        }
        // Ops queued after a shutdown are dropped with `rx`; their callers see Closed.
    }

    /// How long the writer may wait for work: until the idle flush or the next recovery
    /// probe is due; `None` (for ever) when neither is pending.
    fn wake_in(&self) -> Option<Duration> {
        let flush = (self.nondurable_streak > 0).then_some(IDLE_FLUSH);
        let probe = self
            .next_probe
            .map(|at| at.saturating_duration_since(Instant::now()));
        match (flush, probe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Marks the spool degraded (readiness fails) and schedules the writer's own probe.
    fn degrade(&mut self) {
        if !self.shared.degraded.swap(true, Ordering::AcqRel) {
            warn!(
                every_ms = RECOVERY_INTERVAL.as_millis() as u64,
                "spool cannot write; probing until it can"
            );
        }
        self.next_probe
            .get_or_insert_with(|| Instant::now() + RECOVERY_INTERVAL);
    }

    /// Writes work again (an append was stored, or the probe passed): readiness comes back.
    fn recovered(&mut self) {
        self.next_probe = None;
        if self.shared.degraded.swap(false, Ordering::AcqRel) {
            info!("spool writes work again");
        }
    }

    /// While degraded and the probe is due: whether the disk takes writes again, then reopens
    /// the file if needed. No request is needed for readiness to come back.
    fn probe_if_due(&mut self) {
        let Some(at) = self.next_probe else {
            return;
        };
        if Instant::now() < at {
            return;
        }
        let result = match probe_room(self.shared.dir()) {
            Ok(()) if self.needs_reopen => self.reopen(),
            Ok(()) => Ok(()),
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(()) => self.recovered(),
            Err(e) => {
                debug!("spool still cannot write: {e}");
                self.next_probe = Some(Instant::now() + RECOVERY_INTERVAL);
            }
        }
    }

    /// Makes pending removals durable and closes the file, at the end of [`Writer::run`].
    fn close(&mut self) -> Result<(), SpoolError> {
        let mut result = Ok(());
        if self.nondurable_streak > 0 && !self.needs_reopen {
            // redb would promote them on close too, but this reports a failure.
            let (reply, mut rx) = oneshot::channel();
            let batch = Batch {
                flushes: vec![reply],
                ..Batch::default()
            };
            self.execute(batch, true);
            // execute() answers synchronously.
            result = rx.try_recv().unwrap_or(Err(SpoolError::Closed));
        }
        let mut slot = self
            .shared
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(db) = slot.take()
            && let Err(e) = db.close()
        {
            let e = db_error(e, &self.shared.path);
            if !self.needs_reopen {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Commits one batch (reopening the file first if a write failed) and answers its callers.
    fn execute(&mut self, batch: Batch, force_durable: bool) {
        // Forcing durability of nothing is a no-op.
        if batch.is_empty() && (!force_durable || self.nondurable_streak == 0) {
            return;
        }
        let shared = self.shared.clone();
        if self.needs_reopen
            && let Err(e) = self.reopen()
        {
            warn!("spool reopen failed: {e}");
            self.degrade();
            shared.release(batch.append_bytes());
            batch.fail(&e);
            return;
        }
        let durable = force_durable
            || !batch.appends.is_empty()
            || !batch.flushes.is_empty()
            || self.nondurable_streak >= MAX_NONDURABLE_STREAK;
        let first_seq = self.next_seq;
        let n = batch.appends.len() as u64;
        let append_bytes = batch.append_bytes();
        match self.commit(&batch, first_seq, durable) {
            Ok(out) => {
                self.next_seq = first_seq + n;
                shared.events.fetch_add(n, Ordering::AcqRel);
                shared
                    .events
                    .fetch_sub(out.removed_events, Ordering::AcqRel);
                shared.bytes.fetch_add(append_bytes, Ordering::AcqRel);
                shared.bytes.fetch_sub(out.removed_bytes, Ordering::AcqRel);
                shared.release(out.removed_bytes);
                shared
                    .oldest_ms
                    .store(out.oldest_ms.unwrap_or(NO_RECORD), Ordering::Release);
                shared.commits.fetch_add(1, Ordering::AcqRel);
                if durable {
                    shared.durable_commits.fetch_add(1, Ordering::AcqRel);
                    self.nondurable_streak = 0;
                } else {
                    self.nondurable_streak += 1;
                }
                if n > 0 {
                    // Only stored events prove there is room; a removal frees space instead.
                    self.recovered();
                    shared.last_seq.send_replace(first_seq + n - 1);
                }
                for (i, (_, _, reply)) in batch.appends.into_iter().enumerate() {
                    let _ = reply.send(Ok(first_seq + i as u64));
                }
                for ((_, reply), count) in batch.removes.into_iter().zip(out.remove_counts) {
                    let _ = reply.send(Ok(count));
                }
                for reply in batch.flushes {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                error!(
                    appends = n,
                    removes = batch.removes.len(),
                    "spool commit failed: {e}"
                );
                // redb refuses further writes after a failed commit until reopened.
                self.needs_reopen = true;
                // Unflushed None commits die with the failed handle; no idle flush to retry.
                self.nondurable_streak = 0;
                self.degrade();
                if n > 0 {
                    // Never reuse these numbers, and delete them if the commit landed after all.
                    self.purge.push((first_seq, first_seq + n - 1));
                    self.next_seq = first_seq + n;
                }
                shared.release(append_bytes);
                batch.fail(&e);
                // At once rather than at the next batch: the purge should not wait for traffic.
                if let Err(e) = self.reopen() {
                    warn!("spool reopen failed: {e}");
                }
            }
        }
    }

    /// Writes `batch` in one transaction, its appends numbered from `first_seq`.
    fn commit(&self, batch: &Batch, first_seq: u64, durable: bool) -> Result<Outcome, SpoolError> {
        if !batch.appends.is_empty() && fault::once("spool.commit_fail_after_once") {
            return self.commit_landed_but_failed(batch, first_seq, durable);
        }
        let guard = self.shared.read_db();
        let db = guard.as_ref().ok_or_else(not_open_error)?;
        self.commit_to(db, batch, first_seq, durable)
    }

    /// Fault `spool.commit_fail_after_once`: the commit reaches the disk but is reported failed,
    /// as an fsync error after the data was written can do. A real failed commit is not visible
    /// through the old handle, so this drops the handle before any reader can look.
    fn commit_landed_but_failed(
        &self,
        batch: &Batch,
        first_seq: u64,
        durable: bool,
    ) -> Result<Outcome, SpoolError> {
        let mut slot = self
            .shared
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let db = slot.as_ref().ok_or_else(not_open_error)?;
        self.commit_to(db, batch, first_seq, durable)?;
        if let Some(db) = slot.take()
            && let Err(e) = db.close()
        {
            debug!("closing spool after injected commit failure: {e}");
        }
        Err(SpoolError::Storage(Arc::new(redb::Error::Io(
            io::Error::other(
                "injected fault spool.commit_fail_after_once: commit reported failed after reaching the disk",
            ),
        ))))
    }

    /// The transaction of [`Writer::commit`], on `db`.
    fn commit_to(
        &self,
        db: &Database,
        batch: &Batch,
        first_seq: u64,
        durable: bool,
    ) -> Result<Outcome, SpoolError> {
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(self.shared.opts.quick_repair);
        if !durable {
            txn.set_durability(Durability::None)?;
        }
        let mut out = Outcome::default();
        {
            let mut table = txn.open_table(RECORDS)?;
            let mut counts = Vec::with_capacity(batch.removes.len());
            for (seqs, _) in &batch.removes {
                counts.push(remove_seqs(&mut table, seqs, &mut out)?);
            }
            out.remove_counts = counts;
            for (i, (data, ts_ms, _)) in batch.appends.iter().enumerate() {
                let mut slot = table.insert_reserve(first_seq + i as u64, TS_LEN + data.len())?;
                let buf = slot.as_mut();
                buf[..TS_LEN].copy_from_slice(&ts_ms.to_le_bytes());
                buf[TS_LEN..].copy_from_slice(data);
            }
            out.oldest_ms = match table.first()? {
                Some((k, v)) => {
                    Some(ts_of(v.value()).ok_or(SpoolError::Corrupt { seq: k.value() })?)
                }
                None => None,
            };
            // The high-water mark matters only once the last key may be gone, so only commits
            // that delete write it; append-only commits stay small. Reopen takes
            // max(mark, last key + 1).
            if out.removed_events > 0 {
                let mut meta = txn.open_table(META)?;
                meta.insert(META_NEXT_SEQ, first_seq + batch.appends.len() as u64)?;
            }
        }
        txn.commit()?;
        Ok(out)
    }

    /// Closes and reopens the file after a failed write (redb takes no more writes on the old
    /// handle), deleting what failed batches left behind before any reader sees the new handle.
    fn reopen(&mut self) -> Result<(), SpoolError> {
        let shared = self.shared.clone();
        // Held until the reopened file holds nothing of a failed batch: readers wait meanwhile.
        let mut slot = shared.db.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = slot.take()
            && let Err(e) = old.close()
        {
            // Expected after a failed commit; the open below repairs the file.
            debug!("closing spool after storage error: {e}");
        }
        let db = open_database(&shared.path, &shared.opts)?;
        let purged = self.purge_failed(&db)?;
        let scan = scan(&db)?;
        *slot = Some(db);
        drop(slot);
        if purged > 0 {
            warn!(
                records = purged,
                "deleted records whose commit was reported failed but had reached the disk"
            );
        }
        self.purge.clear();
        shared.apply_scan(&scan);
        shared.reopens.fetch_add(1, Ordering::AcqRel);
        self.next_seq = self.next_seq.max(scan.next_seq);
        self.needs_reopen = false;
        self.nondurable_streak = 0;
        info!(
            events = scan.events,
            bytes = scan.bytes,
            "spool reopened after storage error"
        );
        Ok(())
    }

    /// Deletes the records of failed batches from a freshly opened `db` in one durable commit,
    /// recording their numbers as used; returns how many had reached the disk.
    fn purge_failed(&self, db: &Database) -> Result<u64, SpoolError> {
        if self.purge.is_empty() {
            return Ok(0);
        }
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(self.shared.opts.quick_repair);
        let mut out = Outcome::default();
        {
            let mut table = txn.open_table(RECORDS)?;
            for &(lo, hi) in &self.purge {
                remove_range(&mut table, lo, hi, &mut out)?;
            }
            let mut meta = txn.open_table(META)?;
            let mark = meta.get(META_NEXT_SEQ)?.map_or(0, |v| v.value());
            meta.insert(META_NEXT_SEQ, mark.max(self.next_seq))?;
        }
        txn.commit()?;
        Ok(out.removed_events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashSet};
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};

    fn payload(tag: &str, len: usize) -> Bytes {
        let mut v = format!("{tag}:").into_bytes();
        v.resize(len.max(v.len()), b'x');
        Bytes::from(v)
    }

    fn read_all(spool: &Spool) -> Vec<(u64, Bytes)> {
        spool.read_after_blocking(None, usize::MAX).unwrap()
    }

    #[test]
    fn spool_is_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Spool>();
        check::<SpoolError>();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_keep_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                let seq = spool.append(payload(&format!("r{i}"), 100)).await.unwrap();
                (seq, i)
            }));
        }
        let mut by_seq = BTreeMap::new();
        for t in tasks {
            let (seq, i) = t.await.unwrap();
            assert!(by_seq.insert(seq, i).is_none(), "duplicate seq {seq}");
        }
        // No failures, so the numbers are exactly 1..=200.
        assert_eq!(
            by_seq.keys().copied().collect::<Vec<_>>(),
            (1..=200).collect::<Vec<_>>()
        );
        let stored = read_all(&spool);
        assert_eq!(stored.len(), 200);
        for (seq, data) in &stored {
            assert!(data.starts_with(format!("r{}:", by_seq[seq]).as_bytes()));
        }
        assert!(stored.windows(2).all(|w| w[0].0 < w[1].0));
        let s = spool.stats();
        assert_eq!((s.events, s.bytes, s.last_seq), (200, 200 * 100, Some(200)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_groups() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let per_task = 20;
        let mut tasks = Vec::new();
        for t in 0..64 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                let mut last = 0;
                for i in 0..per_task {
                    let seq = spool
                        .append(payload(&format!("{t}-{i}"), 600))
                        .await
                        .unwrap();
                    assert!(seq > last, "per-task seqs must increase");
                    last = seq;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let s = spool.stats();
        let appends = 64 * per_task;
        eprintln!("{appends} appends in {} commits", s.commits);
        assert_eq!(s.events, appends);
        assert_eq!(s.commits, s.durable_commits);
        assert!(
            s.commits * 8 <= appends,
            "{} commits for {appends} appends",
            s.commits
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removal_after_ack_only() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        for i in 1..=10u64 {
            assert_eq!(
                spool.append(payload(&format!("e{i}"), 50)).await.unwrap(),
                i
            );
        }
        let durable_before = spool.stats().durable_commits;
        assert_eq!(spool.remove(vec![2, 5, 7, 99]).await.unwrap(), 3);
        assert_eq!(spool.remove(vec![5]).await.unwrap(), 0);
        let s = spool.stats();
        assert_eq!(
            s.durable_commits, durable_before,
            "removals commit without fsync"
        );
        assert_eq!((s.events, s.bytes), (7, 7 * 50));
        let seqs: Vec<u64> = spool
            .read_after(None, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(seqs, vec![1, 3, 4, 6, 8, 9, 10]);
        let page = spool.read_after(Some(4), 2).await.unwrap();
        assert_eq!(page.iter().map(|r| r.0).collect::<Vec<_>>(), vec![6, 8]);
        assert!(page[0].1.starts_with(b"e6:"));
        // Removing the oldest moves the oldest timestamp forward (or keeps it equal).
        let oldest = s.oldest_append_ms.unwrap();
        spool.remove(vec![1]).await.unwrap();
        assert!(spool.stats().oldest_append_ms.unwrap() >= oldest);
        // A run long enough for the range path, with holes and a duplicate.
        let mut run: Vec<u64> = (1..=10).rev().collect();
        run.push(3);
        assert_eq!(spool.remove(run).await.unwrap(), 6);
        let s = spool.stats();
        assert_eq!(
            (s.events, s.bytes, s.oldest_append_ms, s.oldest_age),
            (0, 0, None, None)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reopen_keeps_records_and_sequence() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), 1 << 30).unwrap();
            for i in 1..=20u64 {
                spool.append(payload(&format!("a{i}"), 30)).await.unwrap();
            }
            // Non-durable removals, then a clean drop: redb promotes them on close.
            let evens: Vec<u64> = (2..=20).step_by(2).collect();
            assert_eq!(spool.remove(evens).await.unwrap(), 10);
            assert_eq!(spool.stats().durable_commits, spool.stats().commits - 1);
        }
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        let stored = read_all(&spool);
        assert_eq!(
            stored.iter().map(|r| r.0).collect::<Vec<_>>(),
            (1..=19).step_by(2).collect::<Vec<_>>()
        );
        assert!(
            stored
                .iter()
                .all(|(seq, d)| d.starts_with(format!("a{seq}:").as_bytes()))
        );
        let s = spool.stats();
        assert_eq!((s.events, s.bytes, s.last_seq), (10, 300, Some(20)));
        assert_eq!(spool.append(payload("next", 30)).await.unwrap(), 21);
        // Emptying the spool does not reset the numbering after a reopen.
        spool.remove((1..=21).collect()).await.unwrap();
        spool.shutdown().await.unwrap();
        assert!(matches!(
            spool.append(payload("late", 1)).await,
            Err(SpoolError::Closed)
        ));
        drop(spool);
        let spool = Spool::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(spool.stats().events, 0);
        assert_eq!(spool.append(payload("after-empty", 30)).await.unwrap(), 22);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn max_bytes_gives_full_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 3000).unwrap();
        for _ in 0..5 {
            spool.append(payload("f", 600)).await.unwrap();
        }
        let before = spool.stats();
        match spool.append(payload("over", 600)).await {
            Err(SpoolError::Full {
                len: 600,
                used: 3000,
                max: 3000,
            }) => {}
            other => panic!("expected Full, got {other:?}"),
        }
        assert!(matches!(
            spool.append(Bytes::from_static(b"1")).await,
            Err(SpoolError::Full { .. })
        ));
        // oldest_age moves with the clock; everything else must be unchanged.
        let after = SpoolStats {
            oldest_age: before.oldest_age,
            has_room: before.has_room,
            ..spool.stats()
        };
        assert_eq!(after, before);
        assert!(!spool.stats().has_room, "readiness sees the refusal");
        assert_eq!(read_all(&spool).len(), 5);
        spool.remove(vec![1]).await.unwrap();
        assert!(
            spool.stats().has_room,
            "room again once the forwarder removed one"
        );
        assert_eq!(spool.append(payload("fits", 600)).await.unwrap(), 6);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wait_for_new_wakes_forwarder() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        let waiter = {
            let spool = spool.clone();
            tokio::spawn(async move { spool.wait_for_new(None).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        spool.append(payload("wake", 10)).await.unwrap();
        assert_eq!(waiter.await.unwrap().unwrap(), 1);
        // Already satisfied: returns at once.
        assert_eq!(spool.wait_for_new(Some(0)).await.unwrap(), 1);
        let waiter = {
            let spool = spool.clone();
            tokio::spawn(async move { spool.wait_for_new(Some(1)).await })
        };
        spool.shutdown().await.unwrap();
        assert!(matches!(waiter.await.unwrap(), Err(SpoolError::Closed)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn locked_and_inspect() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Spool::inspect(dir.path()), Err(SpoolError::Io(_))));
        let spool = Spool::open(dir.path(), 1 << 20).unwrap();
        for _ in 0..3 {
            spool.append(payload("i", 100)).await.unwrap();
        }
        assert!(matches!(
            Spool::open(dir.path(), 1 << 20),
            Err(SpoolError::Locked(_))
        ));
        let err = Spool::inspect(dir.path()).unwrap_err();
        assert!(matches!(err, SpoolError::Locked(_)), "{err:?}");
        assert!(err.to_string().contains("server is running"));
        drop(spool);
        let s = Spool::inspect(dir.path()).unwrap();
        assert_eq!((s.events, s.bytes, s.last_seq), (3, 300, Some(3)));
        assert!(s.oldest_append_ms.is_some());
    }

    /// Child side of `sigkill_mid_write_recovers`: appends until killed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "helper process for sigkill_mid_write_recovers"]
    async fn crash_child_writer() {
        let Ok(dir) = std::env::var("SPOOL_CRASH_DIR") else {
            return;
        };
        let spool = Spool::open(Path::new(&dir), 1 << 32).unwrap();
        let mut tasks = Vec::new();
        for task in 0..16 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let seq = spool
                        .append(payload(&format!("{task}:{i}"), 600))
                        .await
                        .unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "DURABLE {seq} {task} {i}").unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        // Forwarder stand-in: non-durable removals, so kills also land among those.
        let forwarder = spool.clone();
        tokio::spawn(async move {
            let mut cursor = None;
            loop {
                cursor = Some(forwarder.wait_for_new(cursor).await.unwrap());
                let batch = forwarder.read_after(None, 50).await.unwrap();
                let seqs: Vec<u64> = batch.iter().map(|r| r.0).collect();
                // Announced before the call: the removal may land even if we die before it returns.
                {
                    let mut out = std::io::stdout().lock();
                    for seq in &seqs {
                        writeln!(out, "REMOVING {seq}").unwrap();
                    }
                    out.flush().unwrap();
                }
                forwarder.remove(seqs).await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        });
        // Bounded in case the parent never kills us.
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    #[test]
    fn sigkill_mid_write_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut durable: BTreeMap<u64, String> = BTreeMap::new();
        // Removed records may come back after a kill (non-durable removal): a duplicate, not a loss.
        let mut removed = HashSet::new();
        for round in 0..5u64 {
            let mut child = Command::new(&exe)
                .args([
                    "spool::tests::crash_child_writer",
                    "--exact",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("SPOOL_CRASH_DIR", dir.path())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let target = 200 + round * 173;
            let mut seen = 0;
            let record =
                |line: &str, durable: &mut BTreeMap<u64, String>, removed: &mut HashSet<u64>| {
                    // The harness prints "test ... " without a newline before our first line.
                    let start = line.find("DURABLE ").or_else(|| line.find("REMOVING "));
                    let f: Vec<&str> = line[start.unwrap_or(0)..].split(' ').collect();
                    match f[..] {
                        ["DURABLE", seq, task, i] => {
                            durable.insert(seq.parse().unwrap(), format!("{task}:{i}:"));
                            true
                        }
                        ["REMOVING", seq] => {
                            removed.insert(seq.parse().unwrap());
                            false
                        }
                        _ => false,
                    }
                };
            for line in lines.by_ref() {
                if record(&line.unwrap(), &mut durable, &mut removed) {
                    seen += 1;
                    if seen >= target {
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(round * 3));
            child.kill().unwrap(); // SIGKILL
            // Lines already in the pipe were printed before the kill, so they were durable.
            for line in lines {
                record(&line.unwrap(), &mut durable, &mut removed);
            }
            child.wait().unwrap();
            assert!(seen >= target, "child stopped early in round {round}");

            // The CLI path first: the file needs repair, so inspect opens it writable.
            let inspected = Spool::inspect(dir.path()).unwrap();
            let spool = Spool::open(dir.path(), 1 << 32).unwrap();
            let stored: BTreeMap<u64, Bytes> = read_all(&spool).into_iter().collect();
            assert_eq!(inspected.events, stored.len() as u64);
            for (seq, prefix) in &durable {
                match stored.get(seq) {
                    Some(data) => assert!(
                        data.starts_with(prefix.as_bytes()),
                        "seq {seq} has wrong content"
                    ),
                    None => assert!(
                        removed.contains(seq),
                        "durable seq {seq} lost in round {round}"
                    ),
                }
            }
            let resurrected = removed.iter().filter(|s| stored.contains_key(s)).count();
            let s = spool.stats();
            assert_eq!(s.events, stored.len() as u64);
            assert!(s.last_seq.unwrap() >= *durable.keys().last().unwrap());
            eprintln!(
                "round {round}: {} durable acks, {} removed ({resurrected} back after the kill), {} stored",
                durable.len(),
                removed.len(),
                stored.len()
            );
        }
    }

    #[test]
    fn a_new_spool_directory_is_created_with_its_parents() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a").join("b").join("spool");
        // Each created directory's parent is fsync'd too (not observable here without a
        // crash; see create_dir_durable).
        let created = create_dir_durable(&dir).unwrap();
        assert_eq!(
            created,
            vec![
                base.path().join("a"),
                base.path().join("a/b"),
                base.path().join("a/b/spool")
            ]
        );
        assert!(dir.is_dir());
        assert!(create_dir_durable(&dir).unwrap().is_empty());
        let nested = base.path().join("x").join("y");
        let spool = Spool::open(&nested, 1 << 20).unwrap();
        assert!(nested.join(FILE_NAME).is_file());
        drop(spool);
    }

    /// Child side of `records_of_a_failed_commit_are_never_read`; needs
    /// `CELLOSIGN_BRIDGE_FAULTS=spool.commit_fail_after_once`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "helper process for records_of_a_failed_commit_are_never_read"]
    async fn failed_commit_child() {
        use std::sync::Mutex;
        let Ok(dir) = std::env::var("SPOOL_FAULT_DIR") else {
            return;
        };
        let dir = PathBuf::from(dir);
        let spool = Spool::open(&dir, 1 << 30).unwrap();
        // A reader polling all along, as the forwarder does: the failed batch must never show.
        let read = Arc::new(Mutex::new(Vec::<Bytes>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (spool, read, stop) = (spool.clone(), read.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Errors are expected while the file is being reopened.
                    if let Ok(records) = spool.read_after_blocking(None, usize::MAX) {
                        let mut read = read.lock().unwrap();
                        read.extend(records.into_iter().map(|r| r.1));
                    }
                }
            })
        };
        // The fault fires on the first commit holding appends: these, posted together.
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.append(payload(&format!("x{i}"), 100)).await })
            })
            .collect();
        let mut failed = Vec::new();
        let mut stored = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(_) => stored.push(format!("x{i}:")),
                Err(e) => {
                    assert!(matches!(e, SpoolError::Storage(_)), "{e:?}");
                    failed.push(format!("x{i}:"));
                }
            }
        }
        assert!(!failed.is_empty(), "the injected fault did not fire");
        let later = spool.append(payload("later", 100)).await.unwrap();
        assert!(later > 8, "the failed numbers are not reused: {later}");
        stored.push("later:".into());
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        let tags = |records: &[Bytes]| -> HashSet<String> {
            records
                .iter()
                .map(|d| {
                    let end = d.iter().position(|&b| b == b':').unwrap() + 1;
                    String::from_utf8_lossy(&d[..end]).into_owned()
                })
                .collect()
        };
        let seen = tags(&read.lock().unwrap());
        for f in &failed {
            assert!(!seen.contains(f), "a reader saw {f} of the failed commit");
        }
        let want: HashSet<String> = stored.iter().cloned().collect();
        let stored_now: Vec<Bytes> = read_all(&spool).into_iter().map(|r| r.1).collect();
        assert_eq!(tags(&stored_now), want);
        assert_eq!(spool.stats().events, want.len() as u64);
        drop(spool);
        // Nor after a restart.
        let spool = Spool::open(&dir, 1 << 30).unwrap();
        let stored_now: Vec<Bytes> = read_all(&spool).into_iter().map(|r| r.1).collect();
        assert_eq!(tags(&stored_now), want);
        assert!(spool.append(payload("next", 1)).await.unwrap() > later);
        println!("FAILED-BATCH-CHECKED {}", failed.len());
    }

    #[test]
    fn records_of_a_failed_commit_are_never_read() {
        if !cfg!(feature = "fault-injection") {
            panic!("needs the fault-injection feature (on in the test suite)");
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "spool::tests::failed_commit_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("SPOOL_FAULT_DIR", dir.path())
            .env(fault::ENV, "spool.commit_fail_after_once")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("FAILED-BATCH-CHECKED"),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disk_full_and_recovery() {
        let base = tempfile::tempdir().unwrap();
        let mnt = base.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
            .arg(&mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        // A small real filesystem is the only honest way to fill a disk; the tests
        // run as root here and in CI, so failing to mount is a failure, not a skip.
        assert!(
            mounted,
            "disk_full_and_recovery needs `mount -t tmpfs` (run the tests as root)"
        );
        let _unmount = Unmount(mnt.clone());
        let dir = mnt.join("spool");
        let spool = Spool::open(&dir, 1 << 30).unwrap();
        let mut acked = Vec::new();
        for i in 0..20 {
            acked.push((
                spool
                    .append(payload(&format!("pre{i}"), 600))
                    .await
                    .unwrap(),
                format!("pre{i}:"),
            ));
        }
        // Fill the file system.
        let ballast = mnt.join("ballast");
        {
            let mut f = std::fs::File::create(&ballast).unwrap();
            let chunk = vec![0u8; 16 << 10];
            while f.write_all(&chunk).is_ok() {}
            let _ = f.sync_all();
        }
        let mut failure = None;
        for i in 0..5000 {
            match spool.append(payload(&format!("fill{i}"), 600)).await {
                Ok(seq) => acked.push((seq, format!("fill{i}:"))),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let failure = failure.expect("append never failed on a full disk");
        eprintln!("append on full disk: {failure}");
        assert!(matches!(failure, SpoolError::Storage(_)), "{failure:?}");
        assert!(failure.is_no_space(), "{failure:?}");
        assert!(spool.stats().degraded);
        // Still full: a few appends may fit in pages the failed batch freed, then they fail again.
        let mut failed_again = false;
        for i in 0..100 {
            match spool.append(payload(&format!("still-full{i}"), 600)).await {
                Ok(seq) => acked.push((seq, format!("still-full{i}:"))),
                Err(e) => {
                    eprintln!("append {i} after the first failure: {e}");
                    failed_again = true;
                    break;
                }
            }
        }
        assert!(failed_again, "appends kept succeeding on a full disk");
        // The writer's own probes must not report it well while nothing fits.
        tokio::time::sleep(RECOVERY_INTERVAL * 3).await;
        assert!(spool.stats().degraded, "degraded while the disk is full");

        std::fs::remove_file(&ballast).unwrap();
        // Room again: the writer notices by itself, with no write to wake it.
        let freed = std::time::Instant::now();
        while spool.stats().degraded {
            assert!(
                freed.elapsed() < Duration::from_secs(2),
                "still degraded {:?} after the disk had room",
                freed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!(
            "writable again {:?} after the disk had room",
            freed.elapsed()
        );
        let seq = spool.append(payload("after", 600)).await.unwrap();
        assert!(acked.iter().all(|(s, _)| *s < seq));
        acked.push((seq, "after:".into()));
        let check = |spool: &Spool| {
            let stored = read_all(spool);
            assert_eq!(
                stored.len(),
                acked.len(),
                "only acknowledged records remain"
            );
            for ((seq, data), (want_seq, prefix)) in stored.iter().zip(&acked) {
                assert_eq!(seq, want_seq);
                assert!(data.starts_with(prefix.as_bytes()));
            }
            let s = spool.stats();
            assert_eq!(s.events, acked.len() as u64);
            assert_eq!(s.bytes, 600 * acked.len() as u64);
        };
        check(&spool);
        let s = spool.stats();
        assert!(!s.degraded);
        assert!(s.reopens >= 1);
        drop(spool);
        let spool = Spool::open(&dir, 1 << 30).unwrap();
        check(&spool);
        let seen: HashSet<u64> = acked.iter().map(|a| a.0).collect();
        let next = spool.append(payload("later", 10)).await.unwrap();
        assert!(!seen.contains(&next));
    }
}
