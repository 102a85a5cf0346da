//! The spool's file: redb table layout, the value format, and the operations on it that do not
//! depend on who calls them (opening, scanning, reading, inserting, deleting).
//!
//! Each value is `[append time, unix millis, u64 LE][record bytes]`, keyed by its sequence
//! number in [`RECORDS`]; [`META`] keeps the next sequence number once deletions may have
//! removed the highest key.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use redb::{
    Builder, Database, Key, ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableError, Value, WriteTransaction,
};
use tracing::warn;

use super::SpoolOptions;
use super::error::SpoolError;

/// Name of the database file inside the spool directory.
pub const FILE_NAME: &str = "spool.redb";

/// The records, keyed by sequence number; values as described in the module doc.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Small bookkeeping values, keyed by name.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Key in [`META`]: the next sequence number to hand out, written by commits that delete, so
/// that numbers are not reused once the highest record is gone.
const META_NEXT_SEQ: &str = "next_seq";
/// Length of the append-time prefix of every value.
const TS_LEN: usize = 8;
/// Shortest run of consecutive seqs deleted with one range scan instead of key by key.
const MIN_RANGE_RUN: usize = 8;

/// The records table inside a write transaction, as the writer's helpers take it.
pub(super) type RecordTable<'t> = redb::Table<'t, u64, &'static [u8]>;

