//! The contract as files (SPEC 7, issue 10 point 1): `docs/asyncapi.yaml`,
//! `docs/openapi.yaml` and `docs/schema/*.schema.json` are checked against the
//! bridge itself, so that they name only what it does and all of it. The
//! vectors are validated against the schemas; the properties and headers of real
//! messages, published through a real bridge to the real RabbitMQ, against the
//! AsyncAPI document; the answers of real bridges, driven through every refusal
//! over real sockets, against the OpenAPI document.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cellosign_bridge::{AckMode, Policy, Settings, Sources, validate, validate_archive};
use common::*;
use jsonschema::{Registry, Validator};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DRAFT_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";
/// The schema of each webhook body, by the path its vectors are posted to.
const NOTIFICATION_SCHEMA: &str = "schema/event.schema.json";
const ARCHIVE_SCHEMA: &str = "schema/archive.schema.json";
const CLAIM_CHECK_SCHEMA: &str = "schema/claim-check.schema.json";
const SCHEMAS: [&str; 3] = [NOTIFICATION_SCHEMA, ARCHIVE_SCHEMA, CLAIM_CHECK_SCHEMA];

/// Refused vectors whose reason a JSON Schema of the body cannot express, each
/// with why. Each must pass its schema (or, for a body that is not JSON, fail to
/// parse), so that one the schema learns to express is moved out of this list.
const NOT_EXPRESSIBLE: &[(&str, &str)] = &[
    (
        "not json",
        "not JSON (400): a schema applies to a JSON document, and these bytes are none",
    ),
    (
        "truncated json",
        "not JSON (400): a schema applies to a JSON document, and these bytes are none",
    ),
    (
        "empty body",
        "not JSON (400): a schema applies to a JSON document, and these bytes are none",
    ),
    (
        "archive: not JSON",
        "not JSON (400): a schema applies to a JSON document, and these bytes are none",
    ),
    (
        "unknown event type",
        "the accept list is configuration (events.accept): the schema says a string, \
         and names the default list in its description and examples",
    ),
    (
        "field changed is synchronous, not accepted by default",
        "the accept list is configuration (events.accept), and an operator may add \
         WHEF_FORM_FIELD_CHANGED to it",
    ),
    (
        "archive: sessions with different references",
        "all references equal: JSON Schema cannot compare one value with another",
    ),
    (
        "wrong content type",
        "refused for its Content-Type header (415), not its body, which is valid: \
         openapi.yaml names application/json as the request's one media type",
    ),
];

/// Header names that the bridge adds to an HTTP answer and that openapi.yaml
/// must document where they are sent (Content-Type is the media type).
const DOCUMENTED_HEADERS: [&str; 5] = [
    "retry-after",
    "allow",
    "connection",
    "cache-control",
    "pragma",
];

// ---------------------------------------------------------------- the documents

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs")
}

/// The `file://` URI of a file under `docs/`, as which it is registered: the
/// documents refer to each other by relative paths, resolved against it.
fn uri_of(rel: &str) -> String {
    format!("file://{}", docs_dir().join(rel).display())
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(docs_dir().join(rel)).unwrap_or_else(|e| panic!("docs/{rel}: {e}"))
}

fn yaml(rel: &str) -> Value {
    yaml_serde::from_str(&read(rel)).unwrap_or_else(|e| panic!("docs/{rel} is not YAML: {e}"))
}

fn json_file(rel: &str) -> Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("docs/{rel} is not JSON: {e}"))
}

/// The three documents and the schemas, registered under their file URIs, so
/// that a validator can start from any point of any of them.
struct Contract {
    asyncapi: Value,
    openapi: Value,
    registry: Registry<'static>,
}

impl Contract {
    fn load() -> Contract {
        let asyncapi = yaml("asyncapi.yaml");
        let openapi = yaml("openapi.yaml");
        let mut resources: Vec<(String, Value)> =
            SCHEMAS.iter().map(|s| (uri_of(s), json_file(s))).collect();
        resources.push((uri_of("asyncapi.yaml"), asyncapi.clone()));
        resources.push((uri_of("openapi.yaml"), openapi.clone()));
        let registry = Registry::new()
            .extend(resources)
            .and_then(|builder| builder.prepare())
            .unwrap_or_else(|e| panic!("the documents do not register: {e}"));
        Contract {
            asyncapi,
            openapi,
            registry,
        }
    }

    /// A validator for the schema at `pointer` (a JSON pointer, `""` for the
    /// root) of the document `rel`; every `$ref` on the way must resolve.
    fn validator(&self, rel: &str, pointer: &str) -> Validator {
        let start = json!({ "$ref": format!("{}#{pointer}", uri_of(rel)) });
        jsonschema::options()
            .with_registry(&self.registry)
            .build(&start)
            .unwrap_or_else(|e| panic!("docs/{rel}#{pointer} does not compile: {e}"))
    }
}

