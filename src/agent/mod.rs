//! The site agent: an HTTP server that owns one site's VMs (disks as sparse files, power state,
//! role) and answers the controller. All state lives under the data directory.
//!
//! Agent-to-agent replication routes live under `/v1/replica` (docs/agent.md).

mod driver;
mod input;
mod meta;
mod replica;
mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::replication::frame;
use crate::secret::Secret;
use crate::site::{CreateVm, ErrorBody, PowerRequest};
use input::Params;
pub use store::Store;

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
    /// File holding the bearer tokens of peer agents, one per line (`TOKEN`, or `SITE TOKEN` to
    /// bind it to the peer site SITE; `#` starts a comment line): they reach only the
    /// agent-to-agent routes (`/v1/replica/...`), a bound one only for the VMs that replicate
    /// with its site. Without it the controller's token is the only one, and peers present it.
    #[arg(long)]
    pub peer_token_file: Option<PathBuf>,
    /// PEM certificate chain: serve https instead of http (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Largest disk a VM may have, in bytes.
    #[arg(long, default_value_t = 1 << 40)]
    pub max_disk_bytes: u64,
    /// How long a graceful Shutdown waits for the guest before it fails (use PowerOff then).
    #[arg(long, default_value_t = 60)]
    pub shutdown_timeout_seconds: u64,
    /// Requests served at once on the controller's routes, and as many again on the
    /// agent-to-agent routes; more wait.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_requests: u32,
}

/// Errors of the agent's startup.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading token file: {0}")]
    Token(std::io::Error),
    #[error("token file is empty")]
    EmptyToken,
    #[error("reading peer token file: {0}")]
    PeerToken(std::io::Error),
    #[error("peer token file holds no token")]
    EmptyPeerToken,
    #[error("peer token file: line {0} is neither TOKEN nor SITE TOKEN")]
    PeerTokenLine(usize),
    #[error("a token of the peer token file is the controller token; give peers their own")]
    PeerTokenIsControllerToken,
    #[error("loading TLS certificate or key: {0}")]
    Tls(std::io::Error),
    #[error("data directory: {0}")]
    Store(#[from] ApiError),
    #[error("listening: {0}")]
    Listen(std::io::Error),
}

/// An API error: a status and a reason, answered as `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Machine-readable reason, where a caller acts on it.
    pub reason: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            reason: None,
        }
    }
    /// 409 that sends the source of a cycle to resynchronize.
    pub fn resync(m: impl Into<String>) -> Self {
        Self {
            reason: Some(replica::RESYNC_REQUIRED),
            ..Self::conflict(m)
        }
    }
    pub fn bad(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, m)
    }
    pub fn io(e: std::io::Error) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, format!("storage: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: self.message,
            reason: self.reason.map(str::to_string),
        });
        (self.status, body).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

type Drivers = std::collections::HashMap<
    String,
    (
        tokio::sync::mpsc::Sender<driver::SyncReply>,
        tokio::task::JoinHandle<()>,
    ),
>;

struct AppState {
    site: String,
    data_dir: PathBuf,
    /// The controller's token: every route.
    token: Secret,
    /// Peer agents' tokens, each with the site it is bound to: the agent-to-agent routes only.
    peer_tokens: Vec<PeerToken>,
    /// Requests served at once on the controller's routes and on the agent-to-agent routes.
    /// Apart, so a peer's block stream never waits behind controller calls that wait for it.
    control_requests: Arc<tokio::sync::Semaphore>,
    replica_requests: Arc<tokio::sync::Semaphore>,
    store: Store,
    drivers: Mutex<Drivers>,
    /// Per VM: held for the whole of a cycle, so a VM's cycles never overlap.
    cycle_locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Block batches in flight at once over all VMs (bounds the memory of transfers).
    send_slots: tokio::sync::Semaphore,
    /// Cuts run one at a time.
    cut_lock: tokio::sync::Mutex<()>,
    /// Guest writes in flight and graceful shutdowns under way, per VM.
    guests: Mutex<std::collections::HashMap<String, Guest>>,
    /// How long a graceful shutdown waits for the guest.
    shutdown_timeout: std::time::Duration,
}