/// `dir`, or the current directory for `None` or `""` (the parent of a bare file name).
pub(super) fn dir_or_dot(dir: Option<&Path>) -> &Path {
    match dir {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Creates `dir` and its missing ancestors, and fsyncs the parent of each directory it created:
/// without that, a crash can lose the new directory entry, and the spool file with it (the file
/// itself is fsync'd into `dir` by [`open_database`]). Returns the directories it created.
/// Also what the claim-check store's directory is created with.
pub(crate) fn create_dir_durable(dir: &Path) -> io::Result<Vec<PathBuf>> {
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
    std::fs::File::open(dir_or_dot(dir))?.sync_all()
}

/// Opens (creating, and fsyncing a new file into its directory) the database at `path` for
/// writing; redb repairs it first if it was not closed cleanly, which is logged once.
pub(super) fn open_database(path: &Path, opts: &SpoolOptions) -> Result<Database, SpoolError> {
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
    let db = builder
        .create(path)
        .map_err(|e| SpoolError::from_database(e, path))?;
    if !existed {
        // Make the new file's directory entry durable too.
        sync_dir(path.parent())?;
    }
    Ok(db)
}

/// What a full pass over the file found: the accounting a spool starts (or restarts) from.
#[derive(Debug)]
pub(super) struct Scan {
    /// Records stored.
    pub(super) events: u64,
    /// Summed record length, without the timestamp prefixes.
    pub(super) bytes: u64,
    /// Append time of the lowest-numbered record.
    pub(super) oldest_ms: Option<u64>,
    /// The next sequence number to hand out: past both the highest key and the stored mark.
    pub(super) next_seq: u64,
}

/// Opens table `def` for reading, or `None` when no write has created it yet (a new file).
fn open_if_exists<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>, SpoolError> {
    match txn.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads the whole file once for the accounting and the next sequence number.
pub(super) fn scan(db: &impl ReadableDatabase) -> Result<Scan, SpoolError> {
    let txn = db.begin_read()?;
    let mut s = Scan {
        events: 0,
        bytes: 0,
        oldest_ms: None,
        next_seq: 1,
    };
    if let Some(meta) = open_if_exists(&txn, META)?
        && let Some(v) = meta.get(META_NEXT_SEQ)?
    {
        s.next_seq = s.next_seq.max(v.value());
    }
    let Some(table) = open_if_exists(&txn, RECORDS)? else {
        return Ok(s);
    };
    let mut last = 0;
    for entry in table.iter()? {
        let (k, v) = entry?;
        let seq = k.value();
        let (ts, data) = split_value(seq, v.value())?;
        if s.oldest_ms.is_none() {
            s.oldest_ms = Some(ts);
        }
        s.events += 1;
        s.bytes += data.len() as u64;
        last = seq;
    }
    s.next_seq = s.next_seq.max(last + 1);
    Ok(s)
}

/// Up to `limit` records numbered `start` or above, in order, from `db`'s latest commit;
/// no more once they sum to `max_bytes` (the first is read whatever its size).
pub(super) fn read_from(
    db: &Database,
    start: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<(u64, Bytes)>, SpoolError> {
    let txn = db.begin_read()?;
    let Some(table) = open_if_exists(&txn, RECORDS)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(limit.min(4096));
    let mut bytes = 0usize;
    for entry in table.range(start..)?.take(limit) {
        if bytes >= max_bytes {
            break;
        }
        let (k, v) = entry?;
        let seq = k.value();
        let (_, data) = split_value(seq, v.value())?;
        bytes = bytes.saturating_add(data.len());
        out.push((seq, Bytes::copy_from_slice(data)));
    }
    Ok(out)
}

/// Splits stored value `value` of record `seq` into its append time and the record bytes.
fn split_value(seq: u64, value: &[u8]) -> Result<(u64, &[u8]), SpoolError> {
    match value.split_first_chunk::<TS_LEN>() {
        Some((ts, data)) => Ok((u64::from_le_bytes(*ts), data)),
        None => Err(SpoolError::Corrupt { seq }),
    }
}

/// Opens the records table in a write transaction.
pub(super) fn records(txn: &WriteTransaction) -> Result<RecordTable<'_>, SpoolError> {
    Ok(txn.open_table(RECORDS)?)
}

/// Stores the record made of `parts` end to end, appended at `ts_ms`, as record `seq`,
/// written in place: each part is copied once, straight into the database's page.
pub(super) fn insert(
    table: &mut RecordTable<'_>,
    seq: u64,
    ts_ms: u64,
    parts: &[Bytes],
) -> Result<(), SpoolError> {
    let len = parts.iter().map(Bytes::len).sum::<usize>();
    let mut slot = table.insert_reserve(seq, TS_LEN + len)?;
    let buf = slot.as_mut();
    buf[..TS_LEN].copy_from_slice(&ts_ms.to_le_bytes());
    let mut at = TS_LEN;
    for part in parts {
        buf[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    Ok(())
}

/// Append time of the lowest-numbered record, `None` when the table is empty.
pub(super) fn oldest_ts(table: &RecordTable<'_>) -> Result<Option<u64>, SpoolError> {
    match table.first()? {
        Some((k, v)) => Ok(Some(split_value(k.value(), v.value())?.0)),
        None => Ok(None),
    }
}

/// Stores `next` as the next sequence number to hand out.
pub(super) fn set_next_seq(txn: &WriteTransaction, next: u64) -> Result<(), SpoolError> {
    txn.open_table(META)?.insert(META_NEXT_SEQ, next)?;
    Ok(())
}

/// Raises the stored next sequence number to at least `next`.
pub(super) fn raise_next_seq(txn: &WriteTransaction, next: u64) -> Result<(), SpoolError> {
    let mut meta = txn.open_table(META)?;
    let mark = meta.get(META_NEXT_SEQ)?.map_or(0, |v| v.value());
    meta.insert(META_NEXT_SEQ, mark.max(next))?;
    Ok(())
}

/// What deletions removed, for the byte and event accounting.
#[derive(Debug, Default)]
pub(super) struct Removed {
    /// Records deleted.
    pub(super) events: u64,
    /// Their summed length, without the timestamp prefixes.
    pub(super) bytes: u64,
}

impl Removed {
    /// Counts one deleted value.
    fn add(&mut self, value: &[u8]) {
        self.events += 1;
        self.bytes += value.len().saturating_sub(TS_LEN) as u64;
    }
}

/// Deletes the given seqs, returning how many existed; consecutive runs of at least
/// [`MIN_RANGE_RUN`] go through one range scan, which is much cheaper than key by key.
pub(super) fn remove_seqs(
    table: &mut RecordTable<'_>,
    seqs: &[u64],
    out: &mut Removed,
) -> Result<usize, SpoolError> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let before = out.events;
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
                    out.add(v.value());
                }
            }
        }
        i = j;
    }
    Ok((out.events - before) as usize)
}

/// Deletes every record numbered `lo..=hi` (holes are fine).
pub(super) fn remove_range(
    table: &mut RecordTable<'_>,
    lo: u64,
    hi: u64,
    out: &mut Removed,
) -> Result<(), SpoolError> {
    table.retain_in(lo..=hi, |_, v: &[u8]| {
        out.add(v);
        false
    })?;
    Ok(())
}
