#![allow(dead_code)]
//! A loopback TCP proxy whose link can be cut and restored, to simulate network failures
//! between the bridge and a broker without touching the broker.
//!
//! Point the code under test at [`TcpProxy::addr`] instead of the broker. [`TcpProxy::cut`]
//! closes every forwarded connection at once (with RST, both sides) and then handles new
//! connections per [`CutMode`] until [`TcpProxy::restore`]. All work runs as tasks on the
//! test's tokio runtime and stops when the proxy is dropped.
//!
//! Only `tokio` is used, so this file can be copied as is into `tests/support/`.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a cut link does with connections opened while it is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Accept and immediately reset: the client fails fast, like a broker whose port is
    /// closed. (The listening port itself stays bound, so it cannot be lost to another
    /// process before `restore`.)
    Refuse,
    /// Accept and never forward nor answer: the client hangs until its own timeout, like
    /// a dropped network. These connections are reset when the link is restored or the
    /// proxy dropped.
    Blackhole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkState {
    Forwarding,
    Cut(CutMode),
    Shutdown,
}

/// A TCP proxy from an ephemeral port on 127.0.0.1 to one target address, with a link
/// that tests can cut and restore.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    target: SocketAddr,
    state: watch::Sender<LinkState>,
    live: watch::Sender<usize>,
    accept_task: JoinHandle<()>,
}

impl TcpProxy {
    /// Binds 127.0.0.1:0 and starts forwarding every accepted connection to `target`;
    /// must be called inside a tokio runtime, whose tasks do the forwarding.
    pub async fn start(target: SocketAddr) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(LinkState::Forwarding);
        let (live, _) = watch::channel(0usize);
        let accept_task = tokio::spawn(accept_loop(
            listener,
            target,
            state.subscribe(),
            live.clone(),
        ));
        Ok(TcpProxy {
            addr,
            target,
            state,
            live,
            accept_task,
        })
    }

    /// Shortcut for a target port on 127.0.0.1, e.g. `TcpProxy::to_port(node.port())`.
    pub async fn to_port(port: u16) -> io::Result<TcpProxy> {
        Self::start(SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    /// The address clients must use to go through the proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxied address.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// AMQP URL (guest user, vhost `/`) that reaches the target broker through the proxy.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Number of connections currently being forwarded, e.g. to see that a client has
    /// reconnected after [`TcpProxy::restore`].
    pub fn active_connections(&self) -> usize {
        *self.live.borrow()
    }

    /// Whether the link is currently cut, and how.
    pub fn cut_mode(&self) -> Option<CutMode> {
        match *self.state.borrow() {
            LinkState::Cut(mode) => Some(mode),
            _ => None,
        }
    }

    /// Cuts the link: resets every forwarded connection at once and treats new ones per
    /// `mode` until [`TcpProxy::restore`]. Returns once every forwarded connection is
    /// closed, so the client-side effect can be asserted right away.
    pub async fn cut(&self, mode: CutMode) {
        self.state.send_replace(LinkState::Cut(mode));
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Forwards new connections again (connections blackholed during the cut are reset).
    pub fn restore(&self) {
        self.state.send_replace(LinkState::Forwarding);
    }
}

impl Drop for TcpProxy {
    /// Stops accepting and resets every connection, so nothing outlives the test.
    fn drop(&mut self) {
        self.state.send_replace(LinkState::Shutdown);
        self.accept_task.abort();
    }
}

/// Decrements the live-connection count however the forwarding task ends.
struct LiveGuard(watch::Sender<usize>);

impl LiveGuard {
    fn new(live: watch::Sender<usize>) -> Self {
        live.send_modify(|n| *n += 1);
        LiveGuard(live)
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

fn reset(stream: TcpStream) {
    // Zero linger turns the close into an RST, which both peers notice immediately.
    let _ = stream.set_zero_linger();
    drop(stream);
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    state: watch::Receiver<LinkState>,
    live: watch::Sender<usize>,
) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // E.g. EMFILE: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Count the connection before reading the state, so a concurrent `cut` waits
        // for it and the task itself sees the cut.
        let guard = LiveGuard::new(live.clone());
        let current = *state.borrow();
        match current {
            LinkState::Forwarding => {
                tokio::spawn(forward(inbound, target, state.clone(), guard));
            }
            LinkState::Cut(CutMode::Refuse) => {
                drop(guard);
                reset(inbound);
            }
            LinkState::Cut(CutMode::Blackhole) => {
                drop(guard);
                tokio::spawn(blackhole(inbound, state.clone()));
            }
            LinkState::Shutdown => {
                drop(guard);
                reset(inbound);
                return;
            }
        }
    }
}

async fn forward(
    mut inbound: TcpStream,
    target: SocketAddr,
    mut state: watch::Receiver<LinkState>,
    _guard: LiveGuard,
) {
    let connect = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(target));
    let mut outbound = tokio::select! {
        biased;
        _ = state.wait_for(|s| *s != LinkState::Forwarding) => {
            reset(inbound);
            return;
        }
        result = connect => match result {
            Ok(Ok(stream)) => stream,
            _ => {
                reset(inbound);
                return;
            }
        },
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    tokio::select! {
        biased;
        // Also fires with Err when the proxy (the sender) is gone.
        _ = state.wait_for(|s| *s != LinkState::Forwarding) => {}
        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
    }
    reset(inbound);
    reset(outbound);
}

async fn blackhole(inbound: TcpStream, mut state: watch::Receiver<LinkState>) {
    let _ = state
        .wait_for(|s| *s != LinkState::Cut(CutMode::Blackhole))
        .await;
    reset(inbound);
}
