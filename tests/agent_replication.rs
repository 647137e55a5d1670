//! Replication between two real agent processes on loopback.

mod common_agent;

use std::time::{Duration, Instant};

use common_agent::AgentProc;
use twinsite::site::{
    AgentClient, CreateVm, DiskSpec, EnableReplication, Power, PowerAction, RecoveryPointSelector,
    ReplicationMode, Role, SiteProvider,
};

const MIB: u64 = 1 << 20;
const VM: &str = "web-01";

fn spec(size: u64) -> CreateVm {
    common_agent::vm_spec(size, true)
}

fn enable(op: &str, peer: &AgentProc, mode: ReplicationMode) -> EnableReplication {
    EnableReplication {
        interval_seconds: 30,
        ..common_agent::enable_to(op, peer, mode)
    }
}

/// Writes a pseudo-random pattern to a few places of the disk.
async fn scribble(c: &AgentClient, vm: &str, seed: u8, size: u64) {
    for i in 0..5u64 {
        let off = (i * 7919 * 4096 + seed as u64 * 12345) % (size - 100_000);
        let data: Vec<u8> = (0..70_000u32)
            .map(|j| (j as u8).wrapping_mul(seed).wrapping_add(i as u8))
            .collect();
        c.write_disk(vm, "disk0", off, data).await.unwrap();
    }
}

#[tokio::test]
async fn replicate_cycle_failover_to_older_point_and_reverse_resync() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 8 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    scribble(&ca, VM, 1, size).await;

    // Initial replication, then sync-now: equal digests.
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    let rp1 = ca.sync(VM, "sync-1").await.unwrap().recovery_point;
    let d1 = ca.digest(VM, "disk0").await.unwrap();
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d1);
    let replica = cb.get_vm(VM).await.unwrap();
    assert_eq!((replica.role, replica.power), (Role::Replica, Power::Off));

    // Writes and a cycle: the newest point has the source's digest at cycle time.
    scribble(&ca, VM, 2, size).await;
    assert!(ca.get_vm(VM).await.unwrap().replication.pending_bytes > 0);
    let d2 = ca.digest(VM, "disk0").await.unwrap();
    let rp2 = ca.sync(VM, "sync-2").await.unwrap().recovery_point;
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d2);
    // The same operation id answers the same point without a new cycle.
    assert_eq!(ca.sync(VM, "sync-2").await.unwrap().recovery_point, rp2);
    let sent_after_2 = ca.get_vm(VM).await.unwrap().replication.bytes_sent;

    scribble(&ca, VM, 3, size).await;
    let d3 = ca.digest(VM, "disk0").await.unwrap();
    ca.sync(VM, "sync-3").await.unwrap();
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d3);
    // A cycle sends what changed, not the disk.
    let sent_cycle = ca.get_vm(VM).await.unwrap().replication.bytes_sent - sent_after_2;
    assert!(sent_cycle < size / 2, "cycle sent {sent_cycle} bytes");

    let rps = cb.recovery_points(VM).await.unwrap();
    let ids: Vec<&str> = rps.iter().map(|p| p.id.as_str()).collect();
    assert!(
        ids.contains(&rp1.id.as_str()) && ids.contains(&rp2.id.as_str()),
        "{ids:?}"
    );
    // The first point comes from the initial replication itself, then one per sync.
    assert_eq!(rps.len(), 4);

    // Test failover to the older point: a separate copy with that point's digest.
    let t = cb
        .test_failover(
            VM,
            &RecoveryPointSelector::Id(rp2.id.clone()),
            "isolated",
            "tf-1",
        )
        .await
        .unwrap();
    assert_eq!(t.vm_name, format!("{VM}-test"));
    assert_eq!(cb.digest(&t.vm_name, "disk0").await.unwrap(), d2);
    assert_eq!(
        cb.get_vm(VM).await.unwrap().test_copy.unwrap().vm_name,
        t.vm_name
    );
    assert!(cb.test_failover_cleanup(VM, "tfc-1").await.unwrap().deleted);
    assert!(cb.get_vm(&t.vm_name).await.is_err());
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d3);

    // Failover to the older point rp2: the VM runs at B with rp2's content.
    ca.power(VM, PowerAction::Shutdown, "sd-1").await.unwrap();
    ca.stop_replication(VM, "stop-1").await.unwrap();
    let fo = cb
        .failover(VM, &RecoveryPointSelector::Id(rp2.id.clone()), "fo-1")
        .await
        .unwrap();
    assert_eq!(fo.recovery_point.id, rp2.id);
    // Repeating the operation does it once.
    assert_eq!(
        cb.failover(VM, &RecoveryPointSelector::Id(rp2.id.clone()), "fo-1")
            .await
            .unwrap(),
        fo
    );
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d2);
    let v = cb.get_vm(VM).await.unwrap();
    assert_eq!((v.role, v.power), (Role::Primary, Power::Running));
    assert_eq!(
        cb.commit(VM, "commit-1")
            .await
            .unwrap()
            .deleted_recovery_points,
        3
    );

    // Reverse replication with resync: only differing blocks travel, digests end equal.
    scribble(&cb, VM, 4, size).await;
    common_agent::accept(&ca, VM, &b, "acc-2").await;
    cb.enable_replication(VM, &enable("en-2", &a, ReplicationMode::Resync))
        .await
        .unwrap();
    cb.sync(VM, "sync-r1").await.unwrap();
    let db = cb.digest(VM, "disk0").await.unwrap();
    assert_eq!(ca.digest(VM, "disk0").await.unwrap(), db);
    let sent = cb.get_vm(VM).await.unwrap().replication.bytes_sent;
    assert!(sent < size / 2, "resync sent {sent} of {size}");
    assert_eq!(ca.get_vm(VM).await.unwrap().role, Role::Replica);
}