/// Every error of `value` against `validator`, as text (empty: valid).
fn errors(validator: &Validator, value: &Value) -> Vec<String> {
    validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// Follows a local `$ref` (`#/...`) of `doc` until a node without one.
fn deref<'a>(doc: &'a Value, mut node: &'a Value) -> &'a Value {
    while let Some(target) = node.get("$ref").and_then(Value::as_str) {
        let pointer = target
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{target}: only local references are followed here"));
        node = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{target} does not resolve"));
    }
    node
}

/// The pointer a local `$ref` chain from `pointer` ends at.
fn deref_pointer(doc: &Value, mut pointer: String) -> String {
    while let Some(target) = doc
        .pointer(&pointer)
        .and_then(|n| n.get("$ref"))
        .and_then(Value::as_str)
    {
        pointer = target.trim_start_matches('#').to_string();
    }
    pointer
}

/// The property names an object schema of `doc` declares, through local `$ref`s
/// and `allOf`.
fn property_names(doc: &Value, schema: &Value) -> BTreeSet<String> {
    let schema = deref(doc, schema);
    let mut names: BTreeSet<String> = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        names.extend(property_names(doc, part));
    }
    names
}

fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Every `$ref` string in `value`.
fn refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

// ------------------------------------------------------------------- (5) parse

/// (5) Each YAML file parses and carries its version; each schema declares draft
/// 2020-12, is valid under its meta-schema and compiles with every reference
/// resolved; every `$ref` of every document points at something.
#[tokio::test]
async fn the_documents_parse_carry_their_versions_and_every_reference_resolves() {
    bounded(async {
        let contract = Contract::load();
        assert_eq!(
            contract.asyncapi["asyncapi"], "3.0.0",
            "asyncapi.yaml: asyncapi"
        );
        assert_eq!(
            contract.openapi["openapi"], "3.1.0",
            "openapi.yaml: openapi"
        );
        assert_eq!(contract.openapi["jsonSchemaDialect"], DRAFT_2020_12);
        for doc in [&contract.asyncapi, &contract.openapi] {
            assert_eq!(
                doc["info"]["version"],
                env!("CARGO_PKG_VERSION"),
                "info.version is the crate's"
            );
        }
        for rel in SCHEMAS {
            let schema = json_file(rel);
            assert_eq!(schema["$schema"], DRAFT_2020_12, "docs/{rel}: $schema");
            if let Err(e) = jsonschema::meta::validate(&schema) {
                panic!("docs/{rel} is not a valid 2020-12 schema: {e}");
            }
            contract.validator(rel, "");
        }
        let mut documents = vec![
            ("asyncapi.yaml", contract.asyncapi.clone()),
            ("openapi.yaml", contract.openapi.clone()),
        ];
        documents.extend(SCHEMAS.iter().map(|s| (*s, json_file(s))));
        for (rel, doc) in &documents {
            let (rel, doc) = (*rel, doc);
            let mut found = Vec::new();
            refs(doc, &mut found);
            assert!(
                !found.is_empty() || rel == CLAIM_CHECK_SCHEMA,
                "docs/{rel}: no $ref"
            );
            for r in found {
                let (file, pointer) = r.split_once('#').unwrap_or((r.as_str(), ""));
                let target = if file.is_empty() {
                    doc.clone()
                } else {
                    let base = Path::new(rel).parent().unwrap_or(Path::new(""));
                    let path = base.join(file);
                    let path = path.to_str().expect("UTF-8 path").trim_start_matches("./");
                    let path = path.replace("/./", "/");
                    match path.rsplit_once('.') {
                        Some((_, "json")) => json_file(&path),
                        _ => yaml(&path),
                    }
                };
                assert!(
                    target.pointer(pointer).is_some(),
                    "docs/{rel}: $ref {r} does not resolve"
                );
            }
        }
    })
    .await;
}

// ------------------------------------------------------------ (1), (2) vectors

/// Each vector with the schema of the path it is posted to.
fn vectors_with_schemas() -> Vec<(Value, &'static str)> {
    let notifications = vectors().into_iter().map(|v| (v, NOTIFICATION_SCHEMA));
    let archives = archive_vectors().into_iter().map(|v| (v, ARCHIVE_SCHEMA));
    notifications.chain(archives).collect()
}

/// What the bridge's own validator says of a vector's body (the vectors' answers
/// are checked end to end elsewhere; this keeps the two in step here).
fn bridge_accepts(body: &str, schema: &str) -> bool {
    let policy = Policy::default();
    match schema {
        ARCHIVE_SCHEMA => validate_archive(body.as_bytes(), &policy).is_ok(),
        _ => validate(body.as_bytes(), &policy).is_ok(),
    }
}

/// (1) Every vector the bridge accepts validates against its path's schema.
#[tokio::test]
async fn every_accepted_vector_validates_against_its_schema() {
    bounded(async {
        let contract = Contract::load();
        let mut checked = 0;
        for (case, schema) in vectors_with_schemas() {
            if case["expect_http"] != 200 {
                continue;
            }
            let name = case["name"].as_str().unwrap();
            let text = case["body"].as_str().unwrap();
            assert!(
                bridge_accepts(text, schema),
                "{name}: the bridge accepts it"
            );
            let body: Value = serde_json::from_str(text).expect("an accepted body is JSON");
            let problems = errors(&contract.validator(schema, ""), &body);
            assert!(
                problems.is_empty(),
                "{name} fails docs/{schema}: {problems:#?}"
            );
            checked += 1;
        }
        assert!(checked >= 10, "only {checked} accepted vectors");
    })
    .await;
}

