//! The libvirt runtime: a site's VMs are the domains of its libvirtd.
//!
//! Shutdown is an ACPI request (`virDomainShutdown`) that fails when the guest is still
//! running after the agent's shutdown timeout (a guest without ACPI handling ignores it, as a
//! Hyper-V VM without integration services does); PowerOff is `virDomainDestroy`. The guest
//! agent answering `guest-ping` is what the agent reports as integration services.

use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain as VirDomain;
use virt::error::ErrorNumber;
use virt::sys;

use super::{Domain, DomainDisk, Runtime, RuntimeKind, xml};
use crate::agent::{ApiError, ApiResult};
use crate::site::Power;

/// How long the guest agent may take to answer a ping.
const GUEST_PING_SECONDS: i32 = 2;

pub struct Libvirt {
    conn: Connect,
    uri: String,
}

impl Libvirt {
    pub fn connect(uri: &str) -> Result<Self, String> {
        let conn = Connect::open(Some(uri))
            .map_err(|e| format!("connecting to libvirt at {uri}: {}", e.message()))?;
        Ok(Self {
            conn,
            uri: uri.to_string(),
        })
    }

    fn lookup(&self, name: &str) -> ApiResult<Option<VirDomain>> {
        match VirDomain::lookup_by_name(&self.conn, name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(e) => Err(self.failed("looking up domain", name, &e)),
        }
    }

    fn require(&self, name: &str) -> ApiResult<VirDomain> {
        self.lookup(name)?
            .ok_or_else(|| ApiError::not_found(format!("no libvirt domain {name} at {}", self.uri)))
    }

    fn failed(&self, what: &str, name: &str, e: &virt::error::Error) -> ApiError {
        ApiError::internal(format!("libvirt: {what} {name}: {}", e.message()))
    }

    fn describe(&self, d: &VirDomain) -> ApiResult<Domain> {
        let name = d
            .get_name()
            .map_err(|e| self.failed("reading the name of", "a domain", &e))?;
        let (state, _) = d
            .get_state()
            .map_err(|e| self.failed("reading the state of", &name, &e))?;
        let power = power_of(state);
        let text = d
            .get_xml_desc(0)
            .map_err(|e| self.failed("reading the definition of", &name, &e))?;
        let mut disks = Vec::new();
        for x in xml::disks(&text).map_err(ApiError::internal)? {
            let info = d
                .get_block_info(&x.target, 0)
                .map_err(|e| self.failed("reading the size of a disk of", &name, &e))?;
            disks.push(DomainDisk {
                name: x.target,
                size_bytes: info.capacity,
                format: x.format,
                path: x.path,
            });
        }
        let guest_agent = power == Power::Running
            && d.qemu_agent_command(r#"{"execute":"guest-ping"}"#, GUEST_PING_SECONDS, 0)
                .is_ok();
        Ok(Domain {
            name,
            power,
            disks,
            guest_agent,
        })
    }
}

/// Running and paused guests hold their disks; every other state is off.
fn power_of(state: sys::virDomainState) -> Power {
    match state {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_PAUSED | sys::VIR_DOMAIN_BLOCKED => {
            Power::Running
        }
        _ => Power::Off,
    }
}

impl Runtime for Libvirt {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Libvirt
    }

    fn domains(&self) -> ApiResult<Vec<Domain>> {
        let all = self
            .conn
            .list_all_domains(0)
            .map_err(|e| self.failed("listing", "domains", &e))?;
        let mut out = Vec::new();
        for d in &all {
            out.push(self.describe(d)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn domain(&self, name: &str) -> ApiResult<Option<Domain>> {
        match self.lookup(name)? {
            Some(d) => Ok(Some(self.describe(&d)?)),
            None => Ok(None),
        }
    }

    fn start(&self, name: &str) -> ApiResult<()> {
        let d = self.require(name)?;
        if d.is_active().unwrap_or(false) {
            return Ok(());
        }
        d.create()
            .map(|_| ())
            .map_err(|e| self.failed("starting", name, &e))
    }

    fn shutdown(&self, name: &str, timeout: Duration) -> ApiResult<()> {
        let d = self.require(name)?;
        if !d.is_active().unwrap_or(false) {
            return Ok(());
        }
        d.shutdown()
            .map_err(|e| self.failed("shutting down", name, &e))?;
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if !d.is_active().unwrap_or(true) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(ApiError::conflict(format!(
            "guest did not shut down within {}s; use PowerOff",
            timeout.as_secs()
        )))
    }

    fn power_off(&self, name: &str) -> ApiResult<()> {
        let d = self.require(name)?;
        match d.destroy() {
            Ok(()) => Ok(()),
            // Already off.
            Err(e) if e.code() == ErrorNumber::OperationInvalid => Ok(()),
            Err(e) => Err(self.failed("powering off", name, &e)),
        }
    }
}
