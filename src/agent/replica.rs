//! Replication state of a VM and the receiving side: staging, commit into recovery points,
//! failover, test failover, commit. Runs inside the store lock.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::input::valid_name;
use super::meta::{Rollback, RpMeta, StagedResync, VmMeta};
use super::runtime::{MakeOverlay, OverlayDisk};
use super::store::{GRANTS_FILE, Grant, Store, VmRec, open_vm, write_atomic};
use super::{ApiError, ApiResult, ErrorKind};
use crate::fault;
use crate::replication::tracker::{create_dir_durable, sync_dir};
use crate::replication::{
    BLOCK_SIZE, Bitmap, block_count, block_in_range, block_len, frame, retention, undo,
};
use crate::site::{
    AcceptResult, CommitResult, DiskSpec, FailoverResult, Power, RecoveryPoint, RecoveryPointKind,
    RecoveryPointSelector, Role, TestFailoverResult,
};

/// Body of `POST /v1/replica/{vm}/begin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BeginCycle {
    pub source_site: String,
    pub cycle_id: String,
    pub disks: Vec<DiskSpec>,
    pub integration_services: bool,
    pub retention_hours: u64,
    /// A bulk transfer (initial copy or resync) rather than a cycle: an initial copy (`zero`)
    /// writes straight into the image and drops older points; a resync is staged and lands
    /// with the next cycle.
    pub bulk: bool,
    /// Initial transfer: the replica empties its images first (sparse, all zeros), so the
    /// source can skip blocks that hold only zeros. The answer says whether it did.
    #[serde(default)]
    pub zero: bool,
    /// The cycle the source believes the replica holds (its journal base): an incremental cycle
    /// applies only onto exactly that image.
    #[serde(default)]
    pub parent: Option<String>,
    /// A cycle whose commit the source never saw answered: the replica may hold it instead.
    #[serde(default)]
    pub in_doubt: Option<String>,
    /// Cycles in doubt before `in_doubt` (at most [`MAX_IN_DOUBT`]): the replica may hold any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_doubt_earlier: Vec<String>,
    /// The source's hypervisor definition of the VM (libvirt domain XML), kept at the replica
    /// so a failover can define the VM there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition: Option<String>,
}

/// The most cycles a source keeps in doubt before the newest (older ones are forgotten: the
/// replica then resyncs if it holds one of those).
pub const MAX_IN_DOUBT: usize = 8;

/// The largest VM definition a peer may send.
pub(super) const MAX_DEFINITION_BYTES: usize = 64 << 10;

/// The name of `vm`'s drill copy.
pub(super) fn drill_copy_name(vm: &str) -> String {
    format!("{vm}-test")
}

impl BeginCycle {
    /// What a peer sends, checked before the store sees it (the disks are checked by the
    /// store, against `--max-disk-bytes`).
    pub(super) fn check(&self) -> ApiResult<()> {
        use super::input;
        input::site_name("sourceSite", &self.source_site)?;
        input::cycle_id("cycleId", &self.cycle_id)?;
        if let Some(p) = &self.parent {
            input::cycle_id("parent", p)?;
        }
        if let Some(p) = &self.in_doubt {
            input::cycle_id("inDoubt", p)?;
        }
        if self.in_doubt_earlier.len() > MAX_IN_DOUBT {
            return Err(ApiError::bad(format!(
                "inDoubtEarlier names more than {MAX_IN_DOUBT} cycles"
            )));
        }
        for p in &self.in_doubt_earlier {
            input::cycle_id("inDoubtEarlier", p)?;
        }
        if self
            .definition
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DEFINITION_BYTES)
        {
            return Err(ApiError::bad(format!(
                "definition is larger than {MAX_DEFINITION_BYTES} bytes"
            )));
        }
        input::in_range("retentionHours", self.retention_hours, 0..=input::MAX_HOURS)
    }
}

impl CommitCycle {
    pub(super) fn check(&self) -> ApiResult<()> {
        use super::input;
        input::cycle_id("cycleId", &self.cycle_id)?;
        input::opt_op_id("cutId", self.cut_id.as_deref())
    }
}

/// Answer of `POST /v1/replica/{vm}/begin`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BeginAnswer {
    /// The images were emptied: every block not sent reads as zeros.
    #[serde(default)]
    pub zeroed: bool,
}

/// Body of `POST /v1/replica/{vm}/commit`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitCycle {
    pub cycle_id: String,
    pub bulk: bool,
    pub time: Timestamp,
    pub kind: RecoveryPointKind,
    /// Set when a consistent cut made this cycle; recorded on the point.
    #[serde(default)]
    pub cut_id: Option<String>,
}

/// Answer of `GET /v1/replica/{vm}/dirty`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirtySet {
    /// The cycle since whose state `disks` holds every change; `None` when unknown.
    pub journal_base: Option<String>,
    /// Per disk, the dirty bitmap (bit `b % 8` of byte `b / 8` is block `b`), hex.
    pub disks: Vec<String>,
}

/// Answer of a block batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchResult {
    /// (disk, block) of every block whose checksum did not match: send them again.
    pub refused: Vec<(u32, u64)>,
}

/// Blocks and commits belong to the cycle `begin` opened last.
fn check_open(r: &VmRec, cycle: &str) -> ApiResult<()> {
    let vm = r.name();
    let open = r
        .meta
        .inbound
        .as_ref()
        .and_then(|i| i.open_cycle.as_deref());
    if open != Some(cycle) {
        return Err(ApiError::conflict(format!(
            "cycle {cycle} of {vm} is not open here (open: {})",
            open.unwrap_or("none")
        )));
    }
    Ok(())
}

pub(super) fn staging(dir: &std::path::Path, cycle: &str) -> std::path::PathBuf {
    dir.join("staging")
        .join(format!("{}.blocks", hex::encode(cycle)))
}

