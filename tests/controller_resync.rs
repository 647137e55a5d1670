//! A replica that loses its copy of the VM while its agent is down, against a real API server,
//! two agent processes and the controller process (its own test binary: a controller
//! reconciles every ReplicatedVM of its API server). The source resynchronizes the replica on
//! its own; the ReplicatedVM is never shown Healthy again before the replica holds what the
//! primary holds, and a planned failover afterwards loses nothing.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use serde_json::json;
use twinsite::site::SiteProvider;

/// The replica's copy of the VM is lost while its agent is down. The source resynchronizes
/// it (the replica refuses the next cycle); the ReplicatedVM never shows the VM Healthy again
/// before the replica holds what the primary holds, and a planned failover afterwards loses
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_replica_is_resynchronized_before_healthy_and_a_planned_failover_loses_nothing() {
    use twinsite::api::{ReplicationHealth, ReplicationState};

    let mut w = World::start("resync").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "db-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
        .await;
    w.wait_protected(vm, &p, &s).await;

    // One cycle reaches the replica.
    let first = pattern("before-the-loss", 4096);
    w.primary.write(vm, 0, &first).await;
    let want = expected_digest(&[(0, &first)]);
    let deadline = std::time::Instant::now() + LONG;
    while w.secondary.digest(vm).await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "no cycle reached the replica"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }

    // The secondary loses its copy of the VM while its agent is down; the primary writes
    // meanwhile (nothing but a resync can bring that to the new replica).
    w.secondary.stop();
    let dir = w.secondary.vm_dir(vm);
    assert!(dir.is_dir(), "{} holds the replica", dir.display());
    std::fs::remove_dir_all(&dir).unwrap();
    let second = pattern("written-while-the-replica-was-lost", 65536);
    w.primary.write(vm, 131072, &second).await;
    let want = expected_digest(&[(0, &first), (131072, &second)]);
    assert_eq!(w.primary.digest(vm).await, want);
    w.secondary.restart().await;

    // Until the replica holds the primary's data again, the VM is never shown Healthy again.
    let healthy = |r: &twinsite::api::ReplicatedVM| {
        r.status
            .as_ref()
            .and_then(|s| s.replication.as_ref())
            .is_some_and(|x| {
                x.state == ReplicationState::Replicating
                    && x.health == Some(ReplicationHealth::Healthy)
            })
    };
    let mut seen = Vec::new();
    let mut troubled = false;
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let r = w.get(vm).await;
        let shown = r
            .status
            .as_ref()
            .and_then(|s| s.replication.as_ref())
            .map(|x| (x.state, x.health));
        if seen.last() != Some(&shown) {
            seen.push(shown);
        }
        if !healthy(&r) {
            troubled = true;
        } else if troubled {
            // Healthy again: the replica's newest point is the primary's disk.
            let at_secondary = w.secondary.client.digest(vm, DISK).await;
            assert_eq!(
                at_secondary.as_ref().map_err(|e| e.to_string()),
                Ok(&want),
                "Healthy again before the replica caught up; status went {seen:?}"
            );
            break;
        }
        if !troubled
            && w.secondary.vm(vm).await.is_some()
            && w.secondary.client.digest(vm, DISK).await.ok().as_deref() == Some(want.as_str())
        {
            // The resync was over before any listing showed it: Healthy throughout, and the
            // replica is the primary's disk.
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica was never resynchronized; status went {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    println!("replication status went {seen:?}");
    let r = w.wait_protected(vm, &p, &s).await;
    assert!(healthy(&r), "{:?}", r.status);
    assert_eq!(w.secondary.digest(vm).await, want);
    assert_eq!(
        jobs(&r),
        [("EnableReplication".into(), "Succeeded".into())],
        "the source resynchronized on its own; no job was needed"
    );

    // A planned failover now proves nothing was lost.
    w.patch_spec(vm, json!({"activeSite": s})).await;
    let r = w.wait_protected(vm, &s, &p).await;
    assert_eq!(
        steps(&r, "PlannedFailover"),
        [
            ("ShutdownSource".into(), "Succeeded".into()),
            ("SyncRemaining".into(), "Succeeded".into()),
            ("VerifyDigests".into(), "Succeeded".into()),
            ("StopReplication".into(), "Succeeded".into()),
            ("StartAtTarget".into(), "Succeeded".into()),
        ]
    );
    assert_eq!(w.secondary.digest(vm).await, want);
    assert_eq!(
        w.secondary.read(vm, 131072, second.len() as u64).await,
        second
    );
    assert_eq!(
        w.primary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Off
    );
}
