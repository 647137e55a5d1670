//! What a hostile peer can make a source agent read: an error answer whose body never ends is
//! read only by its start, and what it says reaches the VM's `lastError` cut to a few hundred
//! characters, with the peer token it echoes redacted.

use crate::common_agent;
use crate::hostile;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common_agent::AgentProc;
use twinsite::site::{EnableReplication, ReplicationMode, SiteProvider};

const PEER_TOKEN: &str = "peer-credential-0123456789abcdef";

#[tokio::test]
async fn an_endless_error_answer_from_the_peer_is_read_only_by_its_start() {
    let root = tempfile::tempdir().unwrap();
    let a = AgentProc::start("primary", root.path());
    let ca = a.client();
    let peer = hostile::endless_error(&format!("peer refuses {PEER_TOKEN} because")).await;
    ca.create_vm("web-01", &common_agent::vm_spec(1 << 20, true))
        .await
        .unwrap();
    ca.enable_replication(
        "web-01",
        &EnableReplication {
            operation_id: "en-1".into(),
            peer_site: "secondary".into(),
            peer_url: peer.url.clone(),
            peer_token: PEER_TOKEN.into(),
            peer_ca_pem: None,
            interval_seconds: 900,
            recovery_point_retention_hours: 24,
            app_consistent_frequency_hours: 0,
            mode: ReplicationMode::Initial,
        },
    )
    .await
    .unwrap();
    // The agent's own answer to a sync carries the peer's error.
    let err = tokio::time::timeout(Duration::from_secs(120), ca.sync("web-01", "sync-1"))
        .await
        .expect("the sync never ended: the agent reads the peer's endless answer")
        .expect_err("a sync to a failing peer succeeded")
        .to_string();
    assert!(err.contains("peer refuses [redacted] because"), "{err}");
    assert!(!err.contains(PEER_TOKEN), "{err}");
    assert!(err.len() < 1000, "{} bytes: {}", err.len(), &err[..1000]);

    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        let vm = ca.get_vm("web-01").await.unwrap();
        if let Some(e) = vm.replication.last_error {
            break e;
        }
        assert!(Instant::now() < deadline, "no lastError: {vm:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(last.len() < 1000, "{} bytes", last.len());
    assert!(!last.contains(PEER_TOKEN), "{last}");
    // What left the peer before the agent hung up: its start and socket buffers, not the
    // endless rest.
    assert!(peer.requests.load(Ordering::SeqCst) >= 1);
    let sent = peer.sent.load(Ordering::SeqCst);
    assert!(sent < 32 << 20, "{sent} bytes were read from the peer");
}
