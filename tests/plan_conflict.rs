//! FailoverPlan conflicts shown on the ReplicatedVM itself, with the real API server, two agent
//! processes and the controller process: a VM selected by two plans, and a VM whose own
//! spec.activeSite disagrees with its plan's targetSite, each show condition Conflict (with a
//! Warning Event), start no job and stay where they run; once the cause is fixed the condition
//! clears and the plan moves the VM.

#[path = "controller_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use twinsite::api::{FailoverPlan, ReplicatedVM};

/// The VM's Conflict condition as (status, reason, message).
fn conflict(r: &ReplicatedVM) -> Option<(String, String, String)> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Conflict")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn conflict_true(r: &ReplicatedVM) -> bool {
    cond(r, "Conflict")
}

async fn create_plan(w: &World, name: &str, target: &str, vm: &str) {
    let plans: Api<FailoverPlan> = Api::namespaced(w.client.clone(), &w.ns);
    let fp: FailoverPlan = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": name},
        "spec": {
            "targetSite": target,
            "failover": {"type": "Planned"},
            "groups": [{"name": "all", "vms": [vm]}],
        },
    }))
    .unwrap();
    plans.create(&PostParams::default(), &fp).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_shows_on_the_vm_nothing_moves_and_the_fix_clears_it() {
    let w = World::start("planconf").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    for vm in ["both-01", "own-01"] {
        w.primary.create_vm(vm, true).await;
        w.create_rvm(vm, json!({"type": "Planned"})).await;
    }
    for vm in ["both-01", "own-01"] {
        w.wait_protected(vm, &p, &s).await;
    }
    // own-01 pins itself to the primary site.
    w.patch_spec("own-01", json!({"activeSite": p})).await;
    w.wait_for("own-01", "own-01 Ready with its own activeSite", ready)
        .await;

    // both-01 in two plans; own-01 in a plan whose target is not its own activeSite. Every
    // plan targets the secondary site: without the conflicts, both VMs would move.
    create_plan(&w, "plan-a", &s, "both-01").await;
    create_plan(&w, "plan-b", &s, "both-01").await;
    create_plan(&w, "plan-c", &s, "own-01").await;

    // Each VM shows its own cause, naming the plans (or the sites) and the fix.
    let own_site = format!("spec.activeSite {p}");
    let want: [(&str, &str, &[&str]); 2] = [
        (
            "both-01",
            "SelectedByTwoPlans",
            &["plan-a", "plan-b", "remove it"],
        ),
        (
            "own-01",
            "ActiveSiteDisagrees",
            &[&own_site, "plan-c", "unset spec.activeSite"],
        ),
    ];
    for (vm, want_reason, words) in want {
        let r = w
            .wait_for(vm, &format!("Conflict on {vm}"), conflict_true)
            .await;
        let (_, reason, message) = conflict(&r).unwrap();
        assert_eq!(reason, want_reason, "{vm}");
        assert!(words.iter().all(|x| message.contains(x)), "{vm}: {message}");
        assert!(!ready(&r), "{vm} in conflict is Ready");
    }

    // Each conflict is announced by a Warning Event on the VM.
    for vm in ["both-01", "own-01"] {
        let deadline = std::time::Instant::now() + LONG;
        while !w.events(vm).await.iter().any(|(r, _)| r == "Conflict") {
            assert!(
                std::time::Instant::now() < deadline,
                "no Conflict event on {vm}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    // Nothing moves: let several site listings and reconciles go by, then look.
    tokio::time::sleep(Duration::from_secs(15)).await;
    for vm in ["both-01", "own-01"] {
        let r = w.get(vm).await;
        assert_eq!(
            jobs(&r),
            [("EnableReplication".to_string(), "Succeeded".to_string())],
            "{vm} started a job while in conflict"
        );
        assert_eq!(
            r.status.as_ref().and_then(|s| s.active_site.as_deref()),
            Some(p.as_str())
        );
        assert!(conflict_true(&r), "{vm}: {:?}", conflict(&r));
        assert_eq!(
            w.agent(&p).vm(vm).await.map(|v| v.power),
            Some(twinsite::site::Power::Running),
            "{vm} does not run where it ran"
        );
    }

    // The fixes: plan-b goes, own-01 stops pinning itself.
    let plans: Api<FailoverPlan> = Api::namespaced(w.client.clone(), &w.ns);
    plans
        .delete("plan-b", &DeleteParams::default())
        .await
        .unwrap();
    w.patch_spec("own-01", json!({"activeSite": null})).await;

    for vm in ["both-01", "own-01"] {
        let r = w
            .wait_for(vm, &format!("Conflict cleared on {vm}"), |r| {
                conflict(r).is_some_and(|(st, reason, _)| st == "False" && reason == "NoConflict")
            })
            .await;
        assert!(!cond(&r, "Stalled"), "{vm} still stalled: {:?}", r.status);
    }
    // And the plans move them.
    for vm in ["both-01", "own-01"] {
        w.wait_protected(vm, &s, &p).await;
    }
}