/// (2) Every refused vector fails its schema, except those whose reason a schema
/// cannot express, which are listed in [`NOT_EXPRESSIBLE`] with why.
#[tokio::test]
async fn every_refused_vector_fails_its_schema_unless_listed_with_why() {
    bounded(async {
        let contract = Contract::load();
        let listed: BTreeMap<&str, &str> = NOT_EXPRESSIBLE.iter().copied().collect();
        let mut seen: BTreeSet<String> = BTreeSet::new();
        for (case, schema) in vectors_with_schemas() {
            if case["expect_http"] == 200 {
                continue;
            }
            let name = case["name"].as_str().unwrap();
            let text = case["body"].as_str().unwrap();
            let parsed = serde_json::from_str::<Value>(text);
            let problems = parsed
                .as_ref()
                .map(|body| errors(&contract.validator(schema, ""), body));
            match (listed.get(name), problems) {
                (None, Ok(problems)) => {
                    assert!(
                        !problems.is_empty(),
                        "{name} (HTTP {}) passes docs/{schema}: make the schema refuse it, \
                         or list it in NOT_EXPRESSIBLE with why",
                        case["expect_http"]
                    );
                }
                (None, Err(e)) => {
                    panic!("{name} is not JSON ({e}) and is not listed in NOT_EXPRESSIBLE")
                }
                (Some(why), Ok(problems)) => {
                    assert!(
                        problems.is_empty(),
                        "{name} is listed as not expressible ({why}), yet docs/{schema} \
                         refuses it: {problems:#?}; take it off the list"
                    );
                    if case["expect_http"] == 422 {
                        assert!(
                            !bridge_accepts(text, schema),
                            "{name}: the bridge refuses it"
                        );
                    } else {
                        // 415: the body itself is one the bridge accepts.
                        assert!(bridge_accepts(text, schema), "{name}: a valid body");
                    }
                }
                (Some(why), Err(_)) => {
                    assert_eq!(case["expect_http"], 400, "{name}: {why}");
                }
            }
            seen.insert(name.to_string());
        }
        for (name, _) in NOT_EXPRESSIBLE {
            assert!(
                seen.contains(*name),
                "NOT_EXPRESSIBLE names {name:?}, no refused vector"
            );
        }
    })
    .await;
}

// ------------------------------------------------------------- (3) asyncapi

/// The AMQP 0-9-1 basic properties a delivery carries (all but `headers`),
/// under their protocol names.
fn amqp_properties(d: &Delivery) -> BTreeMap<String, Value> {
    let p = &d.properties;
    let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| json!(s.as_str()));
    [
        ("content_type", text(p.content_type())),
        ("content_encoding", text(p.content_encoding())),
        ("delivery_mode", p.delivery_mode().map(|m| json!(m))),
        ("priority", p.priority().map(|m| json!(m))),
        ("correlation_id", text(p.correlation_id())),
        ("reply_to", text(p.reply_to())),
        ("expiration", text(p.expiration())),
        ("message_id", text(p.message_id())),
        ("timestamp", p.timestamp().map(|t| json!(t))),
        ("type", text(p.kind())),
        ("user_id", text(p.user_id())),
        ("app_id", text(p.app_id())),
        ("cluster_id", text(p.cluster_id())),
    ]
    .into_iter()
    .filter_map(|(name, value)| Some((name.to_string(), value?)))
    .collect()
}

/// A header value as JSON.
fn header_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => json!(s.to_string()),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        other => panic!("a header of a type this test does not read: {other:?}"),
    }
}

/// The application headers of a delivery.
fn amqp_headers(d: &Delivery) -> serde_json::Map<String, Value> {
    d.properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), header_json(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// The `x-amqp-properties` of a message of asyncapi.yaml: its own and its traits'.
fn documented_properties(doc: &Value, message: &Value) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for t in message["traits"].as_array().into_iter().flatten() {
        if let Some(p) = deref(doc, t)
            .get("x-amqp-properties")
            .and_then(Value::as_object)
        {
            out.extend(p.clone());
        }
    }
    if let Some(p) = message.get("x-amqp-properties").and_then(Value::as_object) {
        out.extend(p.clone());
    }
    out
}

/// The built-in defaults, as an operator who changes nothing runs the bridge.
fn defaults() -> Settings {
    let sources = Sources {
        env: Some(Default::default()),
        ..Sources::default()
    };
    Settings::load(&sources).expect("the defaults load")
}

