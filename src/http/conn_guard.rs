//! Per-connection timers that hyper does not give us (SPEC 6, "Connections").
//!
//! hyper-util's auto builder reads the protocol version before hyper's own header
//! timer starts, and hyper's HTTP/1 header timer also runs between keep-alive
//! requests, so neither fits the contract. The guard sees every read (through
//! [`GuardedIo`]) and every request (through [`ConnGuard::request`]) and says when
//! the connection must go:
//!
//! * nothing received yet: `header_read_timeout` after the connection started;
//! * an HTTP/1 head (or a partial HTTP/2 preface) arriving with no request in
//!   progress: `header_read_timeout` after its first byte;
//! * otherwise, with no request in progress: `idle_timeout` after the last request
//!   ended (or the connection started);
//! * never while a request is in progress (its body has its own timeout).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The client connection preface of HTTP/2 (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Why a connection was closed by its guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Not one byte within `header_read_timeout`.
    Silent,
    /// A request head (or HTTP/2 preface) not complete within `header_read_timeout`.
    Head,
    /// No request in progress for `idle_timeout`.
    Idle,
}

/// What the bytes read so far say about the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    /// Nothing read yet.
    Silent,
    /// This many bytes read, all matching the HTTP/2 preface.
    Preface(usize),
    /// Not the HTTP/2 preface: HTTP/1.
    Http1,
    /// The full HTTP/2 preface.
    Http2,
}

/// The guard's view of one connection, as of the last read or request change.
#[derive(Debug)]
struct State {
    proto: Proto,
    /// Requests whose service future is alive.
    in_progress: usize,
    /// Start of the current period with no request (connection start, or last request end).
    idle_since: Instant,
    /// First byte of a head read while no request was in progress.
    head_since: Option<Instant>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

impl State {
    /// Notes bytes just read; `true` if the deadline may have changed.
    fn on_read(&mut self, bytes: &[u8], now: Instant) -> bool {
        if bytes.is_empty() {
            return false;
        }
        let before = (self.proto, self.head_since);
        if let Proto::Silent | Proto::Preface(_) = self.proto {
            let matched = match self.proto {
                Proto::Preface(n) => n,
                _ => 0,
            };
            let expected = &H2_PREFACE[matched..];
            let n = bytes.len().min(expected.len());
            self.proto = if bytes[..n] != expected[..n] {
                Proto::Http1
            } else if matched + n == H2_PREFACE.len() {
                Proto::Http2
            } else {
                Proto::Preface(matched + n)
            };
        }
        match self.proto {
            // HTTP/2 frames between streams (SETTINGS, PING) are not a head.
            Proto::Http2 => self.head_since = None,
            _ if self.in_progress == 0 && self.head_since.is_none() => {
                self.head_since = Some(now);
            }
            _ => {}
        }
        before != (self.proto, self.head_since)
    }

    /// When the connection must close, and why; `None` while a request is in progress.
    fn deadline(&self) -> Option<(Instant, Expiry)> {
        if self.in_progress > 0 {
            return None;
        }
        Some(match (self.proto, self.head_since) {
            (Proto::Silent, _) => (self.idle_since + self.header_read_timeout, Expiry::Silent),
            (_, Some(head)) => (head + self.header_read_timeout, Expiry::Head),
            (_, None) => (self.idle_since + self.idle_timeout, Expiry::Idle),
        })
    }
}

/// State shared by the IO wrapper, the request counters and the waiter.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked: every update is one assignment.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Watches one connection; cheap to clone, all clones see the same connection.
#[derive(Debug, Clone)]
pub struct ConnGuard {
    shared: Arc<Shared>,
}

impl ConnGuard {
    /// A guard for a connection starting now.
    pub(crate) fn new(header_read_timeout: Duration, idle_timeout: Duration) -> ConnGuard {
        let state = State {
            proto: Proto::Silent,
            in_progress: 0,
            idle_since: Instant::now(),
            head_since: None,
            header_read_timeout,
            idle_timeout,
        };
        ConnGuard {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                changed: Notify::new(),
            }),
        }
    }

    /// Wraps the connection's byte stream so the guard sees what arrives.
    pub(crate) fn wrap_io<T>(&self, inner: T) -> GuardedIo<T> {
        GuardedIo {
            inner,
            shared: self.shared.clone(),
        }
    }

    /// Marks a request in progress until the returned value is dropped.
    pub(crate) fn request(&self) -> RequestInProgress {
        let mut state = self.shared.lock();
        state.in_progress += 1;
        state.head_since = None;
        drop(state);
        self.shared.changed.notify_waiters();
        RequestInProgress {
            shared: self.shared.clone(),
        }
    }

    /// Resolves when the connection must close (see the module doc).
    pub(crate) async fn expired(&self) -> Expiry {
        loop {
            let changed = self.shared.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before reading the state, so no change in between is missed.
            changed.as_mut().enable();
            let Some((at, _)) = self.shared.lock().deadline() else {
                changed.await;
                continue;
            };
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(at) => {
                    // A request may have started on another task at the same instant.
                    if let Some((at, why)) = self.shared.lock().deadline()
                        && at <= Instant::now()
                    {
                        return why;
                    }
                }
            }
        }
    }

    /// Resolves once no request is in progress.
    pub(crate) async fn no_request(&self) {
        loop {
            let changed = self.shared.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.shared.lock().in_progress == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// A request in progress on a guarded connection; dropping it ends the request.
#[derive(Debug)]
pub struct RequestInProgress {
    shared: Arc<Shared>,
}

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.in_progress = state.in_progress.saturating_sub(1);
        if state.in_progress == 0 {
            state.idle_since = Instant::now();
            state.head_since = None;
        }
        drop(state);
        self.shared.changed.notify_waiters();
    }
}

