//! A tiny OTLP/HTTP receiver on 127.0.0.1:0: keeps the path and body of every
//! request and answers 200 with an empty (valid) protobuf response, as a collector
//! that took everything would. Runs as tasks on the test's runtime; stops when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The requests received so far: (path, body).
type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

pub struct OtlpReceiver {
    pub addr: SocketAddr,
    received: Received,
    task: JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Received::default();
        let keep = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let keep = keep.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let keep = keep.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            if let Ok(mut all) = keep.lock() {
                                all.push((path, body));
                            }
                            let mut answer = Response::new(Full::new(Bytes::new()));
                            answer.headers_mut().insert(
                                "content-type",
                                hyper::header::HeaderValue::from_static("application/x-protobuf"),
                            );
                            Ok::<_, Infallible>(answer)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        OtlpReceiver {
            addr,
            received,
            task,
        }
    }

    /// The endpoint to configure: the receiver's base URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far: (path, body).
    pub fn received(&self) -> Vec<(String, Bytes)> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }
}
