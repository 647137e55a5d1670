//! Consistent cuts (`POST /v1/cuts`): one recovery point per listed outbound VM, all captured
//! at the same instant, so a group of VMs fails over to one moment.
//!
//! Every VM of the cut is locked at once while its dirty blocks are captured, so no guest write
//! of any of them interleaves; the captures are then sent as ordinary cycles. Hypervisor
//! domains of the cut are paused first, so none of their guests writes either while their
//! checkpoints are taken (one export each), and resumed as soon as every export is open (the
//! blocks are read while they run on). The pause is bounded by [`PAUSE_LIMIT`] and logged.
//!
//! No path leaves a guest paused: the domains are resumed by the cut once its exports are open,
//! by a watchdog when the limit passes first (an export that hangs), when the cut is dropped
//! (its request went away), and, when the agent died meanwhile, at the agent's next start: the
//! domains of a cut are recorded durably ([`PAUSED_FILE`]) before the first is paused.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{ApiError, ApiResult, Shared, driver, input, with_store};
use crate::fault;
use crate::site::CutRequest;

/// The longest the domains of a cut stay paused: a cut whose exports take longer resumes them
/// and fails.
const PAUSE_LIMIT: Duration = Duration::from_secs(30);

/// In the data directory: the domains a cut is pausing, until they are resumed.
const PAUSED_FILE: &str = "cut-paused.json";

/// The domains a cut paused, resumed exactly once (see the module's comment).
struct Paused {
    st: Shared,
    /// Those paused so far; `None` once resumed (nothing more is paused then).
    names: Mutex<Option<Vec<String>>>,
}

impl Paused {
    /// Pauses each of `domains` that runs; stops at the first failure. Blocking.
    fn pause(&self, domains: &[String]) -> ApiResult<()> {
        let mut names = self
            .names
            .lock()
            .map_err(|_| ApiError::internal("paused set poisoned"))?;
        for vm in domains {
            // Resumed already (the cut was dropped, or the limit passed): pause no more.
            let Some(paused) = names.as_mut() else {
                return Err(ApiError::conflict(
                    "the cut ended while its domains were paused",
                ));
            };
            if self.st.runtime.pause(vm)? {
                paused.push(vm.clone());
            }
        }
        Ok(())
    }

    /// Whether the domains were resumed already.
    fn resumed(&self) -> bool {
        self.names.lock().map_or(true, |n| n.is_none())
    }

    /// Resumes the paused domains (each tried, the first failure answered) unless done already,
    /// then forgets the record. Blocking.
    fn resume(&self) -> ApiResult<()> {
        let Some(names) = self.names.lock().ok().and_then(|mut n| n.take()) else {
            return Ok(());
        };
        let first = resume_each(self.st.runtime.as_ref(), &names);
        if first.is_ok() {
            forget_record(&self.st);
        }
        first
    }
}

/// Resumes what a cut holds when the cut itself is gone without doing so.
struct PauseGuard {
    paused: Arc<Paused>,
    watchdog: tokio::task::JoinHandle<()>,
}

impl PauseGuard {
    fn new(st: &Shared) -> Self {
        let paused = Arc::new(Paused {
            st: st.clone(),
            names: Mutex::new(Some(Vec::new())),
        });
        let p = paused.clone();
        // The limit holds whatever one export does (a backup job that hangs).
        let watchdog = tokio::spawn(async move {
            tokio::time::sleep(PAUSE_LIMIT).await;
            let _ = tokio::task::spawn_blocking(move || {
                if !p.resumed() {
                    tracing::warn!(
                        limit_seconds = PAUSE_LIMIT.as_secs(),
                        "a cut's domains stayed paused too long: resuming them"
                    );
                }
                p.resume()
            })
            .await;
        });
        Self { paused, watchdog }
    }

    /// Resumes the paused domains now.
    async fn resume(&self) -> ApiResult<()> {
        self.watchdog.abort();
        let p = self.paused.clone();
        tokio::task::spawn_blocking(move || p.resume())
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
    }
}

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.watchdog.abort();
        if self.paused.resumed() {
            return;
        }
        let p = self.paused.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = p.resume() {
                tracing::error!(error = %e.message, "resuming the domains of a cut that ended");
            }
        });
    }
}

