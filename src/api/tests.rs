//! Client-side checks of the CEL rules, with the same schema the API server gets.
//! The integration tests (tests/crds_*.rs) prove the same rules against a real API server.

use kube::CustomResourceExt;
use kube::core::cel::Validator;
use serde_json::{Value, json};

use super::{FailoverPlan, ReplicatedVM, Site};

fn schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

/// The messages of every rule that refuses `obj` (given `old` on an update).
fn refusals<K: CustomResourceExt>(obj: &Value, old: Option<&Value>) -> Vec<String> {
    match Validator::new().validate(&schema::<K>(), obj, old) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

#[track_caller]
fn assert_accepted<K: CustomResourceExt>(obj: &Value, old: Option<&Value>) {
    let r = refusals::<K>(obj, old);
    assert!(r.is_empty(), "refused: {r:?}");
}

#[track_caller]
fn assert_refused<K: CustomResourceExt>(obj: &Value, old: Option<&Value>, fragment: &str) {
    let r = refusals::<K>(obj, old);
    assert!(
        r.iter().any(|m| m.contains(fragment)),
        "expected a refusal containing {fragment:?}, got {r:?}"
    );
}

fn rvm(spec: Value) -> Value {
    json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
        "metadata": {"name": "web-01", "namespace": "finance"},
        "spec": spec,
    })
}

fn base_spec() -> Value {
    json!({"primarySite": "primary", "recoverySite": "secondary"})
}

fn with(mut v: Value, pointer: &str, new: Value) -> Value {
    // Creates missing parents so a test can set a nested field in one line.
    let mut cur = &mut v;
    for key in pointer.trim_start_matches('/').split('/') {
        if cur.get(key).is_none() {
            cur[key] = json!({});
        }
        cur = &mut cur[key];
    }
    *cur = new;
    v
}

#[test]
fn valid_replicated_vm_is_accepted() {
    assert_accepted::<ReplicatedVM>(&rvm(base_spec()), None);
    let full = rvm(json!({
        "vmName": "web-01", "primarySite": "primary", "recoverySite": "secondary",
        "activeSite": "secondary",
        "replication": {"enabled": true, "intervalSeconds": 30, "recoveryPointRetentionHours": 0,
                        "appConsistentFrequencyHours": 12},
        "failover": {"type": "Unplanned", "shutdownSource": false, "recoveryPoint": "rp-000123",
                     "commit": "Manual"},
        "testFailover": {"enabled": true, "network": "isolated"},
    }));
    assert_accepted::<ReplicatedVM>(&full, None);
}

#[test]
fn sites_are_immutable_and_distinct() {
    let old = rvm(base_spec());
    let moved = with(old.clone(), "/spec/primarySite", json!("elsewhere"));
    assert_refused::<ReplicatedVM>(&moved, Some(&old), "spec.primarySite is immutable");
    let moved = with(old.clone(), "/spec/recoverySite", json!("elsewhere"));
    assert_refused::<ReplicatedVM>(&moved, Some(&old), "spec.recoverySite is immutable");
    let same = with(old.clone(), "/spec/recoverySite", json!("primary"));
    assert_refused::<ReplicatedVM>(&same, None, "must differ from spec.primarySite");
}

#[test]
fn vm_name_is_immutable() {
    let old = rvm(base_spec());
    // Unset means metadata.name: writing it out is no change.
    let same = with(old.clone(), "/spec/vmName", json!("web-01"));
    assert_accepted::<ReplicatedVM>(&same, Some(&old));
    assert_accepted::<ReplicatedVM>(&old, Some(&same));
    let other = with(old.clone(), "/spec/vmName", json!("web-02"));
    assert_refused::<ReplicatedVM>(&other, Some(&old), "spec.vmName is immutable");
    assert_refused::<ReplicatedVM>(&old, Some(&other), "spec.vmName is immutable");
}

#[test]
fn active_site_must_be_one_of_the_two() {
    let spec = with(base_spec(), "/activeSite", json!("third"));
    assert_refused::<ReplicatedVM>(
        &rvm(spec),
        None,
        "spec.activeSite must be spec.primarySite or spec.recoverySite",
    );
    for site in ["primary", "secondary"] {
        assert_accepted::<ReplicatedVM>(&rvm(with(base_spec(), "/activeSite", json!(site))), None);
    }
}

#[test]
fn replication_settings_are_bounded() {
    for bad in [0, 60, 301, 3600] {
        let spec = with(base_spec(), "/replication/intervalSeconds", json!(bad));
        assert_refused::<ReplicatedVM>(&rvm(spec), None, "intervalSeconds must be 30, 300 or 900");
    }
    for good in [30, 300, 900] {
        let spec = with(base_spec(), "/replication/intervalSeconds", json!(good));
        assert_accepted::<ReplicatedVM>(&rvm(spec), None);
    }
    for bad in [-1, 25] {
        let spec = with(
            base_spec(),
            "/replication/recoveryPointRetentionHours",
            json!(bad),
        );
        assert_refused::<ReplicatedVM>(
            &rvm(spec),
            None,
            "recoveryPointRetentionHours must be between 0 and 24",
        );
    }
    for bad in [-1, 13] {
        let spec = with(
            base_spec(),
            "/replication/appConsistentFrequencyHours",
            json!(bad),
        );
        assert_refused::<ReplicatedVM>(
            &rvm(spec),
            None,
            "appConsistentFrequencyHours must be between 0 and 12",
        );
    }
}

