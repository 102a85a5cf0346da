//! The part of the ingress that SIGHUP can replace: who may post ([`Auth`]), which
//! event types are accepted ([`Policy`]) and their counters. A request takes the
//! current bundle once, at its start, and keeps it for its whole life, so a reload
//! never changes the rules under a request in flight.

use std::sync::{Arc, RwLock};

use crate::event::{ARCHIVE_EVENT_TYPE, Policy, RoutingKeyTemplate};
use crate::http::auth::Auth;
use crate::http::net::Cidr;
use crate::http::token::TokenKeys;
use crate::ops::metrics::{AcceptedCounters, Metrics};

/// The reloadable rules of the public endpoint, built together from one config.
pub(crate) struct Live {
    pub(crate) auth: Auth,
    pub(crate) policy: Policy,
    /// `events_accepted_total` of each accepted type (and the archive type).
    pub(crate) accepted: AcceptedCounters,
}

impl Live {
    /// From `auth.*`, `http.trusted_proxies` and `events.accept`; `routing_key` and
    /// the signing `keys` are the running ones (they need a restart to change).
    pub(crate) fn build(
        auth: &crate::config::AuthSettings,
        trusted_proxies: &[Cidr],
        accept: &[String],
        routing_key: RoutingKeyTemplate,
        keys: Option<Arc<TokenKeys>>,
        metrics: &Metrics,
    ) -> Live {
        let policy = Policy::new(accept.to_vec(), routing_key);
        let mut types = policy.accept().to_vec();
        types.push(ARCHIVE_EVENT_TYPE.to_owned());
        Live {
            auth: Auth::new(auth, trusted_proxies, keys),
            accepted: metrics.accepted_counters(&types),
            policy,
        }
    }
}

/// The current [`Live`] bundle, shared by the webhook, the token URL and the reloader.
#[derive(Clone)]
pub(crate) struct LiveConfig(Arc<RwLock<Arc<Live>>>);

impl LiveConfig {
    pub(crate) fn new(live: Live) -> Self {
        LiveConfig(Arc::new(RwLock::new(Arc::new(live))))
    }

    /// The bundle in force now: one read lock and one reference count per request.
    pub(crate) fn current(&self) -> Arc<Live> {
        // A poisoned lock still holds a whole bundle: a swap is one assignment.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `live` in force for every request that starts from now on.
    pub(crate) fn replace(&self, live: Live) {
        let live = Arc::new(live);
        let old = std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|p| p.into_inner()),
            live,
        );
        // Freed here, outside the lock (or by the last request still holding it).
        drop(old);
    }
}
