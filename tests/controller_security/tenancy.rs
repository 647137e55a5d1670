//! Namespaces keep tenants apart: a site VM belongs to the namespace whose ReplicatedVM
//! protected it first. Another namespace's ReplicatedVM naming the same VM is refused with a
//! condition and never touches it (not when it asks for a failover, not when it is deleted);
//! the agents refuse such calls too. Real API server, real agents, real controller.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use twinsite::api::ReplicatedVM;

/// Calls `method path` at `base` with `token`, as the controller of namespace `ns` would;
/// the HTTP status and the JSON answer.
async fn call(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    ns: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = http
        .request(m, format!("{base}{path}"))
        .bearer_auth(token)
        .header("twinsite-namespace", ns);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A second namespace beside the world's.
async fn namespace(w: &World, suffix: &str) -> String {
    let ns = format!("{}-{suffix}", w.ns);
    let api: Api<Namespace> = Api::all(w.client.clone());
    let mut n = Namespace::default();
    n.metadata.name = Some(ns.clone());
    api.create(&PostParams::default(), &n).await.unwrap();
    ns
}

/// ReplicatedVM `name` in `ns` protecting site VM `vm` from the primary to the secondary.
async fn create_rvm_in(w: &World, ns: &str, name: &str, vm: &str) -> Api<ReplicatedVM> {
    let api: Api<ReplicatedVM> = Api::namespaced(w.client.clone(), ns);
    let rvm: ReplicatedVM = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
        "metadata": {"name": name},
        "spec": {
            "primarySite": w.primary.site,
            "recoverySite": w.secondary.site,
            "vmName": vm,
            "replication": {"enabled": true, "intervalSeconds": 30},
            "failover": {"type": "Planned"},
        },
    }))
    .unwrap();
    api.create(&PostParams::default(), &rvm).await.unwrap();
    api
}

