//! The dashboard and the alert rules in `deploy/` (deploy/README.md, "Dashboard and
//! alerts"): they query only what a running bridge exports on `/metrics`, the rules are
//! well formed with a runbook entry each, promtool accepts them and their unit tests
//! pass, and the gauges added for them (the oldest spooled event's age, readiness)
//! follow the bridge's state.

mod common;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellosign_bridge::AckMode;
use common::*;
use support::tcp_proxy::{CutMode, TcpProxy};

const WAIT: Duration = Duration::from_secs(20);

const DASHBOARD: &str = "deploy/grafana/cellosign-bridge.json";
const ALERTS: &str = "deploy/prometheus/alerts.yaml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yaml";
const DEPLOY_README: &str = "deploy/README.md";

const OLDEST_AGE: &str = "cellosign_bridge_spool_oldest_age_seconds";
const READY: &str = "cellosign_bridge_ready";
const CONNECTED: &str = "cellosign_bridge_broker_connected";
const SPOOL_EVENTS: &str = "cellosign_bridge_spool_events";

/// Labels Prometheus adds to every series it scrapes (the target's), so queries may
/// use them though `/metrics` does not show them.
const TARGET_LABELS: &[&str] = &["instance", "job"];

/// The alerts deploy/prometheus/alerts.yaml must hold, with the metric each is about.
const EXPECTED_ALERTS: &[(&str, &str)] = &[
    (
        "CellosignBridgeSpoolGrowing",
        "cellosign_bridge_spool_events",
    ),
    (
        "CellosignBridgeSpoolOldestEvent",
        "cellosign_bridge_spool_oldest_age_seconds",
    ),
    (
        "CellosignBridgeBrokerDown",
        "cellosign_bridge_broker_connected",
    ),
    (
        "CellosignBridgeHigh5xxRate",
        "cellosign_bridge_http_requests_total",
    ),
    ("CellosignBridgeNotReady", "cellosign_bridge_ready"),
];

/// What the dashboard must show (issue 11): each of these is queried by some panel.
const DASHBOARD_METRICS: &[&str] = &[
    "cellosign_bridge_http_requests_total",
    "cellosign_bridge_ack_latency_seconds_bucket",
    "cellosign_bridge_events_accepted_total",
    "cellosign_bridge_events_rejected_total",
    "cellosign_bridge_spool_events",
    "cellosign_bridge_spool_bytes",
    "cellosign_bridge_spool_oldest_age_seconds",
    "cellosign_bridge_broker_connected",
    "cellosign_bridge_broker_reconnects_total",
    "cellosign_bridge_broker_nacks_total",
    "cellosign_bridge_broker_returns_total",
    "cellosign_bridge_dedup_hits_total",
    "cellosign_bridge_ready",
];

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

fn alert_rules() -> yaml_serde::Value {
    yaml_serde::from_str(&read(ALERTS)).unwrap_or_else(|e| panic!("{ALERTS}: {e}"))
}

// ---------------------------------------------------------------------------------
// Reading PromQL: the metric names and label names an expression refers to.
// ---------------------------------------------------------------------------------

/// What a PromQL expression refers to.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    /// Metric names: identifiers used as a series (alone, before `{` or `[`).
    metrics: BTreeSet<String>,
    /// `(metric, label)` of each label matcher of a selector with a metric name.
    matchers: BTreeSet<(String, String)>,
    /// Label names of `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`.
    grouping: BTreeSet<String>,
}

/// Aggregation operators (may stand before `by (...)` rather than `(`).
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// Clauses followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Binary operators and literals spelled as words (case-insensitive in PromQL).
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// The index just past the string literal opening at `at`.
fn skip_string(expr: &str, at: usize) -> usize {
    let b = expr.as_bytes();
    let quote = b[at];
    let mut i = at + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if quote != b'`' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    panic!("unterminated string in {expr:?}")
}

