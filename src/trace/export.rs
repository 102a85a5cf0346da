//! Spans over OTLP/HTTP, only when `telemetry.otlp_endpoint` is set.
//!
//! Off, [`Telemetry`] is `None` inside: no exporter, no thread, no span is
//! built, and a request costs only its [`TraceContext`] (two random numbers).
//! On, the SDK's batch processor queues ended spans in a bounded channel (full:
//! dropped, never waited for) and a thread of its own posts them; shutdown
//! flushes within what is left of the grace period.
//!
//! Spans: `receive` (the request, a child of the caller's span), under it
//! `validate` and `store` (the spool append) or, in `confirmed` mode, `publish`;
//! in `spooled` mode the forwarder's `publish` comes later, a child of the
//! `receive` span whose context the spool kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::http::request::Parts;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
pub(crate) use opentelemetry_sdk::trace::Span;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use tracing::warn;

use crate::config::TelemetrySettings;
use crate::trace::client::RuntimeClient;
use crate::trace::context::{Incoming, TraceContext};

/// The instrumentation scope of every span.
const SCOPE: &str = "cellosign-bridge";

/// Time a shutdown gets beyond the exporter's own limit before it is left behind.
const SHUTDOWN_SLACK: Duration = Duration::from_millis(200);

/// The exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: cannot set up the OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Span export, or nothing; cheap to clone.
#[derive(Clone, Default)]
pub struct Telemetry(Option<Arc<Exporting>>);

/// What is running while export is on.
struct Exporting {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    /// Set by the first shutdown, so that a drop does not shut down again.
    shut: AtomicBool,
    timeout: Duration,
}

impl Drop for Exporting {
    /// Without an explicit shutdown (a test that drops its application) the
    /// provider's own would block this thread, perhaps a runtime's: flush on a
    /// thread of its own instead.
    fn drop(&mut self) {
        if !self.shut.swap(true, Ordering::AcqRel) {
            let provider = self.provider.clone();
            let timeout = self.timeout;
            let _ = std::thread::Builder::new()
                .name("span-flush".into())
                .spawn(move || provider.shutdown_with_timeout(timeout));
        }
    }
}

impl Telemetry {
    /// Starts the exporter the settings ask for (none without `otlp_endpoint`).
    /// Needs the Tokio runtime the exports will run on.
    pub fn start(settings: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
        let Some(url) = settings.traces_url() else {
            return Ok(Telemetry(None));
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| TelemetryError(format!("no Tokio runtime: {e}")))?;
        let timeout = settings.export_timeout();
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(timeout)
            .with_http_client(RuntimeClient::new(runtime, timeout))
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(settings.max_queued_spans)
            .with_max_export_batch_size(settings.max_queued_spans.min(512))
            .with_scheduled_delay(settings.export_interval())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
            )
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer(SCOPE);
        Ok(Telemetry(Some(Arc::new(Exporting {
            provider,
            tracer,
            shut: AtomicBool::new(false),
            timeout,
        }))))
    }

    /// Whether spans are exported.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// The trace of a request from its head: the caller's (a valid `traceparent`)
    /// or a new one; with export on, its `receive` span is started.
    pub(crate) fn receive(&self, head: &Parts) -> RequestTrace {
        let incoming = Incoming::from_headers(&head.headers);
        let Some(on) = &self.0 else {
            let context = incoming.map_or_else(TraceContext::fresh, TraceContext::child_of);
            return RequestTrace {
                context,
                receive: None,
            };
        };
        let parent = match &incoming {
            Some(i) => remote_parent(i.trace_id, i.parent_id, i.flags),
            None => Context::new(),
        };
        let span = on
            .tracer
            .span_builder("receive")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", head.method.to_string()),
                KeyValue::new("url.path", head.uri.path().to_string()),
            ])
            .start_with_context(&on.tracer, &parent);
        let state = incoming.as_ref().and_then(|i| i.state.clone());
        let context = own_context(span.span_context(), state)
            .unwrap_or_else(|| incoming.map_or_else(TraceContext::fresh, TraceContext::child_of));
        let parent = Context::new().with_remote_span_context(span.span_context().clone());
        RequestTrace {
            context,
            receive: Some(Receive {
                tracer: on.tracer.clone(),
                parent,
                span,
            }),
        }
    }

    /// The `publish` span of a spooled event, a child of the context the spool kept
    /// (a root, for a record from before trace contexts), and the context its
    /// message carries; `None` when export is off.
    pub(crate) fn publish(
        &self,
        stored: Option<&TraceContext>,
        target: &PublishTarget<'_>,
    ) -> Option<(Span, TraceContext)> {
        let on = self.0.as_ref()?;
        let parent = match stored {
            Some(t) => remote_parent(t.trace_id, t.span_id, t.flags),
            None => Context::new(),
        };
        let span = publish_span(&on.tracer, &parent, target);
        let state = stored.and_then(|t| t.state.clone());
        let context = own_context(span.span_context(), state)?;
        Some((span, context))
    }

    /// Flushes queued spans and stops the exporter, within `within`; never fails the
    /// shutdown. A second call does nothing.
    pub(crate) async fn shutdown(&self, within: Duration) {
        let Some(on) = &self.0 else {
            return;
        };
        if on.shut.swap(true, Ordering::AcqRel) {
            return;
        }
        let provider = on.provider.clone();
        // The SDK's shutdown blocks this thread until its exporter thread is done.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(within));
        match tokio::time::timeout(within + SHUTDOWN_SLACK, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!(error = %e, "spans not all exported at shutdown"),
            Ok(Err(e)) => warn!(error = %e, "span export shutdown failed"),
            Err(_) => warn!("span export did not stop in time"),
        }
    }
}

