#![allow(dead_code)]
//! Private, throw-away RabbitMQ nodes for integration tests.
//!
//! Tests that kill, restart, partition or alarm a broker must never touch the shared
//! RabbitMQ on 127.0.0.1:5672 (node `rabbit@localhost`). Every [`RabbitNode`] here is a
//! separate Erlang VM started by the test itself: its own temp dir (mnesia, logs, home
//! with an Erlang cookie), its own free AMQP and distribution ports, its own node name
//! (`csb-<pid>-<n>@localhost`) and an environment cleared of inherited `RABBITMQ_*` /
//! `ERL_*` variables. The child pid is the Erlang VM itself (`RUNNING_UNDER_SYSTEMD=true`
//! makes the start script `exec` it), so [`RabbitNode::kill`] is a real crash.
//!
//! Cleanup: dropping a [`RabbitNode`] (also while a test panics and unwinds) SIGKILLs the
//! VM by pid, reaps it and removes the temp dir. Nothing can clean up after a test binary
//! that is itself SIGKILLed or built with `panic = "abort"`; such leftovers are named
//! `csb-<test pid>-<n>@localhost`. Do not keep a node in a `static`: statics are never
//! dropped.
//!
//! Only `tokio`, `lapin` and `tempfile` are used, so this file can be copied as is into
//! `tests/support/`.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};

/// The message every caller sees when the broker is not installed, so that a missing
/// package is never mistaken for a passing (skipped) test.
pub const NOT_INSTALLED_MESSAGE: &str = "rabbitmq-server not found: install it with `apt-get install rabbitmq-server` (tests that need a private broker never pass by skipping)";

/// How long [`RabbitNodeBuilder::start`] and [`RabbitNode::restart`] wait for an AMQP
/// connection by default: a node boots in 5-15 s on two idle cores, several times that
/// while cargo compiles next to it.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Upper bound for one `rabbitmqctl` call, so that a wedged CLI cannot hang a test forever.
pub const RABBITMQCTL_TIMEOUT: Duration = Duration::from_secs(120);

/// Memory high watermark that [`RabbitNode::set_memory_alarm`]`(false)` restores: the
/// RabbitMQ default (these nodes are started without a custom watermark).
pub const DEFAULT_MEMORY_HIGH_WATERMARK: &str = "0.4";

/// Lines of the node's output quoted in start errors, enough to see the boot failure.
const LOG_TAIL_LINES: usize = 60;

/// Ports the harness must never hand out: the shared broker's AMQP, distribution and
/// epmd ports, and the range the `rabbitmqctl` CLI binds for its own distribution.
const RESERVED_PORTS: &[std::ops::RangeInclusive<u16>] =
    &[5672..=5672, 25672..=25672, 4369..=4369, 35672..=35682];

/// `RABBITMQ_X` settings that RabbitMQ also reads as plain `X` when the prefixed one is
/// unset; they are removed from the child's environment so a stray `NODENAME` or
/// `CONFIG_FILE` in CI cannot leak into a private node.
const UNPREFIXED_RABBIT_VARS: &[&str] = &[
    "ALLOW_INPUT",
    "ADVANCED_CONFIG_FILE",
    "BASE",
    "CONF_ENV_FILE",
    "CONFIG_FILE",
    "CONFIG_FILES",
    "DBG",
    "DEFAULT_PASS",
    "DEFAULT_USER",
    "DEFAULT_VHOST",
    "DIST_PORT",
    "ENABLED_PLUGINS",
    "ENABLED_PLUGINS_FILE",
    "ERLANG_COOKIE",
    "FEATURE_FLAGS",
    "FEATURE_FLAGS_FILE",
    "KEEP_PID_FILE_ON_EXIT",
    "LOG",
    "LOG_BASE",
    "LOG_FF_REGISTRY",
    "LOGS",
    "MNESIA_BASE",
    "MNESIA_DIR",
    "MOTD_FILE",
    "NODE_IP_ADDRESS",
    "NODE_PORT",
    "NODENAME",
    "PID_FILE",
    "PLUGINS_DIR",
    "PLUGINS_EXPAND_DIR",
    "PRODUCT_NAME",
    "PRODUCT_VERSION",
    "QUORUM_DIR",
    "STREAM_DIR",
    "UPGRADE_LOG",
    "USE_LONGNAME",
    "NOTIFY_SOCKET",
];

