//! Serving HTTP on a bound listener until a shutdown signal, then draining.
//!
//! Shared by the public webhook listener and the admin listener: the caller
//! passes a handler; this module owns connections, timeouts and the drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{debug, warn};

/// Handles one request from a known peer.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A client must send a complete request head within this time.
    pub header_read_timeout: Duration,
    /// After shutdown starts, open connections get this long to finish.
    pub drain_deadline: Duration,
}

/// Loads the PEM certificate chain and key for the public listener.
pub fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem("http.tls.cert_file", e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| TlsError::Pem("http.tls.key_file", e.to_string()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: {1}")]
    Pem(&'static str, String),
    #[error("http.tls: {0}")]
    Config(rustls::Error),
}

/// Accepts connections on `listener` until `shutdown` resolves, then stops
/// accepting, lets requests in flight finish (up to the drain deadline) and returns.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    limits: ServerLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually EMFILE: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
                });
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let result = match tls {
                        None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await,
                        Some(tls) => {
                            // The handshake counts against the header timeout: a silent client cannot hold it.
                            let stream = match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => return debug!(%peer, "TLS handshake timed out"),
                            };
                            watcher.watch(builder.serve_connection(TokioIo::new(stream), service).into_owned()).await
                        }
                    };
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.drain_deadline) => {
            warn!(deadline = ?limits.drain_deadline, "connections still open after the drain deadline");
        }
    }
}