/// A byte stream whose reads are reported to a [`ConnGuard`].
#[derive(Debug)]
pub struct GuardedIo<T> {
    inner: T,
    shared: Arc<Shared>,
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let changed = this
                .shared
                .lock()
                .on_read(&buf.filled()[before..], Instant::now());
            if changed {
                this.shared.changed.notify_waiters();
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Duration = Duration::from_millis(300);
    const IDLE: Duration = Duration::from_millis(1000);

    fn state(now: Instant) -> State {
        State {
            proto: Proto::Silent,
            in_progress: 0,
            idle_since: now,
            head_since: None,
            header_read_timeout: HEADER,
            idle_timeout: IDLE,
        }
    }

    #[test]
    fn silent_gets_the_header_timeout_from_the_start() {
        let t0 = Instant::now();
        assert_eq!(state(t0).deadline(), Some((t0 + HEADER, Expiry::Silent)));
    }

    #[test]
    fn an_http1_head_gets_the_header_timeout_from_its_first_byte() {
        let t0 = Instant::now();
        let mut s = state(t0);
        let t1 = t0 + Duration::from_millis(100);
        assert!(s.on_read(b"POST / HT", t1));
        assert_eq!(s.proto, Proto::Http1);
        assert_eq!(s.deadline(), Some((t1 + HEADER, Expiry::Head)));
        // More of the same head does not move the deadline.
        assert!(!s.on_read(b"TP/1.1\r\n", t1 + HEADER / 2));
        assert_eq!(s.deadline(), Some((t1 + HEADER, Expiry::Head)));
    }

    #[test]
    fn the_http2_preface_split_over_reads_then_means_idle() {
        let t0 = Instant::now();
        let mut s = state(t0);
        let t1 = t0 + Duration::from_millis(50);
        s.on_read(&H2_PREFACE[..5], t1);
        assert_eq!(s.proto, Proto::Preface(5));
        // A partial preface is a head in progress.
        assert_eq!(s.deadline(), Some((t1 + HEADER, Expiry::Head)));
        let mut rest = H2_PREFACE[5..].to_vec();
        rest.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        s.on_read(&rest, t1);
        assert_eq!(s.proto, Proto::Http2);
        assert_eq!(s.deadline(), Some((t0 + IDLE, Expiry::Idle)));
        // Frames between streams keep it idle.
        assert!(!s.on_read(&[0, 0, 8, 6, 0, 0, 0, 0, 0], t1 + IDLE / 2));
        assert_eq!(s.deadline(), Some((t0 + IDLE, Expiry::Idle)));
    }

    #[test]
    fn a_prefix_of_the_preface_that_diverges_is_http1() {
        let mut s = state(Instant::now());
        s.on_read(b"PRI", Instant::now());
        s.on_read(b" / HTTP/1.1\r\n", Instant::now());
        assert_eq!(s.proto, Proto::Http1);
    }

    #[tokio::test]
    async fn no_deadline_while_a_request_is_in_progress_then_idle_from_its_end() {
        let guard = ConnGuard::new(HEADER, IDLE);
        guard
            .shared
            .lock()
            .on_read(b"POST / HTTP/1.1\r\n\r\n", Instant::now());
        let request = guard.request();
        // Body bytes read during the request are not a new head.
        guard.shared.lock().on_read(b"{}", Instant::now());
        assert_eq!(guard.shared.lock().deadline(), None);
        drop(request);
        let (at, why) = guard.shared.lock().deadline().unwrap();
        assert_eq!(why, Expiry::Idle);
        assert!(at > Instant::now() + IDLE / 2);
    }
}
