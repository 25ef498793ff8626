//! The dev agent: a single-node, in-memory server that speaks the subset of Consul's HTTP API that
//! leader election needs (see ../shared/consul-api.md). Not implemented yet.

use std::process::ExitCode;

use crate::cli::DevAgentArgs;

pub fn main(_args: DevAgentArgs) -> ExitCode {
    eprintln!("consul-leader: `dev-agent` is not implemented yet");
    ExitCode::from(crate::exit::INTERNAL)
}
