//! A drill (test failover) and its cleanup while replication keeps advancing; replication
//! disabled leaves a status with nothing stale in it; deletion.

#[path = "controller_common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Id of the newest recovery point at the replica, from the agent.
async fn newest_rp(w: &World, vm: &str) -> Option<String> {
    w.secondary
        .vm(vm)
        .await?
        .recovery_points
        .latest
        .map(|p| p.id)
}

/// Waits until the replica holds a recovery point newer than `after` (a write makes the next
/// cycle carry data).
async fn replication_advances(w: &World, vm: &str, after: Option<String>, tag: &str) {
    w.primary.write(vm, 8192, &pattern(tag, 4096)).await;
    let deadline = Instant::now() + LONG;
    loop {
        let now = newest_rp(w, vm).await;
        if now.is_some() && now > after {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "replication did not advance ({tag})"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drill_and_cleanup_with_replication_running() {
    let w = World::start("drill").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "db-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(vm, json!({"type": "Planned"})).await;
    w.wait_protected(vm, &p, &s).await;

    w.patch_spec(
        vm,
        json!({"testFailover": {"enabled": true, "network": "drill-net"}}),
    )
    .await;
    let r = w
        .wait_for(vm, "drill copy running", |r| {
            r.status.as_ref().is_some_and(|s| {
                s.test_failover
                    .as_ref()
                    .is_some_and(|t| t.state == "Running")
                    && s.last_drill
                        .as_ref()
                        .is_some_and(|d| d.result == "Succeeded")
            }) && ready(r)
        })
        .await;
    let st = r.status.clone().unwrap();
    let tf = st.test_failover.unwrap();
    assert_eq!(tf.site, s);
    let copy = w
        .secondary
        .vm(&tf.vm_name)
        .await
        .expect("drill copy at the secondary");
    assert_eq!(copy.power, twinsite::site::Power::Running);
    assert_eq!(copy.role, twinsite::site::Role::TestCopy);
    let drill = st.last_drill.unwrap();
    // The real VM still runs at the primary and replicates.
    assert_eq!(
        w.primary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    let before = newest_rp(&w, vm).await;
    replication_advances(&w, vm, before, "during-drill").await;

    w.patch_spec(vm, json!({"testFailover": {"enabled": false}}))
        .await;
    let r = w
        .wait_for(vm, "drill cleaned up", |r| {
            r.status.as_ref().is_some_and(|s| s.test_failover.is_none()) && ready(r)
        })
        .await;
    let st = r.status.clone().unwrap();
    assert_eq!(st.last_drill.as_ref(), Some(&drill), "lastDrill kept");
    assert!(w.secondary.vm(&tf.vm_name).await.is_none(), "copy deleted");
    let types: Vec<String> = jobs(&r).into_iter().map(|j| j.0).collect();
    assert_eq!(
        types,
        ["EnableReplication", "TestFailover", "TestFailoverCleanup"]
    );
    let before = newest_rp(&w, vm).await;
    replication_advances(&w, vm, before, "after-drill").await;
    assert_eq!(format!("{:?}", st.phase.unwrap()), "Protected");

    // Replication disabled: status says so and nothing more (the merge patch removes the
    // health, RPO and direction it showed while replicating).
    w.patch_spec(vm, json!({"replication": {"enabled": false}}))
        .await;
    let r = w
        .wait_for(vm, "Unprotected", |r| {
            r.status
                .as_ref()
                .is_some_and(|s| format!("{:?}", s.phase) == "Some(Unprotected)")
                && ready(r)
        })
        .await;
    let rep = r.status.as_ref().and_then(|s| s.replication.clone());
    assert_eq!(
        rep.map(|x| (
            format!("{:?}", x.state),
            x.source_site,
            x.target_site,
            x.health,
            x.rpo_seconds,
            x.last_sync_time
        )),
        Some(("Disabled".into(), None, None, None, None, None))
    );

    // Deleting the ReplicatedVM stops replication and removes the replica; the VM keeps
    // running where it runs.
    w.rvms().delete(vm, &Default::default()).await.unwrap();
    let deadline = Instant::now() + LONG;
    while w.rvms().get_opt(vm).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "finalizer never finished");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(w.secondary.vm(vm).await.is_none(), "replica removed");
    let at_primary = w.primary.vm(vm).await.expect("the VM stays");
    assert_eq!(at_primary.power, twinsite::site::Power::Running);
    assert_eq!(
        at_primary.replication.state,
        twinsite::site::ReplicationState::Disabled
    );
}
