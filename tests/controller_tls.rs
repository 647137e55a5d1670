//! The controller and the agents over https: each Site names its agent's CA with
//! `caSecretRef`; the controller trusts it, and hands it to the source agent so replication to
//! the peer agent runs over TLS too. A planned failover then loses no data.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protect_and_fail_over_with_https_agents() {
    let w = World::start_opts("tls", &[], true).await;
    assert!(w.primary.url.starts_with("https://"));
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "db-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(vm, json!({"type": "Planned"})).await;
    w.wait_protected(vm, &p, &s).await;

    let data = pattern("over-tls", 100_000);
    w.primary.write(vm, 4096, &data).await;
    w.patch_spec(vm, json!({"activeSite": s})).await;
    let r = w.wait_protected(vm, &s, &p).await;
    assert!(
        jobs(&r).iter().all(|j| j.1 == "Succeeded"),
        "{:?}",
        jobs(&r)
    );
    assert_eq!(
        w.secondary.digest(vm).await,
        expected_digest(&[(4096, &data)]),
        "the secondary runs the data written at the primary"
    );
}
