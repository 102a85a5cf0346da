//! Unit tests of the spool's behaviour through its handle: numbering, group commit, removal,
//! reopening, the byte limit, waiting, locking, and what dropping the last handle does. The
//! tests that crash a process or fill a disk are in `tests_faults`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::handle::SpoolStats;
use super::store::FILE_NAME;
use super::store::create_dir_durable;
use super::writer::Op;
use super::{Spool, SpoolError, SpoolOptions};

/// A record that starts with `tag:`, padded with `x` to `len` bytes.
pub(super) fn payload(tag: &str, len: usize) -> Bytes {
    let mut v = format!("{tag}:").into_bytes();
    v.resize(len.max(v.len()), b'x');
    Bytes::from(v)
}

/// Every stored record, in order.
pub(super) fn read_all(spool: &Spool) -> Vec<(u64, Bytes)> {
    spool.read_after_blocking(None, usize::MAX).unwrap()
}

/// Drops `spool` (its last handle) and waits until the writer has closed the file by itself, as
/// a test must before opening the directory again: the drop only signals the writer.
pub(super) async fn drop_and_wait(spool: Spool) {
    let stopped = spool.writer_stopped();
    drop(spool);
    stopped.await;
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
        // Non-durable removals, then a clean drop: the writer makes them durable as it closes.
        let evens: Vec<u64> = (2..=20).step_by(2).collect();
        assert_eq!(spool.remove(evens).await.unwrap(), 10);
        assert_eq!(spool.stats().durable_commits, spool.stats().commits - 1);
        drop_and_wait(spool).await;
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
async fn a_record_appended_in_parts_is_stored_as_one_and_counted_whole() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1000).unwrap();
    let (head, body) = (payload("head", 10), payload("body", 600));
    let seq = spool
        .append_parts(head.clone(), body.clone())
        .await
        .unwrap();
    assert_eq!(read_all(&spool), [(seq, [head, body].concat().into())]);
    assert_eq!(spool.stats().bytes, 610);
    // Full counts both parts.
    assert!(matches!(
        spool
            .append_parts(payload("h", 10), payload("b", 390))
            .await,
        Err(SpoolError::Full { len: 400, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_within_a_byte_budget_stops_once_it_is_reached() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    for n in 0..5 {
        spool.append(payload(&format!("r{n}"), 100)).await.unwrap();
    }
    let seqs = |read: Vec<(u64, Bytes)>| read.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    let within = |bytes| spool.read_after_within(None, 10, bytes);
    assert_eq!(
        seqs(within(250).await.unwrap()),
        [1, 2, 3],
        "up to the record that reaches it"
    );
    assert_eq!(seqs(within(200).await.unwrap()), [1, 2]);
    assert_eq!(
        seqs(within(1).await.unwrap()),
        [1],
        "one record, whatever its size"
    );
    let after = spool.read_after_within(Some(3), 10, 1000).await.unwrap();
    assert_eq!(seqs(after), [4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_new_wakes_forwarder() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let waiter = {
        let spool = spool.clone();
        tokio::spawn(async move { spool.wait_for_new(None, 0).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    spool.append(payload("wake", 10)).await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap(), 1);
    // Already satisfied: returns at once.
    assert_eq!(spool.wait_for_new(Some(0), 0).await.unwrap(), 1);
    let waiter = {
        let spool = spool.clone();
        tokio::spawn(async move { spool.wait_for_new(Some(1), 0).await })
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
    drop_and_wait(spool).await;
    let s = Spool::inspect(dir.path()).unwrap();
    assert_eq!((s.events, s.bytes, s.last_seq), (3, 300, Some(3)));
    assert!(s.oldest_append_ms.is_some());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_signals_and_does_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), 1 << 20).unwrap();
    let stopped = spool.writer_stopped();
    // Holding the database slot keeps the writer from committing: a drop that waited for the
    // writer would wait for this test.
    let shared = spool.shared();
    let slot = shared.write_db();
    let (reply, stored) = oneshot::channel();
    spool
        .send(Op::Append {
            data: [payload("queued", 10), Bytes::new()],
            ts_ms: 1,
            reply,
        })
        .unwrap();
    let (dropped_tx, dropped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(spool);
        let _ = dropped_tx.send(());
    });
    let dropped = dropped.recv_timeout(Duration::from_secs(5));
    drop(slot);
    assert!(
        dropped.is_ok(),
        "dropping the last handle waited for the writer"
    );
    // The writer still stores what was queued, then closes the file and exits by itself.
    assert_eq!(stored.await.unwrap().unwrap(), 1);
    stopped.await;
    drop(shared);
    let s = Spool::inspect(dir.path()).unwrap();
    assert_eq!((s.events, s.bytes, s.last_seq), (1, 10, Some(1)));
}

/// A spool whose deferred removals are committed only by other commits (or at close):
/// their own deadline is far beyond any test.
fn spool_without_removal_deadline(dir: &std::path::Path) -> Spool {
    let opts = SpoolOptions {
        removal_delay: Duration::from_secs(3600),
        ..SpoolOptions::new(1 << 30)
    };
    Spool::open_with(dir, opts).unwrap()
}

/// At an ordinary webhook rate every append commits alone, and the forwarder removes each
/// event once the broker confirmed it. A removal with a commit (and a wake-up of the writer)
/// of its own doubled the writer's work per event: it rides the next append's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_ride_the_commits_of_appends() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_without_removal_deadline(dir.path());
    let mut confirmed = Vec::with_capacity(1);
    for i in 0..50 {
        let seq = spool.append(payload(&format!("r{i}"), 100)).await.unwrap();
        confirmed.push(seq);
        spool.remove_soon(&mut confirmed).unwrap();
        assert!(confirmed.is_empty(), "the caller's buffer is drained");
        assert!(confirmed.capacity() >= 1, "and kept");
    }
    let s = spool.stats();
    assert_eq!(s.commits, 50, "one commit per append, its removal included");
    assert_eq!(s.durable_commits, 50);
    // The last removal waits for a commit to ride.
    assert_eq!((s.events, s.bytes), (1, 100));
    assert_eq!(seqs_of(read_all(&spool)), [50]);
    // Closing commits it: nothing comes back at the next start.
    spool.shutdown().await.unwrap();
    drop(spool);
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(spool.stats().events, 0);
}

/// With no append to ride, a removal is committed by itself within the delay, without
/// fsync, and the next one after it is too (the writer is woken again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_with_nothing_to_ride_commits_within_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions {
        removal_delay: Duration::from_millis(30),
        ..SpoolOptions::new(1 << 30)
    };
    let spool = Spool::open_with(dir.path(), opts).unwrap();
    for round in 0..3u64 {
        let mut seqs = Vec::new();
        for i in 0..3 {
            seqs.push(
                spool
                    .append(payload(&format!("{round}-{i}"), 10))
                    .await
                    .unwrap(),
            );
        }
        let durable = spool.stats().durable_commits;
        spool.remove_soon(&mut seqs).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while spool.stats().events > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the removal was never committed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(spool.stats().durable_commits, durable, "without fsync");
    }
}

/// Removals not yet committed when the last handle is dropped are committed as the writer
/// closes the file, as at shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_waiting_at_drop_are_committed_at_close() {
    let dir = tempfile::tempdir().unwrap();
    let spool = spool_without_removal_deadline(dir.path());
    let mut seqs = Vec::new();
    for i in 0..5 {
        seqs.push(spool.append(payload(&format!("d{i}"), 10)).await.unwrap());
    }
    seqs.retain(|&s| s != 3);
    spool.remove_soon(&mut seqs).unwrap();
    drop_and_wait(spool).await;
    let spool = Spool::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(seqs_of(read_all(&spool)), [3]);
}

/// The sequence numbers of `records`.
fn seqs_of(records: Vec<(u64, Bytes)>) -> Vec<u64> {
    records.into_iter().map(|r| r.0).collect()
}