static NODE_COUNTER: AtomicU32 = AtomicU32::new(0);
static HANDED_OUT_PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Everything that can go wrong with a private node; `Display` always says which node
/// and, for boot failures, quotes the node's own output.
#[derive(Debug)]
pub enum NodeError {
    /// `rabbitmq-server` is not installed; displays [`NOT_INSTALLED_MESSAGE`].
    NotInstalled,
    /// A file or process operation of the harness failed.
    Io {
        /// What the harness was doing.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// The node exited or did not accept AMQP connections in time.
    StartFailed {
        /// The node's Erlang name.
        node: String,
        /// Why the harness gave up.
        reason: String,
        /// The last lines of the node's stdout/stderr.
        log_tail: String,
    },
    /// A condition the harness waits for (e.g. a quorum leader) did not come true in time.
    Timeout {
        /// The node's Erlang name.
        node: String,
        /// What was awaited.
        what: String,
    },
    /// A `rabbitmqctl` call exited non-zero or timed out.
    Ctl {
        /// The node's Erlang name.
        node: String,
        /// The arguments after `-n <node>`.
        args: Vec<String>,
        /// Exit status, `None` on timeout.
        status: Option<ExitStatus>,
        /// Captured stdout.
        stdout: String,
        /// Captured stderr.
        stderr: String,
    },
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeError::NotInstalled => f.write_str(NOT_INSTALLED_MESSAGE),
            NodeError::Io { what, source } => write!(f, "{what}: {source}"),
            NodeError::StartFailed {
                node,
                reason,
                log_tail,
            } => write!(
                f,
                "private RabbitMQ node {node} failed to start: {reason}\n--- last lines of its output ---\n{log_tail}"
            ),
            NodeError::Timeout { node, what } => write!(f, "{node}: gave up waiting for {what}"),
            NodeError::Ctl {
                node,
                args,
                status,
                stdout,
                stderr,
            } => {
                let status = match status {
                    Some(s) => s.to_string(),
                    None => format!("timed out after {RABBITMQCTL_TIMEOUT:?}"),
                };
                write!(
                    f,
                    "rabbitmqctl -n {node} {} failed ({status})\nstdout: {stdout}\nstderr: {stderr}",
                    args.join(" ")
                )
            }
        }
    }
}

impl std::error::Error for NodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NodeError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// The two scripts a node needs. Debian's `/usr/sbin/rabbitmq-server` and
/// `/usr/sbin/rabbitmqctl` are wrappers that `su` to the `rabbitmq` user when run as
/// root: that resets `HOME` (wrong cookie), cannot write a root-owned temp dir and makes
/// the child pid `su` instead of the VM. The real scripts live in
/// `/usr/lib/rabbitmq/bin`, which is what is used when it exists.
#[derive(Clone, Debug)]
struct Binaries {
    server: PathBuf,
    ctl: PathBuf,
}

fn find_binaries() -> Result<Binaries, NodeError> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(PathBuf::from("/usr/sbin"));
    let found = dirs
        .iter()
        .map(|d| d.join("rabbitmq-server"))
        .find(|p| p.is_file())
        .ok_or(NodeError::NotInstalled)?;
    let debian_lib = Path::new("/usr/lib/rabbitmq/bin");
    let dir = if debian_lib.join("rabbitmq-server").is_file() {
        debian_lib.to_path_buf()
    } else {
        let real = fs::canonicalize(&found).unwrap_or(found);
        real.parent()
            .map(Path::to_path_buf)
            .ok_or(NodeError::NotInstalled)?
    };
    let server = dir.join("rabbitmq-server");
    let ctl = dir.join("rabbitmqctl");
    if !ctl.is_file() {
        return Err(NodeError::NotInstalled);
    }
    Ok(Binaries { server, ctl })
}

fn is_reserved(port: u16) -> bool {
    RESERVED_PORTS.iter().any(|r| r.contains(&port))
}

/// Picks `n` distinct free loopback ports by binding port 0, holding every listener
/// until all are chosen, and never handing the same port out twice in one process.
fn free_ports(n: usize) -> Result<Vec<u16>, NodeError> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let mut guard = HANDED_OUT_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = guard.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        if ports.len() == n {
            break;
        }
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("bind 127.0.0.1:0"))?;
        let port = listener
            .local_addr()
            .map_err(io_err("read local port"))?
            .port();
        if !is_reserved(port) && !handed_out.contains(&port) {
            ports.push(port);
        }
        held.push(listener);
    }
    if ports.len() != n {
        return Err(NodeError::Io {
            what: "pick free ports".into(),
            source: io::Error::other("no usable free port found"),
        });
    }
    handed_out.extend(ports.iter().copied());
    Ok(ports)
}

