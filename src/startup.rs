//! Builds the whole application from settings, for `main` and tests alike,
//! and runs it until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::confirmed::DirectPublisher;
use crate::amqp::link::Link;
use crate::claim::{ClaimStore, OpenError};
use crate::config::{AckMode, AmqpSettings, Settings};
use crate::forwarder::Forwarder;
use crate::http::server::{ServerLimits, TlsError, serve, tls_acceptor};
use crate::http::token::TokenKeys;
use crate::http::token_endpoint::TokenEndpoint;
use crate::ingress::dedup::{Dedup, Expiry};
use crate::ingress::delivery::Delivery;
use crate::ingress::live::{Live, LiveConfig};
use crate::ingress::{Ingress, IngressLimits, PathLimits};
use crate::ops::admin::Admin;
use crate::ops::metrics::Metrics;
use crate::ops::reload::{OnHangup, Reloader};
use crate::spool::{Spool, SpoolError, SpoolOptions};
use crate::supervisor::{Failure, Supervisor};
use crate::trace::{Telemetry, TelemetryError};

/// Why the application could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("spool.dir: cannot open the spool: {0}")]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The claim-check store (`archive.store_url`) could not be opened.
    #[error(transparent)]
    ClaimStore(#[from] OpenError),
    /// The span exporter (`telemetry.otlp_endpoint`) could not be set up.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
}

/// A built, bound application, not yet serving.
pub struct Application {
    settings: Settings,
    http: TcpListener,
    tls: Option<TlsAcceptor>,
    admin: TcpListener,
    ingress: Arc<Ingress>,
    admin_handler: Arc<Admin>,
    spool: Option<Spool>,
    forwarder: Option<Forwarder>,
    supervisor: Supervisor,
    /// Stops the broker link and the confirmed-mode publisher, last of the background work.
    broker_stop: CancellationToken,
    /// The rules SIGHUP can replace, shared with the ingress.
    live: LiveConfig,
    /// The signing keys the running rules verify with.
    keys: Option<Arc<TokenKeys>>,
    metrics: Arc<Metrics>,
    /// Span export, flushed last at shutdown.
    telemetry: Telemetry,
    /// Reloads on SIGHUP, once [`Application::reload_on`] asked for it.
    reload: Option<(Reloader, tokio::signal::unix::Signal)>,
    /// Forgets dedup ids at rest.
    dedup_expiry: Expiry,
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

impl Application {
    /// Binds both listeners, opens the spool, starts the broker link and forwarder.
    /// Everything that can fail is done before the first task starts, so a failed
    /// build leaves nothing running.
    pub async fn build(settings: Settings) -> Result<Application, StartError> {
        let tls = match &settings.http.tls {
            Some(tls) => Some(tls_acceptor(&tls.cert_file, &tls.key_file)?),
            None => None,
        };
        let http = bind("http.listen", settings.http.listen).await?;
        let admin = bind("admin.listen", settings.admin.listen).await?;
        let spool = match settings.delivery.ack {
            AckMode::Spooled => Some(Spool::open_with(
                &settings.spool.dir,
                spool_options(&settings),
            )?),
            AckMode::Confirmed => None,
        };
        let claim_store = ClaimStore::open(&settings.archive, settings.amqp.max_message_bytes)?;
        let telemetry = Telemetry::start(&settings.telemetry)?;

        let metrics = Arc::new(Metrics::new());
        let supervisor = Supervisor::new();
        let (link, broker_stop) = start_link(&settings.amqp, &metrics, &supervisor);

        let (delivery, forwarder) = match &spool {
            Some(spool) => {
                let forwarder = start_forwarder(
                    spool,
                    &link,
                    &settings.amqp,
                    &metrics,
                    &telemetry,
                    &supervisor,
                );
                (Delivery::Spooled(spool.clone()), Some(forwarder))
            }
            None => {
                let (publisher, task) = DirectPublisher::start(
                    link.clone(),
                    settings.amqp.exchange.clone(),
                    settings.amqp.publish_timeout(),
                    metrics.clone(),
                    broker_stop.clone(),
                );
                supervisor.watch("publisher", broker_stop.clone(), task);
                (Delivery::Confirmed(Box::new(publisher)), None)
            }
        };

        let keys = TokenKeys::new(&settings.auth).map(Arc::new);
        let live = Live::build(
            &settings.auth,
            &settings.http.trusted_proxies,
            &settings.events.accept,
            settings.amqp.routing_key.clone(),
            keys.clone(),
            &metrics,
        );
        if live.auth.is_open() {
            warn!(
                "auth.tokens and auth.clients are empty: anyone who can reach the webhook can post events"
            );
        }
        let live = LiveConfig::new(live);
        let dedup = Dedup::new(
            Duration::from_secs(settings.events.dedup_window_s),
            settings.events.dedup_max_ids,
        );
        let dedup_expiry = dedup.expiry();
        let http_settings = &settings.http;
        let limits = IngressLimits {
            notification: PathLimits {
                path: http_settings.path.clone(),
                max_body_bytes: http_settings.max_body_bytes,
                max_in_flight: http_settings.max_in_flight,
            },
            archive: PathLimits {
                path: http_settings.archive_path.clone(),
                max_body_bytes: http_settings.archive_max_body_bytes,
                max_in_flight: http_settings.archive_max_in_flight,
            },
            max_message_bytes: settings.amqp.max_message_bytes,
            claim_store,
            body_read_timeout: http_settings.body_read_timeout(),
        };
        let mut ingress = Ingress::new(
            limits,
            live.clone(),
            dedup,
            delivery,
            metrics.clone(),
            supervisor.clone(),
        )
        .with_telemetry(telemetry.clone());
        if let Some(keys) = keys.clone() {
            info!(
                path = %settings.auth.token_path,
                clients = settings.auth.clients.len(),
                keys = settings.auth.token_keys.len(),
                ttl_s = settings.auth.token_ttl_s,
                "token URL served"
            );
            ingress = ingress.with_token_endpoint(TokenEndpoint::new(
                &settings.auth,
                keys,
                metrics.clone(),
                settings.http.body_read_timeout(),
            ));
        }
        let ingress = Arc::new(ingress);
        let admin_handler = Arc::new(Admin::new(
            link,
            spool.clone().map(|s| (s, settings.spool.max_bytes)),
            metrics.clone(),
            supervisor.clone(),
        ));
        Ok(Application {
            settings,
            http,
            tls,
            admin,
            ingress,
            admin_handler,
            spool,
            forwarder,
            supervisor,
            broker_stop,
            live,
            keys,
            metrics,
            telemetry,
            reload: None,
            dedup_expiry,
        })
    }

