//! Shared by the integration tests: run the real application on port 0 against
//! a real RabbitMQ, post to it over real HTTP, and read what reached the broker.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cellosign_bridge::Application;
use cellosign_bridge::{AckMode, Settings, Sources};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long one test may run before it fails instead of holding the suite.
pub const TEST_LIMIT: Duration = Duration::from_secs(240);

/// Runs `test` under [`TEST_LIMIT`]: a hung test fails with a message instead of
/// holding CI.
pub async fn bounded(test: impl std::future::Future<Output = ()>) {
    bounded_within(TEST_LIMIT, test).await;
}

/// Runs `test` under `limit` (for the few tests that legitimately need longer or
/// should fail sooner than [`TEST_LIMIT`]).
pub async fn bounded_within(limit: Duration, test: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(limit, test).await.is_err() {
        panic!("test did not finish within {limit:?}");
    }
}

/// How long the test HTTP client waits for any one answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`TestApp::stop`] waits for the application to end, and for the cleanup.
pub const STOP_LIMIT: Duration = Duration::from_secs(30);

/// An HTTP client that never waits for ever: no proxy, and [`REQUEST_TIMEOUT`].
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("HTTP client")
}

/// The broker tests use: `AMQP_ADDR`, else the local one.
pub fn amqp_url() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test (or run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "test.{prefix}.{}.{}.{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The built-in defaults (no files, no environment), made fit for a test:
/// port-0 listeners, a unique exchange with no queues, a temp spool.
pub fn test_settings(mode: AckMode, spool_dir: &std::path::Path) -> Settings {
    test_settings_from(None, mode, spool_dir)
}

/// [`test_settings`] on top of a config file (`None`: the built-in defaults alone),
/// for settings that only a file can give, such as `[[auth.clients]]`.
pub fn test_settings_from(
    file: Option<&std::path::Path>,
    mode: AckMode,
    spool_dir: &std::path::Path,
) -> Settings {
    let sources = Sources {
        env: Some(Default::default()),
        file: file.map(std::path::Path::to_path_buf),
        ..Sources::default()
    };
    let mut s = Settings::load(&sources).expect("settings load");
    s.http.listen = "127.0.0.1:0".parse().unwrap();
    s.admin.listen = "127.0.0.1:0".parse().unwrap();
    s.delivery.ack = mode;
    s.spool.dir = spool_dir.to_path_buf();
    s.amqp.urls = vec![amqp_url().into()];
    s.amqp.exchange = unique("ex");
    s.amqp.queues = Vec::new();
    s.amqp.publish_timeout_ms = 3000;
    s.shutdown.grace_ms = 3000;
    s
}

/// The application running in this process.
pub struct TestApp {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub settings: Settings,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), cellosign_bridge::Failure>>>,
    _spool: tempfile::TempDir,
}

impl Drop for TestApp {
    /// A test that panics (or drops its app without [`TestApp::stop`]) still stops
    /// the application and removes what it declared on the shared broker, on a
    /// thread of its own (blocking inside the runtime could deadlock it), bounded.
    fn drop(&mut self) {
        let Some(task) = self.task.take() else {
            return;
        };
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        task.abort();
        let urls = self.broker_urls();
        let exchange = self.settings.amqp.exchange.clone();
        clean_up_from_drop(async move { cleanup_on(&urls, &exchange).await });
    }
}

/// Runs `cleanup` to its end or for [`STOP_LIMIT`], from a `Drop` (a failed
/// assertion included): on a thread and runtime of its own, since blocking inside
/// the test's runtime could deadlock it, and joined, so it is done when the test ends.
pub fn clean_up_from_drop(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let cleaner = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let _ = tokio::time::timeout(STOP_LIMIT, cleanup).await;
        });
    });
    let _ = cleaner.join();
}

/// Removes what a bridge with `exchange` declared, on the first of `urls` it can
/// connect to.
async fn cleanup_on(urls: &[String], exchange: &str) {
    for url in urls {
        let connect = Connection::connect(url, ConnectionProperties::default());
        if let Ok(Ok(connection)) = tokio::time::timeout(Duration::from_secs(5), connect).await
            && let Ok(channel) = connection.create_channel().await
        {
            Broker {
                connection,
                channel,
            }
            .cleanup(exchange)
            .await;
            return;
        }
    }
}

