//! Consistent cuts (`POST /v1/cuts`) between two real agent processes.

mod common_agent;

use common_agent::AgentProc;
use twinsite::site::{
    AgentClient, CreateVm, CutRequest, EnableReplication, PowerAction, RecoveryPointSelector,
    ReplicationMode, SiteError, SiteProvider,
};

const MIB: u64 = 1 << 20;
const VMS: [&str; 3] = ["db-01", "app-01", "web-01"];

fn spec(size: u64) -> CreateVm {
    common_agent::vm_spec(size, true)
}

fn enable(op: &str, peer: &AgentProc) -> EnableReplication {
    common_agent::enable_to(op, peer, ReplicationMode::Initial)
}

/// Creates VMS at the source, writes to each and replicates them to `peer`, synced.
async fn protect_all(ca: &AgentClient, peer: &AgentProc, size: u64) {
    for (i, vm) in VMS.iter().enumerate() {
        ca.create_vm(vm, &spec(size)).await.unwrap();
        scribble(ca, vm, i as u8 + 1, size).await;
        common_agent::accept_site(&peer.client(), vm, "primary").await;
        ca.enable_replication(vm, &enable(&format!("en-{vm}"), peer))
            .await
            .unwrap();
        ca.sync(vm, &format!("sync-{vm}")).await.unwrap();
    }
}

async fn scribble(c: &AgentClient, vm: &str, seed: u8, size: u64) {
    for i in 0..4u64 {
        let off = (i * 7919 * 4096 + seed as u64 * 12345) % (size - 100_000);
        let data: Vec<u8> = (0..70_000u32)
            .map(|j| (j as u8).wrapping_mul(seed).wrapping_add(i as u8))
            .collect();
        c.write_disk(vm, "disk0", off, data).await.unwrap();
    }
}

fn cut(id: &str, vms: &[&str]) -> CutRequest {
    CutRequest {
        cut_id: id.into(),
        vms: vms.iter().map(|v| v.to_string()).collect(),
    }
}

