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

use std::path::Path;

use super::accel::{self, Accel};
use super::{
    AccelChoice, Domain, DomainDisk, Export, OverlayDisk, Runtime, RuntimeKind, bitmaps,
    checkpoints, export, overlay, xml,
};
use crate::agent::{ApiError, ApiResult};
use crate::site::DiskSpec;
use crate::site::Power;

/// Checkpoints the agent makes are named with this prefix; it never touches others.
const CHECKPOINT_PREFIX: &str = "twinsite-";

/// How long the guest agent may take to answer a ping.
const GUEST_PING_SECONDS: i32 = 2;

/// Keepalive of the libvirt connection: a probe every 5 s, the connection closed after 6
/// unanswered (as virsh does), so a libvirtd that went away is noticed between calls.
const KEEPALIVE_SECONDS: i32 = 5;
const KEEPALIVE_COUNT: u32 = 6;

pub struct Libvirt {
    /// The connection, opened again when libvirtd restarted (see [`Libvirt::conn`]).
    conn: std::sync::Mutex<Connect>,
    uri: String,
    /// What replicas boot under.
    accel: Accel,
    /// Domains with a backup job this process began and has not ended.
    backups: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Libvirt {
    pub fn connect(
        uri: &str,
        accel: AccelChoice,
        probe_kernel: Option<&Path>,
    ) -> Result<Self, String> {
        // libvirt prints every error to stderr by default; the agent reports them itself.
        virt::error::clear_error_callback();
        run_event_loop();
        let conn = open_connection(uri)?;
        let (accel, why) = accel::choose(&conn, accel, probe_kernel)?;
        tracing::info!(accelerator = accel.as_str(), reason = %why, "replicas boot under {}", accel.as_str());
        Ok(Self {
            conn: std::sync::Mutex::new(conn),
            uri: uri.to_string(),
            accel,
            backups: Default::default(),
        })
    }

    /// Ends a pull backup of `name` that an earlier agent process began and could not end (it
    /// died with the export open): libvirt keeps such a job, and refuses every new backup,
    /// until it is aborted. A backup job that this process holds, or that twinsite did not
    /// start (another backup tool's), is left alone and the export waits.
    fn end_stale_backup(&self, d: &VirDomain, name: &str) -> ApiResult<()> {
        let held = self
            .backups
            .lock()
            .map_err(|_| ApiError::internal("backup set poisoned"))?
            .contains(name);
        // (`get_job_stats` of the binding fails on a domain without a job: the job info, then
        // the backup's XML, which libvirt has only while a backup job runs.)
        let job = d
            .get_job_info()
            .map_err(|e| self.failed("reading the job of", name, &e))?;
        if job.r#type == sys::VIR_DOMAIN_JOB_NONE as i32 {
            return Ok(());
        }
        let Ok(backup) = checkpoints::backup_xml(d) else {
            return Ok(());
        };
        let ours = backup.contains(export::SOCKET_DIR_PREFIX);
        if held || !ours {
            return Err(ApiError::conflict(format!(
                "domain {name} has a backup job running{}; replication goes on when it ends",
                if held {
                    ""
                } else {
                    " that twinsite did not start"
                }
            )));
        }
        tracing::warn!(
            vm = name,
            "ending a backup job left by an earlier agent process"
        );
        checkpoints::abort_job(d)
            .map_err(|e| ApiError::internal(format!("libvirt: ending the backup of {name}: {e}")))
    }

