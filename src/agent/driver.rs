//! The source side of replication: one task per protected VM runs the bulk transfer (initial or
//! resync) and then a cycle every interval or on sync-now.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use jiff::Timestamp;
use reqwest::Method;
use tokio::sync::{mpsc, oneshot};

use super::error::RESYNC_REQUIRED;
use super::replica::{BatchResult, BeginAnswer, BeginCycle, CommitCycle, DirtySet, MAX_IN_DOUBT};
use super::runtime::{Export, READ_WINDOW_BLOCKS, block_runs, read_blocks, windows};
use super::store::VmRec;
use super::{ApiError, Shared, read_vm, with_vm};
use crate::fault;
use crate::replication::tracker::Sealed;
use crate::replication::{BLOCK_SIZE, Bitmap, block_count, block_len, frame};
use crate::site::{ErrorBody, RecoveryPoint, RecoveryPointKind, ReplicationMode, ReplicationState};

/// Blocks per request of the block stream.
const BATCH_BLOCKS: u64 = 64;
/// Batches of one transfer in flight at once: the source reads and frames the next batch
/// while the peer verifies and writes the one before.
const PIPELINE: usize = 2;
/// Attempts at a batch whose blocks the peer keeps refusing.
const MAX_RESENDS: usize = 5;

/// Test-only fault injection: with `TWINSITE_FAULT_CORRUPT_BLOCKS=N` the first N blocks sent are
/// damaged after their checksum was computed, as a bad link would (feature `failpoints` only).
static CORRUPT_LEFT: AtomicU64 = AtomicU64::new(0);
static CORRUPT_INIT: AtomicBool = AtomicBool::new(false);

fn take_corruption() -> bool {
    if !CORRUPT_INIT.swap(true, Ordering::SeqCst) {
        let n = fault::switch("TWINSITE_FAULT_CORRUPT_BLOCKS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        CORRUPT_LEFT.store(n, Ordering::SeqCst);
    }
    CORRUPT_LEFT
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// How far the bulk transfer of a VM has come, shared with the routes that list VMs.
#[derive(Default)]
pub struct Transfer {
    done: AtomicU64,
    total: AtomicU64,
}

/// The bulk transfer of `vm` under way at this site, if one runs.
pub fn progress(st: &Shared, vm: &str) -> Option<crate::site::TransferProgress> {
    let t = st.transfers.lock().ok()?.get(vm)?.clone();
    let total = t.total.load(Ordering::SeqCst);
    Some(crate::site::TransferProgress {
        done_bytes: t.done.load(Ordering::SeqCst).min(total),
        total_bytes: total,
    })
}

/// Registers a bulk transfer of a VM for as long as it lives: dropped when the transfer ends,
/// fails or its task is aborted.
struct TransferGuard {
    st: Shared,
    vm: String,
    t: Arc<Transfer>,
}

impl TransferGuard {
    fn start(st: &Shared, vm: &str, total: u64) -> Self {
        let t = Arc::new(Transfer {
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
        });
        if let Ok(mut m) = st.transfers.lock() {
            m.insert(vm.to_string(), t.clone());
        }
        Self {
            st: st.clone(),
            vm: vm.to_string(),
            t,
        }
    }
}

impl Drop for TransferGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.st.transfers.lock()
            && m.get(&self.vm).is_some_and(|t| Arc::ptr_eq(t, &self.t))
        {
            m.remove(&self.vm);
        }
    }
}

/// Bytes of disk `d` (of `size` bytes) that a bulk transfer by `plan` reads and compares or
/// sends between blocks `from` and `to`: the blocks of the range, or those the plan names.
fn plan_bytes(plan: &Plan, d: usize, size: u64, from: u64, to: u64) -> u64 {
    let to = to.min(block_count(size));
    match plan {
        Plan::Blocks(sets) => sets.get(d).map_or(0, |s| {
            s.iter_from(from)
                .take_while(|b| *b < to)
                .map(|b| block_len(size, b) as u64)
                .sum()
        }),
        _ if from >= to => 0,
        _ => (to * BLOCK_SIZE).min(size) - from * BLOCK_SIZE,
    }
}

/// Test-only fault injection (`TWINSITE_FAULT_HOLD_BULK=N`, feature `failpoints` only): once a
/// bulk transfer has framed N batches, it waits (with its batches in flight acknowledged) while
/// the file `hold-bulk` exists in the data dir.
fn hold_after(framed: u64) -> bool {
    fault::switch("TWINSITE_FAULT_HOLD_BULK")
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| framed >= n)
}

/// A sync-now request: answered with the acknowledged point.
pub type SyncReply = oneshot::Sender<Result<RecoveryPoint, String>>;

/// What a driver is asked between cycles.
pub enum Msg {
    /// Run a cycle now and answer with its point.
    Sync(SyncReply),
    /// The VM's settings changed: the next cycle comes one new interval from now.
    Settings,
}

/// Starts (or restarts) the driver of `vm`.
pub fn spawn(st: &Shared, vm: &str) {
    let (tx, rx) = mpsc::channel(8);
    let task = tokio::spawn(run(st.clone(), vm.to_string(), rx));
    if let Ok(mut d) = st.drivers.lock()
        && let Some((_, old)) = d.insert(vm.to_string(), (tx, task))
    {
        old.abort();
    }
}

/// Stops the driver of `vm`.
pub fn stop(st: &Shared, vm: &str) {
    if let Ok(mut d) = st.drivers.lock()
        && let Some((_, task)) = d.remove(vm)
    {
        task.abort();
    }
}

