//! The HTTP client the OTLP exporter posts with.
//!
//! The SDK's batch processor exports from a thread of its own, outside any
//! Tokio runtime, while hyper's client needs one. Each post is therefore
//! spawned onto the bridge's runtime and awaited from that thread: the export
//! never runs on, or waits for, a request's task.

use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use tokio::runtime::Handle;

/// hyper's client, run on the bridge's runtime.
#[derive(Debug)]
pub(crate) struct RuntimeClient {
    runtime: Handle,
    inner: HyperClient,
}

impl RuntimeClient {
    /// A client whose posts run on `runtime` and give up after `timeout`.
    pub(crate) fn new(runtime: Handle, timeout: std::time::Duration) -> Self {
        // Built on the runtime: hyper's pool starts its timers there.
        let _entered = runtime.enter();
        RuntimeClient {
            inner: HyperClient::with_default_connector(timeout, None),
            runtime,
        }
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let inner = self.inner.clone();
        // A runtime that is shutting down cancels the task: the export fails at once.
        self.runtime
            .spawn(async move { inner.send_bytes(request).await })
            .await?
    }
}
