//! `kubectl twinsite`: a kubectl plugin that shows the status of protected VMs and carries out
//! actions the way a user would by hand: each action is a merge patch of one spec field or
//! one annotation (printed, and with `--dry-run` only printed), so whatever it does can be
//! written in Git as well. Nothing here talks to the agents.
//!
//! - [`render`]: status as text (table, job trees, progress bars);
//! - [`actions`]: the patch of each action;
//! - [`wait`]: `--wait`, following the jobs an action started.

pub mod actions;
pub mod render;
pub mod wait;

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde_json::Value;

use crate::api::{FailoverPlan, Job, ReplicatedVM};
use render::Style;
use wait::{Follower, Observed};

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot reach the cluster: {0}")]
    Client(#[source] kube::Error),
    #[error("{0}")]
    Api(#[source] kube::Error),
    #[error(transparent)]
    Action(#[from] actions::ActionError),
    #[error("writing the output: {0}")]
    Output(#[source] std::io::Error),
    #[error("encoding the output: {0}")]
    Encode(String),
    #[error("job failed: {0} (kubectl twinsite status NAME shows its steps)")]
    JobFailed(String),
    #[error(
        "the jobs did not end within {0} s (they go on; kubectl twinsite status NAME follows them)"
    )]
    Timeout(u64),
}

#[derive(Parser, Debug)]
#[command(
    name = "kubectl-twinsite",
    bin_name = "kubectl twinsite",
    about = "Status and actions of twinsite's protected VMs (a kubectl plugin)",
    version
)]
pub struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Output format: text for people, json or yaml for scripts.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
    /// Colour: auto (when the output is a terminal and NO_COLOR is unset), always or never.
    #[arg(long, value_enum, default_value_t = Color::Auto, global = true)]
    pub color: Color,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
    Yaml,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

/// Options of every action.
#[derive(clap::Args, Debug, Clone)]
pub struct ActionOpts {
    /// Print the patch and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Follow the jobs the change starts until they end (exit 1 if one fails).
    #[arg(long)]
    pub wait: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// VMs with phase, active site, health, RPO and last drill; with NAME, its jobs and steps.
    Status {
        name: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Fails the VM over to SITE (spec.activeSite, spec.failover.type/recoveryPoint).
    Failover {
        name: String,
        #[arg(long = "to")]
        site: String,
        /// Unplanned: start from a recovery point without waiting for the source.
        #[arg(long)]
        unplanned: bool,
        /// Latest, LatestProcessed, LatestAppConsistent or rp-<id>.
        #[arg(long)]
        recovery_point: Option<String>,
        #[command(flatten)]
        opts: ActionOpts,
    },
    /// Planned failover back to the primary site.
    Failback {
        name: String,
        #[command(flatten)]
        opts: ActionOpts,
    },
    /// Commits a failover (annotation twinsite.io/commit; default: the newest failover job).
    Commit {
        name: String,
        job: Option<String>,
        #[command(flatten)]
        opts: ActionOpts,
    },
    /// Starts a drill: a test copy at the other site on an isolated network.
    Drill {
        name: String,
        /// Network of the drill copy (default: the spec's, `isolated` unless set).
        #[arg(long)]
        network: Option<String>,
        #[command(flatten)]
        opts: ActionOpts,
    },
    /// Cleans up the drill copy.
    DrillCleanup {
        name: String,
        #[command(flatten)]
        opts: ActionOpts,
    },
    /// Approves a manual-approval action of a FailoverPlan (annotation twinsite.io/approve).
    Approve {
        plan: String,
        /// GROUP/ACTION
        action: String,
        #[command(flatten)]
        opts: ActionOpts,
    },
    /// Runs a failed job again from its first step that did not succeed (twinsite.io/retry).
    Retry {
        name: String,
        job: String,
        #[command(flatten)]
        opts: ActionOpts,
    },
}

/// What an action prints with `-o json|yaml`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ActionReport<'a> {
    kind: &'a str,
    namespace: &'a str,
    name: &'a str,
    patch: &'a Value,
    dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    jobs: Option<Vec<Job>>,
}

fn encode<T: Serialize>(v: &T, output: Output) -> Result<String, PluginError> {
    match output {
        Output::Yaml => serde_yaml::to_string(v).map_err(|e| PluginError::Encode(e.to_string())),
        _ => serde_json::to_string_pretty(v)
            .map(|s| s + "\n")
            .map_err(|e| PluginError::Encode(e.to_string())),
    }
}