/// The interval the VM's outbound settings ask for (300 s when they cannot be read).
async fn interval_of(st: &Shared, vm: &str) -> Duration {
    let secs = read_vm(st, vm, |r| {
        Ok(r.meta.outbound.as_ref().map(|o| o.interval_seconds))
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(300)
    .max(1);
    Duration::from_secs(secs)
}

async fn run(st: Shared, vm: String, mut rx: mpsc::Receiver<Msg>) {
    let mut period = interval_of(&st, &vm).await;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // The first run (bulk transfer and first point) starts at once; then every interval.
    let mut first = true;
    loop {
        let reply = if std::mem::take(&mut first) {
            None
        } else {
            tokio::select! {
                _ = tick.tick() => None,
                m = rx.recv() => match m {
                    Some(Msg::Sync(r)) => Some(r),
                    Some(Msg::Settings) => {
                        // New settings: the next cycle one new interval from now.
                        period = interval_of(&st, &vm).await;
                        tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                        continue;
                    }
                    None => return,
                },
            }
        };
        let res = {
            // A cycle of this VM never overlaps another one (a cut's, a sync-now's).
            let lock = cycle_lock(&st, &vm);
            let _guard = lock.lock().await;
            run_once(&st, &vm, None).await
        };
        if let Err(e) = &res {
            tracing::warn!(vm, error = %e, "replication cycle failed");
            let msg = e.clone();
            let vm2 = vm.clone();
            let _ = with_vm(&st, &vm2, move |r| {
                if let Some(o) = r.meta.outbound.as_mut() {
                    o.last_error = Some(msg);
                }
                r.save()
            })
            .await;
        }
        if let Some(r) = reply {
            let _ = r.send(res);
        }
        // Settings changed while the cycle ran (the notice may have been missed): the interval
        // in force from here on.
        let now = interval_of(&st, &vm).await;
        if now != period {
            period = now;
            tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        }
    }
}

/// Tells the driver of `vm` that its settings changed (no cycle is started for it).
pub fn settings_changed(st: &Shared, vm: &str) {
    let tx = st
        .drivers
        .lock()
        .ok()
        .and_then(|d| d.get(vm).map(|(tx, _)| tx.clone()));
    if let Some(tx) = tx {
        // A full queue holds sync requests: the loop reads the interval after their cycles.
        let _ = tx.try_send(Msg::Settings);
    }
}

struct Peer {
    http: reqwest::Client,
    base: String,
    token: crate::secret::Secret,
}

/// Why a cycle or transfer ended early.
#[derive(Debug, thiserror::Error)]
enum CycleError {
    /// The replica does not hold the parent the cycle names: resynchronize.
    #[error("{0}")]
    Resync(String),
    #[error("{0}")]
    Other(String),
}

impl From<String> for CycleError {
    fn from(m: String) -> Self {
        Self::Other(m)
    }
}

impl From<CycleError> for String {
    fn from(e: CycleError) -> Self {
        e.to_string()
    }
}

impl From<&str> for CycleError {
    fn from(m: &str) -> Self {
        Self::Other(m.to_string())
    }
}

/// The largest answer read from a peer but for block hashes (a dirty set of the largest disk
/// fits many times over); a larger one fails the call unread.
const PEER_ANSWER_LIMIT: usize = 64 << 20;

impl Peer {
    async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
        body: Option<bytes::Bytes>,
    ) -> Result<bytes::Bytes, CycleError> {
        self.call_limited(method, path, json, body, PEER_ANSWER_LIMIT)
            .await
    }

    /// As [`Peer::call`], reading at most `limit` bytes of a successful answer; an error
    /// answer is read only by its start and shown cut and redacted.
    async fn call_limited(
        &self,
        method: Method,
        path: &str,
        json: Option<serde_json::Value>,
        body: Option<bytes::Bytes>,
        limit: usize,
    ) -> Result<bytes::Bytes, CycleError> {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(self.token.expose())
            .timeout(Duration::from_secs(600));
        if let Some(j) = json {
            req = req.json(&j);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| format!("peer unreachable: {e}"))?;
        let status = resp.status();
        if !status.is_success() {
            // It lands in the VM's lastError and the controller's status: only its start.
            let head = crate::body::read_head(&mut resp, crate::body::ERROR_READ).await;
            drop(resp);
            let body = serde_json::from_slice::<ErrorBody>(&head).ok();
            let msg = format!(
                "peer answered {status}: {}",
                crate::body::shown(&head, &[self.token.expose()])
            );
            if body.and_then(|b| b.reason).as_deref() == Some(RESYNC_REQUIRED) {
                return Err(CycleError::Resync(msg));
            }
            return Err(CycleError::Other(msg));
        }
        let bytes = crate::body::read_limited(&mut resp, limit)
            .await
            .map_err(|e| format!("peer: {e}"))?;
        Ok(bytes.into())
    }
}

impl Peer {
    /// The replica's hash of every block of disk `d` (`size` bytes) at its newest point.
    async fn block_hashes(
        &self,
        vm: &str,
        d: usize,
        size: u64,
    ) -> Result<bytes::Bytes, CycleError> {
        // One 32-byte hash per block of the disk, no more.
        let limit = usize::try_from(block_count(size).saturating_mul(32)).unwrap_or(usize::MAX);
        self.call_limited(
            Method::GET,
            &format!("/v1/replica/{vm}/disks/{d}/hashes"),
            None,
            None,
            limit,
        )
        .await
    }
}

/// Compares the replica's newest point (the cycle at `time` just committed) with `ours`, the
/// source's block hashes at that cut, and records the outcome; a difference starts a resync by
/// block hashes. A replica that cannot answer now (a drill holds its image) leaves the
/// verification due.
async fn verify_replica(
    st: &Shared,
    peer: &Peer,
    vm: &str,
    disks: &[crate::site::DiskSpec],
    time: Timestamp,
    ours: Vec<Vec<u8>>,
) {
    let mut per_disk = Vec::new();
    for (d, (disk, ours)) in disks.iter().zip(&ours).enumerate() {
        match peer.block_hashes(vm, d, disk.size_bytes).await {
            Ok(theirs) => {
                per_disk.push((disk.name.clone(), super::verify::differing(ours, &theirs)))
            }
            Err(e) => {
                tracing::info!(vm, error = %e, "replica not verified now: it did not list its hashes");
                return;
            }
        }
    }
    let v = super::verify::outcome(time, &per_disk);
    st.metrics.verified(vm, v.differing_blocks);
    if v.differing_blocks > 0 {
        tracing::error!(vm, blocks = v.differing_blocks, disk = ?v.disk, "replica diverged from the source: resynchronizing by block hashes");
    } else {
        tracing::info!(vm, "replica verified: every block matches the source");
    }
    let vm_s = vm.to_string();
    let res = with_vm(st, &vm_s, move |r| {
        let diverged = v.differing_blocks > 0;
        let Some(o) = r.meta.outbound.as_mut().filter(|o| !o.stopped) else {
            return Ok(());
        };
        if diverged {
            o.last_error = Some(super::verify::divergence_message(&v));
            o.divergences += 1;
            o.last_divergence = Some(v.clone());
            o.bulk = Some(ReplicationMode::Resync);
            o.state = ReplicationState::Resynchronizing;
        }
        o.last_verification = Some(v);
        if diverged {
            // No journal base: the resync compares every block's hash.
            r.meta.journal_base = None;
        }
        r.save()
    })
    .await;
    if let Err(e) = res {
        tracing::warn!(vm, error = %e.message, "verification not recorded");
    }
}

/// The HTTP client for a peer agent; an https peer is trusted through `ca_pem` only.
fn peer_http(ca_pem: Option<&str>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("peer CA: {e}"))?;
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|e| e.to_string())
}

/// A cycle id that cannot repeat: the clock for reading order, 64 random bits for uniqueness
/// (a clock stepped back or two agents in one instant cannot make two cycles share an id).
fn new_cycle_id() -> String {
    let n = Timestamp::now().as_nanosecond();
    let mut r = [0u8; 8];
    if getrandom::fill(&mut r).is_err() {
        // No entropy source: a process-wide counter keeps ids of this process apart.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        r = NEXT.fetch_add(1, Ordering::SeqCst).to_le_bytes();
    }
    format!("c{n:x}-{}", hex::encode(r))
}

/// The lock that serializes the cycles of `vm` (its driver's, sync-now's and cuts').
pub fn cycle_lock(st: &Shared, vm: &str) -> Arc<tokio::sync::Mutex<()>> {
    let mut locks = st
        .cycle_locks
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    locks.entry(vm.to_string()).or_default().clone()
}

/// The blocks of one cycle, captured at one instant: the sealed dirty set and a spool file
/// holding the content of every one of its blocks at that instant (slot `i` at `i * BLOCK_SIZE`
/// in the order of `sealed.sets`).
pub struct Capture {
    pub vm: String,
    pub cycle: String,
    /// The tracker's sealed set (empty for a hypervisor domain, whose changes come from
    /// `sets`).
    pub sealed: Sealed,
    /// The blocks of the cycle, per disk.
    pub sets: Vec<Bitmap>,
    /// The checkpoint a hypervisor domain's export started: the next cycle's base once the
    /// peer acknowledged this one.
    pub checkpoint: Option<String>,
    pub spool: PathBuf,
    pub blocks: u64,
    pub time: Timestamp,
    pub kind: RecoveryPointKind,
    pub cut_id: Option<String>,
    /// Every block's hash of every disk at the cut, when this cycle verifies the replica.
    pub verify: Option<Vec<Vec<u8>>>,
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.spool);
    }
}

/// Whether `vm` replicates outbound from this site with its bulk transfer done: only such a
/// VM can join a cut.
pub fn cuttable(r: &VmRec) -> bool {
    r.meta.role == crate::site::Role::Primary
        && r.meta
            .outbound
            .as_ref()
            .is_some_and(|o| !o.stopped && o.bulk.is_none())
}