/// Starts the real application with `configure` applied to [`test_settings`].
pub async fn spawn_app(mode: AckMode, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let spool = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(mode, spool.path());
    configure(&mut settings);
    spawn_with(settings, spool).await
}

/// Starts the real application with exactly these settings.
pub async fn spawn_with(settings: Settings, spool: tempfile::TempDir) -> TestApp {
    let app = Application::build(settings.clone())
        .await
        .expect("application builds");
    let (http, admin) = (app.http_addr(), app.admin_addr());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    TestApp {
        http,
        admin,
        settings,
        client: http_client(),
        stop: Some(tx),
        task: Some(task),
        _spool: spool,
    }
}

/// What the bridge answered.
#[derive(Debug)]
pub struct Answer {
    pub code: u16,
    pub status: String,
    pub errordesc: String,
    pub headers: reqwest::header::HeaderMap,
}

impl TestApp {
    /// The broker URLs of its settings, in order.
    fn broker_urls(&self) -> Vec<String> {
        self.settings
            .amqp
            .urls
            .iter()
            .map(|u| u.expose().to_string())
            .collect()
    }

    /// The text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let (code, text) = self.admin_get("/metrics").await;
        assert_eq!(code, 200, "/metrics: {text}");
        text
    }

    /// The value of one exact series of `/metrics` (see [`series_value`]); 0 when the
    /// series is absent, as a labelled counter is until its first increment.
    pub async fn metric(&self, series: &str) -> f64 {
        series_value(&self.metrics().await, series).unwrap_or(0.0)
    }

    /// Polls the series until `wanted` holds for its value, at most `within`;
    /// returns the value.
    pub async fn wait_metric(
        &self,
        series: &str,
        within: Duration,
        wanted: impl Fn(f64) -> bool,
    ) -> f64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let text = self.metrics().await;
            let value = series_value(&text, series).unwrap_or(0.0);
            if wanted(value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} is {value} after {within:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The webhook URL.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.http, self.settings.http.path)
    }

    /// The archive webhook URL (SPEC 9).
    pub fn archive_url(&self) -> String {
        format!("http://{}{}", self.http, self.settings.http.archive_path)
    }

    /// POSTs `body` with a content type (None: no header) and parses the status body.
    pub async fn post(&self, body: impl Into<reqwest::Body>, content_type: Option<&str>) -> Answer {
        self.post_to(&self.url(), body, content_type).await
    }

    /// POSTs `body` to `url` with a content type (None: no header).
    pub async fn post_to(
        &self,
        url: &str,
        body: impl Into<reqwest::Body>,
        content_type: Option<&str>,
    ) -> Answer {
        let mut req = self.client.post(url).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        answer(req.send().await.expect("request sent")).await
    }

    /// POSTs a JSON body.
    pub async fn post_json(&self, body: &str) -> Answer {
        self.post(body.to_string(), Some("application/json")).await
    }

    /// A consumer of what the app publishes with `binding`, on a queue bound before the
    /// app's first publish (the exchange is declared as the app declares it); keep the
    /// [`Broker`] as long as the consumer.
    pub async fn subscribe(&self, binding: &str) -> (Broker, Consumer) {
        let broker = Broker::connect(&amqp_url()).await;
        broker.declare_exchange(&self.settings.amqp.exchange).await;
        let consumer = broker
            .subscribe(&self.settings.amqp.exchange, binding)
            .await;
        (broker, consumer)
    }

    /// GETs an admin path: (code, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .expect("admin request");
        let code = r.status().as_u16();
        (code, r.text().await.unwrap_or_default())
    }

    /// Polls `/readyz` until it answers 200 (and, if `connected`, the broker link is up).
    pub async fn wait_ready(&self, connected: bool, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (code, body) = self.admin_get("/readyz").await;
            if code == 200 && (!connected || body.contains("\"connected\":true")) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not ready within {within:?}; last /readyz: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the app as SIGTERM would, waits for it (at most [`STOP_LIMIT`]), and
    /// removes what it declared on the broker (its exchange, and the alternate
    /// exchange with its queue), also bounded.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let mut failed = None;
        if let Some(mut task) = self.task.take() {
            failed = match tokio::time::timeout(STOP_LIMIT, &mut task).await {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(failure))) => Some(format!("the application failed: {failure}")),
                Ok(Err(join)) => Some(format!("the application task ended abnormally: {join}")),
                Err(_) => {
                    task.abort();
                    Some(format!(
                        "the application did not stop within {STOP_LIMIT:?}"
                    ))
                }
            };
        }
        let urls = self.broker_urls();
        let _ =
            tokio::time::timeout(STOP_LIMIT, cleanup_on(&urls, &self.settings.amqp.exchange)).await;
        if let Some(failed) = failed {
            panic!("{failed}");
        }
    }
}

