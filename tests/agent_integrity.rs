//! Replica integrity with real agent processes: a replica holds exactly a point the list
//! promises, whatever was lost, refused, failed or crashed. Crashes and I/O errors are injected
//! through the agent's failpoints (cargo feature `failpoints`).

mod common_agent;

use std::time::{Duration, Instant};

use common_agent::AgentProc;
use twinsite::site::{
    AgentClient, EnableReplication, Power, PowerAction, RecoveryPointSelector, ReplicationMode,
    ReplicationState, Role, SiteProvider,
};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 * 1024;
const VM: &str = "app-01";

fn enable(op: &str, peer: &AgentProc, mode: ReplicationMode) -> EnableReplication {
    common_agent::enable_to(op, peer, mode)
}

/// Writes `len` bytes of a pattern seeded by `seed` at `offset`.
async fn write(c: &AgentClient, offset: u64, len: u64, seed: u8) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    c.write_disk(VM, "disk0", offset, data).await.unwrap();
}

/// A VM of `size` bytes at `a` with data, replicated to `b` with one point.
async fn protect(a: &AgentProc, b: &AgentProc, size: u64) -> (AgentClient, AgentClient) {
    let (ca, cb) = (a.client(), b.client());
    ca.create_vm(VM, &common_agent::vm_spec(size, true))
        .await
        .unwrap();
    write(&ca, 0, 3 * BLOCK, 1).await;
    common_agent::accept_site(&cb, VM, &a.site).await;
    ca.enable_replication(VM, &enable("en-1", b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-0").await.unwrap();
    (ca, cb)
}

/// Every point listed at `cb` reads back as `expected` says (point id -> digest), checked
/// through a drill copy of each.
async fn assert_points(cb: &AgentClient, expected: &[(String, String)]) {
    let listed = cb.recovery_points(VM).await.unwrap();
    for p in &listed {
        let Some((_, want)) = expected.iter().find(|(id, _)| *id == p.id) else {
            continue;
        };
        let t = cb
            .test_failover(
                VM,
                &RecoveryPointSelector::Id(p.id.clone()),
                "isolated",
                &format!("tf-{}", p.id),
            )
            .await
            .unwrap();
        let got = cb.digest(&t.vm_name, "disk0").await.unwrap();
        cb.test_failover_cleanup(VM, &format!("tfc-{}", p.id))
            .await
            .unwrap();
        assert_eq!(&got, want, "point {} does not read back as promised", p.id);
    }
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_lost_replica_is_resynchronized_not_rebuilt_from_one_cycle() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let mut b = AgentProc::start("secondary", root.path());
    let size = 4 * MIB;
    let (ca, _cb) = protect(&a, &b, size).await;

    // The secondary loses its copy of the VM while the primary keeps cycling.
    b.kill();
    std::fs::remove_dir_all(b.data_dir.join("vms").join(VM)).unwrap();
    b.spawn();
    let cb = b.client();
    write(&ca, 40 * BLOCK, BLOCK, 7).await;
    let want = ca.digest(VM, "disk0").await.unwrap();
    ca.sync(VM, "sync-1").await.unwrap();

    // Never "zeros plus the last cycle": the replica holds the whole image again.
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), want);
    let r = ca.get_vm(VM).await.unwrap().replication;
    assert_eq!(r.state, ReplicationState::Replicating);
    let rps = cb.recovery_points(VM).await.unwrap();
    assert_eq!(
        cb.digest(VM, "disk0").await.unwrap(),
        want,
        "newest point {:?}",
        rps.last()
    );
}

#[tokio::test]
async fn an_old_source_that_returns_never_overwrites_the_new_primary() {
    let root = tempfile::tempdir().unwrap();
    let mut a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (_ca, cb) = protect(&a, &b, 4 * MIB).await;

    // The primary site is lost with replication on; the VM fails over unplanned to B, takes
    // writes there, and is powered off.
    a.kill();
    cb.stop_replication(VM, "stop-b").await.unwrap();
    cb.failover(VM, &RecoveryPointSelector::Latest, "fo-1")
        .await
        .unwrap();
    write(&cb, 10 * BLOCK, BLOCK, 9).await;
    cb.power(VM, PowerAction::PowerOff, "off-1").await.unwrap();
    let at_b = cb.digest(VM, "disk0").await.unwrap();

    // The old source comes back, with its outbound replication still on, and writes.
    a.spawn();
    let ca = a.client();
    write(&ca, 20 * BLOCK, BLOCK, 3).await;
    let res = ca.sync(VM, "sync-a").await;
    assert!(res.is_err(), "a cycle into the new primary was accepted");
    let err = ca.get_vm(VM).await.unwrap().replication.last_error;
    assert!(err.is_some(), "the refusal is reported");

    let v = cb.get_vm(VM).await.unwrap();
    assert_eq!(v.role, Role::Primary, "B was turned into a replica");
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), at_b);
}

