//! Log lines on stderr: one line per state change, human-readable by default, JSON on request.
//! `-q` keeps only errors, `-v` adds debug lines; `CONSUL_LEADER_LOG` (an `EnvFilter` directive
//! such as `consul_leader=trace`) overrides both for troubleshooting.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

pub fn init(quiet: bool, verbose: bool, format: LogFormat) {
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (false, true) => "debug",
        (false, false) => "info",
    };
    let filter = EnvFilter::try_from_env("CONSUL_LEADER_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("consul_leader={default}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.compact().try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