/// A cookie nobody else uses, so a private node can never talk to the shared one.
fn random_cookie() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut out = String::new();
    while out.len() < 32 {
        let mut h = RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        let mut v = h.finish();
        for _ in 0..8 {
            out.push((b'A' + (v % 26) as u8) as char);
            v /= 26;
        }
    }
    out
}

fn tail_of(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Configures a private node before it starts; obtained from [`RabbitNode::builder`].
/// Clone it to start several alike nodes (that is how [`RabbitCluster`] shares a cookie).
#[derive(Clone, Debug)]
pub struct RabbitNodeBuilder {
    plugins: Vec<String>,
    cookie: Option<String>,
    start_timeout: Duration,
    config_lines: Vec<String>,
}

impl Default for RabbitNodeBuilder {
    fn default() -> Self {
        Self {
            plugins: Vec::new(),
            cookie: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            config_lines: Vec::new(),
        }
    }
}

impl RabbitNodeBuilder {
    /// Plugins written to the node's `enabled_plugins` file, so they are running before
    /// the AMQP listener opens (e.g. `rabbitmq_consistent_hash_exchange`) and the shared
    /// broker never needs them.
    pub fn plugins(mut self, plugins: &[&str]) -> Self {
        self.plugins = plugins.iter().map(|p| p.to_string()).collect();
        self
    }

    /// Erlang cookie for the node; nodes meant to form a cluster need the same one.
    /// Default: a fresh random cookie per node.
    pub fn cookie(mut self, cookie: &str) -> Self {
        self.cookie = Some(cookie.to_string());
        self
    }

    /// How long start and restart wait for an AMQP connection before failing with the
    /// node's log tail. Default: [`DEFAULT_START_TIMEOUT`].
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Appends one `rabbitmq.conf` line (e.g. `heartbeat = 5`), for tests that need a
    /// broker setting; `loopback_users = none` is always there.
    pub fn config_line(mut self, line: &str) -> Self {
        self.config_lines.push(line.to_string());
        self
    }

    /// Starts the node and waits until an AMQP connection succeeds. Returns
    /// [`NodeError::NotInstalled`] when RabbitMQ is missing, so the caller decides to
    /// panic (tests) rather than skip.
    pub async fn start(self) -> Result<RabbitNode, NodeError> {
        let mut node = self.launch()?;
        node.wait_ready().await?;
        Ok(node)
    }

    /// Prepares the temp dir and spawns the VM without waiting for it, so a cluster can
    /// boot its nodes in parallel.
    fn launch(self) -> Result<RabbitNode, NodeError> {
        let bins = find_binaries()?;
        let n = NODE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("csb-{}-{}@localhost", std::process::id(), n);
        let dir = tempfile::Builder::new()
            .prefix("csb-rabbit-")
            .tempdir()
            .map_err(io_err("create temp dir"))?;
        let root = dir.path();
        for sub in ["mnesia", "log", "home", "conf.d"] {
            fs::create_dir_all(root.join(sub)).map_err(io_err(format!("create {sub}/")))?;
        }
        let cookie = self.cookie.clone().unwrap_or_else(random_cookie);
        let cookie_path = root.join("home/.erlang.cookie");
        fs::write(&cookie_path, &cookie).map_err(io_err("write .erlang.cookie"))?;
        fs::set_permissions(&cookie_path, fs::Permissions::from_mode(0o400))
            .map_err(io_err("chmod 0400 .erlang.cookie"))?;
        fs::write(
            root.join("enabled_plugins"),
            format!("[{}].\n", self.plugins.join(",")),
        )
        .map_err(io_err("write enabled_plugins"))?;
        let mut conf = String::from("loopback_users = none\n");
        for line in &self.config_lines {
            conf.push_str(line);
            conf.push('\n');
        }
        fs::write(root.join("rabbitmq.conf"), conf).map_err(io_err("write rabbitmq.conf"))?;
        // An empty env file instead of /etc/rabbitmq/rabbitmq-env.conf, which names the
        // shared node.
        fs::write(root.join("rabbitmq-env.conf"), "").map_err(io_err("write env file"))?;

        let ports = free_ports(2)?;
        let mut node = RabbitNode {
            dir,
            bins,
            name,
            cookie,
            amqp_port: ports[0],
            dist_port: ports[1],
            plugins: self.plugins,
            start_timeout: self.start_timeout,
            child: None,
            starts: 0,
        };
        node.spawn()?;
        Ok(node)
    }
}

/// One private RabbitMQ node owned by a test: started by [`RabbitNode::start`] or
/// [`RabbitNode::builder`], killed and its temp dir removed when dropped.
#[derive(Debug)]
pub struct RabbitNode {
    dir: tempfile::TempDir,
    bins: Binaries,
    name: String,
    cookie: String,
    amqp_port: u16,
    dist_port: u16,
    plugins: Vec<String>,
    start_timeout: Duration,
    child: Option<Child>,
    starts: u32,
}

impl RabbitNode {
    /// Options (plugins, cookie, timeout, config) for a node that is not started yet.
    pub fn builder() -> RabbitNodeBuilder {
        RabbitNodeBuilder::default()
    }

    /// Starts a node with defaults (no plugins, random cookie) and waits for AMQP.
    pub async fn start() -> Result<RabbitNode, NodeError> {
        Self::builder().start().await
    }

    /// AMQP URL with the default `guest` user and vhost `/`, ready for
    /// `lapin::Connection::connect`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The node's AMQP port on 127.0.0.1 (stable across [`RabbitNode::restart`]); point a
    /// `TcpProxy` at it to cut the network.
    pub fn port(&self) -> u16 {
        self.amqp_port
    }

    /// The node's Erlang distribution port (stable across restarts).
    pub fn dist_port(&self) -> u16 {
        self.dist_port
    }

    /// Erlang node name (`csb-<pid>-<n>@localhost`), e.g. for `join_cluster`.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The node's Erlang cookie, for starting further nodes that must talk to it.
    pub fn cookie(&self) -> &str {
        &self.cookie
    }

    /// Plugins enabled at start.
    pub fn plugins(&self) -> &[String] {
        &self.plugins
    }

    /// OS pid of the Erlang VM while it runs, to tell it apart from the shared node.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temp dir holding mnesia/, log/, home/ and the node's output file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// File receiving the VM's stdout and stderr (RabbitMQ logs there too), across
    /// restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("node-output.log")
    }

    /// The last `lines` lines of the node's output, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_of(&self.log_path(), lines)
    }

    /// Whether the VM is still alive (reaps it if it has exited on its own).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// Simulates a crash: SIGKILL to the VM's pid, then reaps it, so its ports are closed
    /// when this returns. Data on disk stays for [`RabbitNode::restart`]. No-op if the
    /// node is not running.
    pub fn kill(&mut self) -> Result<(), NodeError> {
        if let Some(mut child) = self.child.take() {
            // Child::kill sends SIGKILL to this pid only; it errors only if the child was
            // already reaped, which cannot happen while we hold it.
            let _ = child.kill();
            child
                .wait()
                .map_err(io_err(format!("reap {}", self.name)))?;
        }
        Ok(())
    }

    /// Stops the node gracefully (`rabbitmqctl stop`): clients get a connection.close
    /// with 320 CONNECTION_FORCED instead of a dropped socket. Falls back to SIGKILL.
    pub async fn stop(&mut self) -> Result<(), NodeError> {
        if !self.is_running() {
            return Ok(());
        }
        let result = self.rabbitmqctl_ok(&["stop"]).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.is_running() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.kill()?;
        result.map(|_| ())
    }

    /// Starts the node again on the same mnesia dir, ports, name and cookie (durable
    /// queues and persistent messages survive), killing it first if it still runs; waits
    /// for AMQP like [`RabbitNode::start`].
    pub async fn restart(&mut self) -> Result<(), NodeError> {
        self.kill()?;
        self.spawn()?;
        self.wait_ready().await
    }

    /// Runs `rabbitmqctl -n <node> <args>` with the node's environment (its cookie), and
    /// returns the output whatever the exit status; the CLI is killed if it outlives
    /// [`RABBITMQCTL_TIMEOUT`].
    pub async fn rabbitmqctl(&self, args: &[&str]) -> Result<Output, NodeError> {
        let mut cmd = tokio::process::Command::new(&self.bins.ctl);
        for key in self.vars_to_remove() {
            cmd.env_remove(key);
        }
        for (key, value) in self.vars() {
            cmd.env(key, value);
        }
        cmd.current_dir(self.dir.path())
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match tokio::time::timeout(RABBITMQCTL_TIMEOUT, cmd.output()).await {
            Ok(result) => result.map_err(io_err(format!("run rabbitmqctl {}", args.join(" ")))),
            Err(_) => Err(NodeError::Ctl {
                node: self.name.clone(),
                args: args.iter().map(|a| a.to_string()).collect(),
                status: None,
                stdout: String::new(),
                stderr: String::new(),
            }),
        }
    }

    /// Like [`RabbitNode::rabbitmqctl`], but a non-zero exit is an error; returns stdout.
    pub async fn rabbitmqctl_ok(&self, args: &[&str]) -> Result<String, NodeError> {
        let out = self.rabbitmqctl(args).await?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(NodeError::Ctl {
                node: self.name.clone(),
                args: args.iter().map(|a| a.to_string()).collect(),
                status: Some(out.status),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// Raises (`true`: watermark 0, every publishing connection gets blocked) or clears
    /// (`false`: back to [`DEFAULT_MEMORY_HIGH_WATERMARK`]) a memory alarm, to test how
    /// the bridge copes with `connection.blocked`.
    pub async fn set_memory_alarm(&self, on: bool) -> Result<(), NodeError> {
        let watermark = if on {
            "0"
        } else {
            DEFAULT_MEMORY_HIGH_WATERMARK
        };
        self.rabbitmqctl_ok(&["set_vm_memory_high_watermark", watermark])
            .await
            .map(|_| ())
    }

    /// Waits until quorum queue `queue` (vhost `/`) has a leader that is online, and
    /// returns its node name. After a member is killed, a publish that arrives before the
    /// survivors elect a new leader is nacked; tests that need a clean confirm wait here.
    pub async fn wait_for_quorum_leader(
        &self,
        queue: &str,
        timeout: Duration,
    ) -> Result<String, NodeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .rabbitmqctl_ok(&[
                    "list_queues",
                    "-q",
                    "--no-table-headers",
                    "name",
                    "leader",
                    "online",
                ])
                .await;
            if let Ok(out) = &out {
                for line in out.lines() {
                    let cols: Vec<&str> = line.split('\t').collect();
                    if let [name, leader, online] = cols[..] {
                        let online: Vec<&str> = online
                            .trim_matches(|c| c == '[' || c == ']')
                            .split(',')
                            .map(str::trim)
                            .collect();
                        if name == queue && online.contains(&leader) {
                            return Ok(leader.to_string());
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Timeout {
                    node: self.name.clone(),
                    what: format!(
                        "an online leader for quorum queue {queue} within {timeout:?}; last listing: {out:?}"
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Connects a fresh lapin connection to this node, a shortcut for tests.
    pub async fn connect(&self) -> lapin::Result<Connection> {
        Connection::connect(&self.amqp_url(), ConnectionProperties::default()).await
    }

    fn vars(&self) -> Vec<(&'static str, OsString)> {
        let root = self.dir.path();
        let p = |rel: &str| root.join(rel).into_os_string();
        vec![
            ("HOME", p("home")),
            ("RABBITMQ_NODENAME", self.name.clone().into()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", self.amqp_port.to_string().into()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string().into()),
            ("RABBITMQ_MNESIA_BASE", p("mnesia")),
            ("RABBITMQ_LOG_BASE", p("log")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", p("enabled_plugins")),
            ("RABBITMQ_CONFIG_FILE", p("rabbitmq")),
            ("RABBITMQ_CONFIG_FILES", p("conf.d/*.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", p("advanced.config")),
            ("RABBITMQ_CONF_ENV_FILE", p("rabbitmq-env.conf")),
            // Distribution on loopback only, like the shared node.
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
            // Should this node have to start epmd, keep it on loopback.
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
            ("ERL_CRASH_DUMP", p("erl_crash.dump")),
            ("RUNNING_UNDER_SYSTEMD", "true".into()),
        ]
    }

    fn vars_to_remove(&self) -> Vec<OsString> {
        let mut keys: Vec<OsString> = std::env::vars_os()
            .map(|(k, _)| k)
            .filter(|k| {
                let k = k.to_string_lossy();
                k.starts_with("RABBITMQ_") || k.starts_with("ERL_")
            })
            .collect();
        keys.extend(UNPREFIXED_RABBIT_VARS.iter().map(OsString::from));
        keys
    }

    fn spawn(&mut self) -> Result<(), NodeError> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io_err("open node output log"))?;
        self.starts += 1;
        let _ = writeln!(
            log,
            "==== harness: start #{} of {} (amqp {}, dist {}) ====",
            self.starts, self.name, self.amqp_port, self.dist_port
        );
        let stderr = log.try_clone().map_err(io_err("clone log handle"))?;
        let mut cmd = Command::new(&self.bins.server);
        for key in self.vars_to_remove() {
            cmd.env_remove(key);
        }
        for (key, value) in self.vars() {
            cmd.env(key, value);
        }
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr));
        let child = cmd
            .spawn()
            .map_err(io_err(format!("spawn {}", self.bins.server.display())))?;
        self.child = Some(child);
        Ok(())
    }

    fn start_failed(&self, reason: String) -> NodeError {
        NodeError::StartFailed {
            node: self.name.clone(),
            reason,
            log_tail: self.log_tail(LOG_TAIL_LINES),
        }
    }

    /// Polls until an AMQP connection succeeds; on early exit or timeout, kills the VM and
    /// reports the tail of its output.
    async fn wait_ready(&mut self) -> Result<(), NodeError> {
        let started = Instant::now();
        let deadline = started + self.start_timeout;
        let url = self.amqp_url();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(self.start_failed(format!("the VM exited with {status}")));
            }
            if self.child.is_none() {
                return Err(self.start_failed("the VM is not running".into()));
            }
            let attempt = tokio::time::timeout(
                Duration::from_secs(5),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await;
            if let Ok(Ok(conn)) = attempt {
                let _ = conn.close(200, "harness readiness probe".into()).await;
                return Ok(());
            }
            if Instant::now() >= deadline {
                let err = self.start_failed(format!(
                    "no AMQP connection to 127.0.0.1:{} within {:?}",
                    self.amqp_port, self.start_timeout
                ));
                let _ = self.kill();
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for RabbitNode {
    /// Kills the VM by pid and reaps it; the `TempDir` field then removes the directory.
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A cluster of private nodes sharing one cookie, formed with `stop_app`,
/// `join_cluster <first node>`, `start_app`. Dropping it kills every node.
#[derive(Debug)]
pub struct RabbitCluster {
    nodes: Vec<RabbitNode>,
}

impl RabbitCluster {
    /// Starts and clusters `size` default nodes (e.g. 3 for quorum-queue failover tests).
    pub async fn start(size: usize) -> Result<RabbitCluster, NodeError> {
        Self::start_with(size, RabbitNode::builder()).await
    }

    /// Like [`RabbitCluster::start`], every node built from `builder` (plugins, timeout,
    /// config); the cookie is replaced by one shared by the whole cluster.
    pub async fn start_with(
        size: usize,
        builder: RabbitNodeBuilder,
    ) -> Result<RabbitCluster, NodeError> {
        assert!(size >= 1, "a cluster needs at least one node");
        let builder = builder.cookie(&random_cookie());
        // Spawn all VMs first so they boot in parallel, then wait for each.
        let mut nodes = Vec::with_capacity(size);
        for _ in 0..size {
            nodes.push(builder.clone().launch()?);
        }
        for node in &mut nodes {
            node.wait_ready().await?;
        }
        let first = nodes[0].node_name().to_string();
        for node in &mut nodes[1..] {
            node.rabbitmqctl_ok(&["stop_app"]).await?;
            node.rabbitmqctl_ok(&["join_cluster", &first]).await?;
            node.rabbitmqctl_ok(&["start_app"]).await?;
            node.wait_ready().await?;
        }
        Ok(RabbitCluster { nodes })
    }

    /// Node `index`, 0-based: `node(0)` is the one the others joined.
    pub fn node(&self, index: usize) -> &RabbitNode {
        &self.nodes[index]
    }

    /// Mutable node `index` (0-based), to kill or restart it.
    pub fn node_mut(&mut self, index: usize) -> &mut RabbitNode {
        &mut self.nodes[index]
    }

    /// All nodes, in join order.
    pub fn nodes(&self) -> &[RabbitNode] {
        &self.nodes
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false for a started cluster; here because clippy wants it next to `len`.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// AMQP URLs of all nodes in order, e.g. for a bridge configured with several
    /// brokers.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RabbitNode::amqp_url).collect()
    }
}