/// SHA-256 of the replica's image file itself (not what the agent answers for it).
fn image_sha256(agent: &AgentProc) -> String {
    use sha2::Digest;
    let path = agent
        .data_dir
        .join("vms")
        .join(VM)
        .join("disks")
        .join("disk0.img");
    hex::encode(sha2::Sha256::digest(std::fs::read(&path).unwrap()))
}

#[tokio::test]
async fn points_received_during_a_drill_wait_for_its_cleanup_and_latest_processed_skips_them() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 8 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    scribble(&ca, VM, 1, size).await;
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    scribble(&ca, VM, 2, size).await;
    let d2 = ca.digest(VM, "disk0").await.unwrap();
    let rp2 = ca.sync(VM, "sync-2").await.unwrap().recovery_point;
    assert_eq!(image_sha256(&b), d2);

    // A drill from the newest point, then a cycle while its copy exists.
    let t = cb
        .test_failover(VM, &RecoveryPointSelector::Latest, "isolated", "tf-1")
        .await
        .unwrap();
    assert_eq!(t.recovery_point.id, rp2.id);
    scribble(&ca, VM, 3, size).await;
    let d3 = ca.digest(VM, "disk0").await.unwrap();
    let rp3 = ca.sync(VM, "sync-3").await.unwrap().recovery_point;
    // The point is listed and read as the newest, but the image the drill reads is untouched.
    let ids: Vec<String> = cb
        .recovery_points(VM)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids.last(), Some(&rp3.id));
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d3);
    assert_eq!(image_sha256(&b), d2);
    assert_eq!(cb.digest(&t.vm_name, "disk0").await.unwrap(), d2);
    let newest = cb.read_disk(VM, "disk0", 0, size).await.unwrap();
    assert_eq!(newest, ca.read_disk(VM, "disk0", 0, size).await.unwrap());

    // A failover waits for the drill's cleanup: refused, nothing changed.
    ca.power(VM, PowerAction::Shutdown, "sd-1").await.unwrap();
    ca.stop_replication(VM, "stop-1").await.unwrap();
    let refused = cb
        .failover(VM, &RecoveryPointSelector::Latest, "fo-0")
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, twinsite::site::SiteError::Conflict(m) if m.contains("drill")),
        "{refused:?}"
    );
    assert_eq!(cb.get_vm(VM).await.unwrap().role, Role::Replica);

    // After the cleanup, LatestProcessed brings up the newest point already applied (rp2):
    // the waiting point rp3 is not applied first, and is dropped.
    assert!(cb.test_failover_cleanup(VM, "tfc-1").await.unwrap().deleted);
    assert_eq!(image_sha256(&b), d2);
    let fo = cb
        .failover(VM, &RecoveryPointSelector::LatestProcessed, "fo-1")
        .await
        .unwrap();
    assert_eq!(fo.recovery_point.id, rp2.id);
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d2);
    let left: Vec<String> = cb
        .recovery_points(VM)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(left.last(), Some(&rp2.id));
    let staging = b.data_dir.join("vms").join(VM).join("staging");
    let staged = std::fs::read_dir(&staging).map_or(0, |d| d.count());
    assert_eq!(staged, 0, "staging files left in {}", staging.display());
}

