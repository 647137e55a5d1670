//! Replication state of a VM and the receiving side: staging, commit into recovery points,
//! failover, test failover, commit. Runs inside the store lock.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::store::{Store, VmMeta, VmRec, open_vm, write_atomic};
use super::{ApiError, ApiResult};
use crate::replication::tracker::sync_dir;
use crate::replication::{BLOCK_SIZE, Bitmap, block_count, frame, retention, undo};
use crate::site::{
    Direction, DiskSpec, Power, RecoveryPoint, RecoveryPointKind, RecoveryPointSelector,
    RecoveryPointsSummary, ReplicationInfo, ReplicationMode, ReplicationState, Role, TestCopyInfo,
};

/// Outbound replication settings and progress (at the source).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outbound {
    pub peer_site: String,
    pub peer_url: String,
    pub peer_token: String,
    /// CA of an https peer.
    #[serde(default)]
    pub peer_ca_pem: Option<String>,
    pub interval_seconds: u64,
    pub retention_hours: u64,
    pub app_consistent_hours: u64,
    pub state: ReplicationState,
    /// Set until the bulk transfer (whole disk or resync) is acknowledged.
    pub bulk: Option<ReplicationMode>,
    pub stopped: bool,
    pub last_sync_time: Option<Timestamp>,
    pub last_app_consistent: Option<Timestamp>,
    pub bytes_sent: u64,
    pub blocks_resent: u64,
    pub last_error: Option<String>,
}

/// One recovery point at the replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RpMeta {
    pub seq: u64,
    pub time: Timestamp,
    pub kind: RecoveryPointKind,
    /// Undo segments (applied in order) that take the image from this point to the previous.
    pub undo: Vec<String>,
    /// Staging file still to be applied to the image (crash between commit and apply).
    #[serde(default)]
    pub staged: Option<String>,
    /// Id of the consistent cut that made this point.
    #[serde(default)]
    pub cut_id: Option<String>,
}

impl RpMeta {
    fn view(&self) -> RecoveryPoint {
        RecoveryPoint {
            id: format!("rp-{:06}", self.seq),
            time: self.time,
            app_consistent: self.kind == RecoveryPointKind::AppConsistent,
            kind: self.kind,
            cut_id: self.cut_id.clone(),
        }
    }
}

/// Inbound replication and recovery points (at the replica).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inbound {
    pub source_site: String,
    pub accepting: bool,
    pub retention_hours: u64,
    pub next_seq: u64,
    pub rps: Vec<RpMeta>,
    /// Cycle id and point of the last commit, so a repeated commit answers the same point.
    pub last_cycle: Option<(String, Option<RecoveryPoint>)>,
    /// The cycle `begin` opened and that has not committed: blocks and a commit of any other
    /// cycle are refused (a second `begin` discarded that cycle's staged blocks).
    #[serde(default)]
    pub open_cycle: Option<String>,
    pub last_sync_time: Option<Timestamp>,
    pub blocks_refused: u64,
    /// Recovery points are history of the replica only until the VM runs here.
    #[serde(default)]
    pub failed_over: bool,
    #[serde(default)]
    pub test_copy: Option<(String, String, RecoveryPoint)>,
}

pub(super) fn replication_info(r: &VmRec) -> ReplicationInfo {
    if let Some(o) = &r.meta.outbound {
        return ReplicationInfo {
            state: if o.stopped {
                ReplicationState::Disabled
            } else {
                o.state
            },
            direction: Some(Direction::Outbound),
            peer_site: Some(o.peer_site.clone()),
            interval_seconds: o.interval_seconds,
            last_sync_time: o.last_sync_time,
            pending_bytes: r.tracker.dirty_blocks() * BLOCK_SIZE,
            bytes_sent: o.bytes_sent,
            last_error: o.last_error.clone(),
            blocks_refused: o.blocks_resent,
        };
    }
    if let Some(i) = &r.meta.inbound
        && r.meta.role == Role::Replica
    {
        return ReplicationInfo {
            state: if i.accepting {
                ReplicationState::Replicating
            } else {
                ReplicationState::Disabled
            },
            direction: Some(Direction::Inbound),
            peer_site: Some(i.source_site.clone()),
            last_sync_time: i.last_sync_time,
            blocks_refused: i.blocks_refused,
            ..Default::default()
        };
    }
    ReplicationInfo::default()
}