/// (3) A real notification, a real archive and a real claim check, posted to a
/// real bridge and read back from the real RabbitMQ: each carries exactly the
/// AMQP properties and headers its message of asyncapi.yaml names, no more and
/// no fewer, with values its schemas accept, and a body its payload accepts.
/// `x-claim-check` is conditional: asyncapi.yaml names it for the claim-check
/// message only, and the claim check here shows the bridge sets it there.
#[tokio::test]
async fn published_messages_carry_exactly_the_properties_and_headers_asyncapi_names() {
    bounded(async {
        let contract = Contract::load();
        let doc = &contract.asyncapi;

        // The names asyncapi.yaml gives are the defaults the bridge declares.
        let d = defaults();
        let events = &doc["channels"]["events"];
        assert_eq!(
            events["bindings"]["amqp"]["exchange"]["name"],
            d.amqp.exchange.as_str()
        );
        assert_eq!(events["bindings"]["amqp"]["exchange"]["type"], "topic");
        assert_eq!(events["bindings"]["amqp"]["exchange"]["durable"], true);
        let unrouted = cellosign_bridge::unrouted_name(&d.amqp.exchange);
        assert_eq!(events["x-alternate-exchange"], unrouted.as_str());
        assert_eq!(doc["channels"]["unrouted"]["address"], unrouted.as_str());
        assert_eq!(
            doc["channels"]["sessions"]["address"],
            d.amqp.queues[0].name.as_str()
        );
        let partition = doc["channels"]["partition"]["address"]
            .as_str()
            .expect("partition");
        assert_eq!(
            partition.replace("{partition}", "7"),
            cellosign_bridge::partition_queue(&d.amqp.exchange, 7)
        );
        assert_eq!(events["address"], "{routingKey}");
        assert_eq!(d.amqp.routing_key.to_string(), "{session.reference}");

        let store = tempfile::tempdir().expect("temp dir");
        let store_url = url::Url::from_directory_path(store.path().join("claims"))
            .expect("a file URL")
            .to_string();
        let app = spawn_app(AckMode::Spooled, |s| {
            s.amqp.max_message_bytes = 16 << 10;
            s.archive.store_url = Some(store_url);
        })
        .await;
        let (_broker, mut consumer) = app.subscribe("#").await;

        let notification = vectors()
            .into_iter()
            .find(|v| v["name"] == "client logged in with client object")
            .expect("the vector");
        let archive = archive_vectors()
            .into_iter()
            .find(|v| v["expect_http"] == 200)
            .expect("an accepted archive vector");
        let large = json!({
            "event": {"type": "WHP_ARCHIVE", "timestamp": "2025-01-27T14:02:11.105934"},
            "session": [{"id": "claim1", "reference": "contract-claim-ref"},
                        {"id": "claim2", "reference": "contract-claim-ref"}],
            "documents": [{"name": "contract.pdf", "content": "A".repeat(32 << 10)}]
        })
        .to_string();
        let posts = [
            (
                "notification",
                app.url(),
                notification["body"].as_str().unwrap().to_string(),
                notification["routing_key"].as_str().unwrap().to_string(),
            ),
            (
                "archive",
                app.archive_url(),
                archive["body"].as_str().unwrap().to_string(),
                archive["routing_key"].as_str().unwrap().to_string(),
            ),
            (
                "claimCheck",
                app.archive_url(),
                large,
                "contract-claim-ref".to_string(),
            ),
        ];
        // With a caller's trace, so that the conditional `tracestate` is set too.
        for (name, url, body, _) in &posts {
            let sent = app
                .client
                .post(url)
                .header("content-type", "application/json")
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .header("tracestate", "rojo=00f067aa0ba902b7")
                .body(body.clone())
                .send()
                .await
                .expect("request sent");
            let answer = answer(sent).await;
            assert_eq!(answer.code, 200, "{name}: {answer:?}");
        }
        let got = take(&mut consumer, posts.len(), Duration::from_secs(20)).await;

        for (name, _, _, routing_key) in &posts {
            let delivery = got
                .iter()
                .find(|d| d.routing_key.as_str() == routing_key)
                .unwrap_or_else(|| panic!("{name}: no delivery with routing key {routing_key}"));
            let message = &doc["components"]["messages"][*name];
            assert!(message.is_object(), "asyncapi.yaml has no message {name}");

            let properties = amqp_properties(delivery);
            let documented = documented_properties(doc, message);
            let set = |keys: Vec<&String>| keys.into_iter().cloned().collect::<BTreeSet<_>>();
            assert_eq!(
                set(properties.keys().collect()),
                set(documented.keys().collect()),
                "{name}: the properties the bridge set (left) and those asyncapi.yaml names (right)"
            );
            let schema = json!({
                "type": "object",
                "required": documented.keys().collect::<Vec<_>>(),
                "properties": documented,
            });
            let values = serde_json::to_value(&properties).expect("JSON");
            let problems = errors(
                &jsonschema::validator_for(&schema).expect("compiles"),
                &values,
            );
            assert!(
                problems.is_empty(),
                "{name}: properties {values}: {problems:#?}"
            );

            let headers = amqp_headers(delivery);
            assert_eq!(
                headers.keys().cloned().collect::<BTreeSet<_>>(),
                property_names(doc, &message["headers"]),
                "{name}: the headers the bridge set (left) and those asyncapi.yaml names (right)"
            );
            let pointer = format!("/components/messages/{name}");
            let headers = Value::Object(headers);
            let problems = errors(
                &contract.validator("asyncapi.yaml", &format!("{pointer}/headers")),
                &headers,
            );
            assert!(
                problems.is_empty(),
                "{name}: headers {headers}: {problems:#?}"
            );

            let body: Value = serde_json::from_slice(&delivery.data).expect("a JSON body");
            let problems = errors(
                &contract.validator("asyncapi.yaml", &format!("{pointer}/payload")),
                &body,
            );
            assert!(
                problems.is_empty(),
                "{name}: the body fails its payload: {problems:#?}"
            );

            // Every message is one the consumers' operation receives.
            let listed = doc["operations"]["receiveEvents"]["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| deref(doc, m) == message);
            assert!(listed, "{name} is not a message of operation receiveEvents");
        }
        let binding = &doc["operations"]["receiveEvents"]["bindings"]["amqp"];
        assert_eq!(
            binding["deliveryMode"],
            json!(got[0].properties.delivery_mode().expect("delivery mode"))
        );
        app.stop().await;
    })
    .await;
}

// -------------------------------------------------------------- (4) openapi

const TOKEN: &str = "contract-static-token";
const USERNAME: &str = "contract-user";
const PASSWORD: &str = "contract-password-9f3k2";
const SIGNING_KEY: &str = "contract-signing-key-Qm4vT8xZr2Lp6Wn0Yb5Hc1Jd";

/// An HTTP answer read off the socket.
#[derive(Debug)]
struct Reply {
    code: u16,
    /// Lowercase names.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// A request head and body as bytes on the wire; `content-length` is added for
/// a body unless given.
fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut r = format!("{method} {target} HTTP/1.1\r\nhost: bridge\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        r.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

/// Sends `raw` on a new connection and reads one answer: its head, then as many
/// body bytes as it announces (the connection is kept, so that a `Connection:
/// close` in the answer is the server's own).
async fn exchange(addr: std::net::SocketAddr, raw: &str) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let mut lines = head.split("\r\n");
                let status = lines.next().unwrap_or_default();
                let code = status
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or_else(|| panic!("no status line in {head:?}"));
                let headers: BTreeMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let length: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < end + 4 + length {
                    let n = stream.read(&mut chunk).await.expect("read");
                    assert!(n > 0, "the connection closed inside the body");
                    buf.extend_from_slice(&chunk[..n]);
                }
                let body = buf[end + 4..end + 4 + length].to_vec();
                return Reply {
                    code,
                    headers,
                    body,
                };
            }
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "the connection closed before an answer to {raw:.200?}"
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("no answer to {raw:.200?}"))
}

