//! The operator commands run as the real binary, where a hang or a wrong exit
//! status is what an operator would see. No broker is needed: these tests stand
//! up their own fake one.

use std::process::Stdio;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::process::Command;

/// Longer than `tail`'s bounded connect (10 s) with room for a slow start, and
/// short enough that a hang fails the test instead of the whole run.
const BOUND: Duration = Duration::from_secs(20);

/// A broker address that accepts TCP and then never says a word, like a
/// black-holed or wedged broker: without a connect timeout, a client waits for ever.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a local port");
    let port = listener.local_addr().expect("local address").port();
    let task = tokio::spawn(async move {
        // Keep every accepted socket open: a close would be an answer.
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (port, task)
}

#[tokio::test]
async fn tail_gives_up_on_a_black_holed_broker_naming_it() {
    let (port, hole) = black_hole().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("tail.toml");
    std::fs::write(&config, "[amqp]\nqueues = []\n").expect("write config");
    let child = Command::new(env!("CARGO_BIN_EXE_cellosign-bridge"))
        .arg("tail")
        .arg("--config")
        .arg(&config)
        .env(
            "BRIDGE_AMQP__URLS",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        )
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("tail starts");
    let output = tokio::time::timeout(BOUND, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("tail still waiting on a silent broker after {BOUND:?}"))
        .expect("tail's output");
    hole.abort();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "tail exited 0: {stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{port}")),
        "the error names the broker: {stderr}"
    );
    assert!(
        !stderr.contains("guest:guest"),
        "the password is redacted: {stderr}"
    );
}