#[tokio::test]
async fn a_failed_apply_is_finished_before_the_image_is_used_again() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start_with_env(
        "secondary",
        root.path(),
        &[("TWINSITE_FAILPOINT", "replica.apply:error@1")],
    );
    let (ca, cb) = protect(&a, &b, 4 * MIB).await;
    let mut expected = Vec::new();
    for p in cb.recovery_points(VM).await.unwrap() {
        expected.push((p.id, ca.digest(VM, "disk0").await.unwrap()));
    }

    // The first apply fails after its point was recorded: the cycle is not acknowledged.
    write(&ca, 5 * BLOCK, 4 * BLOCK, 2).await;
    let d1 = ca.digest(VM, "disk0").await.unwrap();
    assert!(ca.sync(VM, "sync-1").await.is_err());
    let listed = cb.recovery_points(VM).await.unwrap();
    if let Some(p) = listed.last() {
        expected.push((p.id.clone(), d1.clone()));
    }

    // The next cycle overwrites the same blocks; every listed point must still be exact.
    write(&ca, 6 * BLOCK, 2 * BLOCK, 3).await;
    let d2 = ca.digest(VM, "disk0").await.unwrap();
    let rp2 = ca.sync(VM, "sync-2").await.unwrap().recovery_point;
    expected.push((rp2.id.clone(), d2.clone()));
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d2);
    assert_points(&cb, &expected).await;
}

#[tokio::test]
async fn a_crash_mid_rollback_finishes_the_failover_at_restart() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let mut b = AgentProc::start_with_env(
        "secondary",
        root.path(),
        &[("TWINSITE_FAILPOINT", "failover.rollback@1")],
    );
    let (ca, cb) = protect(&a, &b, 4 * MIB).await;
    write(&ca, 8 * BLOCK, 4 * BLOCK, 4).await;
    let d1 = ca.digest(VM, "disk0").await.unwrap();
    let rp1 = ca.sync(VM, "sync-1").await.unwrap().recovery_point;
    write(&ca, 9 * BLOCK, 4 * BLOCK, 5).await;
    ca.sync(VM, "sync-2").await.unwrap();
    write(&ca, 10 * BLOCK, 4 * BLOCK, 6).await;
    ca.sync(VM, "sync-3").await.unwrap();

    ca.power(VM, PowerAction::Shutdown, "sd-1").await.unwrap();
    ca.stop_replication(VM, "stop-a").await.unwrap();
    cb.stop_replication(VM, "stop-b").await.unwrap();
    let sel = RecoveryPointSelector::Id(rp1.id.clone());
    assert!(
        cb.failover(VM, &sel, "fo-1").await.is_err(),
        "the agent was to die mid-rollback"
    );
    b.env.clear();
    b.kill_and_restart();
    let cb = b.client();

    // At restart the failover is finished: never a replica whose image is a mix.
    let v = cb.get_vm(VM).await.unwrap();
    assert_eq!(
        v.role,
        Role::Primary,
        "the interrupted failover was not finished"
    );
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d1);
    // The retried operation answers its first result.
    let fo = cb.failover(VM, &sel, "fo-1").await.unwrap();
    assert_eq!(fo.recovery_point.id, rp1.id);
}

#[tokio::test]
async fn a_block_past_the_end_of_the_disk_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, _cb) = protect(&a, &b, MIB).await;
    drop(ca);
    let http = reqwest::Client::new();
    let begin = serde_json::json!({
        "sourceSite": "primary", "cycleId": "c-bulk", "bulk": true, "zero": false,
        "disks": [{"name": "disk0", "sizeBytes": MIB}],
        "integrationServices": true, "retentionHours": 24,
    });
    let r = http
        .post(format!("{}/v1/replica/{VM}/begin", b.url))
        .bearer_auth(common_agent::TOKEN)
        .json(&begin)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    for block in [1u64 << 60, u64::MAX, MIB / BLOCK] {
        let data = vec![1u8; BLOCK as usize];
        let mut batch = Vec::new();
        twinsite::replication::frame::push(&mut batch, 0, block, &data);
        let r = http
            .put(format!(
                "{}/v1/replica/{VM}/cycles/c-bulk/blocks?bulk=true",
                b.url
            ))
            .bearer_auth(common_agent::TOKEN)
            .body(batch)
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            400,
            "block {block}: {}",
            r.text().await.unwrap()
        );
    }
    let health = http.get(format!("{}/healthz", b.url)).send().await.unwrap();
    assert!(health.status().is_success());
}

