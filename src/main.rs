//! `consul-leader`: parse the command line, hand over to the subcommand, map its outcome to an exit
//! code. Each subcommand builds the runtime it needs.

mod cli;
mod dev_agent;
mod exit;
// Used by the `run` command, which is not wired up yet.
#[cfg_attr(not(test), expect(dead_code))]
mod supervisor;
mod wire;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Run(_) => not_implemented("run"),
        cli::Command::Status(_) => not_implemented("status"),
        cli::Command::DevAgent(args) => dev_agent::main(args),
    }
}

fn not_implemented(what: &str) -> ExitCode {
    eprintln!("consul-leader: `{what}` is not implemented yet");
    ExitCode::from(exit::INTERNAL)
}
