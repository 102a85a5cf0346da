//! Trace context (SPEC 7) end to end: real app, real HTTP, real RabbitMQ, and a
//! real OTLP/HTTP receiver for the exported spans.

mod common;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use cellosign_bridge::{AckMode, Settings, Sources};
use common::*;
use lapin::message::Delivery;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use support::bridge_process::BridgeProcess;
use support::otlp_receiver::OtlpReceiver;

const WAIT: Duration = Duration::from_secs(20);

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";
const TRACESTATE: &str = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE";

/// The built-in settings with `env` as the environment.
fn load(env: &[(&str, &str)]) -> Result<Settings, cellosign_bridge::ConfigError> {
    Settings::load(&Sources {
        env: Some(
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..Sources::default()
    })
}

#[test]
fn span_export_is_off_by_default_and_bad_values_are_refused_naming_the_key() {
    let s = load(&[]).unwrap();
    assert_eq!(s.telemetry.otlp_endpoint, "", "no span export unless asked");
    assert_eq!(s.telemetry.service_name, "cellosign-bridge");
    assert_eq!(s.telemetry.max_queued_spans, 2048);
    assert_eq!(s.telemetry.export_interval_ms, 5000);
    assert_eq!(s.telemetry.export_timeout_ms, 10_000);
    let on = load(&[("BRIDGE_TELEMETRY__OTLP_ENDPOINT", "http://collector:4318")]).unwrap();
    assert_eq!(on.telemetry.otlp_endpoint, "http://collector:4318");
    for (key, value, named) in [
        (
            "BRIDGE_TELEMETRY__OTLP_ENDPOINT",
            "collector:4318",
            "telemetry.otlp_endpoint",
        ),
        (
            "BRIDGE_TELEMETRY__OTLP_ENDPOINT",
            "https://collector:4318",
            "telemetry.otlp_endpoint",
        ),
        (
            "BRIDGE_TELEMETRY__SERVICE_NAME",
            "",
            "telemetry.service_name",
        ),
        (
            "BRIDGE_TELEMETRY__MAX_QUEUED_SPANS",
            "0",
            "telemetry.max_queued_spans",
        ),
        (
            "BRIDGE_TELEMETRY__EXPORT_INTERVAL_MS",
            "0",
            "telemetry.export_interval_ms",
        ),
        (
            "BRIDGE_TELEMETRY__EXPORT_TIMEOUT_MS",
            "0",
            "telemetry.export_timeout_ms",
        ),
        (
            "BRIDGE_TELEMETRY__EXPORT_TIMEOUT_MS",
            "soon",
            "export_timeout_ms",
        ),
        ("BRIDGE_TELEMETRY__OTLP_ENDPOIN", "http://x", "otlp_endpoin"),
    ] {
        let err = load(&[(key, value)]).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains(named), "{key}={value}: {err}");
    }
}

/// A message's `traceparent`, split: (trace id, parent id, flags), each as hex;
/// fails unless it is a valid version-00 one.
fn traceparent(d: &Delivery) -> (String, String, String) {
    let value = header(d, "traceparent").expect("every message carries a traceparent");
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2),
        "not a valid traceparent: {value:?}"
    );
    assert_ne!(
        parts[1],
        "0".repeat(32),
        "{value}: the trace id is all zero"
    );
    assert_ne!(
        parts[2],
        "0".repeat(16),
        "{value}: the parent id is all zero"
    );
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// POSTs `body` with the given extra headers.
async fn post_with(app: &TestApp, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = app
        .client
        .post(app.url())
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    answer(req.send().await.expect("request sent")).await
}