#[tokio::test]
async fn receiver_killed_mid_cycle_loses_no_acknowledged_point() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let mut b = AgentProc::start_with_env(
        "secondary",
        root.path(),
        &[("TWINSITE_FAULT_HANG_BLOCKS", "1")],
    );
    let (ca, cb) = (a.client(), b.client());
    let size = 8 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    scribble(&ca, VM, 1, size).await;
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    let rp1 = ca.sync(VM, "sync-1").await.unwrap().recovery_point;
    let d1 = ca.digest(VM, "disk0").await.unwrap();

    // The next cycle hangs in the receiver after it staged blocks; kill it there.
    scribble(&ca, VM, 2, size).await;
    std::fs::write(b.data_dir.join("hang-blocks"), b"").unwrap();
    let ca2 = ca.clone();
    let pending = tokio::spawn(async move { ca2.sync(VM, "sync-2").await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.data_dir.join("hang-reached").exists() {
        assert!(
            Instant::now() < deadline,
            "cycle never reached the receiver"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_file(b.data_dir.join("hang-blocks")).unwrap();
    b.kill_and_restart();
    assert!(
        pending.await.unwrap().is_err(),
        "the interrupted cycle cannot have succeeded"
    );

    // The acknowledged point is intact.
    let rps = cb.recovery_points(VM).await.unwrap();
    assert_eq!(rps.last().unwrap().id, rp1.id);
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d1);

    // The next cycle completes and carries the writes the killed one did not deliver.
    let d2 = ca.digest(VM, "disk0").await.unwrap();
    let rp2 = ca.sync(VM, "sync-3").await.unwrap().recovery_point;
    assert_ne!(rp2.id, rp1.id);
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d2);
}

#[tokio::test]
async fn block_corrupted_in_transit_is_refused_and_resent() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start_with_env(
        "primary",
        root.path(),
        &[("TWINSITE_FAULT_CORRUPT_BLOCKS", "1")],
    );
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 2 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    scribble(&ca, VM, 5, size).await;
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    assert_eq!(
        cb.digest(VM, "disk0").await.unwrap(),
        ca.digest(VM, "disk0").await.unwrap()
    );
    assert!(
        cb.get_vm(VM).await.unwrap().replication.blocks_refused >= 1,
        "receiver refused nothing"
    );
    assert!(
        ca.get_vm(VM).await.unwrap().replication.blocks_refused >= 1,
        "source resent nothing"
    );
}

#[tokio::test]
async fn cycle_of_many_batches_over_two_disks_streams_through() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 8 * MIB;
    let two = CreateVm {
        disks: vec![
            DiskSpec {
                name: "disk0".into(),
                size_bytes: size,
                format: None,
            },
            DiskSpec {
                name: "disk1".into(),
                size_bytes: size + 1000,
                format: None,
            },
        ],
        power: Power::Running,
        integration_services: true,
    };
    ca.create_vm(VM, &two).await.unwrap();
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    // 6 MiB on each disk (96 blocks each, the short last block of disk1 too): one cycle of
    // several batches that crosses from one disk to the other.
    for (disk, off) in [("disk0", MIB), ("disk1", size + 1000 - 6 * MIB)] {
        let data: Vec<u8> = (0..6 * MIB as u32).map(|j| (j % 251) as u8).collect();
        ca.write_disk(VM, disk, off, data).await.unwrap();
    }
    let before = ca.get_vm(VM).await.unwrap().replication.bytes_sent;
    ca.sync(VM, "sync-2").await.unwrap();
    let sent = ca.get_vm(VM).await.unwrap().replication.bytes_sent - before;
    // 97 blocks per disk are touched (unaligned ranges), the last one of disk1 short.
    assert!((12 * MIB..=14 * MIB).contains(&sent), "sent {sent}");
    for disk in ["disk0", "disk1"] {
        assert_eq!(
            cb.digest(VM, disk).await.unwrap(),
            ca.digest(VM, disk).await.unwrap(),
            "{disk}"
        );
    }
}