/// Where a publish goes, for the attributes of its span.
pub(crate) struct PublishTarget<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub message_id: &'a str,
}

/// A request's trace: the context stored and published with its event, and,
/// with export on, its `receive` span.
pub(crate) struct RequestTrace {
    context: TraceContext,
    receive: Option<Receive>,
}

/// The `receive` span and what its children need.
struct Receive {
    tracer: SdkTracer,
    /// A context whose span is `receive`: the parent of the steps.
    parent: Context,
    span: Span,
}

impl RequestTrace {
    /// What the event carries: the trace, and the bridge's span in it.
    pub(crate) fn context(&self) -> &TraceContext {
        &self.context
    }

    /// A step of the request (`validate`, `store`) under `receive`; `None` when off.
    pub(crate) fn step(&self, name: &'static str) -> Option<Span> {
        let r = self.receive.as_ref()?;
        Some(
            r.tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .start_with_context(&r.tracer, &r.parent),
        )
    }

    /// `confirmed` mode: the `publish` span under `receive`, and the context the
    /// message carries (its span id, when exporting).
    pub(crate) fn publish(&self, target: &PublishTarget<'_>) -> (Option<Span>, TraceContext) {
        let Some(r) = &self.receive else {
            return (None, self.context.clone());
        };
        let span = publish_span(&r.tracer, &r.parent, target);
        let context = own_context(span.span_context(), self.context.state.clone())
            .unwrap_or_else(|| self.context.clone());
        (Some(span), context)
    }

    /// Ends `receive` with the answer's HTTP status (5xx is an error).
    pub(crate) fn finish(self, code: u16) {
        let Some(mut r) = self.receive else {
            return;
        };
        r.span
            .set_attribute(KeyValue::new("http.response.status_code", i64::from(code)));
        if code >= 500 {
            r.span.set_status(Status::error(code.to_string()));
        }
        r.span.end();
    }
}

/// Ends a step's span, as an error with `reason` if it failed.
pub(crate) fn end(span: Option<Span>, failed: Option<&str>) {
    if let Some(mut span) = span {
        if let Some(reason) = failed {
            span.set_status(Status::error(reason.to_string()));
        }
        span.end();
    }
}

/// A context whose (remote) span is the given one.
fn remote_parent(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Context {
    Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(trace_id),
        SpanId::from_bytes(span_id),
        TraceFlags::new(flags),
        true,
        TraceState::NONE,
    ))
}

/// A `publish` span (producer) under `parent`.
fn publish_span(tracer: &SdkTracer, parent: &Context, target: &PublishTarget<'_>) -> Span {
    tracer
        .span_builder("publish")
        .with_kind(SpanKind::Producer)
        .with_attributes([
            KeyValue::new("messaging.system", "rabbitmq"),
            KeyValue::new("messaging.operation.type", "send"),
            KeyValue::new("messaging.destination.name", target.exchange.to_string()),
            KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                target.routing_key.to_string(),
            ),
            KeyValue::new("messaging.message.id", target.message_id.to_string()),
        ])
        .start_with_context(tracer, parent)
}

/// The context a message carries when `span` is the bridge's: `None` for an
/// invalid span (a provider already shut down).
fn own_context(span: &SpanContext, state: Option<String>) -> Option<TraceContext> {
    span.is_valid().then(|| TraceContext {
        trace_id: span.trace_id().to_bytes(),
        span_id: span.span_id().to_bytes(),
        flags: span.trace_flags().to_u8(),
        state,
    })
}