#[tokio::test]
async fn a_callers_traceparent_and_tracestate_reach_the_message_in_both_modes() {
    bounded(async {
        for mode in [AckMode::Spooled, AckMode::Confirmed] {
            let app = spawn_app(mode, |_| {}).await;
            let (_broker, mut consumer) = app.subscribe("#").await;
            let sent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
            let body = event_body("WHEF_SESSION_CREATED", "s-tr", "ref-tr", 1);
            let answer = post_with(
                &app,
                &body,
                &[("traceparent", &sent), ("tracestate", TRACESTATE)],
            )
            .await;
            assert_eq!(
                (answer.code, answer.status.as_str()),
                (200, "0"),
                "{mode:?}"
            );
            let got = take(&mut consumer, 1, WAIT).await;
            let (trace_id, parent_id, flags) = traceparent(&got[0]);
            assert_eq!(trace_id, TRACE_ID, "{mode:?}: the caller's trace goes on");
            assert_ne!(
                parent_id, PARENT_ID,
                "{mode:?}: the message's parent is the bridge's span, not the caller's"
            );
            assert_eq!(flags, "01", "{mode:?}: the caller's flags are kept");
            assert_eq!(
                header(&got[0], "tracestate").as_deref(),
                Some(TRACESTATE),
                "{mode:?}"
            );
            app.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn without_a_traceparent_every_message_starts_a_trace_of_its_own() {
    bounded(async {
        for mode in [AckMode::Spooled, AckMode::Confirmed] {
            let app = spawn_app(mode, |_| {}).await;
            let (_broker, mut consumer) = app.subscribe("#").await;
            for n in 1..=3 {
                let body = event_body("WHEF_SESSION_CREATED", "s-new", "ref-new", n);
                // A tracestate alone is not passed on: it belongs to a caller's trace.
                let answer = post_with(&app, &body, &[("tracestate", "a=b")]).await;
                assert_eq!(answer.code, 200, "{mode:?}");
            }
            let got = take(&mut consumer, 3, WAIT).await;
            let ids: HashSet<String> = got.iter().map(|d| traceparent(d).0).collect();
            assert_eq!(ids.len(), 3, "{mode:?}: one new trace per request: {ids:?}");
            for d in &got {
                assert_eq!(header(d, "tracestate"), None, "{mode:?}");
            }
            app.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_invalid_traceparent_is_answered_0_and_replaced_by_a_new_trace() {
    bounded(async {
        let invalid = [
            // Uppercase hex.
            format!("00-{}-{PARENT_ID}-01", TRACE_ID.to_uppercase()),
            // An all-zero trace id, then an all-zero parent id.
            format!("00-{}-{PARENT_ID}-01", "0".repeat(32)),
            format!("00-{TRACE_ID}-{}-01", "0".repeat(16)),
            // The forbidden version, and one this bridge does not read.
            format!("ff-{TRACE_ID}-{PARENT_ID}-01"),
            format!("01-{TRACE_ID}-{PARENT_ID}-01"),
            // Too short, too long, not a traceparent at all.
            format!("00-{TRACE_ID}-{PARENT_ID}-1"),
            format!("00-{TRACE_ID}-{PARENT_ID}-01-extra"),
            "garbage".to_string(),
        ];
        for mode in [AckMode::Spooled, AckMode::Confirmed] {
            let app = spawn_app(mode, |_| {}).await;
            let (_broker, mut consumer) = app.subscribe("#").await;
            for (n, bad) in invalid.iter().enumerate() {
                let body = event_body("WHEF_SESSION_CREATED", "s-bad", "ref-bad", n as u64);
                let answer = post_with(
                    &app,
                    &body,
                    &[("traceparent", bad), ("tracestate", TRACESTATE)],
                )
                .await;
                assert_eq!(
                    (answer.code, answer.status.as_str()),
                    (200, "0"),
                    "{mode:?}: {bad}"
                );
            }
            let got = take(&mut consumer, invalid.len(), WAIT).await;
            let mut ids = HashSet::new();
            for (d, bad) in got.iter().zip(&invalid) {
                let (trace_id, _, _) = traceparent(d);
                assert_ne!(trace_id, TRACE_ID, "{mode:?}: {bad} was taken as valid");
                assert_eq!(header(d, "tracestate"), None, "{mode:?}: {bad}");
                ids.insert(trace_id);
            }
            assert_eq!(ids.len(), invalid.len(), "{mode:?}: a new trace each");
            app.stop().await;
        }
    })
    .await;
}

/// Every span the receiver got, decoded, with the `service.name` of its resource.
fn exported_spans(receiver: &OtlpReceiver) -> Vec<(String, Span)> {
    let mut out = Vec::new();
    for (path, body) in receiver.received() {
        assert_eq!(path, "/v1/traces", "spans go to the OTLP traces path");
        let request = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    out.push((service.clone(), span));
                }
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Posts one event with a traceparent to a bridge exporting to a local receiver,
/// and checks the spans of that request: each with the request's trace id, the
/// `receive` span a child of the caller's, the steps children of `receive`, and the
/// message's parent id the `publish` span's.
async fn spans_of_one_request(mode: AckMode, steps: &[&str]) {
    let receiver = OtlpReceiver::start().await;
    let app = spawn_app(mode, |s| {
        s.telemetry.otlp_endpoint = receiver.endpoint();
        s.telemetry.service_name = "bridge-under-test".into();
        s.telemetry.export_interval_ms = 100;
    })
    .await;
    let (_broker, mut consumer) = app.subscribe("#").await;
    let sent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let body = event_body("WHEF_SESSION_CREATED", "s-otlp", "ref-otlp", 1);
    let answer = post_with(&app, &body, &[("traceparent", &sent)]).await;
    assert_eq!(answer.code, 200, "{mode:?}");
    let got = take(&mut consumer, 1, WAIT).await;
    let (_, message_parent, _) = traceparent(&got[0]);
    // Exported while running (every 100 ms), not only by the flush at shutdown.
    let deadline = tokio::time::Instant::now() + WAIT;
    let spans = loop {
        let spans: Vec<(String, Span)> = exported_spans(&receiver)
            .into_iter()
            .filter(|(_, s)| hex(&s.trace_id) == TRACE_ID)
            .collect();
        let names: HashSet<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
        if steps.iter().all(|step| names.contains(step)) {
            break spans;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{mode:?}: spans with the request's trace id after {WAIT:?}: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let named = |name: &str| {
        spans
            .iter()
            .find(|(_, s)| s.name == name)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("{mode:?}: no {name} span"))
    };
    let receive = named("receive");
    assert_eq!(hex(&receive.parent_span_id), PARENT_ID, "{mode:?}");
    for step in steps.iter().filter(|s| **s != "receive") {
        assert_eq!(
            hex(&named(step).parent_span_id),
            hex(&receive.span_id),
            "{mode:?}: {step} is a child of receive"
        );
    }
    assert_eq!(
        message_parent,
        hex(&named("publish").span_id),
        "{mode:?}: the message's parent is the publish span"
    );
    assert!(
        spans
            .iter()
            .all(|(service, _)| service == "bridge-under-test"),
        "{mode:?}: service.name"
    );
    app.stop().await;
}

#[tokio::test]
async fn spans_are_exported_over_otlp_with_the_requests_trace_id_spooled() {
    bounded(async {
        spans_of_one_request(
            AckMode::Spooled,
            &["receive", "validate", "store", "publish"],
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn spans_are_exported_over_otlp_with_the_requests_trace_id_confirmed() {
    bounded(async {
        spans_of_one_request(AckMode::Confirmed, &["receive", "validate", "publish"]).await;
    })
    .await;
}

/// Spans still queued at SIGTERM are exported before the process exits: the export
/// interval is far longer than the test, so only the flush at shutdown can send
/// them (the real binary, which exits as soon as the stop is done).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_spans_still_queued() {
    bounded(async {
        let receiver = OtlpReceiver::start().await;
        let exchange = unique("flush");
        let spool = tempfile::tempdir().expect("temp dir");
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&exchange).await;
        let mut consumer = broker.subscribe(&exchange, "#").await;
        let endpoint = receiver.endpoint();
        let mut bridge = BridgeProcess::start(
            spool.path(),
            &amqp_url(),
            &exchange,
            "flush-token",
            &[
                ("BRIDGE_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
                ("BRIDGE_TELEMETRY__EXPORT_INTERVAL_MS", "600000"),
            ],
        );
        let body = event_body("WHEF_SESSION_CREATED", "s-flush", "ref-flush", 1);
        let answer = answer(
            http_client()
                .post(bridge.url("flush-token"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("request sent"),
        )
        .await;
        assert_eq!(answer.code, 200);
        let got = take(&mut consumer, 1, WAIT).await;
        let (trace_id, _, _) = traceparent(&got[0]);
        // The publish span ends at its confirm, just after the delivery: give it a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            exported_spans(&receiver).is_empty(),
            "nothing is sent before the interval"
        );
        bridge.signal("TERM");
        let status = bridge.wait_exit(Duration::from_secs(15));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "exit; log:\n{}",
            bridge.log()
        );
        let names: HashSet<String> = exported_spans(&receiver)
            .into_iter()
            .filter(|(_, s)| hex(&s.trace_id) == trace_id)
            .map(|(_, s)| s.name)
            .collect();
        for step in ["receive", "validate", "store", "publish"] {
            assert!(
                names.contains(step),
                "{step} not flushed at SIGTERM: {names:?}; log:\n{}",
                bridge.log()
            );
        }
        broker.cleanup(&exchange).await;
    })
    .await;
}
