//! A FailoverPlan moving real VMs: the API server, two agent processes and the controller
//! process. The plan's second group waits behind a manual approval while the first group has
//! already failed over with its data intact; the approval releases it.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use serde_json::json;
use twinsite::api::{FailoverPlan, PlanPhase};

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