/// Resumes `names` (each tried, the first failure answered).
fn resume_each(rt: &dyn super::runtime::Runtime, names: &[String]) -> ApiResult<()> {
    let mut first = Ok(());
    for vm in names {
        if let Err(e) = rt.resume(vm) {
            tracing::error!(vm, error = %e.message, "resuming a domain paused for a cut");
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

/// Records durably that the domains `names` are about to be paused for a cut.
fn record(st: &Shared, names: &[String]) -> ApiResult<()> {
    let text = serde_json::to_vec(names).map_err(|e| ApiError::internal(e.to_string()))?;
    super::store::write_atomic(&st.data_dir.join(PAUSED_FILE), &text).map_err(ApiError::io)
}

fn forget_record(st: &Shared) {
    let path = st.data_dir.join(PAUSED_FILE);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(error = %e, "removing the record of a cut's paused domains");
    }
}

/// At the agent's start: resumes every domain that a cut of an earlier agent process paused
/// and did not resume (it died while they were paused). Blocking.
pub fn resume_after_restart(st: &Shared) {
    let path = st.data_dir.join(PAUSED_FILE);
    let names: Vec<String> = match std::fs::read(&path) {
        Ok(text) => serde_json::from_slice(&text).unwrap_or_default(),
        Err(_) => return,
    };
    for vm in &names {
        if !st.runtime.domain(vm).is_ok_and(|d| d.is_some()) {
            continue;
        }
        // (A domain that is not paused is left as it is.)
        match st.runtime.resume(vm) {
            Ok(()) => tracing::warn!(vm, "resumed a domain an earlier agent paused for a cut"),
            Err(e) => {
                tracing::error!(vm, error = %e.message, "resuming a domain an earlier agent paused for a cut");
                return;
            }
        }
    }
    forget_record(st);
}

/// Takes the cut `req` (once per cut id: a repeated id answers the first cut's result).
pub async fn run(st: &Shared, req: CutRequest) -> ApiResult<serde_json::Value> {
    input::cut(&req)?;
    let op = format!("cut/{}", req.cut_id);
    // One cut at a time: a repeated cut id waits for the first and answers its result.
    let _one = st.cut_lock.lock().await;
    let id = op.clone();
    if let Some(v) = with_store(st, move |s| Ok(s.op_lookup(&id))).await? {
        return Ok(v);
    }
    let mut names = req.vms.clone();
    names.sort();
    names.dedup();
    // Candidates now; checked again under the store lock once their cycles are held.
    let names2 = names.clone();
    let candidates: Vec<String> = with_store(st, move |s| {
        Ok(names2
            .into_iter()
            .filter(|n| s.read_vm(n, |r| Ok(driver::cuttable(r))).unwrap_or(false))
            .collect())
    })
    .await?;
    // Sorted order: no two holders of several cycle locks can deadlock.
    let mut guards = Vec::new();
    for vm in &candidates {
        guards.push(driver::cycle_lock(st, vm).lock_owned().await);
    }
    let names3 = candidates.clone();
    let (domains, own): (Vec<String>, Vec<String>) = {
        let flags = with_store(st, move |s| {
            Ok(names3
                .iter()
                .map(|n| {
                    s.read_vm(n, |r| Ok(r.meta.domain.is_some()))
                        .unwrap_or(false)
                })
                .collect::<Vec<_>>())
        })
        .await?;
        let (d, o): (Vec<_>, Vec<_>) = candidates.iter().cloned().zip(flags).partition(|(_, d)| *d);
        (
            d.into_iter().map(|(n, _)| n).collect(),
            o.into_iter().map(|(n, _)| n).collect(),
        )
    };
    // The domains pause first: from then on none of the cut's guests writes.
    let guard = PauseGuard::new(st);
    if !domains.is_empty() {
        let names4 = domains.clone();
        let st4 = st.clone();
        tokio::task::spawn_blocking(move || record(&st4, &names4))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
    }
    let paused_at = Instant::now();
    let (p, names4) = (guard.paused.clone(), domains.clone());
    let pausing = tokio::task::spawn_blocking(move || {
        let res = p.pause(&names4);
        fault::hit("cut.paused");
        res
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    if let Err(e) = pausing {
        guard.resume().await?;
        return Err(e);
    }
    let paused: Vec<String> = guard
        .paused
        .names
        .lock()
        .ok()
        .and_then(|n| n.clone())
        .unwrap_or_default();
    let cut_id = req.cut_id.clone();
    // Every VM of the cut locked at once: no guest write of any of them interleaves.
    let captured = with_store(st, move |s| {
        s.write_many(&own, |recs| {
            let time = jiff::Timestamp::now();
            let mut caps: Vec<driver::Capture> = Vec::new();
            for i in 0..recs.len() {
                if !driver::cuttable(recs[i].1) {
                    continue;
                }
                match driver::capture(recs[i].1, time, Some(cut_id.clone()), false) {
                    Ok(c) => caps.push(c),
                    Err(e) => {
                        // Nothing was sent: every captured set is dirty again.
                        for c in caps {
                            if let Some((_, r)) = recs.iter_mut().find(|(n, _)| *n == c.vm) {
                                r.tracker.abort(c.sealed.clone());
                            }
                        }
                        return Err(e);
                    }
                }
            }
            Ok((time, caps))
        })
    })
    .await;
    let (time, mut captures) = match captured {
        Ok(c) => c,
        Err(e) => {
            guard.resume().await?;
            return Err(e);
        }
    };
    // Each domain's export fixes its point while it is paused.
    let mut opened = Vec::new();
    let mut failure = None;
    for vm in &domains {
        match driver::open_domain_capture(st, vm, false).await {
            Ok(o) => opened.push(o),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        if guard.paused.resumed() || paused_at.elapsed() > PAUSE_LIMIT {
            failure = Some(ApiError::conflict(format!(
                "the checkpoints of the cut's domains took over {}s; their guests were resumed",
                PAUSE_LIMIT.as_secs()
            )));
            break;
        }
    }
    let resumed = guard.resume().await;
    let paused_millis = (!paused.is_empty())
        .then(|| u64::try_from(paused_at.elapsed().as_millis()).unwrap_or(u64::MAX));
    if let Some(ms) = paused_millis {
        tracing::info!(cut = %req.cut_id, domains = ?paused, paused_millis = ms, "domains paused for a consistent cut");
    }
    if let Some(e) = failure.or(resumed.err()) {
        for o in opened {
            driver::abandon_domain_capture(st, o).await;
        }
        for c in captures {
            driver::abandon_capture(st, c).await;
        }
        return Err(e);
    }
    let mut opened = opened.into_iter();
    while let Some(o) = opened.next() {
        let vm = o.vm().to_string();
        if let Err(e) = driver::read_domain_capture(st, o, Some((time, req.cut_id.clone())), false)
            .await
            .map(|c| captures.push(c))
        {
            for o in opened {
                driver::abandon_domain_capture(st, o).await;
            }
            for c in captures {
                driver::abandon_capture(st, c).await;
            }
            return Err(ApiError::peer(format!(
                "cut {} failed: {vm}: {}",
                req.cut_id, e.message
            )));
        }
    }
    if captures.is_empty() {
        return Err(ApiError::conflict(format!(
            "none of the VMs {names:?} replicates outbound from site {} with its initial \
             transfer done",
            st.site
        )));
    }
    let runs = captures.into_iter().map(|c| {
        let st = st.clone();
        async move {
            let vm = c.vm.clone();
            let res = driver::run_once(&st, &vm, Some(c)).await;
            (vm, res)
        }
    });
    let results = futures::future::join_all(runs).await;
    drop(guards);
    let mut points = Vec::new();
    let mut failed = Vec::new();
    for (vm, res) in results {
        match res {
            Ok(rp) => points.push(crate::site::CutPoint {
                vm,
                recovery_point: rp,
            }),
            Err(e) => failed.push(format!("{vm}: {e}")),
        }
    }
    if !failed.is_empty() {
        return Err(ApiError::peer(format!(
            "cut {} failed: {}",
            req.cut_id,
            failed.join("; ")
        )));
    }
    let v = serde_json::to_value(crate::site::CutResult {
        cut_id: req.cut_id.clone(),
        time,
        points,
        paused_millis,
    })
    .map_err(|e| ApiError::io(e.into()))?;
    let v2 = v.clone();
    with_store(st, move |s| s.op_save(&op, &v2)).await?;
    Ok(v)
}
