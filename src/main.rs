use clap::{Parser, Subcommand};

/// twinsite: disaster recovery for virtual machines, driven by Kubernetes manifests.
#[derive(Parser)]
#[command(name = "twinsite", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller that reconciles Site, ReplicatedVM and FailoverPlan objects.
    Controller(twinsite::controller::ControllerArgs),
    /// Run a site agent: it holds a site's VMs and replicates them to a peer site.
    Agent(twinsite::agent::AgentArgs),
    /// Print the three CustomResourceDefinitions as YAML.
    Crds,
    /// Run everything on this machine: API server, two site agents, controller, examples applied.
    Local(twinsite::local::LocalArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    twinsite::init_crypto();
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => print!("{}", twinsite::api::crds_yaml()?),
        Command::Local(args) => twinsite::local::run(args).await?,
        Command::Controller(args) => twinsite::controller::run(args).await?,
        Command::Agent(args) => twinsite::agent::run(args).await?,
    }
    Ok(())
}
