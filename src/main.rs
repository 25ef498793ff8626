//! `consul-leader`: parse the command line, hand over to the subcommand, map its outcome to an exit
//! code. Each subcommand builds the runtime it needs.

mod app;
mod cgroup;
mod cli;
mod clock;
mod config;
mod consul;
mod demo;
mod dev_agent;
mod docs;
mod election;
mod etcd;
mod exit;
mod keeper;
mod lock;
mod logging;
mod notify;
mod proctree;
mod status;
mod supervisor;
mod wire;

use std::process::ExitCode;

fn main() -> ExitCode {
    // `run` re-executes this binary as the keeper of its command (see `keeper`), before any
    // command-line parsing.
    if let Some(code) = keeper::main_if_keeper() {
        return code;
    }
    let cli = cli::parse();
    match cli.command {
        cli::Command::Run(args) => app::main(args),
        cli::Command::Status(args) => status::main(*args),
        cli::Command::DevAgent(args) => dev_agent::main(args),
        cli::Command::Demo => demo::main(),
        cli::Command::GenerateDocs { out_dir } => match docs::write_all(&out_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "consul-leader: cannot write the docs into {}: {e}",
                    out_dir.display()
                );
                ExitCode::from(exit::INTERNAL)
            }
        },
    }
}
