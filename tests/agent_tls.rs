//! The agent over https: two real agents with certificates from one CA, the controller's
//! client trusting that CA, and replication between the agents over TLS.

mod common_agent;

use std::path::Path;
use std::process::Command;

use common_agent::{AgentProc, TOKEN};
use twinsite::site::{
    AgentClient, CreateVm, DiskSpec, EnableReplication, Power, ReplicationMode, SiteError,
    SiteProvider,
};

fn start_tls(site: &str, root: &Path) -> AgentProc {
    let cert = root.join(format!("{site}.crt"));
    let key = root.join(format!("{site}.key"));
    AgentProc::start_with(
        site,
        root,
        &[],
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    )
}

#[tokio::test]
async fn agents_serve_https_and_replicate_over_tls() {
    twinsite::init_crypto();
    let root = tempfile::tempdir().unwrap();
    let ca_pem =
        twinsite::envtest::agent_certificates(root.path(), &["primary", "secondary"]).unwrap();
    let a = start_tls("primary", root.path());
    let b = start_tls("secondary", root.path());
    assert!(a.url.starts_with("https://"));
    let ca = AgentClient::new(&a.url, TOKEN, Some(ca_pem.as_bytes())).unwrap();
    let cb = AgentClient::new(&b.url, TOKEN, Some(ca_pem.as_bytes())).unwrap();

    // A client that does not trust the CA is refused by TLS; plain http gets no answer.
    let untrusting = AgentClient::new(&a.url, TOKEN, None).unwrap();
    let err = untrusting.list_vms().await.unwrap_err();
    assert!(matches!(err, SiteError::Unreachable(_)), "{err}");
    let plain = AgentClient::new(&a.url.replace("https://", "http://"), TOKEN, None).unwrap();
    assert!(plain.list_vms().await.is_err());

    let size = 4 << 20;
    ca.create_vm(
        "db-01",
        &CreateVm {
            disks: vec![DiskSpec {
                name: "disk0".into(),
                size_bytes: size,
                format: None,
            }],
            power: Power::Running,
            integration_services: true,
        },
    )
    .await
    .unwrap();
    ca.write_disk("db-01", "disk0", 12345, vec![7u8; 200_000])
        .await
        .unwrap();
    let enable = EnableReplication {
        operation_id: "en-1".into(),
        peer_site: "secondary".into(),
        peer_url: b.url.clone(),
        peer_token: TOKEN.into(),
        peer_ca_pem: Some(ca_pem.clone()),
        interval_seconds: 3600,
        recovery_point_retention_hours: 24,
        app_consistent_frequency_hours: 0,
        mode: ReplicationMode::Initial,
    };
    ca.enable_replication("db-01", &enable).await.unwrap();
    ca.sync("db-01", "sync-1").await.unwrap();
    ca.write_disk("db-01", "disk0", 3 << 20, vec![9u8; 70_000])
        .await
        .unwrap();
    let rp = ca.sync("db-01", "sync-2").await.unwrap().recovery_point;
    assert_eq!(
        cb.digest("db-01", "disk0").await.unwrap(),
        ca.digest("db-01", "disk0").await.unwrap(),
        "the replica over TLS holds the source's data at {}",
        rp.id
    );
}

/// Runs `twinsite agent` with TLS arguments and answers its stderr; it must fail to start.
fn failed_start(root: &Path, tls_args: &[&Path]) -> String {
    let token = root.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinsite"));
    cmd.args(["agent", "--site", "primary", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--token-file")
        .arg(&token);
    for (flag, file) in ["--tls-cert", "--tls-key"].iter().zip(tls_args) {
        cmd.arg(flag).arg(file);
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the agent started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_certificate_stops_the_start_with_a_reason() {
    let root = tempfile::tempdir().unwrap();
    let cert = root.path().join("agent.crt");
    std::fs::write(&cert, "not a certificate").unwrap();
    let err = failed_start(root.path(), &[&cert, &cert]);
    assert!(err.contains("TLS"), "{err}");
    // --tls-cert without --tls-key is refused by the command line.
    let err = failed_start(root.path(), &[&cert]);
    assert!(err.contains("--tls-key"), "{err}");
}
