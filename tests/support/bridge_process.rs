//! The real bridge binary as a child process, for tests that signal it, kill it,
//! limit its descriptors, measure its CPU or read its exit code.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `cellosign-bridge serve`; killed when dropped.
pub struct BridgeProcess {
    pub child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<Mutex<String>>,
}

impl BridgeProcess {
    /// Starts `serve` on port-0 listeners against `amqp_url`; `env` adds or overrides
    /// settings (and may set `CELLOSIGN_BRIDGE_FAULTS`).
    pub fn start(
        spool: &Path,
        amqp_url: &str,
        exchange: &str,
        token: &str,
        env: &[(&str, &str)],
    ) -> BridgeProcess {
        Self::start_with(spool, amqp_url, exchange, token, env, |_| {})
    }

    /// Like [`BridgeProcess::start`], with a hook on the command (e.g. to wrap it in `prlimit`).
    pub fn start_with(
        spool: &Path,
        amqp_url: &str,
        exchange: &str,
        token: &str,
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> BridgeProcess {
        Self::start_configured(spool, amqp_url, exchange, token, env, "", adjust)
    }

    /// Like [`BridgeProcess::start_with`], with `config` (TOML) added to the test's
    /// config file, for settings the environment cannot give (e.g. `[[auth.clients]]`).
    pub fn start_configured(
        spool: &Path,
        amqp_url: &str,
        exchange: &str,
        token: &str,
        env: &[(&str, &str)],
        config: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> BridgeProcess {
        // The shipped config declares `cellosign.sessions`; a test declares its own queues,
        // so nothing it posts lands in a queue that real consumers read.
        let overrides = spool.join("bridge-test.toml");
        std::fs::write(&overrides, format!("[amqp]\nqueues = []\n{config}")).expect("test config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&overrides)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("BRIDGE_HTTP__LISTEN", "127.0.0.1:0")
            .env("BRIDGE_ADMIN__LISTEN", "127.0.0.1:0")
            .env("BRIDGE_SPOOL__DIR", spool)
            .env("BRIDGE_AMQP__URLS", amqp_url)
            .env("BRIDGE_AMQP__EXCHANGE", exchange)
            .env("BRIDGE_AUTH__TOKENS", token)
            .env("BRIDGE_LOG__FORMAT", "json")
            .env("BRIDGE_LOG__LEVEL", "info")
            .env("BRIDGE_SHUTDOWN__GRACE_MS", "5000")
            .env_remove("RUST_LOG")
            .env_remove("CELLOSIGN_BRIDGE_FAULTS")
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("start the bridge");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v["message"] == "cellosign-bridge serving"
                {
                    let _ = tx.send((
                        v["http"].as_str().map(String::from),
                        v["admin"].as_str().map(String::from),
                    ));
                }
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let Ok((http, admin)) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "bridge did not start within 30 s; its log:\n{}",
                log.lock().unwrap_or_else(|p| p.into_inner())
            );
        };
        BridgeProcess {
            child,
            http: http.unwrap().parse().unwrap(),
            admin: admin.unwrap().parse().unwrap(),
            log,
        }
    }

    /// The webhook URL with the token in the query.
    pub fn url(&self, token: &str) -> String {
        format!("http://{}/webhooks/cellosign?token={token}", self.http)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the bridge logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the bridge.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit, at most `within`; `None` if it is still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU time (user + system) the process has used so far, from /proc.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.pid())
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) of process `pid`, from `/proc/<pid>/stat`.
pub fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // The kernel reports in clock ticks; 100 per second on Linux.
    Duration::from_millis(ticks * 10)
}

/// A field of `/proc/<pid>/status` in MiB (`VmHWM`, `VmRSS`, `RssAnon`, ...); 0 if
/// unreadable. For the benchmarks' memory figures.
pub fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resets the peak RSS of `pid` to its current RSS (`clear_refs` 5), and returns that.
pub fn reset_peak(pid: u32) -> f64 {
    if let Err(e) = std::fs::write(format!("/proc/{pid}/clear_refs"), "5") {
        println!("(cannot reset the peak RSS: {e}; figures include earlier peaks)");
    }
    status_mib(pid, "VmRSS")
}