/// The value of the series `series` in OpenMetrics text: a metric name with its
/// labels exactly as rendered, e.g. `cellosign_bridge_broker_connected` or
/// `cellosign_bridge_events_rejected_total{reason="unauthorized"}`; None if absent.
pub fn series_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| match l.rsplit_once(' ') {
            Some((name, value)) if name == series => value.parse().ok(),
            _ => None,
        })
}

/// The sum of every series of the metric `name` over its labels (`name` and
/// `name{...}` lines; not `name_bucket` and the like).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            if metric == name {
                value.parse::<f64>().ok()
            } else {
                None
            }
        })
        .sum()
}

/// Parses any bridge answer, checking the invariants every answer has.
pub async fn answer(r: reqwest::Response) -> Answer {
    let code = r.status().as_u16();
    let headers = r.headers().clone();
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "every answer is JSON"
    );
    let v: serde_json::Value = r.json().await.expect("JSON status body");
    let status = v["status"].as_str().expect("status string").to_string();
    let errordesc = v["errordesc"]
        .as_str()
        .expect("errordesc string")
        .to_string();
    assert_eq!(
        status == "0",
        code == 200,
        "status {status:?} with HTTP {code}"
    );
    assert_eq!(
        errordesc.is_empty(),
        code == 200,
        "errordesc {errordesc:?} with HTTP {code}"
    );
    Answer {
        code,
        status,
        errordesc,
        headers,
    }
}

/// A consumer-side view of the broker for assertions.
pub struct Broker {
    pub connection: Connection,
    pub channel: Channel,
}

impl Broker {
    /// Connects to `url`.
    pub async fn connect(url: &str) -> Broker {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("test connects to RabbitMQ (is it running? apt-get install rabbitmq-server)");
        let channel = connection.create_channel().await.expect("channel");
        Broker {
            connection,
            channel,
        }
    }

    /// A server-named exclusive queue bound to `exchange` with `binding`, consumed with manual acks.
    pub async fn subscribe(&self, exchange: &str, binding: &str) -> Consumer {
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        };
        let name = self
            .declare_bound("", exclusive, FieldTable::default(), exchange, binding)
            .await;
        self.consume(&name).await
    }

    /// A durable quorum queue bound with `binding`, surviving this connection (for restart tests).
    pub async fn durable_queue(&self, exchange: &str, name: &str, binding: &str) {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.declare_bound(name, durable, args, exchange, binding)
            .await;
    }

    /// Declares a queue (`""`: server-named) and binds it; returns its name.
    async fn declare_bound(
        &self,
        name: &str,
        options: QueueDeclareOptions,
        args: FieldTable,
        exchange: &str,
        binding: &str,
    ) -> String {
        let queue = self
            .channel
            .queue_declare(name.into(), options, args)
            .await
            .expect("queue");
        self.channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
        queue.name().to_string()
    }

    /// Consumes `queue` with manual acks.
    pub async fn consume(&self, queue: &str) -> Consumer {
        self.channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume")
    }

    /// Declares the exchange as the bridge would, so a queue can be bound before the bridge connects.
    pub async fn declare_exchange(&self, exchange: &str) {
        let mut args = FieldTable::default();
        args.insert(
            "alternate-exchange".into(),
            lapin::types::AMQPValue::LongString(format!("{exchange}.unrouted").into()),
        );
        self.channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .expect("exchange");
    }

    /// True if `exchange` exists (a passive declare, on a channel of its own since a
    /// failed one closes its channel).
    pub async fn exchange_exists(&self, exchange: &str) -> bool {
        let Ok(channel) = self.connection.create_channel().await else {
            return false;
        };
        let passive = lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let found = channel
            .exchange_declare(
                exchange.into(),
                lapin::ExchangeKind::Topic,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = channel.close(200, "done".into()).await;
        found
    }

    /// Deletes `queue`, if it exists.
    pub async fn delete_queue(&self, queue: &str) {
        let _ = self
            .channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }

    /// Removes what a test's bridge declared.
    pub async fn cleanup(&self, exchange: &str) {
        let unrouted = format!("{exchange}.unrouted");
        let _ = self
            .channel
            .queue_delete(unrouted.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
        let _ = self
            .channel
            .exchange_delete(unrouted.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// Takes `n` deliveries (acking each), failing after `within` without them.
pub async fn take(consumer: &mut Consumer, n: usize, within: Duration) -> Vec<Delivery> {
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                d.ack(lapin::options::BasicAckOptions::default())
                    .await
                    .expect("ack");
                out.push(d);
            }
            Ok(Some(Err(e))) => panic!("consumer error: {e}"),
            Ok(None) => panic!("consumer ended after {} of {n}", out.len()),
            Err(_) => panic!(
                "only {} of {n} messages arrived within {within:?}",
                out.len()
            ),
        }
    }
    out
}

/// Every delivery (acked) until none has come for `quiet`.
pub async fn take_for(consumer: &mut Consumer, quiet: Duration) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(quiet, consumer.next()).await {
        let d = d.expect("consumer error");
        d.ack(lapin::options::BasicAckOptions::default())
            .await
            .expect("ack");
        out.push(d);
    }
    out
}