/// The identifiers outside strings between the bracket opening at `at` and the one
/// closing it, and the index just past that one.
fn bracketed_idents(expr: &str, at: usize, close: u8) -> (Vec<String>, usize) {
    let b = expr.as_bytes();
    let mut idents = Vec::new();
    let mut i = at + 1;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = skip_string(expr, i),
            c if c == close => return (idents, i + 1),
            c if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                idents.push(expr[start..i].to_string());
            }
            _ => i += 1,
        }
    }
    panic!("unclosed {:?} in {expr:?}", b[at] as char)
}

fn skip_whitespace(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The metric and label names `expr` refers to. PromQL functions (identifiers before
/// `(`), aggregation operators, keywords, numbers, durations, strings, range and
/// subquery brackets and Grafana variables (`$name`, `${name}`) are left out.
fn promql_refs(expr: &str) -> Refs {
    let b = expr.as_bytes();
    let mut refs = Refs::default();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' | b'\'' | b'`' => i = skip_string(expr, i),
            // A range or subquery: durations and Grafana's $__rate_interval.
            b'[' => i = bracketed_idents(expr, i, b']').1,
            // Label matchers with no metric name before them.
            b'{' => i = bracketed_idents(expr, i, b'}').1,
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'$' => {
                i += 1;
                if b.get(i) == Some(&b'{') {
                    i = bracketed_idents(expr, i, b'}').1;
                } else {
                    while i < b.len() && is_ident(b[i]) {
                        i += 1;
                    }
                }
            }
            // Numbers and durations (0.99, 1e3, 5m, 1h30m): not names.
            c if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_')
                {
                    i += 1;
                }
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < b.len() && is_ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let lower = word.to_ascii_lowercase();
                let next = skip_whitespace(b, i);
                let before_paren = b.get(next) == Some(&b'(');
                if GROUPING.contains(&lower.as_str()) {
                    if before_paren {
                        let (labels, end) = bracketed_idents(expr, next, b')');
                        refs.grouping.extend(labels);
                        i = end;
                    }
                } else if before_paren
                    || AGGREGATIONS.contains(&lower.as_str())
                    || KEYWORDS.contains(&lower.as_str())
                {
                    // A function call or an operator: its arguments are read on.
                } else {
                    refs.metrics.insert(word.to_string());
                    if b.get(next) == Some(&b'{') {
                        let (labels, end) = bracketed_idents(expr, next, b'}');
                        for label in labels {
                            refs.matchers.insert((word.to_string(), label));
                        }
                        i = end;
                    }
                }
            }
            _ => i += 1,
        }
    }
    refs
}

/// What a Grafana query variable refers to: `label_values(selector, label)` (the
/// label is matched against the selector's metric), `query_result(expr)`, or a plain
/// expression.
fn variable_refs(query: &str) -> Refs {
    let q = query.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        return match args.rsplit_once(',') {
            Some((selector, label)) => {
                let mut refs = promql_refs(selector);
                for metric in refs.metrics.clone() {
                    refs.matchers.insert((metric, label.trim().to_string()));
                }
                refs
            }
            // `label_values(label)`: no metric at all.
            None => Refs::default(),
        };
    }
    if let Some(expr) = q
        .strip_prefix("query_result(")
        .and_then(|rest| rest.strip_suffix(')'))
    {
        return promql_refs(expr);
    }
    promql_refs(q)
}