/// Seals the tracker of `r` and copies its dirty blocks into a spool file (and, with `verify`,
/// hashes every block of its disks). Runs with the VM locked, so no guest write of it
/// interleaves: calling it for several VMs while holding all their locks is a consistent cut of
/// all of them.
pub fn capture(
    r: &mut VmRec,
    time: Timestamp,
    cut_id: Option<String>,
    verify: bool,
) -> Result<Capture, ApiError> {
    let dir = r.dir.join("spool");
    std::fs::create_dir_all(&dir).map_err(ApiError::io)?;
    let cycle = new_cycle_id();
    let spool = dir.join(format!("{cycle}.blocks"));
    let vm = r.name().to_string();
    let sealed = r.tracker.seal().map_err(ApiError::io)?;
    fault::hit("source.seal");
    if r.tracker.damaged() {
        // A journal went bad on disk: this dirty set cannot be trusted; resync instead.
        r.tracker.abort(sealed);
        if let Some(o) = r.meta.outbound.as_mut() {
            o.bulk = Some(ReplicationMode::Resync);
            o.state = ReplicationState::Resynchronizing;
        }
        r.meta.journal_base = None;
        r.save()?;
        return Err(ApiError::conflict(format!(
            "change journal of {vm} is damaged: resynchronizing"
        )));
    }
    let copied = (|| -> std::io::Result<(u64, Option<Vec<Vec<u8>>>)> {
        let out = std::fs::File::create(&spool)?;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        let mut slot = 0u64;
        let images = r
            .disks
            .open_all()
            .map_err(|e| std::io::Error::other(e.message))?;
        for (d, set) in sealed.sets.iter().enumerate() {
            let size = r.meta.disks[d].size_bytes;
            let image = images
                .get(d)
                .ok_or_else(|| std::io::Error::other("a sealed set of no disk"))?;
            for b in set.iter() {
                let len = block_len(size, b);
                image.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)?;
                out.write_all_at(&buf[..len], slot * BLOCK_SIZE)?;
                slot += 1;
            }
        }
        let sizes: Vec<u64> = r.meta.disks.iter().map(|d| d.size_bytes).collect();
        let hashes = verify
            .then(|| {
                super::verify::hash_disks(&sizes, |d, off, buf| {
                    images
                        .get(d)
                        .ok_or_else(|| std::io::Error::other("no such disk"))?
                        .read_exact_at(buf, off)
                })
            })
            .transpose()?;
        Ok((slot, hashes))
    })();
    let (blocks, verify) = match copied {
        Ok(n) => {
            fault::hit("source.spool");
            n
        }
        Err(e) => {
            r.tracker.abort(sealed);
            let _ = std::fs::remove_file(&spool);
            return Err(ApiError::io(e));
        }
    };
    let due = r
        .meta
        .outbound
        .as_ref()
        .is_some_and(|o| app_consistent_due(o, time));
    let kind = if due && r.meta.integration_services {
        RecoveryPointKind::AppConsistent
    } else {
        RecoveryPointKind::CrashConsistent
    };
    Ok(Capture {
        vm: vm.to_string(),
        cycle,
        sets: sealed.sets.clone(),
        checkpoint: None,
        sealed,
        spool,
        blocks,
        time,
        kind,
        cut_id,
        verify,
    })
}

/// Where the next batch of a capture starts: disk, block, spool slot.
#[derive(Default, Clone, Copy)]
struct Cursor {
    disk: usize,
    block: u64,
    slot: u64,
}

/// Frames the next `n` blocks of a capture's spool into one batch, advancing `cur`.
fn spool_batch(c: &Capture, sizes: &[u64], cur: &mut Cursor, n: u64) -> std::io::Result<Vec<u8>> {
    let f = std::fs::File::open(&c.spool)?;
    let mut out = Vec::new();
    let mut count = 0;
    while count < n && cur.disk < c.sets.len() {
        let set = &c.sets[cur.disk];
        match set.iter_from(cur.block).next() {
            Some(b) => {
                let slot = cur.slot;
                frame::push_from(
                    &mut out,
                    cur.disk as u32,
                    b,
                    block_len(sizes[cur.disk], b),
                    |d| f.read_exact_at(d, slot * BLOCK_SIZE),
                )?;
                count += 1;
                cur.slot += 1;
                cur.block = b + 1;
            }
            None => {
                cur.disk += 1;
                cur.block = 0;
            }
        }
    }
    Ok(out)
}

/// One step of replication: the pending bulk transfer if any, then a cycle (of the blocks
/// captured by a cut when `pre` is given). The caller holds the VM's cycle lock.
pub async fn run_once(
    st: &Shared,
    vm: &str,
    pre: Option<Capture>,
) -> Result<RecoveryPoint, String> {
    let started = std::time::Instant::now();
    let res = run_cycle(st, vm, pre).await;
    st.metrics
        .cycle(vm, started.elapsed().as_secs_f64(), res.is_ok());
    res
}