/// A string header of a delivery.
pub fn header(d: &Delivery, key: &str) -> Option<String> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key).cloned())
        .and_then(|v| match v {
            lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        })
}

/// Asserts the SPEC 3 properties and headers of delivery `d` (of the vector `name`),
/// read from its body; an archive's `session` may be an array, whose first session
/// gives the id (SPEC 9).
pub fn assert_contract_properties(d: &Delivery, name: &str) {
    let v: serde_json::Value = serde_json::from_slice(&d.data).expect("a JSON body");
    let session = &v["session"];
    let first = if session.is_array() {
        &session[0]
    } else {
        session
    };
    let (id, ty, ts, reference) = (
        first["id"].as_str().unwrap(),
        v["event"]["type"].as_str().unwrap(),
        v["event"]["timestamp"].as_str().unwrap(),
        first["reference"].as_str().unwrap(),
    );
    let p = &d.properties;
    assert_eq!(*p.delivery_mode(), Some(2), "{name}: persistent");
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(
        p.message_id().as_ref().map(|s| s.to_string()),
        Some(format!("{id}:{ty}:{ts}")),
        "{name}"
    );
    assert_eq!(
        p.correlation_id().as_ref().map(|s| s.as_str()),
        Some(reference)
    );
    assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some(ty));
    assert_eq!(
        p.app_id().as_ref().map(|s| s.as_str()),
        Some("cellosign-bridge")
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ts_prop = p.timestamp().expect("timestamp");
    assert!(
        ts_prop <= now && ts_prop + 300 > now,
        "{name}: timestamp is the receive time"
    );
    assert_eq!(header(d, "x-event-type").as_deref(), Some(ty));
    assert_eq!(header(d, "x-session-id").as_deref(), Some(id));
    assert_eq!(header(d, "x-session-reference").as_deref(), Some(reference));
    let at = header(d, "x-received-at").expect("x-received-at");
    assert!(
        at.len() == 24 && at.ends_with('Z') && at.as_bytes()[19] == b'.',
        "{name}: {at}"
    );
    // SPEC 7: every message carries a trace (tests/trace.rs checks it in depth).
    let tp = header(d, "traceparent").expect("traceparent");
    assert!(tp.len() == 55 && tp.starts_with("00-"), "{name}: {tp}");
}

/// Posts every vector of `cases` to `url`, checks each answer, and checks that each
/// accepted one reached the broker byte for byte, with its routing key and the
/// contract's properties (SPEC 3), and nothing else did.
pub async fn assert_vectors_end_to_end(app: &TestApp, url: &str, cases: Vec<serde_json::Value>) {
    let (_broker, mut consumer) = app.subscribe("#").await;
    let mut accepted = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let body = case["body"].as_str().unwrap();
        let answer = app
            .post_to(url, body.to_string(), case["content_type"].as_str())
            .await;
        assert_eq!(
            u64::from(answer.code),
            case["expect_http"].as_u64().unwrap(),
            "{name}: {answer:?}"
        );
        assert_eq!(
            answer.status,
            case["expect_status"].as_str().unwrap(),
            "{name}"
        );
        if answer.code == 200 {
            accepted.push(case);
        }
    }
    let got = take(&mut consumer, accepted.len(), Duration::from_secs(20)).await;
    // Order is promised per reference, not across references: pair each delivery
    // with the oldest unmatched accepted case of its routing key.
    let mut pending: Vec<Option<&serde_json::Value>> = accepted.iter().map(Some).collect();
    for d in &got {
        let slot = pending
            .iter_mut()
            .find(|c| c.is_some_and(|c| c["routing_key"].as_str() == Some(d.routing_key.as_str())))
            .unwrap_or_else(|| panic!("unexpected delivery for {}", d.routing_key));
        let case = slot.take().unwrap();
        let name = case["name"].as_str().unwrap();
        let body = case["body"].as_str().unwrap();
        assert_eq!(d.data, body.as_bytes(), "{name}: body byte for byte");
        assert_eq!(
            d.routing_key.as_str(),
            case["routing_key"].as_str().unwrap(),
            "{name}"
        );
        assert_contract_properties(d, name);
    }
    assert_quiet(&mut consumer, Duration::from_millis(300)).await;
}