const BLOCK: u64 = 64 * 1024;

/// Overwrites whole 64 KiB blocks with a pattern of `seed`.
async fn write_blocks(c: &AgentClient, blocks: &[u64], seed: u8) {
    for b in blocks {
        let data: Vec<u8> = (0..BLOCK as u32)
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed ^ *b as u8))
            .collect();
        c.write_disk(VM, "disk0", b * BLOCK, data).await.unwrap();
    }
}

/// A replicated to B, then A wrote `a_blocks` it never sent, shut down and B failed over and
/// wrote `b_blocks` plus one block rewritten with the content it already had.
async fn diverge(ca: &AgentClient, cb: &AgentClient, b: &AgentProc, size: u64) {
    ca.create_vm(VM, &spec(size)).await.unwrap();
    scribble(ca, VM, 1, size).await;
    common_agent::accept_site(cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    write_blocks(ca, &[3, 4, 50], 7).await;
    ca.power(VM, PowerAction::Shutdown, "sd-1").await.unwrap();
    ca.stop_replication(VM, "stop-1").await.unwrap();
    cb.failover(VM, &RecoveryPointSelector::Latest, "fo-1")
        .await
        .unwrap();
    cb.commit(VM, "commit-1").await.unwrap();
    write_blocks(cb, &[4, 90], 9).await;
    let same = cb.read_disk(VM, "disk0", 100 * BLOCK, BLOCK).await.unwrap();
    cb.write_disk(VM, "disk0", 100 * BLOCK, same).await.unwrap();
}

/// `from` resyncs `peer` (whose client is `to`) and syncs; both disks are then equal.
async fn resync(from: &AgentClient, peer: &AgentProc, to: &AgentClient, en: &str, sync: &str) {
    let source = from.list_vms().await.unwrap().site;
    to.accept_replication(
        VM,
        &twinsite::site::AcceptReplication {
            operation_id: format!("{en}-accept"),
            source_site: source,
        },
    )
    .await
    .unwrap();
    from.enable_replication(VM, &enable(en, peer, ReplicationMode::Resync))
        .await
        .unwrap();
    from.sync(VM, sync).await.unwrap();
    assert_eq!(
        from.digest(VM, "disk0").await.unwrap(),
        to.digest(VM, "disk0").await.unwrap()
    );
}

#[tokio::test]
async fn reverse_resync_sends_only_the_blocks_both_journals_name() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 8 * MIB;
    diverge(&ca, &cb, &b, size).await;
    resync(&cb, &a, &ca, "en-2", "sync-r1").await;
    // A's unsent blocks 3, 4, 50, B's writes 4, 90 and B's rewrite of 100 (tracked, though its
    // content did not change): 5 blocks. Hashing would have sent 4.
    let sent = cb.get_vm(VM).await.unwrap().replication.bytes_sent;
    assert_eq!(sent, 5 * BLOCK, "journal resync sent {sent} bytes");

    // A became a replica with a clean journal: a failback later sends only what A writes
    // after it fails back (B's writes before reached A by cycles).
    write_blocks(&cb, &[20], 11).await;
    cb.sync(VM, "sync-r2").await.unwrap();
    cb.power(VM, PowerAction::Shutdown, "sd-2").await.unwrap();
    cb.stop_replication(VM, "stop-2").await.unwrap();
    ca.failover(VM, &RecoveryPointSelector::Latest, "fo-2")
        .await
        .unwrap();
    ca.commit(VM, "commit-2").await.unwrap();
    write_blocks(&ca, &[60], 13).await;
    resync(&ca, &b, &cb, "en-3", "sync-f1").await;
    let sent = ca.get_vm(VM).await.unwrap().replication.bytes_sent;
    assert_eq!(sent, BLOCK, "failback resync sent {sent} bytes");
}

#[tokio::test]
async fn reverse_resync_hashes_blocks_when_a_journal_is_lost() {
    let root = tempfile::tempdir().unwrap();
    let mut a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 8 * MIB;
    diverge(&ca, &cb, &b, size).await;
    // The old source loses its change journal (and with it the blocks it never sent).
    a.kill();
    std::fs::remove_dir_all(a.data_dir.join("vms").join(VM).join("track")).unwrap();
    a.spawn();
    resync(&cb, &a, &ca, "en-2", "sync-r1").await;
    // Hashing finds exactly the blocks that differ: 3, 4, 50 and 90 (not the rewritten 100).
    let sent = cb.get_vm(VM).await.unwrap().replication.bytes_sent;
    assert_eq!(sent, 4 * BLOCK, "hash resync sent {sent} bytes");
}

