//! The site agent: owns one site's VMs (disks, power, role) and their replication, and answers
//! the controller over HTTP. All state lives under the data directory.
//!
//! - [`server`]: startup, routes, tokens, request limits;
//! - [`handlers`]: one function per route, turning requests into store and driver calls;
//! - [`store`], [`meta`], [`replica`], [`pending`]: VMs on disk, their metadata, the receiving
//!   side of replication and the newest point while points wait to be applied; no HTTP here;
//! - [`driver`]: the sending side (bulk transfers and cycles); [`cut`]: consistent cuts;
//! - [`guest`]: what a running guest is to the agent (writes in flight, graceful shutdown);
//! - [`runtime`]: what the site's VMs are (the agent's own, or libvirt domains);
//! - [`metrics`]: what Prometheus scrapes at `GET /metrics`.
//!
//! Agent-to-agent replication routes live under `/v1/replica` (docs/agent.md).

mod auth;
mod budget;
mod cut;
mod disk_files;
mod driver;
mod error;
mod guest;
mod handlers;
mod input;
mod limits;
mod meta;
pub mod metrics;
mod peers;
mod pending;
mod replica;
pub mod runtime;
mod server;
mod store;
mod verify;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::secret::Secret;
pub use error::{AgentError, ApiError, ApiResult, ErrorKind};
pub use server::{AgentArgs, run};
pub use store::Store;

type Drivers = std::collections::HashMap<
    String,
    (
        tokio::sync::mpsc::Sender<driver::Msg>,
        tokio::task::JoinHandle<()>,
    ),
>;

struct AppState {
    site: String,
    data_dir: PathBuf,
    /// The controller's token: every route.
    token: Secret,
    /// Peer agents' tokens, each with the site it is bound to: the agent-to-agent routes only.
    peer_tokens: Vec<auth::PeerToken>,
    /// Peer credentials the controller installed, per source site (the same reach).
    installed: std::sync::RwLock<peers::Installed>,
    /// Requests served at once on the controller's routes and on the agent-to-agent routes.
    /// Apart, so a peer's block stream never waits behind controller calls that wait for it.
    control_requests: Arc<tokio::sync::Semaphore>,
    replica_requests: Arc<tokio::sync::Semaphore>,
    /// Request bodies in flight over every route, and the slots of the routes without a token.
    budget: Arc<budget::Budget>,
    store: Store,
    drivers: Mutex<Drivers>,
    /// Per VM: held for the whole of a cycle, so a VM's cycles never overlap.
    cycle_locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The bulk transfers under way, per VM: how far each has come (`GET /v1/vms`).
    transfers: Mutex<std::collections::HashMap<String, Arc<driver::Transfer>>>,
    /// Block batches in flight at once over all VMs (bounds the memory of transfers).
    send_slots: tokio::sync::Semaphore,
    /// Cuts run one at a time.
    cut_lock: tokio::sync::Mutex<()>,
    /// Guest writes in flight and graceful shutdowns under way, per VM.
    guests: Mutex<std::collections::HashMap<String, Guest>>,
    /// How long a graceful shutdown waits for the guest.
    shutdown_timeout: std::time::Duration,
    /// `--boot-file-dir`: where the kernels a replicated definition boots may be.
    boot_file_dirs: Vec<PathBuf>,
    /// What peers may make this site keep.
    limits: limits::PeerLimits,
    /// What the site's VMs are: the agent's own, or a hypervisor's domains.
    runtime: Box<dyn runtime::Runtime>,
    /// What `GET /metrics` serves.
    metrics: metrics::Metrics,
    /// How long after a verification of a replica the next is due (`--verify-interval-seconds`).
    verify_every: std::time::Duration,
    /// A verification runs (one at a time: each reads whole disks).
    verifying: std::sync::atomic::AtomicBool,
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

/// Runs storage work off the async threads.
async fn with_store<T: Send + 'static>(
    st: &Shared,
    f: impl FnOnce(&Store) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || f(&st.store))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
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