    /// The connection to libvirtd, opened again when it was lost (libvirtd restarted, or stopped
    /// answering its keepalive): a restart costs the calls that were under way, not the agent.
    fn conn(&self) -> ApiResult<Conn> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| ApiError::internal("libvirt connection poisoned"))?;
        if !conn.is_alive().unwrap_or(false) {
            tracing::warn!(uri = %self.uri, "the connection to libvirt was lost: connecting again");
            let fresh = open_connection(&self.uri).map_err(ApiError::internal)?;
            let _ = std::mem::replace(&mut *conn, fresh).close();
        }
        Ok(Conn(conn.clone()))
    }

    fn lookup(&self, name: &str) -> ApiResult<Option<VirDomain>> {
        match VirDomain::lookup_by_name(&*self.conn()?, name) {
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

    /// Takes checkpoint `checkpoint` of every replicated disk of a failed-over domain.
    fn failover_checkpoint(
        &self,
        d: &VirDomain,
        name: &str,
        images: &[(String, std::path::PathBuf)],
        checkpoint: &str,
    ) -> ApiResult<()> {
        let mut cx = format!(
            "<domaincheckpoint><name>{}</name><disks>",
            xml::escape(checkpoint)
        );
        for (disk, _) in images {
            cx.push_str(&format!(
                "<disk name='{}' checkpoint='bitmap'/>",
                xml::escape(disk)
            ));
        }
        cx.push_str("</disks></domaincheckpoint>");
        checkpoints::create(d, &cx).map_err(|e| {
            ApiError::internal(format!("libvirt: checkpoint of {name} at failover: {e}"))
        })
    }

    /// A failed-over domain that runs already: an earlier attempt of this failover booted it,
    /// so it must run on the wrappers of the replica's images (a domain of that name on other
    /// disks is not this failover's, and its writes would never reach the replica). Its writes
    /// are tracked from the checkpoint that attempt made; an attempt that stopped before making
    /// one left the domain paused, so it is made now, before the guest's first instruction.
    fn booted_already(
        &self,
        d: &VirDomain,
        name: &str,
        images: &[(String, std::path::PathBuf)],
        checkpoint: &str,
    ) -> ApiResult<String> {
        let dom = self.describe(d)?;
        for (disk, raw) in images {
            let wrapper = raw.with_extension("qcow2");
            if !dom
                .disks
                .iter()
                .any(|x| x.name == *disk && x.path == wrapper)
            {
                return Err(ApiError::conflict(format!(
                    "domain {name} runs at this site, but its disk {disk} is not the replica's                      image {}: it was not started by this failover; power it off first",
                    wrapper.display()
                )));
            }
        }
        let paused = matches!(d.get_state(), Ok((sys::VIR_DOMAIN_PAUSED, _)));
        let mut ours: Vec<String> = checkpoints::list(d)
            .map_err(ApiError::internal)?
            .into_iter()
            .filter(|c| c.starts_with(CHECKPOINT_PREFIX))
            .collect();
        ours.sort();
        let cp = match ours.pop() {
            Some(cp) => cp,
            None => {
                if !paused {
                    // Started without one (by hand?): tracked from now on. The reverse
                    // replication of a domain compares block hashes, so nothing is missed.
                    tracing::warn!(vm = name, "a failed-over domain ran without a checkpoint");
                }
                self.failover_checkpoint(d, name, images, checkpoint)?;
                checkpoint.to_string()
            }
        };
        self.keep_checkpoint(name, &cp)?;
        if paused {
            d.resume().map_err(|e| self.failed("resuming", name, &e))?;
        }
        Ok(cp)
    }

    /// Starts checkpoint `cp` of domain `name`, which is off (libvirt takes checkpoints of
    /// running domains only): a persistent bitmap named `cp` in the top image of each disk
    /// (`qemu-img bitmap --add`, enabled, so QEMU and qemu-img track every later write into
    /// it), then the checkpoint given to libvirt over those bitmaps, so a backup of the running
    /// domain can start from it later.
    fn offline_checkpoint(
        &self,
        d: &VirDomain,
        name: &str,
        images: &[(DiskSpec, std::path::PathBuf, String)],
        cp: &str,
    ) -> ApiResult<()> {
        let mut disks = String::new();
        for (spec, path, format) in images {
            if format != "qcow2" {
                return Err(ApiError::conflict(format!(
                    "disk {} of {name} is {format}: change tracking needs qcow2",
                    spec.name
                )));
            }
            let out = std::process::Command::new("qemu-img")
                .args(["bitmap", "--add", "-f", "qcow2"])
                .arg(path)
                .arg(cp)
                .output()
                .map_err(|e| {
                    ApiError::internal(format!("running qemu-img (Debian package qemu-utils): {e}"))
                })?;
            if !out.status.success() {
                return Err(ApiError::internal(format!(
                    "qemu-img bitmap --add {cp} on {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            disks.push_str(&format!(
                "<disk name='{}' checkpoint='bitmap' bitmap='{}'/>",
                xml::escape(&spec.name),
                xml::escape(cp)
            ));
        }
        let text = format!(
            "<domaincheckpoint><name>{}</name><creationTime>{}</creationTime><disks>{disks}\
             </disks></domaincheckpoint>",
            xml::escape(cp),
            jiff::Timestamp::now().as_second()
        );
        checkpoints::redefine(d, &text).map_err(|e| {
            ApiError::internal(format!(
                "libvirt: checkpoint {cp} of {name}, which is off: {e}"
            ))
        })
    }

    /// Deletes checkpoint `cp` of domain `name`. libvirt deletes none of a domain that is off:
    /// its bitmap is removed from the images (each checkpoint's bitmap tracks every change
    /// since that checkpoint, so no other one needs it) and libvirt forgets it.
    fn delete_checkpoint(&self, d: &VirDomain, name: &str, cp: &str) -> ApiResult<()> {
        let failed = |e: String| {
            ApiError::internal(format!("libvirt: deleting checkpoint {cp} of {name}: {e}"))
        };
        if d.is_active().unwrap_or(true) {
            return checkpoints::delete(d, cp).map_err(failed);
        }
        for disk in self
            .describe(d)?
            .disks
            .iter()
            .filter(|x| x.format == "qcow2")
        {
            let out = std::process::Command::new("qemu-img")
                .args(["bitmap", "--remove", "-f", "qcow2"])
                .arg(&disk.path)
                .arg(cp)
                .output()
                .map_err(|e| ApiError::internal(format!("running qemu-img: {e}")))?;
            let err = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && !err.contains("not found") {
                return Err(failed(err.trim().to_string()));
            }
        }
        checkpoints::forget(d, cp).map_err(failed)
    }

    /// Makes libvirt network `name` if it is missing: a bridge with no forwarding and no
    /// addresses, so a drill copy reaches nothing outside it.
    fn ensure_isolated_network(&self, name: &str) -> ApiResult<()> {
        if let Ok(n) = virt::network::Network::lookup_by_name(&*self.conn()?, name) {
            if !n.is_active().unwrap_or(false) {
                n.create()
                    .map_err(|e| self.failed("starting network", name, &e))?;
            }
            return Ok(());
        }
        // Bridge names have at most 15 characters.
        let bridge = format!(
            "ts-{}",
            &hex::encode(blake3::hash(name.as_bytes()).as_bytes())[..8]
        );
        let text = format!(
            "<network><name>{}</name><bridge name='{bridge}'/></network>",
            xml::escape(name)
        );
        let n = virt::network::Network::define_xml(&*self.conn()?, &text)
            .map_err(|e| self.failed("defining network", name, &e))?;
        n.create()
            .map_err(|e| self.failed("starting network", name, &e))?;
        Ok(())
    }

    /// The security models of this host, each of which confines a replica with a dynamic label.
    fn security_models(&self) -> ApiResult<Vec<String>> {
        let caps = self
            .conn()?
            .get_capabilities()
            .map_err(|e| self.failed("reading the capabilities of", &self.uri, &e))?;
        xml::security_models(&caps).map_err(ApiError::internal)
    }

    /// Runs guest agent command `cmd` (no arguments) that answers a count (`{"return": N}`).
    fn agent_count(&self, name: &str, cmd: &str, timeout: Duration) -> ApiResult<u64> {
        let d = self.require(name)?;
        let secs = i32::try_from(timeout.as_secs().max(1)).unwrap_or(i32::MAX);
        let answer = d
            .qemu_agent_command(&format!(r#"{{"execute":"{cmd}"}}"#), secs, 0)
            .map_err(|e| {
                ApiError::conflict(format!(
                    "the guest agent of {name} did not run {cmd}: {}",
                    e.message()
                ))
            })?;
        serde_json::from_str::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v.get("return").and_then(serde_json::Value::as_u64))
            .ok_or_else(|| {
                ApiError::internal(format!(
                    "the guest agent of {name} answered {cmd} with {answer:?}"
                ))
            })
    }

    fn describe(&self, d: &VirDomain) -> ApiResult<Domain> {
        let name = d
            .get_name()
            .map_err(|e| self.failed("reading the name of", "a domain", &e))?;
        let (state, _) = d
            .get_state()
            .map_err(|e| self.failed("reading the state of", &name, &e))?;
        let power = power_of(state);
        let disks = self.disks_of(d, &name)?;
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

    /// The disks of domain `d` (named `name`), with their current sizes.
    fn disks_of(&self, d: &VirDomain, name: &str) -> ApiResult<Vec<DomainDisk>> {
        let text = d
            .get_xml_desc(0)
            .map_err(|e| self.failed("reading the definition of", name, &e))?;
        let mut disks = Vec::new();
        for x in xml::disks(&text).map_err(ApiError::internal)? {
            // QEMU answers for a running domain; while it starts or stops, and for a domain that
            // is off, the image itself says.
            let size = match d.get_block_info(&x.target, 0) {
                Ok(info) => info.capacity,
                Err(e) => image_size(&x.path, &x.format).map_err(|io| {
                    ApiError::internal(format!(
                        "reading the size of disk {} of {name}: {} ({io})",
                        x.target,
                        e.message()
                    ))
                })?,
            };
            disks.push(DomainDisk {
                name: x.target,
                size_bytes: size,
                format: x.format,
                path: x.path,
            });
        }
        Ok(disks)
    }
}

/// A reference to the connection, given back when dropped (the binding's `Connect` counts
/// references but closes none by itself).
struct Conn(Connect);

impl std::ops::Deref for Conn {
    type Target = Connect;
    fn deref(&self) -> &Connect {
        &self.0
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let _ = self.0.close();
    }
}

/// Opens a connection to libvirtd at `uri` with a keepalive.
fn open_connection(uri: &str) -> Result<Connect, String> {
    let conn = Connect::open(Some(uri))
        .map_err(|e| format!("connecting to libvirt at {uri}: {}", e.message()))?;
    if let Err(e) = conn.set_keep_alive(KEEPALIVE_SECONDS, KEEPALIVE_COUNT) {
        tracing::warn!(uri, error = %e.message(), "no keepalive on the libvirt connection");
    }
    Ok(conn)
}

/// libvirt's default event loop, on a thread of its own, started once before the first
/// connection: the keepalive and the notice of a closed connection need one.
fn run_event_loop() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            tracing::warn!(error = %e.message(), "no libvirt event loop: no keepalive");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    if virt::event::event_run_default_impl().is_err() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no libvirt event loop: no keepalive");
        }
    });
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

    fn accelerator(&self) -> Option<&'static str> {
        Some(self.accel.as_str())
    }

    fn domains(&self) -> ApiResult<Vec<Domain>> {
        let all = self
            .conn()?
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

    fn export(
        &self,
        name: &str,
        disks: &[DiskSpec],
        since: Option<&str>,
        next: Option<&str>,
        scratch: &Path,
    ) -> ApiResult<Box<dyn Export>> {
        let d = self.require(name)?;
        if let Some(cp) = next
            && !cp.starts_with(CHECKPOINT_PREFIX)
        {
            return Err(ApiError::internal(format!(
                "checkpoint {cp} lacks the agent's prefix"
            )));
        }
        // A disk whose size changed since the VM was protected would be read, and digested,
        // at its old size: the replica would lack its tail and a digest would pass on it.
        let now = self.disks_of(&d, name)?;
        for spec in disks {
            if let Some(x) = now.iter().find(|x| x.name == spec.name)
                && x.size_bytes != spec.size_bytes
            {
                return Err(ApiError::conflict(format!(
                    "disk {} of {name} is {} bytes now, {} when it was protected: a disk whose \
                     size changed is not replicated",
                    spec.name, x.size_bytes, spec.size_bytes
                )));
            }
        }
        if !d.is_active().unwrap_or(false) {
            let dom = self.describe(&d)?;
            let mut images = Vec::new();
            for spec in disks {
                let x = dom
                    .disks
                    .iter()
                    .find(|x| x.name == spec.name)
                    .ok_or_else(|| {
                        ApiError::conflict(format!(
                            "domain {name} has no disk {} any more",
                            spec.name
                        ))
                    })?;
                images.push((spec.clone(), x.path.clone(), x.format.clone()));
            }
            // qemu-nbd validates no bitmap chain (libvirt does, for a running domain): a
            // bitmap that misses writes would send a wrong base, so it is checked first.
            if let Some(cp) = since {
                for (spec, path, _) in &images {
                    bitmaps::check(path, cp).map_err(|why| {
                        ApiError::resync(format!(
                            "disk {} of {name}, which is off: {why}",
                            spec.name
                        ))
                    })?;
                }
            }
            // Without a checkpoint (protected while off, or resynchronizing), the transfer
            // starts one in the images before they are read: what QEMU writes once the domain
            // starts (or qemu-img meanwhile) is tracked from there.
            let started = match (since, next) {
                (None, Some(cp)) => {
                    self.offline_checkpoint(&d, name, &images, cp)?;
                    Some(cp.to_string())
                }
                _ => None,
            };
            return Ok(Box::new(export::image_export(&images, since, started)?));
        }
        let Some(next) = next else {
            return Err(ApiError::conflict(format!(
                "domain {name} runs: its disks are read only by replication"
            )));
        };
        std::fs::create_dir_all(scratch).map_err(ApiError::io)?;
        let dir = export::socket_dir()?;
        let socket = dir.path().join("backup.sock");
        let mut bx = String::from("<domainbackup mode='pull'>");
        if let Some(cp) = since {
            bx.push_str(&format!("<incremental>{}</incremental>", xml::escape(cp)));
        }
        bx.push_str(&format!(
            "<server transport='unix' socket='{}'/><disks>",
            xml::escape(&socket.to_string_lossy())
        ));
        let mut cx = format!(
            "<domaincheckpoint><name>{}</name><disks>",
            xml::escape(next)
        );
        let mut scratch_files = Vec::new();
        for spec in disks {
            let file = scratch.join(format!("{}.scratch", spec.name));
            let _ = std::fs::remove_file(&file);
            bx.push_str(&format!(
                "<disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>",
                xml::escape(&spec.name),
                xml::escape(&file.to_string_lossy())
            ));
            cx.push_str(&format!(
                "<disk name='{}' checkpoint='bitmap'/>",
                xml::escape(&spec.name)
            ));
            scratch_files.push(file);
        }
        bx.push_str("</disks></domainbackup>");
        cx.push_str("</disks></domaincheckpoint>");
        if let Some(cp) = since
            && !checkpoints::list(&d)
                .map_err(ApiError::internal)?
                .iter()
                .any(|c| c == cp)
        {
            return Err(ApiError::resync(format!(
                "domain {name} has no checkpoint {cp} any more"
            )));
        }
        self.end_stale_backup(&d, name)?;
        checkpoints::backup_begin(&d, &bx, &cx).map_err(|e| {
            let msg = format!("libvirt: starting a backup of {name}: {}", e.message);
            // Only a checkpoint that is gone or broken loses the base; anything else is
            // retried from the same checkpoint.
            if e.checkpoint_lost {
                ApiError::resync(msg)
            } else {
                ApiError::conflict(msg)
            }
        })?;
        if let Ok(mut held) = self.backups.lock() {
            held.insert(name.to_string());
        }
        let (job, backups, vm) = (d.clone(), self.backups.clone(), name.to_string());
        let end = Box::new(move || {
            if let Err(e) = checkpoints::abort_job(&job) {
                tracing::warn!(error = %e, "ending a backup job");
            }
            if let Ok(mut held) = backups.lock() {
                held.remove(&vm);
            }
            for f in scratch_files {
                let _ = std::fs::remove_file(f);
            }
        });
        Ok(Box::new(export::backup_export(
            dir,
            &socket,
            disks,
            since.is_some(),
            next.to_string(),
            end,
        )?))
    }

    fn pause(&self, name: &str) -> ApiResult<bool> {
        let d = self.require(name)?;
        match d.get_state() {
            Ok((sys::VIR_DOMAIN_RUNNING, _)) => {}
            _ => return Ok(false),
        }
        d.suspend().map_err(|e| self.failed("pausing", name, &e))?;
        Ok(true)
    }

    fn resume(&self, name: &str) -> ApiResult<()> {
        let d = self.require(name)?;
        if !matches!(d.get_state(), Ok((sys::VIR_DOMAIN_PAUSED, _))) {
            return Ok(());
        }
        d.resume()
            .map(|_| ())
            .map_err(|e| self.failed("resuming", name, &e))
    }

    fn freeze(&self, name: &str, timeout: Duration) -> ApiResult<u64> {
        self.agent_count(name, "guest-fsfreeze-freeze", timeout)
    }

    fn thaw(&self, name: &str, timeout: Duration) -> ApiResult<u64> {
        self.agent_count(name, "guest-fsfreeze-thaw", timeout)
    }

    fn keep_checkpoint(&self, name: &str, keep: &str) -> ApiResult<()> {
        let d = self.require(name)?;
        let all = checkpoints::list(&d).map_err(ApiError::internal)?;
        for cp in all {
            if cp != keep && cp.starts_with(CHECKPOINT_PREFIX) {
                self.delete_checkpoint(&d, name, &cp)?;
            }
        }
        Ok(())
    }

    fn drop_checkpoint(&self, name: &str, cp: &str) -> ApiResult<()> {
        let d = self.require(name)?;
        self.delete_checkpoint(&d, name, cp)
    }

    fn definition(&self, name: &str) -> ApiResult<String> {
        self.require(name)?
            .get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| self.failed("reading the definition of", name, &e))
    }

    fn boot_replica(
        &self,
        name: &str,
        definition: &str,
        images: &[(String, std::path::PathBuf)],
        checkpoint: &str,
        networks: &[(String, String)],
    ) -> ApiResult<String> {
        if let Some(d) = self.lookup(name)? {
            if d.is_active().unwrap_or(false) {
                return self.booted_already(&d, name, images, checkpoint);
            }
            // The domain (this site's old copy) moves onto the replica's images: checkpoints of
            // its old images mean nothing there.
            for cp in checkpoints::list(&d).map_err(ApiError::internal)? {
                if cp.starts_with(CHECKPOINT_PREFIX) {
                    checkpoints::forget(&d, &cp).map_err(|e| {
                        ApiError::internal(format!("libvirt: forgetting checkpoint {cp}: {e}"))
                    })?;
                }
            }
        }
        let mut wrappers = Vec::new();
        for (disk, raw) in images {
            wrappers.push((disk.clone(), qcow2_wrapper(raw)?));
        }
        let console = vm_dir_of(images).join("console.log");
        let security_models = self.security_models()?;
        let place = xml::Placement {
            networks,
            domain_type: Some(self.accel.domain_type()),
            security_models: &security_models,
        };
        let text = xml::for_replica(definition, name, &wrappers, &console, place)
            .map_err(ApiError::conflict)?;
        // Before anything is defined: a replica whose network is missing never starts.
        self.check_networks(&text, &[])?;
        let d = VirDomain::define_xml(&*self.conn()?, &text)
            .map_err(|e| self.failed("defining", name, &e))?;
        // Paused until the checkpoint exists: the guest's first write is already tracked.
        d.create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
            .map_err(|e| self.failed("starting", name, &e))?;
        crate::fault::hit("failover.boot");
        self.failover_checkpoint(&d, name, images, checkpoint)?;
        self.keep_checkpoint(name, checkpoint)?;
        d.resume().map_err(|e| self.failed("resuming", name, &e))?;
        Ok(checkpoint.to_string())
    }

    fn make_overlay(&self, disk: &OverlayDisk<'_>) -> ApiResult<()> {
        overlay::make(disk)
    }

    fn check_networks(&self, definition: &str, networks: &[(String, String)]) -> ApiResult<()> {
        let mut missing = Vec::new();
        for net in xml::networks(definition).map_err(ApiError::conflict)? {
            let here = networks
                .iter()
                .find(|(from, _)| *from == net)
                .map_or(net.as_str(), |(_, to)| to.as_str());
            match virt::network::Network::lookup_by_name(&*self.conn()?, here) {
                Ok(_) => {}
                Err(e) if e.code() == ErrorNumber::NoNetwork => missing.push(if here == net {
                    here.to_string()
                } else {
                    format!("{here} (mapped from {net})")
                }),
                Err(e) => return Err(self.failed("looking up network", here, &e)),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(ApiError::conflict(format!(
            "libvirt network {} does not exist at {}: define it, or map the source's network \
             to one that exists (Site spec.networkMappings)",
            missing.join(", "),
            self.uri
        )))
    }

    fn boot_drill(
        &self,
        name: &str,
        copy: &str,
        network: &str,
        definition: &str,
        images: &[(String, std::path::PathBuf)],
    ) -> ApiResult<()> {
        if let Some(d) = self.lookup(copy)?
            && d.is_active().unwrap_or(false)
        {
            return Ok(());
        }
        self.ensure_isolated_network(network)?;
        let console = vm_dir_of(images).join("console.log");
        let security_models = self.security_models()?;
        let text = xml::for_drill(
            definition,
            name,
            copy,
            network,
            images,
            &console,
            &security_models,
        )
        .map_err(ApiError::conflict)?;
        let d = VirDomain::define_xml(&*self.conn()?, &text)
            .map_err(|e| self.failed("defining", copy, &e))?;
        d.create().map_err(|e| self.failed("starting", copy, &e))?;
        Ok(())
    }

    fn remove(&self, name: &str) -> ApiResult<()> {
        let Some(d) = self.lookup(name)? else {
            return Ok(());
        };
        if d.is_active().unwrap_or(false) {
            match d.destroy() {
                Err(e)
                    if e.code() != ErrorNumber::NoDomain
                        && e.code() != ErrorNumber::OperationInvalid =>
                {
                    return Err(self.failed("powering off", name, &e));
                }
                _ => {}
            }
        }
        for cp in checkpoints::list(&d).map_err(ApiError::internal)? {
            let _ = checkpoints::forget(&d, &cp);
        }
        // With its NVRAM file: libvirt refuses to undefine a UEFI domain otherwise, and the
        // file is this domain's own (a drill copy's, or a replica's whose failover defines it
        // again from the source's definition).
        match d.undefine_flags(sys::VIR_DOMAIN_UNDEFINE_NVRAM) {
            // Removed meanwhile (a retry of the same cleanup).
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(()),
            res => res.map_err(|e| self.failed("undefining", name, &e)),
        }
    }

    fn demote(&self, name: &str, images: &[std::path::PathBuf]) -> ApiResult<()> {
        let Some(d) = self.lookup(name)? else {
            return Ok(());
        };
        if d.is_active().unwrap_or(true) {
            return Ok(());
        }
        let on_replica = self.describe(&d)?.disks.iter().any(|x| {
            images
                .iter()
                .any(|raw| x.path == *raw || x.path == raw.with_extension("qcow2"))
        });
        if on_replica {
            tracing::info!(
                vm = name,
                "undefining the domain on the replica's images: this site holds the replica now"
            );
            return self.remove(name);
        }
        if d.get_autostart().unwrap_or(false) {
            d.set_autostart(false)
                .map_err(|e| self.failed("disabling the autostart of", name, &e))?;
        }
        Ok(())
    }
}

/// The virtual size of a disk image: a qcow2 header's size field (big endian, at byte 24), or
/// a raw file's length.
fn image_size(path: &std::path::Path, format: &str) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    if format != "qcow2" {
        return Ok(f.metadata()?.len());
    }
    let mut head = [0u8; 32];
    f.read_exact_at(&mut head, 0)?;
    if &head[..4] != b"QFI\xfb" {
        return Err(std::io::Error::other("not a qcow2 image"));
    }
    Ok(u64::from_be_bytes(
        head[24..32].try_into().unwrap_or_default(),
    ))
}

/// The VM directory of the agent's images `images` (`DIR/disks/<disk>.img`), where a booted
/// replica's serial console is written.
fn vm_dir_of(images: &[(String, std::path::PathBuf)]) -> std::path::PathBuf {
    images
        .first()
        .and_then(|(_, raw)| raw.parent().and_then(|p| p.parent()))
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir)
}

