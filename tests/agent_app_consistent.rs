//! App-consistent recovery points between two real agent processes.

mod common_agent;

use common_agent::AgentProc;
use twinsite::site::{
    AgentClient, CreateVm, EnableReplication, Power, PowerAction, RecoveryPointKind,
    RecoveryPointSelector, ReplicationMode, SiteError, SiteProvider,
};

const MIB: u64 = 1 << 20;

fn spec(integration_services: bool) -> CreateVm {
    common_agent::vm_spec(2 * MIB, integration_services)
}

fn enable(op: &str, peer: &AgentProc) -> EnableReplication {
    EnableReplication {
        app_consistent_frequency_hours: 1,
        ..common_agent::enable_to(op, peer, ReplicationMode::Initial)
    }
}

async fn write(c: &AgentClient, vm: &str, seed: u8) {
    let data: Vec<u8> = (0..100_000u32).map(|j| (j as u8) ^ seed).collect();
    c.write_disk(vm, "disk0", seed as u64 * 10_000, data)
        .await
        .unwrap();
}

#[tokio::test]
async fn app_consistent_points_only_with_integration_services() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let b = AgentProc::start("secondary", root.path());
    let (ca, cb) = (a.client(), b.client());
    for (vm, is) in [("with-is", true), ("without-is", false)] {
        ca.create_vm(vm, &spec(is)).await.unwrap();
        write(&ca, vm, 1).await;
        common_agent::accept_site(&cb, vm, "primary").await;
        ca.enable_replication(vm, &enable(&format!("en-{vm}"), &b))
            .await
            .unwrap();
    }

    // With integration services: the first cycle's point (right after the initial transfer)
    // is app-consistent, the next ones within the hour are crash-consistent.
    let s1 = ca.sync("with-is", "s1").await.unwrap().recovery_point;
    let d1 = ca.digest("with-is", "disk0").await.unwrap();
    let rps = cb.recovery_points("with-is").await.unwrap();
    let rp1 = rps[0].clone();
    assert_eq!(rp1.kind, RecoveryPointKind::AppConsistent, "{rps:?}");
    assert!(rp1.app_consistent);
    assert!(
        rps[1..].iter().all(|p| !p.app_consistent),
        "one app-consistent point per hour: {rps:?}"
    );
    assert_eq!(rps.last(), Some(&s1));
    write(&ca, "with-is", 2).await;
    let rp2 = ca.sync("with-is", "s2").await.unwrap().recovery_point;
    assert_eq!(rp2.kind, RecoveryPointKind::CrashConsistent);
    let d2 = ca.digest("with-is", "disk0").await.unwrap();
    assert_ne!(d1, d2);
    let v = cb.get_vm("with-is").await.unwrap();
    assert_eq!(v.recovery_points.latest_app_consistent.as_ref(), Some(&rp1));
    assert_eq!(v.recovery_points.latest.as_ref(), Some(&rp2));

    // Without integration services: never app-consistent.
    for i in 0..3u8 {
        write(&ca, "without-is", 10 + i).await;
        let rp = ca
            .sync("without-is", &format!("n{i}"))
            .await
            .unwrap()
            .recovery_point;
        assert_eq!(rp.kind, RecoveryPointKind::CrashConsistent);
        assert!(!rp.app_consistent);
    }
    let v = cb.get_vm("without-is").await.unwrap();
    assert!(v.recovery_points.latest_app_consistent.is_none());
    assert!(
        cb.recovery_points("without-is")
            .await
            .unwrap()
            .iter()
            .all(|p| !p.app_consistent)
    );

    // Failover to LatestAppConsistent brings up the app-consistent point's content.
    ca.power("with-is", PowerAction::Shutdown, "sd-1")
        .await
        .unwrap();
    ca.stop_replication("with-is", "stop-1").await.unwrap();
    let fo = cb
        .failover(
            "with-is",
            &RecoveryPointSelector::LatestAppConsistent,
            "fo-1",
        )
        .await
        .unwrap();
    assert_eq!(fo.recovery_point, rp1);
    assert_eq!(cb.digest("with-is", "disk0").await.unwrap(), d1);

    // A VM with no app-consistent point cannot fail over to one; it stays a replica.
    ca.power("without-is", PowerAction::PowerOff, "off-2")
        .await
        .unwrap();
    ca.stop_replication("without-is", "stop-2").await.unwrap();
    match cb
        .failover(
            "without-is",
            &RecoveryPointSelector::LatestAppConsistent,
            "fo-2",
        )
        .await
    {
        Err(SiteError::NotFound(m)) => {
            assert!(m.contains("LatestAppConsistent"), "{m}")
        }
        other => panic!("expected 404 with a reason, got {other:?}"),
    }
    assert_eq!(
        cb.get_vm("without-is").await.unwrap().power,
        Power::Off,
        "a failed failover changes nothing"
    );
}
