//! The agent's HTTP side: options, startup, the routes, tokens and request limits. Handlers
//! live in [`super::handlers`]; storage knows nothing of this file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};

use super::auth::{PeerToken, auth, controller_only};
use super::error::AgentError;
use super::handlers::{self, peer};
use super::runtime::{self, RuntimeKind};
use super::{ApiError, AppState, ErrorKind, Shared, Store, driver, input};
use crate::site::ErrorBody;

/// `twinsite agent` options.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// Name of the site this agent serves.
    #[arg(long)]
    pub site: String,
    /// Address to listen on, e.g. 127.0.0.1:7101.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory holding every VM disk and all agent state.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// File holding the controller's bearer token (every route).
    #[arg(long)]
    pub token_file: PathBuf,
    /// File holding bearer tokens of peer agents, one `SITE TOKEN` per line (`#` starts a
    /// comment line; a line with no site stops the start): each reaches only the
    /// agent-to-agent routes (`/v1/replica/...`) of the VMs that replicate from SITE. The
    /// controller installs per-site credentials of its own (`PUT /v1/peer-credentials/{site}`);
    /// this file is for peers the controller does not manage.
    #[arg(long)]
    pub peer_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve https instead of http (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain http without --tls-cert/--tls-key: tokens and disk blocks then cross the
    /// network unencrypted. For tests and a trusted loopback only; logs a warning at start.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub insecure_http: bool,
    /// Largest disk a VM may have, in bytes.
    #[arg(long, default_value_t = 1 << 40)]
    pub max_disk_bytes: u64,
    /// How long a graceful Shutdown waits for the guest before it fails (use PowerOff then).
    #[arg(long, default_value_t = 60)]
    pub shutdown_timeout_seconds: u64,
    /// What the site's VMs are: `builtin` (the agent's own, guest writes through its routes)
    /// or `libvirt` (the domains of a libvirtd; needs a build with the `libvirt` feature).
    #[arg(long, value_enum, default_value_t = RuntimeKind::Builtin)]
    pub runtime: RuntimeKind,
    /// libvirt connection URI of the `libvirt` runtime.
    #[arg(long, default_value = "qemu:///system")]
    pub libvirt_uri: String,
    /// Accelerator of the `libvirt` runtime's replicas: `kvm`, `tcg`, or `auto` (KVM when a
    /// Linux kernel boots under it here, found by a probe at start; TCG otherwise).
    #[arg(long, value_enum, default_value_t = runtime::AccelChoice::Auto)]
    pub accel: runtime::AccelChoice,
    /// The Linux kernel (bzImage) the `auto` probe boots under KVM; by default the host's
    /// `/boot/vmlinuz-RELEASE`.
    #[arg(long)]
    pub accel_probe_kernel: Option<PathBuf>,
    /// A directory of kernels and initrds that replicas of libvirt domains may boot directly
    /// (repeatable). A peer's definition naming a `<kernel>` or `<initrd>` outside these is
    /// refused at `begin`; with none, direct kernel boot is refused.
    #[arg(long)]
    pub boot_file_dir: Vec<PathBuf>,
    /// Most disks a replicated VM may have (a peer's `begin` with more is refused).
    #[arg(long, default_value_t = super::limits::DEFAULT_MAX_DISKS)]
    pub max_disks_per_vm: usize,
    /// Most recovery points a replica keeps after retention (a commit that would keep more is
    /// refused).
    #[arg(long, default_value_t = super::limits::DEFAULT_MAX_POINTS)]
    pub max_points_per_vm: usize,
    /// How far a commit's time may be ahead of this site's clock, in seconds.
    #[arg(long, default_value_t = super::limits::DEFAULT_MAX_CLOCK_SKEW_SECONDS)]
    pub max_clock_skew_seconds: u64,
    /// Requests served at once on the controller's routes, and as many again on the
    /// agent-to-agent routes; more wait.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,
    /// Bytes of request bodies in flight at once over every route (a body counts with its
    /// Content-Length, or the most its route reads); a request that does not fit gets 503
    /// before its body is read. At least 1 MiB.
    #[arg(long, default_value_t = super::budget::DEFAULT_INFLIGHT_BODY_BYTES,
        value_parser = clap::value_parser!(u64).range((1 << 20)..=(1 << 40)))]
    pub max_inflight_body_bytes: u64,
    /// Seconds between verifications of a replica: a cycle, when due, hashes every block of the
    /// source's disks at its cut and compares the replica's newest point with them; a
    /// difference starts a resync by block hashes. One verification runs at a time.
    #[arg(long, default_value_t = 6 * 3600, value_parser = clap::value_parser!(u64).range(1..=30 * 24 * 3600))]
    pub verify_interval_seconds: u64,
    /// Log format (`RUST_LOG` filters; info by default).
    #[arg(long, value_enum, default_value_t = crate::logging::LogFormat::Text, env = "TWINSITE_LOG_FORMAT")]
    pub log_format: crate::logging::LogFormat,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = Json(ErrorBody {
            error: self.message,
            reason: self.reason.map(str::to_string),
        });
        (status, body).into_response()
    }
}