#[tokio::test]
async fn a_damaged_change_journal_forces_a_resync() {
    let root = tempfile::tempdir().unwrap();
    let mut a = AgentProc::start("primary", root.path());
    let mut b = AgentProc::start("secondary", root.path());
    let (ca, _) = protect(&a, &b, 4 * MIB).await;
    write(&ca, 30 * BLOCK, BLOCK, 8).await;

    // A journal generation that does not decode: the tracker cannot vouch for the dirty set.
    a.kill();
    b.kill();
    let track = a.data_dir.join("vms").join(VM).join("track");
    std::fs::write(track.join("journal.000000000000"), [0x5au8; 40]).unwrap();
    a.spawn();
    let ca = a.client();
    wait_for("the source to resynchronize", || {
        let ca = ca.clone();
        async move {
            ca.get_vm(VM).await.unwrap().replication.state == ReplicationState::Resynchronizing
        }
    })
    .await;
    b.spawn();
    let cb = b.client();
    let want = ca.digest(VM, "disk0").await.unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), want);
    assert_eq!(
        ca.get_vm(VM).await.unwrap().replication.state,
        ReplicationState::Replicating
    );
}

#[tokio::test]
async fn orphaned_undo_data_is_removed_and_a_broken_vm_does_not_stop_the_agent() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let mut b = AgentProc::start("secondary", root.path());
    let (ca, cb) = protect(&a, &b, MIB).await;
    write(&ca, 0, BLOCK, 2).await;
    ca.sync(VM, "sync-1").await.unwrap();
    let want = cb.digest(VM, "disk0").await.unwrap();

    b.kill();
    let undo = b.data_dir.join("vms").join(VM).join("undo");
    std::fs::write(undo.join("u999999.0.idx"), 0u64.to_le_bytes()).unwrap();
    std::fs::write(undo.join("u999999.0.dat"), [0u8; 16]).unwrap();
    let broken = b.data_dir.join("vms").join("bad-vm");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("vm.json"), b"{ not json").unwrap();
    b.spawn();
    let cb = b.client();

    assert!(!undo.join("u999999.0.idx").exists());
    assert!(!undo.join("u999999.0.dat").exists());
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), want);
    let list = cb.list_vms().await.unwrap();
    assert!(list.vms.iter().any(|v| v.name == VM));
    assert_eq!(list.broken.len(), 1, "{:?}", list.broken);
    assert_eq!(list.broken[0].name, "bad-vm");
    let e = cb.get_vm("bad-vm").await.unwrap_err().to_string();
    assert!(e.contains("broken"), "{e}");
}

#[tokio::test]
async fn merged_points_fold_their_undo_data_and_still_read_back_exactly() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    ca.create_vm(VM, &common_agent::vm_spec(2 * MIB, true))
        .await
        .unwrap();
    write(&ca, 0, 2 * BLOCK, 1).await;
    // No retention beyond the newest point and the newest app-consistent one: every cycle
    // merges the point before it away, so undo lists grow and are folded.
    let en = EnableReplication {
        recovery_point_retention_hours: 0,
        app_consistent_frequency_hours: 1,
        ..enable("en-1", &b, ReplicationMode::Initial)
    };
    common_agent::accept_site(&cb, VM, &a.site).await;
    ca.enable_replication(VM, &en).await.unwrap();
    // The first cycle (right after the initial transfer) is the app-consistent one.
    ca.sync(VM, "sync-0").await.unwrap();
    let d_app = ca.digest(VM, "disk0").await.unwrap();
    let app = cb
        .recovery_points(VM)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.app_consistent)
        .expect("an app-consistent point");
    let mut last = (String::new(), String::new());
    for i in 0..4u64 {
        write(&ca, (i + 1) * BLOCK, 2 * BLOCK, 10 + i as u8).await;
        let rp = ca.sync(VM, &format!("sync-{}", i + 1)).await.unwrap();
        last = (rp.recovery_point.id, ca.digest(VM, "disk0").await.unwrap());
    }
    let listed: Vec<String> = cb
        .recovery_points(VM)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(listed, vec![app.id.clone(), last.0.clone()]);
    // One folded segment per disk for the newest point: the merged-away points left nothing.
    let undo = b.data_dir.join("vms").join(VM).join("undo");
    let files: Vec<String> = std::fs::read_dir(&undo)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert_points(&cb, &[(app.id.clone(), d_app), last]).await;
}

