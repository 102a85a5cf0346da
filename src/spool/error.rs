//! [`SpoolError`], what every spool operation can fail with, and its conversions from redb and
//! `std::io` errors.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::DatabaseError;

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
    /// The record is longer than `MAX_RECORD_LEN` (1 GiB); nothing was
    /// written.
    #[error("record of {len} bytes exceeds the maximum record size of {max} bytes")]
    TooLarge {
        /// Length of the rejected record.
        len: usize,
        /// `MAX_RECORD_LEN` (1 GiB).
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
    /// A [`SpoolError::Storage`] that only carries a message: for failures the spool finds
    /// itself rather than gets from redb, reported like redb's own so callers treat them alike.
    pub(super) fn storage(message: &str) -> SpoolError {
        SpoolError::Storage(Arc::new(redb::Error::Io(io::Error::other(message))))
    }

    /// The database handle is missing because a reopen after a storage error failed; the
    /// writer retries on the next write (or its own probe), so this is temporary.
    pub(super) fn not_open() -> SpoolError {
        SpoolError::storage(
            "spool database is not open: reopening after a storage error failed; retried on next write",
        )
    }

    /// Maps an error opening or closing the database at `path`, so that a file held by another
    /// process reads as [`SpoolError::Locked`] (which a CLI answers by asking the server).
    pub(super) fn from_database(e: DatabaseError, path: &Path) -> SpoolError {
        match e {
            DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
                SpoolError::Locked(path.to_path_buf())
            }
            e => SpoolError::Storage(Arc::new(e.into())),
        }
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

/// `From` impls for redb's specific error types, so `?` works on every redb call; each becomes
/// a [`SpoolError::Storage`] through `redb::Error`.
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
