//! VM runtime state on disk.
//!
//! ```text
//! DATA/vms/<vm>/vm.json          metadata (power, role, disks), replaced atomically
//! DATA/vms/<vm>/disks/<d>.img    disk (sparse file)
//! DATA/vms/<vm>/track/           change-tracking journal (see replication::tracker)
//! DATA/ops/<hex id>.json         answers of finished operations, for idempotency
//! ```
//!
//! `vms/` and `ops/` are 0700 and every metadata file is written 0600: `vm.json` holds the peer
//! agent's token of outbound replication.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::disk_files::DiskFiles;
use super::input::valid_name;
use super::meta::{self, VmMeta};
use super::{ApiError, ApiResult};
use crate::fault;
use crate::replication::tracker::{Tracker, sync_dir};
use crate::replication::{blocks_of_range, sha256_file};
use crate::site::{
    BrokenVm, CreateVm, DeleteResult, DiskSpec, Power, PowerAction, ReplicationMode,
    ReplicationState, Role, Vm, VmList,
};

/// Answers under `DATA/ops` (operations no VM keeps) are kept for a week, and at most this many
/// of the newest: a controller retries an operation within minutes, not days.
const OPS_FILES_KEPT: usize = 1000;
const OPS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// `DATA/ops` is pruned at start and after every this many answers saved.
const OPS_PRUNE_EVERY: u64 = 100;

/// Where the grants of VMs not here yet are kept (see [`Store::grants`]).
pub(super) const GRANTS_FILE: &str = "accepted.json";

/// One VM's state: metadata, disk files, change tracker. Reached only through its cell's lock.
pub(super) struct VmRec {
    pub(super) dir: PathBuf,
    pub(super) meta: VmMeta,
    pub(super) disks: DiskFiles,
    pub(super) tracker: Tracker,
    /// Set when the VM was deleted while its lock was held: it is no longer in the store.
    pub(super) deleted: bool,
}

/// One VM behind its own lock, with the view the listing shows while the VM is busy.
pub(super) struct VmCell {
    rec: RwLock<VmRec>,
    view: Mutex<Vm>,
}

/// Every VM of the site. The map lock is held only to find, add or remove a VM; each VM has
/// its own lock, so one VM's long operation (a digest, a commit, a drill copy) never holds up
/// another VM's guest writes or the listing.
pub struct Store {
    pub(super) root: PathBuf,
    pub(super) site: String,
    max_disk_bytes: u64,
    vms: Mutex<BTreeMap<String, Arc<VmCell>>>,
    /// VMs whose state could not be loaded, with the reason: reported, never touched.
    broken: Mutex<BTreeMap<String, String>>,
    /// Answers saved under `DATA/ops` since the start (prunes every `OPS_PRUNE_EVERY`).
    ops_saved: AtomicU64,
    /// VMs not here that the controller let a source site replicate into (`accept`), kept in
    /// `DATA/accepted.json` until the first bulk transfer from that site creates the replica.
    pub(super) grants: Mutex<BTreeMap<String, Grant>>,
}

/// A grant of `accepted.json`: the source site that may create the VM here and the namespace
/// that will own it. Older files hold the source site alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(super) enum Grant {
    Source(String),
    #[serde(rename_all = "camelCase")]
    Owned {
        source_site: String,
        owner: String,
    },
}

impl Grant {
    pub(super) fn new(source: &str, owner: Option<&str>) -> Self {
        match owner {
            Some(o) => Self::Owned {
                source_site: source.to_string(),
                owner: o.to_string(),
            },
            None => Self::Source(source.to_string()),
        }
    }

    pub(super) fn source(&self) -> &str {
        match self {
            Self::Source(s) | Self::Owned { source_site: s, .. } => s,
        }
    }

    pub(super) fn owner(&self) -> Option<&str> {
        match self {
            Self::Source(_) => None,
            Self::Owned { owner, .. } => Some(owner),
        }
    }
}

/// A stored answer of an operation.
#[derive(Serialize, Deserialize)]
struct OpRecord {
    status: u16,
    body: serde_json::Value,
}

