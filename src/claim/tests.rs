//! The claim-check store against stores reachable here: a local directory, and a
//! fake S3 endpoint on 127.0.0.1 that records each request (never AWS itself:
//! credentials are fixed, so no instance-metadata lookup either).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{ETAG, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use object_store::aws::AmazonS3Builder;

use super::{ClaimError, ClaimStore, document};
use crate::config::ArchiveSettings;

/// What the fake S3 saw: method, path, body.
type Seen = Arc<Mutex<Vec<(String, String, Bytes)>>>;

/// A fake S3 endpoint answering every request with `status`; its URL and what it saw.
async fn fake_s3(status: StatusCode) -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let seen = Seen::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let record = record.clone();
                async move {
                    let (head, body) = req.into_parts();
                    let body = body.collect().await?.to_bytes();
                    let path = head.uri.path().to_owned();
                    record
                        .lock()
                        .unwrap()
                        .push((head.method.to_string(), path, body));
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = status;
                    let etag = HeaderValue::from_static("\"e1\"");
                    response.headers_mut().insert(ETAG, etag);
                    Ok::<_, hyper::Error>(response)
                }
            });
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (endpoint, seen)
}

/// `[archive]` with this store URL, the rest default.
fn settings(url: &str) -> ArchiveSettings {
    ArchiveSettings {
        store_url: Some(url.into()),
        ..ArchiveSettings::default()
    }
}

/// A valid archive body.
fn body() -> Bytes {
    Bytes::from_static(
        br#"{"event":{"type":"WHP_ARCHIVE","timestamp":"2025-01-27T14:02:11Z"},
            "session":{"id":"a1","reference":"r1"},"documents":["JVBERi0xLjQK"]}"#,
    )
}

/// An S3 store on the fake endpoint `endpoint` with fixed credentials.
fn s3_store(endpoint: String) -> ClaimStore {
    let mut settings = settings("s3://claims/cellosign/archives");
    settings.s3_endpoint = Some(endpoint);
    settings.s3_region = Some("eu-west-1".into());
    let s3 = AmazonS3Builder::new()
        .with_access_key_id("AKIATEST")
        .with_secret_access_key("not-a-secret");
    ClaimStore::open_with(&settings, 1 << 20, s3)
        .expect("opens")
        .expect("a store")
}

#[tokio::test]
async fn s3_puts_the_exact_body_under_the_prefix_and_its_sha256() {
    let (endpoint, seen) = fake_s3(StatusCode::OK).await;
    let store = s3_store(endpoint);
    let body = body();
    let doc = store.check_in(&body).await.expect("stored");
    let sha = document::sha256_hex(&body);
    let seen = seen.lock().unwrap().clone();
    let path = format!("/claims/cellosign/archives/{sha}");
    assert_eq!(seen, vec![("PUT".to_owned(), path, body.clone())]);
    let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    let url = format!("s3://claims/cellosign/archives/{sha}");
    assert_eq!(doc["claim_check"]["url"], url.as_str());
    assert_eq!(doc["claim_check"]["bytes"], body.len());
}

#[tokio::test]
async fn s3_refusing_the_put_is_a_store_error() {
    let (endpoint, _) = fake_s3(StatusCode::FORBIDDEN).await;
    let store = s3_store(endpoint);
    let err = store.check_in(&body()).await.expect_err("refused");
    assert!(matches!(err, ClaimError::Store(_)), "{err:?}");
}

#[tokio::test]
async fn a_directory_store_writes_the_body_under_its_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let claims = dir.path().join("new").join("claims");
    let url = url::Url::from_directory_path(&claims).unwrap();
    let store = ClaimStore::open(&settings(url.as_str()), 1 << 20)
        .expect("opens, creating the directory")
        .expect("a store");
    let body = body();
    let doc = store.check_in(&body).await.expect("stored");
    let sha = document::sha256_hex(&body);
    assert_eq!(std::fs::read(claims.join(&sha)).unwrap(), body);
    let doc: serde_json::Value = serde_json::from_slice(&doc).unwrap();
    let object = url::Url::from_file_path(claims.join(&sha)).unwrap();
    assert_eq!(doc["claim_check"]["url"], object.as_str());
    // Again (a sender's retry): the same object, no second file.
    store.check_in(&body).await.expect("stored again");
    assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 1);
}

#[tokio::test]
async fn a_document_over_the_largest_message_is_refused_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let url = url::Url::from_directory_path(dir.path()).unwrap();
    let store = ClaimStore::open(&settings(url.as_str()), 64)
        .unwrap()
        .unwrap();
    let err = store.check_in(&body()).await.expect_err("too large");
    assert!(matches!(err, ClaimError::TooLarge(64)), "{err:?}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn no_store_url_no_store() {
    let none = ClaimStore::open(&ArchiveSettings::default(), 1 << 20).unwrap();
    assert!(none.is_none());
}
