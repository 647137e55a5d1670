//! Graceful shutdown with a timeout, against a real agent process.

mod common_agent;

use common_agent::AgentProc;
use twinsite::site::{CreateVm, DiskSpec, Power, PowerAction, SiteError, SiteProvider};

const MIB: u64 = 1 << 20;

fn spec() -> CreateVm {
    CreateVm {
        disks: vec![DiskSpec {
            name: "disk0".into(),
            size_bytes: MIB,
            format: None,
        }],
        power: Power::Running,
        integration_services: true,
    }
}

#[tokio::test]
async fn shutdown_of_a_guest_that_ignores_it_fails_after_the_timeout() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start_with(
        "primary",
        root.path(),
        &[("TWINSITE_FAULT_GUEST_IGNORES_SHUTDOWN", "stubborn")],
        &["--shutdown-timeout-seconds", "2"],
    );
    let c = a.client();
    c.create_vm("stubborn", &spec()).await.unwrap();
    c.create_vm("polite", &spec()).await.unwrap();

    match c.power("stubborn", PowerAction::Shutdown, "sd-1").await {
        Err(SiteError::Conflict(m)) => assert_eq!(
            m, "guest did not shut down within 2s; use PowerOff",
            "reason"
        ),
        other => panic!("expected a 409, got {other:?}"),
    }
    // The VM keeps running and takes guest writes again.
    assert_eq!(c.get_vm("stubborn").await.unwrap().power, Power::Running);
    c.write_disk("stubborn", "disk0", 0, vec![1u8; 4096])
        .await
        .unwrap();
    // The failed operation was not recorded: the same id tries again (and fails again).
    assert!(matches!(
        c.power("stubborn", PowerAction::Shutdown, "sd-1").await,
        Err(SiteError::Conflict(_))
    ));
    // PowerOff always works.
    let v = c
        .power("stubborn", PowerAction::PowerOff, "off-1")
        .await
        .unwrap();
    assert_eq!(v.power, Power::Off);

    // A guest that cooperates shuts down; writes to it are refused afterwards.
    c.write_disk("polite", "disk0", 0, vec![2u8; 4096])
        .await
        .unwrap();
    let v = c
        .power("polite", PowerAction::Shutdown, "sd-2")
        .await
        .unwrap();
    assert_eq!(v.power, Power::Off);
    assert!(matches!(
        c.write_disk("polite", "disk0", 0, vec![3u8; 4096]).await,
        Err(SiteError::Conflict(_))
    ));
    assert_eq!(
        c.read_disk("polite", "disk0", 0, 4096).await.unwrap(),
        vec![2u8; 4096]
    );
}