async fn run_cycle(st: &Shared, vm: &str, pre: Option<Capture>) -> Result<RecoveryPoint, String> {
    let cut = pre.is_some();
    match cycle(st, vm, pre).await {
        Ok(rp) => Ok(rp),
        Err(CycleError::Resync(msg)) => {
            // The replica is not at the cycle's parent (its data was lost, it was replaced,
            // it runs elsewhere now): its blocks only apply after a resync, which compares
            // block hashes and sends what differs. A cut's capture cannot wait for that.
            tracing::warn!(vm, error = %msg, "replica refused the cycle's parent: resynchronizing");
            let vm_s = vm.to_string();
            let m = msg.clone();
            with_vm(st, &vm_s, move |r| {
                if let Some(o) = r.meta.outbound.as_mut() {
                    o.bulk = Some(ReplicationMode::Resync);
                    o.state = ReplicationState::Resynchronizing;
                    o.last_error = Some(m);
                }
                r.save()
            })
            .await
            .map_err(|e| e.message)?;
            if cut {
                return Err(msg);
            }
            cycle(st, vm, None).await.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn cycle(st: &Shared, vm: &str, pre: Option<Capture>) -> Result<RecoveryPoint, CycleError> {
    // Until a sealed set is acknowledged or put back, the guard puts it back if this cycle
    // ends early (an error, or the driver task aborted mid-cycle).
    let mut unsent = Unsent {
        st: st.clone(),
        vm: vm.to_string(),
        sealed: pre.as_ref().map(|c| c.sealed.clone()),
    };
    let vm_s = vm.to_string();
    let (o, disks, is, domain) = read_vm(st, &vm_s, move |r| {
        let o = r
            .meta
            .outbound
            .clone()
            .filter(|o| !o.stopped)
            .ok_or_else(|| ApiError::conflict("replication is not enabled"))?;
        Ok((
            o,
            r.meta.disks.clone(),
            r.meta.integration_services,
            r.meta.domain.is_some(),
        ))
    })
    .await
    .map_err(|e| e.message)?;
    let peer = Peer {
        http: peer_http(o.peer_ca_pem.as_deref())?,
        base: o.peer_url.trim_end_matches('/').to_string(),
        token: o.peer_token.clone(),
    };
    // A domain's definition travels with every cycle, so the replica holds the current one.
    let definition = if domain {
        let (st2, vm2) = (st.clone(), vm.to_string());
        tokio::task::spawn_blocking(move || st2.runtime.definition(&vm2))
            .await
            .map_err(|e| e.to_string())?
            .map(Some)
            .map_err(|e| e.message)?
    } else {
        None
    };
    let site = st.site.clone();
    let begin = |bulk: bool, cycle: &str| BeginCycle {
        definition: definition.clone(),
        source_site: site.clone(),
        cycle_id: cycle.to_string(),
        disks: disks.clone(),
        integration_services: is,
        retention_hours: o.retention_hours,
        bulk,
        zero: false,
        parent: None,
        in_doubt: None,
        in_doubt_earlier: Vec::new(),
    };
    if let Some(mode) = o.bulk.filter(|_| pre.is_none()) {
        let cycle = new_cycle_id();
        // Resync: the old source's changes since its journal base, asked for before `begin`
        // makes it a replica (which forgets them).
        let peer_dirty = if mode == ReplicationMode::Resync {
            peer_dirty_set(&peer, vm, &disks).await
        } else {
            None
        };
        let mut b = begin(true, &cycle);
        b.zero = mode == ReplicationMode::Initial;
        let body = serde_json::to_value(b).map_err(|e| e.to_string())?;
        let answer = peer
            .call(
                Method::POST,
                &format!("/v1/replica/{vm}/begin"),
                Some(body),
                None,
            )
            .await?;
        let zeroed = serde_json::from_slice::<BeginAnswer>(&answer).is_ok_and(|a| a.zeroed);
        let vm_s = vm.to_string();
        let (sealed, my_base, dir) = with_vm(st, &vm_s, move |r| {
            let sealed = r.tracker.seal().map_err(ApiError::io)?;
            Ok((sealed, r.meta.journal_base.clone(), r.dir.clone()))
        })
        .await
        .map_err(|e| e.message)?;
        unsent.sealed = Some(sealed.clone());
        // A domain is read from a point-in-time export that starts its first checkpoint.
        let export = if domain {
            Some(
                open_export(st, vm, &disks, None, &cycle, &dir)
                    .await
                    .map_err(|e| e.message)?,
            )
        } else {
            None
        };
        let checkpoint = export.as_ref().and_then(|e| e.checkpoint.clone());
        let plan = match (mode, peer_dirty) {
            (ReplicationMode::Initial, _) => Plan::All { skip_zero: zeroed },
            // A domain's guest writes through QEMU, past the change journals: they hold the
            // blocks a failover rolled back, never what the guest wrote since. Only hashes
            // tell what differs.
            (ReplicationMode::Resync, _) if domain => {
                tracing::info!(
                    vm,
                    "resync by block hashes: a domain's journals miss its writes"
                );
                Plan::Hash
            }
            (ReplicationMode::Resync, Some((base, mut sets)))
                if my_base.as_deref() == Some(base.as_str()) =>
            {
                // Both sides tracked every change since the same cycle: only the union of
                // their changes can differ.
                for (a, b) in sets.iter_mut().zip(&sealed.sets) {
                    a.union(b);
                }
                let n: u64 = sets.iter().map(Bitmap::count).sum();
                tracing::info!(vm, base, blocks = n, "resync from change journals");
                Plan::Blocks(Arc::new(sets))
            }
            (ReplicationMode::Resync, theirs) => {
                tracing::info!(
                    vm,
                    ours = ?my_base,
                    theirs = ?theirs.map(|t| t.0),
                    "resync by block hashes: no common journal base"
                );
                Plan::Hash
            }
        };
        let reader = match &export {
            Some(e) => Reader::Export(e.export.clone()),
            None => Reader::Files,
        };
        let res = bulk(st, &peer, vm, &cycle, plan, &disks, reader).await;
        drop(export);
        let res = match res {
            Ok(sent) => {
                let c = CommitCycle {
                    cycle_id: cycle.clone(),
                    bulk: true,
                    time: Timestamp::now(),
                    kind: RecoveryPointKind::CrashConsistent,
                    cut_id: None,
                };
                let body = serde_json::to_value(c).map_err(|e| e.to_string())?;
                peer.call(
                    Method::POST,
                    &format!("/v1/replica/{vm}/commit"),
                    Some(body),
                    None,
                )
                .await
                .map(|_| sent)
            }
            Err(e) => Err(CycleError::Other(e)),
        };
        unsent.sealed = None;
        let acked = res.as_ref().ok().map(|n| (*n, cycle.clone()));
        finish(st, vm, sealed, acked, true, None, checkpoint).await?;
        res?;
    }
    // A verification of the replica, when due and no other runs: hashed at the cut, compared
    // once the replica committed the cycle.
    let vm_s = vm.to_string();
    let every = st.verify_every;
    let due = pre.is_none()
        && read_vm(st, &vm_s, move |r| {
            Ok(r.meta
                .outbound
                .as_ref()
                .is_some_and(|o| super::verify::due(o, Timestamp::now(), every)))
        })
        .await
        .map_err(|e| e.message)?;
    let slot = due
        .then(|| super::verify::Slot::try_take(&st.verifying))
        .flatten();
    let verify = slot.is_some();
    // A cycle: the blocks dirty now, copied while writes are held off (a crash-consistent
    // cut), unless a cut captured them already.
    let mut cap = match pre {
        Some(c) => c,
        None if domain => {
            let c = capture_domain(st, vm, verify)
                .await
                .map_err(|e| e.message)?;
            unsent.sealed = Some(c.sealed.clone());
            c
        }
        None => {
            let vm_s = vm.to_string();
            let c = with_vm(st, &vm_s, move |r| {
                capture(r, Timestamp::now(), None, verify)
            })
            .await
            .map_err(|e| e.message)?;
            unsent.sealed = Some(c.sealed.clone());
            c
        }
    };
    let sizes: Vec<u64> = disks.iter().map(|d| d.size_bytes).collect();
    let res: Result<(u64, RecoveryPoint), CycleError> = async {
        // The parent as it is now (a bulk transfer just above moves it).
        let vm_s = vm.to_string();
        let (parent, in_doubt, in_doubt_earlier) = read_vm(st, &vm_s, move |r| {
            let o = r.meta.outbound.as_ref();
            Ok((
                r.meta.journal_base.clone(),
                o.and_then(|o| o.in_doubt.clone()),
                o.map(|o| o.in_doubt_earlier.clone()).unwrap_or_default(),
            ))
        })
        .await
        .map_err(|e| e.message)?;
        let b = BeginCycle {
            parent,
            in_doubt,
            in_doubt_earlier,
            ..begin(false, &cap.cycle)
        };
        let body = serde_json::to_value(b).map_err(|e| e.to_string())?;
        peer.call(
            Method::POST,
            &format!("/v1/replica/{vm}/begin"),
            Some(body),
            None,
        )
        .await?;
        let mut sent = 0;
        let mut cur = Cursor::default();
        let mut inflight = FuturesUnordered::new();
        while cur.slot < cap.blocks {
            let permit = acquire_polling(st, &mut inflight, &mut sent).await?;
            let blocks =
                tokio::task::block_in_place(|| spool_batch(&cap, &sizes, &mut cur, BATCH_BLOCKS))
                    .map_err(|e| e.to_string())?;
            if blocks.is_empty() {
                return Err("spool shorter than its capture".into());
            }
            let (peer, cycle) = (&peer, &cap.cycle);
            inflight.push(async move {
                let _permit = permit;
                send_batch(st, peer, vm, cycle, false, blocks).await
            });
            while inflight.len() >= PIPELINE {
                sent += inflight.next().await.unwrap_or(Ok(0))?;
            }
        }
        while let Some(r) = inflight.next().await {
            sent += r?;
        }
        let c = CommitCycle {
            cycle_id: cap.cycle.clone(),
            bulk: false,
            time: cap.time,
            kind: cap.kind,
            cut_id: cap.cut_id.clone(),
        };
        let body = serde_json::to_value(c).map_err(|e| e.to_string())?;
        // From here the replica may hold this cycle whatever we hear back: say so durably, so
        // the next cycle may name it as the parent.
        let (vm_s, id) = (vm.to_string(), cap.cycle.clone());
        with_vm(st, &vm_s, move |r| {
            if let Some(o) = r.meta.outbound.as_mut() {
                // The cycle in doubt before stays one the replica may hold.
                if let Some(prev) = o.in_doubt.replace(id) {
                    o.in_doubt_earlier.push(prev);
                    let extra = o.in_doubt_earlier.len().saturating_sub(MAX_IN_DOUBT);
                    o.in_doubt_earlier.drain(..extra);
                }
            }
            r.save()
        })
        .await
        .map_err(|e| e.message)?;
        fault::hit("source.inflight");
        let bytes = peer
            .call(
                Method::POST,
                &format!("/v1/replica/{vm}/commit"),
                Some(body),
                None,
            )
            .await?;
        fault::hit("source.ack");
        let rp: Option<RecoveryPoint> =
            serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        let rp = rp.ok_or("peer made no recovery point")?;
        Ok((sent, rp))
    }
    .await;
    let time = cap.time;
    let app = (cap.kind == RecoveryPointKind::AppConsistent).then_some(time);
    let sealed = cap.sealed.clone();
    let cycle = cap.cycle.clone();
    let checkpoint = cap.checkpoint.clone();
    let ours = cap.verify.take();
    drop(cap);
    unsent.sealed = None;
    match res {
        Ok((sent, rp)) => {
            finish(
                st,
                vm,
                sealed,
                Some((sent, cycle)),
                false,
                Some((time, app)),
                checkpoint,
            )
            .await?;
            if let Some(ours) = ours {
                verify_replica(st, &peer, vm, &disks, time, ours).await;
            }
            drop(slot);
            Ok(rp)
        }
        Err(e) => {
            finish(st, vm, sealed, None, false, None, checkpoint).await?;
            Err(e)
        }
    }
}

/// A sealed set not yet acknowledged nor put back: dropped while set, it is put back.
struct Unsent {
    st: Shared,
    vm: String,
    sealed: Option<Sealed>,
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(sealed) = self.sealed.take() {
            let st = self.st.clone();
            let vm = std::mem::take(&mut self.vm);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = with_vm(&st, &vm, move |r| {
                        r.tracker.abort(sealed);
                        Ok(())
                    })
                    .await;
                });
            }
        }
    }
}

