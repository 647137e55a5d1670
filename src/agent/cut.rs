//! Consistent cuts (`POST /v1/cuts`): one recovery point per listed outbound VM, all captured
//! at the same instant, so a group of VMs fails over to one moment.
//!
//! Every VM of the cut is locked at once while its dirty blocks are captured, so no guest write
//! of any of them interleaves; the captures are then sent as ordinary cycles. Hypervisor
//! domains of the cut are paused first, so none of their guests writes either while their
//! checkpoints are taken (one export each), and resumed as soon as every export is open (the
//! blocks are read while they run on). The pause is bounded by [`PAUSE_LIMIT`] and logged.

use std::time::{Duration, Instant};

use super::{ApiError, ApiResult, Shared, driver, input, with_store};
use crate::site::CutRequest;

/// The longest the domains of a cut stay paused: a cut whose exports take longer resumes them
/// and fails.
const PAUSE_LIMIT: Duration = Duration::from_secs(30);

/// Runs a runtime call off the async threads.
async fn blocking<T: Send + 'static>(
    st: &Shared,
    f: impl FnOnce(&dyn super::runtime::Runtime) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || f(st.runtime.as_ref()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Resumes the paused domains `paused` (each tried, the first failure answered).
async fn resume_all(st: &Shared, paused: &[String]) -> ApiResult<()> {
    let names = paused.to_vec();
    blocking(st, move |rt| {
        let mut first = Ok(());
        for vm in &names {
            if let Err(e) = rt.resume(vm) {
                tracing::error!(vm, error = %e.message, "resuming a domain paused for a cut");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    })
    .await
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
    let names4 = domains.clone();
    let paused_at = Instant::now();
    let pausing = blocking(st, move |rt| {
        let mut paused = Vec::new();
        for vm in &names4 {
            match rt.pause(vm) {
                Ok(true) => paused.push(vm.clone()),
                Ok(false) => {}
                Err(e) => return Ok((paused, Some(e))),
            }
        }
        Ok((paused, None))
    })
    .await?;
    let paused = pausing.0;
    if let Some(e) = pausing.1 {
        resume_all(st, &paused).await?;
        return Err(e);
    }
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
                match driver::capture(recs[i].1, time, Some(cut_id.clone())) {
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
            resume_all(st, &paused).await?;
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
        if paused_at.elapsed() > PAUSE_LIMIT {
            failure = Some(ApiError::conflict(format!(
                "the checkpoints of the cut's domains took over {}s; their guests were resumed",
                PAUSE_LIMIT.as_secs()
            )));
            break;
        }
    }
    let resumed = resume_all(st, &paused).await;
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
        if let Err(e) = driver::read_domain_capture(st, o, Some((time, req.cut_id.clone())))
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