#[tokio::test]
async fn cut_makes_one_point_per_vm_at_one_instant() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 4 * MIB;
    protect_all(&ca, &b, size).await;
    // A VM that is not replicated is left out of a cut, not an error.
    ca.create_vm("solo", &spec(MIB)).await.unwrap();

    // Writes to each VM, then the cut.
    let mut at_cut = Vec::new();
    for (i, vm) in VMS.iter().enumerate() {
        scribble(&ca, vm, i as u8 + 11, size).await;
        at_cut.push(ca.digest(vm, "disk0").await.unwrap());
    }
    let mut listed: Vec<&str> = VMS.to_vec();
    listed.push("solo");
    listed.push("not-here");
    let res = ca.cut(&cut("cut-1", &listed)).await.unwrap();
    assert_eq!(res.cut_id, "cut-1");
    let mut got: Vec<&str> = res.points.iter().map(|p| p.vm.as_str()).collect();
    got.sort();
    let mut want = VMS.to_vec();
    want.sort();
    assert_eq!(got, want, "only the outbound VMs are in the cut");
    for (vm, digest) in VMS.iter().zip(&at_cut) {
        let p = res.points.iter().find(|p| p.vm == *vm).unwrap();
        assert_eq!(p.recovery_point.cut_id.as_deref(), Some("cut-1"));
        let rps = cb.recovery_points(vm).await.unwrap();
        let newest = rps.last().unwrap();
        assert_eq!(newest, &p.recovery_point, "{vm}: newest point is the cut's");
        assert_eq!(newest.cut_id.as_deref(), Some("cut-1"));
        assert_eq!(&cb.digest(vm, "disk0").await.unwrap(), digest, "{vm}");
        let v = cb.get_vm(vm).await.unwrap();
        assert_eq!(
            v.recovery_points.latest.unwrap().cut_id.as_deref(),
            Some("cut-1")
        );
        // The cut's blocks were acknowledged: nothing is pending at the source.
        assert_eq!(ca.get_vm(vm).await.unwrap().replication.pending_bytes, 0);
    }

    // The same cut id answers the same points and does not cut again.
    let again = ca.cut(&cut("cut-1", &listed)).await.unwrap();
    assert_eq!(again, res);
    for vm in VMS {
        let rps = cb.recovery_points(vm).await.unwrap();
        assert_eq!(rps.iter().filter(|p| p.cut_id.is_some()).count(), 1);
    }

    // Later writes and points; then each VM fails over to its cut point.
    for (i, vm) in VMS.iter().enumerate() {
        scribble(&ca, vm, i as u8 + 21, size).await;
        ca.sync(vm, &format!("sync2-{vm}")).await.unwrap();
        assert_ne!(&cb.digest(vm, "disk0").await.unwrap(), &at_cut[i]);
    }
    for (vm, digest) in VMS.iter().zip(&at_cut) {
        let p = res.points.iter().find(|p| p.vm == *vm).unwrap();
        ca.power(vm, PowerAction::PowerOff, &format!("off-{vm}"))
            .await
            .unwrap();
        ca.stop_replication(vm, &format!("stop-{vm}"))
            .await
            .unwrap();
        let fo = cb
            .failover(
                vm,
                &RecoveryPointSelector::Id(p.recovery_point.id.clone()),
                &format!("fo-{vm}"),
            )
            .await
            .unwrap();
        assert_eq!(fo.recovery_point, p.recovery_point);
        assert_eq!(fo.recovery_point.cut_id.as_deref(), Some("cut-1"));
        assert_eq!(&cb.digest(vm, "disk0").await.unwrap(), digest, "{vm}");
    }

    // No outbound VM among the listed ones: 409 with a reason.
    match ca.cut(&cut("cut-2", &["solo", "not-here"])).await {
        Err(SiteError::Conflict(m)) => assert!(m.contains("outbound"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match cb.cut(&cut("cut-3", &VMS)).await {
        Err(SiteError::Conflict(_)) => {}
        other => panic!("expected a conflict at the replica site, got {other:?}"),
    }
}

#[tokio::test]
async fn cut_whose_peer_fails_keeps_its_blocks_pending() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let mut b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = 2 * MIB;
    protect_all(&ca, &b, size).await;
    for (i, vm) in VMS.iter().enumerate() {
        scribble(&ca, vm, i as u8 + 11, size).await;
    }
    b.kill();
    match ca.cut(&cut("cut-1", &VMS)).await {
        Err(SiteError::Other(502, m)) => assert!(m.contains("cut-1"), "{m}"),
        other => panic!("expected a 502, got {other:?}"),
    }
    for vm in VMS {
        assert!(
            ca.get_vm(vm).await.unwrap().replication.pending_bytes > 0,
            "{vm}: the failed cut's blocks must stay pending"
        );
    }
    // Once the peer is back, the same cut id is tried again and succeeds.
    b.spawn();
    let res = ca.cut(&cut("cut-1", &VMS)).await.unwrap();
    assert_eq!(res.points.len(), 3);
    for vm in VMS {
        assert_eq!(
            cb.digest(vm, "disk0").await.unwrap(),
            ca.digest(vm, "disk0").await.unwrap()
        );
        assert_eq!(ca.get_vm(vm).await.unwrap().replication.pending_bytes, 0);
    }
}

/// While a writer goes round the VMs writing an increasing counter to each in turn, every cut
/// sees one instant: the first VM is at most one write ahead of the last, never behind.
#[tokio::test]
async fn cuts_taken_during_writes_are_consistent_across_vms() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    let size = MIB;
    for vm in VMS {
        ca.create_vm(vm, &spec(size)).await.unwrap();
        common_agent::accept_site(&cb, vm, "primary").await;
        ca.enable_replication(vm, &enable(&format!("en-{vm}"), &b))
            .await
            .unwrap();
        ca.sync(vm, &format!("sync-{vm}")).await.unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (ca, stop) = (ca.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 1u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for vm in VMS {
                    ca.write_disk(vm, "disk0", 0, n.to_le_bytes().to_vec())
                        .await
                        .unwrap();
                }
                n += 1;
            }
            n
        })
    };
    // Sync-now cycles of the same VMs run meanwhile: a VM's cycles never overlap (the
    // replica refuses blocks and commits of a cycle another `begin` superseded).
    let syncer = {
        let (ca, stop) = (ca.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let vm = VMS[(n % 3) as usize];
                ca.sync(vm, &format!("bg-{n}")).await.unwrap();
                n += 1;
            }
            n
        })
    };
    let mut seen = Vec::new();
    for i in 0..6 {
        let res = ca.cut(&cut(&format!("cut-{i}"), &VMS)).await.unwrap();
        assert_eq!(res.points.len(), 3);
        let mut vals = Vec::new();
        for p in &res.points {
            assert_eq!(
                p.recovery_point.cut_id.as_deref(),
                Some(format!("cut-{i}").as_str())
            );
        }
        for vm in VMS {
            // A test copy of the cut's point shows what the cut captured (newer sync points
            // may exist by now).
            let p = res.points.iter().find(|p| p.vm == vm).unwrap();
            let t = cb
                .test_failover(
                    vm,
                    &RecoveryPointSelector::Id(p.recovery_point.id.clone()),
                    "isolated",
                    &format!("tf-{i}-{vm}"),
                )
                .await
                .unwrap();
            let bytes = cb.read_disk(&t.vm_name, "disk0", 0, 8).await.unwrap();
            vals.push(u64::from_le_bytes(bytes.try_into().unwrap()));
            cb.test_failover_cleanup(vm, &format!("tfc-{i}-{vm}"))
                .await
                .unwrap();
        }
        assert!(
            vals[0] >= vals[1] && vals[1] >= vals[2] && vals[2] + 1 >= vals[0],
            "cut {i} is not one instant: {VMS:?} = {vals:?}"
        );
        seen.push(vals);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await.unwrap();
    assert!(written > 1, "the writer never ran");
    syncer.await.unwrap();
    // The cuts saw the writes go on.
    assert!(seen.last().unwrap()[0] >= seen[0][0]);
}
