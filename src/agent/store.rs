//! VM runtime state on disk.
//!
//! ```text
//! DATA/vms/<vm>/vm.json          metadata (power, role, disks), replaced atomically
//! DATA/vms/<vm>/disks/<d>.img    disk (sparse file)
//! DATA/vms/<vm>/track/           change-tracking journal (see replication::tracker)
//! DATA/ops/<hex id>.json         answers of finished operations, for idempotency
//! ```

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiResult};
use crate::fault;
use crate::replication::tracker::{Tracker, sync_dir};
use crate::replication::{blocks_of_range, sha256_file};
use crate::site::{
    BrokenVm, CreateVm, DeleteResult, DiskSpec, Power, PowerAction, ReplicationMode,
    ReplicationState, Role, Vm, VmList,
};

/// Answers of the last operations of a VM kept in its `vm.json` (older ones are dropped).
const OPS_KEPT: usize = 32;

/// Persisted part of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct VmMeta {
    pub(super) name: String,
    pub(super) power: Power,
    pub(super) role: Role,
    pub(super) integration_services: bool,
    pub(super) disks: Vec<DiskSpec>,
    #[serde(default)]
    pub(super) network: Option<String>,
    /// Outbound replication (at the source).
    #[serde(default)]
    pub(super) outbound: Option<super::replica::Outbound>,
    /// Inbound replication and recovery points (at the replica).
    #[serde(default)]
    pub(super) inbound: Option<super::replica::Inbound>,
    /// Id of the cycle (as the peer committed it) since whose state the change tracker holds
    /// every change of the disks: the last cycle acknowledged (a source), or the last cycle
    /// committed before a failover (a replica that became primary). Reverse resync sends only
    /// tracked blocks when both sides name the same cycle. `None`: unknown.
    #[serde(default)]
    pub(super) journal_base: Option<String>,
    /// The controller allowed this site to replicate into this VM (`replication/accept`): the
    /// next bulk transfer from it may turn the VM into its replica. Nothing else does.
    #[serde(default)]
    pub(super) accept_from: Option<String>,
    /// Answers of operations on this VM, saved in the same write as their effect, so a retry
    /// after a crash answers the first result instead of doing (or refusing) it again.
    #[serde(default)]
    pub(super) ops: Vec<OpDone>,
}

/// A finished operation of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct OpDone {
    pub(super) id: String,
    pub(super) answer: serde_json::Value,
}

impl VmMeta {
    /// A new VM's metadata.
    pub(super) fn new(name: &str, power: Power, role: Role, spec: (&[DiskSpec], bool)) -> Self {
        Self {
            name: name.to_string(),
            power,
            role,
            integration_services: spec.1,
            disks: spec.0.to_vec(),
            network: None,
            outbound: None,
            inbound: None,
            journal_base: None,
            accept_from: None,
            ops: Vec::new(),
        }
    }

    /// Records the answer of operation `id`; saved with the next `save`.
    pub(super) fn note_op(&mut self, id: Option<&str>, answer: &serde_json::Value) {
        let Some(id) = id else { return };
        if self.ops.iter().any(|o| o.id == id) {
            return;
        }
        self.ops.push(OpDone {
            id: id.to_string(),
            answer: answer.clone(),
        });
        let extra = self.ops.len().saturating_sub(OPS_KEPT);
        self.ops.drain(..extra);
    }

    fn op_answer(&self, id: &str) -> Option<serde_json::Value> {
        self.ops
            .iter()
            .find(|o| o.id == id)
            .map(|o| o.answer.clone())
    }
}

pub(super) struct VmRec {
    pub(super) meta: VmMeta,
    pub(super) disks: Vec<File>,
    pub(super) tracker: Tracker,
}

/// Every VM of the site.
pub struct Store {
    pub(super) root: PathBuf,
    pub(super) site: String,
    max_disk_bytes: u64,
    pub(super) vms: BTreeMap<String, VmRec>,
    /// VMs whose state could not be loaded, with the reason: reported, never touched.
    pub(super) broken: BTreeMap<String, String>,
}

/// A stored answer of an operation.
#[derive(Serialize, Deserialize)]
struct OpRecord {
    status: u16,
    body: serde_json::Value,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !n.starts_with('.')
}

/// Writes `value` to `path` so that a crash leaves either the old or the new file.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

