//! Crash injection: two real agents replicate one VM through a whole protection life cycle
//! (guest writes, cycles, a test failover, a resync into the replica, a failover to an older
//! point, a reverse resync, commit), while one of them is armed to die by SIGKILL at the N-th
//! time it reaches one failpoint of `twinsite::fault::ALL`. Every failpoint is run twice: once
//! as a plain SIGKILL (the page cache keeps every write), once as a power cut: each agent's data
//! directory is on the power-loss filesystem (`twinsite-powerloss-fs`, tests/common_powerloss),
//! and when the armed agent dies its site loses every write it had not made durable (file and
//! directory fsync) before the agent starts again on what survived. The dead agent is started
//! again (unarmed), the
//! interrupted step is retried the way the controller would (the same operation id; a new one
//! for sync), and the suite checks its invariants against a model of the source's image:
//!
//! 1. every recovery point at the replica reads back (through a test failover) exactly the
//!    image the source had at the point's time;
//! 2. every acknowledged guest write is on the primary's disks;
//! 3. the replica's image is its newest point, never an image the source did not have (such as
//!    zeros plus the last cycle), and after a sync it is the source's image;
//! 5. a resync into a replica that holds points (forced by a refused parent) keeps every one of
//!    them listed, and reading back as above, while it runs and after it;
//! 4. the agent starts again and answers after every crash;
//!
//! and that an operation retried with its id after a crash answers or does the operation (never
//! a 409, or a 404, because half of its effect happened). Violations are collected, not
//! panicked on; the test ends with one line
//! `injected crashes: N, power cuts: P, invariant violations: M` (N: SIGKILLs that kept the page
//! cache, P: crashes that lost it).
//!
//! Run with `cargo test --features failpoints --test crash_injection -- --nocapture`;
//! `CRASH_ONLY=name,name` runs only those failpoints, `CRASH_MODE=kill` or `power` only one kind.

mod common_agent;
mod common_powerloss;

use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common_agent::{AgentProc, TOKEN};
use common_powerloss::PowerLossDir;
use jiff::Timestamp;
use sha2::Digest;
use twinsite::site::{
    AcceptReplication, AgentClient, CreateVm, DiskSpec, EnableReplication, Power, PowerAction,
    RecoveryPoint, RecoveryPointSelector, ReplicationMode, Role, SiteError, SiteProvider,
};

const VM: &str = "crash-vm";
/// Two small disks; the second ends in a short block.
const DISKS: [(&str, u64); 2] = [("disk0", 1 << 20), ("disk1", 1_500_000)];
const BLOCK: u64 = 64 * 1024;
/// Each failpoint is armed as `NAME@1`, `NAME@2`, ... up to this, stopping at the first run in
/// which the scenario does not reach it that often.
const K_MAX: u64 = 8;
/// Cycles of the forward phase after the first sync (each after two guest writes).
const CYCLES: usize = 6;
/// Scenarios run at once (each with its own two agents).
const WORKERS: usize = 2;
/// Scratch VMs created and deleted at each site (deletes keep their answer outside any VM).
const SCRATCH: usize = 3;
const SITE_A: &str = "site-a";
const SITE_B: &str = "site-b";
const SIGKILL: i32 = 9;
/// How long a restarted agent may take to listen and answer `/healthz`.
const RESTART_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
}

/// Where a failpoint is armed: the source for guest writes and outbound cycles, the replica for
/// incoming cycles, failover and commit, either for operation records.
fn sides_of(point: &str) -> Vec<Side> {
    if point.starts_with("guest.") || point.starts_with("source.") {
        vec![Side::A]
    } else if point.starts_with("op.") {
        vec![Side::A, Side::B]
    } else {
        vec![Side::B]
    }
}

/// Which way the VM runs: A replicates to B; B failed over (no replication); B replicates
/// back to A.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Forward,
    FailedOver,
    Reverse,
}

/// Deterministic pseudo-random numbers (splitmix64), seeded per run.
struct Rng(u64);

impl Rng {
    fn seeded(label: &str) -> Self {
        // FNV-1a of the label: a run is the same every time.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in label.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Rng(h)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn short(digests: &[String]) -> String {
    digests
        .iter()
        .map(|d| d.get(..12).unwrap_or(d))
        .collect::<Vec<_>>()
        .join("/")
}

/// One image of the primary's disks over a span of time: it may hold from `from` (the start of
/// the write or failover that made it) and surely holds from `settled` (its answer, or the
/// read-back of a write in doubt) until the next image may hold.
struct Image {
    from: Timestamp,
    settled: Option<Timestamp>,
    digests: Vec<String>,
}

/// A guest write whose outcome is not known yet.
struct Pending {
    disk: usize,
    offset: usize,
    old: Vec<u8>,
    new: Vec<u8>,
}

/// The test's model of the primary: its expected bytes and the timeline of its images.
struct Model {
    bytes: Vec<Vec<u8>>,
    timeline: Vec<Image>,
    pending: Option<Pending>,
}

impl Model {
    fn new(t: Timestamp) -> Self {
        let bytes: Vec<Vec<u8>> = DISKS.iter().map(|(_, s)| vec![0u8; *s as usize]).collect();
        let digests = bytes.iter().map(|b| sha256_hex(b)).collect();
        Model {
            bytes,
            timeline: vec![Image {
                from: t,
                settled: Some(t),
                digests,
            }],
            pending: None,
        }
    }