/// Writes a config file with one password client, for the token URL.
fn client_config(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("password"), PASSWORD).expect("write");
    std::fs::write(dir.join("token-keys"), SIGNING_KEY).expect("write");
    let file = dir.join("bridge.toml");
    let config = format!(
        "[auth]\ntoken_keys_file = {:?}\n[[auth.clients]]\nusername = {USERNAME:?}\npassword_file = {:?}\n",
        dir.join("token-keys").display().to_string(),
        dir.join("password").display().to_string(),
    );
    std::fs::write(&file, config).expect("write config");
    file
}

/// A bridge with the password client of [`client_config`] and `configure` applied.
async fn spawn_with_client(dir: &Path, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let spool = tempfile::tempdir().expect("temp dir");
    let mut settings =
        test_settings_from(Some(&client_config(dir)), AckMode::Spooled, spool.path());
    configure(&mut settings);
    spawn_with(settings, spool).await
}

/// One answer the bridge gave, and the OpenAPI paths it belongs to.
struct Seen {
    what: String,
    paths: Vec<String>,
    reply: Reply,
}

#[derive(Default)]
struct Log(Vec<Seen>);

impl Log {
    fn note(&mut self, what: &str, paths: &[&str], reply: Reply) {
        self.0.push(Seen {
            what: what.to_string(),
            paths: paths.iter().map(|p| p.to_string()).collect(),
            reply,
        });
    }

    /// Sends `raw` to `addr` and notes the answer as one of `paths`.
    async fn ask(&mut self, what: &str, addr: std::net::SocketAddr, paths: &[&str], raw: String) {
        let reply = exchange(addr, &raw).await;
        self.note(what, paths, reply);
    }
}