/// Block batches (64 blocks of 64 KiB each) sent at once over all VMs.
const SEND_SLOTS: usize = 4;

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    crate::logging::init(args.log_format, "info");
    // Load TLS material before anything else, so a bad certificate fails the start at once.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            crate::init_crypto();
            Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                    .await
                    .map_err(AgentError::Tls)?,
            )
        }
        _ if args.insecure_http => {
            tracing::warn!(
                site = %args.site,
                "serving plain http (--insecure-http): bearer tokens and disk data are not encrypted"
            );
            None
        }
        _ => return Err(AgentError::NoTls),
    };
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(AgentError::Token)?
        .trim()
        .to_string();
    if token.is_empty() {
        return Err(AgentError::EmptyToken);
    }
    let peer_tokens = match &args.peer_token_file {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(AgentError::PeerToken)?;
            let tokens = PeerToken::parse(&text)?;
            if tokens.iter().any(|t| t.token.expose() == token) {
                return Err(AgentError::PeerTokenIsControllerToken);
            }
            tokens
        }
        None => Vec::new(),
    };
    let runtime = runtime::open(
        args.runtime,
        &runtime::RuntimeOptions {
            uri: Some(args.libvirt_uri.clone()),
            accel: args.accel,
            probe_kernel: args.accel_probe_kernel.clone(),
        },
    )
    .map_err(AgentError::Runtime)?;
    let max_requests = args.max_concurrent_requests as usize;
    let store = Store::open(&args.data_dir, &args.site, args.max_disk_bytes)?;
    let installed = super::peers::Installed::open(&args.data_dir)
        .map_err(|e| AgentError::PeerCredentials(args.data_dir.clone(), e))?;
    store.recover();
    tune_allocator();
    let outbound: Vec<String> = store
        .names()
        .into_iter()
        .filter(|n| {
            store
                .read_vm(n, |r| {
                    Ok(r.meta.outbound.as_ref().is_some_and(|o| !o.stopped))
                })
                .unwrap_or(false)
        })
        .collect();
    let state = Arc::new(AppState {
        site: args.site.clone(),
        data_dir: args.data_dir.clone(),
        token: token.into(),
        peer_tokens,
        installed: std::sync::RwLock::new(installed),
        control_requests: Arc::new(tokio::sync::Semaphore::new(max_requests)),
        replica_requests: Arc::new(tokio::sync::Semaphore::new(max_requests)),
        budget: Arc::new(super::budget::Budget::new(args.max_inflight_body_bytes)),
        store,
        drivers: Mutex::new(Default::default()),
        cycle_locks: Mutex::new(Default::default()),
        transfers: Mutex::new(Default::default()),
        send_slots: tokio::sync::Semaphore::new(SEND_SLOTS),
        cut_lock: tokio::sync::Mutex::new(()),
        guests: Mutex::new(Default::default()),
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout_seconds),
        boot_file_dirs: args.boot_file_dir.clone(),
        limits: super::limits::PeerLimits {
            max_disks: args.max_disks_per_vm,
            max_points: args.max_points_per_vm,
            max_clock_skew_seconds: args.max_clock_skew_seconds,
        },
        runtime,
        metrics: Default::default(),
        verify_every: std::time::Duration::from_secs(args.verify_interval_seconds),
        verifying: Default::default(),
    });
    // A cut of an earlier agent process may have died with its domains paused.
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || super::cut::resume_after_restart(&st)).await;
    for vm in outbound {
        driver::spawn(&state, &vm);
    }
    let std_listener = std::net::TcpListener::bind(args.listen).map_err(AgentError::Listen)?;
    std_listener
        .set_nonblocking(true)
        .map_err(AgentError::Listen)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(site = %args.site, addr = %args.listen, scheme, runtime = ?args.runtime, "agent listening");
    let handle = axum_server::Handle::new();
    tokio::spawn({
        let handle = handle.clone();
        async move {
            shutdown_signal().await;
            // In-flight requests (a guest write, a block batch) get a moment to finish.
            handle.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
        }
    });
    let app = router(state).into_make_service();
    match tls {
        Some(config) => {
            axum_server::from_tcp_rustls(std_listener, config)
                .map_err(AgentError::Listen)?
                .handle(handle)
                .serve(app)
                .await
        }
        None => {
            axum_server::from_tcp(std_listener)
                .map_err(AgentError::Listen)?
                .handle(handle)
                .serve(app)
                .await
        }
    }
    .map_err(AgentError::Listen)
}

