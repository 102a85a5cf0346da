//! Serving HTTP on a bound listener until a shutdown signal, then draining.
//!
//! Shared by the public webhook listener and the admin listener: the caller
//! passes a handler; this module owns connections, timeouts and the drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::conn_guard::{ConnGuard, Expiry};

/// Handles one request from a known peer.
pub trait Handler: Send + Sync + 'static {
    /// The answer to `req`, which came from `peer` (the TCP peer, before any forwarded-for).
    fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// A client must send a complete request head within this time (and, on a new
    /// connection, its first byte).
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed after this long.
    pub idle_timeout: Duration,
    /// Connections open at once; past it, new ones are closed at once.
    pub max_connections: usize,
    /// After shutdown starts, open connections get this long to finish.
    pub drain_deadline: Duration,
}

/// Loads the PEM certificate chain and key for the public listener.
pub(crate) fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
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
    /// A PEM file (named by its setting) cannot be read or parsed.
    #[error("{0}: {1}")]
    Pem(&'static str, String),
    /// rustls refused the certificate and key.
    #[error("http.tls: {0}")]
    Config(rustls::Error),
}

/// How long an idle HTTP/2 connection gets to take its GOAWAY before it is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// Pause after an accept error that a retry cannot fix at once (out of descriptors
/// or memory): the pending connection stays in the backlog and would fail again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` until `stop` is cancelled, then stops
/// accepting, lets requests in flight finish (up to the drain deadline) and returns.
pub(crate) async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: Arc<H>,
    limits: ServerLimits,
    stop: CancellationToken,
) {
    static RAISE: std::sync::Once = std::sync::Once::new();
    // Before the first accept; once per process, whichever listener starts first.
    RAISE.call_once(|| {
        raise_nofile_limit();
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No header timer in hyper: it also runs between keep-alive requests, where the
    // idle timeout applies. The connection guard times heads instead.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let permits = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    // Every connection holds a receiver; the drain ends when the last one is dropped.
    let (draining, drain_rx) = watch::channel(false);
    let mut accept_errors = Throttle::default();
    let mut refusals = Throttle::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        if let Some(suppressed) = accept_errors.ready() {
                            warn!(error = %e, suppressed, "accept failed");
                        }
                        if !is_connection_error(&e) {
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    // Dropping the stream closes it before anything is read.
                    drop(stream);
                    if let Some(suppressed) = refusals.ready() {
                        warn!(max_connections = limits.max_connections, suppressed, "connection refused: too many open");
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = Conn {
                    builder: builder.clone(),
                    handler: handler.clone(),
                    peer,
                    limits,
                    draining: drain_rx.clone(),
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tls {
                        None => conn.run(stream).await,
                        Some(tls) => {
                            // The handshake counts against the header timeout: a silent client cannot hold it.
                            match tokio::time::timeout(limits.header_read_timeout, tls.accept(stream)).await {
                                Ok(Ok(stream)) => conn.run(stream).await,
                                Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => debug!(%peer, "TLS handshake timed out"),
                            }
                        }
                    }
                });
            }
            () = stop.cancelled() => break,
        }
    }
    drop(listener);
    drop(drain_rx);
    draining.send_replace(true);
    tokio::select! {
        () = draining.closed() => {}
        () = tokio::time::sleep(limits.drain_deadline) => {
            warn!(deadline = ?limits.drain_deadline, "connections still open after the drain deadline");
        }
    }
}

/// Errors about one pending connection (the next accept may well succeed).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
}

/// Lets a repeated warning through at most once per second.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(occurrences suppressed since the last one let through)` if this one may be logged.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// One accepted connection and what it needs to be served.
struct Conn<H> {
    builder: auto::Builder<TokioExecutor>,
    handler: Arc<H>,
    peer: SocketAddr,
    limits: ServerLimits,
    draining: watch::Receiver<bool>,
}

impl<H: Handler> Conn<H> {
    /// Serves the connection until the client closes it, its guard expires, or the drain ends it.
    async fn run<I>(mut self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = self.peer;
        let guard = ConnGuard::new(self.limits.header_read_timeout, self.limits.idle_timeout);
        let (handler, requests) = (self.handler.clone(), guard.clone());
        let service = service_fn(move |req| {
            // Counted from the moment hyper has the head: no timer of the guard cuts it.
            let in_progress = requests.request();
            let handler = handler.clone();
            async move {
                let response = handler.handle(req, peer).await;
                drop(in_progress);
                Ok::<_, Infallible>(response)
            }
        });
        let conn = self
            .builder
            .serve_connection(TokioIo::new(guard.wrap_io(io)), service);
        let mut conn = std::pin::pin!(conn);
        let idle = tokio::select! {
            result = conn.as_mut() => return log_end(peer, result),
            why = guard.expired() => match why {
                // No request in progress: nothing to finish.
                Expiry::Silent | Expiry::Head => return debug!(%peer, ?why, "connection closed"),
                Expiry::Idle => true,
            },
            _ = self.draining.wait_for(|draining| *draining) => false,
        };
        // HTTP/1 closes at once; HTTP/2 sends GOAWAY and finishes open streams.
        conn.as_mut().graceful_shutdown();
        let result = if idle {
            debug!(%peer, "closing an idle connection");
            // A client that never answers the GOAWAY's PING is dropped, once no request is in progress.
            let dropped = async {
                tokio::time::sleep(GOAWAY_GRACE).await;
                guard.no_request().await;
            };
            tokio::select! {
                result = conn.as_mut() => result,
                () = dropped => return,
            }
        } else {
            tokio::select! {
                result = conn.as_mut() => result,
                _ = guard.expired() => return,
            }
        };
        log_end(peer, result);
    }
}

/// Logs how a connection ended, if with an error.
fn log_end(peer: SocketAddr, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Raises the soft open-files limit to the hard limit and logs both; the default
/// soft limit (often 1024) would cap connections long before `http.max_connections`.
/// Returns `(soft, hard)` as they are now, or `None` if they cannot be read.
pub(crate) fn raise_nofile_limit() -> Option<(libc::rlim_t, libc::rlim_t)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot read the open-files limit");
        return None;
    }
    let previous_soft = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            warn!(error = %std::io::Error::last_os_error(), soft = limit.rlim_cur, hard = limit.rlim_max, "cannot raise the open-files limit");
        }
    }
    let (soft, hard) = (limit.rlim_cur, limit.rlim_max);
    info!(soft, hard, previous_soft, "open-files limit");
    Some((soft, hard))
}