/// Runs the plugin; what it prints goes to stdout.
pub async fn run(cli: Cli) -> Result<(), PluginError> {
    let stdout = std::io::stdout();
    let tty = stdout.is_terminal();
    let style = Style {
        color: match cli.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => tty && std::env::var_os("NO_COLOR").is_none(),
        },
    };
    crate::init_crypto();
    let client = Client::try_default().await.map_err(PluginError::Client)?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let mut out = stdout.lock();
    let rvms: Api<ReplicatedVM> = Api::namespaced(client.clone(), &ns);
    let ctx = Ctx {
        ns: &ns,
        output: cli.output,
        style,
        tty,
    };
    match cli.command {
        Command::Status {
            name,
            all_namespaces,
        } => {
            let now = jiff::Timestamp::now();
            let text = match name {
                Some(name) => {
                    let v = rvms.get(&name).await.map_err(PluginError::Api)?;
                    match cli.output {
                        Output::Text => render::vm_detail(&v, now, style),
                        o => encode(&v, o)?,
                    }
                }
                None => {
                    let api: Api<ReplicatedVM> = if all_namespaces {
                        Api::all(client.clone())
                    } else {
                        rvms.clone()
                    };
                    let list = api
                        .list(&ListParams::default())
                        .await
                        .map_err(PluginError::Api)?;
                    match cli.output {
                        Output::Text if list.items.is_empty() => {
                            format!("No ReplicatedVMs in namespace {ns}.\n")
                        }
                        Output::Text => render::vm_table(&list.items, all_namespaces, now, style),
                        o => encode(&list.items, o)?,
                    }
                }
            };
            out.write_all(text.as_bytes()).map_err(PluginError::Output)
        }
        Command::Failover {
            name,
            site,
            unplanned,
            recovery_point,
            opts,
        } => {
            let v = rvms.get(&name).await.map_err(PluginError::Api)?;
            let patch = actions::failover(&v, &site, unplanned, recovery_point.as_deref())?;
            vm_action(&ctx, &rvms, v, patch, &opts, &mut out).await
        }
        Command::Failback { name, opts } => {
            let v = rvms.get(&name).await.map_err(PluginError::Api)?;
            let patch = actions::failback(&v)?;
            vm_action(&ctx, &rvms, v, patch, &opts, &mut out).await
        }
        Command::Commit { name, job, opts } => {
            let v = rvms.get(&name).await.map_err(PluginError::Api)?;
            let patch = actions::commit(&v, job.as_deref())?;
            vm_action(&ctx, &rvms, v, patch, &opts, &mut out).await
        }
        Command::Drill {
            name,
            network,
            opts,
        } => {
            let v = rvms.get(&name).await.map_err(PluginError::Api)?;
            let patch = actions::drill(true, network.as_deref());
            vm_action(&ctx, &rvms, v, patch, &opts, &mut out).await
        }
        Command::DrillCleanup { name, opts } => {
            let v = rvms.get(&name).await.map_err(PluginError::Api)?;
            let patch = actions::drill(false, None);
            vm_action(&ctx, &rvms, v, patch, &opts, &mut out).await
        }
        Command::Retry { name, job, opts } => {
            let v = rvms.get(&name).await.map_err(PluginError::Api)?;
            let patch = actions::retry(&v, &job)?;
            vm_action(&ctx, &rvms, v, patch, &opts, &mut out).await
        }
        Command::Approve { plan, action, opts } => {
            let plans: Api<FailoverPlan> = Api::namespaced(client.clone(), &ns);
            let p = plans.get(&plan).await.map_err(PluginError::Api)?;
            let patch = actions::approve(&p, &action)?;
            plan_action(&ctx, &plans, p, patch, &opts, &mut out).await
        }
    }
}

struct Ctx<'a> {
    ns: &'a str,
    output: Output,
    style: Style,
    tty: bool,
}

/// Prints the change and applies it unless `--dry-run`. Text goes out at once (so `--wait`
/// prints below it); json and yaml once at the end, as one document.
async fn apply<K>(
    ctx: &Ctx<'_>,
    api: &Api<K>,
    name: &str,
    patch: &Value,
    opts: &ActionOpts,
    out: &mut impl Write,
) -> Result<Option<K>, PluginError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let kind = K::kind(&()).to_lowercase();
    if ctx.output == Output::Text {
        let compact =
            serde_json::to_string(patch).map_err(|e| PluginError::Encode(e.to_string()))?;
        let verb = if opts.dry_run {
            "would be patched (dry run)"
        } else {
            "patched"
        };
        writeln!(out, "{kind}/{name} {verb}: {compact}").map_err(PluginError::Output)?;
    }
    if opts.dry_run {
        return Ok(None);
    }
    let obj = api
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(PluginError::Api)?;
    Ok(Some(obj))
}

fn report(
    ctx: &Ctx<'_>,
    kind: &str,
    name: &str,
    patch: &Value,
    opts: &ActionOpts,
    jobs: Option<Vec<Job>>,
    out: &mut impl Write,
) -> Result<(), PluginError> {
    if ctx.output == Output::Text {
        return Ok(());
    }
    let r = ActionReport {
        kind,
        namespace: ctx.ns,
        name,
        patch,
        dry_run: opts.dry_run,
        jobs,
    };
    out.write_all(encode(&r, ctx.output)?.as_bytes())
        .map_err(PluginError::Output)
}

