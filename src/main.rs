//! The `cellosign-bridge` binary: parse the command line, load settings, dispatch.

use std::process::ExitCode;

use anyhow::Context;
use cellosign_bridge::{Application, OnHangup};
use cellosign_bridge::{Cli, Command, SpoolCommand, replay, spool_drain, spool_stats, tail};
use cellosign_bridge::{Settings, Sources, StreamOffset};
use clap::Parser;

/// jemalloc instead of glibc's malloc: under load glibc keeps an arena per busy
/// thread and hands little back, so the bridge stayed near its peak resident size
/// at rest; jemalloc, with [`MALLOC_CONF`], returns freed pages within a second or
/// two (README, "Memory").
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it starts: a background thread purges pages
/// unused for a second (dirty) and releases them at once after that (muzzy), so the
/// process shrinks back after a burst without an allocating thread paying for it.
/// `_RJEM_MALLOC_CONF` in the environment overrides them.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: ConfPtr =
    ConfPtr(c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr());

/// A C string pointer that jemalloc reads as `const char *`.
#[repr(transparent)]
struct ConfPtr(*const std::ffi::c_char);

// SAFETY: it points to a static, immutable C string literal.
unsafe impl Sync for ConfPtr {}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the cause chain; no backtrace for an operator's mistake.
            eprintln!("cellosign-bridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let sources = Sources::standard(cli.config.clone());
    let settings = Settings::load(&sources).context("invalid configuration")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let log = cellosign_bridge::init_telemetry(&settings.log);
            // Handlers first: a SIGTERM that comes while the bridge starts must stop it
            // cleanly, and a SIGHUP must not kill it with the default action.
            let stop = shutdown_signal();
            let reload = OnHangup::install(sources, log).context("cannot handle SIGHUP")?;
            let app = Application::build(settings).await.context("cannot start")?;
            let app = app.reload_on(reload);
            let result = app.run_until_stopped(stop).await;
            // Exit now: the runtime's drop would wait for blocking threads (a stalled
            // fsync), and the shutdown is promised within the grace period.
            std::process::exit(match result {
                Ok(()) => 0,
                Err(failure) => {
                    eprintln!("cellosign-bridge: {failure}");
                    1
                }
            });
        }
        Command::CheckConfig => print!("{}", settings.redacted_toml()),
        Command::Tail {
            binding,
            queue,
            from,
            until_idle,
        } => {
            let until_idle = until_idle.map(std::time::Duration::from_secs);
            match queue {
                Some(queue) => {
                    let from = from.unwrap_or(StreamOffset::Next);
                    replay(&settings, &queue, from, until_idle).await?;
                }
                None => tail(&settings, &binding, until_idle).await?,
            }
        }
        Command::Spool {
            command: SpoolCommand::Stats,
        } => println!("{}", spool_stats(&settings).await?),
        Command::Spool {
            command: SpoolCommand::Drain { timeout_s },
        } => {
            cellosign_bridge::init_telemetry(&settings.log);
            let report = spool_drain(&settings, std::time::Duration::from_secs(timeout_s)).await?;
            println!("{report}");
        }
    }
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future resolves on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            // Without signal handlers the process can only be killed; run until then.
            _ => std::future::pending().await,
        }
    }
}