pub(super) fn rp_summary(r: &VmRec) -> RecoveryPointsSummary {
    let Some(i) = &r.meta.inbound else {
        return RecoveryPointsSummary::default();
    };
    RecoveryPointsSummary {
        count: i.rps.len() as u64,
        latest: i.rps.last().map(RpMeta::view),
        latest_app_consistent: i
            .rps
            .iter()
            .rev()
            .find(|p| p.kind == RecoveryPointKind::AppConsistent)
            .map(RpMeta::view),
    }
}

/// Body of `POST /v1/replica/{vm}/begin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BeginCycle {
    pub source_site: String,
    pub cycle_id: String,
    pub disks: Vec<DiskSpec>,
    pub integration_services: bool,
    pub retention_hours: u64,
    /// Bulk transfers write straight into the image and drop older points.
    pub bulk: bool,
    /// Initial transfer: the replica empties its images first (sparse, all zeros), so the
    /// source can skip blocks that hold only zeros. The answer says whether it did.
    #[serde(default)]
    pub zero: bool,
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
fn check_open(r: &VmRec, vm: &str, cycle: &str) -> ApiResult<()> {
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

fn undo_dir(store: &Store, vm: &str) -> std::path::PathBuf {
    store.vm_dir(vm).join("undo")
}

fn staging(store: &Store, vm: &str, cycle: &str) -> std::path::PathBuf {
    store
        .vm_dir(vm)
        .join("staging")
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
    pub(super) fn test_copy_of(&self, r: &VmRec) -> Option<TestCopyInfo> {
        let (name, network, rp) = r.meta.inbound.as_ref()?.test_copy.clone()?;
        Some(TestCopyInfo {
            vm_name: name,
            network,
            recovery_point: rp,
        })
    }

    pub(super) fn rec_mut(&mut self, vm: &str) -> ApiResult<&mut VmRec> {
        self.vms
            .get_mut(vm)
            .ok_or_else(|| ApiError::not_found(format!("VM {vm} is not at this site")))
    }

    /// Replays commits that crashed between recording the point and applying its blocks.
    pub(super) fn recover(&mut self) -> ApiResult<()> {
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for vm in names {
            let pending: Vec<(u64, String)> = self.vms[&vm]
                .meta
                .inbound
                .iter()
                .flat_map(|i| i.rps.iter())
                .filter_map(|p| p.staged.clone().map(|s| (p.seq, s)))
                .collect();
            for (seq, file) in pending {
                let path = self.vm_dir(&vm).join("staging").join(&file);
                self.apply_staging(&vm, &path)?;
                let r = self.rec_mut(&vm)?;
                if let Some(p) = r
                    .meta
                    .inbound
                    .as_mut()
                    .and_then(|i| i.rps.iter_mut().find(|p| p.seq == seq))
                {
                    p.staged = None;
                }
                self.save(&vm)?;
            }
            // Blocks of a cycle that never committed are dropped; the source resends them
            // (their journals are still there), as are spools of unfinished outbound cycles.
            if let Some(i) = self.rec_mut(&vm)?.meta.inbound.as_mut()
                && i.open_cycle.take().is_some()
            {
                self.save(&vm)?;
            }
            for sub in ["staging", "spool"] {
                let dir = self.vm_dir(&vm).join(sub);
                if dir.exists() {
                    fs::remove_dir_all(&dir).map_err(ApiError::io)?;
                }
            }
        }
        Ok(())
    }

    /// Receiver: a cycle or bulk transfer starts; creates the replica VM when needed.
    pub fn begin(&mut self, vm: &str, b: &BeginCycle) -> ApiResult<BeginAnswer> {
        if !self.vms.contains_key(vm) {
            let meta = VmMeta {
                name: vm.to_string(),
                power: Power::Off,
                role: Role::Replica,
                integration_services: b.integration_services,
                disks: b.disks.clone(),
                network: None,
                outbound: None,
                inbound: None,
                journal_base: None,
            };
            let rec = self.materialize(vm, meta).map_err(ApiError::io)?;
            self.vms.insert(vm.to_string(), rec);
        }
        let r = self.rec_mut(vm)?;
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
        if let Some(i) = &r.meta.inbound
            && !i.accepting
            && r.meta.role == Role::Replica
            && !b.bulk
        {
            return Err(ApiError::conflict(format!(
                "replication of {vm} was stopped here"
            )));
        }
        let was_replica = r.meta.role == Role::Replica && r.meta.inbound.is_some();
        r.meta.role = Role::Replica;
        r.meta.outbound = None;
        // The image now follows the peer: this side's journal vouches for nothing.
        r.meta.journal_base = None;
        let mut inbound = r.meta.inbound.take().unwrap_or_default();
        if b.bulk {
            // Blocks are about to be written out of order: the image matches no cycle until
            // the bulk transfer commits.
            inbound.last_cycle = None;
        }
        inbound.source_site = b.source_site.clone();
        inbound.open_cycle = Some(b.cycle_id.clone());
        inbound.accepting = true;
        inbound.retention_hours = b.retention_hours;
        if b.bulk || !was_replica {
            // The image is about to be overwritten out of order: older points cannot survive.
            for p in inbound.rps.drain(..) {
                for seg in p.undo {
                    for d in 0..b.disks.len() {
                        undo::remove(&undo_dir(self, vm), &seg, d).map_err(ApiError::io)?;
                    }
                }
            }
            inbound.failed_over = false;
        }
        self.rec_mut(vm)?.meta.inbound = Some(inbound);
        self.save(vm)?;
        let dir = self.vm_dir(vm).join("staging");
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(ApiError::io)?;
        }
        fs::create_dir_all(&dir).map_err(ApiError::io)?;
        let mut answer = BeginAnswer::default();
        if b.bulk && b.zero {
            // Every block is about to be sent anyway; an emptied sparse image lets the source
            // skip the zeros (most of a new disk) and frees the space they held.
            for (f, d) in self.rec(vm)?.disks.iter().zip(&b.disks) {
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
    pub fn dirty_set(&self, vm: &str) -> ApiResult<DirtySet> {
        let r = self.rec(vm)?;
        if r.meta.power == Power::Running {
            return Err(ApiError::conflict(format!(
                "VM {vm} runs at this site; its changes are not final"
            )));
        }
        let base = r
            .meta
            .journal_base
            .clone()
            .filter(|_| r.meta.role == Role::Primary);
        // Not just the dirty set: a cycle of this side may be in flight (sealed, never to be
        // acknowledged now), and its blocks differ from the peer's too.
        let sets = r.tracker.unacknowledged().map_err(ApiError::io)?;
        Ok(DirtySet {
            journal_base: base,
            disks: sets.iter().map(|b| hex::encode(b.to_bytes())).collect(),
        })
    }

    /// Receiver: blake3 of every block of a disk, for resync.
    pub fn block_hashes(&self, vm: &str, disk: usize) -> ApiResult<Vec<u8>> {
        let r = self.rec(vm)?;
        let size = r
            .meta
            .disks
            .get(disk)
            .ok_or_else(|| ApiError::not_found("no such disk"))?
            .size_bytes;
        let mut out = Vec::with_capacity(block_count(size) as usize * 32);
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for b in 0..block_count(size) {
            let len = crate::replication::block_len(size, b);
            r.disks[disk]
                .read_exact_at(&mut buf[..len], b * BLOCK_SIZE)
                .map_err(ApiError::io)?;
            out.extend_from_slice(&crate::replication::block_hash(&buf[..len]));
        }
        Ok(out)
    }

    /// Receiver: a batch of blocks. Verified blocks are written (bulk) or staged (cycle);
    /// damaged ones are refused.
    pub fn receive(
        &mut self,
        vm: &str,
        cycle: &str,
        bulk: bool,
        batch: &[u8],
        verified: &[bool],
    ) -> ApiResult<BatchResult> {
        let frames = frame::parse(batch).ok_or_else(|| ApiError::bad("malformed block batch"))?;
        if frames.len() != verified.len() {
            return Err(ApiError::bad("verification does not match the batch"));
        }
        let stage_path = staging(self, vm, cycle);
        let r = self.rec_mut(vm)?;
        if r.meta.role != Role::Replica || !r.meta.inbound.as_ref().is_some_and(|i| i.accepting) {
            return Err(ApiError::conflict(format!(
                "VM {vm} does not accept replication here"
            )));
        }
        check_open(r, vm, cycle)?;
        let mut res = BatchResult::default();
        let mut good = Vec::new();
        for (f, ok) in frames.iter().zip(verified) {
            let size = r
                .meta
                .disks
                .get(f.disk as usize)
                .ok_or_else(|| ApiError::bad("block of an unknown disk"))?
                .size_bytes;
            if f.data.len() != crate::replication::block_len(size, f.block) {
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
        if bulk {
            for f in &good {
                r.disks[f.disk as usize]
                    .write_all_at(f.data, f.block * BLOCK_SIZE)
                    .map_err(ApiError::io)?;
            }
            start_writeback(&r.disks, &good);
        } else {
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&stage_path)
                .map_err(ApiError::io)?;
            if res.refused.is_empty() {
                // Every frame is good: the batch is staged as it came.
                file.write_all(batch).map_err(ApiError::io)?;
            } else {
                let mut buf = Vec::new();
                for f in &good {
                    frame::push_with_hash(&mut buf, f.disk, f.block, &f.hash, f.data);
                }
                file.write_all(&buf).map_err(ApiError::io)?;
            }
        }
        if !res.refused.is_empty() {
            tracing::warn!(vm, refused = res.refused.len(), "refused damaged blocks");
        }
        Ok(res)
    }

    /// Writes the blocks of a staging file into the image, one frame at a time.
    fn apply_staging(&mut self, vm: &str, path: &std::path::Path) -> ApiResult<()> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ApiError::io(e)),
        };
        let r = self.rec(vm)?;
        let mut rd = frame::Reader::new(std::io::BufReader::with_capacity(1 << 20, file));
        let mut buf = Vec::with_capacity(BLOCK_SIZE as usize);
        while let Some(h) = rd.header().map_err(ApiError::io)? {
            rd.data(&h, &mut buf).map_err(ApiError::io)?;
            let disk = r
                .disks
                .get(h.disk as usize)
                .ok_or_else(|| ApiError::io(std::io::Error::other("staged block of no disk")))?;
            disk.write_all_at(&buf, h.block * BLOCK_SIZE)
                .map_err(ApiError::io)?;
        }
        for d in &r.disks {
            d.sync_all().map_err(ApiError::io)?;
        }
        Ok(())
    }

    /// The blocks a staging file holds, per disk (headers only; the data is skipped). An error
    /// when the file is torn.
    fn staged_blocks(&self, vm: &str, path: &std::path::Path) -> ApiResult<Vec<Bitmap>> {
        let r = self.rec(vm)?;
        let mut sets: Vec<Bitmap> = r
            .meta
            .disks
            .iter()
            .map(|d| Bitmap::new(block_count(d.size_bytes)))
            .collect();
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(sets),
            Err(e) => return Err(ApiError::io(e)),
        };
        let mut rd = frame::Reader::new(std::io::BufReader::with_capacity(64 << 10, file));
        while let Some(h) = rd.header().map_err(|_| ApiError::bad("torn staging"))? {
            rd.skip(&h).map_err(|_| ApiError::bad("torn staging"))?;
            sets.get_mut(h.disk as usize)
                .ok_or_else(|| ApiError::bad("staged block of no disk"))?
                .set(h.block);
        }
        Ok(sets)
    }

    /// Receiver: makes the cycle durable and a recovery point, then acknowledges it.
    pub fn commit_cycle(&mut self, vm: &str, c: &CommitCycle) -> ApiResult<Option<RecoveryPoint>> {
        let r = self.rec(vm)?;
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
        check_open(r, vm, &c.cycle_id)?;
        let sizes: Vec<u64> = r.meta.disks.iter().map(|d| d.size_bytes).collect();
        if c.bulk {
            for d in &r.disks {
                d.sync_all().map_err(ApiError::io)?;
            }
            let r = self.rec_mut(vm)?;
            // The image is now the peer's: what this side tracked before is history, and a
            // later failback must start from a clean journal.
            r.tracker.reset().map_err(ApiError::io)?;
            let i = r.meta.inbound.get_or_insert_default();
            i.last_cycle = Some((c.cycle_id.clone(), None));
            i.open_cycle = None;
            self.save(vm)?;
            return Ok(None);
        }
        let stage = staging(self, vm, &c.cycle_id);
        match File::open(&stage) {
            Ok(f) => f.sync_all().map_err(ApiError::io)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ApiError::io(e)),
        }
        let staged = self.staged_blocks(vm, &stage)?;
        let seq = inbound.next_seq.max(1);
        let seg = format!("u{seq:06}");
        let udir = undo_dir(self, vm);
        fs::create_dir_all(&udir).map_err(ApiError::io)?;
        let r = self.rec(vm)?;
        let first = inbound.rps.is_empty();
        if !first {
            for (d, size) in sizes.iter().enumerate() {
                let blocks: Vec<u64> = staged[d].iter().collect();
                if !blocks.is_empty() {
                    undo::write(&udir, &seg, d, &r.disks[d], *size, &blocks)
                        .map_err(ApiError::io)?;
                }
            }
            sync_dir(&udir).map_err(ApiError::io)?;
        }
        let point = RpMeta {
            seq,
            time: c.time,
            kind: c.kind,
            undo: if first { vec![] } else { vec![seg] },
            staged: stage.file_name().map(|n| n.to_string_lossy().to_string()),
            cut_id: c.cut_id.clone(),
        };
        let view = point.view();
        {
            let i = self.rec_mut(vm)?.meta.inbound.get_or_insert_default();
            i.rps.push(point);
            i.next_seq = seq + 1;
            i.last_cycle = Some((c.cycle_id.clone(), Some(view.clone())));
            i.open_cycle = None;
            i.last_sync_time = Some(c.time);
        }
        // The point is recorded (with its staging file) before the image changes, so a crash
        // here is finished by `recover` at the next start.
        self.save(vm)?;
        self.apply_staging(vm, &stage)?;
        if let Some(p) = self
            .rec_mut(vm)?
            .meta
            .inbound
            .as_mut()
            .and_then(|i| i.rps.last_mut())
        {
            p.staged = None;
        }
        self.save(vm)?;
        let _ = fs::remove_file(&stage);
        self.apply_retention(vm, Timestamp::now())?;
        Ok(Some(view))
    }

    fn apply_retention(&mut self, vm: &str, now: Timestamp) -> ApiResult<()> {
        let udir = undo_dir(self, vm);
        let r = self.rec_mut(vm)?;
        let ndisks = r.meta.disks.len();
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
        self.save(vm)?;
        for seg in dropped {
            for d in 0..ndisks {
                undo::remove(&udir, &seg, d).map_err(ApiError::io)?;
            }
        }
        Ok(())
    }

    fn select(&self, vm: &str, sel: &RecoveryPointSelector) -> ApiResult<usize> {
        let r = self.rec(vm)?;
        let i = r
            .meta
            .inbound
            .as_ref()
            .filter(|_| r.meta.role == Role::Replica)
            .ok_or_else(|| ApiError::conflict(format!("VM {vm} is not a replica here")))?;
        let pos = match sel {
            RecoveryPointSelector::Latest | RecoveryPointSelector::LatestProcessed => {
                i.rps.len().checked_sub(1)
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
    fn roll_back(&self, vm: &str, pos: usize, target: &[File]) -> ApiResult<Vec<Bitmap>> {
        let r = self.rec(vm)?;
        let udir = undo_dir(self, vm);
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
                    }
                }
            }
        }
        for f in target {
            f.sync_all().map_err(ApiError::io)?;
        }
        Ok(changed)
    }

    pub fn recovery_points(&self, vm: &str) -> ApiResult<Vec<RecoveryPoint>> {
        let r = self.rec(vm)?;
        Ok(r.meta
            .inbound
            .as_ref()
            .map(|i| i.rps.iter().map(RpMeta::view).collect())
            .unwrap_or_default())
    }

    /// Replica: bring the VM up from a recovery point.
    pub fn failover(&mut self, vm: &str, sel: &RecoveryPointSelector) -> ApiResult<RecoveryPoint> {
        let pos = self.select(vm, sel)?;
        let rp = self
            .rec(vm)?
            .meta
            .inbound
            .as_ref()
            .map(|i| i.rps[pos].view());
        let rp = rp.ok_or_else(|| ApiError::conflict("no recovery points"))?;
        let files: Vec<File> = self
            .rec(vm)?
            .disks
            .iter()
            .map(|f| f.try_clone())
            .collect::<Result<_, _>>()
            .map_err(ApiError::io)?;
        let changed = self.roll_back(vm, pos, &files)?;
        let r = self.rec_mut(vm)?;
        // The rolled-back blocks differ from what the old source holds: a later resync sends them.
        for (d, set) in changed.iter().enumerate() {
            r.tracker.record_set(d, set).map_err(ApiError::io)?;
        }
        r.meta.role = Role::Primary;
        r.meta.power = Power::Running;
        // The image held the last committed cycle; the tracker now holds every change since
        // (the rolled-back blocks and, from now on, guest writes).
        r.meta.journal_base = r
            .meta
            .inbound
            .as_ref()
            .and_then(|i| i.last_cycle.as_ref())
            .map(|(id, _)| id.clone());
        if let Some(i) = r.meta.inbound.as_mut() {
            i.accepting = false;
            i.failed_over = true;
            // Newer points no longer describe this image.
            i.rps.truncate(pos + 1);
        }
        self.save(vm)?;
        Ok(rp)
    }

    /// Replica: a running drill copy `<vm>-test`.
    pub fn test_failover(
        &mut self,
        vm: &str,
        sel: &RecoveryPointSelector,
        network: &str,
    ) -> ApiResult<(String, RecoveryPoint)> {
        let pos = self.select(vm, sel)?;
        let r = self.rec(vm)?;
        let rp = r
            .meta
            .inbound
            .as_ref()
            .map(|i| i.rps[pos].view())
            .ok_or_else(|| ApiError::conflict("no recovery points"))?;
        let name = format!("{vm}-test");
        if self.vms.contains_key(&name) {
            return Err(ApiError::conflict(format!("{name} already exists")));
        }
        let meta = VmMeta {
            name: name.clone(),
            power: Power::Off,
            role: Role::TestCopy,
            integration_services: r.meta.integration_services,
            disks: r.meta.disks.clone(),
            network: Some(network.to_string()),
            outbound: None,
            inbound: None,
            journal_base: None,
        };
        let tmp = self.root.join("vms").join(format!(".tmp-{name}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(tmp.join("disks")).map_err(ApiError::io)?;
        let mut files = Vec::new();
        for d in &meta.disks {
            let dst = tmp.join("disks").join(format!("{}.img", d.name));
            fs::copy(
                self.vm_dir(vm)
                    .join("disks")
                    .join(format!("{}.img", d.name)),
                &dst,
            )
            .map_err(ApiError::io)?;
            files.push(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&dst)
                    .map_err(ApiError::io)?,
            );
        }
        self.roll_back(vm, pos, &files)?;
        let mut meta = meta;
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
        self.vms.insert(name.clone(), rec);
        if let Some(i) = self.rec_mut(vm)?.meta.inbound.as_mut() {
            i.test_copy = Some((name.clone(), network.to_string(), rp.clone()));
        }
        self.save(vm)?;
        Ok((name, rp))
    }

    /// Deletes the drill copy of `vm`.
    pub fn test_cleanup(&mut self, vm: &str) -> ApiResult<(String, bool)> {
        self.rec(vm)?;
        let name = format!("{vm}-test");
        let exists = self
            .vms
            .get(&name)
            .is_some_and(|r| r.meta.role == Role::TestCopy);
        if exists {
            self.rec_mut(&name)?.meta.power = Power::Off;
            self.delete(&name)?;
        }
        if let Some(i) = self.rec_mut(vm)?.meta.inbound.as_mut() {
            i.test_copy = None;
        }
        self.save(vm)?;
        Ok((name, exists))
    }

    /// Deletes every recovery point of `vm`.
    pub fn commit_points(&mut self, vm: &str) -> ApiResult<u64> {
        let udir = undo_dir(self, vm);
        let r = self.rec_mut(vm)?;
        let n = r.meta.disks.len();
        let Some(i) = r.meta.inbound.as_mut() else {
            return Ok(0);
        };
        let gone: Vec<RpMeta> = i.rps.drain(..).collect();
        self.save(vm)?;
        for p in &gone {
            for seg in &p.undo {
                for d in 0..n {
                    undo::remove(&udir, seg, d).map_err(ApiError::io)?;
                }
            }
        }
        Ok(gone.len() as u64)
    }

    /// Replica: stop accepting cycles.
    pub fn stop_inbound(&mut self, vm: &str) -> ApiResult<()> {
        let r = self.rec_mut(vm)?;
        if let Some(o) = r.meta.outbound.as_mut() {
            o.stopped = true;
        }
        if let Some(i) = r.meta.inbound.as_mut() {
            i.accepting = false;
        }
        self.save(vm)
    }
}
