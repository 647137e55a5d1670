//! The controller's errors.

use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("site: {0}")]
    Site(#[from] crate::site::SiteError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error(
        "leader election: the Lease in namespace {namespace} (--lease-namespace) cannot be \
         used; the namespace must exist, the controller does not create it: {source}"
    )]
    LeaseNamespace {
        namespace: String,
        source: kube_lease_manager::LeaseManagerError,
    },
    /// Not a failure: the deletion of a ReplicatedVM cannot finish yet (a job runs, the only
    /// copy of the VM is kept, a site is not registered yet). The finalizer stays; the
    /// reconcile is repeated after `retry`.
    #[error("deletion waits: {reason}")]
    DeletionWaits {
        reason: String,
        retry: std::time::Duration,
    },
    #[error("serving {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
}