/// A failover to `LatestProcessed` after a drill leaves out the points received during the
/// drill, which the old source holds: the reverse resync must send those blocks back too, so
/// the old source ends with exactly the new source's disk.
#[tokio::test]
async fn reverse_resync_after_latest_processed_skipped_points_of_a_drill_leaves_equal_disks() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 8 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    scribble(&ca, VM, 1, size).await;
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    let rp2 = ca.sync(VM, "sync-2").await.unwrap().recovery_point;

    // A point arrives while a drill copy exists, then the drill ends and B fails over to the
    // newest point already applied: the waiting point (A's blocks 3, 4, 50) is left out.
    cb.test_failover(VM, &RecoveryPointSelector::Latest, "isolated", "tf-1")
        .await
        .unwrap();
    write_blocks(&ca, &[3, 4, 50], 7).await;
    ca.sync(VM, "sync-3").await.unwrap();
    cb.test_failover_cleanup(VM, "tfc-1").await.unwrap();
    ca.power(VM, PowerAction::Shutdown, "sd-1").await.unwrap();
    ca.stop_replication(VM, "stop-1").await.unwrap();
    let fo = cb
        .failover(VM, &RecoveryPointSelector::LatestProcessed, "fo-1")
        .await
        .unwrap();
    assert_eq!(fo.recovery_point.id, rp2.id);
    cb.commit(VM, "commit-1").await.unwrap();
    write_blocks(&cb, &[4, 90], 9).await;

    // Reprotect B -> A; once the resync and a cycle are done, A holds B's disk.
    common_agent::accept(&ca, VM, &b, "acc-2").await;
    cb.enable_replication(VM, &enable("en-2", &a, ReplicationMode::Resync))
        .await
        .unwrap();
    cb.sync(VM, "sync-r1").await.unwrap();
    let v = cb.get_vm(VM).await.unwrap();
    assert_eq!(
        v.replication.state,
        twinsite::site::ReplicationState::Replicating
    );
    assert_eq!(
        ca.digest(VM, "disk0").await.unwrap(),
        cb.digest(VM, "disk0").await.unwrap(),
        "the old source differs from the new source after the reverse resync"
    );
}

/// The source of `vm` loses its change journal and starts again: its next run is a resync by
/// block hashes, which holds (with `TWINSITE_FAULT_HOLD_BULK`) once a batch was acknowledged,
/// until the file `hold-bulk` goes. Returns when that batch is acknowledged.
async fn resync_held_mid_way(a: &mut AgentProc) {
    a.kill();
    std::fs::remove_dir_all(a.data_dir.join("vms").join(VM).join("track")).unwrap();
    std::fs::write(a.data_dir.join("hold-bulk"), b"").unwrap();
    a.spawn();
    let ca = a.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = ca.get_vm(VM).await.unwrap().replication;
        if r.progress.is_some_and(|p| p.done_bytes > 0) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the resync never sent a batch: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a replica serves while a resync runs into it: its points listed as before, its newest
/// point read back exactly, its digest unchanged.
async fn assert_points_intact(cb: &AgentClient, ids: &[String], image: &[u8], digest: &str) {
    let now: Vec<String> = cb
        .recovery_points(VM)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(now, ids, "recovery points changed while a resync runs");
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), digest);
    let read = cb
        .read_disk(VM, "disk0", 0, image.len() as u64)
        .await
        .unwrap();
    assert!(
        read == image,
        "the newest point reads back otherwise mid-resync"
    );
}

