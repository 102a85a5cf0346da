//! A minimal HTTP/1.1 GET client for the bridge's own admin listener.
//!
//! Operator commands ask a running bridge through it (`spool stats` reads
//! `/readyz`). It is hand-written on hyper, which the crate already has, rather
//! than a full HTTP client dependency: one plain-text request to a known local
//! listener needs no TLS, redirects or pooling.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Longest wait for the TCP connect, so a stopped or firewalled bridge is
/// reported instead of waited on.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the admin listener gave no body; the text is shown to the operator.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// Nothing accepted within [`CONNECT_TIMEOUT`]: a black hole or a wrong address.
    #[error("connect timed out")]
    ConnectTimeout,
    /// Refused, unreachable or reset: no bridge listening there.
    #[error("{0}")]
    Connect(#[from] std::io::Error),
    /// The listener answered, but not with HTTP/1.1 this client could read.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (a path that is not a valid URI).
    #[error("{0}")]
    Request(#[from] hyper::http::Error),
}

/// GETs `path` from the admin listener at `addr` and returns the body of any
/// answer, whatever its status: `/readyz` answers 503 with the same JSON when
/// the bridge is not ready, and the caller still wants it.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Result<Bytes, AdminClientError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| AdminClientError::ConnectTimeout)??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    // The connection task drives the socket; it ends when `sender` is dropped.
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    Ok(response.into_body().collect().await?.to_bytes())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-shot server that reads the request head and writes `answer`.
    async fn answering(answer: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut head = [0u8; 1024];
            let _ = socket.read(&mut head).await;
            let _ = socket.write_all(answer.as_bytes()).await;
        });
        addr
    }

    /// A not-ready bridge answers 503 with the readiness JSON; the body must come through.
    #[tokio::test]
    async fn returns_the_body_whatever_the_status() {
        let addr = answering(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}",
        )
        .await;
        let body = get(addr, "/readyz").await.expect("an answer");
        assert_eq!(&body[..], b"{\"ok\":true}");
    }

    /// A stopped bridge must give an error, not a hang.
    #[tokio::test]
    async fn a_closed_port_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local address");
        drop(listener);
        let result = get(addr, "/readyz").await;
        assert!(
            matches!(result, Err(AdminClientError::Connect(_))),
            "{result:?}"
        );
    }
}
