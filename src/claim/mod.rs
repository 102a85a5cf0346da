//! Claim check for large bodies (SPEC 9): a body over `amqp.max_message_bytes`
//! is written to the object store `archive.store_url`, named by its SHA-256,
//! before the caller hears "0"; what is stored and published in its place is a
//! small JSON document pointing at it ([`document`]), with `x-claim-check: true`.
//!
//! Durability of `file://`: object_store's `LocalFileSystem` writes a temp file
//! and renames it into place; with `with_fsync(true)` (object_store 0.14) it
//! `fsync`s the file before the rename and the directory after it (and any
//! directory it creates), before `put` returns. The store's own directory is
//! created at start and fsync'd into its parent (`create_dir_durable`, as the
//! spool's). For `s3://`, a PUT that S3 answered 200 is durable by S3's contract.
//!
//! The body is never copied here: it is hashed in place, the document borrows
//! `event` and `session` from it, and the store is handed the same `Bytes`.

mod document;
#[cfg(test)]
mod tests;

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::config::{ArchiveSettings, StoreLocation};
use crate::spool::create_dir_durable;

/// Why the store could not be opened at start; the start is refused naming
/// `archive.store_url`.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL does not parse (already refused by config loading, kept for callers
    /// that build settings by hand).
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// The local directory could not be created.
    #[error("archive.store_url: cannot create {path}: {source}")]
    Dir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// object_store refused the location or settings.
    #[error("archive.store_url: {0}")]
    Store(#[from] object_store::Error),
}

/// Why a body could not be claim-checked; nothing was published.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Even `event` and `session` alone are larger than the largest message (413).
    #[error(
        "body's event and session larger than {0} bytes, the largest message (amqp.max_message_bytes)"
    )]
    TooLarge(usize),
    /// The store refused the write (disk full, unwritable directory, S3 error): 503.
    #[error("claim-check store cannot store bodies now, retry later")]
    Store(#[source] object_store::Error),
    /// Not stored within `archive.store_timeout_ms`: 503.
    #[error("claim-check store too slow to store bodies now, retry later")]
    Timeout(Duration),
    /// Hashing or building the document failed (a bug: the body was validated): 503.
    #[error("claim check failed, retry later")]
    Internal(String),
}

/// The opened object store and how its objects are named.
#[derive(Debug, Clone)]
pub struct ClaimStore {
    store: Arc<dyn ObjectStore>,
    /// Key prefix inside the store: empty for a directory (it is the store's root),
    /// the URL's path for S3.
    prefix: Path,
    /// The store URL without a trailing `/`: an object's URL is `{url_base}/{sha256}`.
    url_base: String,
    /// A store not done within this answers 503.
    timeout: Duration,
    /// `amqp.max_message_bytes`: a document over it cannot be published either.
    max_message_bytes: usize,
}

impl ClaimStore {
    /// Opens the store `settings` names, `None` without `archive.store_url`. A local
    /// directory is created (durably) if missing; S3 settings come from the
    /// environment the usual AWS way (`AmazonS3Builder::from_env`), then the keys of
    /// `[archive]`. Nothing is sent to S3 here: credentials may come from an instance
    /// role that is only asked on the first write.
    pub(crate) fn open(
        settings: &ArchiveSettings,
        max_message_bytes: usize,
    ) -> Result<Option<ClaimStore>, OpenError> {
        Self::open_with(settings, max_message_bytes, AmazonS3Builder::from_env())
    }

    /// [`ClaimStore::open`], an S3 store built from `s3` (the environment's
    /// settings; fixed ones in tests, which must never reach a real AWS endpoint).
    fn open_with(
        settings: &ArchiveSettings,
        max_message_bytes: usize,
        s3: AmazonS3Builder,
    ) -> Result<Option<ClaimStore>, OpenError> {
        let Some(location) = settings.location()? else {
            return Ok(None);
        };
        let (store, prefix, url_base): (Arc<dyn ObjectStore>, Path, String) = match location {
            StoreLocation::File(dir) => (Arc::new(local_store(&dir)?), Path::default(), {
                let url = url::Url::from_file_path(&dir).map_err(|()| OpenError::Dir {
                    path: dir.clone(),
                    source: std::io::Error::other("not an absolute path"),
                })?;
                url.as_str().trim_end_matches('/').to_owned()
            }),
            StoreLocation::S3 { bucket, prefix } => {
                let mut builder = s3.with_bucket_name(&bucket);
                if let Some(region) = &settings.s3_region {
                    builder = builder.with_region(region);
                }
                if let Some(endpoint) = &settings.s3_endpoint {
                    builder = builder
                        .with_allow_http(endpoint.starts_with("http://"))
                        .with_endpoint(endpoint);
                }
                let url_base = match prefix.as_str() {
                    "" => format!("s3://{bucket}"),
                    p => format!("s3://{bucket}/{p}"),
                };
                let prefix = Path::parse(&prefix)
                    .map_err(|e| OpenError::Store(object_store::Error::from(e)))?;
                (Arc::new(builder.build()?), prefix, url_base)
            }
        };
        Ok(Some(ClaimStore {
            store,
            prefix,
            url_base,
            timeout: settings.store_timeout(),
            max_message_bytes,
        }))
    }

    /// Stores `body` under its SHA-256 and returns the document to publish in its
    /// place; Ok only once the object is durable. Storing the same body again writes
    /// the same object (same name, same bytes): a retry is harmless.
    pub(crate) async fn check_in(&self, body: &Bytes) -> Result<Bytes, ClaimError> {
        // Hashing and scanning many megabytes is CPU work: off the async workers.
        let (sha256, document) = {
            let body = body.clone();
            let url_base = self.url_base.clone();
            tokio::task::spawn_blocking(move || {
                let sha256 = document::sha256_hex(&body);
                let url = format!("{url_base}/{sha256}");
                document::document(&body, &url, &sha256).map(|doc| (sha256, doc))
            })
            .await
            .map_err(|e| ClaimError::Internal(e.to_string()))?
            .map_err(|e| ClaimError::Internal(e.to_string()))?
        };
        if document.len() > self.max_message_bytes {
            return Err(ClaimError::TooLarge(self.max_message_bytes));
        }
        let location = self.prefix.clone().join(sha256.as_str());
        let put = self.store.put(&location, PutPayload::from(body.clone()));
        match tokio::time::timeout(self.timeout, put).await {
            Ok(Ok(_)) => Ok(Bytes::from(document)),
            Ok(Err(e)) => Err(ClaimError::Store(e)),
            Err(_) => Err(ClaimError::Timeout(self.timeout)),
        }
    }
}

/// The local directory `dir` as a store whose writes are durable before they
/// return (see the module doc); the directory is created, fsync'd into its parent.
fn local_store(dir: &FsPath) -> Result<LocalFileSystem, OpenError> {
    create_dir_durable(dir).map_err(|source| OpenError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    Ok(LocalFileSystem::new_with_prefix(dir)?.with_fsync(true))
}
