//! The controller: reconcilers that drive the sites toward the ReplicatedVM and Site objects.
//!
//! - [`rvm`]: the ReplicatedVM controller (reconcile, the pure planner, step execution,
//!   deletion).
//! - [`failover_plan`]: the FailoverPlan controller.
//! - [`site`]: the Site reconciler; [`sites`]: the site registry and the shared per-site VM
//!   listings; [`peers`]: the credential of each pair of sites; [`observe`]: the provider-neutral view of a VM at a site that the planner reads.
//! - [`vm_jobs`]: reading a ReplicatedVM's job record (both controllers).
//! - [`conditions`]: Ready / Reconciling / Stalled / CommitPending helpers.
//! - [`notes`], [`writes`]: Events and status merge patches, shared by the reconcilers.
//! - [`metrics`] and the HTTP endpoints; [`error`].
//!
//! Only the leader (a Lease held through kube-lease-manager) runs the reconcilers; a second
//! replica waits. SIGTERM stops the reconcilers gracefully and releases the lease.

pub mod conditions;
pub mod error;
pub mod failover_plan;
pub mod metrics;
pub mod notes;
pub mod observe;
pub mod peers;
pub mod rvm;
pub mod site;
pub mod sites;
pub mod vm_jobs;
pub mod writes;

pub use error::Error;
pub use rvm::Context;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{Config as CtlConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::api::{FailoverPlan, ReplicatedVM, Site};
use metrics::Metrics;
use sites::Sites;

pub use crate::logging::LogFormat;

/// `twinsite controller` flags. Every flag the Helm chart sets can also come from the
/// environment (the chart passes them as `TWINSITE_*` variables).
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Kubeconfig file; without it KUBECONFIG, ~/.kube/config or the in-cluster config is used.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address of /healthz, /readyz and /metrics (in a pod: 0.0.0.0:PORT, where the probes
    /// reach it).
    #[arg(long, default_value = "127.0.0.1:8080", env = "TWINSITE_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Leader election through a Lease: only the holder reconciles. `false` reconciles at once
    /// without a Lease; then exactly one controller may run.
    #[arg(
        long,
        default_value_t = true,
        action = clap::ArgAction::Set,
        env = "TWINSITE_LEADER_ELECTION"
    )]
    pub leader_election: bool,
    /// Namespace of the leader election Lease.
    #[arg(
        long,
        default_value = "twinsite-system",
        env = "TWINSITE_LEASE_NAMESPACE"
    )]
    pub lease_namespace: String,
    /// Name of the leader election Lease.
    #[arg(
        long,
        default_value = "twinsite-controller",
        env = "TWINSITE_LEASE_NAME"
    )]
    pub lease_name: String,
    /// The one namespace whose Secrets the controller reads (Sites' tokenSecretRef and
    /// caSecretRef must name it); default: the lease namespace, the controller's own.
    #[arg(long, env = "TWINSITE_SECRET_NAMESPACE")]
    pub secret_namespace: Option<String>,
    /// Hosts FailoverPlan webhooks may call, comma-separated: names (`hooks.example.com`),
    /// subdomain wildcards (`*.example.com`) or IP addresses; any port. Unset: no host, so
    /// webhook actions fail without calling anything. A name that resolves to a loopback,
    /// link-local, unspecified, multicast or broadcast address is not called unless that
    /// address is listed itself.
    #[arg(long, env = "TWINSITE_WEBHOOK_ALLOWED_HOSTS", value_delimiter = ',')]
    pub webhook_allowed_hosts: Vec<String>,
    /// A Secret in the secret namespace whose key `--webhook-signing-secret-key` is the
    /// HMAC-SHA256 key that signs every webhook body (header `X-Twinsite-Signature:
    /// sha256=<hex>`). Unset: webhooks are not signed.
    #[arg(long, env = "TWINSITE_WEBHOOK_SIGNING_SECRET")]
    pub webhook_signing_secret: Option<String>,
    /// The key of `--webhook-signing-secret` that holds the signing key.
    #[arg(
        long,
        default_value = "key",
        env = "TWINSITE_WEBHOOK_SIGNING_SECRET_KEY"
    )]
    pub webhook_signing_secret_key: String,
    /// This replica's name in the Lease (holderIdentity); the pod's name in a cluster.
    /// Default: the host name and process id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a lease holder that stops renewing keeps the lease.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// How often each site's VMs are listed (one call per site for all its VMs).
    #[arg(long, default_value_t = 10)]
    pub site_poll_seconds: u64,
    /// A Site that has not been Ready for this long is Stalled (kstatus: Failed) instead of
    /// Reconciling.
    #[arg(long, default_value_t = 300)]
    pub site_stall_seconds: u64,
    /// ReplicatedVMs reconciled at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: u16,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "TWINSITE_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Logs as JSON lines (the same as `--log-format json`).
    #[arg(long)]
    pub log_json: bool,
}