/// What the agent knows of a VM's guest between requests.
#[derive(Default)]
struct Guest {
    /// Guest writes accepted and not finished.
    in_flight: u64,
    /// A graceful shutdown is under way: new guest writes are refused.
    shutting_down: bool,
}

type Shared = Arc<AppState>;

/// Block batches (64 blocks of 64 KiB each) sent at once over all VMs.
const SEND_SLOTS: usize = 4;

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
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
        _ => None,
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
    let max_requests = args.max_concurrent_requests as usize;
    let store = Store::open(&args.data_dir, &args.site, args.max_disk_bytes)?;
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
        control_requests: Arc::new(tokio::sync::Semaphore::new(max_requests)),
        replica_requests: Arc::new(tokio::sync::Semaphore::new(max_requests)),
        store,
        drivers: Mutex::new(Default::default()),
        cycle_locks: Mutex::new(Default::default()),
        send_slots: tokio::sync::Semaphore::new(SEND_SLOTS),
        cut_lock: tokio::sync::Mutex::new(()),
        guests: Mutex::new(Default::default()),
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout_seconds),
    });
    for vm in outbound {
        driver::spawn(&state, &vm);
    }
    let std_listener = std::net::TcpListener::bind(args.listen).map_err(AgentError::Listen)?;
    std_listener
        .set_nonblocking(true)
        .map_err(AgentError::Listen)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(site = %args.site, addr = %args.listen, scheme, "agent listening");
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
/// limited to 1 MiB except on the guest write and block stream routes (256 MiB).
fn router(state: Shared) -> Router {
    let data_limit = DefaultBodyLimit::max(input::DATA_BODY_LIMIT);
    let control = Router::new()
        .route("/vms", get(list_vms))
        .route("/vms/{vm}", get(get_vm).put(create_vm).delete(delete_vm))
        .route("/vms/{vm}/power", post(power))
        .route(
            "/vms/{vm}/disks/{disk}/data",
            put(write_disk).layer(data_limit).get(read_disk),
        )
        .route("/vms/{vm}/disks/{disk}/digest", get(digest))
        .route("/vms/{vm}/recovery-points", get(recovery_points))
        .route("/vms/{vm}/replication/enable", post(enable))
        .route("/vms/{vm}/replication/accept", post(accept))
        .route("/vms/{vm}/replication/sync", post(sync))
        .route("/vms/{vm}/replication/stop", post(stop))
        .route("/vms/{vm}/failover", post(failover))
        .route("/vms/{vm}/test-failover", post(test_failover))
        .route("/vms/{vm}/test-failover/cleanup", post(test_cleanup))
        .route("/vms/{vm}/commit", post(commit))
        .route("/cuts", post(cut))
        .route_layer(middleware::from_fn_with_state(
            state.control_requests.clone(),
            limit_requests,
        ))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(controller_only));
    let replica = Router::new()
        .route("/replica/{vm}/begin", post(replica_begin))
        .route("/replica/{vm}/disks/{index}/hashes", get(replica_hashes))
        .route("/replica/{vm}/dirty", get(replica_dirty))
        .route(
            "/replica/{vm}/cycles/{cycle}/blocks",
            put(replica_blocks).layer(data_limit),
        )
        .route("/replica/{vm}/commit", post(replica_commit))
        .route_layer(middleware::from_fn_with_state(
            state.replica_requests.clone(),
            limit_requests,
        ));
    let v1 = control
        .merge(replica)
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .nest("/v1", v1)
        .layer(DefaultBodyLimit::max(input::JSON_BODY_LIMIT))
        .with_state(state)
}

/// A peer agent's token from `--peer-token-file`.
#[derive(Debug)]
struct PeerToken {
    /// The peer site it belongs to; `None`: any site's.
    site: Option<String>,
    token: Secret,
}

