//! Consistent cuts (`POST /v1/cuts`): one recovery point per listed outbound VM, all captured
//! at the same instant, so a group of VMs fails over to one moment.
//!
//! Every VM of the cut is locked at once while its dirty blocks are captured, so no guest write
//! of any of them interleaves; the captures are then sent as ordinary cycles.

use super::{ApiError, ApiResult, Shared, driver, input, with_store};
use crate::site::CutRequest;

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
    let cut_id = req.cut_id.clone();
    // Every VM of the cut locked at once: no guest write of any of them interleaves.
    let (time, captures) = with_store(st, move |s| {
        s.write_many(&candidates, |recs| {
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
    .await?;
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
    })
    .map_err(|e| ApiError::io(e.into()))?;
    let v2 = v.clone();
    with_store(st, move |s| s.op_save(&op, &v2)).await?;
    Ok(v)
}
