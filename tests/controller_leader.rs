//! Two controller processes against the real API server: one leads and acts, the other
//! waits; SIGTERM makes the leader stop gracefully and hand over. Also /healthz, /readyz,
//! /metrics, and how an unreachable site shows in Site and ReplicatedVM status.

#[path = "controller_common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use serde_json::json;
use twinsite::api::{ReplicatedVM, Site};

async fn wait_until<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + LONG;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn get_ok(url: String) -> bool {
    reqwest::get(&url)
        .await
        .is_ok_and(|r| r.status().is_success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_acts_and_hands_over_on_sigterm() {
    let _serial = one_at_a_time().await;
    twinsite::init_crypto();
    let cp = twinsite::envtest::shared().await;
    let client = cp.client().await.unwrap();
    let ns = format!("leader-{}", std::process::id());
    let nsapi: Api<Namespace> = Api::all(client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    nsapi.create(&PostParams::default(), &n).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    // Sites whose agents do not answer (a port nobody listens on).
    let port = twinsite::envtest::free_port().unwrap();
    let sites: Api<Site> = Api::all(client.clone());
    let (p, s) = (format!("{ns}-p"), format!("{ns}-s"));
    for name in [&p, &s] {
        let sec: Secret = serde_json::from_value(json!({
            "metadata": {"name": format!("tok-{name}"), "labels": {"twinsite.io/site": name}},
            "stringData": {"token": "t"}}))
        .unwrap();
        secrets.create(&PostParams::default(), &sec).await.unwrap();
        let site: Site = serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "Site", "metadata": {"name": name},
            "spec": {"agent": {"url": format!("http://127.0.0.1:{port}"), "insecure": true,
                "tokenSecretRef": {"namespace": ns, "name": format!("tok-{name}"), "key": "token"}}}}))
        .unwrap();
        sites.create(&PostParams::default(), &site).await.unwrap();
    }
    let rvms: Api<ReplicatedVM> = Api::namespaced(client.clone(), &ns);
    let rvm: ReplicatedVM = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM", "metadata": {"name": "vm-a"},
        "spec": {"primarySite": p, "recoverySite": s}}))
    .unwrap();
    rvms.create(&PostParams::default(), &rvm).await.unwrap();

    let tmp_a = tempfile::tempdir().unwrap();
    let tmp_b = tempfile::tempdir().unwrap();
    let mut a = ControllerProc::start(cp, &ns, &tmp_a);
    wait_until("a leads", || async { a.log().contains("leading") }).await;
    let mut b = ControllerProc::start(cp, &ns, &tmp_b);
    for c in [&a, &b] {
        wait_until("healthz", || get_ok(c.url("/healthz"))).await;
        wait_until("readyz", || get_ok(c.url("/readyz"))).await;
    }

    // The leader reports the site unreachable and the VM waiting for it.
    wait_until("site unreachable in status", || async {
        sites
            .get(&p)
            .await
            .ok()
            .and_then(|x| x.status)
            .is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "Unreachable")
            })
    })
    .await;
    wait_until("rvm pending on the site", || async {
        rvms.get("vm-a").await.is_ok_and(|r| {
            let g = r.metadata.generation;
            r.status.is_some_and(|st| {
                st.phase == Some(twinsite::api::VmPhase::Pending)
                    && st.conditions.iter().any(|c| {
                        c.type_ == "Ready"
                            && c.status == "False"
                            && c.reason == "SiteUnreachable"
                            && c.observed_generation == g
                    })
            })
        })
    })
    .await;
    let r = rvms.get("vm-a").await.unwrap();
    assert!(
        r.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"twinsite.io/cleanup".to_string())
    );
    let m = reqwest::get(a.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("twinsite_site_listings_total{site="), "{m}");

    // The leader exports what the status says (a Site not Ready); the standby exports none of
    // it, so an alert does not fire once per replica.
    let text = |url: String| async move { reqwest::get(url).await.unwrap().text().await.unwrap() };
    wait_until("the leader exports the Sites' conditions", || async {
        text(a.metrics_url())
            .await
            .contains(r#"twinsite_condition{kind="Site",namespace="",name="#)
    })
    .await;

    // The standby does nothing while the leader lives.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!b.log().contains("leading"), "two leaders:\n{}", b.log());
    let m = text(b.metrics_url()).await;
    assert!(
        !m.contains("twinsite_condition{"),
        "the standby exports status:\n{m}"
    );

    // SIGTERM: the leader stops (releasing the lease), the standby takes over.
    a.terminate();
    assert!(a.log().contains("stopped"), "{}", a.log());
    wait_until("b leads", || async { b.log().contains("leading") }).await;
    wait_until("b lists sites", || async {
        reqwest::get(b.metrics_url())
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("twinsite_site_listings_total{site=")
    })
    .await;
    wait_until("the new leader exports the Sites' conditions", || async {
        text(b.metrics_url())
            .await
            .contains(r#"twinsite_condition{kind="Site",namespace="",name="#)
    })
    .await;
    b.terminate();
}

/// The controller never creates its Lease's namespace (the chart's RBAC cannot): with a
/// namespace that does not exist it stops with an error that names it, and the namespace is
/// still absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_namespace_is_never_created() {
    let _serial = one_at_a_time().await;
    twinsite::init_crypto();
    let cp = twinsite::envtest::shared().await;
    let client = cp.client().await.unwrap();
    let ns = format!("no-such-lease-ns-{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let c = ControllerProc::start(cp, &ns, &tmp);
    wait_until(
        "the controller reports the missing lease namespace",
        || async { c.log().contains("must exist") },
    )
    .await;
    let log = c.log();
    assert!(log.contains(&ns), "{log}");
    let nsapi: Api<Namespace> = Api::all(client.clone());
    assert!(
        nsapi.get_opt(&ns).await.unwrap().is_none(),
        "the controller created namespace {ns}"
    );
}