    /// Reloads the configuration on every SIGHUP `on` handles, while serving.
    pub fn reload_on(mut self, on: OnHangup) -> Application {
        self.reload = Some(Reloader::new(
            on,
            self.settings.clone(),
            self.live.clone(),
            self.keys.clone(),
            self.metrics.clone(),
        ));
        self
    }

    /// Address of the public listener (useful when bound to port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http.local_addr().unwrap_or(self.settings.http.listen)
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or(self.settings.admin.listen)
    }

    /// Serves until `shutdown` resolves or a background task fails, then stops in
    /// order within `shutdown.grace_ms`: stop accepting, finish requests in flight,
    /// forward what can be forwarded, keep the rest in the spool. Returns the
    /// failure, if one caused the stop.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), Failure> {
        let grace = self.settings.shutdown.grace();
        let header_read_timeout = self.settings.http.header_read_timeout();
        let limits = ServerLimits {
            header_read_timeout,
            idle_timeout: self.settings.http.idle_timeout(),
            max_connections: self.settings.http.max_connections,
            drain_deadline: grace,
        };
        // Actual addresses: with port 0 in the settings, tests learn the ports from this line.
        let (http_addr, admin_addr) = (self.http_addr(), self.admin_addr());
        let supervisor = self.supervisor;
        let public_stop = supervisor.child_token();
        let admin_stop = supervisor.child_token();
        let stop = supervisor.child_token();
        supervisor.spawn_critical("dedup expiry", stop.clone(), self.dedup_expiry.run(stop));
        if let Some((reloader, hangup)) = self.reload {
            let stop = supervisor.child_token();
            supervisor.spawn_critical("config reload", stop.clone(), reloader.run(hangup, stop));
        }
        supervisor.spawn_critical(
            "public listener",
            public_stop.clone(),
            serve(
                self.http,
                self.tls,
                self.ingress,
                limits,
                public_stop.clone(),
            ),
        );
        supervisor.spawn_critical(
            "admin listener",
            admin_stop.clone(),
            serve(
                self.admin,
                None,
                self.admin_handler,
                limits,
                admin_stop.clone(),
            ),
        );
        info!(
            http = %http_addr,
            path = %self.settings.http.path,
            archive_path = %self.settings.http.archive_path,
            admin = %admin_addr,
            mode = ?self.settings.delivery.ack,
            span_export = self.telemetry.is_on(),
            "cellosign-bridge serving"
        );