/// The reader itself: names found and left out as the test relies on.
#[tokio::test]
async fn promql_metric_and_label_names_are_read_from_expressions() {
    bounded(async {
        let refs = promql_refs(
            r#"histogram_quantile(0.99, sum by (le) (rate(cellosign_bridge_ack_latency_seconds_bucket{instance=~"$instance", code!="a{b}"}[$__rate_interval])))"#,
        );
        assert_eq!(
            refs.metrics,
            BTreeSet::from(["cellosign_bridge_ack_latency_seconds_bucket".to_string()])
        );
        assert_eq!(
            refs.matchers,
            BTreeSet::from([
                (
                    "cellosign_bridge_ack_latency_seconds_bucket".to_string(),
                    "instance".to_string()
                ),
                (
                    "cellosign_bridge_ack_latency_seconds_bucket".to_string(),
                    "code".to_string()
                ),
            ])
        );
        assert_eq!(refs.grouping, BTreeSet::from(["le".to_string()]));

        let refs = promql_refs(
            "sum without (code) (rate(a_total{code=~\"5..\"}[5m])) / sum without(code) (rate(a_total[5m] offset 1h)) > 0.01\n  and b > 1e3 or on(instance) group_left(job) c unless Inf",
        );
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(refs.metrics, names(&["a_total", "b", "c"]));
        assert_eq!(refs.grouping, names(&["code", "instance", "job"]));

        let refs = variable_refs("label_values(cellosign_bridge_ready, instance)");
        assert_eq!(refs.metrics, names(&["cellosign_bridge_ready"]));
        assert!(
            refs.matchers
                .contains(&("cellosign_bridge_ready".into(), "instance".into()))
        );
        assert_eq!(promql_refs("delta(x[10m:1m]) > 0").metrics, names(&["x"]));
    })
    .await;
}

// ---------------------------------------------------------------------------------
// Where the files query: every expression with where it is.
// ---------------------------------------------------------------------------------

/// Every panel of the dashboard, rows' nested panels included.
fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(list: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard's query variables: (name, query).
fn query_variables(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let query = match &v["query"] {
                serde_json::Value::String(q) => q.clone(),
                other => other["query"].as_str().unwrap_or_default().to_string(),
            };
            (v["name"].as_str().unwrap_or("?").to_string(), query)
        })
        .collect()
}

/// Every query of the dashboard and the alert rules: (where, what it refers to, the text).
fn all_queries() -> Vec<(String, Refs, String)> {
    let dashboard = dashboard();
    let mut out = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr: {target}"));
            let place = format!(
                "{DASHBOARD}, panel {title:?} target {}",
                target["refId"].as_str().unwrap_or("?")
            );
            out.push((place, promql_refs(expr), expr.to_string()));
        }
    }
    for (name, query) in query_variables(&dashboard) {
        let place = format!("{DASHBOARD}, variable {name}");
        out.push((place, variable_refs(&query), query));
    }
    for (_, rule) in rules(&alert_rules()) {
        let name = rule["alert"]
            .as_str()
            .or_else(|| rule["record"].as_str())
            .unwrap_or("?");
        let expr = rule["expr"]
            .as_str()
            .unwrap_or_else(|| panic!("{ALERTS}: rule {name} has no expr"));
        out.push((
            format!("{ALERTS}, rule {name}"),
            promql_refs(expr),
            expr.to_string(),
        ));
    }
    out
}

