//! [`Shared`]: the state the handles and the writer thread both see, so that accounting and
//! reads need no round trip through the writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::Database;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::SpoolOptions;
use super::store::{Scan, dir_or_dot};

/// [`Shared::oldest_ms`] when the spool holds no record.
pub(super) const NO_RECORD: u64 = u64::MAX;

/// Accounting and the database handle, behind one `Arc` held by every handle and the writer.
/// Only the writer changes anything but `reserved` and `refused_len` (which appends update
/// before they queue, to refuse at once when full).
pub(super) struct Shared {
    /// Cancelled when the writer thread ends, however it ends (a panic included).
    pub(super) writer_gone: CancellationToken,
    /// The database file.
    pub(super) path: PathBuf,
    /// The byte limit appends are checked against.
    pub(super) max_bytes: u64,
    /// The options the spool was opened with; reopens use them again.
    pub(super) opts: SpoolOptions,
    /// `None` only while a reopen after a storage error has not succeeded yet, and after close.
    pub(super) db: RwLock<Option<Database>>,
    /// Records stored.
    pub(super) events: AtomicU64,
    /// Summed length of the stored records.
    pub(super) bytes: AtomicU64,
    /// `bytes` + bytes of appends accepted but not yet committed: what `max_bytes` is checked
    /// against.
    pub(super) reserved: AtomicU64,
    /// Length of the last record refused as Full, 0 once an append fits again.
    pub(super) refused_len: AtomicU64,
    /// Append time of the oldest record, [`NO_RECORD`] when empty.
    pub(super) oldest_ms: AtomicU64,
    /// Write transactions committed.
    pub(super) commits: AtomicU64,
    /// Of those, the `Durability::Immediate` ones.
    pub(super) durable_commits: AtomicU64,
    /// Reopens after storage errors.
    pub(super) reopens: AtomicU64,
    /// The last write failed and has not been followed by a working one.
    pub(super) degraded: AtomicBool,
    /// The writer has stopped taking operations (set before it closes the file).
    pub(super) closed: AtomicBool,
    /// Highest committed sequence number, 0 = none yet; wakes `wait_for_new` callers.
    pub(super) last_seq: watch::Sender<u64>,
    /// Confirmed records to delete with the writer's next commit (`Spool::remove_soon`).
    pub(super) removals: Mutex<Vec<u64>>,
    /// The writer has been told that `removals` is waiting (and commits it by its delay at
    /// the latest); until it clears this, more removals are added without telling it again.
    pub(super) removals_told: AtomicBool,
}

impl Shared {
    /// The state of a spool just opened on `db` at `path`, whose file `scan` describes.
    pub(super) fn new(path: PathBuf, opts: SpoolOptions, db: Database, scan: &Scan) -> Shared {
        Shared {
            writer_gone: CancellationToken::new(),
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
            removals: Mutex::new(Vec::new()),
            removals_told: AtomicBool::new(false),
        }
    }

    /// The spool directory (the database file's).
    pub(super) fn dir(&self) -> &Path {
        dir_or_dot(self.path.parent())
    }

    /// The database for reading; held through a read so the writer cannot swap it underneath.
    /// A panic elsewhere leaves the slot consistent, so poisoning is ignored.
    pub(super) fn read_db(&self) -> RwLockReadGuard<'_, Option<Database>> {
        self.db.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The database slot for replacing or closing the handle; readers wait meanwhile.
    pub(super) fn write_db(&self) -> RwLockWriteGuard<'_, Option<Database>> {
        self.db.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the removals waiting for a commit. A panic elsewhere leaves the list whole, so
    /// poisoning is ignored.
    pub(super) fn take_removals(&self) -> Vec<u64> {
        std::mem::take(&mut *self.removals.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Gives back the reservation of `len` bytes (a failed or abandoned append, or a removal).
    pub(super) fn release(&self, len: u64) {
        self.reserved.fetch_sub(len, Ordering::AcqRel);
    }

    /// Replaces the byte and event accounting with a fresh scan, keeping in-flight reservations.
    pub(super) fn apply_scan(&self, scan: &Scan) {
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
