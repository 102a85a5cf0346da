//! The command line: `serve` (the default), `check-config`, `tail`, `spool stats`.
//!
//! This module only declares the commands, so `main` can parse, load settings
//! and dispatch without knowing how a command works. The operator commands
//! that do more than print settings live beside it, one file each:
//!
//! * [`tail`]: a throw-away consumer printing what flows through the exchange.
//! * [`spool_stats`]: the spool's depth, from the file or from the running bridge,
//!   which it asks through [`admin_client`].
//!
//! The `///` comments on the clap types below are the `--help` text operators
//! read: change them as user-facing text.

pub mod admin_client;
pub mod spool_drain;
pub mod spool_stats;
pub mod tail;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// cellosign-bridge: Cellosign webhooks to RabbitMQ, durable and fast.
#[derive(Debug, Parser)]
#[command(name = "cellosign-bridge", version, about)]
pub struct Cli {
    /// Extra configuration file, layered over config/default.toml and config/{BRIDGE_ENV}.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    // Optional so that a bare `cellosign-bridge` serves, as a service manager expects.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What to do.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the bridge (the default).
    Serve,
    /// Print the effective configuration, secrets redacted, and exit.
    CheckConfig,
    /// Print events flowing through the exchange as JSON lines (a throw-away consumer).
    Tail {
        /// Binding key to watch, e.g. a session reference; `#` is everything.
        #[arg(long, default_value = "#")]
        binding: String,
    },
    /// Inspect the spool.
    Spool {
        // A group, so that more spool commands can join `stats` without a new top-level name.
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

/// Spool subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum SpoolCommand {
    /// Depth, bytes and oldest event age. Reads the spool file when the bridge
    /// is stopped, or asks the running bridge's admin listener.
    Stats,
    /// Forward every event in the spool (same publishing path, same confirms), then
    /// exit 0 printing the count; exit 1, losing nothing, if the broker has not taken
    /// them all within `--timeout`. Refuses while a bridge holds the spool. For the
    /// spool of a replica that is gone (scale-down).
    Drain {
        /// How long to try, in seconds.
        #[arg(long = "timeout", value_name = "SECONDS", default_value_t = 300)]
        timeout_s: u64,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// clap checks the definitions (duplicate names, bad defaults) only when asked;
    /// this asks, so a broken definition fails here and not in an operator's hands.
    #[test]
    fn the_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    /// A bare invocation must keep serving: service units run the binary without a command.
    #[test]
    fn no_command_means_serve_and_tail_watches_everything_by_default() {
        let bare = Cli::try_parse_from(["cellosign-bridge"]);
        assert!(matches!(bare, Ok(Cli { command: None, .. })), "{bare:?}");
        let tail = Cli::try_parse_from(["cellosign-bridge", "tail"]);
        assert!(
            matches!(&tail, Ok(Cli { command: Some(Command::Tail { binding }), .. }) if binding == "#"),
            "{tail:?}"
        );
    }
}
