//! `kubectl twinsite`: status and actions of protected VMs (see `twinsite::plugin`).

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = twinsite::plugin::Cli::parse();
    match twinsite::plugin::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