/// Starts the kernel's writeback of the range each disk received (without waiting), so the
/// fsync at the end of a bulk transfer has little left to write.
fn start_writeback(disks: &[File], frames: &[&frame::Frame<'_>]) {
    use std::os::fd::AsRawFd;
    for (d, file) in disks.iter().enumerate() {
        let mut range: Option<(u64, u64)> = None;
        for f in frames.iter().filter(|f| f.disk as usize == d) {
            let (a, b) = (
                f.block * BLOCK_SIZE,
                f.block * BLOCK_SIZE + f.data.len() as u64,
            );
            range = Some(range.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
        }
        if let Some((a, b)) = range {
            // SAFETY: a plain syscall on an open descriptor; a failure only loses the hint.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    a as libc::off64_t,
                    (b - a) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
    }
}

impl Store {
    /// Finishes what a crash interrupted, VM by VM: a failover's rollback, commits recorded and
    /// not applied; drops unfinished cycles, spools and undo segments no point lists. A VM whose
    /// recovery fails is reported broken; the others serve.
    pub(super) fn recover(&self) {
        for vm in self.names() {
            if let Err(e) = self.write_vm(&vm, VmRec::recover) {
                self.mark_broken(&vm, e.message);
            }
        }
    }

    /// Controller: lets `source` replicate into `vm` here, where no VM of that name exists:
    /// the first bulk transfer from `source` creates the replica. Without the grant no peer
    /// creates a VM here.
    pub fn accept_missing(
        &self,
        vm: &str,
        source: &str,
        owner: Option<&str>,
    ) -> ApiResult<AcceptResult> {
        if self.is_broken(vm) {
            return Err(self.missing(vm));
        }
        // A grant another namespace holds is theirs until withdrawn.
        self.check_grant_owner(vm, owner)?;
        self.set_grant(vm, Some(Grant::new(source, owner)))?;
        Ok(AcceptResult {
            source_site: source.to_string(),
        })
    }

    /// Records (`Some`) or withdraws (`None`) the controller's grant that `source` may create
    /// `vm` here, durable before it returns. It stands while the controller means `vm` to be
    /// that source's replica, so a replica whose files are lost here is created again by the
    /// source's resync; the controller's accept for another source, delete, stop or failover
    /// of the VM here withdraws it.
    pub(super) fn set_grant(&self, vm: &str, grant: Option<Grant>) -> ApiResult<()> {
        let mut grants = self
            .grants
            .lock()
            .map_err(|_| ApiError::internal("agent state poisoned"))?;
        if grants.get(vm) == grant.as_ref() {
            return Ok(());
        }
        let mut next = grants.clone();
        match grant {
            Some(g) => next.insert(vm.to_string(), g),
            None => next.remove(vm),
        };
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| ApiError::io(e.into()))?;
        write_atomic(&self.root.join(GRANTS_FILE), &bytes).map_err(ApiError::io)?;
        *grants = next;
        Ok(())
    }

    /// Refuses namespace `caller` a VM not here whose grant another namespace holds.
    pub(super) fn check_grant_owner(&self, vm: &str, caller: Option<&str>) -> ApiResult<()> {
        let held = self.grant(vm);
        super::meta::owner_check(vm, held.as_ref().and_then(Grant::owner), caller)
    }

    fn grant(&self, vm: &str) -> Option<Grant> {
        self.grants.lock().ok()?.get(vm).cloned()
    }

    /// Receiver: a cycle or bulk transfer starts (see [`VmRec::begin`]); a bulk transfer
    /// creates the replica where no VM of that name exists.
    pub fn begin(&self, vm: &str, b: &BeginCycle) -> ApiResult<BeginAnswer> {
        self.check_disks(&b.disks)?;
        if !self.exists(vm) {
            if !b.bulk {
                return Err(ApiError::resync(format!(
                    "VM {vm} has no replica at this site; resynchronize"
                )));
            }
            if self.is_broken(vm) {
                return Err(self.missing(vm));
            }
            if !valid_name(vm) {
                return Err(ApiError::bad(format!("invalid VM name {vm:?}")));
            }
            // Only the controller decides which site may create a VM here.
            let grant = self.grant(vm);
            if grant.as_ref().map(Grant::source) != Some(b.source_site.as_str()) {
                return Err(ApiError::conflict(format!(
                    "VM {vm} is not at this site and site {} was not accepted to replicate \
                     into it; replication into it must be enabled by the controller",
                    b.source_site
                )));
            }
            let mut meta = VmMeta::new(
                vm,
                Power::Off,
                Role::Replica,
                (&b.disks, b.integration_services),
            );
            // The grant moves onto the VM, where `begin` below takes it, with its owner.
            meta.accept_from = Some(b.source_site.clone());
            meta.owner = grant.as_ref().and_then(Grant::owner).map(str::to_string);
            match self.insert_new(vm, meta) {
                // Made meanwhile by another begin: go on with it.
                Ok(())
                | Err(ApiError {
                    kind: ErrorKind::Conflict,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
        self.write_vm(vm, |r| r.begin(b))
    }
}

impl VmRec {
    fn recover(&mut self) -> ApiResult<()> {
        let vm = self.meta.name.clone();
        if let Some(rb) = self.meta.inbound.as_ref().and_then(|i| i.rollback.clone()) {
            tracing::warn!(
                vm,
                to_seq = rb.to_seq,
                "finishing a failover a crash interrupted"
            );
            self.finish_failover(&rb)?;
        }
        self.finish_pending()?;
        // Blocks of a cycle that never committed are dropped; the source resends them (their
        // journals are still there), as are spools of unfinished outbound cycles.
        if let Some(i) = self.meta.inbound.as_mut()
            && i.open_cycle.take().is_some()
        {
            self.save()?;
        }
        self.check_resync()?;
        self.clear_staging()?;
        let spool = self.dir.join("spool");
        if spool.exists() {
            fs::remove_dir_all(&spool).map_err(ApiError::io)?;
        }
        self.sweep_undo()
    }

    /// Whether points are kept as received instead of applied: a drill copy runs on the image
    /// (a copy-on-write overlay of it, for a domain), so the image must not change until the
    /// drill is cleaned up.
    pub(super) fn deferring(&self) -> bool {
        self.meta
            .inbound
            .as_ref()
            .is_some_and(|i| i.test_copy.is_some())
    }

    /// Whether a recorded point is not yet applied to the image.
    fn has_pending(&self) -> bool {
        self.meta
            .inbound
            .as_ref()
            .is_some_and(|i| i.rps.iter().any(|p| p.staged.is_some()))
    }

    /// The newest point's content when points wait to be applied; `None` when the image is
    /// the newest point.
    pub(super) fn newest_view(&self) -> ApiResult<Option<super::pending::NewestView>> {
        if !self.has_pending() {
            return Ok(None);
        }
        let files = self.staged_files();
        let images = self.disks.open_all()?;
        super::pending::NewestView::open(images, &self.dir.join("staging"), &files)
            .map(Some)
            .map_err(ApiError::io)
    }

    /// Refuses `what` while a drill copy holds the image and points wait to be applied.
    fn refuse_while_drill(&self, what: &str) -> ApiResult<()> {
        if self.deferring() {
            return Err(ApiError::conflict(format!(
                "VM {} has a drill copy running on its replica here: {what} waits until the                  drill is cleaned up (spec.testFailover.enabled: false)",
                self.name()
            )));
        }
        Ok(())
    }

    /// Applies, oldest first, every recorded point not yet applied: points received during a
    /// drill, or a crash or an I/O error between recording a point and applying it. Nothing
    /// while a drill copy still runs on the image. A listed point whose staging file is gone is
    /// an error: the image cannot be what the list promises.
    ///
    /// Order per point: (deferred points) undo segment read from the image and fsynced →
    /// named in `vm.json` → blocks applied and fsynced → staging mark cleared. A crash before
    /// the undo is named writes it again; after, the apply is repeated (blocks hold absolute
    /// contents).
    fn finish_pending(&mut self) -> ApiResult<()> {
        if self.deferring() {
            return Ok(());
        }
        let pending: Vec<(u64, String, bool)> = self
            .meta
            .inbound
            .iter()
            .flat_map(|i| i.rps.iter())
            .filter_map(|p| p.staged.clone().map(|s| (p.seq, s, p.undo_at_apply)))
            .collect();
        let applied = !pending.is_empty();
        for (seq, file, undo_at_apply) in pending {
            let path = self.dir.join("staging").join(&file);
            if let Err(e) = self.staged_blocks(&path) {
                return self.drop_damaged(seq, &e.message);
            }
            if undo_at_apply {
                let seg = self.write_undo(seq, &path)?;
                fault::hit("replica.deferred-undo");
                if let Some(p) = self.point_mut(seq) {
                    p.undo = vec![seg];
                    p.undo_at_apply = false;
                }
                self.save()?;
            }
            self.apply_staging(&path)?;
            if let Some(p) = self.point_mut(seq) {
                p.staged = None;
            }
            self.save()?;
            let _ = fs::remove_file(&path);
        }
        if applied {
            self.apply_retention(Timestamp::now())?;
        }
        Ok(())
    }

    /// A committed resync whose staging file is gone or shorter than at its commit cannot
    /// land: it is forgotten with the cycle it names, so the source's next cycle is refused and
    /// it resyncs again. The image is the newest point either way.
    fn check_resync(&mut self) -> ApiResult<()> {
        let Some(r) = self.meta.inbound.as_ref().and_then(|i| i.resync.clone()) else {
            return Ok(());
        };
        let path = self.dir.join("staging").join(&r.file);
        let held = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if held >= r.len {
            return Ok(());
        }
        tracing::warn!(
            vm = self.name(),
            file = r.file,
            "the staging file of a committed resync is damaged: resynchronizing again"
        );
        if let Some(i) = self.meta.inbound.as_mut() {
            i.resync = None;
            i.last_cycle = None;
        }
        self.save()
    }

    /// The blocks where the source's image at `last_cycle` may differ from the image besides
    /// those a rollback to point `pos` undoes: the blocks of the newer points still waiting to
    /// be applied and of a committed resync, which a failover drops unapplied. `None` when a
    /// staging file is gone or torn: then nobody can say.
    fn unapplied_blocks(&self, pos: usize) -> Option<Vec<Bitmap>> {
        let sdir = self.dir.join("staging");
        let i = self.meta.inbound.as_ref()?;
        let files = i
            .rps
            .iter()
            .skip(pos + 1)
            .filter_map(|p| p.staged.clone())
            .chain(i.resync.as_ref().map(|r| r.file.clone()));
        let mut sets: Vec<Bitmap> = self
            .meta
            .disks
            .iter()
            .map(|d| Bitmap::new(block_count(d.size_bytes)))
            .collect();
        for f in files {
            let path = sdir.join(f);
            if !path.exists() {
                return None;
            }
            let staged = self.staged_blocks(&path).ok()?;
            for (a, b) in sets.iter_mut().zip(&staged) {
                a.union(b);
            }
        }
        Some(sets)
    }

    /// A recorded point whose staging file fails its checks cannot be applied: the image goes
    /// back to the point before it (through its undo segment, when an apply may have begun),
    /// and it and every newer point are dropped, metadata first. The replica then holds no
    /// cycle the source knows, so the source's next cycle is refused and it resyncs.
    fn drop_damaged(&mut self, seq: u64, why: &str) -> ApiResult<()> {
        let vm = self.name().to_string();
        tracing::error!(
            vm,
            seq,
            error = why,
            "dropping recovery points whose staged blocks are damaged"
        );
        let Some(pos) = self
            .meta
            .inbound
            .as_ref()
            .and_then(|i| i.rps.iter().position(|p| p.seq == seq))
        else {
            return Ok(());
        };
        let udir = self.dir.join("undo");
        let point = self.meta.inbound.as_ref().map(|i| i.rps[pos].clone());
        if let Some(p) = point.filter(|p| !p.undo_at_apply) {
            let images = self.disks.open_all()?;
            for seg in &p.undo {
                for (d, disk) in self.meta.disks.iter().enumerate() {
                    let image = images.get(d).ok_or_else(|| {
                        ApiError::conflict(format!("VM {vm} keeps no disk files here"))
                    })?;
                    undo::apply(&udir, seg, d, image, disk.size_bytes).map_err(ApiError::io)?;
                }
            }
            for d in &images {
                d.sync_all().map_err(ApiError::io)?;
            }
        }
        if let Some(i) = self.meta.inbound.as_mut() {
            i.rps.truncate(pos);
            i.last_cycle = None;
            i.resync = None;
        }
        self.save()?;
        self.clear_staging()?;
        self.sweep_undo()
    }

    fn point_mut(&mut self, seq: u64) -> Option<&mut RpMeta> {
        self.meta
            .inbound
            .as_mut()
            .and_then(|i| i.rps.iter_mut().find(|p| p.seq == seq))
    }

    /// Saves what the image holds now in the blocks the staging file `stage` will change, as
    /// point `seq`'s undo segment (every disk gets its index, empty or not: a missing index is
    /// then damage), durably. Returns the segment's name.
    fn write_undo(&self, seq: u64, stage: &std::path::Path) -> ApiResult<String> {
        let staged = self.staged_blocks(stage)?;
        let seg = format!("u{seq:06}");
        let udir = self.dir.join("undo");
        create_dir_durable(&udir).map_err(ApiError::io)?;
        for (d, disk) in self.meta.disks.iter().enumerate() {
            let blocks: Vec<u64> = staged[d].iter().collect();
            let image = self.disks.open(d)?;
            undo::write(&udir, &seg, d, &image, disk.size_bytes, &blocks).map_err(ApiError::io)?;
        }
        sync_dir(&udir).map_err(ApiError::io)?;
        Ok(seg)
    }

    /// The staging files of the points not yet applied, oldest first.
    fn staged_files(&self) -> Vec<String> {
        self.meta
            .inbound
            .iter()
            .flat_map(|i| i.rps.iter())
            .filter_map(|p| p.staged.clone())
            .collect()
    }

    /// Where the blocks of `cycle` are staged: after a committed resync, appended to the
    /// resync's staging file (the two land as one point), else a file of the cycle's own.
    fn stage_path(&self, cycle: &str) -> std::path::PathBuf {
        match self.meta.inbound.as_ref().and_then(|i| i.resync.as_ref()) {
            Some(r) => self.dir.join("staging").join(&r.file),
            None => staging(&self.dir, cycle),
        }
    }

    /// Removes staging files no recorded point or committed resync needs (blocks of
    /// unfinished cycles).
    fn clear_staging(&self) -> ApiResult<()> {
        let dir = self.dir.join("staging");
        let mut keep = self.staged_files();
        keep.extend(
            self.meta
                .inbound
                .as_ref()
                .and_then(|i| i.resync.as_ref())
                .map(|r| r.file.clone()),
        );
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ApiError::io(e)),
        };
        for e in entries {
            let e = e.map_err(ApiError::io)?;
            let name = e.file_name().to_string_lossy().to_string();
            if !keep.contains(&name) {
                fs::remove_file(e.path()).map_err(ApiError::io)?;
            }
        }
        Ok(())
    }

    /// Removes undo segments no point lists (left by a crash after the metadata dropped them).
    fn sweep_undo(&self) -> ApiResult<()> {
        let vm = self.meta.name.clone();
        let dir = self.dir.join("undo");
        let listed: std::collections::BTreeSet<String> = self
            .meta
            .inbound
            .iter()
            .flat_map(|i| i.rps.iter())
            .flat_map(|p| p.undo.iter().cloned())
            .collect();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ApiError::io(e)),
        };
        let mut removed = 0;
        for e in entries {
            let e = e.map_err(ApiError::io)?;
            let name = e.file_name().to_string_lossy().to_string();
            let orphan = undo::segment_of(&name).is_none_or(|seg| !listed.contains(seg));
            if orphan {
                fs::remove_file(e.path()).map_err(ApiError::io)?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                vm,
                files = removed,
                "removed undo files no recovery point lists"
            );
            sync_dir(&dir).map_err(ApiError::io)?;
        }
        Ok(())
    }

    /// Drops every recovery point of `inbound`: the metadata stops listing them first, then
    /// their undo segments go (a crash between leaves orphans, removed at the next start).
    fn drop_points(&mut self) -> ApiResult<()> {
        let r = &mut *self;
        let ndisks = r.meta.disks.len();
        let Some(i) = r.meta.inbound.as_mut() else {
            return Ok(());
        };
        if i.rps.is_empty() {
            return Ok(());
        }
        let gone: Vec<RpMeta> = i.rps.drain(..).collect();
        self.save()?;
        fault::hit("commit.points");
        let udir = self.dir.join("undo");
        for p in gone {
            for seg in p.undo {
                for d in 0..ndisks {
                    undo::remove(&udir, &seg, d).map_err(ApiError::io)?;
                }
            }
        }
        Ok(())
    }

    /// Controller: lets `source` replicate into this VM. A VM that is not that source's replica
    /// becomes one only through this (at the next bulk transfer from it).
    pub(super) fn accept(
        &mut self,
        source: &str,
        owner: Option<&str>,
        op: Option<&str>,
    ) -> ApiResult<AcceptResult> {
        self.meta.check_owner(owner)?;
        let vm = self.meta.name.clone();
        let answer = AcceptResult {
            source_site: source.to_string(),
        };
        let r = &mut *self;
        if r.meta.power == Power::Running {
            return Err(ApiError::conflict(format!(
                "VM {vm} runs at this site; power it off before it can become a replica"
            )));
        }
        r.meta.accept_from = Some(source.to_string());
        r.meta.claim(owner)?;
        let json = serde_json::to_value(&answer).map_err(|e| ApiError::io(e.into()))?;
        r.meta.note_op(op, &json);
        self.save()?;
        Ok(answer)
    }

    /// Receiver: a cycle or bulk transfer starts.
    ///
    /// An incremental cycle applies only onto the image it was computed against: the VM must be
    /// this source's replica, accepting, holding exactly the cycle the source names as parent.
    /// Anything else answers 409 `ResyncRequired`. A bulk transfer creates the replica where no
    /// VM exists, continues this source's replica, or takes over a VM the controller allowed
    /// (`accept`); it never turns another VM into a replica.
    fn begin(&mut self, b: &BeginCycle) -> ApiResult<BeginAnswer> {
        if self.meta.domain.is_some() && self.disks.is_empty() {
            return Err(ApiError::conflict(format!(
                "VM {} is a hypervisor domain on its own images at this site: replicating \
                 into it is not supported yet",
                self.name()
            )));
        }
        let vm = self.meta.name.clone();
        if b.bulk {
            // An initial copy writes into the image, which the drill copy reads; a resync is
            // compared against the image, which is not the newest point while points wait.
            self.refuse_while_drill("a full or resynchronizing transfer")?;
        }
        // A commit recorded and never applied is finished before anything else touches the
        // image (its staging file must not be cleared with the unfinished cycles').
        self.finish_pending()?;
        let r = &*self;
        if r.meta.power == Power::Running {
            return Err(ApiError::conflict(format!(
                "VM {vm} runs at this site; it cannot receive replication"
            )));
        }
        if r.meta.disks != b.disks {
            return Err(ApiError::conflict(format!(
                "VM {vm} here has other disks than the source"
            )));
        }
        let ours = r.meta.role == Role::Replica
            && r.meta.inbound.as_ref().is_some_and(|i| {
                i.source_site == b.source_site
                    && i.accepting
                    && !i.failed_over
                    && i.rollback.is_none()
            });
        let granted = r.meta.accept_from.as_deref() == Some(b.source_site.as_str());
        // The points describe this image when it only ever took this source's cycles since
        // (stopped or not): a resync keeps them.
        let lineage = r.meta.role == Role::Replica
            && r.meta.inbound.as_ref().is_some_and(|i| {
                i.source_site == b.source_site && !i.failed_over && i.rollback.is_none()
            });
        if !b.bulk {
            let held = r
                .meta
                .inbound
                .as_ref()
                .and_then(|i| i.last_cycle.as_ref())
                .map(|(id, _)| id.as_str());
            let parent_ok = held.is_some_and(|h| {
                b.parent.as_deref() == Some(h)
                    || b.in_doubt.as_deref() == Some(h)
                    || b.in_doubt_earlier.iter().any(|c| c == h)
            });
            if !ours || !parent_ok {
                return Err(ApiError::resync(format!(
                    "VM {vm} here does not hold the parent of cycle {} (parent {}, held here {}); \
                     resynchronize",
                    b.cycle_id,
                    b.parent.as_deref().unwrap_or("none"),
                    if ours {
                        held.unwrap_or("none")
                    } else {
                        "not a replica of this source"
                    }
                )));
            }
        } else if !ours && !granted {
            return Err(ApiError::conflict(format!(
                "VM {vm} at this site is not a replica of {}; replication into it must be \
                 enabled by the controller",
                b.source_site
            )));
        }
        // An initial copy empties the image and writes into it; a resync (any other bulk
        // transfer) is staged and compared against the image, which stays the newest point.
        let direct = b.bulk && b.zero;
        let r = &mut *self;
        r.meta.accept_from = None;
        r.meta.role = Role::Replica;
        r.meta.outbound = None;
        // The image now follows the peer: this side's journal vouches for nothing.
        r.meta.journal_base = None;
        let mut inbound = r.meta.inbound.take().unwrap_or_default();
        if b.bulk {
            // The image matches no cycle of this transfer until it lands; a resync begun
            // before and not landed yet is replaced (its staging file goes below).
            inbound.last_cycle = None;
            inbound.resync = None;
            inbound.failed_over = false;
            inbound.rollback = None;
        }
        inbound.source_site = b.source_site.clone();
        inbound.open_cycle = Some(b.cycle_id.clone());
        inbound.open_direct = direct;
        inbound.accepting = true;
        inbound.retention_hours = b.retention_hours;
        self.meta.inbound = Some(inbound);
        if let Some(d) = &b.definition {
            self.meta.definition = Some(d.clone());
        }
        // The points survive a resync into this source's replica: the image stays theirs until
        // the resync lands as a point with undo data. An initial copy rewrites the image, and
        // the points of a VM that ran here or replicated from elsewhere are not this image's.
        if direct || !lineage {
            // Saved with the open cycle; the points' undo data goes after the metadata.
            self.drop_points()?;
        }
        self.save()?;
        fault::hit("replica.begin");
        self.clear_staging()?;
        create_dir_durable(&self.dir.join("staging")).map_err(ApiError::io)?;
        if let Some(r) = self.meta.inbound.as_ref().and_then(|i| i.resync.clone()) {
            // The cycle the resync waits for: blocks an earlier attempt of it appended (and
            // perhaps tore) are cut away.
            let f = OpenOptions::new()
                .write(true)
                .open(self.dir.join("staging").join(&r.file))
                .map_err(ApiError::io)?;
            f.set_len(r.len).map_err(ApiError::io)?;
            f.sync_all().map_err(ApiError::io)?;
        }
        let mut answer = BeginAnswer::default();
        if b.bulk && b.zero {
            // Every block is about to be sent anyway; an emptied sparse image lets the source
            // skip the zeros (most of a new disk) and frees the space they held.
            for (f, d) in self.disks.open_all()?.iter().zip(&b.disks) {
                f.set_len(0).map_err(ApiError::io)?;
                f.set_len(d.size_bytes).map_err(ApiError::io)?;
                f.sync_all().map_err(ApiError::io)?;
            }
            answer.zeroed = true;
        }
        Ok(answer)
    }

    /// The old source of a reverse resync: the blocks it changed since its journal base (its
    /// last acknowledged cycle), asked for before `begin` makes it a replica.
    pub fn dirty_set(&self) -> ApiResult<DirtySet> {
        let vm = self.meta.name.clone();
        let r = self;
        if r.meta.power == Power::Running {
            return Err(ApiError::conflict(format!(
                "VM {vm} runs at this site; its changes are not final"
            )));
        }
        // A domain's guest writes past the journal, which then vouches for nothing.
        let base = r
            .meta
            .journal_base
            .clone()
            .filter(|_| r.meta.role == Role::Primary && r.meta.domain.is_none());
        // Not just the dirty set: a cycle of this side may be in flight (sealed, never to be
        // acknowledged now), and its blocks differ from the peer's too.
        let sets = r.tracker.unacknowledged().map_err(ApiError::io)?;
        Ok(DirtySet {
            journal_base: base,
            disks: sets.iter().map(|b| hex::encode(b.to_bytes())).collect(),
        })
    }

    /// Receiver: blake3 of every block of a disk, for resync.
    pub fn block_hashes(&self, disk: usize) -> ApiResult<Vec<u8>> {
        self.refuse_while_drill("a resynchronization")?;
        let r = self;
        let size = r
            .meta
            .disks
            .get(disk)
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "{{index}} {disk} is out of range: VM {} has {} disks",
                    r.name(),
                    r.meta.disks.len()
                ))
            })?
            .size_bytes;
        let image = r.disks.open(disk)?;
        // The same hashes a source computes of its own disks to compare with these.
        let mut hashes =
            super::verify::hash_disks(&[size], |_, offset, buf| image.read_exact_at(buf, offset))
                .map_err(ApiError::io)?;
        Ok(hashes.pop().unwrap_or_default())
    }

    /// Receiver: a batch of blocks. Verified blocks are written into the image (an initial
    /// copy) or staged (a cycle, a resync); damaged ones are refused.
    pub fn receive(
        &mut self,
        cycle: &str,
        bulk: bool,
        batch: &[u8],
        verified: &[bool],
    ) -> ApiResult<BatchResult> {
        let vm = self.meta.name.clone();
        let frames = frame::parse(batch).ok_or_else(|| ApiError::bad("malformed block batch"))?;
        if frames.len() != verified.len() {
            return Err(ApiError::bad("verification does not match the batch"));
        }
        let stage_path = self.stage_path(cycle);
        let r = &mut *self;
        if r.meta.role != Role::Replica || !r.meta.inbound.as_ref().is_some_and(|i| i.accepting) {
            return Err(ApiError::conflict(format!(
                "VM {vm} does not accept replication here"
            )));
        }
        check_open(r, cycle)?;
        // What `begin` opened decides: only an initial copy writes into the image.
        let direct = r.meta.inbound.as_ref().is_some_and(|i| i.open_direct);
        if direct && !bulk {
            return Err(ApiError::conflict(format!(
                "cycle {cycle} of {vm} was opened as an initial copy, not as a cycle"
            )));
        }
        let mut res = BatchResult::default();
        let mut good = Vec::new();
        for (f, ok) in frames.iter().zip(verified) {
            let size = r
                .meta
                .disks
                .get(f.disk as usize)
                .ok_or_else(|| ApiError::bad("block of an unknown disk"))?
                .size_bytes;
            if !block_in_range(size, f.block) {
                return Err(ApiError::bad(format!(
                    "block {} is past the end of disk {} ({size} bytes)",
                    f.block, f.disk
                )));
            }
            if f.data.len() != block_len(size, f.block) {
                return Err(ApiError::bad("block length does not match the disk"));
            }
            if *ok {
                good.push(f);
            } else {
                res.refused.push((f.disk, f.block));
            }
        }
        if let Some(i) = r.meta.inbound.as_mut() {
            i.blocks_refused += res.refused.len() as u64;
        }
        if direct {
            let images = r.disks.open_all()?;
            for f in &good {
                images
                    .get(f.disk as usize)
                    .ok_or_else(|| ApiError::bad("block of an unknown disk"))?
                    .write_all_at(f.data, f.block * BLOCK_SIZE)
                    .map_err(ApiError::io)?;
            }
            start_writeback(&images, &good);
        } else {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&stage_path)
                .map_err(ApiError::io)?;
            let before = file.metadata().map_err(ApiError::io)?.len();
            let written = if res.refused.is_empty() {
                // Every frame is good: the batch is staged as it came.
                file.write_all(batch)
            } else {
                let mut buf = Vec::new();
                for f in &good {
                    frame::push_with_hash(&mut buf, f.disk, f.block, &f.hash, f.data);
                }
                file.write_all(&buf)
            };
            if let Err(e) = written {
                // No fragment may stay for the next batch to append after.
                let _ = file.set_len(before);
                return Err(ApiError::io(e));
            }
            fault::hit("replica.stage");
        }
        if !res.refused.is_empty() {
            tracing::warn!(vm, refused = res.refused.len(), "refused damaged blocks");
        }
        Ok(res)
    }

    /// Writes the blocks of a recorded point's staging file into the image, one frame at a
    /// time, then fsyncs. A missing or torn file is an error: the point would lie.
    fn apply_staging(&mut self, path: &std::path::Path) -> ApiResult<()> {
        let file = File::open(path).map_err(|e| {
            ApiError::io(std::io::Error::new(
                e.kind(),
                format!("staging file {} of a recorded point: {e}", path.display()),
            ))
        })?;
        let r = &*self;
        let sizes: Vec<u64> = r.meta.disks.iter().map(|d| d.size_bytes).collect();
        let mut rd = frame::Reader::new(std::io::BufReader::with_capacity(1 << 20, file));
        let mut buf = Vec::with_capacity(BLOCK_SIZE as usize);
        let mut n = 0u64;
        let images = r.disks.open_all()?;
        while let Some(h) = rd.header().map_err(ApiError::io)? {
            rd.data(&h, &mut buf).map_err(ApiError::io)?;
            let (disk, size) = images
                .get(h.disk as usize)
                .zip(sizes.get(h.disk as usize))
                .ok_or_else(|| ApiError::io(std::io::Error::other("staged block of no disk")))?;
            if !block_in_range(*size, h.block) || buf.len() != block_len(*size, h.block) {
                return Err(ApiError::io(std::io::Error::other(
                    "staged block outside its disk",
                )));
            }
            disk.write_all_at(&buf, h.block * BLOCK_SIZE)
                .map_err(ApiError::io)?;
            n += 1;
            if n == 1 {
                fault::fail("replica.apply").map_err(ApiError::io)?;
            }
        }
        for d in &images {
            d.sync_all().map_err(ApiError::io)?;
        }
        Ok(())
    }

    /// The blocks a staging file holds, per disk (headers only; the data is skipped). An error
    /// when the file is torn or names a block outside its disk.
    fn staged_blocks(&self, path: &std::path::Path) -> ApiResult<Vec<Bitmap>> {
        let r = self;
        let mut sets: Vec<Bitmap> = r
            .meta
            .disks
            .iter()
            .map(|d| Bitmap::new(block_count(d.size_bytes)))
            .collect();
        let file = match File::open(path) {
            Ok(f) => f,
            // A cycle of no blocks (nothing changed) stages nothing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(sets),
            Err(e) => return Err(ApiError::io(e)),
        };
        let mut rd = frame::Reader::new(std::io::BufReader::with_capacity(1 << 20, file));
        let mut buf = Vec::with_capacity(BLOCK_SIZE as usize);
        while let Some(h) = rd.header().map_err(|_| ApiError::bad("torn staging"))? {
            // Every block is checked against the checksum it came with before it may be
            // applied: a staging file damaged on disk is refused, never written into the image.
            rd.data(&h, &mut buf)
                .map_err(|_| ApiError::bad("torn staging"))?;
            if frame::checksum(h.disk, h.block, &buf) != h.hash {
                return Err(ApiError::bad(format!(
                    "damaged staging: block {} of disk {} does not match its checksum",
                    h.block, h.disk
                )));
            }
            let set = sets
                .get_mut(h.disk as usize)
                .ok_or_else(|| ApiError::bad("staged block of no disk"))?;
            if h.block >= set.len() {
                return Err(ApiError::bad("staged block outside its disk"));
            }
            set.set(h.block);
        }
        Ok(sets)
    }

    /// Receiver: makes the cycle durable and a recovery point, then acknowledges it.
    ///
    /// Order: staging fsynced (file and directory) → undo segment of every disk fsynced →
    /// point recorded in `vm.json` with its staging file → blocks applied and fsynced → staging
    /// mark cleared. A crash before the point is recorded leaves no point (the source resends);
    /// after it, the next start (or the next `begin`) finishes the apply.
    pub fn commit_cycle(&mut self, c: &CommitCycle) -> ApiResult<Option<RecoveryPoint>> {
        let vm = self.meta.name.clone();
        let r = &*self;
        let inbound = r
            .meta
            .inbound
            .clone()
            .ok_or_else(|| ApiError::conflict("no replication into this VM"))?;
        if let Some((id, rp)) = &inbound.last_cycle
            && *id == c.cycle_id
        {
            return Ok(rp.clone());
        }
        if !inbound.accepting || r.meta.role != Role::Replica {
            return Err(ApiError::conflict(format!(
                "VM {vm} does not accept replication here"
            )));
        }
        check_open(r, &c.cycle_id)?;
        let direct = inbound.open_direct;
        if direct && !c.bulk {
            return Err(ApiError::conflict(format!(
                "cycle {} of {vm} was opened as an initial copy, not as a cycle",
                c.cycle_id
            )));
        }
        if direct {
            r.disks.sync_all()?;
            fault::hit("replica.bulk-commit");
            let r = &mut *self;
            // The image is now the peer's: what this side tracked before is history, and a
            // later failback must start from a clean journal.
            r.tracker.reset().map_err(ApiError::io)?;
            let i = r.meta.inbound.get_or_insert_default();
            i.last_cycle = Some((c.cycle_id.clone(), None));
            i.open_cycle = None;
            i.open_direct = false;
            self.save()?;
            return Ok(None);
        }
        let stage = self.stage_path(&c.cycle_id);
        let staged_file = match File::open(&stage) {
            Ok(f) => {
                f.sync_all().map_err(ApiError::io)?;
                sync_dir(&self.dir.join("staging")).map_err(ApiError::io)?;
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(ApiError::io(e)),
        };
        // Checked before anything is recorded: a torn or damaged staging file fails the commit.
        self.staged_blocks(&stage)?;
        if c.bulk {
            return self.commit_resync(&c.cycle_id, &stage, staged_file);
        }
        // While a drill copy runs on the image, the point is kept as received; its undo is
        // read from the image when it is applied (the image then holds the previous point).
        let defer = self.deferring();
        if !defer {
            // Points an earlier error left unapplied go first: the undo below reads the image.
            self.finish_pending()?;
        }
        let (seq, first) = self
            .meta
            .inbound
            .as_ref()
            .map_or((1, true), |i| (i.next_seq.max(1), i.rps.is_empty()));
        let deferred_undo = defer && staged_file && !first;
        let undo = if first || deferred_undo {
            vec![]
        } else {
            let seg = self.write_undo(seq, &stage)?;
            fault::hit("replica.undo");
            vec![seg]
        };
        let point = RpMeta {
            seq,
            time: c.time,
            kind: c.kind,
            undo,
            staged: staged_file
                .then(|| stage.file_name().map(|n| n.to_string_lossy().to_string()))
                .flatten(),
            undo_at_apply: deferred_undo,
            cut_id: c.cut_id.clone(),
        };
        let view = point.view();
        {
            let i = self.meta.inbound.get_or_insert_default();
            i.rps.push(point);
            i.next_seq = seq + 1;
            i.last_cycle = Some((c.cycle_id.clone(), Some(view.clone())));
            i.open_cycle = None;
            i.last_sync_time = Some(c.time);
            // A resync it followed lands with it: its blocks are this point's staging file.
            i.resync = None;
        }
        // The point is recorded (with its staging file) before the image changes, so a crash
        // or a failed apply is finished by `finish_pending` before the image is used again.
        self.save()?;
        fault::hit("replica.point");
        if defer {
            return Ok(Some(view));
        }
        if staged_file {
            self.apply_staging(&stage)?;
            fault::hit("replica.applied");
            if let Some(p) = self.point_mut(seq) {
                p.staged = None;
            }
            self.save()?;
            let _ = fs::remove_file(&stage);
        }
        self.apply_retention(Timestamp::now())?;
        Ok(Some(view))
    }

    /// The commit of a resync: its blocks stay staged, durably, and the image stays the newest
    /// point; they land with the next cycle (staged after them in the same file), as one point
    /// with undo data like any other. Order: staging fsynced (`replica.bulk-commit`) → tracker
    /// reset → the resync recorded in `vm.json` with the staging file's length.
    fn commit_resync(
        &mut self,
        cycle: &str,
        stage: &std::path::Path,
        staged_file: bool,
    ) -> ApiResult<Option<RecoveryPoint>> {
        fault::hit("replica.bulk-commit");
        let len = if staged_file {
            fs::metadata(stage).map_err(ApiError::io)?.len()
        } else {
            0
        };
        let file = stage
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        // What this side tracked before is history: the image will be the peer's, and a later
        // failback must start from a clean journal.
        self.tracker.reset().map_err(ApiError::io)?;
        let i = self.meta.inbound.get_or_insert_default();
        i.last_cycle = Some((cycle.to_string(), None));
        i.open_cycle = None;
        // Nothing differed: the image is already the resync's.
        i.resync = (len > 0).then_some(StagedResync { file, len });
        self.save()?;
        Ok(None)
    }

    fn apply_retention(&mut self, now: Timestamp) -> ApiResult<()> {
        let udir = self.dir.join("undo");
        let r = &mut *self;
        let sizes: Vec<u64> = r.meta.disks.iter().map(|d| d.size_bytes).collect();
        let Some(i) = r.meta.inbound.as_mut() else {
            return Ok(());
        };
        let infos: Vec<retention::PointInfo> = i
            .rps
            .iter()
            .map(|p| retention::PointInfo {
                seq: p.seq,
                time: p.time,
                kind: p.kind,
            })
            .collect();
        let plan = retention::plan(&infos, now, i.retention_hours);
        let mut dropped = Vec::new();
        for seq in &plan.delete {
            let Some(pos) = i.rps.iter().position(|p| p.seq == *seq) else {
                continue;
            };
            let gone = i.rps.remove(pos);
            if pos == 0 {
                // The new oldest point needs no way back.
                dropped.extend(gone.undo);
                if let Some(next) = i.rps.first_mut() {
                    dropped.append(&mut next.undo);
                }
            } else if let Some(next) = i.rps.get_mut(pos) {
                next.undo.extend(gone.undo);
            }
        }
        for p in i.rps.iter_mut() {
            if plan.relabel_hourly.contains(&p.seq) {
                p.kind = RecoveryPointKind::Hourly;
            }
        }
        // Lists that grew by merging are folded into one segment each, so a rollback reads
        // each block once per point. The folded segment is durable before the metadata names
        // it; the old segments go after the metadata stops naming them.
        let mut folds = Vec::new();
        let fold_id = i.next_seq;
        for p in i.rps.iter_mut().filter(|p| p.undo.len() > 1) {
            // A name no segment had: the inputs are read while it is written.
            let out = format!("m{:06}x{fold_id:06}", p.seq);
            for (d, size) in sizes.iter().enumerate() {
                undo::merge(&udir, &p.undo, &out, d, *size).map_err(ApiError::io)?;
            }
            folds.push((std::mem::replace(&mut p.undo, vec![out.clone()]), out));
        }
        if !folds.is_empty() {
            sync_dir(&udir).map_err(ApiError::io)?;
        }
        for (old, out) in folds {
            dropped.extend(old.into_iter().filter(|s| *s != out));
        }
        if plan.delete.is_empty() && dropped.is_empty() && plan.relabel_hourly.is_empty() {
            fault::hit("replica.retention");
            return Ok(());
        }
        self.save()?;
        fault::hit("replica.retention");
        for seg in dropped {
            for d in 0..sizes.len() {
                undo::remove(&udir, &seg, d).map_err(ApiError::io)?;
            }
        }
        Ok(())
    }

    fn select(&self, sel: &RecoveryPointSelector) -> ApiResult<usize> {
        let vm = self.meta.name.clone();
        let r = self;
        let i = r
            .meta
            .inbound
            .as_ref()
            .filter(|_| r.meta.role == Role::Replica)
            .ok_or_else(|| ApiError::conflict(format!("VM {vm} is not a replica here")))?;
        let pos = match sel {
            RecoveryPointSelector::Latest => i.rps.len().checked_sub(1),
            // The newest point already applied to the image: no waiting point is applied first.
            RecoveryPointSelector::LatestProcessed => {
                i.rps.iter().rposition(|p| p.staged.is_none())
            }
            RecoveryPointSelector::LatestAppConsistent => i
                .rps
                .iter()
                .rposition(|p| p.kind == RecoveryPointKind::AppConsistent),
            RecoveryPointSelector::Id(id) => i.rps.iter().position(|p| p.view().id == *id),
        };
        pos.ok_or_else(|| ApiError::not_found(format!("no recovery point {sel} for {vm}")))
    }

    /// Rolls `target` back from the newest point to point `pos` and returns the blocks changed.
    /// Applying the segments again from the start gives the same image (each holds absolute
    /// contents), so a rollback cut short by a crash is finished by running it again.
    fn roll_back(&self, pos: usize, target: &[File]) -> ApiResult<Vec<Bitmap>> {
        let r = self;
        let udir = self.dir.join("undo");
        let mut changed: Vec<Bitmap> = r
            .meta
            .disks
            .iter()
            .map(|d| Bitmap::new(block_count(d.size_bytes)))
            .collect();
        if let Some(i) = &r.meta.inbound {
            for p in i.rps[pos + 1..].iter().rev() {
                for seg in &p.undo {
                    for (d, disk) in r.meta.disks.iter().enumerate() {
                        for b in undo::index(&udir, seg, d).map_err(ApiError::io)? {
                            changed[d].set(b);
                        }
                        undo::apply(&udir, seg, d, &target[d], disk.size_bytes)
                            .map_err(ApiError::io)?;
                        fault::hit("failover.rollback");
                    }
                }
            }
        }
        for f in target {
            f.sync_all().map_err(ApiError::io)?;
        }
        Ok(changed)
    }

    pub fn recovery_points(&self) -> ApiResult<Vec<RecoveryPoint>> {
        let r = self;
        Ok(r.meta
            .inbound
            .as_ref()
            .map(|i| i.rps.iter().map(RpMeta::view).collect())
            .unwrap_or_default())
    }

    /// Replica: bring the VM up from a recovery point.
    ///
    /// The intent (target point, operation id) is recorded before the rollback rewrites the
    /// image; the end (points newer than the target dropped, role Primary, the operation's
    /// answer) is one metadata write. A crash between is finished at the next start.
    pub fn failover(
        &mut self,
        sel: &RecoveryPointSelector,
        op: Option<&str>,
    ) -> ApiResult<RecoveryPoint> {
        // The drill copy reads the image: the controller cleans it up first.
        self.refuse_while_drill("a failover")?;
        // Points recorded and not applied are applied first (the rollback starts from the
        // newest), except for LatestProcessed: it starts from the newest point already applied,
        // and the waiting ones are dropped with the other newer points.
        if *sel != RecoveryPointSelector::LatestProcessed {
            self.finish_pending()?;
        }
        let pos = self.select(sel)?;
        let r = &mut *self;
        let i = r
            .meta
            .inbound
            .as_mut()
            .ok_or_else(|| ApiError::conflict("no recovery points"))?;
        let rp = i.rps[pos].view();
        let rb = Rollback {
            to_seq: i.rps[pos].seq,
            operation_id: op.map(str::to_string),
        };
        i.rollback = Some(rb.clone());
        i.accepting = false;
        i.open_cycle = None;
        self.save()?;
        fault::hit("failover.intent");
        self.finish_failover(&rb)?;
        Ok(rp)
    }

    /// The part of a failover after its intent is recorded; run again after a crash.
    fn finish_failover(&mut self, rb: &Rollback) -> ApiResult<()> {
        let r = &*self;
        let pos = r
            .meta
            .inbound
            .as_ref()
            .and_then(|i| i.rps.iter().position(|p| p.seq == rb.to_seq))
            .ok_or_else(|| {
                ApiError::io(std::io::Error::other(format!(
                    "failover intent names point {} that is not listed",
                    rb.to_seq
                )))
            })?;
        let files: Vec<File> = r.disks.open_all()?;
        let changed = self.roll_back(pos, &files)?;
        fault::hit("failover.rolled-back");
        // Points left waiting (a failover to LatestProcessed after a drill) and a committed
        // resync are dropped without touching the image, which the old source holds them on.
        let unapplied = self.unapplied_blocks(pos);
        let r = &mut *self;
        // The rolled-back and the unapplied blocks differ from what the old source holds: a
        // later resync sends them (recording them again after a crash is harmless).
        for (d, set) in changed.iter().enumerate() {
            r.tracker.record_set(d, set).map_err(ApiError::io)?;
        }
        for (d, set) in unapplied.iter().flatten().enumerate() {
            r.tracker.record_set(d, set).map_err(ApiError::io)?;
        }
        r.meta.role = Role::Primary;
        r.meta.power = Power::Running;
        // The source held the last committed cycle; the tracker now holds every block where
        // this image may differ from it (rolled back, never applied and, from now on, guest
        // writes). Unless a staging file was lost: then no journal can vouch for the
        // difference, and a resync compares hashes.
        r.meta.journal_base = r
            .meta
            .inbound
            .as_ref()
            .and_then(|i| i.last_cycle.as_ref())
            .map(|(id, _)| id.clone())
            .filter(|_| unapplied.is_some());
        let mut answer = None;
        if let Some(i) = r.meta.inbound.as_mut() {
            answer = Some(FailoverResult {
                recovery_point: i.rps[pos].view(),
            });
            i.accepting = false;
            i.failed_over = true;
            i.rollback = None;
            i.resync = None;
            // Newer points no longer describe this image; their undo data goes after the
            // metadata stops listing them (orphans are swept at the next start).
            i.rps.truncate(pos + 1);
        }
        if let Some(a) = answer {
            let json = serde_json::to_value(a).map_err(|e| ApiError::io(e.into()))?;
            r.meta.note_op(rb.operation_id.as_deref(), &json);
        }
        self.save()?;
        // Staging files of waiting points newer than the target are no longer listed.
        self.clear_staging()?;
        self.sweep_undo()
    }

    /// Deletes every recovery point of `vm`; the answer is saved with the metadata that stops
    /// listing them.
    pub fn commit_points(&mut self, op: Option<&str>) -> ApiResult<CommitResult> {
        self.refuse_while_drill("a commit")?;
        let r = &mut *self;
        let n = r.meta.inbound.as_ref().map_or(0, |i| i.rps.len() as u64);
        let answer = CommitResult {
            deleted_recovery_points: n,
        };
        let json = serde_json::to_value(&answer).map_err(|e| ApiError::io(e.into()))?;
        r.meta.note_op(op, &json);
        if n == 0 {
            self.save()?;
        } else {
            self.drop_points()?;
        }
        Ok(answer)
    }

    /// Replica: stop accepting cycles.
    pub fn stop_inbound(&mut self) -> ApiResult<()> {
        let r = &mut *self;
        if let Some(o) = r.meta.outbound.as_mut() {
            o.stopped = true;
        }
        if let Some(i) = r.meta.inbound.as_mut() {
            i.accepting = false;
        }
        self.save()
    }
}