impl PeerToken {
    /// One token per line: `TOKEN` or `SITE TOKEN`; blank lines and `#` comments are skipped.
    fn parse(text: &str) -> Result<Vec<Self>, AgentError> {
        let mut tokens = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            tokens.push(match fields[..] {
                [token] => PeerToken {
                    site: None,
                    token: token.into(),
                },
                [site, token] => PeerToken {
                    site: Some(site.to_string()),
                    token: token.into(),
                },
                _ => return Err(AgentError::PeerTokenLine(i + 1)),
            });
        }
        if tokens.is_empty() {
            return Err(AgentError::EmptyPeerToken);
        }
        Ok(tokens)
    }
}

/// Who presented the request's token.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Caller {
    Controller,
    /// A peer agent; `site` when its token is bound to one.
    Peer {
        site: Option<String>,
    },
}

impl Caller {
    /// The site a peer's token is bound to: its requests reach only that site's VMs.
    fn bound_site(&self) -> Option<&str> {
        match self {
            Caller::Peer { site } => site.as_deref(),
            Caller::Controller => None,
        }
    }
}

async fn auth(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes());
    let caller = presented.and_then(|t| {
        if constant_time_eq(t, st.token.expose().as_bytes()) {
            return Some(Caller::Controller);
        }
        // Every peer token is compared (no early exit on a match).
        let mut found = None;
        for p in &st.peer_tokens {
            if constant_time_eq(t, p.token.expose().as_bytes()) && found.is_none() {
                found = Some(Caller::Peer {
                    site: p.site.clone(),
                });
            }
        }
        found
    });
    match caller {
        Some(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response()
        }
    }
}

/// In front of every route that is not an agent-to-agent one: a peer's token gets 403.
async fn controller_only(req: Request, next: Next) -> Response {
    if req.extensions().get::<Caller>() == Some(&Caller::Controller) {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "a peer agent's token reaches only the agent-to-agent routes (/v1/replica/...)",
        )
        .into_response()
    }
}

/// Serves a request once one of the route group's slots is free (`--max-concurrent-requests`).
async fn limit_requests(
    State(slots): State<Arc<tokio::sync::Semaphore>>,
    req: Request,
    next: Next,
) -> Response {
    match slots.acquire_owned().await {
        Ok(_slot) => next.run(req).await,
        Err(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "agent is stopping").into_response()
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Body parsing whose every failure is a 400 with the reason (413 for a body over the limit).
fn parse<T: DeserializeOwned>(body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    body.map(|Json(b)| b).map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(input::JSON_BODY_LIMIT)
        } else {
            ApiError::bad(format!("malformed body: {}", e.body_text()))
        }
    })
}

/// A raw body (guest data, a block batch); 413 over the limit.
fn raw_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(input::DATA_BODY_LIMIT)
        } else {
            ApiError::new(e.status(), e.body_text())
        }
    })
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("body larger than {limit} bytes"),
    )
}

/// Runs storage work off the async threads.
async fn with_store<T: Send + 'static>(
    st: &Shared,
    f: impl FnOnce(&Store) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || f(&st.store))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// Runs storage work on one VM, locked for writing, off the async threads.
async fn with_vm<T: Send + 'static>(
    st: &Shared,
    vm: &str,
    f: impl FnOnce(&mut store::VmRec) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let vm = vm.to_string();
    with_store(st, move |s| s.write_vm(&vm, f)).await
}

/// Runs storage work on one VM, locked for reading, off the async threads.
async fn read_vm<T: Send + 'static>(
    st: &Shared,
    vm: &str,
    f: impl FnOnce(&store::VmRec) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let vm = vm.to_string();
    with_store(st, move |s| s.read_vm(&vm, f)).await
}

async fn list_vms(State(st): State<Shared>) -> ApiResult<Response> {
    with_store(&st, |s| Ok(Json(s.list()).into_response())).await
}

async fn get_vm(State(st): State<Shared>, Params(vm): Params<String>) -> ApiResult<Response> {
    with_store(&st, move |s| Ok(Json(s.vm(&vm)?).into_response())).await
}