/// Records the outcome of a transfer: acknowledged blocks are forgotten, failed ones stay dirty.
async fn finish(
    st: &Shared,
    vm: &str,
    sealed: Sealed,
    sent: Option<(u64, String)>,
    bulk: bool,
    synced: Option<(Timestamp, Option<Timestamp>)>,
    checkpoint: Option<String>,
) -> Result<(), String> {
    let acked = sent.is_some();
    let cp = checkpoint.clone();
    let vm = vm.to_string();
    let res = with_vm(st, &vm.clone(), move |r| {
        match sent {
            Some((n, cycle)) => {
                r.tracker.ack(&sealed).map_err(ApiError::io)?;
                if let (Some(d), Some(cp)) = (r.meta.domain.as_mut(), cp) {
                    d.checkpoint = Some(cp);
                }
                // The tracker now holds every change since the state this cycle left.
                r.meta.journal_base = Some(cycle);
                if let Some(o) = r.meta.outbound.as_mut() {
                    o.bytes_sent += n;
                    o.last_error = None;
                    o.in_doubt = None;
                    o.in_doubt_earlier.clear();
                    if bulk {
                        o.bulk = None;
                    }
                    if let Some((t, app)) = synced {
                        o.last_sync_time = Some(t);
                        o.state = ReplicationState::Replicating;
                        if app.is_some() {
                            o.last_app_consistent = app;
                        }
                    }
                }
            }
            None => r.tracker.abort(sealed),
        }
        r.save()
    })
    .await
    .map_err(|e| e.message);
    if let Some(cp) = checkpoint {
        // After the base is saved: a crash in between leaves an extra checkpoint, which the
        // next acknowledged transfer removes.
        settle_checkpoint(st, &vm, cp, acked && res.is_ok()).await;
    }
    res
}

/// Makes `cp` the domain's only checkpoint of ours (the peer acknowledged it), or drops it (the
/// transfer failed: its changes fold into the checkpoint before it, still the base).
async fn settle_checkpoint(st: &Shared, vm: &str, cp: String, acked: bool) {
    let st2 = st.clone();
    let vm2 = vm.to_string();
    let res = tokio::task::spawn_blocking(move || {
        if acked {
            st2.runtime.keep_checkpoint(&vm2, &cp)
        } else {
            st2.runtime.drop_checkpoint(&vm2, &cp)
        }
    })
    .await;
    if let Ok(Err(e)) = res {
        tracing::warn!(vm, error = %e.message, "settling the domain's checkpoints");
    }
}

/// Waits for a send slot while the batches already in flight go on (they hold slots
/// themselves: waiting without polling them could wait forever).
async fn acquire_polling<'a, F>(
    st: &'a Shared,
    inflight: &mut FuturesUnordered<F>,
    sent: &mut u64,
) -> Result<tokio::sync::SemaphorePermit<'a>, String>
where
    F: std::future::Future<Output = Result<u64, String>>,
{
    loop {
        tokio::select! {
            p = st.send_slots.acquire() => return p.map_err(|e| e.to_string()),
            Some(r) = inflight.next(), if !inflight.is_empty() => *sent += r?,
        }
    }
}

/// Sends one batch of frames, resending refused blocks; returns payload bytes sent.
async fn send_batch(
    st: &Shared,
    peer: &Peer,
    vm: &str,
    cycle: &str,
    bulk: bool,
    frames: Vec<u8>,
) -> Result<u64, String> {
    let mut todo = bytes::Bytes::from(frames);
    let mut sent = 0u64;
    for attempt in 0..MAX_RESENDS {
        let parsed = frame::parse(&todo).ok_or("malformed batch")?;
        sent += parsed.iter().map(|f| f.data.len() as u64).sum::<u64>();
        // Fault injection damages a copy; the batch itself stays intact for resends.
        let damage: Vec<usize> = parsed
            .iter()
            .filter(|_| take_corruption())
            .map(|f| f.data.as_ptr() as usize - todo.as_ptr() as usize)
            .collect();
        let body = if damage.is_empty() {
            todo.clone()
        } else {
            let mut bad = todo.to_vec();
            for at in damage {
                bad[at] ^= 0xff;
            }
            bytes::Bytes::from(bad)
        };
        let path = format!("/v1/replica/{vm}/cycles/{cycle}/blocks?bulk={bulk}");
        st.metrics.sent(vm, body.len() as u64);
        let bytes = peer.call(Method::PUT, &path, None, Some(body)).await?;
        let res: BatchResult = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if res.refused.is_empty() {
            return Ok(sent);
        }
        tracing::warn!(
            vm,
            attempt,
            refused = res.refused.len(),
            "peer refused blocks; resending"
        );
        let n = res.refused.len() as u64;
        let vm2 = vm.to_string();
        let _ = with_vm(st, &vm2, move |r| {
            if let Some(o) = r.meta.outbound.as_mut() {
                o.blocks_resent += n;
            }
            Ok(())
        })
        .await;
        let mut again = Vec::new();
        for f in parsed {
            if res.refused.contains(&(f.disk, f.block)) {
                frame::push_with_hash(&mut again, f.disk, f.block, &f.hash, f.data);
            }
        }
        todo = bytes::Bytes::from(again);
    }
    Err("peer kept refusing blocks".into())
}

/// Which blocks a bulk transfer sends.
enum Plan {
    /// Every block (initial replication); with `skip_zero`, blocks that read as zeros are left
    /// out (the replica emptied its image).
    All { skip_zero: bool },
    /// The blocks whose hash differs from the peer's (resync without a common journal base).
    Hash,
    /// The blocks both sides changed since their common journal base (resync).
    Blocks(Arc<Vec<Bitmap>>),
}

/// The old source's dirty set and journal base, if it has one and it fits our disks.
async fn peer_dirty_set(
    peer: &Peer,
    vm: &str,
    disks: &[crate::site::DiskSpec],
) -> Option<(String, Vec<Bitmap>)> {
    let bytes = match peer
        .call(Method::GET, &format!("/v1/replica/{vm}/dirty"), None, None)
        .await
    {
        Ok(b) => b,
        Err(e) => {
            tracing::info!(vm, error = %e, "peer has no dirty set for resync");
            return None;
        }
    };
    let d: DirtySet = serde_json::from_slice(&bytes).ok()?;
    let base = d.journal_base?;
    if d.disks.len() != disks.len() {
        return None;
    }
    let mut sets = Vec::new();
    for (h, disk) in d.disks.iter().zip(disks) {
        let raw = hex::decode(h).ok()?;
        sets.push(Bitmap::from_bytes(block_count(disk.size_bytes), &raw)?);
    }
    Some((base, sets))
}