#[test]
fn recovery_point_must_be_known_form() {
    for good in [
        "Latest",
        "LatestProcessed",
        "LatestAppConsistent",
        "rp-000123",
    ] {
        let spec = with(base_spec(), "/failover/recoveryPoint", json!(good));
        assert_accepted::<ReplicatedVM>(&rvm(spec), None);
    }
    for bad in ["latest", "Newest", "rp-", "000123", "rp-1 2"] {
        let spec = with(base_spec(), "/failover/recoveryPoint", json!(bad));
        assert_refused::<ReplicatedVM>(&rvm(spec), None, "failover.recoveryPoint must be Latest");
    }
}

fn with_job(obj: Value, type_: &str, state: &str) -> Value {
    with(
        obj,
        "/status",
        json!({"jobs": [
            {"name": "old", "type": "EnableReplication", "state": "Succeeded", "steps": []},
            {"name": "web-01-failover-1", "type": type_, "state": state,
             "sourceSite": "primary", "targetSite": "secondary", "steps": []},
        ]}),
    )
}

#[test]
fn running_failover_cannot_be_cancelled() {
    for type_ in ["PlannedFailover", "UnplannedFailover"] {
        let old = with_job(
            rvm(with(base_spec(), "/activeSite", json!("secondary"))),
            type_,
            "Running",
        );
        let back = with(old.clone(), "/spec/activeSite", json!("primary"));
        assert_refused::<ReplicatedVM>(
            &back,
            Some(&old),
            "a failover in progress cannot be cancelled",
        );
        assert_refused::<ReplicatedVM>(&back, Some(&old), "would leave the VM unreplicated");
        // Unset means primarySite: also a change.
        let mut unset = old.clone();
        unset["spec"].as_object_mut().unwrap().remove("activeSite");
        assert_refused::<ReplicatedVM>(&unset, Some(&old), "cannot be cancelled");
        // Other spec changes stay allowed.
        let other = with(old.clone(), "/spec/replication/intervalSeconds", json!(900));
        assert_accepted::<ReplicatedVM>(&other, Some(&old));
    }
    // Unset and explicitly primarySite are the same desired site.
    let old = with_job(rvm(base_spec()), "UnplannedFailover", "Running");
    let explicit = with(old.clone(), "/spec/activeSite", json!("primary"));
    assert_accepted::<ReplicatedVM>(&explicit, Some(&old));
    // Ended failovers and other running jobs do not block a change.
    for (type_, state) in [
        ("PlannedFailover", "Succeeded"),
        ("UnplannedFailover", "Failed"),
        ("TestFailover", "Running"),
        ("ReverseReplicate", "Running"),
    ] {
        let old = with_job(rvm(base_spec()), type_, state);
        let moved = with(old.clone(), "/spec/activeSite", json!("secondary"));
        assert_accepted::<ReplicatedVM>(&moved, Some(&old));
    }
    // No status at all.
    let old = rvm(base_spec());
    assert_accepted::<ReplicatedVM>(
        &with(old.clone(), "/spec/activeSite", json!("secondary")),
        Some(&old),
    );
}

fn plan(groups: Value) -> Value {
    json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": "finance-dr", "namespace": "finance"},
        "spec": {"targetSite": "secondary", "groups": groups},
    })
}

#[test]
fn plan_groups_are_checked() {
    let good = plan(json!([
        {"name": "databases", "vms": ["db-01"],
         "preActions": [{"name": "confirm", "manualApproval": {"message": "ok?"}}]},
        {"name": "web", "selector": {"matchLabels": {"tier": "web"}},
         "postActions": [{"name": "warm", "webhook": {"url": "http://127.0.0.1:9000/hooks/warm"}}]},
    ]));
    assert_accepted::<FailoverPlan>(&good, None);
    assert_refused::<FailoverPlan>(
        &plan(json!([{"name": "empty"}])),
        None,
        "needs exactly one of vms",
    );
    assert_refused::<FailoverPlan>(
        &plan(json!([{"name": "both", "vms": ["a"], "selector": {}}])),
        None,
        "needs exactly one of vms",
    );
    assert_refused::<FailoverPlan>(
        &plan(json!([{"name": "a", "vms": ["x"]}, {"name": "a", "vms": ["y"]}])),
        None,
        "spec.groups must have unique names",
    );
    assert_refused::<FailoverPlan>(
        &plan(json!([{"name": "a", "vms": ["x"], "preActions": [{"name": "n"}]}])),
        None,
        "exactly one of manualApproval or webhook",
    );
    assert_refused::<FailoverPlan>(
        &plan(
            json!([{"name": "a", "vms": ["x"], "postActions": [{"name": "n", "webhook": {"url": "ftp://x"}}]}]),
        ),
        None,
        "webhook.url must be an http:// or https:// URL",
    );
}

