use clap::Parser;
use portcullis::cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let code = match &cli.command {
        Command::Proxy(args) => {
            portcullis::logging::init(&args.log_level, &args.log_format);
            portcullis::proxy_main::run(args).map_err(anyhow::Error::from)
        }
        Command::Management(args) => {
            portcullis::logging::init("info", "text");
            portcullis::management_cli::run(args).map_err(anyhow::Error::from)
        }
        Command::Agent(args) => {
            portcullis::logging::init(&args.log_level, "text");
            portcullis::agent::run(args).map_err(anyhow::Error::from)
        }
        Command::Up(args) => {
            portcullis::logging::init("info", "text");
            portcullis::up::run(args).map_err(anyhow::Error::from)
        }
    };
    match code {
        Ok(0) => std::process::ExitCode::SUCCESS,
        Ok(c) => std::process::ExitCode::from(u8::try_from(c).unwrap_or(1)),
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("portcullis: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
