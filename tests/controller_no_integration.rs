//! An unplanned failover of a VM without integration services: the graceful shutdown fails,
//! the failover goes on, the source is powered off (fenced) before the VM starts at the target.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;
use twinsite::api::Site;

fn site_ready(s: &Site) -> Option<(String, String)> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn wait_site(w: &World, name: &str, want: (&str, &str)) -> Site {
    let api: Api<Site> = Api::all(w.client.clone());
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let s = api.get(name).await.unwrap();
        if site_ready(&s)
            .as_ref()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            == Some(want)
        {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "site {name}: {:?}",
            s.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_and_the_unplanned_failover_goes_on() {
    let w = World::start("noint").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "app-01";
    w.primary.create_vm(vm, false).await;
    w.create_rvm(
        vm,
        json!({"type": "Unplanned", "shutdownSource": true, "commit": "Automatic"}),
    )
    .await;
    w.wait_protected(vm, &p, &s).await;

    // Site health: connected with its VM count; a wrong token is reported as such.
    let site = wait_site(&w, &p, ("True", "Connected")).await;
    let st = site.status.unwrap();
    assert_eq!(st.vm_count, Some(1));
    assert!(st.last_heartbeat_time.is_some());
    let bad = format!("{p}-badtoken");
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), &w.ns);
    let sec: Secret = serde_json::from_value(json!({
        "metadata": {"name": "wrong"}, "stringData": {"token": "not-the-token"}}))
    .unwrap();
    secrets.create(&PostParams::default(), &sec).await.unwrap();
    let sites: Api<Site> = Api::all(w.client.clone());
    let obj: Site = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "Site", "metadata": {"name": bad},
        "spec": {"agent": {"url": w.primary.url,
            "tokenSecretRef": {"namespace": w.ns, "name": "wrong", "key": "token"}}}}))
    .unwrap();
    sites.create(&PostParams::default(), &obj).await.unwrap();
    wait_site(&w, &bad, ("False", "Unauthorized")).await;

    let data = pattern("before-disaster", 4096);
    w.primary.write(vm, 0, &data).await;

    w.patch_spec(vm, json!({"activeSite": s})).await;
    let r = w.wait_protected(vm, &s, &p).await;
    let st = steps(&r, "UnplannedFailover");
    assert_eq!(st[0].0, "ShutdownSource");
    assert_eq!(st[0].1, "Failed", "{st:?}");
    assert_eq!(
        &st[1..],
        [
            ("FenceSource".into(), "Succeeded".into()),
            ("SyncRemaining".into(), "Succeeded".into()),
            ("StopReplication".into(), "Succeeded".into()),
            ("StartAtTarget".into(), "Succeeded".into()),
        ]
    );
    let job = r
        .status
        .as_ref()
        .unwrap()
        .jobs
        .iter()
        .find(|j| format!("{:?}", j.type_) == "UnplannedFailover")
        .unwrap()
        .clone();
    assert_eq!(format!("{:?}", job.state), "Succeeded");
    let msg = job.steps[0].message.clone().unwrap_or_default();
    assert!(msg.contains("continues"), "{msg}");
    // The VM runs at one site only, with the data (fenced, then synced).
    assert_eq!(
        w.primary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Off
    );
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    assert_eq!(w.secondary.read(vm, 0, data.len() as u64).await, data);
    let events = w.events(vm).await;
    assert!(
        events
            .iter()
            .any(|e| e.0 == "StepFailed" && e.1.contains("ShutdownSource")),
        "{events:?}"
    );
}