/// True when the patch changed nothing (the object already said so): no job follows from it,
/// so there is nothing to wait for. Says so in text output.
fn unchanged(
    ctx: &Ctx<'_>,
    before: &kube::api::ObjectMeta,
    after: &kube::api::ObjectMeta,
    out: &mut impl Write,
) -> bool {
    let same = before.resource_version == after.resource_version;
    if same && ctx.output == Output::Text {
        let _ = writeln!(out, "(no change: the object already said so)");
    }
    same
}

fn condition_true(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> bool {
    conds.iter().any(|c| c.type_ == t && c.status == "True")
}

async fn vm_action(
    ctx: &Ctx<'_>,
    api: &Api<ReplicatedVM>,
    v: ReplicatedVM,
    patch: Value,
    opts: &ActionOpts,
    out: &mut impl Write,
) -> Result<(), PluginError> {
    let name = v.metadata.name.clone().unwrap_or_default();
    let before = v.status.clone().map(|s| s.jobs).unwrap_or_default();
    let applied = apply(ctx, api, &name, &patch, opts, out).await?;
    let applied = applied.filter(|a| !unchanged(ctx, &v.metadata, &a.metadata, out));
    let mut jobs = None;
    if let (Some(applied), true) = (applied, opts.wait) {
        let generation = applied.metadata.generation.unwrap_or(0);
        let follower = Follower::new(&before, ctx.style, ctx.tty);
        let get = || {
            let (api, name) = (api.clone(), name.clone());
            async move {
                let v = api.get(&name).await.map_err(PluginError::Api)?;
                let s = v.status.unwrap_or_default();
                // Settled: the controller has seen this generation, and the VM is where the spec
                // wants it, or stalled, or waits for a commit.
                let settled = s.observed_generation.unwrap_or(0) >= generation
                    && (condition_true(&s.conditions, "Ready")
                        || condition_true(&s.conditions, "Stalled")
                        || condition_true(&s.conditions, "CommitPending"));
                Ok(Observed {
                    jobs: s.jobs,
                    settled,
                    pause: false,
                })
            }
        };
        let sink: &mut dyn Write = if ctx.output == Output::Text {
            out
        } else {
            &mut std::io::sink()
        };
        let res = wait::follow(
            follower,
            get,
            Duration::from_secs(opts.timeout),
            &mut DynWrite(sink),
        )
        .await;
        jobs = Some(match res {
            Ok(j) => j,
            Err(e) => return Err(e),
        });
    }
    report(ctx, "ReplicatedVM", &name, &patch, opts, jobs, out)
}

async fn plan_action(
    ctx: &Ctx<'_>,
    api: &Api<FailoverPlan>,
    p: FailoverPlan,
    patch: Value,
    opts: &ActionOpts,
    out: &mut impl Write,
) -> Result<(), PluginError> {
    let name = p.metadata.name.clone().unwrap_or_default();
    // The plan job that runs goes on after the approval: follow it from here.
    let before: Vec<Job> = p
        .status
        .clone()
        .map(|s| s.jobs)
        .unwrap_or_default()
        .into_iter()
        .filter(|j| j.state != crate::api::JobState::Running)
        .collect();
    let applied = apply(ctx, api, &name, &patch, opts, out).await?;
    let applied = applied.filter(|a| !unchanged(ctx, &p.metadata, &a.metadata, out));
    let mut jobs = None;
    if let (Some(_), true) = (applied, opts.wait) {
        let follower = Follower::new(&before, ctx.style, ctx.tty);
        let released = std::cell::Cell::new(false);
        let get = || {
            let (api, name, released) = (api.clone(), name.clone(), &released);
            async move {
                let p = api.get(&name).await.map_err(PluginError::Api)?;
                let s = p.status.unwrap_or_default();
                let waiting = condition_true(&s.conditions, "WaitingForApproval");
                // The approval released the step; the plan then runs until it ends, or until
                // it waits for the next approval.
                let pause = released.get() && waiting;
                released.set(released.get() || !waiting);
                Ok(Observed {
                    jobs: s.jobs,
                    settled: true,
                    pause,
                })
            }
        };
        let sink: &mut dyn Write = if ctx.output == Output::Text {
            out
        } else {
            &mut std::io::sink()
        };
        jobs = Some(
            wait::follow(
                follower,
                get,
                Duration::from_secs(opts.timeout),
                &mut DynWrite(sink),
            )
            .await?,
        );
    }
    report(ctx, "FailoverPlan", &name, &patch, opts, jobs, out)
}

/// A `dyn Write` as a sized writer.
struct DynWrite<'a>(&'a mut dyn Write);

impl Write for DynWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