/// A resync (here after the source lost its journal) keeps the replica's points usable until
/// it completes: listed, read back exactly, and a failover mid-resync brings up the newest
/// point as it was. Once it completes the old points are still there and the replica holds
/// the source's disk.
#[tokio::test]
async fn a_resync_keeps_the_last_good_point_until_it_completes() {
    let root = tempfile::tempdir().unwrap();
    let mut a =
        AgentProc::start_with_env("primary", root.path(), &[("TWINSITE_FAULT_HOLD_BULK", "1")]);
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 16 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    scribble(&ca, VM, 1, size).await;
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    scribble(&ca, VM, 2, size).await;
    let d2 = ca.digest(VM, "disk0").await.unwrap();
    let rp2 = ca.sync(VM, "sync-2").await.unwrap().recovery_point;
    let ids: Vec<String> = cb
        .recovery_points(VM)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    let image2 = cb.read_disk(VM, "disk0", 0, size).await.unwrap();

    // 12 MiB the replica does not have: the resync sends several batches.
    let data: Vec<u8> = (0..12 * MIB as u32).map(|j| (j % 253) as u8).collect();
    ca.write_disk(VM, "disk0", MIB, data).await.unwrap();
    resync_held_mid_way(&mut a).await;
    assert_points_intact(&cb, &ids, &image2, &d2).await;
    let t = cb
        .test_failover(
            VM,
            &RecoveryPointSelector::Id(rp2.id.clone()),
            "isolated",
            "tf-1",
        )
        .await
        .unwrap();
    assert_eq!(cb.digest(&t.vm_name, "disk0").await.unwrap(), d2);
    cb.test_failover_cleanup(VM, "tfc-1").await.unwrap();

    // The resync goes on and completes: the old points stay, the replica is the source.
    std::fs::remove_file(a.data_dir.join("hold-bulk")).unwrap();
    let ca = a.client();
    let rp3 = ca.sync(VM, "sync-3").await.unwrap().recovery_point;
    let d3 = ca.digest(VM, "disk0").await.unwrap();
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d3);
    let after: Vec<String> = cb
        .recovery_points(VM)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert!(after.starts_with(&ids), "{after:?} lost points of {ids:?}");
    assert_eq!(after.last(), Some(&rp3.id));
    let t = cb
        .test_failover(
            VM,
            &RecoveryPointSelector::Id(rp2.id.clone()),
            "isolated",
            "tf-2",
        )
        .await
        .unwrap();
    assert_eq!(cb.digest(&t.vm_name, "disk0").await.unwrap(), d2);
    cb.test_failover_cleanup(VM, "tfc-2").await.unwrap();

    // Another resync, and the source is lost in the middle of it: a failover brings up the
    // newest point exactly.
    let image3 = cb.read_disk(VM, "disk0", 0, size).await.unwrap();
    let ids: Vec<String> = after;
    let data: Vec<u8> = (0..12 * MIB as u32).map(|j| (j % 241) as u8).collect();
    ca.write_disk(VM, "disk0", 2 * MIB, data).await.unwrap();
    resync_held_mid_way(&mut a).await;
    assert_points_intact(&cb, &ids, &image3, &d3).await;
    a.kill();
    let fo = cb
        .failover(VM, &RecoveryPointSelector::Latest, "fo-1")
        .await
        .unwrap();
    assert_eq!(fo.recovery_point.id, rp3.id);
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), d3);
}

/// Two commits in a row whose answers never came (the first committed at the replica, the
/// second not): the next cycle still applies onto what the replica holds, without a resync.
#[tokio::test]
async fn two_commits_in_doubt_in_a_row_need_no_resync() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let mut b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 4 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();

    // The replica commits the next cycle and dies before it answers: in doubt, held there.
    b.kill();
    b.set_env("TWINSITE_FAILPOINT", Some("replica.retention"));
    b.spawn();
    write_blocks(&ca, &[1], 1).await;
    assert!(ca.sync(VM, "sync-2").await.is_err());
    // The one after dies before it records its point: in doubt too, not held.
    b.kill();
    b.set_env("TWINSITE_FAILPOINT", Some("replica.undo"));
    b.spawn();
    write_blocks(&ca, &[2], 2).await;
    assert!(ca.sync(VM, "sync-3").await.is_err());
    b.kill();
    b.set_env("TWINSITE_FAILPOINT", None);
    b.spawn();

    // A cycle sends every block not acknowledged (1, 2 and 3); a resync would have compared
    // hashes and sent what the replica lacks (2 and 3).
    write_blocks(&ca, &[3], 3).await;
    let before = ca.get_vm(VM).await.unwrap().replication.bytes_sent;
    ca.sync(VM, "sync-4").await.unwrap();
    let sent = ca.get_vm(VM).await.unwrap().replication.bytes_sent - before;
    assert_eq!(
        sent,
        3 * BLOCK,
        "the source resynchronized (sent {sent} bytes)"
    );
    assert_eq!(
        cb.digest(VM, "disk0").await.unwrap(),
        ca.digest(VM, "disk0").await.unwrap()
    );
}