/// The first block at or after `b` that may hold data: holes of a sparse file are skipped.
fn next_data_block(file: &std::fs::File, nblocks: u64, b: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    if b >= nblocks {
        return None;
    }
    let off = i64::try_from(b * BLOCK_SIZE).ok()?;
    // SAFETY: lseek on a file descriptor this function borrows; it changes only the file
    // offset, which no reader or writer of the disks uses (they all read and write at offsets).
    let pos = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if pos < 0 {
        let err = std::io::Error::last_os_error();
        // ENXIO: no data after `off`. Anything else (no SEEK_DATA here): assume data.
        return (err.raw_os_error() != Some(libc::ENXIO)).then_some(b);
    }
    let nb = pos as u64 / BLOCK_SIZE;
    (nb < nblocks).then_some(nb.max(b))
}

/// Where a bulk transfer reads: the VM's disk files (under its lock), or a hypervisor
/// domain's point-in-time export.
enum Reader {
    Files,
    Export(Arc<std::sync::Mutex<Box<dyn Export>>>),
}

/// One disk as a bulk transfer reads it.
trait BlockSource {
    /// The first block at or after `b` that may hold data.
    fn next_data(&mut self, b: u64) -> Option<u64>;
    /// Reads `blocks` of the disk (of `size` bytes) into `buf`, one after the other.
    fn read_blocks(&mut self, size: u64, blocks: &[u64], buf: &mut Vec<u8>) -> std::io::Result<()>;
}

struct FileSource<'a> {
    file: &'a std::fs::File,
    nblocks: u64,
}

impl BlockSource for FileSource<'_> {
    fn next_data(&mut self, b: u64) -> Option<u64> {
        next_data_block(self.file, self.nblocks, b)
    }
    fn read_blocks(&mut self, size: u64, blocks: &[u64], buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.clear();
        for (offset, len) in block_runs(size, blocks) {
            let start = buf.len();
            buf.resize(start + len, 0);
            self.file.read_exact_at(&mut buf[start..], offset)?;
        }
        Ok(())
    }
}

struct ExportSource<'a> {
    export: &'a mut dyn Export,
    disk: usize,
    nblocks: u64,
    /// Blocks that may hold data (from the export's allocation map), when known.
    allocated: Option<&'a Bitmap>,
}

impl BlockSource for ExportSource<'_> {
    fn next_data(&mut self, b: u64) -> Option<u64> {
        match self.allocated {
            Some(a) => a.iter_from(b).next(),
            None => (b < self.nblocks).then_some(b),
        }
    }
    fn read_blocks(&mut self, size: u64, blocks: &[u64], buf: &mut Vec<u8>) -> std::io::Result<()> {
        read_blocks(self.export, self.disk, size, blocks, buf)
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.message))
    }
}

/// Frames the next blocks of disk `d` that `plan` sends, from block `next` on: at most
/// `BATCH_BLOCKS` framed and a bounded number examined (the caller may hold the VM's lock).
/// Returns the batch and the block to go on from.
fn frame_batch(
    src: &mut dyn BlockSource,
    d: usize,
    n: u64,
    size: u64,
    next: u64,
    plan: &Plan,
    hashes: Option<&[u8]>,
) -> std::io::Result<(Vec<u8>, u64)> {
    let mut out = Vec::with_capacity(BATCH_BLOCKS as usize * (frame::HEADER + BLOCK_SIZE as usize));
    let mut b = next;
    let mut examined = 0;
    let mut framed = 0u64;
    let mut window = Vec::with_capacity(READ_WINDOW_BLOCKS);
    let mut data = Vec::new();
    while framed < BATCH_BLOCKS && examined < 16 * BATCH_BLOCKS {
        // The next candidates, no more than may still be framed or examined, read together
        // (adjacent blocks as one run).
        let room = (BATCH_BLOCKS - framed)
            .min(16 * BATCH_BLOCKS - examined)
            .min(READ_WINDOW_BLOCKS as u64);
        window.clear();
        while (window.len() as u64) < room {
            let cand = match plan {
                Plan::Blocks(sets) => sets.get(d).and_then(|s| s.iter_from(b).next()),
                Plan::All { skip_zero: true } => src.next_data(b),
                _ => (b < n).then_some(b),
            };
            let Some(cb) = cand else {
                b = n;
                break;
            };
            b = cb + 1;
            window.push(cb);
        }
        if window.is_empty() {
            break;
        }
        examined += window.len() as u64;
        src.read_blocks(size, &window, &mut data)?;
        let mut at = 0;
        for &cb in &window {
            let block = &data[at..at + block_len(size, cb)];
            at += block.len();
            // The peer's hashes cover the data only (the frame's checksum covers its header
            // too). A block that need not travel is left out.
            let same = hashes.is_some_and(|h| {
                let i = (cb * 32) as usize;
                h.get(i..i + 32) == Some(&crate::replication::block_hash(block)[..])
            });
            let zero = matches!(plan, Plan::All { skip_zero: true }) && is_zero(block);
            if same || zero {
                continue;
            }
            frame::push(&mut out, d as u32, cb, block);
            framed += 1;
        }
    }
    Ok((out, b))
}

/// Whether `data` is all zeroes. Without an early exit the loop vectorizes, and a full copy
/// checks gigabytes of mostly zero blocks this way.
fn is_zero(data: &[u8]) -> bool {
    data.iter().fold(0u8, |acc, x| acc | x) == 0
}

/// A hypervisor domain's export, shared by the batches of one transfer.
struct OpenExport {
    export: Arc<std::sync::Mutex<Box<dyn Export>>>,
    checkpoint: Option<String>,
}