async fn client(args: &ControllerArgs) -> Result<Client, Error> {
    match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            let cfg = kube::Config::from_custom_kubeconfig(
                kc,
                &kube::config::KubeConfigOptions::default(),
            )
            .await?;
            Ok(Client::try_from(cfg)?)
        }
        None => Ok(Client::try_default().await?),
    }
}

/// The ReplicatedVMs a plan's status names.
fn plan_members(fp: FailoverPlan) -> Vec<kube::runtime::reflector::ObjectRef<ReplicatedVM>> {
    let ns = fp.metadata.namespace.clone().unwrap_or_default();
    fp.status
        .iter()
        .flat_map(|s| s.groups.iter())
        .flat_map(|g| g.vms.iter())
        .map(|v| kube::runtime::reflector::ObjectRef::new(&v.name).within(&ns))
        .collect()
}

/// Runs the controller until SIGTERM or Ctrl-C.
pub async fn run(args: ControllerArgs) -> Result<(), Error> {
    crate::init_crypto();
    let format = if args.log_json {
        LogFormat::Json
    } else {
        args.log_format
    };
    crate::logging::init(format, "info,kube=warn");
    let client = client(&args).await?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(Notify::new());
    let stopping = Arc::new(AtomicBool::new(false));

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| Error::Serve {
            addr: args.metrics_addr,
            source,
        })?;
    let http = tokio::spawn(serve(listener, metrics.clone(), ready.clone()));

    {
        let stop = stop.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("stop requested; finishing reconciles in flight");
            stopping.store(true, Ordering::SeqCst);
            stop.notify_waiters();
        });
    }

    let identity = args.identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "twinsite".into()),
            std::process::id()
        )
    });
    // Without election, the sender of an always-true leadership channel, kept until the end.
    let mut always_leader = None;
    let (mut leader, lease_task) = if args.leader_election {
        // The Lease's namespace must exist: the controller never creates namespaces (the
        // chart's RBAC allows it Leases in its own namespace only).
        let lease = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &args.lease_name)
            .with_namespace(&args.lease_namespace)
            .with_identity(&identity)
            .with_duration(args.lease_duration_seconds)
            .with_grace(args.lease_duration_seconds.div_ceil(3).max(2))
            .build()
            .await
            .map_err(|source| Error::LeaseNamespace {
                namespace: args.lease_namespace.clone(),
                source,
            })?;
        let (leader, task) = lease.watch().await;
        info!(%identity, lease = %args.lease_name, namespace = %args.lease_namespace, "waiting for leadership");
        (leader, Some(task))
    } else {
        // Without election this process leads from the start, until it stops.
        let (tx, rx) = tokio::sync::watch::channel(true);
        always_leader = Some(tx);
        warn!(%identity, "leader election is off: exactly one controller may run");
        (rx, None)
    };
    ready.store(true, Ordering::SeqCst);

    let secret_namespace = args
        .secret_namespace
        .clone()
        .unwrap_or_else(|| args.lease_namespace.clone());
    info!(namespace = %secret_namespace, "Secrets are read in this namespace only");
    let hooks = failover_plan::webhook::Settings {
        allowed_hosts: failover_plan::webhook::AllowedHosts::new(&args.webhook_allowed_hosts),
        signing_secret: args
            .webhook_signing_secret
            .as_ref()
            .filter(|n| !n.is_empty())
            .map(|name| failover_plan::webhook::SigningSecretRef {
                namespace: secret_namespace.clone(),
                name: name.clone(),
                key: args.webhook_signing_secret_key.clone(),
            }),
    };
    info!(
        allowed_hosts = ?hooks.allowed_hosts,
        signed = hooks.signing_secret.is_some(),
        "webhook settings"
    );
    let sites = Arc::new(Sites::new());
    loop {
        // Wait to lead (or to be told to stop).
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { break },
            _ = stop.notified() => {},
        }
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        info!(%identity, "leading: reconcilers start");
        // The FailoverPlans as the ReplicatedVM reconciles read them: a watch cache, not a list
        // per reconcile. The same stream triggers those reconciles, so a plan's change reaches
        // the cache before the reconcile it wakes reads it.
        let (plan_store, plan_writer) = kube::runtime::reflector::store::<FailoverPlan>();
        let plan_cache = watcher(
            Api::<FailoverPlan>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|p| p.managed_fields_mut().clear())
        .reflect(plan_writer)
        .touched_objects();
        // The reconcilers' own watch caches, read by reconciles instead of lists.
        let rvm_ctl = Controller::new(
            Api::<ReplicatedVM>::all(client.clone()),
            watcher::Config::default(),
        )
        // A plan releasing a group wakes the VMs it names.
        .watches_stream(plan_cache, plan_members);
        let site_ctl =
            Controller::new(Api::<Site>::all(client.clone()), watcher::Config::default());
        let ctx = Arc::new(Context {
            client: client.clone(),
            sites: sites.clone(),
            metrics: metrics.clone(),
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "twinsite-controller".into(),
                    instance: Some(identity.clone()),
                },
            ),
            poll: Duration::from_secs(args.site_poll_seconds.max(1)),
            site_stall: Duration::from_secs(args.site_stall_seconds),
            started: std::time::Instant::now(),
            written: Default::default(),
            fences: Default::default(),
            plans: plan_store,
            rvms: rvm_ctl.store(),
            site_objects: site_ctl.store(),
            secret_namespace: secret_namespace.clone(),
        });
        let halt = Arc::new(Notify::new());
        let lost = {
            let mut leader = leader.clone();
            let halt = halt.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = leader.wait_for(|l| !*l) => warn!("leadership lost: reconcilers stop"),
                    _ = stop.notified() => {},
                }
                halt.notify_waiters();
            })
        };
        let trigger = |n: Arc<Notify>| async move { n.notified().await };
        let rvms = rvm_ctl
            .with_config(CtlConfig::default().concurrency(args.concurrency))
            .graceful_shutdown_on(trigger(halt.clone()))
            .run(rvm::reconcile, rvm::error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "ReplicatedVM reconcile");
                }
            });
        let site_ctl = site_ctl
            .with_config(CtlConfig::default().concurrency(8))
            .graceful_shutdown_on(trigger(halt.clone()))
            .run(site::reconcile, site::error_policy, ctx.clone())
            .for_each(|r| async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "Site reconcile");
                }
            });
        let plans = async {
            if let Err(e) =
                failover_plan::run_with(client.clone(), None, hooks.clone(), trigger(halt.clone()))
                    .await
            {
                warn!(error = %e, "FailoverPlan controller stopped");
            }
        };
        // What the objects' status says, as metrics, while this replica leads (a standby
        // exports none, so alerts do not fire twice).
        let gauges = async {
            tokio::select! {
                _ = metrics::status_gauges(client.clone(), metrics.clone()) => {}
                _ = trigger(halt.clone()) => {}
            }
        };
        tokio::join!(rvms, site_ctl, plans, gauges);
        metrics.clear_status();
        lost.abort();
        if stopping.load(Ordering::SeqCst) {
            break;
        }
    }
    // Closing the channel makes the lease task release the lease.
    drop(leader);
    drop(always_leader);
    if let Some(task) = lease_task {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "releasing the lease"),
            Err(_) => warn!("releasing the lease timed out"),
            _ => {}
        }
    }
    http.abort();
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            }
            Err(e) => {
                error!(error = %e, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                        .into_response()
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        error!(error = %e, "metrics server stopped");
    }
}
