//! TEMPORARY in-memory stand-in; replaced by the redb spool.
#![allow(dead_code, clippy::unused_async, clippy::type_complexity)]
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("full")]
    Full { max_bytes: u64 },
    #[error("locked")]
    Locked,
    #[error("storage: {0}")]
    Storage(String),
}

#[derive(Debug, Clone, Default)]
pub struct SpoolStats {
    pub events: u64,
    pub bytes: u64,
    pub oldest_age: Option<Duration>,
    pub last_error: Option<String>,
}

#[derive(Clone)]
pub struct Spool {
    inner: Arc<(Mutex<(u64, BTreeMap<u64, Bytes>)>, Notify, u64)>,
}

impl Spool {
    pub fn open(_dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        Ok(Spool {
            inner: Arc::new((Mutex::new((0, BTreeMap::new())), Notify::new(), max_bytes)),
        })
    }
    pub fn inspect(_dir: &Path) -> Result<SpoolStats, SpoolError> {
        Ok(SpoolStats::default())
    }
    pub async fn append(&self, record: Bytes) -> Result<u64, SpoolError> {
        let mut g = self
            .inner
            .0
            .lock()
            .map_err(|_| SpoolError::Storage("poison".into()))?;
        g.0 += 1;
        let seq = g.0;
        g.1.insert(seq, record);
        self.inner.1.notify_waiters();
        Ok(seq)
    }
    pub fn appended(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.inner.1.notified()
    }
    pub async fn read_after(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, SpoolError> {
        let g = self
            .inner
            .0
            .lock()
            .map_err(|_| SpoolError::Storage("poison".into()))?;
        let start = after.map_or(0, |a| a + 1);
        Ok(g.1
            .range(start..)
            .take(limit)
            .map(|(k, v)| (*k, v.clone()))
            .collect())
    }
    pub async fn remove(&self, seqs: Vec<u64>) -> Result<(), SpoolError> {
        let mut g = self
            .inner
            .0
            .lock()
            .map_err(|_| SpoolError::Storage("poison".into()))?;
        for s in seqs {
            g.1.remove(&s);
        }
        Ok(())
    }
    pub fn stats(&self) -> SpoolStats {
        let g = self
            .inner
            .0
            .lock()
            .map(|g| (g.1.len() as u64, g.1.values().map(|v| v.len() as u64).sum()))
            .unwrap_or((0, 0));
        SpoolStats {
            events: g.0,
            bytes: g.1,
            ..Default::default()
        }
    }
    pub async fn close(self) {}
}