#[tokio::test]
async fn a_crash_after_an_undo_fold_leaves_every_point_exact() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    // The third retention pass is the first that merges a point away and folds its undo list:
    // the agent dies after the metadata names the folded segment, before the old ones go.
    let mut b = AgentProc::start_with_env(
        "secondary",
        root.path(),
        &[("TWINSITE_FAILPOINT", "replica.retention@3")],
    );
    let (ca, cb) = (a.client(), b.client());
    ca.create_vm(VM, &common_agent::vm_spec(2 * MIB, true))
        .await
        .unwrap();
    write(&ca, 0, 2 * BLOCK, 1).await;
    let en = EnableReplication {
        recovery_point_retention_hours: 0,
        app_consistent_frequency_hours: 1,
        ..enable("en-1", &b, ReplicationMode::Initial)
    };
    common_agent::accept_site(&cb, VM, &a.site).await;
    ca.enable_replication(VM, &en).await.unwrap();
    ca.sync(VM, "sync-0").await.unwrap();
    let d_app = ca.digest(VM, "disk0").await.unwrap();
    write(&ca, BLOCK, 2 * BLOCK, 7).await;
    assert!(
        ca.sync(VM, "sync-1").await.is_err(),
        "the replica was to die"
    );
    b.env.clear();
    b.kill_and_restart();
    let cb2 = b.client();
    drop(cb);
    write(&ca, 3 * BLOCK, BLOCK, 8).await;
    let last = ca.sync(VM, "sync-2").await.unwrap().recovery_point;
    let d_last = ca.digest(VM, "disk0").await.unwrap();
    let app = cb2
        .recovery_points(VM)
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.app_consistent)
        .expect("an app-consistent point");
    let undo = b.data_dir.join("vms").join(VM).join("undo");
    assert_eq!(
        std::fs::read_dir(&undo).unwrap().count(),
        2,
        "orphans swept"
    );
    assert_points(&cb2, &[(app.id, d_app), (last.id, d_last)]).await;
}

/// A `vm.json` save that fails (a disk error, a full disk) leaves the VM as it is on disk: the
/// agent's answer, its memory and a restart all agree that nothing changed.
#[tokio::test]
async fn a_failed_save_leaves_memory_as_the_disk_has_it() {
    let root = tempfile::tempdir().unwrap();
    let mut a = AgentProc::start_with_env(
        "primary",
        root.path(),
        &[("TWINSITE_FAILPOINT", "meta.save:error@1")],
    );
    let ca = a.client();
    ca.create_vm(VM, &common_agent::vm_spec(MIB, true))
        .await
        .unwrap();
    assert_eq!(ca.get_vm(VM).await.unwrap().power, Power::Running);

    let err = ca.power(VM, PowerAction::PowerOff, "off-1").await;
    assert!(
        err.is_err(),
        "the power-off whose save failed answered {err:?}"
    );
    assert_eq!(
        ca.get_vm(VM).await.unwrap().power,
        Power::Running,
        "the agent serves a power state its vm.json does not have"
    );
    // Guest writes go on: the VM still runs.
    write(&ca, 0, BLOCK, 7).await;

    a.kill();
    a.set_env("TWINSITE_FAILPOINT", None);
    a.spawn();
    let ca = a.client();
    assert_eq!(ca.get_vm(VM).await.unwrap().power, Power::Running);
    // The same operation again succeeds once the disk takes it.
    ca.power(VM, PowerAction::PowerOff, "off-2").await.unwrap();
    assert_eq!(ca.get_vm(VM).await.unwrap().power, Power::Off);
}

/// Undo data is checked against the hash recorded with it before it is applied: a point whose
/// undo data was damaged on disk is refused (test failover and failover answer an error that
/// names the damage), never materialized as an image the source never had.
#[tokio::test]
async fn damaged_undo_data_is_refused_not_applied() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = protect(&a, &b, 4 * MIB).await;
    let older = cb.recovery_points(VM).await.unwrap();
    let older = older.last().unwrap().id.clone();
    write(&ca, 0, 2 * BLOCK, 9).await;
    ca.sync(VM, "sync-1").await.unwrap();

    // The newest point's undo data holds the older point's blocks 0 and 1: flip one byte.
    let undo = b.data_dir.join("vms").join(VM).join("undo");
    let mut damaged = 0;
    for e in std::fs::read_dir(&undo).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "dat") && std::fs::metadata(&p).unwrap().len() > 0 {
            let mut bytes = std::fs::read(&p).unwrap();
            bytes[100] ^= 0xff;
            std::fs::write(&p, bytes).unwrap();
            damaged += 1;
        }
    }
    assert_eq!(damaged, 1, "one undo segment with data");

    let sel = RecoveryPointSelector::Id(older.clone());
    let res = cb.test_failover(VM, &sel, "isolated", "tf-damaged").await;
    let err = match res {
        Ok(t) => panic!(
            "a test failover to {older} over damaged undo data answered {} (disk0 {})",
            t.vm_name,
            cb.digest(&t.vm_name, "disk0").await.unwrap()
        ),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("checksum"),
        "the error does not name the damage: {err}"
    );
}
