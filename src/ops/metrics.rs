//! Prometheus metrics: one struct that every part updates, rendered by the admin listener.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label of `http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

/// Label of `events_accepted_total`; only accepted types reach it, so cardinality is bounded.
/// Counted through [`AcceptedCounters`], which builds each label once, not per event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabel {
    pub r#type: String,
}

/// Label of `events_rejected_total`: a short, fixed reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric the bridge exports, named `cellosign_bridge_*`.
pub struct Metrics {
    pub http_requests: Family<CodeLabel, Counter>,
    pub events_accepted: Family<TypeLabel, Counter>,
    pub events_rejected: Family<ReasonLabel, Counter>,
    pub ack_latency: Histogram,
    pub publish_confirm: Histogram,
    pub spool_events: Gauge,
    pub spool_bytes: Gauge,
    /// Age of the oldest spooled event in seconds, 0 when the spool is empty; set when
    /// `/metrics` is rendered, like the other spool gauges.
    pub spool_oldest_age: Gauge<f64, AtomicU64>,
    /// 1 while `/readyz` answers 200, else 0; set from the same decision when `/metrics`
    /// is rendered.
    pub ready: Gauge,
    pub broker_connected: Gauge,
    pub broker_reconnects: Counter,
    pub broker_nacks: Counter,
    pub broker_returns: Counter,
    pub dedup_hits: Counter,
    /// Bodies stored in the claim-check store (SPEC 9), a claim check published instead.
    pub claim_checks: Counter,
    /// SIGHUP reloads applied (SPEC 8).
    pub config_reloads: Counter,
    /// SIGHUP reloads refused: the new config did not load or check.
    pub config_reload_failures: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        // 100 µs .. ~6.5 s: answers are sub-millisecond when healthy, seconds when not.
        let latency_buckets = || exponential_buckets(0.0001, 2.0, 17);
        let m = Metrics {
            http_requests: Family::default(),
            events_accepted: Family::default(),
            events_rejected: Family::default(),
            ack_latency: Histogram::new(latency_buckets()),
            publish_confirm: Histogram::new(latency_buckets()),
            spool_events: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_oldest_age: Gauge::default(),
            ready: Gauge::default(),
            broker_connected: Gauge::default(),
            broker_reconnects: Counter::default(),
            broker_nacks: Counter::default(),
            broker_returns: Counter::default(),
            dedup_hits: Counter::default(),
            claim_checks: Counter::default(),
            config_reloads: Counter::default(),
            config_reload_failures: Counter::default(),
            registry: Registry::default(),
        };
        let mut r = Registry::with_prefix("cellosign_bridge");
        r.register(
            "http_requests",
            "Webhook requests answered, by HTTP code",
            m.http_requests.clone(),
        );
        r.register(
            "events_accepted",
            "Events answered \"0\", by event type",
            m.events_accepted.clone(),
        );
        r.register(
            "events_rejected",
            "Events refused, by reason",
            m.events_rejected.clone(),
        );
        r.register(
            "ack_latency_seconds",
            "Time from request to answer for accepted events",
            m.ack_latency.clone(),
        );
        r.register(
            "publish_confirm_seconds",
            "Time from publish to broker confirm",
            m.publish_confirm.clone(),
        );
        r.register(
            "spool_events",
            "Events in the spool, not yet confirmed by the broker",
            m.spool_events.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes of events in the spool",
            m.spool_bytes.clone(),
        );
        r.register(
            "spool_oldest_age_seconds",
            "Age of the oldest event in the spool, 0 when it is empty",
            m.spool_oldest_age.clone(),
        );
        r.register(
            "ready",
            "1 while /readyz answers 200 (an event posted now would be accepted), else 0",
            m.ready.clone(),
        );
        r.register(
            "broker_connected",
            "1 while a broker connection is open",
            m.broker_connected.clone(),
        );
        r.register(
            "broker_reconnects",
            "Broker connections opened after the first",
            m.broker_reconnects.clone(),
        );
        r.register(
            "broker_nacks",
            "Publishes the broker nacked",
            m.broker_nacks.clone(),
        );
        r.register(
            "broker_returns",
            "Publishes the broker returned as unroutable",
            m.broker_returns.clone(),
        );
        r.register(
            "dedup_hits",
            "Repeated events answered without publishing again",
            m.dedup_hits.clone(),
        );
        r.register(
            "claim_checks",
            "Bodies over amqp.max_message_bytes stored in archive.store_url, a claim check published instead",
            m.claim_checks.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP) applied",
            m.config_reloads.clone(),
        );
        r.register(
            "config_reload_failures",
            "Configuration reloads (SIGHUP) refused, the running configuration kept",
            m.config_reload_failures.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Counts an answer by HTTP code.
    pub(crate) fn count_request(&self, code: u16) {
        self.http_requests.get_or_create(&CodeLabel { code }).inc();
    }

    /// Counts a refused event.
    pub(crate) fn count_rejection(&self, reason: &'static str) {
        self.events_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// The `events_accepted_total` counters of the configured `types`, for the hot path.
    pub(crate) fn accepted_counters(&self, types: &[String]) -> AcceptedCounters {
        AcceptedCounters {
            family: self.events_accepted.clone(),
            by_type: types
                .iter()
                .map(|t| (t.as_str().into(), OnceLock::new()))
                .collect(),
        }
    }

    /// The Prometheus text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// `events_accepted_total` by type, counted without allocating or locking: counting an event
/// compares its type with the configured ones and bumps that type's atomic counter.
///
/// Each type's counter joins the family (one owned label, once per process) on its first
/// event, so the exposition lists exactly the types seen, as `get_or_create` per event did.
/// Nothing removes series from the family, so a kept counter stays the one it exports.
pub struct AcceptedCounters {
    /// Shares its counters with [`Metrics::events_accepted`].
    family: Family<TypeLabel, Counter>,
    /// Each configured type and, once it was seen, its counter in `family`.
    by_type: Box<[(Box<str>, OnceLock<Counter>)]>,
}

impl AcceptedCounters {
    /// Counts one accepted event of `event_type`.
    pub(crate) fn count(&self, event_type: &str) {
        match self.by_type.iter().find(|(t, _)| **t == *event_type) {
            Some((t, counter)) => counter
                .get_or_init(|| {
                    self.family.get_or_create_owned(&TypeLabel {
                        r#type: t.to_string(),
                    })
                })
                .inc(),
            // Validation lets only configured types through; counted all the same.
            None => self
                .family
                .get_or_create(&TypeLabel {
                    r#type: event_type.to_owned(),
                })
                .inc(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_counters_show_only_seen_types_with_their_names() {
        let m = Metrics::new();
        let types = [
            "WHEF_SESSION_CREATED".to_string(),
            "CUSTOM_TYPE".to_string(),
        ];
        let counters = m.accepted_counters(&types);
        assert!(!m.render().contains("events_accepted_total{"));
        counters.count("WHEF_SESSION_CREATED");
        counters.count("WHEF_SESSION_CREATED");
        counters.count("CUSTOM_TYPE");
        counters.count("NOT_CONFIGURED");
        let text = m.render();
        for line in [
            r#"cellosign_bridge_events_accepted_total{type="WHEF_SESSION_CREATED"} 2"#,
            r#"cellosign_bridge_events_accepted_total{type="CUSTOM_TYPE"} 1"#,
            r#"cellosign_bridge_events_accepted_total{type="NOT_CONFIGURED"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A second set (another ingress on the same metrics) shares the same series.
        m.accepted_counters(&types).count("CUSTOM_TYPE");
        assert!(
            m.render()
                .contains(r#"cellosign_bridge_events_accepted_total{type="CUSTOM_TYPE"} 2"#)
        );
    }
}