/// Writes `value` to `path` so that a crash leaves either the old or the new file. The file is
/// readable by the agent's user only (`vm.json` holds peer credentials).
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // A leftover of a crash keeps the mode it was created with: tightened here.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn poisoned() -> ApiError {
    ApiError::internal("agent state poisoned")
}

impl VmCell {
    fn new(rec: VmRec) -> Arc<Self> {
        let view = rec.view();
        Arc::new(Self {
            rec: RwLock::new(rec),
            view: Mutex::new(view),
        })
    }
}

impl Store {
    /// Opens the data directory, loading every VM; half-created VMs are removed.
    pub fn open(root: &Path, site: &str, max_disk_bytes: u64) -> Result<Self, ApiError> {
        let vms_dir = root.join("vms");
        private_dir(&vms_dir).map_err(ApiError::io)?;
        private_dir(&root.join("ops")).map_err(ApiError::io)?;
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
                    vms.insert(name, VmCell::new(rec));
                }
                Err(err) => {
                    tracing::error!(vm = %name, error = %err, "VM does not load; reported broken");
                    broken.insert(name, err);
                }
            }
        }
        let grants = match fs::read(root.join(GRANTS_FILE)) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| ApiError::internal(format!("{GRANTS_FILE}: {e}")))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(ApiError::io(e)),
        };
        let store = Self {
            root: root.to_path_buf(),
            site: site.to_string(),
            max_disk_bytes,
            vms: Mutex::new(vms),
            broken: Mutex::new(broken),
            ops_saved: AtomicU64::new(0),
            grants: Mutex::new(grants),
        };
        store.prune_ops(SystemTime::now()).map_err(ApiError::io)?;
        Ok(store)
    }

    /// Names of the VMs served.
    pub(super) fn names(&self) -> Vec<String> {
        self.vms
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Marks a loaded VM broken (its recovery at start failed): it is no longer served.
    pub(super) fn mark_broken(&self, vm: &str, reason: String) {
        tracing::error!(vm, error = %reason, "VM reported broken");
        if let Ok(mut m) = self.vms.lock() {
            m.remove(vm);
        }
        if let Ok(mut b) = self.broken.lock() {
            b.insert(vm.to_string(), reason);
        }
    }

    pub(super) fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join("vms").join(vm)
    }

    fn cell(&self, vm: &str) -> ApiResult<Arc<VmCell>> {
        let found = self.vms.lock().map_err(|_| poisoned())?.get(vm).cloned();
        found.ok_or_else(|| self.missing(vm))
    }

    pub(super) fn exists(&self, vm: &str) -> bool {
        self.vms.lock().is_ok_and(|m| m.contains_key(vm))
    }

    pub(super) fn is_broken(&self, vm: &str) -> bool {
        self.broken.lock().is_ok_and(|b| b.contains_key(vm))
    }

    /// The error for a VM that is not served: broken, or not here.
    pub(super) fn missing(&self, vm: &str) -> ApiError {
        let reason = self.broken.lock().ok().and_then(|b| b.get(vm).cloned());
        match reason {
            Some(reason) => ApiError::internal(format!("VM {vm} is broken at this site: {reason}")),
            None => ApiError::not_found(format!("VM {vm} is not at this site")),
        }
    }

    /// Runs `f` with `vm` locked for reading (guest writes and other changes of it wait).
    pub(super) fn read_vm<T>(
        &self,
        vm: &str,
        f: impl FnOnce(&VmRec) -> ApiResult<T>,
    ) -> ApiResult<T> {
        let cell = self.cell(vm)?;
        let r = cell.rec.read().map_err(|_| poisoned())?;
        if r.deleted {
            return Err(self.missing(vm));
        }
        f(&r)
    }

    /// Runs `f` with `vm` locked for writing; the listing's view of it is refreshed after.
    pub(super) fn write_vm<T>(
        &self,
        vm: &str,
        f: impl FnOnce(&mut VmRec) -> ApiResult<T>,
    ) -> ApiResult<T> {
        let cell = self.cell(vm)?;
        let mut r = cell.rec.write().map_err(|_| poisoned())?;
        if r.deleted {
            return Err(self.missing(vm));
        }
        let out = f(&mut r);
        if let Ok(mut v) = cell.view.lock() {
            *v = r.view();
        }
        out
    }

    /// Runs `f` with all of `vms` locked for writing at once, taken in name order (so two
    /// callers never wait for each other in a circle): a consistent cut of them.
    pub(super) fn write_many<T>(
        &self,
        vms: &[String],
        f: impl FnOnce(&mut [(String, &mut VmRec)]) -> ApiResult<T>,
    ) -> ApiResult<T> {
        let mut names = vms.to_vec();
        names.sort();
        names.dedup();
        let cells: Vec<(String, Arc<VmCell>)> = names
            .into_iter()
            .map(|n| self.cell(&n).map(|c| (n, c)))
            .collect::<ApiResult<_>>()?;
        let mut guards = Vec::new();
        for (n, c) in &cells {
            guards.push((n.clone(), c.rec.write().map_err(|_| poisoned())?));
        }
        let mut recs: Vec<(String, &mut VmRec)> = guards
            .iter_mut()
            .map(|(n, g)| (n.clone(), &mut **g))
            .collect();
        let out = f(&mut recs);
        drop(recs);
        for ((_, c), (_, g)) in cells.iter().zip(&guards) {
            if let Ok(mut v) = c.view.lock() {
                *v = g.view();
            }
        }
        out
    }

    pub fn list(&self) -> VmList {
        let cells: Vec<Arc<VmCell>> = self
            .vms
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        // A VM busy with a long operation shows its last view instead of holding the list up.
        let vms = cells
            .iter()
            .filter_map(|c| match c.rec.try_read() {
                Ok(r) if r.deleted => None,
                Ok(r) => Some(r.view()),
                Err(_) => c.view.lock().ok().map(|v| v.clone()),
            })
            .collect();
        VmList {
            site: self.site.clone(),
            accelerator: None,
            vms,
            broken: self
                .broken
                .lock()
                .map(|b| {
                    b.iter()
                        .map(|(name, error)| BrokenVm {
                            name: name.clone(),
                            error: error.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn vm(&self, vm: &str) -> ApiResult<Vm> {
        self.read_vm(vm, |r| Ok(r.view()))
    }

    /// Checks the disks of a new VM or of a replica's `begin`: at least one, names valid and
    /// distinct, sizes between 1 and `--max-disk-bytes`.
    pub(super) fn check_disks(&self, disks: &[DiskSpec]) -> ApiResult<()> {
        super::input::disks(disks, self.max_disk_bytes)
    }

    /// Creates a VM; repeating the same create answers the VM, a different one is a conflict.
    pub fn create(&self, vm: &str, spec: &CreateVm) -> ApiResult<Vm> {
        if !valid_name(vm) {
            return Err(ApiError::bad(format!("invalid VM name {vm:?}")));
        }
        self.check_disks(&spec.disks)?;
        if self.is_broken(vm) {
            return Err(self.missing(vm));
        }
        if self.exists(vm) {
            return self.read_vm(vm, |r| {
                if r.meta.disks == spec.disks
                    && r.meta.integration_services == spec.integration_services
                    && r.meta.role == Role::Primary
                {
                    return Ok(r.view());
                }
                Err(ApiError::conflict(format!(
                    "VM {vm} already exists with another definition"
                )))
            });
        }
        let meta = VmMeta::new(
            vm,
            spec.power,
            Role::Primary,
            (&spec.disks, spec.integration_services),
        );
        self.insert_new(vm, meta)?;
        self.vm(vm)
    }

    /// Takes a hypervisor domain into the store, as a primary whose disks are the domain's
    /// (replication can then be enabled on it). Taking it again changes nothing.
    pub fn adopt(&self, vm: &str, disks: &[DiskSpec], guest_agent: bool) -> ApiResult<()> {
        if self.exists(vm) {
            return Ok(());
        }
        let mut meta = VmMeta::new(vm, Power::Running, Role::Primary, (disks, guest_agent));
        meta.domain = Some(meta::DomainLink::default());
        match self.insert_new(vm, meta) {
            Err(e) if e.kind == super::ErrorKind::Conflict => Ok(()),
            res => res,
        }
    }

    /// Makes a new VM from `meta` and adds it; a conflict if one of that name appeared.
    pub(super) fn insert_new(&self, vm: &str, meta: VmMeta) -> ApiResult<()> {
        let mut map = self.vms.lock().map_err(|_| poisoned())?;
        if map.contains_key(vm) {
            return Err(ApiError::conflict(format!("VM {vm} already exists")));
        }
        let rec = self.materialize(vm, meta).map_err(ApiError::io)?;
        map.insert(vm.to_string(), VmCell::new(rec));
        Ok(())
    }

    /// Adds a VM whose directory was just moved into place.
    pub(super) fn insert_opened(&self, vm: &str, rec: VmRec) -> ApiResult<()> {
        let mut map = self.vms.lock().map_err(|_| poisoned())?;
        map.insert(vm.to_string(), VmCell::new(rec));
        Ok(())
    }

    /// Builds the VM in a temporary directory and renames it into place, so a crash never
    /// leaves half a VM.
    fn materialize(&self, vm: &str, meta: VmMeta) -> io::Result<VmRec> {
        let tmp = self.root.join("vms").join(format!(".tmp-{vm}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(tmp.join("disks"))?;
        // A domain's disks are its own images.
        for d in meta.disks.iter().filter(|_| meta.domain.is_none()) {
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

    /// Removes a VM that does not run; the caller holds its lock (`r`).
    pub(super) fn delete_locked(&self, vm: &str, r: &mut VmRec) -> ApiResult<serde_json::Value> {
        if r.meta.power == Power::Running {
            return Err(ApiError::conflict(format!(
                "VM {vm} is running; power it off first"
            )));
        }
        self.vms.lock().map_err(|_| poisoned())?.remove(vm);
        r.deleted = true;
        // Rename first so a crash mid-removal leaves a leftover the next start cleans up.
        let tmp = self.root.join("vms").join(format!(".tmp-{vm}"));
        fs::rename(&r.dir, &tmp).map_err(ApiError::io)?;
        sync_dir(&self.root.join("vms")).map_err(ApiError::io)?;
        fs::remove_dir_all(&tmp).map_err(ApiError::io)?;
        Ok(serde_json::to_value(DeleteResult { deleted: true }).unwrap_or_default())
    }

    pub fn delete(&self, vm: &str) -> ApiResult<serde_json::Value> {
        self.write_vm(vm, |r| self.delete_locked(vm, r))
    }

    /// The file of operation `id`: its hex, or where that would be too long for a file name
    /// (ids are up to `MAX_OP_ID` bytes), `h` and its SHA-256.
    fn op_path(&self, id: &str) -> PathBuf {
        let name = if id.len() <= 120 {
            hex::encode(id)
        } else {
            use sha2::Digest;
            format!("h{}", hex::encode(sha2::Sha256::digest(id.as_bytes())))
        };
        self.root.join("ops").join(format!("{name}.json"))
    }

    /// Removes the answers under `DATA/ops` older than `OPS_MAX_AGE` or beyond the newest
    /// `OPS_FILES_KEPT`. Answers the number removed.
    pub(super) fn prune_ops(&self, now: SystemTime) -> io::Result<usize> {
        let mut records = Vec::new();
        for e in fs::read_dir(self.root.join("ops"))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().to_string();
            if !name.ends_with(".json") {
                continue;
            }
            let modified = e.metadata()?.modified()?;
            records.push((modified, name, e.path()));
        }
        // Newest first.
        records.sort_by(|a, b| b.cmp(a));
        let mut removed = 0;
        for (i, (modified, _, path)) in records.iter().enumerate() {
            let age = now.duration_since(*modified).unwrap_or_default();
            if i >= OPS_FILES_KEPT || age > OPS_MAX_AGE {
                match fs::remove_file(path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        if removed > 0 {
            tracing::info!(removed, "pruned old operation answers");
        }
        Ok(removed)
    }

    /// The stored answer of operation `id` under `DATA/ops` (operations whose VM is gone,
    /// cuts, syncs; answers of operations on a VM live in its metadata).
    pub(super) fn op_lookup(&self, id: &str) -> Option<serde_json::Value> {
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
        write_atomic(&self.op_path(id), &bytes).map_err(ApiError::io)?;
        if self.ops_saved.fetch_add(1, Ordering::Relaxed) % OPS_PRUNE_EVERY == OPS_PRUNE_EVERY - 1
            && let Err(e) = self.prune_ops(SystemTime::now())
        {
            tracing::warn!(error = %e, "pruning old operation answers failed");
        }
        Ok(())
    }

    /// Runs `f` on `vm` (locked) once per operation id: a repeated id answers the stored
    /// result. `f` may note the answer in the VM's metadata itself, to save it in the same
    /// write as its effect (operations that are not naturally repeatable do); otherwise it is
    /// saved right after.
    pub(super) fn idempotent(
        &self,
        vm: &str,
        op_id: Option<&str>,
        f: impl FnOnce(&Self, &mut VmRec) -> ApiResult<serde_json::Value>,
    ) -> ApiResult<serde_json::Value> {
        if let Some(id) = op_id
            && !self.exists(vm)
            && let Some(v) = self.op_lookup(id)
        {
            return Ok(v);
        }
        let body = self.write_vm(vm, |r| {
            if let Some(id) = op_id
                && let Some(v) = r.meta.op_answer(id).or_else(|| self.op_lookup(id))
            {
                return Ok(Some(v));
            }
            let body = f(self, r)?;
            if let Some(id) = op_id
                && !r.deleted
                && r.meta.op_answer(id).is_none()
            {
                r.meta.note_op(Some(id), &body);
                r.save()?;
            }
            Ok(Some(body))
        })?;
        let body = body.unwrap_or_default();
        if let Some(id) = op_id
            && !self.exists(vm)
        {
            self.op_save(id, &body)?;
        }
        Ok(body)
    }
}

impl VmRec {
    pub(super) fn name(&self) -> &str {
        &self.meta.name
    }

    pub(super) fn view(&self) -> Vm {
        Vm {
            name: self.meta.name.clone(),
            runtime: None,
            power: self.meta.power,
            role: self.meta.role,
            integration_services: self.meta.integration_services,
            disks: self.meta.disks.clone(),
            replication: meta::replication_info(
                &self.meta,
                self.tracker.dirty_blocks() * crate::replication::BLOCK_SIZE,
            ),
            recovery_points: meta::rp_summary(&self.meta),
            test_copy: meta::test_copy_of(&self.meta),
            network: self.meta.network.clone(),
            owner: self.meta.owner.clone(),
        }
    }

    /// Writes `vm.json` from memory. When that fails (a disk error, a full disk), memory takes
    /// back what `vm.json` holds, so the agent never serves or acts on a state its disk does not
    /// have (a restart would load the disk's); the caller's error is the write's.
    pub(super) fn save(&mut self) -> ApiResult<()> {
        let path = self.dir.join("vm.json");
        let written = serde_json::to_vec_pretty(&self.meta)
            .map_err(io::Error::from)
            .and_then(|bytes| {
                fault::fail("meta.save")?;
                write_atomic(&path, &bytes)
            });
        let Err(e) = written else {
            return Ok(());
        };
        let on_disk = fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<VmMeta>(&b).map_err(|e| e.to_string()));
        match on_disk {
            Ok(meta) => self.meta = meta,
            Err(reload) => tracing::error!(
                vm = %self.meta.name,
                error = %reload,
                "vm.json could not be saved nor read back; memory may be ahead of disk until a restart"
            ),
        }
        Err(ApiError::io(e))
    }

    pub fn power(&mut self, action: PowerAction) -> ApiResult<serde_json::Value> {
        let vm = self.meta.name.clone();
        match action {
            PowerAction::Start => {
                if self.meta.role == Role::Replica {
                    return Err(ApiError::conflict(format!(
                        "VM {vm} is a replica here; fail it over to start it"
                    )));
                }
                self.meta.power = Power::Running;
            }
            PowerAction::Shutdown => {
                if self.meta.power == Power::Running && !self.meta.integration_services {
                    return Err(ApiError::conflict(format!(
                        "VM {vm} has no integration services: it cannot be shut down gracefully"
                    )));
                }
                self.meta.power = Power::Off;
            }
            PowerAction::PowerOff => self.meta.power = Power::Off,
        }
        self.save()?;
        serde_json::to_value(self.view()).map_err(|e| ApiError::io(e.into()))
    }

    /// Takes the disk files a domain on its own images was just given (it becomes a replica):
    /// from now on the agent's files are its disks.
    pub(super) fn attach_files(&mut self) -> ApiResult<()> {
        let paths = disk_paths(&self.dir, &self.meta).map_err(ApiError::io)?;
        self.disks = DiskFiles::new(&self.meta.name, paths);
        self.meta.power = Power::Off;
        self.save()
    }

    fn disk_index(&self, disk: &str) -> ApiResult<(usize, u64)> {
        if self.disks.len() != self.meta.disks.len() {
            return Err(ApiError::conflict(format!(
                "VM {} is a hypervisor domain: its guest writes to its disks itself, and the \
                 agent reads them only to replicate",
                self.meta.name
            )));
        }
        self.meta
            .disks
            .iter()
            .position(|d| d.name == disk)
            .map(|i| (i, self.meta.disks[i].size_bytes))
            .ok_or_else(|| ApiError::not_found(format!("VM {} has no disk {disk}", self.meta.name)))
    }

    /// Guest write: tracked, then written, both durable before it returns.
    pub fn write(&mut self, disk: &str, offset: u64, data: &[u8]) -> ApiResult<()> {
        let (i, size) = self.disk_index(disk)?;
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ApiError::bad(format!(
                "write of {len} bytes at {offset} goes past the end of disk {disk} ({size} bytes)"
            )));
        }
        if self.meta.power != Power::Running || self.meta.role == Role::Replica {
            return Err(ApiError::conflict(format!(
                "VM {} does not run here",
                self.meta.name
            )));
        }
        // Journal first: a block whose write lands must never be missing from the dirty set.
        self.tracker
            .record(i, blocks_of_range(offset, len))
            .map_err(ApiError::io)?;
        fault::hit("guest.journal");
        let file = self.disks.open(i)?;
        file.write_all_at(data, offset).map_err(ApiError::io)?;
        fault::hit("guest.data");
        file.sync_data().map_err(ApiError::io)
    }

    pub fn read(&self, disk: &str, offset: u64, length: u64) -> ApiResult<Vec<u8>> {
        let (i, size) = self.disk_index(disk)?;
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(ApiError::bad(format!(
                "read of {length} bytes at {offset} goes past the end of disk {disk} ({size} bytes)"
            )));
        }
        if length > 256 << 20 {
            return Err(ApiError::bad("reads are limited to 256 MiB"));
        }
        let mut buf = vec![0u8; length as usize];
        // A replica reads as its newest point, points waiting to be applied included.
        match self.newest_view()? {
            Some(v) => v.read_at(i, offset, &mut buf),
            None => self.disks.open(i)?.read_exact_at(&mut buf, offset),
        }
        .map_err(ApiError::io)?;
        Ok(buf)
    }

    pub fn digest(&self, disk: &str) -> ApiResult<String> {
        let (i, size) = self.disk_index(disk)?;
        match self.newest_view()? {
            Some(v) => v.sha256(i, size),
            None => sha256_file(&self.disks.open(i)?, size),
        }
        .map_err(ApiError::io)
    }
}

/// Makes `dir` (and its parents) if needed, readable by the agent's user only. A directory it
/// makes is durable before it returns (its parent fsynced): a power cut after the first start
/// would otherwise lose `vms/` with every VM created in it.
fn private_dir(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.as_os_str().is_empty() && !p.try_exists()? {
        missing.push(p);
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    for d in missing.iter().rev() {
        match d.parent() {
            Some(q) if !q.as_os_str().is_empty() => sync_dir(q)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
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

/// The agent's image of each of the VM's disks; an error names one that is missing.
fn disk_paths(dir: &Path, meta: &VmMeta) -> io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for d in &meta.disks {
        let path = dir.join("disks").join(format!("{}.img", d.name));
        if !path.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("disk {} has no image {}", d.name, path.display()),
            ));
        }
        paths.push(path);
    }
    Ok(paths)
}

pub(super) fn open_vm(dir: &Path, mut meta: VmMeta) -> io::Result<VmRec> {
    let journal_lost = !dir.join("track").is_dir();
    let own_images = meta.domain.is_some()
        && meta
            .disks
            .iter()
            .any(|d| !dir.join("disks").join(format!("{}.img", d.name)).exists());
    // A domain on its own images (where it was first protected) has no files here.
    let paths = if own_images {
        Vec::new()
    } else {
        disk_paths(dir, &meta)?
    };
    let disks = DiskFiles::new(&meta.name, paths);
    let sizes: Vec<u64> = meta.disks.iter().map(|d| d.size_bytes).collect();
    let tracker = Tracker::open(&dir.join("track"), &sizes)?;
    if journal_lost || tracker.damaged() {
        // The change journal cannot vouch for the dirty set: no base, and a source resyncs
        // (block hashes compared) instead of cycling from a tracker that may miss changes.
        let mut changed = meta.journal_base.take().is_some();
        if let Some(o) = meta.outbound.as_mut().filter(|o| o.bulk.is_none()) {
            tracing::warn!(vm = %meta.name, "change journal lost or damaged: resynchronizing");
            o.bulk = Some(ReplicationMode::Resync);
            o.state = ReplicationState::Resynchronizing;
            changed = true;
        }
        if changed {
            let bytes = serde_json::to_vec_pretty(&meta)?;
            write_atomic(&dir.join("vm.json"), &bytes)?;
        }
    }
    Ok(VmRec {
        dir: dir.to_path_buf(),
        meta,
        disks,
        tracker,
        deleted: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_of_operations_with_long_ids_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "site", 1 << 30).unwrap();
        for id in [
            "x".repeat(super::super::input::MAX_OP_ID),
            format!("cut/{}", "c".repeat(super::super::input::MAX_OP_ID)),
            "short".to_string(),
        ] {
            let v = serde_json::json!({"id": id.len()});
            s.op_save(&id, &v).unwrap();
            assert_eq!(s.op_lookup(&id), Some(v), "{}", id.len());
        }
        assert_eq!(
            s.op_lookup(&"x".repeat(super::super::input::MAX_OP_ID - 1)),
            None
        );
    }

    #[test]
    fn old_operation_answers_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), "site", 1 << 30).unwrap();
        let now = std::time::SystemTime::now();
        // The newest OPS_FILES_KEPT of them are op-00010 to the last, but op-00100.
        let n = OPS_FILES_KEPT + 11;
        for i in 0..n {
            let id = format!("op-{i:05}");
            let rec = OpRecord {
                status: 200,
                body: serde_json::json!(i),
            };
            fs::write(s.op_path(&id), serde_json::to_vec(&rec).unwrap()).unwrap();
            // op-00000 is the oldest; op-00100 is older than the age limit.
            let age = if i == 100 {
                OPS_MAX_AGE + std::time::Duration::from_secs(60)
            } else {
                std::time::Duration::from_secs((n - i) as u64)
            };
            let f = File::options().write(true).open(s.op_path(&id)).unwrap();
            f.set_modified(now - age).unwrap();
        }
        s.prune_ops(now).unwrap();
        let kept = |i: usize| s.op_lookup(&format!("op-{i:05}")).is_some();
        assert!(
            (0..10).all(|i| !kept(i)),
            "beyond the newest {OPS_FILES_KEPT}"
        );
        assert!(!kept(100), "older than the age limit");
        assert!((10..n).filter(|i| *i != 100).all(kept));
        // A new store prunes at start as well.
        let f = File::options()
            .write(true)
            .open(s.op_path("op-00200"))
            .unwrap();
        f.set_modified(now - OPS_MAX_AGE - std::time::Duration::from_secs(60))
            .unwrap();
        drop(s);
        let s = Store::open(dir.path(), "site", 1 << 30).unwrap();
        assert_eq!(s.op_lookup("op-00200"), None);
        assert!(s.op_lookup("op-00201").is_some());
    }

    #[test]
    fn metadata_is_readable_by_the_agent_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.json");
        // A file left by an older agent with the default mode is tightened when replaced.
        fs::write(&path, b"{}").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(path.with_extension("tmp"), b"stale").unwrap();
        fs::set_permissions(
            path.with_extension("tmp"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        write_atomic(&path, b"{\"a\": 1}").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"{\"a\": 1}");
        let _ = Store::open(dir.path(), "site", 1 << 30).unwrap();
        let mode = fs::metadata(dir.path().join("vms"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
    }
}
