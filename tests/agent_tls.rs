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
    common_agent::accept_site(&cb, "db-01", "primary").await;
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

#[test]
fn without_a_certificate_the_agent_starts_only_with_insecure_http() {
    let root = tempfile::tempdir().unwrap();
    // Neither a certificate nor --insecure-http: refused, naming the options.
    let err = failed_start(root.path(), &[]);
    for option in ["--tls-cert", "--tls-key", "--insecure-http"] {
        assert!(err.contains(option), "{option} not named in: {err}");
    }

    // --insecure-http with a certificate contradicts itself.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinsite"));
    let token = root.path().join("token");
    cmd.args(["agent", "--site", "primary", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .arg("--token-file")
        .arg(&token)
        .args([
            "--tls-cert",
            "a.crt",
            "--tls-key",
            "a.key",
            "--insecure-http",
        ]);
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "the agent started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--insecure-http"), "{err}");

    // With --insecure-http it serves plain http and says so in its log (standard output).
    std::fs::write(&token, TOKEN).unwrap();
    let port = common_agent::free_port();
    let log = root.path().join("agent.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinsite"))
        .args(["agent", "--site", "primary", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .arg("--token-file")
        .arg(&token)
        .arg("--insecure-http")
        .env("RUST_LOG", "info")
        .stdout(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    // The child is stopped before any assertion, so a failure leaves no agent behind.
    let answered = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let mut answer = String::new();
            if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .is_ok()
            {
                let _ = s.read_to_string(&mut answer);
            }
            break answer;
        }
        if std::time::Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
            break String::from("(the agent did not listen)");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("--insecure-http")),
        "no warning about plain http in:\n{log}"
    );
    assert!(!log.contains(TOKEN), "the log holds the token:\n{log}");
}
