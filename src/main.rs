//! `consul-leader`: parse the command line, hand over to the subcommand, map its outcome to an exit
//! code. Each subcommand builds the runtime it needs.

mod app;
mod cli;
mod clock;
mod config;
mod consul;
mod dev_agent;
mod docs;
mod election;
mod etcd;
mod exit;
mod lock;
mod logging;
mod notify;
mod status;
mod supervisor;
mod wire;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::parse();
    match cli.command {
        cli::Command::Run(args) => app::main(args),
        cli::Command::Status(args) => status::main(*args),
        cli::Command::DevAgent(args) => dev_agent::main(args),
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
