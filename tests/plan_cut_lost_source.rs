//! A FailoverPlan's consistent cut when the source site is gone (a real disaster): the API
//! server, two agent processes and the controller process. The primary agent is stopped before
//! the plan runs, so no cut can be taken: the site listing shows the source unreachable and an
//! operator declares it lost, each VM's ConsistentCut step is Skipped naming the declaration
//! (nothing calls a lost site), and the unplanned failover goes on from LatestProcessed without a
//! cutId.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_source_site_the_cut_fails_and_the_plan_failover_goes_on() {
    let mut w = World::start("plancutlost").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vms = ["db-01", "web-01"];
    for vm in vms {
        w.primary.create_vm(vm, true).await;
        w.create_rvm(vm, json!({"type": "Planned"})).await;
    }
    for vm in vms {
        w.wait_protected(vm, &p, &s).await;
    }
    // The primary site is lost, and the controller has noticed (its Site is not Ready).
    w.primary.stop();
    let sites: kube::api::Api<twinsite::api::Site> = kube::api::Api::all(w.client.clone());
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let site = sites.get(&p).await.unwrap();
        let down = site.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "False")
        });
        if down {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "site {p} still Ready");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // An operator declares it lost: only then may the VMs start without it being fenced.
    declare_lost(&w, &p, true).await;

    let plans = run_plan(
        &w,
        "lost-dr",
        json!({
            "failover": {"type": "Unplanned", "recoveryPoint": "LatestProcessed",
                         "shutdownSource": true, "commit": "Automatic"},
            "groups": [
                {"name": "data", "vms": ["db-01"]},
                {"name": "front", "vms": ["web-01"]},
            ],
        }),
    )
    .await;
    // The plan job names a cut (none can be taken without the primary site).
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let st = plans
            .get("lost-dr")
            .await
            .unwrap()
            .status
            .unwrap_or_default();
        if st.jobs.last().is_some_and(|j| j.cut_id.is_some()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no plan job with a cut: {st:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    for vm in vms {
        let r = w
            .wait_for(vm, &format!("{vm} failed over without its source"), |r| {
                r.status.as_ref().and_then(|s| s.active_site.as_deref()) == Some(s.as_str())
                    && r.status.as_ref().is_some_and(|st| {
                        st.jobs.iter().any(|j| {
                            format!("{:?}", j.type_) == "UnplannedFailover"
                                && format!("{:?}", j.state) == "Succeeded"
                        })
                    })
            })
            .await;
        let st = r.status.clone().unwrap();
        let job = st
            .jobs
            .iter()
            .rev()
            .find(|j| format!("{:?}", j.type_) == "UnplannedFailover")
            .unwrap();
        let cut = &job.steps[0];
        assert_eq!(cut.name, "ConsistentCut", "{vm}: {job:?}");
        assert_eq!(format!("{:?}", cut.state), "Skipped", "{vm}: {job:?}");
        let msg = cut.message.clone().unwrap_or_default();
        assert!(
            msg.contains(&p) && msg.contains("declared lost"),
            "{vm}: {msg}"
        );
        assert_eq!(job.cut_id, None, "{vm}: no cut was used");
        let start = job.steps.last().unwrap();
        assert_eq!(
            (start.name.as_str(), format!("{:?}", start.state).as_str()),
            ("StartAtTarget", "Succeeded"),
            "{vm}: {job:?}"
        );
        assert_eq!(
            w.secondary.vm(vm).await.map(|v| v.power),
            Some(twinsite::site::Power::Running),
            "{vm} does not run at the target"
        );
    }
}