    fn digests(&self) -> Vec<String> {
        self.bytes.iter().map(|b| sha256_hex(b)).collect()
    }

    /// A write is about to be sent: from now on the image may be the one with it.
    fn begin_write(&mut self, disk: usize, offset: usize, new: Vec<u8>, t: Timestamp) {
        let end = offset + new.len();
        let old = self.bytes[disk][offset..end].to_vec();
        self.bytes[disk][offset..end].copy_from_slice(&new);
        let digests = self.digests();
        self.bytes[disk][offset..end].copy_from_slice(&old);
        self.timeline.push(Image {
            from: t,
            settled: None,
            digests,
        });
        self.pending = Some(Pending {
            disk,
            offset,
            old,
            new,
        });
    }

    /// The pending write's range now reads `found` (the write's bytes when it was
    /// acknowledged). An error when that is neither the old nor the new content.
    fn settle(&mut self, found: &[u8], t: Timestamp) -> Result<(), String> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let end = p.offset + p.new.len();
        let res = if found == p.new.as_slice() || found == p.old.as_slice() {
            Ok(())
        } else {
            Err(format!(
                "a guest write in doubt left {} bytes at disk {} offset {} that are neither the \
                 old nor the new content",
                p.new.len(),
                p.disk,
                p.offset
            ))
        };
        // The model adopts what is there.
        self.bytes[p.disk][p.offset..end].copy_from_slice(found);
        let digests = self.digests();
        if let Some(last) = self.timeline.last_mut() {
            last.digests = digests;
            last.settled = Some(t);
        }
        res
    }

    /// After a failover: the primary's image is now `bytes` (checked by the caller).
    fn adopt(&mut self, bytes: Vec<Vec<u8>>, from: Timestamp, settled: Timestamp) {
        self.bytes = bytes;
        let digests = self.digests();
        self.timeline.push(Image {
            from,
            settled: Some(settled),
            digests,
        });
    }

    /// The images the primary may have had at `t`.
    fn at(&self, t: Timestamp) -> Vec<&Image> {
        let tl = &self.timeline;
        (0..tl.len())
            .filter(|&i| {
                tl[i].from <= t
                    && tl
                        .get(i + 1)
                        .is_none_or(|next| next.settled.is_none_or(|s| t < s))
            })
            .map(|i| &tl[i])
            .collect()
    }

    fn matches(&self, t: Timestamp, digests: &[String]) -> bool {
        self.at(t).iter().any(|i| i.digests == digests)
    }

    /// Whether `digests` is any image the primary ever had.
    fn ever(&self, digests: &[String]) -> bool {
        self.timeline.iter().any(|i| i.digests == digests)
    }

    /// For messages: what an image that did not match was.
    fn describe(&self, t: Timestamp, digests: &[String]) -> String {
        let expected: Vec<String> = self.at(t).iter().map(|i| short(&i.digests)).collect();
        let what = if self.ever(digests) {
            "an image the source had at another time"
        } else {
            "an image the source never had"
        };
        format!(
            "{} is {what} (expected at {t}: {})",
            short(digests),
            expected.join(" or ")
        )
    }
}

struct Agent {
    proc: AgentProc,
    client: AgentClient,
    /// The failpoint this process was started with, until it dies or is restarted.
    armed: Option<String>,
    log: PathBuf,
}

/// The scenario cannot go on (the reason is recorded as a violation).
struct Abort;

/// How an interrupted step is retried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// A controller operation: the same operation id, after a crash only.
    SameOp,
    /// Sync: a new operation id each attempt; a failure without a crash may happen once or
    /// twice (a cycle refused on the wrong parent makes the source resync on the next one).
    NewOp,
}

