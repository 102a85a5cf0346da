//! The command line: `serve` (the default), `check-config`, `tail`, `spool stats`.
//!
//! This module only declares the commands, so `main` can parse, load settings
//! and dispatch without knowing how a command works. The operator commands
//! that do more than print settings live beside it, one file each:
//!
//! * [`tail`]: a throw-away consumer printing what flows through the exchange;
//!   [`replay`]: the same for a stream queue, read from a point of its history.
//! * [`spool_stats`]: the spool's depth, from the file or from the running bridge,
//!   which it asks through [`admin_client`].
//!
//! The `///` comments on the clap types below are the `--help` text operators
//! read: change them as user-facing text.

pub mod admin_client;
pub mod replay;
pub mod spool_drain;
pub mod spool_stats;
pub mod tail;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use replay::StreamOffset;

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
    /// Print events flowing through the exchange as JSON lines (a throw-away consumer),
    /// or with --queue replay a stream queue from a point of its history.
    Tail {
        /// Binding key to watch, e.g. a session reference; `#` is everything.
        #[arg(long, default_value = "#", conflicts_with = "queue")]
        binding: String,
        /// Read this stream queue (an [[amqp.queues]] entry of type "stream") instead of
        /// binding a queue of tail's own; each line gains the message's "offset".
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
        /// Where in the stream to start: first, last, next (the default), an offset
        /// (as printed), or an RFC 3339 time (to the second: the first chunk written
        /// then or later). Needs --queue.
        #[arg(long, value_name = "POINT", requires = "queue")]
        from: Option<StreamOffset>,
        /// Exit 0 once no message has arrived for this many seconds (default: run until Ctrl-C).
        #[arg(long, value_name = "SECONDS")]
        until_idle: Option<u64>,
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
            matches!(&tail, Ok(Cli { command: Some(Command::Tail { binding, queue: None, from: None, until_idle: None }), .. }) if binding == "#"),
            "{tail:?}"
        );
    }

    fn tail(args: &[&str]) -> Result<Command, clap::Error> {
        let argv = ["cellosign-bridge", "tail"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| cli.command.unwrap_or(Command::Serve))
    }

    #[test]
    fn tail_reads_a_stream_from_a_point_and_stops_when_idle() {
        let replay = tail(&["--queue", "s", "--from", "42", "--until-idle", "3"]);
        assert!(
            matches!(&replay, Ok(Command::Tail { queue: Some(q), from: Some(StreamOffset::Offset(42)), until_idle: Some(3), .. }) if q == "s"),
            "{replay:?}"
        );
        let next = tail(&["--queue", "s"]);
        assert!(
            matches!(
                &next,
                Ok(Command::Tail {
                    queue: Some(_),
                    from: None,
                    ..
                })
            ),
            "{next:?}"
        );
    }

    #[test]
    fn from_without_queue_and_queue_with_binding_are_usage_errors() {
        for args in [
            &["--from", "first"][..],
            &["--queue", "s", "--binding", "r1"],
            &["--queue", "s", "--from", "soon"],
        ] {
            let err = tail(args).expect_err("refused");
            assert!(err.use_stderr(), "{args:?}: {err}");
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
    }
}