/// Opens a point-in-time export of domain `vm` with its changes since `since` (all blocks when
/// `None`), starting the checkpoint of cycle `cycle`.
async fn open_export(
    st: &Shared,
    vm: &str,
    disks: &[crate::site::DiskSpec],
    since: Option<String>,
    cycle: &str,
    dir: &std::path::Path,
) -> Result<OpenExport, ApiError> {
    let (st2, vm2, disks2) = (st.clone(), vm.to_string(), disks.to_vec());
    let next = format!("twinsite-{cycle}");
    let scratch = dir.join("spool");
    let ex = tokio::task::spawn_blocking(move || {
        st2.runtime
            .export(&vm2, &disks2, since.as_deref(), Some(&next), &scratch)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let checkpoint = ex.checkpoint().map(str::to_string);
    Ok(OpenExport {
        export: Arc::new(std::sync::Mutex::new(ex)),
        checkpoint,
    })
}

/// Whether the cycle at `time` is to make an app-consistent point: one every
/// `app_consistent_hours` (0: never).
fn app_consistent_due(o: &super::meta::Outbound, time: Timestamp) -> bool {
    o.app_consistent_hours > 0
        && o.last_app_consistent.is_none_or(|t| {
            time.as_second() - t.as_second() >= o.app_consistent_hours as i64 * 3600
        })
}

/// The longest a guest agent's freeze or thaw may take. A freeze that takes longer is thawed
/// and the cycle's point stays crash-consistent.
const FREEZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A freeze under way: when it was asked for, and how many filesystems it froze.
struct Frozen {
    at: Timestamp,
    started: std::time::Instant,
    filesystems: u64,
}

/// Freezes domain `vm`'s guest filesystems through its guest agent; `None` (a crash-consistent
/// point) when it has none that answers or the freeze fails, after thawing whatever it froze.
async fn freeze_guest(st: &Shared, vm: &str) -> Option<Frozen> {
    let (st2, vm2) = (st.clone(), vm.to_string());
    let res = tokio::task::spawn_blocking(move || -> super::ApiResult<Option<Frozen>> {
        if !st2.runtime.domain(&vm2)?.is_some_and(|d| d.guest_agent) {
            return Ok(None);
        }
        let (at, started) = (Timestamp::now(), std::time::Instant::now());
        match st2.runtime.freeze(&vm2, FREEZE_TIMEOUT) {
            Ok(filesystems) => Ok(Some(Frozen {
                at,
                started,
                filesystems,
            })),
            Err(e) => {
                // A freeze that timed out may still happen in the guest.
                let _ = st2.runtime.thaw(&vm2, FREEZE_TIMEOUT);
                Err(e)
            }
        }
    })
    .await;
    match res {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!(vm, error = %e.message, "guest filesystems not frozen: a crash-consistent point");
            None
        }
        Err(e) => {
            tracing::warn!(vm, error = %e, "guest filesystems not frozen: a crash-consistent point");
            None
        }
    }
}

/// Thaws what [`freeze_guest`] froze; the freeze as the source reports it, or `None` when the
/// thaw failed (logged: the guest stays frozen until its agent is reached again).
async fn thaw_guest(st: &Shared, vm: &str, f: Frozen) -> Option<crate::site::Quiesce> {
    let (st2, vm2) = (st.clone(), vm.to_string());
    let res = tokio::task::spawn_blocking(move || {
        st2.runtime
            .thaw(&vm2, FREEZE_TIMEOUT)
            .or_else(|_| st2.runtime.thaw(&vm2, FREEZE_TIMEOUT))
    })
    .await;
    let frozen_millis = u64::try_from(f.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match res {
        Ok(Ok(_)) => {
            tracing::info!(
                vm,
                filesystems = f.filesystems,
                frozen_millis,
                "guest filesystems frozen for an app-consistent point"
            );
            Some(crate::site::Quiesce {
                time: f.at,
                frozen_millis,
                filesystems: f.filesystems,
            })
        }
        Ok(Err(e)) => {
            tracing::error!(vm, error = %e.message, frozen_millis, "thawing the guest's filesystems failed");
            None
        }
        Err(e) => {
            tracing::error!(vm, error = %e, frozen_millis, "thawing the guest's filesystems failed");
            None
        }
    }
}

/// A cycle of a hypervisor domain: its changes since the acknowledged checkpoint, read from a
/// point-in-time export into a spool file (the export ends before anything is sent). When the
/// export cannot be made from that checkpoint (it was lost, or QEMU stopped without saving
/// its bitmaps), the VM resynchronizes.
async fn capture_domain(st: &Shared, vm: &str, verify: bool) -> Result<Capture, ApiError> {
    let open = open_domain_capture(st, vm, true).await?;
    read_domain_capture(st, open, None, verify).await
}

/// A domain's capture with its export open: its point in time is fixed, its blocks not read
/// yet (the guest may run on meanwhile).
pub struct OpenCapture {
    vm: String,
    cycle: String,
    sealed: Sealed,
    disks: Vec<crate::site::DiskSpec>,
    dir: PathBuf,
    ex: OpenExport,
    quiesce: Option<crate::site::Quiesce>,
}

/// The first half of [`capture_domain`]: seals, freezes the guest when an app-consistent
/// point is due and `may_freeze`, and opens the export.
pub async fn open_domain_capture(
    st: &Shared,
    vm: &str,
    may_freeze: bool,
) -> Result<OpenCapture, ApiError> {
    let vm_s = vm.to_string();
    let now = Timestamp::now();
    let (sealed, disks, since, dir, due) = with_vm(st, &vm_s, move |r| {
        let sealed = r.tracker.seal().map_err(ApiError::io)?;
        Ok((
            sealed,
            r.meta.disks.clone(),
            r.meta.domain.as_ref().and_then(|d| d.checkpoint.clone()),
            r.dir.clone(),
            r.meta
                .outbound
                .as_ref()
                .is_some_and(|o| app_consistent_due(o, now)),
        ))
    })
    .await?;
    let cycle = new_cycle_id();
    // An app-consistent point: the guest's filesystems frozen while the export's checkpoint
    // is taken, thawed right after (whatever the export did).
    let frozen = if may_freeze && due && since.is_some() {
        freeze_guest(st, vm).await
    } else {
        None
    };
    let opened = match since.clone() {
        Some(cp) => open_export(st, vm, &disks, Some(cp), &cycle, &dir).await,
        None => Err(ApiError::resync("no checkpoint to read changes from")),
    };
    let quiesce = match frozen {
        Some(f) => thaw_guest(st, vm, f).await.filter(|_| opened.is_ok()),
        None => None,
    };
    let ex = match opened {
        Ok(ex) => ex,
        // The base is intact (another backup job, a lock timeout, libvirtd restarting): the
        // next cycle reads from the same checkpoint.
        Err(e) if e.reason != Some(RESYNC_REQUIRED) => {
            with_vm(st, &vm_s, move |r| {
                r.tracker.abort(sealed);
                Ok(())
            })
            .await?;
            return Err(e);
        }
        Err(e) => {
            let msg = format!(
                "changes of {vm} cannot be read since its last checkpoint ({}): resynchronizing \
                 by block hashes",
                e.message
            );
            tracing::warn!(vm, error = %e.message, "the base of the next transfer is lost: resynchronizing by block hashes");
            with_vm(st, &vm_s, move |r| {
                if let Some(o) = r.meta.outbound.as_mut() {
                    o.bulk = Some(ReplicationMode::Resync);
                    o.state = ReplicationState::Resynchronizing;
                }
                if let Some(d) = r.meta.domain.as_mut() {
                    d.checkpoint = None;
                }
                r.tracker.abort(sealed);
                r.save()
            })
            .await?;
            return Err(ApiError::conflict(msg));
        }
    };
    Ok(OpenCapture {
        vm: vm.to_string(),
        cycle,
        sealed,
        disks,
        dir,
        ex,
        quiesce,
    })
}

impl OpenCapture {
    pub fn vm(&self) -> &str {
        &self.vm
    }
}

/// Gives up a capture that will not be sent (another VM of its cut failed): its blocks are
/// dirty again and a domain's new checkpoint is dropped (merged into the base).
pub async fn abandon_capture(st: &Shared, c: Capture) {
    if let Some(cp) = c.checkpoint.clone() {
        settle_checkpoint(st, &c.vm, cp, false).await;
    }
    let (vm, sealed) = (c.vm.clone(), c.sealed.clone());
    let _ = with_vm(st, &vm, move |r| {
        r.tracker.abort(sealed);
        Ok(())
    })
    .await;
}

/// Gives up an open capture (another VM of its cut failed): the export ends, its new
/// checkpoint is dropped (merged into the base) and its blocks are dirty again.
pub async fn abandon_domain_capture(st: &Shared, open: OpenCapture) {
    let OpenCapture { vm, sealed, ex, .. } = open;
    let checkpoint = ex.checkpoint.clone();
    drop(ex);
    if let Some(cp) = checkpoint {
        settle_checkpoint(st, &vm, cp, false).await;
    }
    let _ = with_vm(st, &vm, move |r| {
        r.tracker.abort(sealed);
        Ok(())
    })
    .await;
}

/// The second half of [`capture_domain`]: reads the changed blocks of an open capture into its
/// spool file and ends the export. `cut`: the cut's time and id, for a capture of a cut.
pub async fn read_domain_capture(
    st: &Shared,
    open: OpenCapture,
    cut: Option<(Timestamp, String)>,
    verify: bool,
) -> Result<Capture, ApiError> {
    let OpenCapture {
        vm,
        cycle,
        sealed,
        disks,
        dir,
        ex,
        quiesce,
    } = open;
    let (vm, vm_s) = (vm.as_str(), vm.clone());
    let spool_dir = dir.join("spool");
    let spool = spool_dir.join(format!("{cycle}.blocks"));
    let export = ex.export.clone();
    let sizes: Vec<u64> = disks.iter().map(|d| d.size_bytes).collect();
    let spool2 = spool.clone();
    type Read = (Vec<Bitmap>, u64, Option<Vec<Vec<u8>>>);
    let read = tokio::task::spawn_blocking(move || -> Result<Read, ApiError> {
        std::fs::create_dir_all(&spool_dir).map_err(ApiError::io)?;
        let mut ex = export
            .lock()
            .map_err(|_| ApiError::internal("export poisoned"))?;
        let out = std::fs::File::create(&spool2).map_err(ApiError::io)?;
        fault::hit("source.export");
        let mut buf = Vec::new();
        let mut sets = Vec::new();
        let mut slot = 0u64;
        for (d, size) in sizes.iter().enumerate() {
            let set = ex
                .changed(d)?
                .ok_or_else(|| ApiError::internal("an incremental export without changes"))?;
            // A window of changed blocks at a time, adjacent ones read as one run. They fill
            // consecutive slots, and only a disk's last block is short, so the window lands
            // in the spool as it was read.
            for window in windows(set.iter()) {
                read_blocks(ex.as_mut(), d, *size, &window, &mut buf)?;
                out.write_all_at(&buf, slot * BLOCK_SIZE)
                    .map_err(ApiError::io)?;
                slot += window.len() as u64;
            }
            sets.push(set);
        }
        // The export is the disks at the cut: hashing it pauses nothing.
        let hashes = verify
            .then(|| super::verify::hash_disks(&sizes, |d, off, buf| ex.read(d, off, buf)))
            .transpose()?;
        Ok((sets, slot, hashes))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let checkpoint = ex.checkpoint.clone();
    drop(ex);
    match read {
        Ok((sets, blocks, verify)) => {
            if let Some(q) = quiesce {
                with_vm(st, &vm_s, move |r| {
                    if let Some(o) = r.meta.outbound.as_mut() {
                        o.last_quiesce = Some(q);
                    }
                    r.save()
                })
                .await?;
            }
            Ok(Capture {
                vm: vm.to_string(),
                cycle,
                sealed,
                sets,
                checkpoint,
                spool,
                blocks,
                time: cut
                    .as_ref()
                    .map(|c| c.0)
                    .or(quiesce.map(|q| q.time))
                    .unwrap_or_else(Timestamp::now),
                kind: if quiesce.is_some() {
                    RecoveryPointKind::AppConsistent
                } else {
                    RecoveryPointKind::CrashConsistent
                },
                cut_id: cut.map(|c| c.1),
                verify,
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&spool);
            if let Some(cp) = checkpoint {
                settle_checkpoint(st, vm, cp, false).await;
            }
            with_vm(st, &vm_s, move |r| {
                r.tracker.abort(sealed);
                Ok(())
            })
            .await?;
            Err(e)
        }
    }
}

/// The bulk transfer, sending the blocks `plan` names; returns payload bytes sent.
async fn bulk(
    st: &Shared,
    peer: &Peer,
    vm: &str,
    cycle: &str,
    plan: Plan,
    disks: &[crate::site::DiskSpec],
    reader: Reader,
) -> Result<u64, String> {
    let mut sent = 0;
    let plan = Arc::new(plan);
    let total = disks
        .iter()
        .enumerate()
        .map(|(d, disk)| plan_bytes(&plan, d, disk.size_bytes, 0, u64::MAX))
        .sum();
    let progress = TransferGuard::start(st, vm, total);
    let whole = plan.clone();
    let mut framed = 0u64;
    for (d, disk) in disks.iter().enumerate() {
        let n = block_count(disk.size_bytes);
        // A domain's export says which blocks hold data; read once per disk.
        let allocated = match (&reader, &*plan) {
            (Reader::Export(ex), Plan::All { skip_zero: true }) => {
                let ex = ex.clone();
                let a = tokio::task::spawn_blocking(move || {
                    ex.lock()
                        .map_err(|_| "export poisoned".to_string())?
                        .allocated(d)
                        .map_err(|e| e.message)
                })
                .await
                .map_err(|e| e.to_string())??;
                Some(Arc::new(a))
            }
            _ => None,
        };
        let peer_hashes = if matches!(*plan, Plan::Hash) {
            Some(peer.block_hashes(vm, d, disk.size_bytes).await?)
        } else {
            None
        };
        let mut next = 0;
        let mut inflight = FuturesUnordered::new();
        while next < n {
            if hold_after(framed) {
                while let Some(r) = inflight.next().await {
                    sent += r?;
                }
                while st.data_dir.join("hold-bulk").exists() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            let vm2 = vm.to_string();
            let size = disk.size_bytes;
            let hashes = peer_hashes.clone();
            let plan = plan.clone();
            let permit = acquire_polling(st, &mut inflight, &mut sent).await?;
            let (blocks, after) = match &reader {
                Reader::Files => read_vm(st, &vm2, move |r| {
                    let file = r.disks.open(d)?;
                    let mut src = FileSource {
                        file: &file,
                        nblocks: n,
                    };
                    frame_batch(&mut src, d, n, size, next, &plan, hashes.as_deref())
                        .map_err(ApiError::io)
                })
                .await
                .map_err(|e| e.message)?,
                Reader::Export(ex) => {
                    let (ex, allocated) = (ex.clone(), allocated.clone());
                    tokio::task::spawn_blocking(move || {
                        let mut ex = ex.lock().map_err(|_| "export poisoned".to_string())?;
                        let mut src = ExportSource {
                            export: ex.as_mut(),
                            disk: d,
                            nblocks: n,
                            allocated: allocated.as_deref(),
                        };
                        frame_batch(&mut src, d, n, size, next, &plan, hashes.as_deref())
                            .map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(|e| e.to_string())??
                }
            };
            // Done once the peer has acknowledged the batch (at once when nothing travels).
            let scanned = plan_bytes(&whole, d, disk.size_bytes, next, after);
            let t = progress.t.clone();
            if blocks.is_empty() {
                t.done.fetch_add(scanned, Ordering::SeqCst);
            } else {
                framed += 1;
                inflight.push(async move {
                    let _permit = permit;
                    let r = send_batch(st, peer, vm, cycle, true, blocks).await;
                    if r.is_ok() {
                        t.done.fetch_add(scanned, Ordering::SeqCst);
                    }
                    r
                });
            }
            while inflight.len() >= PIPELINE {
                sent += inflight.next().await.unwrap_or(Ok(0))?;
            }
            next = after;
        }
        while let Some(r) = inflight.next().await {
            sent += r?;
        }
    }
    Ok(sent)
}

/// Asks the driver of `vm` to sync now and waits for the acknowledged point.
pub async fn sync_now(st: &Shared, vm: &str) -> Result<RecoveryPoint, ApiError> {
    let tx = st
        .drivers
        .lock()
        .ok()
        .and_then(|d| d.get(vm).map(|(tx, _)| tx.clone()))
        .ok_or_else(|| ApiError::conflict(format!("replication of {vm} is not running here")))?;
    let (rtx, rrx) = oneshot::channel();
    tx.send(Msg::Sync(rtx))
        .await
        .map_err(|_| ApiError::conflict("replication stopped"))?;
    rrx.await
        .map_err(|_| ApiError::conflict("replication stopped"))?
        .map_err(ApiError::peer)
}

#[cfg(test)]
mod tests {
    use super::{Arc, BLOCK_SIZE, Bitmap, Plan, block_count, new_cycle_id, plan_bytes};

    /// A transfer's batches cover its disk in consecutive ranges of blocks: their bytes add up
    /// to the transfer's total, so a transfer's progress ends at 100%.
    #[test]
    fn progress_of_consecutive_batches_adds_up_to_the_total() {
        let size = 10 * BLOCK_SIZE + 123;
        let n = block_count(size);
        let mut set = Bitmap::new(n);
        for b in [0, 3, 4, 10] {
            set.set(b);
        }
        let blocks = Plan::Blocks(Arc::new(vec![set]));
        let cases = [
            (Plan::All { skip_zero: true }, size),
            (Plan::Hash, size),
            (blocks, 3 * BLOCK_SIZE + 123),
        ];
        for (plan, want) in cases {
            let total = plan_bytes(&plan, 0, size, 0, u64::MAX);
            assert_eq!(total, want);
            let cuts = [0, 2, 4, 5, 9, n];
            let done: u64 = cuts
                .windows(2)
                .map(|w| plan_bytes(&plan, 0, size, w[0], w[1]))
                .sum();
            assert_eq!(done, total);
        }
    }

    #[test]
    fn cycle_ids_do_not_repeat_within_one_instant() {
        let ids: std::collections::BTreeSet<String> = (0..1000).map(|_| new_cycle_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
