//! twinsite: declarative disaster recovery for virtual machines.
//!
//! - [`api`]: the custom resources people write.
//! - [`controller`]: reconcilers that drive the sites toward the resources.
//! - [`site`]: the provider seam the controller talks to sites through, and the agent client.
//! - [`agent`]: the site agent's HTTP server and VM runtime.
//! - [`replication`]: change tracking, the block stream, recovery points and resync.
//! - [`secret`]: credentials whose `Debug` never shows them; [`redact`]: URLs as they may be
//!   shown.
//! - [`fault`]: failpoints for crash injection (test builds only).
//! - [`envtest`]: a real etcd + kube-apiserver on loopback, for tests and the local demo.
//! - [`local`]: `twinsite local`, the whole stack on one machine.
//! - [`logging`]: the log output of the controller and the agent.
//! - [`nbd`]: a blocking NBD client for libvirt backups and qemu-nbd exports.
//! - [`plugin`]: `kubectl twinsite`, status and actions as a kubectl plugin.

pub mod agent;
pub mod api;
pub mod body;
pub mod controller;
pub mod envtest;
pub mod fault;
#[cfg(test)]
mod fuzz;
pub mod local;
pub mod logging;
pub mod nbd;
pub mod plugin;
pub mod redact;
pub mod replication;
pub mod secret;
pub mod site;

/// Installs the process-wide TLS crypto provider (ring). Safe to call more than once.
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