/// Keeps the agent's resident memory near what it uses without slowing the block stream:
/// batches of megabytes are allocated and freed all the time, from many threads. Two heaps at
/// most (glibc would make one per thread) that keep at most 16 MiB free each; batches reuse heap
/// memory instead of fresh mappings whose pages fault in again (measured: initial replication
/// of 4 GiB 3.7 s instead of 7.0 s; 100 protected VMs 66 MiB resident instead of 146 MiB with
/// glibc's defaults).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before the agent's threads
    // allocate in earnest, and a refused setting (return 0) changes nothing.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        // Block batches (about 4 MiB) come from the heap and are reused: as fresh mappings
        // every batch would fault in its pages again. Freed memory above 16 MiB per heap goes
        // back to the system.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
    }
}

async fn shutdown_signal() {
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

/// The routes. Every route under `/v1` needs a token; the controller's reaches every route, a
/// peer agent's only the agent-to-agent ones (`/v1/replica/...`, 403 elsewhere). Bodies are
/// limited to 1 MiB except on the guest write and block stream routes (256 MiB), and all
/// bodies in flight together to `--max-inflight-body-bytes`; `/healthz` and `/metrics` take
/// no body and serve a few requests at once ([`super::budget`]).
fn router(state: Shared) -> Router {
    let data_limit = DefaultBodyLimit::max(input::DATA_BODY_LIMIT);
    let control = Router::new()
        .route("/vms", get(handlers::list_vms))
        .route(
            "/vms/{vm}",
            get(handlers::get_vm)
                .put(handlers::create_vm)
                .delete(handlers::delete_vm),
        )
        .route("/vms/{vm}/power", post(handlers::power))
        .route(
            "/vms/{vm}/disks/{disk}/data",
            put(handlers::write_disk)
                .layer(data_limit)
                .get(handlers::read_disk),
        )
        .route("/vms/{vm}/disks/{disk}/digest", get(handlers::digest))
        .route("/vms/{vm}/recovery-points", get(handlers::recovery_points))
        .route("/vms/{vm}/replication/enable", post(handlers::enable))
        .route("/vms/{vm}/replication/accept", post(handlers::accept))
        .route("/vms/{vm}/replication/settings", post(handlers::settings))
        .route("/vms/{vm}/replication/sync", post(handlers::sync))
        .route("/vms/{vm}/replication/stop", post(handlers::stop))
        .route("/vms/{vm}/failover", post(handlers::failover))
        .route("/vms/{vm}/test-failover", post(handlers::test_failover))
        .route(
            "/vms/{vm}/test-failover/cleanup",
            post(handlers::test_cleanup),
        )
        .route("/vms/{vm}/commit", post(handlers::commit))
        .route("/cuts", post(handlers::cut))
        .route(
            "/peer-credentials/{site}",
            put(handlers::credentials::install),
        )
        .route_layer(middleware::from_fn_with_state(
            state.control_requests.clone(),
            limit_requests,
        ))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(controller_only));
    let replica = Router::new()
        .route("/replica/{vm}/begin", post(peer::begin))
        .route("/replica/{vm}/disks/{index}/hashes", get(peer::hashes))
        .route("/replica/{vm}/dirty", get(peer::dirty))
        .route(
            "/replica/{vm}/cycles/{cycle}/blocks",
            put(peer::blocks).layer(data_limit),
        )
        .route("/replica/{vm}/commit", post(peer::commit))
        .route_layer(middleware::from_fn_with_state(
            state.replica_requests.clone(),
            limit_requests,
        ));
    let v1 = control
        .merge(replica)
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    let open = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        // No token: Prometheus scrapes it (docs/security.md, "Metrics").
        .route("/metrics", get(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.budget.clone(),
            super::budget::open_routes,
        ));
    Router::new()
        .merge(open)
        .nest("/v1", v1)
        .layer(DefaultBodyLimit::max(input::JSON_BODY_LIMIT))
        .layer(middleware::from_fn_with_state(
            state.budget.clone(),
            super::budget::bodies,
        ))
        .with_state(state)
}

/// Serves a request once one of the route group's slots is free (`--max-concurrent-requests`).
async fn limit_requests(
    State(slots): State<Arc<tokio::sync::Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    match slots.acquire_owned().await {
        Ok(_slot) => next.run(req).await,
        Err(_) => ApiError::new(ErrorKind::Unavailable, "agent is stopping").into_response(),
    }
}
