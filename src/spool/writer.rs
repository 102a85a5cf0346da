//! The writer thread: the only place that writes the database. It batches queued operations
//! into group commits, keeps removals cheap (non-durable commits, made durable in bounded
//! time), reopens the file after a failed write, purges what a failed batch may have left on
//! disk, and probes by itself for the disk to take writes again.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, Durability, WriteTransaction};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::error::SpoolError;
use super::shared::{NO_RECORD, Shared};
use super::store::{self, Removed};
use crate::fault;

/// `None` commits in a row after which the writer commits durably anyway, so that a crash loses
/// a bounded number of removals and redb can reclaim the freed pages.
pub const MAX_NONDURABLE_STREAK: u32 = 32;

/// Time after a `None` commit by which it is made durable (by an empty `Immediate` commit if
/// no other comes first).
pub const IDLE_FLUSH: Duration = Duration::from_millis(250);

/// While degraded, how often the writer checks by itself whether writes work again. Readiness
/// promises to come back within 2 s of the disk having room.
pub const RECOVERY_INTERVAL: Duration = Duration::from_millis(500);

/// Bytes the recovery probe writes and fsyncs beside the database: room for a few events.
const PROBE_BYTES: usize = 64 << 10;

/// Name of the recovery probe's scratch file inside the spool directory.
const PROBE_FILE: &str = "spool.probe";

/// Where the writer sends an operation's result; a dropped receiver is ignored.
pub(super) type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// A record to store, in the parts it came in (an event's header, then its body): they
/// are copied into the database one after the other, never joined in memory first.
pub(super) type Parts = [Bytes; 2];

/// What the handles ask of the writer thread.
pub(super) enum Op {
    /// Store `data`, appended at `ts_ms`; answered with its sequence number once durable.
    Append {
        data: Parts,
        ts_ms: u64,
        reply: Reply<u64>,
    },
    /// Delete these records; answered with how many existed.
    #[cfg_attr(not(test), allow(dead_code))]
    Remove { seqs: Vec<u64>, reply: Reply<usize> },
    /// [`Shared::removals`] has records to delete: commit them within the removal delay,
    /// with another commit if one comes first.
    RemoveSoon,
    /// Finish, commit durably, close the file and stop.
    Shutdown { reply: Reply<()> },
}

/// Starts the writer thread for `shared`, handing out numbers from `next_seq`, and returns its
/// queue. The thread ends when every sender is dropped or on [`Op::Shutdown`], after finishing
/// what is queued and closing the file; nobody joins it, [`Shared::writer_gone`] tells its end.
pub(super) fn spawn(shared: Arc<Shared>, next_seq: u64) -> io::Result<mpsc::Sender<Op>> {
    let (tx, rx) = mpsc::channel();
    let ended = Ended(shared.writer_gone.clone());
    let writer = Writer {
        shared,
        rx,
        next_seq,
        needs_reopen: false,
        purge: Vec::new(),
        nondurable_streak: 0,
        next_probe: None,
        flush_at: None,
        removals_at: None,
    };
    std::thread::Builder::new()
        .name("spool-writer".into())
        .spawn(move || {
            // Signals the end of the thread even when it unwinds.
            let _ended = ended;
            writer.run();
        })?;
    Ok(tx)
}

/// Dropped when the writer thread ends, however it ends: cancels [`Shared::writer_gone`], and
/// logs a panic (nobody joins the thread to see it).
struct Ended(CancellationToken);

impl Drop for Ended {
    fn drop(&mut self) {
        if std::thread::panicking() {
            error!("spool writer thread panicked");
        }
        self.0.cancel();
    }
}

/// Operations taken off the queue together, committed in one transaction.
#[derive(Default)]
struct Batch {
    /// Records with their append time, numbered in this order when committed.
    appends: Vec<(Parts, u64, Reply<u64>)>,
    /// Sequence numbers to delete, one entry per [`Op::Remove`].
    removes: Vec<(Vec<u64>, Reply<usize>)>,
    /// Sequence numbers from [`Shared::removals`], riding this batch's commit.
    riding: Vec<u64>,
    /// The close waiting for earlier removals to be durable.
    flushes: Vec<Reply<()>>,
}