async fn create_vm(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> ApiResult<Response> {
    let spec = parse(body)?;
    with_store(
        &st,
        move |s| Ok(Json(s.create(&vm, &spec)?).into_response()),
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OpQuery {
    operation_id: Option<String>,
}

async fn delete_vm(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Query(q): Query<OpQuery>,
) -> ApiResult<Response> {
    input::opt_op_id("operationId", q.operation_id.as_deref())?;
    let vm2 = vm.clone();
    let running = with_store(&st, move |s| {
        Ok(s.vm(&vm2)?.power == crate::site::Power::Running)
    })
    .await
    .unwrap_or(false);
    if !running {
        // A deleted VM must not keep a replication task alive.
        driver::stop(&st, &vm);
    }
    with_store(&st, move |s| {
        let v = s.idempotent(&vm, q.operation_id.as_deref(), |s, r| {
            s.delete_locked(&vm, r)
        })?;
        Ok(Json(v).into_response())
    })
    .await
}

async fn power(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<PowerRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::opt_op_id("operationId", req.operation_id.as_deref())?;
    if req.action != crate::site::PowerAction::Shutdown {
        return with_store(&st, move |s| {
            let v = s.idempotent(&vm, req.operation_id.as_deref(), |_, r| r.power(req.action))?;
            Ok(Json(v).into_response())
        })
        .await;
    }
    if let Some(id) = req.operation_id.clone()
        && let Some(v) = read_vm(&st, &vm, move |r| Ok(r.meta.op_answer(&id))).await?
    {
        return Ok(Json(v).into_response());
    }
    let vm2 = vm.clone();
    let running = read_vm(&st, &vm.clone(), move |r| {
        if r.meta.power == crate::site::Power::Running && !r.meta.integration_services {
            return Err(ApiError::conflict(format!(
                "VM {vm2} has no integration services: it cannot be shut down gracefully"
            )));
        }
        Ok(r.meta.power == crate::site::Power::Running)
    })
    .await?;
    // Held until the VM is Off: no guest write slips in between.
    let _quiet = if running {
        Some(guest_shutdown(&st, &vm).await?)
    } else {
        None
    };
    with_store(&st, move |s| {
        let v = s.idempotent(&vm, req.operation_id.as_deref(), |_, r| r.power(req.action))?;
        Ok(Json(v).into_response())
    })
    .await
}

/// A graceful shutdown of the guest: new guest writes are refused, the ones in flight finish,
/// the guest stops. Fails (the VM keeps running and takes writes again) when that does not
/// happen within the agent's shutdown timeout.
async fn guest_shutdown(st: &Shared, vm: &str) -> ApiResult<ShuttingDown> {
    let limit = st.shutdown_timeout;
    let ignores = guest_ignores_shutdown(vm);
    set_shutting_down(st, vm, true);
    let quiet = ShuttingDown {
        st: st.clone(),
        vm: vm.to_string(),
    };
    let wait = async {
        loop {
            let idle = st
                .guests
                .lock()
                .map(|g| g.get(vm).is_none_or(|g| g.in_flight == 0))
                .unwrap_or(false);
            if idle && !ignores {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(limit, wait).await.is_err() {
        // `quiet` is dropped: the guest takes writes again.
        return Err(ApiError::conflict(format!(
            "guest did not shut down within {}s; use PowerOff",
            limit.as_secs()
        )));
    }
    Ok(quiet)
}

/// New guest writes of a VM are refused while this lives (a shutdown under way).
struct ShuttingDown {
    st: Shared,
    vm: String,
}

impl Drop for ShuttingDown {
    fn drop(&mut self) {
        set_shutting_down(&self.st, &self.vm, false);
    }
}

fn set_shutting_down(st: &Shared, vm: &str, on: bool) {
    if let Ok(mut g) = st.guests.lock() {
        g.entry(vm.to_string()).or_default().shutting_down = on;
    }
}

/// Test-only fault injection: `TWINSITE_FAULT_GUEST_IGNORES_SHUTDOWN=vm1,vm2` makes those
/// guests ignore a graceful shutdown (feature `failpoints` only).
fn guest_ignores_shutdown(vm: &str) -> bool {
    crate::fault::switch("TWINSITE_FAULT_GUEST_IGNORES_SHUTDOWN")
        .is_some_and(|v| v.split(',').any(|n| n.trim() == vm))
}

/// A guest write accepted: counted until dropped.
struct InFlight {
    st: Shared,
    vm: String,
}

impl InFlight {
    fn start(st: &Shared, vm: &str) -> ApiResult<Self> {
        let mut g = st
            .guests
            .lock()
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "guests poisoned"))?;
        let e = g.entry(vm.to_string()).or_default();
        if e.shutting_down {
            return Err(ApiError::conflict(format!("VM {vm} is shutting down")));
        }
        e.in_flight += 1;
        Ok(Self {
            st: st.clone(),
            vm: vm.to_string(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut g) = self.st.guests.lock()
            && let Some(e) = g.get_mut(&self.vm)
        {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}

#[derive(Deserialize)]
struct IoQuery {
    offset: Option<String>,
    length: Option<String>,
}

fn number(v: Option<String>, name: &str) -> ApiResult<u64> {
    let v = v.ok_or_else(|| ApiError::bad(format!("query parameter {name} is required")))?;
    v.parse()
        .map_err(|_| ApiError::bad(format!("{name} must be a non-negative integer, got {v:?}")))
}

async fn write_disk(
    State(st): State<Shared>,
    Params((vm, disk)): Params<(String, String)>,
    Query(q): Query<IoQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = raw_body(body)?;
    let offset = number(q.offset, "offset")?;
    let in_flight = InFlight::start(&st, &vm)?;
    with_vm(&st, &vm.clone(), move |r| {
        let _in_flight = in_flight;
        r.write(&disk, offset, &body)?;
        Ok(Json(serde_json::json!({"written": body.len()})).into_response())
    })
    .await
}

async fn read_disk(
    State(st): State<Shared>,
    Params((vm, disk)): Params<(String, String)>,
    Query(q): Query<IoQuery>,
) -> ApiResult<Response> {
    let offset = number(q.offset, "offset")?;
    let length = number(q.length, "length")?;
    read_vm(&st, &vm, move |r| {
        let data = r.read(&disk, offset, length)?;
        Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
    })
    .await
}

async fn digest(
    State(st): State<Shared>,
    Params((vm, disk)): Params<(String, String)>,
) -> ApiResult<Response> {
    read_vm(&st, &vm, move |r| {
        Ok(Json(crate::site::DigestResponse {
            sha256: r.digest(&disk)?,
        })
        .into_response())
    })
    .await
}

fn to_json<T: serde::Serialize>(v: T) -> ApiResult<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| ApiError::io(e.into()))
}

async fn recovery_points(
    State(st): State<Shared>,
    Params(vm): Params<String>,
) -> ApiResult<Response> {
    read_vm(&st, &vm, move |r| {
        Ok(Json(crate::site::RecoveryPointList {
            recovery_points: r.recovery_points()?,
        })
        .into_response())
    })
    .await
}

async fn enable(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<crate::site::EnableReplication>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::op_id("operationId", &req.operation_id)?;
    input::site_name("peerSite", &req.peer_site)?;
    input::in_range(
        "intervalSeconds",
        req.interval_seconds,
        1..=input::MAX_INTERVAL_SECONDS,
    )?;
    input::in_range(
        "recoveryPointRetentionHours",
        req.recovery_point_retention_hours,
        0..=input::MAX_HOURS,
    )?;
    input::in_range(
        "appConsistentFrequencyHours",
        req.app_consistent_frequency_hours,
        0..=input::MAX_HOURS,
    )?;
    if !(req.peer_url.starts_with("http://") || req.peer_url.starts_with("https://")) {
        return Err(ApiError::bad("peerUrl must be an http(s) URL"));
    }
    let vm2 = vm.clone();
    let resp = with_store(&st, move |s| {
        let op = req.operation_id.clone();
        s.idempotent(&vm2.clone(), Some(&op), |_, r| {
            if r.meta.role != crate::site::Role::Primary {
                return Err(ApiError::conflict(format!(
                    "VM {vm2} is not a primary here"
                )));
            }
            r.meta.inbound = None;
            r.meta.outbound = Some(meta::Outbound::from_enable(&req));
            // The answer is saved with the settings: a retry after a crash never starts the
            // initial transfer again (which would drop the replica's points).
            let answer = to_json(r.view().replication)?;
            r.meta.note_op(Some(&op), &answer);
            r.save()?;
            Ok(answer)
        })
    })
    .await?;
    driver::spawn(&st, &vm);
    Ok((StatusCode::ACCEPTED, Json(resp)).into_response())
}

/// `POST /v1/vms/{vm}/replication/accept`: the controller lets a source replicate into `vm`.
async fn accept(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<crate::site::AcceptReplication>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::op_id("operationId", &req.operation_id)?;
    input::site_name("sourceSite", &req.source_site)?;
    let op = req.operation_id.clone();
    let v = with_store(&st, move |s| {
        if !s.exists(&vm) {
            // Nothing here to protect: the first bulk transfer creates the replica.
            return to_json(s.accept_missing(&vm, &req.source_site)?);
        }
        // Once per operation id: a retry must not grant again what a transfer used up.
        s.idempotent(&vm, Some(&op), |_, r| {
            to_json(r.accept(&req.source_site, Some(&op))?)
        })
    })
    .await?;
    Ok(Json(v).into_response())
}

/// Runs storage work once per operation id (checked here): a repeated id answers the first
/// call's result.
async fn store_op(
    st: &Shared,
    vm: &str,
    op_id: String,
    f: impl FnOnce(&Store, &mut store::VmRec) -> ApiResult<serde_json::Value> + Send + 'static,
) -> ApiResult<Response> {
    input::op_id("operationId", &op_id)?;
    let vm = vm.to_string();
    let v = with_store(st, move |s| s.idempotent(&vm, Some(&op_id), f)).await?;
    Ok(Json(v).into_response())
}

/// Runs an async operation once per id, storing its answer.
async fn once(
    st: &Shared,
    op: &str,
    f: impl std::future::Future<Output = ApiResult<serde_json::Value>>,
) -> ApiResult<Response> {
    let id = op.to_string();
    if let Some(v) = with_store(st, move |s| Ok(s.op_lookup(&id))).await? {
        return Ok(Json(v).into_response());
    }
    let v = f.await?;
    let id = op.to_string();
    let v2 = v.clone();
    with_store(st, move |s| s.op_save(&id, &v2)).await?;
    Ok(Json(v).into_response())
}

async fn sync(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<crate::site::OperationRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::op_id("operationId", &req.operation_id)?;
    let vm2 = vm.clone();
    read_vm(&st, &vm2, |_| Ok(())).await?;
    once(&st, &req.operation_id, async {
        let rp = driver::sync_now(&st, &vm).await?;
        to_json(crate::site::SyncResult { recovery_point: rp })
    })
    .await
}

/// `POST /v1/cuts`: one recovery point per listed outbound VM, all cut at the same instant.
async fn cut(
    State(st): State<Shared>,
    body: Result<Json<crate::site::CutRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::op_id("cutId", &req.cut_id)?;
    if let Some(bad) = req.vms.iter().find(|n| !input::valid_name(n)) {
        return Err(ApiError::bad(format!("invalid VM name {bad:?} in vms")));
    }
    let op = format!("cut/{}", req.cut_id);
    // One cut at a time: a repeated cut id waits for the first and answers its result.
    let _one = st.cut_lock.lock().await;
    let id = op.clone();
    if let Some(v) = with_store(&st, move |s| Ok(s.op_lookup(&id))).await? {
        return Ok(Json(v).into_response());
    }
    let mut names = req.vms.clone();
    names.sort();
    names.dedup();
    // Candidates now; checked again under the store lock once their cycles are held.
    let names2 = names.clone();
    let candidates: Vec<String> = with_store(&st, move |s| {
        Ok(names2
            .into_iter()
            .filter(|n| s.read_vm(n, |r| Ok(driver::cuttable(r))).unwrap_or(false))
            .collect())
    })
    .await?;
    // Sorted order: no two holders of several cycle locks can deadlock.
    let mut guards = Vec::new();
    for vm in &candidates {
        guards.push(driver::cycle_lock(&st, vm).lock_owned().await);
    }
    let cut_id = req.cut_id.clone();
    // Every VM of the cut locked at once: no guest write of any of them interleaves.
    let (time, captures) = with_store(&st, move |s| {
        s.write_many(&candidates, |recs| {
            let time = jiff::Timestamp::now();
            let mut caps: Vec<driver::Capture> = Vec::new();
            for i in 0..recs.len() {
                if !driver::cuttable(recs[i].1) {
                    continue;
                }
                match driver::capture(recs[i].1, time, Some(cut_id.clone())) {
                    Ok(c) => caps.push(c),
                    Err(e) => {
                        // Nothing was sent: every captured set is dirty again.
                        for c in caps {
                            if let Some((_, r)) = recs.iter_mut().find(|(n, _)| *n == c.vm) {
                                r.tracker.abort(c.sealed.clone());
                            }
                        }
                        return Err(e);
                    }
                }
            }
            Ok((time, caps))
        })
    })
    .await?;
    if captures.is_empty() {
        return Err(ApiError::conflict(format!(
            "none of the VMs {names:?} replicates outbound from site {} with its initial \
             transfer done",
            st.site
        )));
    }
    let runs = captures.into_iter().map(|c| {
        let st = st.clone();
        async move {
            let vm = c.vm.clone();
            let res = driver::run_once(&st, &vm, Some(c)).await;
            (vm, res)
        }
    });
    let results = futures::future::join_all(runs).await;
    drop(guards);
    let mut points = Vec::new();
    let mut failed = Vec::new();
    for (vm, res) in results {
        match res {
            Ok(rp) => points.push(crate::site::CutPoint {
                vm,
                recovery_point: rp,
            }),
            Err(e) => failed.push(format!("{vm}: {e}")),
        }
    }
    if !failed.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("cut {} failed: {}", req.cut_id, failed.join("; ")),
        ));
    }
    let v = to_json(crate::site::CutResult {
        cut_id: req.cut_id.clone(),
        time,
        points,
    })?;
    let v2 = v.clone();
    with_store(&st, move |s| s.op_save(&op, &v2)).await?;
    Ok(Json(v).into_response())
}

async fn stop(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<crate::site::OperationRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    driver::stop(&st, &vm);
    store_op(&st, &vm, req.operation_id.clone(), move |_, r| {
        r.stop_inbound()?;
        to_json(r.view().replication)
    })
    .await
}

async fn failover(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<crate::site::FailoverRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    store_op(&st, &vm, req.operation_id.clone(), move |_, r| {
        let rp = r.failover(&req.recovery_point, Some(&req.operation_id))?;
        to_json(crate::site::FailoverResult { recovery_point: rp })
    })
    .await
}

async fn test_failover(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<crate::site::TestFailoverRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::site_name("network", &req.network)?;
    // The drill copy is a VM like any other: its name must be valid too.
    let copy = replica::drill_copy_name(&vm);
    if !input::valid_name(&copy) {
        return Err(ApiError::bad(format!(
            "VM {vm} cannot have a drill copy: its name {copy} would be longer than 63 \
             characters (VM names of at most 58 characters can be tested)"
        )));
    }
    store_op(&st, &vm, req.operation_id.clone(), move |s, r| {
        to_json(s.test_failover(
            r,
            &req.recovery_point,
            &req.network,
            Some(&req.operation_id),
        )?)
    })
    .await
}

async fn test_cleanup(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<crate::site::OperationRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    store_op(&st, &vm, req.operation_id.clone(), move |s, r| {
        let (vm_name, deleted) = s.test_cleanup(r)?;
        to_json(crate::site::CleanupResult { vm_name, deleted })
    })
    .await
}

async fn commit(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<crate::site::OperationRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    store_op(&st, &vm, req.operation_id.clone(), move |_, r| {
        to_json(r.commit_points(Some(&req.operation_id))?)
    })
    .await
}

/// A peer token bound to a site reaches only the VMs that replicate with that site: its
/// replicas here, a VM replicating to it, one the controller let it replicate into (403).
fn peer_may_use(caller: &Caller, r: &store::VmRec) -> ApiResult<()> {
    let Some(site) = caller.bound_site() else {
        return Ok(());
    };
    let m = &r.meta;
    if m.inbound.as_ref().is_some_and(|i| i.source_site == site)
        || m.outbound.as_ref().is_some_and(|o| o.peer_site == site)
        || m.accept_from.as_deref() == Some(site)
    {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        format!("VM {} does not replicate with site {site}", m.name),
    ))
}

async fn replica_begin(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params(vm): Params<String>,
    body: Result<Json<replica::BeginCycle>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    req.check()?;
    // A bound token speaks for its own site only (the replica's rules then apply to that site).
    if let Some(site) = caller.bound_site()
        && site != req.source_site
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "a token of site {site} cannot begin replication as site {}",
                req.source_site
            ),
        ));
    }
    let vm2 = vm.clone();
    let answer = with_store(&st, move |s| s.begin(&vm2, &req)).await?;
    // This VM follows the peer now: a replication task of its own (an old source's) must end.
    driver::stop(&st, &vm);
    Ok(Json(answer).into_response())
}