impl Store {
    /// Replica: a running drill copy `<vm>-test` (`r` is `vm`, locked).
    ///
    /// Its disks are copies of the image rolled back to the point, or, with `overlay` (a
    /// domain's drill), copy-on-write overlays of the image made by the hypervisor's tools,
    /// holding only the blocks where the point differs from the image. Either way the replica
    /// is untouched, and while the drill copy exists the points that arrive wait to be applied
    /// (the overlays read the image).
    pub(super) fn test_failover(
        &self,
        r: &mut VmRec,
        sel: &RecoveryPointSelector,
        network: &str,
        op: Option<&str>,
        overlay: Option<MakeOverlay<'_>>,
    ) -> ApiResult<TestFailoverResult> {
        r.finish_pending()?;
        let pos = r.select(sel)?;
        let rp = r
            .meta
            .inbound
            .as_ref()
            .map(|i| i.rps[pos].view())
            .ok_or_else(|| ApiError::conflict("no recovery points"))?;
        let name = drill_copy_name(r.name());
        let recorded = r
            .meta
            .inbound
            .as_ref()
            .is_some_and(|i| i.test_copy.is_some());
        if self.exists(&name) {
            self.write_vm(&name, |t| {
                if recorded || t.meta.role != Role::TestCopy {
                    return Err(ApiError::conflict(format!("{name} already exists")));
                }
                // A drill copy a crash left before it was recorded: made again from scratch.
                t.meta.power = Power::Off;
                self.delete_locked(&name, t).map(|_| ())
            })?;
        }
        let mut meta = VmMeta::new(
            &name,
            Power::Off,
            Role::TestCopy,
            (&r.meta.disks, r.meta.integration_services),
        );
        meta.network = Some(network.to_string());
        let tmp = self.root.join("vms").join(format!(".tmp-{name}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(tmp.join("disks")).map_err(ApiError::io)?;
        match overlay {
            None => {
                let mut files = Vec::new();
                for d in &meta.disks {
                    let dst = tmp.join("disks").join(format!("{}.img", d.name));
                    fs::copy(r.dir.join("disks").join(format!("{}.img", d.name)), &dst)
                        .map_err(ApiError::io)?;
                    files.push(
                        OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(&dst)
                            .map_err(ApiError::io)?,
                    );
                }
                r.roll_back(pos, &files)?;
            }
            Some(make) => {
                // The rollback goes into sparse scratch files (only the blocks it changes are
                // written), which the overlays then take.
                let mut deltas = Vec::new();
                for d in &meta.disks {
                    let path = tmp.join(format!("{}.delta", d.name));
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(ApiError::io)?;
                    f.set_len(d.size_bytes).map_err(ApiError::io)?;
                    deltas.push((path, f));
                }
                let files: Vec<File> = deltas
                    .iter()
                    .map(|(_, f)| f.try_clone())
                    .collect::<Result<_, _>>()
                    .map_err(ApiError::io)?;
                let changed = r.roll_back(pos, &files)?;
                for ((d, (delta, _)), changed) in meta.disks.iter().zip(&deltas).zip(&changed) {
                    let base =
                        fs::canonicalize(r.dir.join("disks").join(format!("{}.img", d.name)))
                            .map_err(ApiError::io)?;
                    make(&OverlayDisk {
                        base: &base,
                        overlay: &tmp.join("disks").join(format!("{}.qcow2", d.name)),
                        size: d.size_bytes,
                        delta,
                        changed,
                    })?;
                    fs::remove_file(delta).map_err(ApiError::io)?;
                }
                // A domain on overlays: the store keeps no raw image of it.
                meta.domain = Some(Default::default());
            }
        }
        sync_dir(&tmp.join("disks")).map_err(ApiError::io)?;
        meta.power = Power::Running;
        write_atomic(
            &tmp.join("vm.json"),
            &serde_json::to_vec_pretty(&meta).map_err(|e| ApiError::io(e.into()))?,
        )
        .map_err(ApiError::io)?;
        let dst = self.vm_dir(&name);
        fs::rename(&tmp, &dst).map_err(ApiError::io)?;
        sync_dir(&self.root.join("vms")).map_err(ApiError::io)?;
        let rec = open_vm(&dst, meta).map_err(ApiError::io)?;
        self.insert_opened(&name, rec)?;
        let answer = TestFailoverResult {
            vm_name: name.clone(),
            recovery_point: rp.clone(),
        };
        let json = serde_json::to_value(&answer).map_err(|e| ApiError::io(e.into()))?;
        if let Some(i) = r.meta.inbound.as_mut() {
            i.test_copy = Some((name, network.to_string(), rp));
        }
        r.meta.note_op(op, &json);
        r.save()?;
        Ok(answer)
    }

    /// Deletes the drill copy of `vm` (`r`, locked).
    pub(super) fn test_cleanup(&self, r: &mut VmRec) -> ApiResult<(String, bool)> {
        let name = drill_copy_name(r.name());
        let exists = self.exists(&name)
            && self.write_vm(&name, |t| {
                if t.meta.role != Role::TestCopy {
                    return Ok(false);
                }
                t.meta.power = Power::Off;
                self.delete_locked(&name, t).map(|_| true)
            })?;
        if let Some(i) = r.meta.inbound.as_mut() {
            i.test_copy = None;
        }
        r.save()?;
        Ok((name, exists))
    }
}