/// Holds `path`'s only in-flight slot with a body that never finishes, probes
/// the path with `probe` until the answer is no longer 200, and notes it.
async fn note_when_full(log: &mut Log, app: &TestApp, path: &str, probe: String) {
    let head = request(
        "POST",
        path,
        &[
            ("authorization", &format!("Bearer {TOKEN}")),
            ("content-type", "application/json"),
            ("content-length", "100"),
        ],
        "{",
    );
    let mut holder = TcpStream::connect(app.http).await.expect("connect");
    holder.write_all(head.as_bytes()).await.expect("write");
    for _ in 0..200 {
        let reply = exchange(app.http, &probe).await;
        if reply.code != 200 {
            log.note(&format!("{path}: its one slot held"), &[path], reply);
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{path}: a held slot never changed the answer");
}

/// The status codes named in the source of each file (under `src/`) that
/// answers HTTP; every such file must be one of `known`. Tests are left out.
fn codes_in_source(known: &[&str]) -> BTreeMap<String, BTreeSet<u16>> {
    let by_name: BTreeMap<String, u16> = (100..600)
        .filter_map(|n| reqwest::StatusCode::from_u16(n).ok())
        .filter_map(|s| {
            Some((
                s.canonical_reason()?
                    .to_ascii_uppercase()
                    .replace([' ', '-'], "_"),
                s.as_u16(),
            ))
        })
        .collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![src.clone()];
    let mut out: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(
                std::fs::read_dir(&path)
                    .expect("src")
                    .map(|e| e.expect("entry").path()),
            );
            continue;
        }
        // Unit-test files (`tests.rs`, `tests_*.rs`) answer nothing.
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with("tests") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let names: BTreeSet<&str> = code
            .match_indices("StatusCode::")
            .map(|(at, _)| {
                let rest = &code[at + "StatusCode::".len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .filter(|name| !name.is_empty())
            .collect();
        if names.is_empty() {
            continue;
        }
        let rel = path
            .strip_prefix(&src)
            .expect("under src")
            .display()
            .to_string();
        assert!(
            known.contains(&rel.as_str()),
            "src/{rel} names HTTP codes {names:?}: drive its answers in this test and map it to its paths"
        );
        for name in names {
            let code = *by_name
                .get(name)
                .unwrap_or_else(|| panic!("src/{rel}: StatusCode::{name}?"));
            out.entry(rel.clone()).or_default().insert(code);
        }
    }
    out
}

/// Keys of `value` (at any depth) that the schema at `schema` of `doc` does not
/// declare, following local `$ref`s.
fn undocumented_keys(doc: &Value, schema: &Value, value: &Value, at: &str, out: &mut Vec<String>) {
    let schema = deref(doc, schema);
    if let (Some(object), Some(properties)) = (value.as_object(), schema.get("properties")) {
        for (key, v) in object {
            match properties.get(key) {
                Some(s) => undocumented_keys(doc, s, v, &format!("{at}.{key}"), out),
                None => out.push(format!("{at}.{key}")),
            }
        }
    }
}

/// (4) Real bridges driven through every refusal, over real sockets: the codes
/// each path answers are exactly those openapi.yaml documents for it, and each
/// answer has the documented media type, a body its schema accepts (with no
/// undocumented field) and the documented headers (Retry-After on 429 and 503,
/// Allow on 405, ...). Every code the source names is among those driven, so a
/// new answer in the code fails here until it is driven and documented.
#[tokio::test]
async fn every_answer_the_bridges_give_is_in_openapi_and_every_documented_answer_is_given() {
    bounded(async {
        let contract = Contract::load();
        let doc = &contract.openapi;
        let d = defaults();
        let (webhook, archive, token) = (
            d.http.path.clone(),
            d.http.archive_path.clone(),
            d.auth.token_path.clone(),
        );
        let (webhook, archive, token) = (webhook.as_str(), archive.as_str(), token.as_str());
        let public = [webhook, archive, token];
        let admin = ["/healthz", "/readyz", "/metrics"];
        let documented_paths: BTreeSet<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            documented_paths,
            public.iter().chain(&admin).copied().collect(),
            "openapi.yaml documents the default paths of both listeners"
        );

        let bearer = format!("Bearer {TOKEN}");
        let auth = ("authorization", bearer.as_str());
        let json_ct = ("content-type", "application/json");
        let form_ct = ("content-type", "application/x-www-form-urlencoded");
        let post = |path: &str, headers: &[(&str, &str)], body: &str| {
            request("POST", path, headers, body)
        };
        let get = |path: &str, headers: &[(&str, &str)]| request("GET", path, headers, "");
        let notification = event_body("WHEF_SESSION_CREATED", "contract-s1", "contract-r1", 1);
        let archived = archive_vectors()
            .into_iter()
            .find(|v| v["expect_http"] == 200)
            .and_then(|v| v["body"].as_str().map(String::from))
            .expect("an accepted archive vector");
        let granted = json!({"username": USERNAME, "password": PASSWORD, "grant_type": "password"});
        let granted = granted.to_string();
        let form = format!("username={USERNAME}&password={PASSWORD}");
        let wrong = json!({"username": USERNAME, "password": "wrong", "grant_type": "password"});
        let wrong = wrong.to_string();
        let unsupported = r#"{"grant_type":"refresh_token"}"#;
        let elsewhere = "/contract/elsewhere";
        let mut log = Log::default();

        // A: tokens, the password client, one slot per path, a short body timeout.
        let secrets = tempfile::tempdir().expect("temp dir");
        let a = spawn_with_client(secrets.path(), |s| {
            s.auth.tokens = vec![TOKEN.into()];
            s.http.max_body_bytes = 8 << 10;
            s.http.archive_max_body_bytes = 16 << 10;
            s.http.max_in_flight = 1;
            s.http.archive_max_in_flight = 1;
            s.http.body_read_timeout_ms = 3000;
        })
        .await;
        a.wait_ready(true, Duration::from_secs(20)).await;
        let huge = ("content-length", "1000000");
        for (path, body) in [(webhook, notification.as_str()), (archive, &archived)] {
            let at = &[path];
            let good = post(path, &[auth, json_ct], body);
            log.ask("accepted", a.http, at, good.clone()).await;
            log.ask("not JSON", a.http, at, post(path, &[auth, json_ct], "{{{")).await;
            log.ask("no token", a.http, at, post(path, &[json_ct], body)).await;
            log.ask("GET", a.http, at, get(path, &[auth])).await;
            log.ask("too large", a.http, at, post(path, &[auth, json_ct, huge], "")).await;
            let text = ("content-type", "text/plain");
            log.ask("text/plain", a.http, at, post(path, &[auth, text], body)).await;
            log.ask("not an event", a.http, at, post(path, &[auth, json_ct], "[]")).await;
            note_when_full(&mut log, &a, path, good).await;
        }
        let nowhere = post(elsewhere, &[auth, json_ct], "{}");
        log.ask("unknown path", a.http, &public, nowhere).await;
        let at = &[token];
        let big = ("content-length", "9000");
        log.ask("token: JSON", a.http, at, post(token, &[json_ct], &granted)).await;
        log.ask("token: form", a.http, at, post(token, &[form_ct], &form)).await;
        log.ask("token: empty", a.http, at, post(token, &[json_ct], "{}")).await;
        log.ask("token: grant", a.http, at, post(token, &[json_ct], unsupported)).await;
        log.ask("token: GET", a.http, at, get(token, &[])).await;
        log.ask("token: too large", a.http, at, post(token, &[json_ct, big], "")).await;
        // The body timeouts, all at once.
        let slow = |path: &str| post(path, &[auth, json_ct, ("content-length", "100")], "{");
        let (slow_w, slow_r, slow_t) = (slow(webhook), slow(archive), slow(token));
        let (w, r, t) = tokio::join!(
            exchange(a.http, &slow_w),
            exchange(a.http, &slow_r),
            exchange(a.http, &slow_t),
        );
        log.note("body too slow", &[webhook], w);
        log.note("body too slow", &[archive], r);
        log.note("token: body too slow", &[token], t);
        // Wrong credentials until the address is slowed down (last: it stays so).
        for _ in 0..10 {
            let reply = exchange(a.http, &post(token, &[json_ct], &wrong)).await;
            let done = reply.code != 401;
            log.note("token: wrong credentials", &[token], reply);
            if done {
                break;
            }
        }
        for path in admin {
            log.ask("GET", a.admin, &[path], get(path, &[])).await;
            log.ask("POST", a.admin, &[path], post(path, &[], "{}")).await;
        }
        log.ask("unknown path", a.admin, &admin, get(elsewhere, &[])).await;

        // The HTTP server's own answers, before any path: not webhook answers.
        let many: Vec<(String, String)> = (0..120).map(|i| (format!("x-h{i}"), "v".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let layer = [
            ("120 header fields", get(webhook, &many)),
            ("not HTTP", "\u{1}\u{2} nonsense\r\n\r\n".to_string()),
            ("a 70 000 byte URI", get(&format!("{webhook}?{}", "a".repeat(70_000)), &[])),
        ];
        // openapi.yaml names these in info.description, the one place for answers
        // that belong to no path: exactly the codes seen here, with no body.
        let description = doc["info"]["description"].as_str().expect("info.description");
        let paragraph = description
            .split("\n\n")
            .find(|p| p.starts_with("**Answers from the HTTP layer.**"))
            .expect("info.description: a paragraph on the HTTP layer's answers");
        let named: BTreeSet<u16> = paragraph
            .split(|c: char| !c.is_ascii_digit())
            .filter(|w| w.len() == 3)
            .filter_map(|w| w.parse().ok())
            .filter(|c| (400..600).contains(c))
            .collect();
        let mut answered = BTreeSet::new();
        for (what, raw) in layer {
            let reply = exchange(a.http, &raw).await;
            eprintln!("{what}: the HTTP layer answered {}", reply.code);
            assert!(reply.body.is_empty(), "{what}: {reply:?}");
            answered.insert(reply.code);
        }
        assert_eq!(answered, named, "the HTTP layer's answers (left), info.description's (right)");
        a.stop().await;

        // B: the client address is not allowed.
        let secrets_b = tempfile::tempdir().expect("temp dir");
        let b = spawn_with_client(secrets_b.path(), |s| {
            s.auth.allow_from = vec!["10.0.0.0/8".parse().expect("cidr")];
        })
        .await;
        for (path, body) in [
            (webhook, notification.as_str()),
            (archive, &archived),
            (token, &granted),
        ] {
            let raw = post(path, &[json_ct], body);
            log.ask("address not allowed", b.http, &[path], raw).await;
        }
        b.stop().await;

        // C: confirmed mode with no broker, no client: nothing can be made durable,
        // and the token URL is not served.
        let c = spawn_app(AckMode::Confirmed, |s| {
            s.amqp.urls = vec!["amqp://guest:guest@127.0.0.1:1/%2f".into()];
            s.amqp.publish_timeout_ms = 500;
        })
        .await;
        for (path, body) in [(webhook, notification.as_str()), (archive, &archived)] {
            log.ask("no broker", c.http, &[path], post(path, &[json_ct], body)).await;
        }
        let raw = post(token, &[json_ct], &granted);
        log.ask("token URL not served", c.http, &[token], raw).await;
        log.ask("not ready", c.admin, &["/readyz"], get("/readyz", &[])).await;
        c.stop().await;

        // What each path answered, against what openapi.yaml documents for it.
        let mut given: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
        let mut problems = Vec::new();
        for seen in &log.0 {
            for path in &seen.paths {
                given.entry(path.clone()).or_default().insert(seen.reply.code);
                check_answer(&contract, path, seen, &mut problems);
            }
        }
        for path in public.iter().chain(&admin) {
            let item = &doc["paths"][*path];
            let documented: BTreeSet<u16> = item
                .as_object()
                .expect("a path item")
                .values()
                .filter_map(|op| op.get("responses").and_then(Value::as_object))
                .flat_map(|r| r.keys().map(|k| k.parse::<u16>().expect("a numeric code")))
                .collect();
            let answered = given.get(*path).cloned().unwrap_or_default();
            eprintln!("{path}: answered {answered:?}");
            if answered != documented {
                problems.push(format!(
                    "{path}: the bridge answered {answered:?}, openapi.yaml documents {documented:?}"
                ));
            }
        }
        let files: BTreeMap<&str, Vec<String>> = [
            ("ingress/webhook.rs", vec![webhook.to_string(), archive.to_string()]),
            ("http/token_endpoint.rs", vec![token.to_string()]),
            ("ops/admin.rs", admin.iter().map(|p| p.to_string()).collect()),
        ]
        .into_iter()
        .collect();
        let known: Vec<&str> = files.keys().copied().collect();
        for (file, codes) in codes_in_source(&known) {
            let answered: BTreeSet<u16> = files[file.as_str()]
                .iter()
                .filter_map(|p| given.get(p))
                .flatten()
                .copied()
                .collect();
            let missing: Vec<_> = codes.difference(&answered).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "src/{file} answers {missing:?}, which no request here drove"
                ));
            }
        }
        assert!(problems.is_empty(), "{problems:#?}");
    })
    .await;
}

/// Checks one answer against its documented response: media type, body schema
/// (and no undocumented field), headers.
fn check_answer(contract: &Contract, path: &str, seen: &Seen, problems: &mut Vec<String>) {
    let doc = &contract.openapi;
    let reply = &seen.reply;
    let what = format!("{path} {} ({}):", reply.code, seen.what);
    let item = format!("/paths/{}", escape_pointer(path));
    let Some(operation) = doc
        .pointer(&item)
        .and_then(Value::as_object)
        .and_then(|ops| {
            ops.iter()
                .find(|(_, op)| op["responses"].get(reply.code.to_string()).is_some())
        })
        .map(|(method, _)| method.clone())
    else {
        return problems.push(format!("{what} not documented"));
    };
    let pointer = deref_pointer(doc, format!("{item}/{operation}/responses/{}", reply.code));
    let response = doc.pointer(&pointer).expect("the response");
    let media = reply.headers.get("content-type").map(|ct| {
        ct.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    });
    match (&media, response.get("content").and_then(Value::as_object)) {
        (Some(media), Some(content)) if content.contains_key(media) => {
            if media == "application/json" {
                let body: Value = match serde_json::from_slice(&reply.body) {
                    Ok(body) => body,
                    Err(e) => return problems.push(format!("{what} not JSON: {e}")),
                };
                let schema_at = format!("{pointer}/content/application~1json/schema");
                for e in errors(&contract.validator("openapi.yaml", &schema_at), &body) {
                    problems.push(format!("{what} {body}: {e}"));
                }
                let mut extra = Vec::new();
                undocumented_keys(
                    doc,
                    doc.pointer(&schema_at).expect("schema"),
                    &body,
                    "body",
                    &mut extra,
                );
                if !extra.is_empty() {
                    problems.push(format!(
                        "{what} fields openapi.yaml does not name: {extra:?}"
                    ));
                }
            }
        }
        (media, content) => problems.push(format!(
            "{what} answered {media:?}, documented {:?}",
            content.map(|c| c.keys().collect::<Vec<_>>())
        )),
    }
    let documented: BTreeMap<String, &Value> = response
        .get("headers")
        .and_then(Value::as_object)
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), deref(doc, v)))
                .collect()
        })
        .unwrap_or_default();
    for name in DOCUMENTED_HEADERS {
        if reply.headers.contains_key(name) && !documented.contains_key(name) {
            problems.push(format!(
                "{what} sends {name}: {}, not documented",
                reply.headers[name]
            ));
        }
    }
    for (name, header) in &documented {
        if header["required"] == true && !reply.headers.contains_key(name) {
            problems.push(format!("{what} documents {name}, not sent"));
        }
    }
}

