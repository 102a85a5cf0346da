//! `[telemetry]`: where spans go over OTLP/HTTP, if anywhere. The endpoint is
//! checked here once, so a bad one stops the start naming the key.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// The path an OTLP/HTTP receiver takes traces on, added to an endpoint without one.
const TRACES_PATH: &str = "/v1/traces";

/// Span export; off (no exporter, no span built) while `otlp_endpoint` is empty.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// An OTLP/HTTP (protobuf) receiver, e.g. `http://127.0.0.1:4318`; empty: off.
    pub otlp_endpoint: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Spans waiting for export; past it new spans are dropped, never waited for.
    pub max_queued_spans: usize,
    /// How often queued spans are sent (sooner when a batch fills).
    pub export_interval_ms: u64,
    /// One export (with its retries) gives up after this.
    pub export_timeout_ms: u64,
}

impl TelemetrySettings {
    /// The URL spans are posted to, `None` when export is off: the endpoint, with
    /// `/v1/traces` added when it has no path.
    pub(crate) fn traces_url(&self) -> Option<String> {
        if self.otlp_endpoint.is_empty() {
            return None;
        }
        let mut url = url::Url::parse(&self.otlp_endpoint).ok()?;
        if url.path().is_empty() || url.path() == "/" {
            url.set_path(TRACES_PATH);
        }
        Some(url.into())
    }

    pub(crate) fn export_interval(&self) -> Duration {
        Duration::from_millis(self.export_interval_ms)
    }

    pub(crate) fn export_timeout(&self) -> Duration {
        Duration::from_millis(self.export_timeout_ms)
    }

    /// Rejects values that deserialize but cannot work.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if !self.otlp_endpoint.is_empty() {
            let ok = url::Url::parse(&self.otlp_endpoint).is_ok_and(|u| {
                u.scheme() == "http"
                    && u.has_host()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
            });
            if !ok {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    format!(
                        "{:?} is not an http:// URL without credentials or query (use a local collector for TLS)",
                        self.otlp_endpoint
                    ),
                ));
            }
        }
        if self.service_name.is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
        }
        if self.max_queued_spans == 0 {
            return Err(invalid("telemetry.max_queued_spans", "must be > 0"));
        }
        if self.export_interval_ms == 0 {
            return Err(invalid("telemetry.export_interval_ms", "must be > 0"));
        }
        if self.export_timeout_ms == 0 {
            return Err(invalid("telemetry.export_timeout_ms", "must be > 0"));
        }
        Ok(())
    }
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: String::new(),
            service_name: "cellosign-bridge".into(),
            max_queued_spans: 2048,
            export_interval_ms: 5000,
            export_timeout_ms: 10_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(endpoint: &str) -> TelemetrySettings {
        TelemetrySettings {
            otlp_endpoint: endpoint.into(),
            ..TelemetrySettings::default()
        }
    }

    #[test]
    fn the_traces_path_is_added_only_to_a_bare_endpoint() {
        assert_eq!(TelemetrySettings::default().traces_url(), None);
        assert_eq!(
            with("http://127.0.0.1:4318").traces_url().as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(
            with("http://collector:4318/").traces_url().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(
            with("http://collector/otlp/v1/traces")
                .traces_url()
                .as_deref(),
            Some("http://collector/otlp/v1/traces")
        );
    }

    #[test]
    fn endpoints_that_cannot_work_are_refused_naming_the_key() {
        for bad in [
            "collector:4318",
            "https://collector:4318",
            "http://user:pw@collector:4318",
            "http://collector:4318/?x=1",
            "grpc://collector:4317",
        ] {
            let e = with(bad).check().expect_err(bad).to_string();
            assert!(e.starts_with("telemetry.otlp_endpoint:"), "{e}");
        }
        assert!(with("").check().is_ok());
        assert!(with("http://[::1]:4318").check().is_ok());
    }
}