/// Waits (90 s at most) until `name` in `api` holds Ready False with `reason` for its current
/// generation; panics with its status and the controller's log otherwise.
async fn wait_refused(w: &World, api: &Api<ReplicatedVM>, name: &str, reason: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = api.get(name).await.unwrap();
        if let Some(c) = condition(&r, "Ready")
            && c.status == "False"
            && c.reason == reason
            && c.observed_generation == r.metadata.generation
        {
            return c.message;
        }
        if Instant::now() > deadline {
            let log = w.controller.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "{name} not refused with {reason}\nstatus: {}\ncontroller log tail:\n{}",
                serde_json::to_string_pretty(&r.status).unwrap(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// What team-a's VM is at both sites: power, role, direction and peer of replication, and
/// whether the replica has points.
async fn picture(w: &World, vm: &str) -> Vec<String> {
    let mut out = Vec::new();
    for a in [&w.primary, &w.secondary] {
        let v = a.vm(vm).await.expect("the VM is at both sites");
        out.push(format!(
            "{} {:?} {:?} {:?} {:?} {:?}",
            a.site,
            v.power,
            v.role,
            v.replication.direction,
            v.replication.peer_site,
            v.replication.state
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_belongs_to_the_namespace_that_protected_it() {
    let _one = one_at_a_time().await;
    let w = World::start("tenancy").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "web";
    w.primary.create_vm(vm, true).await;
    w.primary.write(vm, 0, &pattern("team-a", 8192)).await;
    w.create_rvm(vm, json!({"type": "Planned"})).await;
    w.wait_protected(vm, &p, &s).await;
    let team_a_jobs = jobs(&w.get(vm).await).len();
    let before = picture(&w, vm).await;
    assert!(
        before[0].contains("Running Primary Some(Outbound)"),
        "{before:?}"
    );
    assert!(
        before[1].contains("Off Replica Some(Inbound)"),
        "{before:?}"
    );

    // team-b names the same VM at the same sites: refused, before any call.
    let team_b = namespace(&w, "b").await;
    let b_api = create_rvm_in(&w, &team_b, "their-web", vm).await;
    let msg = wait_refused(&w, &b_api, "their-web", "VMOwnedByOtherNamespace").await;
    assert!(msg.contains(&format!("namespace {}", w.ns)), "{msg}");
    assert!(msg.contains("spec.vmName"), "{msg}");
    let b = b_api.get("their-web").await.unwrap();
    assert!(jobs(&b).is_empty(), "{:?}", jobs(&b));

    // team-b asks for a failover: still nothing happens to team-a's VM.
    b_api
        .patch(
            "their-web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"activeSite": s}})),
        )
        .await
        .unwrap();
    wait_refused(&w, &b_api, "their-web", "VMOwnedByOtherNamespace").await;
    // A few listing periods for anything that would start.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let b = b_api.get("their-web").await.unwrap();
    assert!(jobs(&b).is_empty(), "{:?}", jobs(&b));
    assert_eq!(picture(&w, vm).await, before);

    // The agents refuse team-b's calls themselves (409 naming the owner), changing nothing.
    let a_tok = w.primary.token.clone();
    let (code, body) = call(
        &w.primary.url,
        "POST",
        &format!("/v1/vms/{vm}/power"),
        &a_tok,
        &team_b,
        Some(json!({"action": "PowerOff", "operationId": "b-off"})),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["reason"], "VMOwnedByOtherNamespace", "{body}");
    assert!(body["error"].as_str().unwrap().contains(&w.ns), "{body}");
    let (code, body) = call(
        &w.secondary.url,
        "DELETE",
        &format!("/v1/vms/{vm}?operationId=b-del"),
        &w.secondary.token,
        &team_b,
        None,
    )
    .await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = call(
        &w.secondary.url,
        "POST",
        &format!("/v1/vms/{vm}/failover"),
        &w.secondary.token,
        &team_b,
        Some(json!({"operationId": "b-fo", "recoveryPoint": "Latest"})),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    let (code, body) = call(
        &w.primary.url,
        "POST",
        &format!("/v1/vms/{vm}/replication/enable"),
        &a_tok,
        &team_b,
        Some(
            json!({"operationId": "b-en", "peerSite": s, "peerUrl": w.secondary.url,
            "peerToken": "team-b-peer-token-0123456789", "intervalSeconds": 30,
            "mode": "Initial"}),
        ),
    )
    .await;
    assert_eq!(code, 409, "{body}");
    // A malformed namespace is a 400 naming the header.
    let (code, body) = call(
        &w.primary.url,
        "POST",
        &format!("/v1/vms/{vm}/power"),
        &a_tok,
        "Team_B",
        Some(json!({"action": "PowerOff", "operationId": "b-off-2"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("twinsite-namespace"),
        "{body}"
    );
    assert_eq!(picture(&w, vm).await, before);

    // team-b deletes its object: team-a's VM and replica stay, replication goes on.
    b_api
        .delete("their-web", &DeleteParams::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while b_api.get_opt("their-web").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "team-b's ReplicatedVM is not deleted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(picture(&w, vm).await, before);
    let a = w.get(vm).await;
    assert_eq!(jobs(&a).len(), team_a_jobs, "{:?}", jobs(&a));
    // Still replicating: a new write reaches the replica as a new point.
    let latest = |v: twinsite::site::Vm| v.recovery_points.latest.map(|p| p.id);
    let was = latest(w.secondary.vm(vm).await.unwrap());
    assert!(was.is_some(), "team-a's replica has no point");
    w.primary.write(vm, 4096, &pattern("more", 4096)).await;
    let deadline = Instant::now() + LONG;
    while latest(w.secondary.vm(vm).await.unwrap()) == was {
        assert!(
            Instant::now() < deadline,
            "no new point of team-a's VM after {was:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        ready(&w.get(vm).await),
        "team-a's ReplicatedVM is not Ready"
    );
    assert_eq!(picture(&w, vm).await, before);

    // team-a deletes its ReplicatedVM: its VM stays at the primary, still team-a's as the agent
    // recorded it. A new ReplicatedVM of team-b for it is refused from that record, before any
    // call (no accept, no enable), though no object of team-a names the VM any more.
    w.rvms().delete(vm, &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + LONG;
    while w.rvms().get_opt(vm).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "team-a's ReplicatedVM is not deleted"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let left = w.primary.vm(vm).await.expect("team-a's VM stays");
    assert_eq!(left.power, twinsite::site::Power::Running);
    let b_api = create_rvm_in(&w, &team_b, "their-web-2", vm).await;
    let msg = wait_refused(&w, &b_api, "their-web-2", "VMOwnedByOtherNamespace").await;
    assert!(msg.contains(&format!("namespace {}", w.ns)), "{msg}");
    let b = b_api.get("their-web-2").await.unwrap();
    assert!(jobs(&b).is_empty(), "{:?}", jobs(&b));
    assert!(
        w.secondary.vm(vm).await.is_none(),
        "a replica was made for team-b"
    );
}

/// A Site that lists its allowed namespaces refuses the ReplicatedVMs and FailoverPlans of
/// every other namespace, naming the field, and nothing is done at the sites for them; a
/// listed namespace protects its VM as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_serves_only_the_namespaces_it_allows() {
    let _one = one_at_a_time().await;
    let w = World::start("tenallow").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let sites: Api<twinsite::api::Site> = Api::all(w.client.clone());
    sites
        .patch(
            &s,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"allowedNamespaces": [w.ns]}})),
        )
        .await
        .unwrap();
    // The field is in the schema: a name that is not a namespace's is refused by the API server.
    let bad = sites
        .patch(
            &s,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"allowedNamespaces": ["Team_C"]}})),
        )
        .await
        .expect_err("a malformed namespace name is refused");
    assert!(bad.to_string().contains("allowedNamespaces"), "{bad}");

    let vm = "app";
    w.primary.create_vm(vm, true).await;
    let team_c = namespace(&w, "c").await;
    let c_api = create_rvm_in(&w, &team_c, "app", vm).await;
    let msg = wait_refused(&w, &c_api, "app", "NamespaceNotAllowed").await;
    assert!(msg.contains("spec.allowedNamespaces"), "{msg}");
    assert!(msg.contains(&format!("Site {s}")), "{msg}");
    assert!(jobs(&c_api.get("app").await.unwrap()).is_empty());

    // A plan of that namespace targeting the Site is refused too.
    let plans: Api<twinsite::api::FailoverPlan> = Api::namespaced(w.client.clone(), &team_c);
    let fp: twinsite::api::FailoverPlan = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": "dr"},
        "spec": {"targetSite": s, "groups": [{"name": "all", "vms": ["app"]}]},
    }))
    .unwrap();
    plans.create(&PostParams::default(), &fp).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let fp = plans.get("dr").await.unwrap();
        let ready = fp
            .status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Ready").cloned());
        if let Some(c) = ready
            && c.status == "False"
            && c.reason == "NamespaceNotAllowed"
        {
            assert!(
                c.message.contains("spec.allowedNamespaces"),
                "{}",
                c.message
            );
            assert!(fp.status.unwrap().jobs.is_empty());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "plan not refused: {:?}",
            fp.status
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Nothing happened at the sites for team-c.
    let at_p = w.primary.vm(vm).await.unwrap();
    assert_eq!(
        at_p.replication.state,
        twinsite::site::ReplicationState::Disabled,
        "{at_p:?}"
    );
    assert!(w.secondary.vm(vm).await.is_none());
    c_api.delete("app", &DeleteParams::default()).await.unwrap();

    // The namespace the Site lists protects the VM as usual.
    w.create_rvm(vm, json!({"type": "Planned"})).await;
    w.wait_protected(vm, &p, &s).await;
}