/// Every rule of the rules file with its group's name.
fn rules(file: &yaml_serde::Value) -> Vec<(String, &yaml_serde::Value)> {
    let groups = file["groups"]
        .as_sequence()
        .unwrap_or_else(|| panic!("{ALERTS}: no `groups` list"));
    groups
        .iter()
        .flat_map(|g| {
            let name = g["name"].as_str().unwrap_or("?").to_string();
            g["rules"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(move |r| (name.clone(), r))
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// What /metrics exports.
// ---------------------------------------------------------------------------------

/// One sample name of `/metrics` with its family, the family's type and the label
/// names its series carry.
#[derive(Debug)]
struct Exported {
    family: String,
    kind: String,
    labels: BTreeSet<String>,
}

/// The sample names of an OpenMetrics exposition (what Prometheus stores, such as
/// `x_total` or `x_bucket`), each with its `# TYPE` family.
fn exported(text: &str) -> BTreeMap<String, Exported> {
    let families: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let family_of = |name: &str| -> Option<(String, String)> {
        families.iter().find_map(|(family, kind)| {
            let suffixes: &[&str] = match *kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["", "_sum", "_count", "_created"],
                _ => &[""],
            };
            suffixes
                .iter()
                .any(|s| name.strip_suffix(s) == Some(family))
                .then(|| (family.to_string(), kind.to_string()))
        })
    };
    let mut out: BTreeMap<String, Exported> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, _value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let (family, kind) = family_of(name)
            .unwrap_or_else(|| panic!("sample {name} has no # TYPE family in\n{text}"));
        let entry = out.entry(name.to_string()).or_insert(Exported {
            family,
            kind,
            labels: BTreeSet::new(),
        });
        // Label values are quoted; the names are what stands before each `=`.
        let mut rest = labels;
        while let Some((label, after)) = rest.split_once("=\"") {
            entry
                .labels
                .insert(label.trim_start_matches(',').trim().to_string());
            let mut end = 0;
            let bytes = after.as_bytes();
            while end < bytes.len() && bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            rest = after.get(end + 1..).unwrap_or("");
        }
    }
    out
}

/// Every metric name the dashboard and the alert rules query is exported by a running
/// bridge (with one event accepted and one refused, so the labelled series exist), as
/// that sample name: a counter as `_total`, a histogram's `_bucket`, `_sum` and
/// `_count` as samples of its family. Every label they match on or group by is one the
/// series carry (or a target label Prometheus adds).
#[tokio::test]
async fn the_dashboard_and_the_alerts_query_only_metrics_the_bridge_exports() {
    bounded(async {
        let app = spawn_app(AckMode::Spooled, |_| {}).await;
        let body = event_body("WHEF_SESSION_CREATED", "s-dash", "r-dash", 1);
        assert_eq!(app.post_json(&body).await.code, 200);
        assert_eq!(app.post_json("{").await.code, 400);
        let text = app.metrics().await;
        app.stop().await;
        let exported = exported(&text);

        let queries = all_queries();
        assert!(
            queries.len() > 15,
            "only {} queries found in {DASHBOARD} and {ALERTS}",
            queries.len()
        );
        let mut problems = Vec::new();
        let mut queried = BTreeSet::new();
        for (place, refs, expr) in &queries {
            if refs.metrics.is_empty() {
                problems.push(format!("{place}: no metric found in {expr:?}"));
            }
            for metric in &refs.metrics {
                queried.insert(metric.clone());
                if !exported.contains_key(metric) {
                    problems.push(format!("{place}: {metric} is not exported ({expr:?})"));
                }
            }
            for (metric, label) in &refs.matchers {
                let Some(e) = exported.get(metric) else {
                    continue;
                };
                if !e.labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!(
                        "{place}: {metric} (family {}, {}) has no label {label:?}, only {:?}",
                        e.family, e.kind, e.labels
                    ));
                }
            }
            for label in &refs.grouping {
                let carried = refs
                    .metrics
                    .iter()
                    .filter_map(|m| exported.get(m))
                    .any(|e| e.labels.contains(label));
                if !carried && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!(
                        "{place}: groups by {label:?}, a label none of {:?} has ({expr:?})",
                        refs.metrics
                    ));
                }
            }
        }
        assert!(
            problems.is_empty(),
            "{}\n\nexported sample names: {:?}",
            problems.join("\n"),
            exported.keys().collect::<Vec<_>>()
        );
        // And they show what issue 11 asks for.
        let dashboard_metrics: BTreeSet<&String> = queries
            .iter()
            .filter(|(place, _, _)| place.starts_with(DASHBOARD))
            .flat_map(|(_, refs, _)| refs.metrics.iter())
            .collect();
        for wanted in DASHBOARD_METRICS {
            assert!(
                dashboard_metrics.contains(&wanted.to_string()),
                "{DASHBOARD} has no panel on {wanted}"
            );
        }
        assert!(queried.len() >= DASHBOARD_METRICS.len());
    })
    .await;
}