impl Batch {
    /// Whether there is nothing to commit or answer.
    fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.removes.is_empty()
            && self.riding.is_empty()
            && self.flushes.is_empty()
    }

    /// Summed length of the appended records: their reservation.
    fn append_bytes(&self) -> u64 {
        self.appends
            .iter()
            .flat_map(|(parts, _, _)| parts)
            .map(|part| part.len() as u64)
            .sum()
    }

    /// Answers every caller with `e`, giving back the appends' reservations: nothing of the
    /// batch was stored.
    fn fail(self, shared: &Shared, e: &SpoolError) {
        shared.release(self.append_bytes());
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

/// What a committed batch changed, for the accounting and the callers.
#[derive(Default)]
struct Outcome {
    /// Records deleted by the batch's removals.
    removed: Removed,
    /// How many records each removal in the batch deleted, in batch order.
    remove_counts: Vec<usize>,
    /// Append time of the oldest record after the commit.
    oldest_ms: Option<u64>,
}

/// The writer thread's state: the only place that writes the database.
struct Writer {
    /// Accounting and the database slot, also seen by the handles.
    shared: Arc<Shared>,
    /// The handles' queue; disconnected once the last handle is dropped.
    rx: mpsc::Receiver<Op>,
    /// Sequence number of the next append.
    next_seq: u64,
    /// A write failed and the file has not been reopened since: redb takes no more writes.
    needs_reopen: bool,
    /// Inclusive seq ranges of failed batches: a failed commit may still have reached the disk.
    /// The next reopen deletes them durably, before readers can see the reopened file.
    purge: Vec<(u64, u64)>,
    /// `None` commits since the last `Immediate` one.
    nondurable_streak: u32,
    /// While degraded: when the writer next checks by itself whether writes work again.
    next_probe: Option<Instant>,
    /// When the `None` commits since the last durable one are made durable, if nothing
    /// else makes them so first.
    flush_at: Option<Instant>,
    /// When the removals waiting in [`Shared::removals`] are committed by themselves, if
    /// no other commit takes them first.
    removals_at: Option<Instant>,
}

impl Writer {
    /// Runs batches until every handle is gone or [`Op::Shutdown`], then closes the file.
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
            if first.is_some() && fault::armed("spool.writer_panic").is_some() {
                panic!("fault injected: spool.writer_panic");
            }
            if let (Some(_), Some(stall)) = (&first, fault::armed("spool.commit_stall")) {
                // A slow disk: what arrives meanwhile joins this batch, as it would.
                std::thread::sleep(stall);
            }
            // Group commit: everything queued right now goes into one transaction.
            let mut batch = Batch::default();
            let mut next = first;
            while let Some(op) = next {
                match op {
                    Op::Append { data, ts_ms, reply } => batch.appends.push((data, ts_ms, reply)),
                    Op::Remove { seqs, reply } => batch.removes.push((seqs, reply)),
                    Op::RemoveSoon => {
                        let at = Instant::now() + self.shared.opts.removal_delay;
                        self.removals_at.get_or_insert(at);
                    }
                    Op::Shutdown { reply } => shutdown = Some(reply),
                }
                next = self.rx.try_recv().ok();
            }
            let (removals_due, flush_due) = self.timers_due();
            if removals_due {
                // Cleared before the list is taken: a removal added after this tells the
                // writer again, one added before is taken now.
                self.shared.removals_told.store(false, Ordering::Release);
                self.removals_at = None;
            }
            if removals_due || !batch.is_empty() || shutdown.is_some() {
                batch.riding = self.shared.take_removals();
            }
            // After a failed write, nothing but work reopens the file (or the probe).
            if !batch.is_empty() || (flush_due && !self.needs_reopen) || shutdown.is_some() {
                self.execute(batch, flush_due || shutdown.is_some());
            }
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

    /// How long the writer may wait for work: until the idle flush, the waiting removals'
    /// commit or the next recovery probe is due; `None` (for ever) when none is pending.
    fn wake_in(&self) -> Option<Duration> {
        let at = [self.flush_at, self.removals_at, self.next_probe]
            .into_iter()
            .flatten()
            .min()?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    /// Whether the waiting removals' own commit, and the idle flush, are due.
    fn timers_due(&self) -> (bool, bool) {
        if self.removals_at.is_none() && self.flush_at.is_none() {
            return (false, false);
        }
        let now = Instant::now();
        let due = |at: Option<Instant>| at.is_some_and(|at| at <= now);
        (due(self.removals_at), due(self.flush_at))
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

    /// Commits the removals still waiting, makes earlier ones durable and closes the file, at
    /// the end of [`Writer::run`].
    fn close(&mut self) -> Result<(), SpoolError> {
        let mut result = Ok(());
        let riding = self.shared.take_removals();
        if (self.nondurable_streak > 0 || !riding.is_empty()) && !self.needs_reopen {
            // redb would promote them on close too, but this reports a failure.
            let (reply, mut rx) = oneshot::channel();
            let batch = Batch {
                flushes: vec![reply],
                riding,
                ..Batch::default()
            };
            self.execute(batch, true);
            // execute() answers synchronously.
            result = rx.try_recv().unwrap_or(Err(SpoolError::Closed));
        }
        if let Some(db) = self.shared.write_db().take()
            && let Err(e) = db.close()
        {
            let e = SpoolError::from_database(e, &self.shared.path);
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
            batch.fail(&shared, &e);
            return;
        }
        let durable = force_durable
            || !batch.appends.is_empty()
            || !batch.flushes.is_empty()
            || self.nondurable_streak >= MAX_NONDURABLE_STREAK;
        let first_seq = self.next_seq;
        let n = batch.appends.len() as u64;
        match self.commit(&batch, first_seq, durable) {
            Ok(out) => {
                self.next_seq = first_seq + n;
                shared.events.fetch_add(n, Ordering::AcqRel);
                shared
                    .events
                    .fetch_sub(out.removed.events, Ordering::AcqRel);
                shared
                    .bytes
                    .fetch_add(batch.append_bytes(), Ordering::AcqRel);
                shared.bytes.fetch_sub(out.removed.bytes, Ordering::AcqRel);
                shared.release(out.removed.bytes);
                shared
                    .oldest_ms
                    .store(out.oldest_ms.unwrap_or(NO_RECORD), Ordering::Release);
                shared.commits.fetch_add(1, Ordering::AcqRel);
                if durable {
                    shared.durable_commits.fetch_add(1, Ordering::AcqRel);
                    self.nondurable_streak = 0;
                    self.flush_at = None;
                } else {
                    self.nondurable_streak += 1;
                    // Counted from the first: a crash loses at most this long of removals.
                    self.flush_at
                        .get_or_insert_with(|| Instant::now() + IDLE_FLUSH);
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
                self.flush_at = None;
                self.degrade();
                if n > 0 {
                    // Never reuse these numbers, and delete them if the commit landed after all.
                    self.purge.push((first_seq, first_seq + n - 1));
                    self.next_seq = first_seq + n;
                }
                batch.fail(&shared, &e);
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
        let db = guard.as_ref().ok_or_else(SpoolError::not_open)?;
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
        let mut slot = self.shared.write_db();
        let db = slot.as_ref().ok_or_else(SpoolError::not_open)?;
        self.commit_to(db, batch, first_seq, durable)?;
        if let Some(db) = slot.take()
            && let Err(e) = db.close()
        {
            debug!("closing spool after injected commit failure: {e}");
        }
        Err(SpoolError::storage(
            "injected fault spool.commit_fail_after_once: commit reported failed after reaching the disk",
        ))
    }

    /// Begins a write transaction on `db` with the spool's quick-repair setting.
    fn begin_write(&self, db: &Database) -> Result<WriteTransaction, SpoolError> {
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(self.shared.opts.quick_repair);
        Ok(txn)
    }

    /// The transaction of [`Writer::commit`], on `db`.
    fn commit_to(
        &self,
        db: &Database,
        batch: &Batch,
        first_seq: u64,
        durable: bool,
    ) -> Result<Outcome, SpoolError> {
        let mut txn = self.begin_write(db)?;
        if !durable {
            txn.set_durability(Durability::None)?;
        }
        let mut out = Outcome::default();
        {
            let mut table = store::records(&txn)?;
            let mut counts = Vec::with_capacity(batch.removes.len());
            for (seqs, _) in &batch.removes {
                counts.push(store::remove_seqs(&mut table, seqs, &mut out.removed)?);
            }
            out.remove_counts = counts;
            if !batch.riding.is_empty() {
                store::remove_seqs(&mut table, &batch.riding, &mut out.removed)?;
            }
            for (i, (data, ts_ms, _)) in batch.appends.iter().enumerate() {
                store::insert(&mut table, first_seq + i as u64, *ts_ms, data)?;
            }
            out.oldest_ms = store::oldest_ts(&table)?;
            // The high-water mark matters only once the last key may be gone, so only commits
            // that delete write it; append-only commits stay small. Reopen takes
            // max(mark, last key + 1).
            if out.removed.events > 0 {
                store::set_next_seq(&txn, first_seq + batch.appends.len() as u64)?;
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
        let mut slot = shared.write_db();
        if let Some(old) = slot.take()
            && let Err(e) = old.close()
        {
            // Expected after a failed commit; the open below repairs the file.
            debug!("closing spool after storage error: {e}");
        }
        let db = store::open_database(&shared.path, &shared.opts)?;
        let purged = self.purge_failed(&db)?;
        let scan = store::scan(&db)?;
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
        // Wake wait_for_new() callers: their read cursors are stale now.
        shared.last_seq.send_modify(|_| {});
        self.next_seq = self.next_seq.max(scan.next_seq);
        self.needs_reopen = false;
        self.nondurable_streak = 0;
        self.flush_at = None;
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
        let txn = self.begin_write(db)?;
        let mut removed = Removed::default();
        {
            let mut table = store::records(&txn)?;
            for &(lo, hi) in &self.purge {
                store::remove_range(&mut table, lo, hi, &mut removed)?;
            }
            store::raise_next_seq(&txn, self.next_seq)?;
        }
        txn.commit()?;
        Ok(removed.events)
    }
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