async fn replica_hashes(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params((vm, index)): Params<(String, usize)>,
) -> ApiResult<Response> {
    read_vm(&st, &vm, move |r| {
        peer_may_use(&caller, r)?;
        Ok(r.block_hashes(index)?.into_response())
    })
    .await
}

async fn replica_dirty(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params(vm): Params<String>,
) -> ApiResult<Response> {
    read_vm(&st, &vm, move |r| {
        peer_may_use(&caller, r)?;
        Ok(Json(r.dirty_set()?).into_response())
    })
    .await
}

#[derive(Deserialize)]
struct BulkQuery {
    #[serde(default)]
    bulk: bool,
}

async fn replica_blocks(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params((vm, cycle)): Params<(String, String)>,
    Query(q): Query<BulkQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = raw_body(body)?;
    let bulk = q.bulk;
    // Checksums are verified before the store lock is taken, so batches in flight verify in
    // parallel with the writes of the one before.
    let (body, verified) = tokio::task::spawn_blocking(move || {
        let verified = frame::verify_batch(&body);
        (body, verified)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let verified = verified.ok_or_else(|| ApiError::bad("malformed block batch"))?;
    let res = with_vm(&st, &vm.clone(), move |r| {
        peer_may_use(&caller, r)?;
        r.receive(&cycle, bulk, &body, &verified)
    })
    .await?;
    if !bulk && crate::fault::switch("TWINSITE_FAULT_HANG_BLOCKS").is_some() {
        hang_if_marked(&st).await;
    }
    Ok(Json(res).into_response())
}

/// Test-only fault injection (`TWINSITE_FAULT_HANG_BLOCKS`, feature `failpoints` only): while
/// `hang-blocks` exists in the data dir, a cycle's block batch is staged but never answered, so
/// a test can kill the agent mid-cycle.
async fn hang_if_marked(st: &Shared) {
    let dir = st.data_dir.clone();
    if dir.join("hang-blocks").exists() {
        let _ = std::fs::write(dir.join("hang-reached"), b"");
        std::future::pending::<()>().await;
    }
}

async fn replica_commit(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params(vm): Params<String>,
    body: Result<Json<replica::CommitCycle>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    req.check()?;
    with_vm(&st, &vm.clone(), move |r| {
        peer_may_use(&caller, r)?;
        Ok(Json(r.commit_cycle(&req)?).into_response())
    })
    .await
}
