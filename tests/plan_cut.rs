//! A FailoverPlan's consistent cut with real VMs: the API server, two agent processes and the
//! controller process. An Unplanned plan from LatestProcessed fails every VM over from one cut,
//! whatever group it is in: writes made before the cut are at the target, a write made after
//! it (to a VM of the second group, still running) is not.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use serde_json::json;

/// The newest job of type `t` of the VM.
fn newest_job(r: &twinsite::api::ReplicatedVM, t: &str) -> Option<twinsite::api::Job> {
    r.status
        .as_ref()?
        .jobs
        .iter()
        .rev()
        .find(|j| format!("{:?}", j.type_) == t)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplanned_plan_from_latest_processed_fails_over_from_one_consistent_cut() {
    use twinsite::site::SiteProvider;
    let w = World::start("plancut").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vms = ["db-01", "app-01", "web-01"];
    for vm in vms {
        w.primary.create_vm(vm, true).await;
        w.create_rvm(vm, json!({"type": "Planned"})).await;
    }
    for vm in vms {
        w.wait_protected(vm, &p, &s).await;
    }
    // Guest writes to every VM before the plan runs: all of them are in the cut.
    let data: Vec<Vec<u8>> = vms
        .iter()
        .map(|vm| pattern(&format!("{vm}-before-the-cut"), 12288))
        .collect();
    for (vm, d) in vms.iter().zip(&data) {
        w.primary.write(vm, 8192, d).await;
    }

    let plans = run_plan(
        &w,
        "cut-dr",
        json!({
            // Manual commit keeps the recovery points at the target to look at.
            "failover": {"type": "Unplanned", "recoveryPoint": "LatestProcessed",
                         "shutdownSource": true, "commit": "Manual"},
            "groups": [
                {"name": "data", "vms": ["db-01"]},
                {"name": "front", "vms": ["app-01", "web-01"],
                 "preActions": [{"name": "go", "manualApproval": {"message": "data is up"}}]},
            ],
        }),
    )
    .await;

    // The data group fails over first; its ConsistentCut step took the cut for every VM.
    w.wait_for("db-01", "db-01 failed over", |r| {
        r.status.as_ref().and_then(|s| s.active_site.as_deref()) == Some(s.as_str())
            && newest_job(r, "UnplannedFailover")
                .is_some_and(|j| format!("{:?}", j.state) == "Succeeded")
    })
    .await;
    // A write to web-01 after the cut (web-01 still runs at the primary: its group waits for
    // the approval): its failover comes back from the cut, so this write is not at the target.
    let late = pattern("written-after-the-cut", 4096);
    w.primary.write("web-01", 65536, &late).await;
    approve(&w, "cut-dr", "front/go");

    let plan_cut = plans
        .get("cut-dr")
        .await
        .unwrap()
        .status
        .and_then(|st| st.jobs.last().and_then(|j| j.cut_id.clone()))
        .expect("the plan job names a cut");
    for (vm, d) in vms.iter().zip(&data) {
        let r = w
            .wait_for(vm, &format!("{vm} failed over from the cut"), |r| {
                r.status.as_ref().and_then(|s| s.active_site.as_deref()) == Some(s.as_str())
                    && newest_job(r, "UnplannedFailover")
                        .is_some_and(|j| format!("{:?}", j.state) == "Succeeded")
            })
            .await;
        let job = newest_job(&r, "UnplannedFailover").unwrap();
        assert_eq!(
            job.cut_id.as_deref(),
            Some(plan_cut.as_str()),
            "{vm}: {job:?}"
        );
        let st = steps(&r, "UnplannedFailover");
        assert_eq!(
            st[0],
            ("ConsistentCut".to_string(), "Succeeded".to_string()),
            "{vm}: {st:?}"
        );
        let rp = job.recovery_point.clone().expect("failover recovery point");
        let msg = job.steps[0].message.clone().unwrap_or_default();
        assert!(msg.contains(&rp) && msg.contains(&plan_cut), "{vm}: {msg}");
        // The point at the target (not committed yet) was made by the cut.
        let points = w.secondary.client.recovery_points(vm).await.unwrap();
        let point = points
            .iter()
            .find(|x| x.id == rp)
            .unwrap_or_else(|| panic!("{vm}: {rp} not at the target: {points:?}"));
        assert_eq!(point.cut_id.as_deref(), Some(plan_cut.as_str()), "{vm}");
        // The VM runs at the target with everything written before the cut, nothing after.
        assert_eq!(
            w.secondary.digest(vm).await,
            expected_digest(&[(8192, d)]),
            "{vm}: the disk at the target is not the cut's"
        );
    }
}