struct Run {
    label: String,
    /// The failpoint and where it is armed; `None` for a run without one.
    armed: Option<(&'static str, Side)>,
    a: Agent,
    b: Agent,
    /// The sites' data directories on the power-loss filesystem (A, B), for a power-cut run:
    /// an agent's death at its failpoint cuts its site's power. Dropped after the agents.
    power: Option<[PowerLossDir; 2]>,
    phase: Phase,
    model: Model,
    rng: Rng,
    /// The agent died at its failpoint (and was started again).
    crashed: bool,
    /// Its site lost, at that death, every write it had not made durable.
    power_cut: bool,
    violations: Vec<String>,
    seq: u64,
    /// Recovery points read back through a test failover by the checks.
    points_read: u64,
    /// Points the replica listed before a resync into it: they must stay listed (and read
    /// back, as every point) while it runs and after. Emptied by the failover.
    kept: Vec<String>,
    _root: tempfile::TempDir,
}

fn vm_spec() -> CreateVm {
    CreateVm {
        disks: DISKS
            .iter()
            .map(|(n, s)| DiskSpec {
                name: n.to_string(),
                size_bytes: *s,
                format: None,
            })
            .collect(),
        power: Power::Running,
        integration_services: true,
    }
}

fn enable_to(op: &str, peer: &AgentProc, mode: ReplicationMode) -> EnableReplication {
    EnableReplication {
        operation_id: op.into(),
        peer_site: peer.site.clone(),
        peer_url: peer.url.clone(),
        peer_token: TOKEN.into(),
        peer_ca_pem: None,
        // No background cycle interferes: only the driver's first run after an enable or a
        // restart, and the cycles `sync` asks for.
        interval_seconds: 3600,
        recovery_point_retention_hours: 24,
        app_consistent_frequency_hours: 0,
        mode,
    }
}

async fn digests_of(c: &AgentClient, vm: &str) -> Result<Vec<String>, SiteError> {
    let mut out = Vec::new();
    for (d, _) in DISKS {
        out.push(c.digest(vm, d).await?);
    }
    Ok(out)
}

async fn read_image(c: &AgentClient) -> Result<Vec<Vec<u8>>, SiteError> {
    let mut out = Vec::new();
    for (d, size) in DISKS {
        out.push(c.read_disk(VM, d, 0, size).await?);
    }
    Ok(out)
}

fn start_agent(root: &std::path::Path, site: &str, point: Option<String>) -> Result<Agent, String> {
    let env: Vec<(&str, &str)> = point
        .as_deref()
        .map(|p| ("TWINSITE_FAILPOINT", p))
        .into_iter()
        .collect();
    let mut proc = AgentProc::unstarted(site, root, &env, &[]);
    let log = root.join(format!("{site}.stderr"));
    proc.stderr_log = Some(log.clone());
    proc.try_spawn(RESTART_LIMIT)?;
    let client = proc.client();
    Ok(Agent {
        proc,
        client,
        armed: point,
        log,
    })
}

impl Run {
    /// Two fresh agents; `armed` is `(failpoint, side, n)`; `power`: their data directories are
    /// on the power-loss filesystem.
    fn new(
        label: String,
        armed: Option<(&'static str, Side, u64)>,
        power: bool,
    ) -> Result<Self, String> {
        let root = tempfile::tempdir().map_err(|e| e.to_string())?;
        let power = if power {
            Some([
                PowerLossDir::new(&root.path().join(SITE_A))?,
                PowerLossDir::new(&root.path().join(SITE_B))?,
            ])
        } else {
            None
        };
        let arm = |side: Side| {
            armed
                .filter(|(_, s, _)| *s == side)
                .map(|(p, _, n)| format!("{p}@{n}"))
        };
        let a = start_agent(root.path(), SITE_A, arm(Side::A))?;
        let b = start_agent(root.path(), SITE_B, arm(Side::B))?;
        Ok(Run {
            rng: Rng::seeded(&label),
            label,
            armed: armed.map(|(p, s, _)| (p, s)),
            a,
            b,
            power,
            phase: Phase::Forward,
            model: Model::new(Timestamp::now()),
            crashed: false,
            power_cut: false,
            violations: Vec::new(),
            seq: 0,
            points_read: 0,
            kept: Vec::new(),
            _root: root,
        })
    }

    fn agent(&self, side: Side) -> &Agent {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    fn agent_mut(&mut self, side: Side) -> &mut Agent {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    fn client(&self, side: Side) -> AgentClient {
        self.agent(side).client.clone()
    }

    fn primary(&self) -> Side {
        match self.phase {
            Phase::Forward => Side::A,
            Phase::FailedOver | Phase::Reverse => Side::B,
        }
    }

    fn source(&self) -> Option<Side> {
        match self.phase {
            Phase::Forward => Some(Side::A),
            Phase::FailedOver => None,
            Phase::Reverse => Some(Side::B),
        }
    }

    fn replica(&self) -> Option<Side> {
        match self.phase {
            Phase::Forward => Some(Side::B),
            Phase::FailedOver => None,
            Phase::Reverse => Some(Side::A),
        }
    }

    fn violation(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        eprintln!("[{}] VIOLATION: {msg}", self.label);
        self.violations.push(format!("[{}] {msg}", self.label));
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Starts `side` again without a failpoint; it must answer within [`RESTART_LIMIT`].
    async fn restart(&mut self, side: Side, why: &str) -> Result<(), Abort> {
        let ag = self.agent_mut(side);
        ag.armed = None;
        ag.proc.set_env("TWINSITE_FAILPOINT", None);
        let started = ag.proc.try_spawn(RESTART_LIMIT);
        let site = ag.proc.site.clone();
        if let Err(e) = started {
            self.violation(format!("{site} did not start again {why}: {e}"));
            return Err(Abort);
        }
        let c = self.client(side);
        let deadline = Instant::now() + RESTART_LIMIT;
        loop {
            match c.health().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    self.violation(format!("{site} does not answer {why}: {e}"));
                    return Err(Abort);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A source that starts runs a cycle at once: wait for its driver to be idle (a sync
    /// answers only after that first run) before anything writes or checks.
    async fn wait_idle(&mut self, side: Side) {
        if self.source() == Some(side) {
            let op = format!("idle-{}", self.next_seq());
            let _ = self.client(side).sync(VM, &op).await;
        }
    }

    /// Finds agents that died, tells a crash at the armed failpoint from any other death,
    /// starts them again and checks every invariant. `wait`: a call just failed, so give a
    /// dying process a moment to be seen dead.
    async fn reap(&mut self, wait: bool) -> Result<bool, Abort> {
        let deadline = Instant::now()
            + if wait {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
        let mut dead = Vec::new();
        loop {
            for side in [Side::A, Side::B] {
                if let Some(st) = self.agent_mut(side).proc.exited() {
                    dead.push((side, st));
                }
            }
            if !dead.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if dead.is_empty() {
            return Ok(false);
        }
        for (side, st) in dead {
            let ag = self.agent(side);
            let site = ag.proc.site.clone();
            let log = std::fs::read_to_string(&ag.log).unwrap_or_default();
            let why = match ag.armed.clone() {
                Some(p) => {
                    let name = p.split('@').next().unwrap_or(&p).to_string();
                    if st.signal() == Some(SIGKILL)
                        && log.contains(&format!("failpoint {name} reached"))
                    {
                        self.crashed = true;
                        eprintln!("[{}] {site} died at failpoint {p}", self.label);
                        let cut = self.power.as_mut().map(|d| d[side as usize].cut());
                        if let Some(cut) = cut {
                            if let Err(e) = cut {
                                self.violation(format!("cutting {site}'s power: {e}"));
                                return Err(Abort);
                            }
                            self.power_cut = true;
                            format!("after its crash and power cut at {p}")
                        } else {
                            format!("after its crash at {p}")
                        }
                    } else {
                        self.violation(format!(
                            "{site} (armed with {p}) died otherwise than at its failpoint: {st}"
                        ));
                        "after an unexpected death".to_string()
                    }
                }
                None => {
                    self.violation(format!("{site} died unexpectedly: {st}"));
                    "after an unexpected death".to_string()
                }
            };
            self.restart(side, &why).await?;
            self.wait_idle(side).await;
            self.check(&format!("{site} restarted {why}")).await;
        }
        Ok(true)
    }

    /// Runs one step, retrying it after crashes. The outer error: the scenario cannot go on;
    /// the inner one: the step failed without a crash to explain it.
    async fn attempt<T>(
        &mut self,
        what: &str,
        retry: Retry,
        mut f: impl AsyncFnMut(u32) -> Result<T, SiteError>,
    ) -> Result<Result<T, String>, Abort> {
        self.reap(false).await?;
        let mut soft = 0;
        let mut after_crash = false;
        let mut last = String::new();
        for n in 0..8u32 {
            match f(n).await {
                Ok(v) => return Ok(Ok(v)),
                Err(e) => {
                    last = e.to_string();
                    // An answer of 4xx comes from a live agent; a dead one (or a peer that
                    // died under it) shows as unreachable or a 5xx.
                    let maybe_dead = matches!(e, SiteError::Unreachable(_) | SiteError::Other(..));
                    if self.reap(maybe_dead).await? {
                        after_crash = true;
                        continue;
                    }
                    if retry == Retry::NewOp && soft < 2 {
                        soft += 1;
                        continue;
                    }
                    let how = if after_crash && retry == Retry::SameOp {
                        " (retried with the same operation id after a crash)"
                    } else {
                        ""
                    };
                    return Ok(Err(format!("{what} failed{how}: {e}")));
                }
            }
        }
        Ok(Err(format!("{what} failed 8 times: {last}")))
    }

    /// A step the scenario needs: its failure is a violation and ends the scenario.
    async fn step<T>(
        &mut self,
        what: &str,
        retry: Retry,
        f: impl AsyncFnMut(u32) -> Result<T, SiteError>,
    ) -> Result<T, Abort> {
        match self.attempt(what, retry, f).await? {
            Ok(v) => Ok(v),
            Err(e) => {
                self.violation(e);
                Err(Abort)
            }
        }
    }

    /// A guest write at the primary. A write whose call failed because the agent died is in
    /// doubt: after the restart its range must read as the old or the new bytes.
    async fn write(&mut self, disk: usize, offset: u64, data: Vec<u8>) -> Result<(), Abort> {
        self.reap(false).await?;
        let side = self.primary();
        let c = self.client(side);
        let (name, _) = DISKS[disk];
        self.model
            .begin_write(disk, offset as usize, data.clone(), Timestamp::now());
        let res = c.write_disk(VM, name, offset, data.clone()).await;
        let found = match res {
            Ok(()) => data,
            Err(e) => {
                if !self.reap(true).await? {
                    self.violation(format!("guest write at {name}:{offset} failed: {e}"));
                    return Err(Abort);
                }
                match c.read_disk(VM, name, offset, data.len() as u64).await {
                    Ok(b) => b,
                    Err(e) => {
                        self.violation(format!("reading back a write in doubt: {e}"));
                        return Err(Abort);
                    }
                }
            }
        };
        if let Err(e) = self.model.settle(&found, Timestamp::now()) {
            self.violation(e);
        }
        Ok(())
    }

    /// A write of random bytes at a random place (whole blocks one time in three).
    async fn random_write(&mut self) -> Result<(), Abort> {
        let disk = self.rng.below(DISKS.len() as u64) as usize;
        let size = DISKS[disk].1;
        let (offset, len) = if self.rng.below(3) == 0 {
            (self.rng.below(size / BLOCK) * BLOCK, BLOCK)
        } else {
            let len = (1 + self.rng.below(150_000)).min(size);
            (self.rng.below(size - len + 1), len)
        };
        let data = self.rng.bytes(len as usize);
        self.write(disk, offset, data).await
    }

    /// Sync at the source (a new operation id per attempt); afterwards the replica holds the
    /// source's image.
    async fn sync(&mut self, op: &str) -> Result<RecoveryPoint, Abort> {
        let Some(src) = self.source() else {
            self.violation(format!("sync {op} without a source"));
            return Err(Abort);
        };
        let c = self.client(src);
        let res = self
            .step(&format!("sync {op}"), Retry::NewOp, async |n| {
                c.sync(VM, &format!("{op}.{n}")).await
            })
            .await?;
        if let Some(rep) = self.replica() {
            let rc = self.client(rep);
            match digests_of(&rc, VM).await {
                Ok(d) if self.model.matches(Timestamp::now(), &d) => {}
                Ok(d) => {
                    let m = self.model.describe(Timestamp::now(), &d);
                    self.violation(format!("after sync {op} the replica's image {m}"));
                }
                Err(e) => self.violation(format!("digest at the replica after sync {op}: {e}")),
            }
        }
        Ok(res.recovery_point)
    }

    /// `accept_replication` at `at` from the other site; a failure is a violation but the
    /// scenario goes on (the enable after it shows what the agent does without it).
    async fn accept(&mut self, at: Side, op: &str) -> Result<(), Abort> {
        let c = self.client(at);
        let req = AcceptReplication {
            operation_id: op.into(),
            source_site: self.agent(at.other()).proc.site.clone(),
        };
        let site = self.agent(at).proc.site.clone();
        if let Err(e) = self
            .attempt(
                &format!("accept_replication {op} at {site}"),
                Retry::SameOp,
                async |_| c.accept_replication(VM, &req).await,
            )
            .await?
        {
            self.violation(e);
        }
        Ok(())
    }

    /// Checks invariants 1 to 3 (4 is checked by every restart). Never retries: every agent is
    /// unarmed when this runs, so any failure is a violation.
    async fn check(&mut self, when: &str) {
        let now = Timestamp::now();
        // 2: the primary holds every acknowledged write.
        let pc = self.client(self.primary());
        match digests_of(&pc, VM).await {
            Ok(d) if self.model.matches(now, &d) => {}
            Ok(d) => {
                let m = self.model.describe(now, &d);
                self.violation(format!("{when}: the primary's image {m}"));
            }
            Err(e) => self.violation(format!("{when}: digest at the primary: {e}")),
        }
        let Some(rep) = self.replica() else {
            return;
        };
        let rc = self.client(rep);
        let vm = match rc.get_vm(VM).await {
            Ok(v) => v,
            Err(SiteError::NotFound(_)) => return,
            Err(e) => {
                self.violation(format!("{when}: the replica's VM: {e}"));
                return;
            }
        };
        if vm.role != Role::Replica {
            return;
        }
        let points = match rc.recovery_points(VM).await {
            Ok(p) => p,
            Err(e) => {
                self.violation(format!("{when}: recovery points at the replica: {e}"));
                return;
            }
        };
        let missing: Vec<&String> = self
            .kept
            .iter()
            .filter(|id| !points.iter().any(|p| p.id == **id))
            .collect();
        if !missing.is_empty() {
            let msg = format!("{when}: a resync dropped the replica's points {missing:?}");
            self.violation(msg);
        }
        let Some(newest) = points.last() else {
            // No point (an initial copy under way): the image need not be any one state.
            return;
        };
        // 3: the replica's image is its newest point, an image the source had.
        match digests_of(&rc, VM).await {
            Ok(d) if self.model.matches(newest.time, &d) => {}
            Ok(d) => {
                let m = self.model.describe(newest.time, &d);
                self.violation(format!(
                    "{when}: the replica's image (newest point {}) {m}",
                    newest.id
                ));
            }
            Err(e) => self.violation(format!("{when}: digest at the replica: {e}")),
        }
        // 1: every point reads back the source's image at its time. Not while the scenario's
        // own drill copy exists (a test failover that a crash interrupted).
        let test_vm = format!("{VM}-test");
        if vm.test_copy.is_some() || rc.get_vm(&test_vm).await.is_ok() {
            return;
        }
        for p in &points {
            let op = format!("chk{}-{}", self.next_seq(), p.id);
            let sel = RecoveryPointSelector::Id(p.id.clone());
            match rc
                .test_failover(VM, &sel, "isolated", &format!("{op}-tf"))
                .await
            {
                Ok(t) => {
                    self.points_read += 1;
                    match digests_of(&rc, &t.vm_name).await {
                        Ok(d) if self.model.matches(p.time, &d) => {}
                        Ok(d) => {
                            let m = self.model.describe(p.time, &d);
                            self.violation(format!(
                                "{when}: recovery point {} reads back {m}",
                                p.id
                            ));
                        }
                        Err(e) => self.violation(format!("{when}: digest of the drill copy: {e}")),
                    }
                    if let Err(e) = rc.test_failover_cleanup(VM, &format!("{op}-tfc")).await {
                        self.violation(format!("{when}: test failover cleanup: {e}"));
                    }
                }
                // Merged away by retention meanwhile.
                Err(SiteError::NotFound(_)) => {}
                Err(e) => self.violation(format!("{when}: test failover to {}: {e}", p.id)),
            }
        }
    }

    /// The whole life cycle: protect, cycles, test failover, failover to an older point,
    /// reverse resync, commit, scratch VMs deleted.
    async fn scenario(&mut self) -> Result<(), Abort> {
        let (ca, cb) = (self.client(Side::A), self.client(Side::B));
        let spec = vm_spec();
        self.step("create the VM at A", Retry::SameOp, async |_| {
            ca.create_vm(VM, &spec).await
        })
        .await?;
        for _ in 0..3 {
            self.random_write().await?;
        }
        self.accept(Side::B, "acc-1").await?;
        let en = enable_to("en-1", &self.b.proc, ReplicationMode::Initial);
        self.step("enable at A", Retry::SameOp, async |_| {
            ca.enable_replication(VM, &en).await
        })
        .await?;
        self.sync("sync-1").await?;
        for c in 0..CYCLES {
            self.random_write().await?;
            self.random_write().await?;
            self.sync(&format!("sync-{}", c + 2)).await?;
        }
        self.drill().await?;
        self.resync_keeping_points().await?;

        // Failover to an older point: the source shut down, replication stopped at both.
        self.step("shutdown at A", Retry::SameOp, async |_| {
            ca.power(VM, PowerAction::Shutdown, "sd-1").await
        })
        .await?;
        self.step("stop at A", Retry::SameOp, async |_| {
            ca.stop_replication(VM, "stop-a").await
        })
        .await?;
        self.step("stop at B", Retry::SameOp, async |_| {
            cb.stop_replication(VM, "stop-b").await
        })
        .await?;
        self.failover().await?;
        self.step("commit at B", Retry::SameOp, async |_| {
            cb.commit(VM, "commit-1").await
        })
        .await?;
        let left = self
            .step("points at B after commit", Retry::SameOp, async |_| {
                cb.recovery_points(VM).await
            })
            .await?;
        if !left.is_empty() {
            self.violation(format!("commit left {} recovery points at B", left.len()));
        }
        for _ in 0..2 {
            self.random_write().await?;
        }

        // Reverse resync into the old source, which must accept it first.
        self.accept(Side::A, "acc-2").await?;
        self.phase = Phase::Reverse;
        let en = enable_to("en-2", &self.a.proc, ReplicationMode::Resync);
        self.step("enable resync at B", Retry::SameOp, async |_| {
            cb.enable_replication(VM, &en).await
        })
        .await?;
        self.sync("rsync-1").await?;
        for _ in 0..2 {
            self.random_write().await?;
        }
        self.sync("rsync-2").await?;
        self.scratch().await
    }

    /// A test failover to an older point at B: its copy has the source's image of then.
    async fn drill(&mut self) -> Result<(), Abort> {
        let cb = self.client(Side::B);
        let points = self
            .step("points at B", Retry::SameOp, async |_| {
                cb.recovery_points(VM).await
            })
            .await?;
        let Some(p) = points.get(points.len() / 2).cloned() else {
            self.violation("no recovery point at B for the test failover");
            return Err(Abort);
        };
        let sel = RecoveryPointSelector::Id(p.id.clone());
        let t = self
            .step("test failover tf-1", Retry::SameOp, async |_| {
                cb.test_failover(VM, &sel, "isolated", "tf-1").await
            })
            .await?;
        if t.recovery_point.id != p.id {
            self.violation(format!(
                "test failover to {} answered point {}",
                p.id, t.recovery_point.id
            ));
        }
        let d = self
            .step("digest of the drill copy", Retry::SameOp, async |_| {
                digests_of(&cb, &t.vm_name).await
            })
            .await?;
        if !self.model.matches(p.time, &d) {
            let m = self.model.describe(p.time, &d);
            self.violation(format!("the drill copy of {} {m}", p.id));
        }
        // Cycles while the drill copy exists: the replica keeps them as received, reads as
        // their newest point, and applies them after the cleanup (at the failover below).
        self.random_write().await?;
        self.sync("sync-drill").await?;
        self.step("test failover cleanup tfc-1", Retry::SameOp, async |_| {
            cb.test_failover_cleanup(VM, "tfc-1").await
        })
        .await?;
        if cb.get_vm(&t.vm_name).await.is_ok() {
            self.violation(format!("{} still exists after the cleanup", t.vm_name));
        }
        Ok(())
    }

    /// A resync into a replica that holds points (its replication stopped there, then accepted
    /// again, so the source's next cycle is refused): the points stay listed and read back
    /// exactly while it runs (every check after a crash) and after it.
    async fn resync_keeping_points(&mut self) -> Result<(), Abort> {
        let cb = self.client(Side::B);
        let before = self
            .step("points at B before the resync", Retry::SameOp, async |_| {
                cb.recovery_points(VM).await
            })
            .await?;
        self.kept = before.into_iter().map(|p| p.id).collect();
        self.step("stop at B before the resync", Retry::SameOp, async |_| {
            cb.stop_replication(VM, "stop-b0").await
        })
        .await?;
        self.accept(Side::B, "acc-r").await?;
        self.random_write().await?;
        self.random_write().await?;
        self.sync("sync-resync").await?;
        // Listed still (a check after a crash reads them back; an armed agent may be running
        // here, so no test failover now).
        let after = self
            .step("points at B after the resync", Retry::SameOp, async |_| {
                cb.recovery_points(VM).await
            })
            .await?;
        let gone: Vec<&String> = self
            .kept
            .iter()
            .filter(|id| !after.iter().any(|p| p.id == **id))
            .collect();
        if !gone.is_empty() {
            let msg = format!("the resync dropped the replica's points {gone:?}");
            self.violation(msg);
        }
        Ok(())
    }

    /// Failover at B to an older point; B then runs the VM with that point's image.
    async fn failover(&mut self) -> Result<(), Abort> {
        let cb = self.client(Side::B);
        let points = self
            .step("points at B", Retry::SameOp, async |_| {
                cb.recovery_points(VM).await
            })
            .await?;
        let Some(p) = points.get(points.len().saturating_sub(3)).cloned() else {
            self.violation("no recovery point at B for the failover");
            return Err(Abort);
        };
        let sel = RecoveryPointSelector::Id(p.id.clone());
        let t0 = Timestamp::now();
        let fo = self
            .step("failover fo-1", Retry::SameOp, async |_| {
                cb.failover(VM, &sel, "fo-1").await
            })
            .await?;
        if fo.recovery_point.id != p.id {
            self.violation(format!(
                "failover to {} answered point {}",
                p.id, fo.recovery_point.id
            ));
        }
        let v = self
            .step("B after failover", Retry::SameOp, async |_| {
                cb.get_vm(VM).await
            })
            .await?;
        if (v.role, v.power) != (Role::Primary, Power::Running) {
            self.violation(format!(
                "after failover B's VM is {:?}/{:?}, not a running primary",
                v.role, v.power
            ));
        }
        let image = self
            .step("B's disks after failover", Retry::SameOp, async |_| {
                read_image(&cb).await
            })
            .await?;
        let d: Vec<String> = image.iter().map(|b| sha256_hex(b)).collect();
        if !self.model.matches(p.time, &d) {
            let m = self.model.describe(p.time, &d);
            self.violation(format!("failover to {}: B's image {m}", p.id));
        }
        self.model.adopt(image, t0, Timestamp::now());
        self.phase = Phase::FailedOver;
        self.kept.clear();
        Ok(())
    }

    /// Creates and deletes scratch VMs at both sites (a delete's answer outlives its VM).
    async fn scratch(&mut self) -> Result<(), Abort> {
        let spec = CreateVm {
            disks: vec![DiskSpec {
                name: "disk0".into(),
                size_bytes: BLOCK,
                format: None,
            }],
            power: Power::Off,
            integration_services: false,
        };
        for side in [Side::A, Side::B] {
            let c = self.client(side);
            let site = self.agent(side).proc.site.clone();
            for i in 1..=SCRATCH {
                let name = format!("scratch-{i}");
                self.step(
                    &format!("create {name} at {site}"),
                    Retry::SameOp,
                    async |_| c.create_vm(&name, &spec).await,
                )
                .await?;
                let op = format!("del-{name}");
                // A delete's answer is recorded after its effect (no VM is left to hold it): a
                // retry after a crash between may answer 404, which the controller takes as
                // done. That the VM is gone is checked below.
                self.step(
                    &format!("delete {name} at {site}"),
                    Retry::SameOp,
                    async |n| match c.delete_vm(&name, &op).await {
                        Err(SiteError::NotFound(_)) if n > 0 => Ok(()),
                        r => r,
                    },
                )
                .await?;
                if c.get_vm(&name).await.is_ok() {
                    self.violation(format!("{name} at {site} still exists after its delete"));
                }
            }
        }
        Ok(())
    }

    /// The explicit wrong-parent case: the replica loses its copy of the VM between cycles.
    async fn wrong_parent(&mut self) -> Result<(), Abort> {
        let ca = self.client(Side::A);
        let spec = vm_spec();
        self.step("create the VM at A", Retry::SameOp, async |_| {
            ca.create_vm(VM, &spec).await
        })
        .await?;
        for _ in 0..3 {
            self.random_write().await?;
        }
        self.accept(Side::B, "acc-1").await?;
        let en = enable_to("en-1", &self.b.proc, ReplicationMode::Initial);
        self.step("enable at A", Retry::SameOp, async |_| {
            ca.enable_replication(VM, &en).await
        })
        .await?;
        self.sync("sync-1").await?;
        self.random_write().await?;
        self.sync("sync-2").await?;

        // B loses its copy; the next cycle names a parent B does not have.
        self.b.proc.kill();
        let dir = self.b.proc.data_dir.join("vms").join(VM);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            self.violation(format!("removing the replica's copy: {e}"));
            return Err(Abort);
        }
        self.restart(Side::B, "after losing its copy").await?;
        let data = self.rng.bytes(BLOCK as usize);
        self.write(0, 3 * BLOCK, data).await?;
        match ca.sync(VM, "wp-1").await {
            Ok(rp) => {
                // Allowed only when the replica resynced: it now has the source's image.
                let cb = self.client(Side::B);
                match digests_of(&cb, VM).await {
                    Ok(d) if self.model.matches(Timestamp::now(), &d) => {}
                    Ok(d) => {
                        let m = self.model.describe(Timestamp::now(), &d);
                        self.violation(format!(
                            "a cycle into a replica that lost its copy was acknowledged as {} \
                             and the replica's image {m}",
                            rp.recovery_point.id
                        ));
                    }
                    Err(e) => self.violation(format!("digest at the replica: {e}")),
                }
            }
            Err(_) => {
                // Refused: the points B has must still be right, and the next sync resyncs.
                self.check("after the refused cycle").await;
                self.sync("wp-2").await?;
            }
        }
        Ok(())
    }

    /// Ends a run: an agent still armed is restarted unarmed, then every invariant is checked.
    async fn finish(&mut self, completed: bool) {
        if self.reap(false).await.is_err() {
            return;
        }
        for side in [Side::A, Side::B] {
            if self.agent(side).armed.is_some() {
                self.agent_mut(side).proc.kill();
                if self.restart(side, "to disarm it").await.is_err() {
                    return;
                }
                self.wait_idle(side).await;
            }
        }
        if completed {
            self.check("at the end").await;
        }
    }
}

struct Outcome {
    label: String,
    point: Option<&'static str>,
    crashed: bool,
    power_cut: bool,
    violations: Vec<String>,
    points_read: u64,
    took: Duration,
}

enum Job {
    WrongParent,
    /// A failpoint, where it is armed, and whether its crash cuts the site's power.
    Point(&'static str, Side, bool),
}

async fn run_one(label: String, armed: Option<(&'static str, Side, u64)>, power: bool) -> Outcome {
    let t0 = Instant::now();
    let mut run = match Run::new(label.clone(), armed, power) {
        Ok(r) => r,
        Err(e) => {
            return Outcome {
                violations: vec![format!("[{label}] agents did not start: {e}")],
                label,
                point: armed.map(|a| a.0),
                crashed: false,
                power_cut: false,
                points_read: 0,
                took: t0.elapsed(),
            };
        }
    };
    let completed = match armed {
        None => run.wrong_parent().await.is_ok(),
        Some(_) => run.scenario().await.is_ok(),
    };
    run.finish(completed).await;
    let out = Outcome {
        label: run.label.clone(),
        point: run.armed.map(|a| a.0),
        crashed: run.crashed,
        power_cut: run.power_cut,
        violations: std::mem::take(&mut run.violations),
        points_read: run.points_read,
        took: t0.elapsed(),
    };
    eprintln!(
        "run {}: {}, {} violation(s), {:.1}s",
        out.label,
        if out.power_cut {
            "crashed at its failpoint, power cut"
        } else if out.crashed {
            "crashed at its failpoint"
        } else {
            "failpoint not reached"
        },
        out.violations.len(),
        out.took.as_secs_f64()
    );
    out
}

async fn worker(jobs: &Mutex<VecDeque<Job>>, outcomes: &Mutex<Vec<Outcome>>) {
    loop {
        let job = jobs.lock().unwrap().pop_front();
        let Some(job) = job else {
            return;
        };
        match job {
            Job::WrongParent => {
                let o = run_one("wrong-parent".into(), None, false).await;
                outcomes.lock().unwrap().push(o);
            }
            Job::Point(p, side, power) => {
                // NAME@1, NAME@2, ... until a run does not reach the point that often.
                for n in 1..=K_MAX {
                    let how = if power { ", power cut" } else { "" };
                    let label = format!("{p}@{n} at {side:?}{how}");
                    let o = run_one(label, Some((p, side, n)), power).await;
                    let crashed = o.crashed;
                    outcomes.lock().unwrap().push(o);
                    if !crashed {
                        break;
                    }
                }
            }
        }
    }
}

#[test]
fn agents_keep_their_promises_across_crashes_at_every_failpoint() {
    let started = Instant::now();
    // `CRASH_ONLY=name,name` runs only those failpoints (to chase one; the totals then fail).
    let only: Option<Vec<String>> = std::env::var("CRASH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    // `CRASH_MODE=kill` or `power`: only that kind of crash.
    let mode = std::env::var("CRASH_MODE").unwrap_or_default();
    let mut queue = VecDeque::new();
    queue.push_back(Job::WrongParent);
    for p in twinsite::fault::ALL {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == p)) {
            continue;
        }
        for side in sides_of(p) {
            for power in [false, true] {
                if mode == if power { "kill" } else { "power" } {
                    continue;
                }
                queue.push_back(Job::Point(p, side, power));
            }
        }
    }
    let jobs = Mutex::new(queue);
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(worker(&jobs, &outcomes));
            });
        }
    });
    let outcomes = outcomes.into_inner().unwrap();

    let mut per_point: BTreeMap<&str, u64> = twinsite::fault::ALL.iter().map(|p| (*p, 0)).collect();
    let mut cuts_per_point = per_point.clone();
    let mut violations = Vec::new();
    for o in &outcomes {
        if o.crashed
            && let Some(p) = o.point
        {
            let counts = if o.power_cut {
                &mut cuts_per_point
            } else {
                &mut per_point
            };
            *counts.entry(p).or_default() += 1;
        }
        violations.extend(o.violations.iter().cloned());
    }
    let crashes = outcomes
        .iter()
        .filter(|o| o.crashed && !o.power_cut)
        .count();
    let cuts = outcomes.iter().filter(|o| o.power_cut).count();
    let unreached: Vec<&str> = twinsite::fault::ALL
        .iter()
        .copied()
        .filter(|p| per_point[p] == 0 || cuts_per_point[p] == 0)
        .collect();
    for v in &violations {
        println!("violation: {v}");
    }
    let counts: Vec<String> = twinsite::fault::ALL
        .iter()
        .map(|p| format!("{p}={}", per_point[p]))
        .collect();
    println!("crashes per failpoint: {}", counts.join(" "));
    let counts: Vec<String> = twinsite::fault::ALL
        .iter()
        .map(|p| format!("{p}={}", cuts_per_point[p]))
        .collect();
    println!("power cuts per failpoint: {}", counts.join(" "));
    println!("failpoints never reached: {unreached:?}");
    println!(
        "recovery points read back by the checks: {}",
        outcomes.iter().map(|o| o.points_read).sum::<u64>()
    );
    println!(
        "{} runs in {:.0}s",
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "injected crashes: {crashes}, power cuts: {cuts}, invariant violations: {}",
        violations.len()
    );
    assert!(crashes >= 100, "only {crashes} injected crashes");
    assert!(cuts >= 100, "only {cuts} power cuts");
    assert_eq!(violations.len(), 0, "invariant violations");
    assert!(
        unreached.is_empty(),
        "failpoints never reached: {unreached:?}"
    );
}
