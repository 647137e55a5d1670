//! Bulk transfers against a real API server, two agent processes and the controller process
//! (tests that start controllers hold `one_at_a_time()`: a controller reconciles every
//! ReplicatedVM of its API server). A replica that loses its copy of the VM while its agent is
//! down: the source resynchronizes it on its own; the ReplicatedVM is never shown Healthy again
//! before the replica holds what the primary holds, and a planned failover afterwards loses
//! nothing. An initial copy shows its progress in status and in `kubectl get rvm`.

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

    let _serial = one_at_a_time().await;
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

/// `kubectl get rvm <vm>` in the world's namespace: the PROGRESS column of its row.
#[cfg(feature = "failpoints")]
fn progress_column(w: &World, vm: &str) -> String {
    let out =
        w.cp.kubectl()
            .args(["get", "rvm", vm, "-n", &w.ns])
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "kubectl get rvm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Columns are aligned under their headers; an unset one is blank.
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let row = lines.next().unwrap_or_default();
    let start = header
        .find(" PROGRESS ")
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("no PROGRESS column:\n{text}"));
    let end = header[start..]
        .find(" AGE")
        .map(|i| start + i + 1)
        .unwrap_or(header.len());
    row.get(start..end.min(row.len()))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The initial copy of a VM whose disk takes several batches reports how far it has come: the
/// source agent in `GET /v1/vms/{vm}`, the ReplicatedVM in `status.replication.progress` and
/// the PROGRESS column of `kubectl get rvm`. The copy is held after its first batch (fault
/// switch `TWINSITE_FAULT_HOLD_BULK`), so the status is seen between 0 and the total, and the
/// progress is gone once the VM is Protected. Needs the agent's fault switches (feature
/// `failpoints`).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_copy_shows_its_progress_until_the_vm_is_protected() {
    use twinsite::api::VmPhase;

    const SIZE: u64 = 16 << 20;
    let _serial = one_at_a_time().await;
    let mut w = World::start("progress").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let hold = w.primary.dir.join("data").join("hold-bulk");
    w.primary
        .restart_with_env(&[("TWINSITE_FAULT_HOLD_BULK", "1")])
        .await;
    std::fs::write(&hold, b"").unwrap();
    let vm = "big-01";
    w.primary.create_vm_of(vm, SIZE, true).await;
    // Data in every block: the copy sends all of them, 64 blocks to a batch.
    for i in 0..SIZE >> 20 {
        let data = pattern(&format!("mib-{i}"), 1 << 20);
        w.primary.write(vm, i << 20, &data).await;
    }
    w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
        .await;

    let r = w
        .wait_for(
            vm,
            "progress between 0 and the total during the copy",
            |r| {
                r.status.as_ref().is_some_and(|st| {
                    st.phase == Some(VmPhase::InitialReplication)
                        && st
                            .replication
                            .as_ref()
                            .and_then(|x| x.progress.as_ref())
                            .is_some_and(|p| 0 < p.done_bytes && p.done_bytes < p.total_bytes)
                })
            },
        )
        .await;
    let shown = r
        .status
        .and_then(|st| st.replication?.progress)
        .expect("progress");
    assert_eq!(shown.total_bytes, SIZE as i64);
    assert_eq!(shown.percent, shown.done_bytes * 100 / shown.total_bytes);
    assert_eq!(shown.summary, format!("{}%", shown.percent));
    // The copy is held: the source reports what status shows.
    let at_source = w.primary.vm(vm).await.expect("the VM at the primary");
    let reported = at_source
        .replication
        .progress
        .expect("progress at the source");
    assert_eq!(
        (reported.done_bytes, reported.total_bytes),
        (shown.done_bytes as u64, shown.total_bytes as u64)
    );
    assert_eq!(progress_column(&w, vm), shown.summary);

    std::fs::remove_file(&hold).unwrap();
    let r = w.wait_protected(vm, &p, &s).await;
    let st = r.status.unwrap();
    assert_eq!(st.replication.and_then(|x| x.progress), None);
    assert_eq!(
        w.primary.vm(vm).await.unwrap().replication.progress,
        None,
        "no transfer runs at the source"
    );
    assert_eq!(progress_column(&w, vm), "", "no progress once Protected");
    assert_eq!(
        steps(&w.get(vm).await, "EnableReplication"),
        [
            ("EnableReplication".into(), "Succeeded".into()),
            ("InitialReplication".into(), "Succeeded".into()),
        ]
    );
}

/// A replica changed behind the agents' backs (three blocks the primary never writes): the
/// source's next comparison finds them, the ReplicatedVM says so (status.replication.divergences,
/// a ReplicaDiverged Event naming the disk and the blocks, the metric the alert reads), the
/// source resynchronizes by itself, and the comparison after that finds the replica equal to
/// the primary again (ReplicaVerified True).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_diverged_replica_is_reported_and_repaired() {
    let _serial = one_at_a_time().await;
    let every: Vec<String> = vec!["--verify-interval-seconds".into(), "1".into()];
    let w = World::start_full("verify", &[], false, [&every, &[]]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "ledger-01";
    w.primary.create_vm(vm, true).await;
    w.primary.write(vm, 0, &pattern("first", 4096)).await;
    w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
        .await;
    w.wait_protected(vm, &p, &s).await;
    let condition = |r: &twinsite::api::ReplicatedVM| {
        r.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "ReplicaVerified")
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    // Cycles on demand (the spec's interval is 30 s).
    let sync = |n: u32| {
        let c = w.primary.client.clone();
        async move {
            c.sync(vm, &format!("verify-sync-{n}")).await.unwrap();
        }
    };
    sync(1).await;
    w.wait_for(vm, "ReplicaVerified True", |r| {
        condition(r).is_some_and(|c| c.0 == "True")
    })
    .await;

    let image = w.secondary.vm_dir(vm).join("disks").join("disk0.img");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    for block in [3u64, 4, 9] {
        std::os::unix::fs::FileExt::write_all_at(&f, b"bit rot", block * 65536 + 17).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    w.primary
        .write(vm, 65536 * 12, &pattern("second", 4096))
        .await;
    sync(2).await;
    // The divergence is counted whether or not a plan ran while the condition was False.
    let r = w
        .wait_for(vm, "a divergence in status", |r| {
            r.status
                .as_ref()
                .and_then(|s| s.replication.as_ref()?.divergences)
                == Some(1)
        })
        .await;
    if let Some((status, reason, message)) = condition(&r).filter(|c| c.0 == "False") {
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Diverged"));
        assert!(message.contains("3 block(s) of disk disk0"), "{message}");
    }
    let events = w.events(vm).await;
    assert!(
        events
            .iter()
            .any(|(reason, note)| reason == "ReplicaDiverged"
                && note.contains("3 block(s) of disk disk0")),
        "{events:?}"
    );
    let metrics = reqwest::get(w.controller.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!(
        "twinsite_replica_divergences{{namespace=\"{}\",name=\"{vm}\"}} 1",
        w.ns
    );
    assert!(
        metrics.lines().any(|l| l == series),
        "{series} missing:\n{metrics}"
    );

    // The next run resynchronizes and compares again.
    sync(3).await;
    let r = w
        .wait_for(vm, "ReplicaVerified True again", |r| {
            condition(r).is_some_and(|c| c.0 == "True")
        })
        .await;
    assert!(condition(&r).unwrap().2.contains("1 divergence(s)"));
    assert_eq!(w.secondary.digest(vm).await, w.primary.digest(vm).await);
}
