//! `pagemesh-node`: parses the command line and runs the node (see `pagemesh_node::service`).

use std::process::ExitCode;

use pagemesh_node::config::Settings;
use pagemesh_node::service;

fn main() -> ExitCode {
    let settings = match Settings::load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", pagemesh_api::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        // Settings::load checked the filter.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&settings.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match service::run(settings) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            let chain = pagemesh_api::error_chain(&e);
            tracing::error!("{chain}");
            eprintln!("error: {chain}");
            ExitCode::from(1)
        }
    }
}