/// A qcow2 image whose data is the raw image `raw` itself (`data_file_raw`): QEMU keeps its
/// dirty bitmaps in the qcow2 file while every guest write lands in `raw`, which stays a
/// valid raw image (the replica's recovery points and digests read it directly).
///
/// `qemu-img create` makes a new, empty data file, so the wrapper is created over a scratch
/// file and then pointed at `raw` (`qemu-img amend`), which keeps its content.
///
/// An existing wrapper is reused only when `qemu-img info` shows it whole and pointing at `raw`
/// (its bitmaps are the checkpoints' record); one a crash left empty or half-written is made
/// again, and the checkpoints then fail their bitmap check, so the VM compares block hashes.
/// A new wrapper is fsynced before it takes its name, and the name is fsynced with its directory.
fn qcow2_wrapper(raw: &std::path::Path) -> ApiResult<std::path::PathBuf> {
    let wrapper = raw.with_extension("qcow2");
    let size = std::fs::metadata(raw).map_err(ApiError::io)?.len();
    if wrapper.exists() {
        match wrapper_info(&wrapper).and_then(|info| wrapper_verdict(&info, raw, size)) {
            Ok(()) => return Ok(wrapper),
            Err(why) => {
                tracing::warn!(wrapper = %wrapper.display(), %why, "qcow2 wrapper made again");
                std::fs::remove_file(&wrapper).map_err(ApiError::io)?;
            }
        }
    }
    let tmp = raw.with_extension("qcow2.tmp");
    let scratch = raw.with_extension("scratch.raw");
    let steps: [Vec<std::ffi::OsString>; 2] = [
        vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-o".into(),
            format!("data_file={},data_file_raw=on", scratch.display()).into(),
            tmp.clone().into(),
            size.to_string().into(),
        ],
        vec![
            "amend".into(),
            "-o".into(),
            format!("data_file={}", raw.display()).into(),
            tmp.clone().into(),
        ],
    ];
    for args in steps {
        let out = std::process::Command::new("qemu-img")
            .args(&args)
            .output()
            .map_err(|e| {
                ApiError::internal(format!("running qemu-img (Debian package qemu-utils): {e}"))
            })?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&scratch);
            return Err(ApiError::internal(format!(
                "qemu-img {:?} for {}: {}",
                args.first(),
                wrapper.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    let _ = std::fs::remove_file(&scratch);
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(ApiError::io)?;
    std::fs::rename(&tmp, &wrapper).map_err(ApiError::io)?;
    if let Some(dir) = wrapper.parent() {
        crate::replication::tracker::sync_dir(dir).map_err(ApiError::io)?;
    }
    Ok(wrapper)
}

/// `qemu-img info --output=json` of `path`.
fn wrapper_info(path: &std::path::Path) -> Result<serde_json::Value, String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .map_err(|e| format!("running qemu-img (Debian package qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("qemu-img info answered no JSON: {e}"))
}

/// Whether `info` (of `qemu-img info`) is a whole qcow2 wrapper of the raw image `raw` of
/// `size` bytes; what is wrong with it if not.
fn wrapper_verdict(
    info: &serde_json::Value,
    raw: &std::path::Path,
    size: u64,
) -> Result<(), String> {
    let format = info["format"].as_str().unwrap_or("?");
    if format != "qcow2" {
        return Err(format!("it reads as {format}, not qcow2"));
    }
    let data = &info["format-specific"]["data"];
    if data["corrupt"].as_bool() == Some(true) {
        return Err("qemu-img marks it corrupt".into());
    }
    if data["data-file"].as_str() != Some(&*raw.to_string_lossy())
        || data["data-file-raw"].as_bool() != Some(true)
    {
        return Err(format!("its data file is not {} (raw)", raw.display()));
    }
    if info["virtual-size"].as_u64() != Some(size) {
        return Err(format!(
            "its size {} is not the image's {size}",
            info["virtual-size"]
        ));
    }
    Ok(())
}

#[cfg(test)]
mod wrapper_tests {
    use super::*;

    #[test]
    fn a_wrapper_is_trusted_only_whole_and_on_its_raw_image() {
        let raw = std::path::Path::new("/d/disk0.raw");
        let good = serde_json::json!({"format": "qcow2", "virtual-size": 4096,
            "format-specific": {"type": "qcow2", "data": {"data-file": "/d/disk0.raw",
            "data-file-raw": true, "corrupt": false}}});
        assert_eq!(wrapper_verdict(&good, raw, 4096), Ok(()));
        let mut other = good.clone();
        other["format-specific"]["data"]["data-file"] = "/d/scratch.raw".into();
        let mut corrupt = good.clone();
        corrupt["format-specific"]["data"]["corrupt"] = true.into();
        let as_raw = serde_json::json!({"format": "raw", "virtual-size": 0});
        for (info, says) in [
            (other, "data file"),
            (corrupt, "corrupt"),
            (as_raw, "reads as raw"),
        ] {
            let why = wrapper_verdict(&info, raw, 4096).unwrap_err();
            assert!(why.contains(says), "{why}");
        }
        assert!(
            wrapper_verdict(&good, raw, 8192)
                .unwrap_err()
                .contains("size")
        );
    }

    /// What a power cut can leave of a wrapper renamed before its data was durable (an empty or
    /// half-written file) is made again, never handed to QEMU.
    #[test]
    fn a_damaged_wrapper_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk0.raw");
        std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
        let wrapper = qcow2_wrapper(&raw).unwrap();
        let check = |w: &std::path::Path| {
            wrapper_info(w).and_then(|info| wrapper_verdict(&info, &raw, 1 << 20))
        };
        assert_eq!(check(&wrapper), Ok(()));
        for damage in [Vec::new(), b"QFI\xfb half a header".to_vec()] {
            std::fs::write(&wrapper, &damage).unwrap();
            assert!(check(&wrapper).is_err());
            assert_eq!(qcow2_wrapper(&raw).unwrap(), wrapper);
            assert_eq!(check(&wrapper), Ok(()), "after {damage:?}");
        }
        assert_eq!(std::fs::read(&raw).unwrap(), vec![7u8; 1 << 20]);
    }
}
