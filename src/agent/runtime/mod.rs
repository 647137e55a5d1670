//! What a site's VMs are: the seam between the agent and a hypervisor.
//!
//! - `builtin`: VMs the agent keeps itself (disks as files under the data directory, guest
//!   writes through the agent's routes); the store is all there is, so this runtime knows no
//!   domains. It serves fast tests and the scale benchmarks.
//! - `libvirt` (cargo feature `libvirt`): real libvirt/QEMU domains. The agent lists them,
//!   powers them on and off, and refuses guest writes on them (their guests write for
//!   themselves).
//!
//! Handlers ask the runtime first: a VM that is a domain is served from the hypervisor, any
//! other from the store.

#[cfg(feature = "libvirt")]
mod libvirt;
#[cfg(feature = "libvirt")]
mod xml;

use std::time::Duration;

use super::{ApiError, ApiResult};
use crate::site::{DiskSpec, Power};

/// `--runtime`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RuntimeKind {
    #[default]
    Builtin,
    Libvirt,
}

/// A VM as its hypervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub power: Power,
    pub disks: Vec<DomainDisk>,
    /// The guest agent answers (integration services: graceful shutdown, quiesced points).
    pub guest_agent: bool,
}

/// One disk of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainDisk {
    /// The guest's device name (`vda`).
    pub name: String,
    pub size_bytes: u64,
    pub format: String,
    pub path: std::path::PathBuf,
}

impl DomainDisk {
    pub fn spec(&self) -> DiskSpec {
        DiskSpec {
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            format: Some(self.format.clone()),
        }
    }
}

/// A site's hypervisor.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    /// Every domain of the site.
    fn domains(&self) -> ApiResult<Vec<Domain>>;
    /// The domain `name`, if the hypervisor has one.
    fn domain(&self, name: &str) -> ApiResult<Option<Domain>>;
    fn start(&self, name: &str) -> ApiResult<()>;
    /// A graceful (ACPI) shutdown; fails when the guest is still running after `timeout`.
    fn shutdown(&self, name: &str, timeout: Duration) -> ApiResult<()>;
    /// A hard stop.
    fn power_off(&self, name: &str) -> ApiResult<()>;
}

/// The builtin runtime: the agent's own VMs, all in the store.
pub struct Builtin;

impl Runtime for Builtin {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Builtin
    }
    fn domains(&self) -> ApiResult<Vec<Domain>> {
        Ok(Vec::new())
    }
    fn domain(&self, _name: &str) -> ApiResult<Option<Domain>> {
        Ok(None)
    }
    fn start(&self, name: &str) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn shutdown(&self, name: &str, _timeout: Duration) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn power_off(&self, name: &str) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
}

fn not_a_domain(name: &str) -> ApiError {
    ApiError::not_found(format!("VM {name} is not a hypervisor domain at this site"))
}

/// Opens the runtime the agent was started with.
pub fn open(kind: RuntimeKind, uri: Option<&str>) -> Result<Box<dyn Runtime>, String> {
    match kind {
        RuntimeKind::Builtin => Ok(Box::new(Builtin)),
        #[cfg(feature = "libvirt")]
        RuntimeKind::Libvirt => Ok(Box::new(libvirt::Libvirt::connect(
            uri.unwrap_or("qemu:///system"),
        )?)),
        #[cfg(not(feature = "libvirt"))]
        RuntimeKind::Libvirt => {
            let _ = uri;
            Err(
                "this twinsite was built without the libvirt runtime; build it with \
                 `cargo build --features libvirt` (needs Debian's libvirt-dev)"
                    .into(),
            )
        }
    }
}