        tokio::select! {
            () = shutdown => {}
            () = supervisor.failed() => {}
        }
        let deadline = Instant::now() + grace;
        supervisor.begin_shutdown();
        info!(
            grace_ms = self.settings.shutdown.grace_ms,
            "shutting down: no new requests"
        );
        public_stop.cancel();
        if let Some(forwarder) = &self.forwarder {
            forwarder.drain_until(deadline).await;
        }
        self.broker_stop.cancel();
        if let Some(spool) = self.spool {
            let left = spool.stats().events;
            if left > 0 {
                info!(events = left, "events kept in the spool for the next start");
            }
            // A stalled disk must not hold the exit: what is committed is safe anyway.
            let close =
                tokio::time::timeout_at(deadline.max(Instant::now() + CLOSE_MIN), spool.shutdown());
            match close.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "closing the spool"),
                Err(_) => warn!("the spool did not close in time; its committed events are safe"),
            }
        }
        // The last spans (the final publishes) are flushed within what is left of the grace.
        let left = deadline.saturating_duration_since(Instant::now());
        self.telemetry.shutdown(left.max(CLOSE_MIN)).await;
        admin_stop.cancel();
        supervisor.cancel_all();
        let wait_until = deadline.max(Instant::now()) + CLOSE_MIN;
        if tokio::time::timeout_at(wait_until, supervisor.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not stop in time; exiting anyway");
        }
        match supervisor.failure() {
            Some(failure) => Err(failure),
            None => {
                info!("stopped");
                Ok(())
            }
        }
    }
}

/// Starts the broker link under `supervisor`; the token stops it (and whatever
/// publishes through it), last of the background work.
pub(crate) fn start_link(
    amqp: &AmqpSettings,
    metrics: &Arc<Metrics>,
    supervisor: &Supervisor,
) -> (Link, CancellationToken) {
    let broker_stop = supervisor.child_token();
    let (link, task) = Link::start(amqp.clone(), metrics.clone(), broker_stop.clone());
    supervisor.watch("broker link", broker_stop.clone(), task);
    (link, broker_stop)
}

/// Starts the forwarder of `spool` under `supervisor`, with the spool's writer thread
/// watched beside it: the part of the bridge that empties the spool, for `serve` and
/// `spool drain` alike.
pub(crate) fn start_forwarder(
    spool: &Spool,
    link: &Link,
    amqp: &AmqpSettings,
    metrics: &Arc<Metrics>,
    telemetry: &Telemetry,
    supervisor: &Supervisor,
) -> Forwarder {
    let stats = spool.stats();
    if stats.events > 0 {
        info!(
            events = stats.events,
            bytes = stats.bytes,
            "spool holds events from before; forwarding them first"
        );
    }
    let stop = supervisor.child_token();
    let (forwarder, task) = Forwarder::start_traced(
        spool.clone(),
        link.clone(),
        amqp,
        metrics.clone(),
        telemetry.clone(),
        stop.clone(),
    );
    supervisor.watch("forwarder", stop.clone(), task);
    // The writer thread ends only after the spool is shut down, which comes after
    // the forwarder's stop.
    supervisor.watch_until("spool writer", stop, spool.writer_stopped());
    forwarder
}

/// The spool's options from the settings, for `serve` and `spool drain` alike.
pub(crate) fn spool_options(settings: &Settings) -> SpoolOptions {
    SpoolOptions {
        append_timeout: settings.spool.append_timeout(),
        cache_bytes: settings.spool.cache_bytes,
        ..SpoolOptions::new(settings.spool.max_bytes)
    }
}

/// Time always given to the last steps of a shutdown (closing the spool, ending
/// tasks), even when the grace period is spent: part of the promised extra second.
const CLOSE_MIN: Duration = Duration::from_millis(300);
