//! The CRDs against a real kube-apiserver: schemas, defaults, CEL rules and printer columns.

use std::io::Write;
use std::process::{Output, Stdio};

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use twinsite::api::{FailoverPlan, ReplicatedVM};
use twinsite::envtest::{self, ControlPlane};

/// `kubectl apply` of a YAML document, in a namespace.
fn apply(cp: &ControlPlane, ns: &str, yaml: &str) -> Output {
    let mut child = cp
        .kubectl()
        .args(["apply", "-n", ns, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[track_caller]
fn assert_applied(cp: &ControlPlane, ns: &str, yaml: &str) {
    let out = apply(cp, ns, yaml);
    assert!(
        out.status.success(),
        "refused:\n{yaml}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kubectl_ok(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn create_namespace(cp: &ControlPlane, ns: &str) {
    kubectl_ok(cp, &["create", "namespace", ns]);
}

fn rvm(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: twinsite.io/v1alpha1\nkind: ReplicatedVM\nmetadata:\n  name: {name}\n\
         spec:\n  primarySite: primary\n  recoverySite: secondary\n{extra}"
    )
}

fn plan(name: &str, body: &str) -> String {
    format!(
        "apiVersion: twinsite.io/v1alpha1\nkind: FailoverPlan\nmetadata:\n  name: {name}\n\
         spec:\n  targetSite: secondary\n{body}"
    )
}

/// A Site manifest; an http:// URL comes with `insecure: true`, as it must.
fn site(name: &str, url: &str) -> String {
    let insecure = if url.starts_with("http://") {
        "    insecure: true\n"
    } else {
        ""
    };
    format!(
        "apiVersion: twinsite.io/v1alpha1\nkind: Site\nmetadata:\n  name: {name}\nspec:\n  agent:\n    \
         url: {url}\n{insecure}    tokenSecretRef: {{namespace: twinsite-system, name: {name}-agent, key: token}}\n"
    )
}

/// One refused manifest: an optional valid object created first (for update rules), the
/// manifest that must be refused, and a fragment of kubectl's error naming the field.
struct Case {
    what: &'static str,
    before: Option<String>,
    manifest: String,
    fragment: &'static str,
}

fn case(what: &'static str, manifest: String, fragment: &'static str) -> Case {
    Case {
        what,
        before: None,
        manifest,
        fragment,
    }
}

fn update(what: &'static str, before: String, manifest: String, fragment: &'static str) -> Case {
    Case {
        what,
        before: Some(before),
        manifest,
        fragment,
    }
}

fn invalid_manifests() -> Vec<Case> {
    vec![
        case(
            "recoverySite equal to primarySite",
            "apiVersion: twinsite.io/v1alpha1\nkind: ReplicatedVM\nmetadata:\n  name: same-sites\n\
             spec:\n  primarySite: primary\n  recoverySite: primary\n"
                .into(),
            "spec.recoverySite must differ from spec.primarySite",
        ),
        case(
            "activeSite neither of the two",
            rvm("third-site", "  activeSite: tertiary\n"),
            "spec.activeSite must be spec.primarySite or spec.recoverySite",
        ),
        case(
            "intervalSeconds 60",
            rvm("interval-60", "  replication: {intervalSeconds: 60}\n"),
            "spec.replication.intervalSeconds must be 30, 300 or 900",
        ),
        case(
            "retention 25 hours",
            rvm("retention-25", "  replication: {recoveryPointRetentionHours: 25}\n"),
            "spec.replication.recoveryPointRetentionHours must be between 0 and 24",
        ),
        case(
            "retention -1 hours",
            rvm("retention-neg", "  replication: {recoveryPointRetentionHours: -1}\n"),
            "spec.replication.recoveryPointRetentionHours must be between 0 and 24",
        ),
        case(
            "app-consistent every 13 hours",
            rvm("app-13", "  replication: {appConsistentFrequencyHours: 13}\n"),
            "spec.replication.appConsistentFrequencyHours must be between 0 and 12",
        ),
        case(
            "a step deadline of 5 seconds",
            rvm("step-5", "  failover: {stepTimeoutSeconds: 5}\n"),
            "spec.failover.stepTimeoutSeconds in body should be greater than or equal to 10",
        ),
        case(
            "a copy deadline over a week",
            rvm("copy-8d", "  replication: {copyTimeoutSeconds: 691200}\n"),
            "spec.replication.copyTimeoutSeconds in body should be less than or equal to 604800",
        ),
        case(
            "unknown failover type",
            rvm("type-sideways", "  failover: {type: Sideways}\n"),
            "spec.failover.type: Unsupported value: \"Sideways\": supported values: \"Planned\", \"Unplanned\"",
        ),
        case(
            "unknown commit mode",
            rvm("commit-later", "  failover: {commit: Later}\n"),
            "spec.failover.commit: Unsupported value: \"Later\": supported values: \"Automatic\", \"Manual\"",
        ),
        case(
            "unknown recovery point",
            rvm("rp-newest", "  failover: {recoveryPoint: Newest}\n"),
            "failover.recoveryPoint must be Latest, LatestProcessed, LatestAppConsistent or a recovery point id rp-<id>",
        ),
        case(
            "missing primarySite",
            "apiVersion: twinsite.io/v1alpha1\nkind: ReplicatedVM\nmetadata:\n  name: no-primary\n\
             spec:\n  recoverySite: secondary\n"
                .into(),
            "spec.primarySite: Required value",
        ),
        update(
            "primarySite changed",
            rvm("moves-primary", ""),
            "apiVersion: twinsite.io/v1alpha1\nkind: ReplicatedVM\nmetadata:\n  name: moves-primary\n\
             spec:\n  primarySite: elsewhere\n  recoverySite: secondary\n"
                .into(),
            "spec.primarySite is immutable",
        ),
        update(
            "recoverySite changed",
            rvm("moves-recovery", ""),
            "apiVersion: twinsite.io/v1alpha1\nkind: ReplicatedVM\nmetadata:\n  name: moves-recovery\n\
             spec:\n  primarySite: primary\n  recoverySite: elsewhere\n"
                .into(),
            "spec.recoverySite is immutable",
        ),
        update(
            "interval changed to 120",
            rvm("interval-update", ""),
            rvm("interval-update", "  replication: {intervalSeconds: 120}\n"),
            "spec.replication.intervalSeconds must be 30, 300 or 900",
        ),
        case(
            "plan group with neither vms nor selector",
            plan("group-empty", "  groups:\n  - name: web\n"),
            "spec.groups[] needs exactly one of vms (ReplicatedVM names) or selector",
        ),
        case(
            "plan groups with the same name",
            plan(
                "group-twice",
                "  groups:\n  - {name: web, vms: [web-01]}\n  - {name: web, vms: [web-02]}\n",
            ),
            "spec.groups must have unique names",
        ),
        case(
            "plan with an unknown failover type",
            plan(
                "plan-type",
                "  failover: {type: Sometime}\n  groups:\n  - {name: web, vms: [web-01]}\n",
            ),
            "spec.failover.type: Unsupported value: \"Sometime\"",
        ),
        case(
            "plan with an unknown recovery point",
            plan(
                "plan-rp",
                "  failover: {recoveryPoint: yesterday}\n  groups:\n  - {name: web, vms: [web-01]}\n",
            ),
            "failover.recoveryPoint must be Latest",
        ),
        case(
            "plan action with neither approval nor webhook",
            plan(
                "plan-action",
                "  groups:\n  - name: web\n    vms: [web-01]\n    preActions: [{name: wait}]\n",
            ),
            "needs exactly one of manualApproval or webhook",
        ),
        update(
            "vmName changed",
            rvm("renamed", ""),
            rvm("renamed", "  vmName: another-vm\n"),
            "spec.vmName is immutable",
        ),
        case(
            "vmName with a slash",
            rvm("slashed", "  vmName: web/01\n"),
            "spec.vmName in body should match",
        ),
        case(
            "site with a CA but an http URL",
            format!(
                "{}    caSecretRef: {{namespace: twinsite-system, name: ca, key: ca.crt}}\n",
                site("crds-invalid-ca", "http://127.0.0.1:7101")
            ),
            "spec.agent.caSecretRef is only for an https:// agent URL",
        ),
        case(
            "site with an http URL and no insecure",
            site("crds-invalid-http", "http://127.0.0.1:7101").replace("    insecure: true\n", ""),
            "spec.agent.url is http://: use an https:// URL, or set spec.agent.insecure: true",
        ),
        case(
            "site with a URL that is not http",
            site("crds-invalid-ftp", "ftp://127.0.0.1:7101"),
            "spec.agent.url must be an http:// or https:// URL",
        ),
        case(
            "site mapping one network twice",
            format!(
                "{}  networkMappings:\n  - {{site: primary, from: prod-a, to: prod-b}}\n  \
                 - {{site: primary, from: prod-a, to: prod-c}}\n",
                site("crds-invalid-map-twice", "http://127.0.0.1:7101")
            ),
            "spec.networkMappings must map each (site, from) network once",
        ),
        case(
            "site mapping to a network name with a slash",
            format!(
                "{}  networkMappings:\n  - {{site: primary, from: prod-a, to: prod/b}}\n",
                site("crds-invalid-map-name", "http://127.0.0.1:7101")
            ),
            "spec.networkMappings[0].to in body should match",
        ),
    ]
}

#[tokio::test]
async fn invalid_manifests_are_refused_with_their_message() {
    let cp = envtest::shared().await;
    let ns = "crds-invalid";
    create_namespace(cp, ns);
    let cases = invalid_manifests();
    assert!(cases.len() >= 12);
    let mut failures = vec![];
    for c in &cases {
        if let Some(before) = &c.before {
            assert_applied(cp, ns, before);
        }
        let out = apply(cp, ns, &c.manifest);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Shown with --nocapture: what a person sees for each refusal.
        println!("{}:\n  {}", c.what, stderr.trim());
        if out.status.success() {
            failures.push(format!("{}: accepted\n{}", c.what, c.manifest));
        } else if !stderr.contains(c.fragment) {
            failures.push(format!(
                "{}: refused, but without {:?}:\n{stderr}",
                c.what, c.fragment
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // Refused updates changed nothing.
    let got = kubectl_ok(
        cp,
        &[
            "get",
            "rvm",
            "-n",
            ns,
            "moves-primary",
            "-o",
            "jsonpath={.spec.primarySite}",
        ],
    );
    assert_eq!(got, "primary");
}

#[tokio::test]
async fn valid_manifests_are_accepted_and_defaulted() {
    let cp = envtest::shared().await;
    let ns = "crds-valid";
    create_namespace(cp, ns);
    assert_applied(cp, ns, &rvm("minimal", ""));
    assert_applied(
        cp,
        ns,
        &rvm(
            "full",
            "  vmName: full-vm\n  activeSite: secondary\n  replication:\n    enabled: false\n    \
             intervalSeconds: 900\n    recoveryPointRetentionHours: 0\n    appConsistentFrequencyHours: 12\n    \
             copyTimeoutSeconds: 3600\n  \
             failover: {type: Unplanned, shutdownSource: false, recoveryPoint: rp-000123, commit: Manual, \
             stepTimeoutSeconds: 120}\n  \
             testFailover: {enabled: true, network: drill}\n",
        ),
    );
    assert_applied(
        cp,
        ns,
        &plan(
            "full",
            "  maxParallel: 4\n  groups:\n  - name: databases\n    vms: [db-01, db-02]\n    preActions:\n    \
             - {name: confirm-fenced, manualApproval: {message: DBA confirms}}\n  - name: web\n    \
             selector: {matchLabels: {tier: web}}\n    postActions:\n    \
             - {name: warm-cache, webhook: {url: 'http://127.0.0.1:9000/hooks/warm', timeoutSeconds: 600}}\n",
        ),
    );
    assert_applied(
        cp,
        ns,
        &site("crds-valid-site", "https://site-a.example:7101"),
    );
    assert_applied(
        cp,
        ns,
        &format!(
            "{}  networkMappings:\n  - {{site: primary, from: prod-a, to: prod-b}}\n  \
             - {{site: tertiary, from: prod-a, to: prod-c}}\n",
            site("crds-valid-mapped", "https://site-b.example:7101")
        ),
    );

    // The schema's defaults are filled in by the API server.
    let json: serde_json::Value = serde_json::from_str(&kubectl_ok(
        cp,
        &["get", "rvm", "-n", ns, "minimal", "-o", "json"],
    ))
    .unwrap();
    assert_eq!(
        json["spec"]["replication"],
        json!({"enabled": true, "intervalSeconds": 300, "recoveryPointRetentionHours": 24,
               "appConsistentFrequencyHours": 0})
    );
    assert_eq!(
        json["spec"]["failover"],
        json!({"type": "Planned", "shutdownSource": true, "recoveryPoint": "Latest",
               "commit": "Automatic"})
    );
    assert_eq!(
        json["spec"]["testFailover"],
        json!({"enabled": false, "network": "isolated"})
    );
    // Applying the same manifest again changes nothing: defaults do not fight kubectl apply.
    let out = apply(cp, ns, &rvm("minimal", ""));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged"));
}

fn failover_status(state: &str) -> serde_json::Value {
    json!({"status": {"jobs": [
        {"name": "guarded-enable-1", "type": "EnableReplication", "state": "Succeeded", "steps": []},
        {"name": "guarded-failover-2", "type": "UnplannedFailover", "state": state,
         "sourceSite": "primary", "targetSite": "secondary",
         "steps": [{"name": "StartAtTarget", "state": "Running"}]},
    ]}})
}

#[tokio::test]
async fn a_running_failover_cannot_be_cancelled() {
    let cp = envtest::shared().await;
    let ns = "crds-failover";
    create_namespace(cp, ns);
    assert_applied(cp, ns, &rvm("guarded", "  activeSite: secondary\n"));
    let api: Api<ReplicatedVM> = Api::namespaced(cp.client().await.unwrap(), ns);
    api.patch_status(
        "guarded",
        &PatchParams::default(),
        &Patch::Merge(failover_status("Running")),
    )
    .await
    .unwrap();

    for back in [
        rvm("guarded", "  activeSite: primary\n"),
        // Unset means primarySite: also a cancellation.
        rvm("guarded", ""),
    ] {
        let out = apply(cp, ns, &back);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "a change of activeSite was accepted");
        for fragment in [
            "spec.activeSite",
            "a failover in progress cannot be cancelled",
            "a cancelled failover would leave the VM unreplicated",
        ] {
            assert!(stderr.contains(fragment), "no {fragment:?} in:\n{stderr}");
        }
    }
    // Other changes stay allowed while the failover runs.
    assert_applied(
        cp,
        ns,
        &rvm(
            "guarded",
            "  activeSite: secondary\n  replication: {intervalSeconds: 30}\n",
        ),
    );

    // Once the job has ended, the VM can be sent back.
    api.patch_status(
        "guarded",
        &PatchParams::default(),
        &Patch::Merge(failover_status("Succeeded")),
    )
    .await
    .unwrap();
    assert_applied(cp, ns, &rvm("guarded", "  activeSite: primary\n"));
}

#[tokio::test]
async fn status_jobs_are_bounded() {
    let cp = envtest::shared().await;
    let ns = "crds-jobs";
    create_namespace(cp, ns);
    assert_applied(cp, ns, &rvm("busy", ""));
    let api: Api<ReplicatedVM> = Api::namespaced(cp.client().await.unwrap(), ns);
    let jobs = |n: usize| {
        let list: Vec<_> = (0..n)
            .map(|i| json!({"name": format!("busy-{i}"), "type": "TestFailover", "state": "Succeeded"}))
            .collect();
        json!({"status": {"jobs": list}})
    };
    let pp = PatchParams::default();
    api.patch_status("busy", &pp, &Patch::Merge(jobs(twinsite::api::MAX_JOBS)))
        .await
        .unwrap();
    let err = api
        .patch_status(
            "busy",
            &pp,
            &Patch::Merge(jobs(twinsite::api::MAX_JOBS + 1)),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("status.jobs"), "{err}");

    // A plan keeps as many.
    assert_applied(
        cp,
        ns,
        &plan("busy", "  groups:\n  - {name: web, vms: [busy]}\n"),
    );
    let plans: Api<FailoverPlan> = Api::namespaced(cp.client().await.unwrap(), ns);
    plans
        .patch_status("busy", &pp, &Patch::Merge(jobs(twinsite::api::MAX_JOBS)))
        .await
        .unwrap();
    let err = plans
        .patch_status(
            "busy",
            &pp,
            &Patch::Merge(jobs(twinsite::api::MAX_JOBS + 1)),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("status.jobs"), "{err}");
}

#[tokio::test]
async fn kubectl_get_shows_the_printer_columns() {
    let cp = envtest::shared().await;
    let ns = "crds-columns";
    create_namespace(cp, ns);
    assert_applied(cp, ns, &rvm("web-01", "  activeSite: secondary\n"));
    let api: Api<ReplicatedVM> = Api::namespaced(cp.client().await.unwrap(), ns);
    api.patch_status(
        "web-01",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Protected", "activeSite": "primary",
            "replication": {"state": "Resynchronizing", "health": "Warning", "rpoSeconds": 212,
                "progress": {"doneBytes": 42, "totalBytes": 100, "percent": 42, "summary": "42%"}},
        }})),
    )
    .await
    .unwrap();
    let out = kubectl_ok(cp, &["get", "rvm", "-n", ns]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "ACTIVE",
            "DESIRED",
            "PHASE",
            "REPLICATION",
            "HEALTH",
            "RPO",
            "PROGRESS",
            "AGE"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..8],
        [
            "web-01",
            "primary",
            "secondary",
            "Protected",
            "Resynchronizing",
            "Warning",
            "212",
            "42%"
        ]
    );

    assert_applied(
        cp,
        ns,
        &plan("finance-dr", "  groups:\n  - {name: web, vms: [web-01]}\n"),
    );
    let out = kubectl_ok(cp, &["get", "fp", "-n", ns]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TARGET", "PHASE", "GROUPS", "AGE"]);

    assert_applied(cp, ns, &site("crds-columns-site", "http://127.0.0.1:7101"));
    let out = kubectl_ok(cp, &["get", "site", "crds-columns-site"]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "READY", "URL", "VMS", "AGE"]);
    assert!(lines.next().unwrap().contains("http://127.0.0.1:7101"));
}

#[tokio::test]
async fn the_crds_install_established_and_reinstall_cleanly() {
    let cp = envtest::shared().await;
    // Installing again (an upgrade with the same CRDs) is accepted: the rules' cost stays
    // within the API server's budget and nothing changes.
    cp.install_crds().await.unwrap();
    for crd in twinsite::api::crds() {
        let name = crd.metadata.name.unwrap();
        let established = kubectl_ok(
            cp,
            &[
                "get",
                "crd",
                &name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
            ],
        );
        assert_eq!(established, "True", "{name}");
    }
    // The checked-in file installs with kubectl too, as a person would install it.
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/twinsite.yaml");
    let out = cp
        .kubectl()
        .args(["apply", "--server-side", "--force-conflicts", "-f"])
        .arg(&crds)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = kubectl_ok(
        cp,
        &["api-resources", "--api-group=twinsite.io", "-o", "name"],
    );
    let mut names: Vec<&str> = names.lines().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "failoverplans.twinsite.io",
            "replicatedvms.twinsite.io",
            "sites.twinsite.io"
        ]
    );
}