/// Importable as it is: no `__inputs` placeholders, the data source a `datasource`
/// variable of Prometheus data sources that every panel and query uses, unique panel
/// ids, every panel on the 24-column grid.
#[tokio::test]
async fn the_dashboard_is_importable_with_the_datasource_as_a_variable() {
    bounded(async {
        let text = read(DASHBOARD);
        assert!(
            !text.contains("${DS_") && !text.contains("__inputs"),
            "{DASHBOARD} has export placeholders that an import would ask for"
        );
        let d = dashboard();
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
        assert!(d["schemaVersion"].as_u64().is_some());
        assert!(
            d["id"].is_null(),
            "a fixed id would clash with another dashboard on import"
        );
        let variables = d["templating"]["list"].as_array().expect("templating.list");
        let datasource = variables
            .iter()
            .find(|v| v["name"] == "datasource")
            .expect("a `datasource` variable");
        assert_eq!(datasource["type"], "datasource", "{datasource}");
        assert_eq!(datasource["query"], "prometheus", "{datasource}");
        let uses_variable =
            |ds: &serde_json::Value| ds["type"] == "prometheus" && ds["uid"] == "${datasource}";
        for v in variables.iter().filter(|v| v["type"] == "query") {
            assert!(uses_variable(&v["datasource"]), "variable {v}");
        }
        let panels = panels(&d);
        assert!(panels.len() >= 10, "{} panels", panels.len());
        let mut ids = BTreeSet::new();
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("?");
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: no id"));
            assert!(ids.insert(id), "{title}: id {id} is used twice");
            let grid = &panel["gridPos"];
            let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
            assert!(
                grid["h"].as_u64().is_some()
                    && grid["y"].as_u64().is_some()
                    && x.zip(w).is_some_and(|(x, w)| w > 0 && x + w <= 24),
                "{title}: gridPos {grid}"
            );
            if panel["type"] == "row" {
                continue;
            }
            assert!(
                uses_variable(&panel["datasource"]),
                "{title}: {}",
                panel["datasource"]
            );
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{title}: no query");
            for target in targets {
                assert!(uses_variable(&target["datasource"]), "{title}: {target}");
            }
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------
// The alert rules and their runbooks.
// ---------------------------------------------------------------------------------

/// The anchors GitHub gives the headings of a Markdown file: lower case, spaces as
/// `-`, punctuation other than `-` and `_` left out.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut anchors = BTreeSet::new();
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        let anchor: String = title
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        anchors.insert(anchor);
    }
    anchors
}

/// The rules file parses as YAML with one group holding the expected alerts, each on
/// its metric, with a severity, a `summary` and a `runbook` that names a heading of
/// deploy/README.md.
#[tokio::test]
async fn the_alert_rules_have_summaries_and_runbooks_that_exist_in_the_deploy_readme() {
    bounded(async {
        let file = alert_rules();
        let groups = file["groups"].as_sequence().expect("groups");
        let names: Vec<&str> = groups.iter().filter_map(|g| g["name"].as_str()).collect();
        assert_eq!(names, ["cellosign-bridge"], "{ALERTS}: groups");
        let anchors = heading_anchors(&read(DEPLOY_README));
        assert!(anchors.contains("dashboard-and-alerts"), "{anchors:?}");
        let rules = rules(&file);
        let alerts: Vec<&str> = rules
            .iter()
            .filter_map(|(_, r)| r["alert"].as_str())
            .collect();
        let expected: Vec<&str> = EXPECTED_ALERTS.iter().map(|(a, _)| *a).collect();
        assert_eq!(alerts, expected, "{ALERTS}: alerts");
        let mut runbooks = BTreeSet::new();
        for ((_, rule), (name, metric)) in rules.iter().zip(EXPECTED_ALERTS) {
            let expr = rule["expr"].as_str().unwrap_or_default();
            assert!(
                promql_refs(expr).metrics.contains(*metric),
                "{name} does not query {metric}: {expr:?}"
            );
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["warning", "critical"].contains(&severity),
                "{name}: severity {severity:?}"
            );
            let annotations = &rule["annotations"];
            let summary = annotations["summary"].as_str().unwrap_or_default();
            assert!(!summary.trim().is_empty(), "{name}: no summary");
            let runbook = annotations["runbook"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: no runbook annotation"));
            let (path, anchor) = runbook
                .split_once('#')
                .unwrap_or_else(|| panic!("{name}: runbook {runbook:?} names no section"));
            assert!(
                path.ends_with(DEPLOY_README),
                "{name}: runbook {runbook:?} is not in {DEPLOY_README}"
            );
            assert!(
                anchors.contains(anchor),
                "{name}: runbook {runbook:?}: {DEPLOY_README} has no heading with anchor \
                 {anchor:?}; its anchors: {anchors:?}"
            );
            assert!(
                runbooks.insert(anchor),
                "{name}: runbook shared with another alert"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------
// promtool.
// ---------------------------------------------------------------------------------

/// promtool from PATH or where Debian's `prometheus` package puts it; fails (never
/// skips) without it.
fn promtool() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool not found: install Debian's prometheus package \
                 (`apt-get install prometheus`, as .ci/run does) to check {ALERTS}"
            )
        })
}

/// Runs promtool with `args` in the repository root, at most a minute; (success, output).
async fn run_promtool(args: &[&str]) -> (bool, String) {
    let child = tokio::process::Command::new(promtool())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), child)
        .await
        .unwrap_or_else(|_| panic!("promtool {args:?} did not finish within 60 s"))
        .unwrap_or_else(|e| panic!("promtool {args:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `promtool check rules` accepts the rules, and `promtool test rules` runs their unit
/// tests (deploy/prometheus/alerts_test.yaml: series that fire each alert and series
/// that must not) without a failure.
#[tokio::test]
async fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    bounded(async {
        let (ok, out) = run_promtool(&["check", "rules", ALERTS]).await;
        assert!(ok, "promtool check rules {ALERTS}:\n{out}");
        let rules = EXPECTED_ALERTS.len();
        assert!(
            out.contains(&format!("SUCCESS: {rules} rules found")),
            "promtool check rules {ALERTS}:\n{out}"
        );
        let (ok, out) = run_promtool(&["test", "rules", ALERTS_TEST]).await;
        assert!(ok, "promtool test rules {ALERTS_TEST}:\n{out}");
        // Every alert has unit tests.
        let tests = read(ALERTS_TEST);
        for (alert, _) in EXPECTED_ALERTS {
            assert!(
                tests.contains(&format!("alertname: {alert}")),
                "{ALERTS_TEST} does not test {alert}"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------
// The gauges added for them.
// ---------------------------------------------------------------------------------

/// `/readyz`'s code and the `ready` gauge read between two `/readyz` answers with the
/// same code, so that readiness held still while the gauge was read.
async fn readyz_and_gauge(app: &TestApp) -> (u16, f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (before, _) = app.admin_get("/readyz").await;
        let text = app.metrics().await;
        let (after, body) = app.admin_get("/readyz").await;
        if before == after {
            let gauge = series_value(&text, READY)
                .unwrap_or_else(|| panic!("{READY} is not exported:\n{text}"));
            return (after, gauge);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz keeps changing; last: {after} {body}"
        );
    }
}

/// Polls `/readyz` until it answers `code`.
async fn wait_readyz(app: &TestApp, code: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, body) = app.admin_get("/readyz").await;
        if got == code {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz is not {code} within {WAIT:?}: {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With the broker path cut, accepted events wait in the spool and the oldest one's age
/// grows with the clock, while the bridge stays ready (spooled mode: `ready` is what
/// `/readyz` says, not whether the broker is connected); once the path is back and the
/// spool drained, the age is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_age_rises_while_events_wait_and_is_0_once_the_spool_drains() {
    bounded(async {
        let proxy = TcpProxy::to_port(5672).await.expect("proxy");
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.urls = vec![proxy.amqp_url().into()];
            s.amqp.reconnect_initial_ms = 50;
            s.amqp.reconnect_max_ms = 500;
        })
        .await;
        app.wait_ready(true, WAIT).await;
        let text = app.metrics().await;
        assert_eq!(
            series_value(&text, OLDEST_AGE),
            Some(0.0),
            "an empty spool's oldest age is 0:\n{text}"
        );
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0));
        let broker = Broker::connect(&amqp_url()).await;
        let mut consumer = broker.subscribe(&app.settings.amqp.exchange, "#").await;

        proxy.cut(CutMode::Refuse).await;
        app.wait_metric(CONNECTED, WAIT, |v| v == 0.0).await;
        for n in 0..2 {
            let body = event_body("WHEF_SESSION_CREATED", "s-age", "r-age", n);
            assert_eq!(app.post_json(&body).await.code, 200);
        }
        let stored = std::time::Instant::now();
        assert_eq!(app.metric(SPOOL_EVENTS).await, 2.0);
        let first = app.metric(OLDEST_AGE).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let later = app.metric(OLDEST_AGE).await;
        let waited = stored.elapsed().as_secs_f64();
        assert!(
            later >= first + 1.0 && later >= waited - 0.1 && later < waited + 10.0,
            "the oldest age went from {first} to {later} s while the events waited {waited:.3} s"
        );
        // Spooled mode keeps accepting with the broker away: ready, and the gauge says so.
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0));
        assert_eq!(app.metric(CONNECTED).await, 0.0);

        proxy.restore();
        take(&mut consumer, 2, WAIT).await;
        app.wait_metric(SPOOL_EVENTS, WAIT, |v| v == 0.0).await;
        let text = app.metrics().await;
        assert_eq!(
            series_value(&text, OLDEST_AGE),
            Some(0.0),
            "the spool drained:\n{text}"
        );
        app.stop().await;
    })
    .await;
}

/// `ready` is 1 exactly when `/readyz` answers 200 and 0 when it answers 503: in
/// confirmed mode with the broker path cut and back; in spooled mode with the broker
/// connected but an event refused as larger than the whole spool (no room for it, so
/// unready), and with a misconfigured broker (the exchange missing with
/// `declare = false`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_gauge_is_1_when_readyz_is_200_and_0_when_it_is_503() {
    bounded(async {
        let proxy = TcpProxy::to_port(5672).await.expect("proxy");
        let app = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.urls = vec![proxy.amqp_url().into()];
            s.amqp.reconnect_initial_ms = 50;
            s.amqp.reconnect_max_ms = 500;
        })
        .await;
        app.wait_ready(true, WAIT).await;
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0), "connected");
        proxy.cut(CutMode::Refuse).await;
        wait_readyz(&app, 503).await;
        assert_eq!(readyz_and_gauge(&app).await, (503, 0.0), "broker cut");
        proxy.restore();
        app.wait_ready(true, WAIT).await;
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0), "broker back");
        app.stop().await;

        let app = spawn_app(AckMode::Spooled, |s| s.spool.max_bytes = 64).await;
        app.wait_ready(true, WAIT).await;
        assert_eq!(readyz_and_gauge(&app).await, (200, 1.0), "spool empty");
        let body = event_body("WHEF_SESSION_CREATED", "s-full", "r-full", 1);
        assert_eq!(
            app.post_json(&body).await.code,
            503,
            "larger than the spool"
        );
        wait_readyz(&app, 503).await;
        assert_eq!(
            readyz_and_gauge(&app).await,
            (503, 0.0),
            "no room, broker connected"
        );
        assert_eq!(app.metric(CONNECTED).await, 1.0);
        app.stop().await;

        let app = spawn_app(AckMode::Spooled, |s| s.amqp.declare = false).await;
        wait_readyz(&app, 503).await;
        let (_, body) = app.admin_get("/readyz").await;
        assert!(body.contains("\"misconfigured\":true"), "{body}");
        assert_eq!(readyz_and_gauge(&app).await, (503, 0.0), "misconfigured");
        app.stop().await;
    })
    .await;
}
