//! A FailoverPlan moving real VMs: the API server, two agent processes and the controller
//! process. The plan's second group waits behind a manual approval while the first group has
//! already failed over with its data intact; the approval releases it.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use twinsite::api::{FailoverPlan, PlanPhase};

/// Creates plan `name` (`spec` without targetSite) targeting the primary site, where every VM
/// runs, then turns it to the secondary site: the plan job starts.
async fn run_plan(w: &World, name: &str, mut spec: serde_json::Value) -> Api<FailoverPlan> {
    let plans: Api<FailoverPlan> = Api::namespaced(w.client.clone(), &w.ns);
    spec["targetSite"] = json!(w.primary.site);
    let fp: FailoverPlan = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    plans.create(&PostParams::default(), &fp).await.unwrap();
    let target = json!({"spec": {"targetSite": w.secondary.site}});
    plans
        .patch(name, &PatchParams::default(), &Patch::Merge(target))
        .await
        .unwrap();
    plans
}

/// `kubectl annotate fp <plan> twinsite.io/approve=<what>`.
fn approve(w: &World, plan: &str, what: &str) {
    let value = format!("twinsite.io/approve={what}");
    let args = ["annotate", "fp", plan, "-n", &w.ns, &value];
    let out = w.cp.kubectl().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl annotate: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_fails_over_group_after_group_with_an_approval_between() {
    let w = World::start("plane2e").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    for vm in ["db-01", "web-01"] {
        w.primary.create_vm(vm, true).await;
        w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
            .await;
    }
    for vm in ["db-01", "web-01"] {
        w.wait_protected(vm, &p, &s).await;
    }
    let data = pattern("database-rows", 16384);
    w.primary.write("db-01", 4096, &data).await;

    let plans = run_plan(
        &w,
        "app-dr",
        json!({
            "failover": {"type": "Planned"},
            "groups": [
                {"name": "databases", "vms": ["db-01"]},
                {"name": "web", "vms": ["web-01"],
                 "preActions": [{"name": "go", "manualApproval": {"message": "check the databases"}}]},
            ],
        }),
    )
    .await;

    // The databases move first, with every acknowledged write.
    w.wait_protected("db-01", &s, &p).await;
    assert_eq!(
        w.secondary.digest("db-01").await,
        expected_digest(&[(4096, &data)]),
        "planned failover lost data"
    );

    // The web group waits for its approval: its VM has not moved.
    let waiting = |fp: &FailoverPlan| {
        fp.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "WaitingForApproval" && c.status == "True")
        })
    };
    let deadline = std::time::Instant::now() + LONG;
    while !waiting(&plans.get("app-dr").await.unwrap()) {
        assert!(std::time::Instant::now() < deadline, "plan never waited");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let web = w.get("web-01").await;
    assert_eq!(
        web.status.and_then(|s| s.active_site).as_deref(),
        Some(p.as_str()),
        "web-01 moved before its group was approved"
    );

    approve(&w, "app-dr", "web/go");

    w.wait_protected("web-01", &s, &p).await;
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let fp = plans.get("app-dr").await.unwrap();
        let st = fp.status.unwrap_or_default();
        if st.phase == Some(PlanPhase::Completed) {
            assert_eq!(st.groups_summary.as_deref(), Some("2/2"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "plan never completed: {st:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

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
