//! `hcblk`: the node daemon and the volume CLI (docs/cli.md).

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// A build identity given at build time (a commit, a package release: one word), shown as
/// `VERSION+ID` by `hcblk --version` and in the daemon's ready line, so that an
/// upgrade can be told from the binary it replaced. Read here, not in the library: changing it
/// rebuilds only this file.
const BUILD_ID: Option<&str> = option_env!("HCBLK_BUILD_ID");

fn main() -> ExitCode {
    let version = backend::control::cli::version(env!("CARGO_PKG_VERSION"), BUILD_ID);
    let cli = backend::control::cli::parse(version);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).init();
    match backend::control::cli::run(cli, version) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, `a: b: c`.
            eprintln!("error: {:#}", anyhow::Error::from(error));
            ExitCode::FAILURE
        }
    }
}