/// The `message_id` property of a delivery (`""` if it has none).
pub fn id_of(d: &Delivery) -> String {
    d.properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default()
}

/// The message ids of `deliveries`, in order.
pub fn message_ids(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|m| m.to_string()))
        .collect()
}

/// The message ids in the order of their first delivery: a later copy of an id (a
/// duplicate, allowed after a failure) is left out.
pub fn first_copies(ids: &[String]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.iter().filter(|id| seen.insert(*id)).cloned().collect()
}

/// Asserts order per reference (SPEC 3): for each routing key, the first copies of
/// the ids delivered with it (`delivered`: (routing key, message id) in delivery
/// order) are exactly the ids accepted with it (`accepted`: (routing key, message id)
/// in acceptance order), in that order. Keys are compared apart: order across
/// references is not promised.
pub fn assert_first_copies_in_order_per_key(
    accepted: &[(String, String)],
    delivered: &[(String, String)],
) {
    let mut keys: Vec<&str> = accepted.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    for key in keys {
        let of_key = |pairs: &[(String, String)]| -> Vec<String> {
            pairs
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, id)| id.clone())
                .collect()
        };
        let expected = of_key(accepted);
        let ids = of_key(delivered);
        let firsts = first_copies(&ids);
        if let Some(at) =
            (0..expected.len().max(firsts.len())).find(|&i| expected.get(i) != firsts.get(i))
        {
            panic!(
                "reference {key}: first copies differ from the acceptance order at position {at}: \
                 got {:?} where {:?} was due ({} accepted, {} first copies, {} deliveries)",
                firsts.get(at),
                expected.get(at),
                expected.len(),
                firsts.len(),
                ids.len()
            );
        }
    }
}

/// Asserts that nothing more arrives for `quiet`.
pub async fn assert_quiet(consumer: &mut Consumer, quiet: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(quiet, consumer.next()).await {
        panic!("unexpected message: {:?}", d.map(|d| d.routing_key));
    }
}

/// A valid event body.
pub fn event_body(
    event_type: &str,
    session_id: &str,
    reference: &str,
    transaction_number: u64,
) -> String {
    serde_json::json!({
        "event": { "type": event_type, "timestamp": format!("2025-01-26T08:49:33.{transaction_number:06}") },
        "session": {
            "id": session_id, "reference": reference, "process_id": "p-1", "process_number": 51,
            "transaction_number": transaction_number,
            "recipient": { "id": 1, "name": "client" }, "labels": { "CUSTOMER_TAG": "CUSTOMER_VALUE" }
        }
    })
    .to_string()
}

/// The message id the bridge gives an [`event_body`] (SPEC 3).
pub fn message_id(event_type: &str, session_id: &str, transaction_number: u64) -> String {
    format!("{session_id}:{event_type}:2025-01-26T08:49:33.{transaction_number:06}")
}

/// Test vectors shipped with the repo (a copy of the shared contract's).
pub fn vectors() -> Vec<serde_json::Value> {
    parse_vectors(include_str!("../vectors/cases.jsonl"))
}

/// The archive webhook's vectors (SPEC 9), a copy of the shared contract's.
pub fn archive_vectors() -> Vec<serde_json::Value> {
    parse_vectors(include_str!("../vectors/archive_cases.jsonl"))
}

/// One vector per non-empty line.
fn parse_vectors(jsonl: &str) -> Vec<serde_json::Value> {
    jsonl
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("vector line"))
        .collect()
}