#[test]
fn webhook_urls_with_credentials_and_a_ca_bundle_over_http_are_refused() {
    let hook = |w: Value| {
        plan(json!([{"name": "a", "vms": ["x"], "postActions": [{"name": "n", "webhook": w}]}]))
    };
    for url in [
        "https://user:p4ss@hooks.example.com/x",
        "https://user@hooks.example.com/x",
        "http://:p4ss@127.0.0.1:9000/x?q=1",
    ] {
        assert_refused::<FailoverPlan>(
            &hook(json!({"url": url})),
            None,
            "webhook.url must not carry credentials",
        );
    }
    // An @ in the path or query is no credential.
    for url in [
        "https://hooks.example.com/to/ops@example.com",
        "https://hooks.example.com/x?mail=ops@example.com",
        "https://hooks.example.com?a=@",
    ] {
        assert_accepted::<FailoverPlan>(&hook(json!({"url": url})), None);
    }
    assert_accepted::<FailoverPlan>(
        &hook(json!({"url": "https://hooks.example.com/x", "caBundle": "PEM"})),
        None,
    );
    assert_refused::<FailoverPlan>(
        &hook(json!({"url": "http://hooks.example.com/x", "caBundle": "PEM"})),
        None,
        "webhook.caBundle is only for an https:// webhook.url",
    );
}

#[test]
fn site_url_must_be_http() {
    let site = |url: &str| {
        json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "Site", "metadata": {"name": "primary"},
            "spec": {"agent": {"url": url,
                               "tokenSecretRef": {"namespace": "twinsite-system", "name": "primary-agent", "key": "token"}}},
        })
    };
    let insecure = |url: &str| with(site(url), "/spec/agent/insecure", json!(true));
    assert_accepted::<Site>(&insecure("http://127.0.0.1:7101"), None);
    assert_refused::<Site>(
        &site("http://127.0.0.1:7101"),
        None,
        "spec.agent.url is http://: use an https:// URL, or set spec.agent.insecure: true",
    );
    assert_refused::<Site>(
        &with(
            site("http://127.0.0.1:7101"),
            "/spec/agent/insecure",
            json!(false),
        ),
        None,
        "spec.agent.insecure: true",
    );
    assert_accepted::<Site>(&site("https://site-a.example:7101/"), None);
    let ca = json!({"namespace": "twinsite-system", "name": "primary-agent-ca", "key": "ca.crt"});
    let https = with(
        site("https://site-a.example:7101"),
        "/spec/agent/caSecretRef",
        ca.clone(),
    );
    assert_accepted::<Site>(&https, None);
    let http = with(
        insecure("http://127.0.0.1:7101"),
        "/spec/agent/caSecretRef",
        ca,
    );
    assert_refused::<Site>(&http, None, "caSecretRef is only for an https:// agent URL");
    assert_refused::<Site>(
        &site("127.0.0.1:7101"),
        None,
        "spec.agent.url must be an http:// or https:// URL",
    );
}

#[test]
fn site_allowed_namespaces_must_be_namespace_names() {
    let site = |names: Value| {
        json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "Site", "metadata": {"name": "primary"},
            "spec": {"agent": {"url": "https://site-a.example:7101",
                               "tokenSecretRef": {"namespace": "twinsite-system", "name": "primary-agent", "key": "token"}},
                     "allowedNamespaces": names},
        })
    };
    assert_accepted::<Site>(&site(json!([])), None);
    assert_accepted::<Site>(&site(json!(["team-a", "b2"])), None);
    for bad in ["Team-A", "-team", "team-", "team_a", "a.b"] {
        assert_refused::<Site>(
            &site(json!(["team-a", bad])),
            None,
            "spec.allowedNamespaces must hold namespace names",
        );
    }
    let s = schema::<Site>();
    let field = &s["properties"]["spec"]["properties"]["allowedNamespaces"];
    assert_eq!(field["x-kubernetes-list-type"], json!("set"));
    assert_eq!(field["items"]["maxLength"], json!(63));
}

#[test]
fn enums_and_defaults_are_in_the_schema() {
    let s = schema::<ReplicatedVM>();
    let failover = &s["properties"]["spec"]["properties"]["failover"]["properties"];
    assert_eq!(failover["type"]["enum"], json!(["Planned", "Unplanned"]));
    assert_eq!(failover["commit"]["enum"], json!(["Automatic", "Manual"]));
    let replication = &s["properties"]["spec"]["properties"]["replication"]["properties"];
    assert_eq!(replication["intervalSeconds"]["default"], json!(300));
    assert_eq!(
        replication["recoveryPointRetentionHours"]["default"],
        json!(24)
    );
    let jobs = &s["properties"]["status"]["properties"]["jobs"];
    assert_eq!(jobs["maxItems"], json!(super::MAX_JOBS));
    assert!(jobs["items"]["properties"]["type"]["enum"].is_array());
}