/// A point received during a drill whose staging file is damaged before it is applied is not
/// applied: the replica drops it and the source resyncs, so the replica ends with the source's
/// disk (it once wrote the damaged block into the image).
#[tokio::test]
async fn a_damaged_staging_file_is_never_applied() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 4 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    cb.test_failover(VM, &RecoveryPointSelector::Latest, "isolated", "tf-1")
        .await
        .unwrap();
    write_blocks(&ca, &[5], 5).await;
    ca.sync(VM, "sync-2").await.unwrap();

    // One byte of the waiting point's block rots on the replica's disk.
    let dir = b.data_dir.join("vms").join(VM).join("staging");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .next()
        .expect("the waiting point's staging file");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();

    cb.test_failover_cleanup(VM, "tfc-1").await.unwrap();
    write_blocks(&ca, &[6], 6).await;
    ca.sync(VM, "sync-3").await.unwrap();
    assert_eq!(
        cb.digest(VM, "disk0").await.unwrap(),
        ca.digest(VM, "disk0").await.unwrap(),
        "the replica applied a damaged staging file"
    );
}

/// A replica altered behind the agents' backs (a bad disk, a write the change tracking missed)
/// is never left silently wrong: the next verification finds every differing block, the source
/// resynchronizes by block hashes and says so, and the one after finds the copies equal.
#[tokio::test]
async fn a_replica_that_silently_diverges_is_found_and_resynchronized() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start_with(
        "primary",
        root.path(),
        &[],
        &["--verify-interval-seconds", "1"],
    );
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 4 * MIB;
    ca.create_vm(VM, &spec(size)).await.unwrap();
    scribble(&ca, VM, 1, size).await;
    common_agent::accept_site(&cb, VM, "primary").await;
    ca.enable_replication(VM, &enable("en-1", &b, ReplicationMode::Initial))
        .await
        .unwrap();
    ca.sync(VM, "sync-1").await.unwrap();
    let v = ca.get_vm(VM).await.unwrap().replication.last_verification;
    assert_eq!(
        v.map(|v| v.differing_blocks),
        Some(0),
        "the first cycle verifies"
    );

    // Three blocks of the replica's image change under it, none of which the source writes.
    let image = root
        .path()
        .join("secondary/vms")
        .join(VM)
        .join("disks/disk0.img");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    for block in [5u64, 6, 60] {
        std::os::unix::fs::FileExt::write_all_at(&f, b"rot", block * 65536 + 100).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    assert_ne!(
        cb.digest(VM, "disk0").await.unwrap(),
        ca.digest(VM, "disk0").await.unwrap()
    );

    // The next verification (due after a second) finds exactly those blocks.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    scribble(&ca, VM, 2, size).await;
    ca.sync(VM, "sync-2").await.unwrap();
    let r = ca.get_vm(VM).await.unwrap().replication;
    let v = r.last_verification.clone().unwrap();
    assert_eq!(
        (v.differing_blocks, v.disk.as_deref()),
        (3, Some("disk0")),
        "{r:?}"
    );
    assert_eq!(r.divergences, 1);
    assert_eq!(r.state, twinsite::site::ReplicationState::Resynchronizing);
    assert!(
        r.last_error
            .as_deref()
            .is_some_and(|e| e.contains("diverged")),
        "{r:?}"
    );

    // The next run resynchronizes and verifies again: the copies are equal, and stay counted.
    scribble(&ca, VM, 3, size).await;
    let want = ca.digest(VM, "disk0").await.unwrap();
    ca.sync(VM, "sync-3").await.unwrap();
    assert_eq!(cb.digest(VM, "disk0").await.unwrap(), want);
    let r = ca.get_vm(VM).await.unwrap().replication;
    assert_eq!(r.state, twinsite::site::ReplicationState::Replicating);
    assert_eq!(r.last_error, None);
    assert_eq!(r.last_verification.map(|v| v.differing_blocks), Some(0));
    assert_eq!(r.divergences, 1);
    let metrics = reqwest::get(format!("{}/metrics", a.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("twinsite_agent_replica_diverged_blocks_total{{vm=\"{VM}\"}} 3")),
        "{metrics}"
    );
}
