//! A FailoverPlan moving real VMs: the API server, two agent processes and the controller
//! process. The plan's second group waits behind a manual approval while the first group has
//! already failed over with its data intact; the approval releases it.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use serde_json::json;
use twinsite::api::{FailoverPlan, PlanPhase};
use twinsite::site::SiteProvider;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_fails_over_group_after_group_with_an_approval_between() {
    let _serial = one_at_a_time().await;
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
    let st = wait_completed(&plans, "app-dr").await;
    assert_eq!(st.groups_summary.as_deref(), Some("2/2"));

    // The controller leaves the approval annotation alone (a GitOps tool keeps it in Git) and
    // records in status that the value was used.
    let fp = plans.get("app-dr").await.unwrap();
    assert_eq!(
        fp.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("twinsite.io/approve"))
            .map(String::as_str),
        Some("web/go")
    );
    assert_eq!(st.consumed_approvals, vec!["web/go".to_string()]);

    // A second run (back to the primary site): the kept annotation does not pre-approve it.
    plans
        .patch(
            "app-dr",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"targetSite": p}})),
        )
        .await
        .unwrap();
    w.wait_protected("db-01", &p, &s).await;
    let deadline = std::time::Instant::now() + LONG;
    let fp = loop {
        let fp = plans.get("app-dr").await.unwrap();
        let second = fp.status.as_ref().is_some_and(|st| st.jobs.len() == 2);
        if second && waiting(&fp) {
            break fp;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "second run never waited: {:?}",
            fp.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    let st = fp.status.unwrap_or_default();
    let job2 = st.jobs.last().unwrap().name.clone();
    let hint = st
        .conditions
        .iter()
        .find(|c| c.type_ == "WaitingForApproval")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(hint.contains(&format!("web/go@{job2}")), "{hint}");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let web = w.get("web-01").await;
    assert_eq!(
        web.status.and_then(|s| s.active_site).as_deref(),
        Some(s.as_str()),
        "the kept annotation pre-approved the second run"
    );
    annotate(
        &w,
        "fp",
        "app-dr",
        "twinsite.io/approve",
        &format!("web/go@{job2}"),
    );
    w.wait_protected("web-01", &p, &s).await;
    let st = wait_completed(&plans, "app-dr").await;
    assert_eq!(st.jobs.len(), 2);
}

async fn wait_completed(
    plans: &kube::api::Api<FailoverPlan>,
    name: &str,
) -> twinsite::api::FailoverPlanStatus {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let fp = plans.get(name).await.unwrap();
        let st = fp.status.unwrap_or_default();
        let ended = st
            .jobs
            .last()
            .is_some_and(|j| format!("{:?}", j.state) == "Succeeded");
        if st.phase == Some(PlanPhase::Completed) && ended {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "plan never completed: {st:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// A group is done only when its VMs' commits have ended too (commit Automatic): the recovery
/// site's agent dies in the middle of the first group's commit, so the commit fails at its step
/// deadline. The group fails with it, the plan job fails, and the next group is never released,
/// although the VM runs at the target and no job of it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_commit_fails_is_not_done_and_the_next_group_waits() {
    let _serial = one_at_a_time().await;
    let mut w = World::start("plancommit").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    for vm in ["db-01", "web-01"] {
        w.primary.create_vm(vm, true).await;
        w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
            .await;
    }
    for vm in ["db-01", "web-01"] {
        w.wait_protected(vm, &p, &s).await;
    }
    // The recovery site's agent dies as a commit drops its recovery points.
    w.secondary
        .restart_with_env(&[("TWINSITE_FAILPOINT", "commit.points")])
        .await;
    for vm in ["db-01", "web-01"] {
        w.wait_for(vm, "recovery points at the target", |r| {
            r.status
                .as_ref()
                .and_then(|s| s.recovery_points.as_ref())
                .is_some_and(|p| p.count > 0)
        })
        .await;
    }

    let plans = run_plan(
        &w,
        "commit-dr",
        json!({
            "failover": {"type": "Planned", "commit": "Automatic", "stepTimeoutSeconds": 10},
            "groups": [
                {"name": "databases", "vms": ["db-01"]},
                {"name": "web", "vms": ["web-01"]},
            ],
        }),
    )
    .await;

    // db-01 runs at the target; its commit fails at its deadline.
    let db = w
        .wait_for("db-01", "db-01's commit failed", |r| {
            r.status.as_ref().is_some_and(|st| {
                st.jobs.last().is_some_and(|j| {
                    format!("{:?}", j.type_) == "Commit" && format!("{:?}", j.state) == "Failed"
                })
            })
        })
        .await;
    assert_eq!(
        db.status.and_then(|s| s.active_site).as_deref(),
        Some(s.as_str())
    );

    // The plan sees the group fail: it never counts db-01 done, and web-01 is never released.
    let deadline = std::time::Instant::now() + LONG;
    let st = loop {
        let st = plans
            .get("commit-dr")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let group = st.groups.iter().find(|g| g.name == "databases");
        if group.is_some_and(|g| g.state == "Failed" || g.state == "Succeeded") {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the databases group never ended: {st:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    let state = |g: &str, vm: &str| {
        st.groups
            .iter()
            .find(|x| x.name == g)
            .and_then(|x| x.vms.iter().find(|v| v.name == vm))
            .map(|v| v.state.clone())
            .unwrap_or_default()
    };
    assert_eq!(state("databases", "db-01"), "Failed", "{st:?}");
    assert_eq!(state("web", "web-01"), "Pending", "{st:?}");
    assert_eq!(st.phase, Some(PlanPhase::Failed), "{st:?}");
    let web = w.get("web-01").await;
    assert_eq!(
        web.status.and_then(|s| s.active_site).as_deref(),
        Some(p.as_str()),
        "web-01 moved although the group before it was not done"
    );
    w.secondary.restart_with_env(&[]).await;
}

/// A Planned plan moves two VMs; one of them cannot be shut down (no integration services), so
/// its failover fails and the plan job fails with it. The operator powers that VM off and
/// retries the plan (`twinsite.io/retry=<plan job>`): the new run retries the VM's failed
/// failover job (attempt 2) instead of waiting for it forever, and the plan completes with every
/// VM at the target. The controller never edits the annotation (a GitOps tool keeps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_retry_retries_its_failed_vms() {
    let _serial = one_at_a_time().await;
    let w = World::start("planretry").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());

    // A plan waiting for members that do not exist (MembersMissing) is not Ready, but
    // Reconciling: kstatus reads it as in progress, not as done.
    let ghost: FailoverPlan = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": "ghost"},
        "spec": {"targetSite": s, "groups": [{"name": "g", "vms": ["nobody"]}]},
    }))
    .unwrap();
    let plans_api: kube::api::Api<FailoverPlan> =
        kube::api::Api::namespaced(w.client.clone(), &w.ns);
    plans_api.create(&Default::default(), &ghost).await.unwrap();
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let st = plans_api
            .get("ghost")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        let c = |t: &str| {
            st.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| c.status.clone())
        };
        if c("MembersMissing").as_deref() == Some("True") {
            assert_eq!(c("Ready").as_deref(), Some("False"), "{st:?}");
            assert_eq!(c("Reconciling").as_deref(), Some("True"), "{st:?}");
            assert_eq!(c("Stalled").as_deref(), Some("False"), "{st:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "ghost plan: {st:?}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    plans_api
        .delete("ghost", &Default::default())
        .await
        .unwrap();

    let (good, legacy) = ("app-01", "legacy-02");
    w.primary.create_vm(good, true).await;
    w.primary.create_vm(legacy, false).await;
    for vm in [good, legacy] {
        w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
            .await;
    }
    for vm in [good, legacy] {
        w.wait_protected(vm, &p, &s).await;
    }
    let plans = run_plan(
        &w,
        "legacy-dr",
        json!({
            "failover": {"type": "Planned"},
            "groups": [{"name": "apps", "vms": [good, legacy]}],
        }),
    )
    .await;
    let deadline = std::time::Instant::now() + LONG;
    let failed = loop {
        let st = plans
            .get("legacy-dr")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if st.phase == Some(PlanPhase::Failed) {
            break st.jobs.last().unwrap().name.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "plan never failed: {st:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    let r = w.get(legacy).await;
    let vm_job = r.status.as_ref().unwrap().jobs.last().unwrap().clone();
    assert_eq!(format!("{:?}", vm_job.state), "Failed");
    assert_eq!(format!("{:?}", vm_job.type_), "PlannedFailover");

    // The cause is removed (the operator powers the VM off) and the plan is retried.
    w.primary
        .client
        .power(
            legacy,
            twinsite::site::PowerAction::PowerOff,
            "operator-off",
        )
        .await
        .unwrap();
    annotate(&w, "fp", "legacy-dr", "twinsite.io/retry", &failed);

    let r = w
        .wait_for(legacy, "the VM's failover retried and done", |r| {
            r.status.as_ref().is_some_and(|st| {
                st.jobs.iter().any(|j| {
                    j.name == vm_job.name
                        && j.attempt == Some(2)
                        && format!("{:?}", j.state) == "Succeeded"
                })
            })
        })
        .await;
    assert_eq!(
        r.status.as_ref().and_then(|s| s.active_site.as_deref()),
        Some(s.as_str())
    );
    let st = wait_completed(&plans, "legacy-dr").await;
    // The retry is in the plan's status: the failed run, then the run that completed.
    assert_eq!(st.jobs.len(), 2, "{st:?}");
    assert_eq!(st.jobs[0].name, failed);
    assert_eq!(format!("{:?}", st.jobs[0].state), "Failed", "{st:?}");
    assert_eq!(format!("{:?}", st.jobs[1].state), "Succeeded", "{st:?}");
    for vm in [good, legacy] {
        let r = w.get(vm).await;
        assert_eq!(
            r.status.as_ref().and_then(|s| s.active_site.as_deref()),
            Some(s.as_str()),
            "{vm}"
        );
        let vm_state = st
            .groups
            .iter()
            .flat_map(|g| g.vms.iter())
            .find(|v| v.name == vm)
            .map(|v| v.state.clone());
        assert_eq!(vm_state.as_deref(), Some("Succeeded"), "{vm}: {st:?}");
    }
    // The annotation is the user's: the controller left it as it was set.
    let fp = plans.get("legacy-dr").await.unwrap();
    assert_eq!(
        fp.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("twinsite.io/retry"))
            .map(String::as_str),
        Some(failed.as_str())
    );
}
