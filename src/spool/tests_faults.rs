//! Unit tests that break things for real: a writer process killed mid-write, a commit that
//! reaches the disk but is reported failed (fault injection), a full file system. The first
//! two run a helper test of this module in a child process.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use super::tests::{drop_and_wait, payload, read_all};
use super::writer::RECOVERY_INTERVAL;
use super::{Spool, SpoolError};
use crate::fault;

/// A command running the ignored helper test `name` of this module in a child process (this
/// same test binary), alone and with its output shown.
fn child_test(name: &str) -> Command {
    let module = module_path!()
        .split_once("::")
        .map_or(module_path!(), |(_, m)| m);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg(format!("{module}::{name}")).args([
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    cmd
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
            cursor = Some(forwarder.wait_for_new(cursor, 0).await.unwrap());
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
    let mut durable: BTreeMap<u64, String> = BTreeMap::new();
    // Removed records may come back after a kill (non-durable removal): a duplicate, not a loss.
    let mut removed = HashSet::new();
    for round in 0..5u64 {
        let mut child = child_test("crash_child_writer")
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
        // The next round's child opens the file: it must be closed by then.
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(drop_and_wait(spool));
    }
}

/// Child side of `records_of_a_failed_commit_are_never_read`; needs
/// `CELLOSIGN_BRIDGE_FAULTS=spool.commit_fail_after_once`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process for records_of_a_failed_commit_are_never_read"]
async fn failed_commit_child() {
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
    // A forwarder waiting for records: a reopen must wake it, as its read cursor is stale
    // and removals it handed over may have failed with the batch. Waiting past any number
    // a record can get, only that (or a close) can wake it.
    let waiter = {
        let (spool, reopens) = (spool.clone(), spool.stats().reopens);
        tokio::spawn(async move { spool.wait_for_new(Some(u64::MAX), reopens).await })
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
    let woken = tokio::time::timeout(Duration::from_secs(10), waiter).await;
    assert!(
        matches!(woken, Ok(Ok(Ok(_)))),
        "the reopen did not wake the waiting reader: {woken:?}"
    );
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
    drop_and_wait(spool).await;
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
    let out = child_test("failed_commit_child")
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
    assert!(is_no_space(&failure), "{failure:?}");
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
    drop_and_wait(spool).await;
    let spool = Spool::open(&dir, 1 << 30).unwrap();
    check(&spool);
    let seen: HashSet<u64> = acked.iter().map(|a| a.0).collect();
    let next = spool.append(payload("later", 10)).await.unwrap();
    assert!(!seen.contains(&next));
}

/// True when the cause of `e` is a full disk (ENOSPC), not some other I/O failure.
fn is_no_space(e: &SpoolError) -> bool {
    let io = match e {
        SpoolError::Storage(e) => match e.as_ref() {
            redb::Error::Io(io) => io,
            _ => return false,
        },
        SpoolError::Io(io) => io.as_ref(),
        _ => return false,
    };
    io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28)
}