impl Store {
    /// Opens the data directory, loading every VM; half-created VMs are removed.
    pub fn open(root: &Path, site: &str, max_disk_bytes: u64) -> Result<Self, ApiError> {
        let vms_dir = root.join("vms");
        fs::create_dir_all(&vms_dir).map_err(ApiError::io)?;
        fs::create_dir_all(root.join("ops")).map_err(ApiError::io)?;
        let mut vms = BTreeMap::new();
        let mut broken = BTreeMap::new();
        for e in fs::read_dir(&vms_dir).map_err(ApiError::io)? {
            let e = e.map_err(ApiError::io)?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".tmp-") {
                // A create that crashed before its rename: it never existed.
                fs::remove_dir_all(e.path()).map_err(ApiError::io)?;
                continue;
            }
            // One VM that does not load is reported broken; the others serve.
            match load_vm(&e.path(), &name) {
                Ok(rec) => {
                    vms.insert(name, rec);
                }
                Err(err) => {
                    tracing::error!(vm = %name, error = %err, "VM does not load; reported broken");
                    broken.insert(name, err);
                }
            }
        }
        Ok(Self {
            root: root.to_path_buf(),
            site: site.to_string(),
            max_disk_bytes,
            vms,
            broken,
        })
    }

    /// Marks a loaded VM broken (its recovery at start failed): it is no longer served.
    pub(super) fn mark_broken(&mut self, vm: &str, reason: String) {
        tracing::error!(vm, error = %reason, "VM reported broken");
        self.vms.remove(vm);
        self.broken.insert(vm.to_string(), reason);
    }

    pub(super) fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join("vms").join(vm)
    }

    pub(super) fn rec(&self, vm: &str) -> ApiResult<&VmRec> {
        self.vms.get(vm).ok_or_else(|| self.missing(vm))
    }

    /// The error for a VM that is not served: broken, or not here.
    pub(super) fn missing(&self, vm: &str) -> ApiError {
        match self.broken.get(vm) {
            Some(reason) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("VM {vm} is broken at this site: {reason}"),
            ),
            None => ApiError::not_found(format!("VM {vm} is not at this site")),
        }
    }

    fn view(&self, r: &VmRec) -> Vm {
        Vm {
            name: r.meta.name.clone(),
            power: r.meta.power,
            role: r.meta.role,
            integration_services: r.meta.integration_services,
            disks: r.meta.disks.clone(),
            replication: super::replica::replication_info(r),
            recovery_points: super::replica::rp_summary(r),
            test_copy: self.test_copy_of(r),
            network: r.meta.network.clone(),
        }
    }

    pub fn list(&self) -> VmList {
        VmList {
            site: self.site.clone(),
            vms: self.vms.values().map(|r| self.view(r)).collect(),
            broken: self
                .broken
                .iter()
                .map(|(name, error)| BrokenVm {
                    name: name.clone(),
                    error: error.clone(),
                })
                .collect(),
        }
    }

    pub fn vm(&self, vm: &str) -> ApiResult<Vm> {
        self.rec(vm).map(|r| self.view(r))
    }

    /// Creates a VM; repeating the same create answers the VM, a different one is a conflict.
    pub fn create(&mut self, vm: &str, spec: &CreateVm) -> ApiResult<Vm> {
        if !valid_name(vm) {
            return Err(ApiError::bad(format!("invalid VM name {vm:?}")));
        }
        if spec.disks.is_empty() {
            return Err(ApiError::bad("a VM needs at least one disk"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for d in &spec.disks {
            if !valid_name(&d.name) || !seen.insert(d.name.as_str()) {
                return Err(ApiError::bad(format!(
                    "invalid or repeated disk name {:?}",
                    d.name
                )));
            }
            if d.size_bytes == 0 || d.size_bytes > self.max_disk_bytes {
                return Err(ApiError::bad(format!(
                    "disk {} sizeBytes must be between 1 and {}",
                    d.name, self.max_disk_bytes
                )));
            }
        }
        if self.broken.contains_key(vm) {
            return Err(self.missing(vm));
        }
        if let Some(r) = self.vms.get(vm) {
            if r.meta.disks == spec.disks
                && r.meta.integration_services == spec.integration_services
                && r.meta.role == Role::Primary
            {
                return Ok(self.view(r));
            }
            return Err(ApiError::conflict(format!(
                "VM {vm} already exists with another definition"
            )));
        }
        let meta = VmMeta::new(
            vm,
            spec.power,
            Role::Primary,
            (&spec.disks, spec.integration_services),
        );
        let rec = self.materialize(vm, meta).map_err(ApiError::io)?;
        let v = self.view(&rec);
        self.vms.insert(vm.to_string(), rec);
        Ok(v)
    }

    /// Builds the VM in a temporary directory and renames it into place, so a crash never
    /// leaves half a VM.
    pub(super) fn materialize(&self, vm: &str, meta: VmMeta) -> io::Result<VmRec> {
        let tmp = self.root.join("vms").join(format!(".tmp-{vm}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(tmp.join("disks"))?;
        for d in &meta.disks {
            let f = File::create(tmp.join("disks").join(format!("{}.img", d.name)))?;
            f.set_len(d.size_bytes)?;
            f.sync_all()?;
        }
        sync_dir(&tmp.join("disks"))?;
        write_atomic(&tmp.join("vm.json"), &serde_json::to_vec_pretty(&meta)?)?;
        let dst = self.vm_dir(vm);
        fs::rename(&tmp, &dst)?;
        sync_dir(&self.root.join("vms"))?;
        open_vm(&dst, meta)
    }

    pub(super) fn save(&self, vm: &str) -> ApiResult<()> {
        let r = self.rec(vm)?;
        let bytes = serde_json::to_vec_pretty(&r.meta).map_err(|e| ApiError::io(e.into()))?;
        write_atomic(&self.vm_dir(vm).join("vm.json"), &bytes).map_err(ApiError::io)
    }

    pub fn delete(&mut self, vm: &str) -> ApiResult<serde_json::Value> {
        let r = self.rec(vm)?;
        if r.meta.power == Power::Running {
            return Err(ApiError::conflict(format!(
                "VM {vm} is running; power it off first"
            )));
        }
        self.vms.remove(vm);
        let dir = self.vm_dir(vm);
        // Rename first so a crash mid-removal leaves a leftover the next start cleans up.
        let tmp = self.root.join("vms").join(format!(".tmp-{vm}"));
        fs::rename(&dir, &tmp).map_err(ApiError::io)?;
        sync_dir(&self.root.join("vms")).map_err(ApiError::io)?;
        fs::remove_dir_all(&tmp).map_err(ApiError::io)?;
        Ok(serde_json::to_value(DeleteResult { deleted: true }).unwrap_or_default())
    }

    pub fn power(&mut self, vm: &str, action: PowerAction) -> ApiResult<serde_json::Value> {
        let r = self.rec_mut(vm)?;
        match action {
            PowerAction::Start => {
                if r.meta.role == Role::Replica {
                    return Err(ApiError::conflict(format!(
                        "VM {vm} is a replica here; fail it over to start it"
                    )));
                }
                r.meta.power = Power::Running;
            }
            PowerAction::Shutdown => {
                if r.meta.power == Power::Running && !r.meta.integration_services {
                    return Err(ApiError::conflict(format!(
                        "VM {vm} has no integration services: it cannot be shut down gracefully"
                    )));
                }
                r.meta.power = Power::Off;
            }
            PowerAction::PowerOff => r.meta.power = Power::Off,
        }
        self.save(vm)?;
        let v = self.vm(vm)?;
        serde_json::to_value(v).map_err(|e| ApiError::io(e.into()))
    }

    fn disk_index(&self, vm: &str, disk: &str) -> ApiResult<(usize, u64)> {
        let r = self.rec(vm)?;
        r.meta
            .disks
            .iter()
            .position(|d| d.name == disk)
            .map(|i| (i, r.meta.disks[i].size_bytes))
            .ok_or_else(|| ApiError::not_found(format!("VM {vm} has no disk {disk}")))
    }

    /// Guest write: tracked, then written, both durable before it returns.
    pub fn write(&mut self, vm: &str, disk: &str, offset: u64, data: &[u8]) -> ApiResult<()> {
        let (i, size) = self.disk_index(vm, disk)?;
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ApiError::bad(format!(
                "write of {len} bytes at {offset} goes past the end of disk {disk} ({size} bytes)"
            )));
        }
        let r = self.rec_mut(vm)?;
        if r.meta.power != Power::Running || r.meta.role == Role::Replica {
            return Err(ApiError::conflict(format!("VM {vm} does not run here")));
        }
        // Journal first: a block whose write lands must never be missing from the dirty set.
        r.tracker
            .record(i, blocks_of_range(offset, len))
            .map_err(ApiError::io)?;
        fault::hit("guest.journal");
        r.disks[i]
            .write_all_at(data, offset)
            .map_err(ApiError::io)?;
        fault::hit("guest.data");
        r.disks[i].sync_data().map_err(ApiError::io)
    }

    pub fn read(&self, vm: &str, disk: &str, offset: u64, length: u64) -> ApiResult<Vec<u8>> {
        let (i, size) = self.disk_index(vm, disk)?;
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(ApiError::bad(format!(
                "read of {length} bytes at {offset} goes past the end of disk {disk} ({size} bytes)"
            )));
        }
        if length > 256 << 20 {
            return Err(ApiError::bad("reads are limited to 256 MiB"));
        }
        let mut buf = vec![0u8; length as usize];
        self.rec(vm)?.disks[i]
            .read_exact_at(&mut buf, offset)
            .map_err(ApiError::io)?;
        Ok(buf)
    }

    pub fn digest(&self, vm: &str, disk: &str) -> ApiResult<String> {
        let (i, size) = self.disk_index(vm, disk)?;
        sha256_file(&self.rec(vm)?.disks[i], size).map_err(ApiError::io)
    }

    fn op_path(&self, id: &str) -> PathBuf {
        self.root
            .join("ops")
            .join(format!("{}.json", hex::encode(id)))
    }

    /// The stored answer of operation `id`, if it finished: in the VM's metadata (operations on
    /// a VM) or under `DATA/ops` (operations whose VM is gone, cuts, syncs).
    pub(super) fn op_lookup(&self, vm: Option<&str>, id: &str) -> Option<serde_json::Value> {
        if let Some(v) = vm.and_then(|vm| self.vms.get(vm))
            && let Some(a) = v.meta.op_answer(id)
        {
            return Some(a);
        }
        let bytes = fs::read(self.op_path(id)).ok()?;
        serde_json::from_slice::<OpRecord>(&bytes)
            .ok()
            .map(|r| r.body)
    }

    /// Stores the answer of operation `id` under `DATA/ops`, durably (for answers no VM keeps).
    pub(super) fn op_save(&self, id: &str, body: &serde_json::Value) -> ApiResult<()> {
        let rec = OpRecord {
            status: 200,
            body: body.clone(),
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| ApiError::io(e.into()))?;
        fault::hit("op.record");
        write_atomic(&self.op_path(id), &bytes).map_err(ApiError::io)
    }

    /// Runs `f` on `vm` once per operation id: a repeated id answers the stored result. `f` may
    /// note the answer in the VM's metadata itself, to save it in the same write as its effect
    /// (operations that are not naturally repeatable do); otherwise it is saved right after.
    pub fn idempotent(
        &mut self,
        vm: &str,
        op_id: Option<&str>,
        f: impl FnOnce(&mut Self) -> ApiResult<serde_json::Value>,
    ) -> ApiResult<serde_json::Value> {
        if let Some(id) = op_id
            && let Some(v) = self.op_lookup(Some(vm), id)
        {
            return Ok(v);
        }
        let body = f(self)?;
        if let Some(id) = op_id {
            match self.vms.get_mut(vm) {
                Some(r) if r.meta.op_answer(id).is_none() => {
                    r.meta.note_op(Some(id), &body);
                    self.save(vm)?;
                }
                Some(_) => {}
                None => self.op_save(id, &body)?,
            }
        }
        Ok(body)
    }
}

/// Loads one VM from its directory; the error is the reason it is reported broken.
fn load_vm(dir: &Path, name: &str) -> Result<VmRec, String> {
    let bytes = fs::read(dir.join("vm.json")).map_err(|e| format!("vm.json: {e}"))?;
    let meta: VmMeta = serde_json::from_slice(&bytes).map_err(|e| format!("vm.json: {e}"))?;
    if meta.name != name {
        return Err(format!("vm.json names another VM ({})", meta.name));
    }
    open_vm(dir, meta).map_err(|e| format!("opening disks or journal: {e}"))
}

pub(super) fn open_vm(dir: &Path, mut meta: VmMeta) -> io::Result<VmRec> {
    let journal_lost = !dir.join("track").is_dir();
    let mut disks = Vec::new();
    for d in &meta.disks {
        disks.push(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join("disks").join(format!("{}.img", d.name)))?,
        );
    }
    let sizes: Vec<u64> = meta.disks.iter().map(|d| d.size_bytes).collect();
    let tracker = Tracker::open(&dir.join("track"), &sizes)?;
    if journal_lost || tracker.damaged() {
        // The change journal cannot vouch for the dirty set: no base, and a source resyncs
        // (block hashes compared) instead of cycling from a tracker that may miss changes.
        meta.journal_base = None;
        if let Some(o) = meta.outbound.as_mut().filter(|o| o.bulk.is_none()) {
            tracing::warn!(vm = %meta.name, "change journal lost or damaged: resynchronizing");
            o.bulk = Some(ReplicationMode::Resync);
            o.state = ReplicationState::Resynchronizing;
        }
        let bytes = serde_json::to_vec_pretty(&meta)?;
        write_atomic(&dir.join("vm.json"), &bytes)?;
    }
    Ok(VmRec {
        meta,
        disks,
        tracker,
    })
}