/// The token places of openapi.yaml's webhook operations are the ones the bridge
/// reads: a static token in each lets a webhook in, a wrong one does not, and
/// no token at all gets in only when none is configured (the empty alternative).
#[tokio::test]
async fn each_token_place_openapi_names_lets_a_webhook_in() {
    bounded(async {
        let contract = Contract::load();
        let doc = &contract.openapi;
        let d = defaults();
        let app = spawn_app(AckMode::Spooled, |s| s.auth.tokens = vec![TOKEN.into()]).await;
        let body = event_body("WHEF_SESSION_CREATED", "contract-t1", "contract-t1", 1);
        for path in [d.http.path.as_str(), d.http.archive_path.as_str()] {
            let security = doc["paths"][path]["post"]["security"]
                .as_array()
                .expect("security");
            assert!(
                security.contains(&json!({})),
                "{path}: open when no token is configured"
            );
            let mut places = BTreeSet::new();
            for requirement in security {
                for name in requirement.as_object().expect("a requirement").keys() {
                    let scheme = &doc["components"]["securitySchemes"][name];
                    let place = match (scheme["type"].as_str(), scheme["scheme"].as_str()) {
                        (Some("http"), Some("bearer")) => {
                            ("header", "authorization".to_string(), "Bearer ")
                        }
                        (Some("apiKey"), _) => (
                            scheme["in"].as_str().expect("in"),
                            scheme["name"].as_str().expect("name").to_ascii_lowercase(),
                            "",
                        ),
                        other => panic!("{name}: a scheme this test does not know: {other:?}"),
                    };
                    places.insert((place.0.to_string(), place.1.clone()));
                    if path != d.http.path {
                        continue;
                    }
                    for (token, expect) in [(TOKEN, 200), ("wrong-token", 401)] {
                        let value = format!("{}{token}", place.2);
                        let raw = match place.0 {
                            "header" => request(
                                "POST",
                                path,
                                &[(&place.1, &value), ("content-type", "application/json")],
                                &body,
                            ),
                            "query" => request(
                                "POST",
                                &format!("{path}?{}={value}", place.1),
                                &[("content-type", "application/json")],
                                &body,
                            ),
                            other => panic!("{name}: a token in {other}?"),
                        };
                        let reply = exchange(app.http, &raw).await;
                        assert_eq!(reply.code, expect, "{name} with {token}");
                    }
                }
            }
            let expected: BTreeSet<(String, String)> = [
                ("header", "authorization"),
                ("header", "x-webhook-token"),
                ("query", "token"),
            ]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
            assert_eq!(
                places, expected,
                "{path}: the three places of SPEC 5 and README"
            );
        }
        let reply = exchange(
            app.http,
            &request(
                "POST",
                &d.http.path,
                &[("content-type", "application/json")],
                &body,
            ),
        )
        .await;
        assert_eq!(reply.code, 401, "no token where one is configured");
        app.stop().await;
    })
    .await;
}
