//! `[archive]`: where the claim check (SPEC 9) stores bodies too large to
//! publish, and how long a store may take. The store URL is parsed here once,
//! so a bad one stops the start naming `archive.store_url`, and the claim-check
//! stage opens exactly what was checked.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// The object store for bodies over `amqp.max_message_bytes`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveSettings {
    /// `file:///path` or `s3://bucket/prefix`; none (the default): such bodies get 413.
    pub store_url: Option<String>,
    /// A store not done within this answers 503: a stalled disk or bucket never
    /// holds a request (the write may still land; its name makes a retry harmless).
    pub store_timeout_ms: u64,
    /// S3 region, over `AWS_REGION`/`AWS_DEFAULT_REGION`; none: from the environment.
    pub s3_region: Option<String>,
    /// An S3-compatible endpoint (MinIO, Ceph) instead of AWS, over `AWS_ENDPOINT`;
    /// an `http://` one allows plain HTTP.
    pub s3_endpoint: Option<String>,
}

impl ArchiveSettings {
    /// A store not done within this answers 503.
    pub(crate) fn store_timeout(&self) -> Duration {
        Duration::from_millis(self.store_timeout_ms)
    }

    /// The store's location, `None` without `store_url`; the reason names the key.
    pub(crate) fn location(&self) -> Result<Option<StoreLocation>, ConfigError> {
        self.store_url
            .as_deref()
            .map(|url| StoreLocation::parse(url).map_err(|e| invalid("archive.store_url", e)))
            .transpose()
    }

    /// Rejects values that deserialize but cannot work.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        self.location()?;
        if self.store_timeout_ms == 0 {
            return Err(invalid("archive.store_timeout_ms", "must be > 0"));
        }
        if let Some(endpoint) = &self.s3_endpoint {
            let ok = url::Url::parse(endpoint).is_ok_and(|u| {
                matches!(u.scheme(), "http" | "https") && u.has_host() && u.password().is_none()
            });
            if !ok {
                return Err(invalid(
                    "archive.s3_endpoint",
                    format!("{endpoint:?} is not an http:// or https:// URL without credentials"),
                ));
            }
        }
        if self.s3_region.as_deref().is_some_and(str::is_empty) {
            return Err(invalid("archive.s3_region", "must not be empty"));
        }
        Ok(())
    }
}

impl Default for ArchiveSettings {
    fn default() -> Self {
        ArchiveSettings {
            store_url: None,
            store_timeout_ms: 30_000,
            s3_region: None,
            s3_endpoint: None,
        }
    }
}

/// Where claim-checked bodies go, as `archive.store_url` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A local directory (`file:///path`), created at start if missing.
    File(PathBuf),
    /// An S3 bucket and a key prefix (`s3://bucket/prefix`, the prefix may be empty).
    S3 { bucket: String, prefix: String },
}

