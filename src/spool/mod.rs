//! Durable local store-and-forward spool.
//!
//! Webhook events are appended here before the HTTP request is answered, and the forwarder
//! removes them once RabbitMQ has confirmed them. The store is one redb file, `spool.redb`.
//!
//! * One writer thread owns every write transaction. All appends queued at one moment share one
//!   write transaction and one `Durability::Immediate` commit (one fsync): group commit.
//! * Removals ride the same thread without being waited for ([`Spool::remove_soon`]): they are
//!   deleted in the next commit, an append's as a rule, or by a commit of their own within
//!   [`SpoolOptions::removal_delay`], so at an ordinary webhook rate they cost the writer no
//!   wake-up and no commit. Their own commits use `Durability::None` (a lost removal only
//!   means a duplicate publish). redb makes a `None` commit durable with the next `Immediate`
//!   commit, or when the database is closed; the writer forces an `Immediate` commit after
//!   [`MAX_NONDURABLE_STREAK`](writer::MAX_NONDURABLE_STREAK) `None` commits in a row,
//!   [`IDLE_FLUSH`](writer::IDLE_FLUSH) after the first `None` commit not yet durable, and
//!   on [`Spool::shutdown`].
//! * redb refuses further write transactions after a failed commit until the database is closed
//!   and reopened, so after any write error the writer reopens the file at once (and before the
//!   next batch, while that fails), durably deletes whatever the failed batch may have left on
//!   disk before any reader sees the reopened file, and rescans the accounting.
//! * While writes fail the spool reports itself degraded; the writer probes for room every
//!   [`RECOVERY_INTERVAL`](writer::RECOVERY_INTERVAL) by itself, so readiness comes back with no request to wake it.
//! * Dropping the last [`Spool`] handle only closes the writer's queue and does not wait: the
//!   writer finishes what is queued, closes the file and exits by itself. [`Spool::shutdown`]
//!   waits for that; [`Spool::writer_stopped`] tells when it happened.
//!
//! Each value is `[append time, unix millis, u64 LE][record bytes]`, keyed by its sequence number.
//!
//! One idea per file:
//! * `handle`: [`Spool`], [`SpoolOptions`], [`SpoolStats`](handle::SpoolStats); what callers do;
//! * `writer`: the writer thread, group commit, reopen, purge and recovery probe;
//! * `shared`: the state the handles and the writer both see (accounting, database slot);
//! * `store`: the redb tables, the value format, and opening, scanning, reading and deleting;
//! * `error`: [`SpoolError`] and its conversions.

mod error;
mod handle;
mod shared;
mod store;
mod writer;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_faults;

pub use error::SpoolError;
pub use handle::{Spool, SpoolOptions};
pub(crate) use store::create_dir_durable;
