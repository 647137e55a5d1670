//! The provider seam: the controller talks to every site through [`SiteProvider`].
//!
//! The site agent (`twinsite agent`) is the first provider; [`AgentClient`] speaks its HTTP API
//! (docs/agent-api.md). The serde types here are that API's JSON, shared by the agent server and
//! the client so the two cannot drift apart.

mod client;
mod types;

pub use client::AgentClient;
pub use types::*;

use futures::future::BoxFuture;

/// Errors a site call can end in, split by what the caller should do about them.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The site did not answer (connection refused, timeout, TLS failure).
    #[error("site unreachable: {0}")]
    Unreachable(String),
    /// The token was refused (401).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Unknown VM, disk or recovery point (404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The VM is in the wrong state for the call (409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The request was refused as invalid (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Any other answer (5xx, unexpected status or an answer that does not parse).
    #[error("site error {0}: {1}")]
    Other(u16, String),
}

/// A future returned by a [`SiteProvider`] method (boxed so the trait is object-safe).
pub type SiteFuture<'a, T> = BoxFuture<'a, Result<T, SiteError>>;

/// One site as the controller sees it. Every mutating call carries an operation id: a repeated
/// call with the same id returns the first call's result and does the work once.
pub trait SiteProvider: Send + Sync {
    /// Succeeds when the site answers.
    fn health(&self) -> SiteFuture<'_, ()>;
    /// Every VM of the site, with replication and recovery point summaries.
    fn list_vms(&self) -> SiteFuture<'_, VmList>;
    /// One VM.
    fn get_vm<'a>(&'a self, vm: &'a str) -> SiteFuture<'a, Vm>;
    /// Creates a VM to protect.
    fn create_vm<'a>(&'a self, vm: &'a str, spec: &'a CreateVm) -> SiteFuture<'a, Vm>;
    /// Removes a VM that does not run, with its recovery points.
    fn delete_vm<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, ()>;
    /// Start, Shutdown (graceful; needs integration services) or PowerOff.
    fn power<'a>(&'a self, vm: &'a str, action: PowerAction, op_id: &'a str) -> SiteFuture<'a, Vm>;
    /// At the source: starts replication to the peer (answers at once).
    fn enable_replication<'a>(
        &'a self,
        vm: &'a str,
        params: &'a EnableReplication,
    ) -> SiteFuture<'a, ReplicationInfo>;
    /// At the source: new settings for a running replication (in force from its next cycle;
    /// no bulk transfer, the replica's points stay).
    fn update_replication_settings<'a>(
        &'a self,
        vm: &'a str,
        params: &'a ReplicationSettingsRequest,
    ) -> SiteFuture<'a, ReplicationInfo>;
    /// At the target: lets `params.source_site` replicate into `vm` here (called before
    /// enabling replication at the source; a VM that is not a replica accepts no cycle without it).
    fn accept_replication<'a>(
        &'a self,
        vm: &'a str,
        params: &'a AcceptReplication,
    ) -> SiteFuture<'a, AcceptResult>;
    /// At the source: sends everything not yet sent and returns the acknowledged point.
    fn sync<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, SyncResult>;
    /// At the source: one recovery point per listed outbound VM, all cut at one instant.
    fn cut<'a>(&'a self, req: &'a CutRequest) -> SiteFuture<'a, CutResult>;
    /// At either side: stops cycles (source) or stops accepting (replica).
    fn stop_replication<'a>(
        &'a self,
        vm: &'a str,
        op_id: &'a str,
    ) -> SiteFuture<'a, ReplicationInfo>;
    /// At the replica: recovery points, oldest first.
    fn recovery_points<'a>(&'a self, vm: &'a str) -> SiteFuture<'a, Vec<RecoveryPoint>>;
    /// At the replica: brings the VM up from a recovery point.
    fn failover<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        op_id: &'a str,
    ) -> SiteFuture<'a, FailoverResult>;
    /// As [`SiteProvider::failover`], with the VM's NICs moved from networks of the source
    /// to the target's networks `networks` names (a provider without networks refuses any).
    fn failover_mapped<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        networks: &'a [NetworkMap],
        op_id: &'a str,
    ) -> SiteFuture<'a, FailoverResult> {
        if networks.is_empty() {
            self.failover(vm, rp, op_id)
        } else {
            Box::pin(async move {
                Err(SiteError::BadRequest(
                    "this site provider maps no networks".into(),
                ))
            })
        }
    }
    /// At the replica: a running drill copy `<vm>-test` on `network`.
    fn test_failover<'a>(
        &'a self,
        vm: &'a str,
        rp: &'a RecoveryPointSelector,
        network: &'a str,
        op_id: &'a str,
    ) -> SiteFuture<'a, TestFailoverResult>;
    /// Deletes the drill copy of `vm`.
    fn test_failover_cleanup<'a>(
        &'a self,
        vm: &'a str,
        op_id: &'a str,
    ) -> SiteFuture<'a, CleanupResult>;
    /// Deletes every recovery point of `vm`.
    fn commit<'a>(&'a self, vm: &'a str, op_id: &'a str) -> SiteFuture<'a, CommitResult>;
    /// sha256 of a whole disk (for a replica, of its newest recovery point).
    fn digest<'a>(&'a self, vm: &'a str, disk: &'a str) -> SiteFuture<'a, String>;
    /// This provider naming `namespace` on every call (the agent refuses calls of one
    /// namespace for VMs another owns). `None`: the provider keeps no namespaces.
    fn for_namespace(&self, namespace: &str) -> Option<std::sync::Arc<dyn SiteProvider>> {
        let _ = namespace;
        None
    }
    /// Installs the credentials of the pair of this site and `site` (either may be left out).
    /// A provider without agent-to-agent replication has none to install.
    fn install_peer_credentials<'a>(
        &'a self,
        site: &'a str,
        creds: &'a PeerCredentials,
    ) -> SiteFuture<'a, PeerCredentialsResult> {
        let _ = (site, creds);
        Box::pin(async {
            Err(SiteError::Other(
                501,
                "this site takes no peer credentials".into(),
            ))
        })
    }
}