impl StoreLocation {
    /// Parses `file:///absolute/path` or `s3://bucket[/prefix]`. Credentials in the URL
    /// are refused: they come from the environment, and the URL is printed by
    /// `check-config` and written into every claim-check message.
    pub fn parse(text: &str) -> Result<StoreLocation, String> {
        let url = url::Url::parse(text).map_err(|e| format!("{text:?}: {e}"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry credentials (they come from the environment)".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{text:?}: no query or fragment allowed"));
        }
        match url.scheme() {
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(format!(
                        "{text:?}: a file URL names an absolute local path, file:///path"
                    ));
                }
                let path = url
                    .to_file_path()
                    .map_err(|()| format!("{text:?}: not a local path"))?;
                if path.parent().is_none() {
                    return Err(format!("{text:?}: not the root directory"));
                }
                Ok(StoreLocation::File(path))
            }
            "s3" => {
                let bucket = url.host_str().unwrap_or_default();
                if bucket.is_empty() || url.port().is_some() {
                    return Err(format!("{text:?}: expected s3://bucket/prefix"));
                }
                // S3's safe key characters only: the key and the URL in messages stay one text.
                let prefix = url.path().trim_matches('/');
                let safe = |c: char| c.is_ascii_alphanumeric() || "-_.!*'()/".contains(c);
                let bad_segment = prefix
                    .split('/')
                    .any(|p| p.is_empty() || p == "." || p == "..");
                if !prefix.is_empty() && (bad_segment || !prefix.chars().all(safe)) {
                    return Err(format!(
                        "{text:?}: the prefix is /-separated segments of A-Z a-z 0-9 - _ . ! * ' ( )"
                    ));
                }
                Ok(StoreLocation::S3 {
                    bucket: bucket.to_owned(),
                    prefix: prefix.to_owned(),
                })
            }
            other => Err(format!(
                "{other}: unsupported scheme, use file:///path or s3://bucket/prefix"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::verdict;

    #[test]
    fn file_and_s3_urls_parse() {
        assert_eq!(
            StoreLocation::parse("file:///var/lib/bridge/claims"),
            Ok(StoreLocation::File("/var/lib/bridge/claims".into()))
        );
        assert_eq!(
            StoreLocation::parse("s3://archives/cellosign/bodies/"),
            Ok(StoreLocation::S3 {
                bucket: "archives".into(),
                prefix: "cellosign/bodies".into()
            })
        );
        assert_eq!(
            StoreLocation::parse("s3://archives"),
            Ok(StoreLocation::S3 {
                bucket: "archives".into(),
                prefix: String::new()
            })
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        for bad in [
            "",
            "/var/lib/claims",
            "file://host/var/lib",
            "file:///",
            "http://example.com/x",
            "s3://",
            "s3://key:secret@bucket/p",
            "s3://bucket:9000/p",
            "s3://bucket/a//b",
            "s3://bucket/a%20b",
            "s3://bucket/p?x=1",
        ] {
            assert!(StoreLocation::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_of_either_kind_are_refused() {
        for bad in ["s3://key@bucket/p", "s3://:secret@bucket/p"] {
            let err = StoreLocation::parse(bad).expect_err(bad);
            assert!(err.contains("credentials"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_file_url_names_a_local_path() {
        let err = StoreLocation::parse("file://host/var/lib").expect_err("a host");
        assert!(err.contains("absolute local path"), "{err}");
        assert_eq!(
            StoreLocation::parse("file://localhost/var/lib/claims"),
            Ok(StoreLocation::File("/var/lib/claims".into()))
        );
    }

    #[test]
    fn dot_segments_never_reach_the_prefix() {
        // The URL parser resolves them (also percent-encoded), so the prefix check's
        // "." and ".." cases are a second line only (docs/mutants.md).
        for (url, prefix) in [
            ("s3://bucket/a/../b", "b"),
            ("s3://bucket/a/./b", "a/b"),
            ("s3://bucket/a/%2e%2e/b", "b"),
        ] {
            assert_eq!(
                StoreLocation::parse(url),
                Ok(StoreLocation::S3 {
                    bucket: "bucket".into(),
                    prefix: prefix.into()
                }),
                "{url}"
            );
        }
    }

    #[test]
    fn an_s3_endpoint_is_an_http_url_with_a_host_and_no_password() {
        let endpoint = |e: &str| {
            verdict(
                ArchiveSettings {
                    s3_endpoint: Some(e.into()),
                    ..ArchiveSettings::default()
                }
                .check(),
            )
        };
        for good in ["https://s3.example.com", "http://127.0.0.1:9000"] {
            assert_eq!(endpoint(good), "accepted", "{good}");
        }
        for bad in [
            "ftp://s3.example.com",
            "https://user:secret@s3.example.com",
            "s3.example.com",
        ] {
            assert!(
                endpoint(bad).starts_with("archive.s3_endpoint: "),
                "{bad}: {}",
                endpoint(bad)
            );
        }
    }
}
