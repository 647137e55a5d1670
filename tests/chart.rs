//! The Helm chart: rendered with `helm template` and checked by a real API server, and the
//! controller run exactly as the chart's Deployment runs it.

mod controller_common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use controller_common::{Agent, LONG, jobs, one_at_a_time, ready};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use serde_yaml::Value;
use twinsite::api::{ReplicatedVM, Site};
use twinsite::envtest::{self, ControlPlane, ManagedChild};

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/twinsite")
}

fn helm_template(cp: &ControlPlane, release: &str, ns: &str, extra: &[&str]) -> Output {
    cp.helm()
        .args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", ns])
        .args(extra)
        .output()
        .unwrap()
}

fn render(cp: &ControlPlane, release: &str, ns: &str, extra: &[&str]) -> String {
    let out = helm_template(cp, release, ns, extra);
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn kubectl_stdin(cp: &ControlPlane, args: &[&str], input: &str) -> Output {
    let mut child = cp
        .kubectl()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn create_namespace(cp: &ControlPlane, ns: &str) {
    let out = cp
        .kubectl()
        .args(["create", "namespace", ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn the_rendered_chart_is_accepted_by_the_api_server() {
    let cp = envtest::shared().await;
    let out = cp
        .helm()
        .args(["lint", "--strict"])
        .arg(chart_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let ns = "chart-dry-run";
    create_namespace(cp, ns);
    // The API server warns when a pod template would break the restricted Pod Security profile.
    let out = cp
        .kubectl()
        .args([
            "label",
            "namespace",
            ns,
            "pod-security.kubernetes.io/warn=restricted",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let yaml = render(cp, "twinsite", ns, &["--include-crds"]);
    let objects = docs(&yaml);
    let mut kinds: Vec<&str> = objects
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
    );

    let out = kubectl_stdin(cp, &["apply", "--dry-run=server", "-f", "-"], &yaml);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the API server refused the chart:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("PodSecurity"),
        "the controller pod breaks the restricted profile:\n{stderr}"
    );
    for d in &objects {
        let name = d["metadata"]["name"].as_str().unwrap();
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(&format!("/{name} ")) && l.ends_with("(server dry run)")),
            "{} {name} not in:\n{stdout}",
            d["kind"].as_str().unwrap()
        );
    }

    // The Deployment runs the controller with its probes on the metrics port.
    let deployment = find(&objects, "Deployment");
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["args"][0], "controller");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    let service = find(&objects, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");

    // The warning check above can fail: a root-capable pod is reported.
    let loose = render(
        cp,
        "loose",
        ns,
        &[
            "--set",
            "podSecurityContext.runAsNonRoot=false,securityContext=null",
        ],
    );
    let out = kubectl_stdin(cp, &["apply", "--dry-run=server", "-f", "-"], &loose);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("violate PodSecurity"));
}

#[tokio::test]
async fn helm_installs_and_uninstalls_the_chart() {
    let cp = envtest::shared().await;
    let ns = "chart-install";
    let out = cp
        .helm()
        .args(["install", "helm-install"])
        .arg(chart_dir())
        .args(["--namespace", ns, "--create-namespace"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cp
        .kubectl()
        .args([
            "get",
            "deployment,serviceaccount,service,role,rolebinding",
            "-n",
            ns,
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&out.stdout);
    for want in [
        "deployment.apps/helm-install-twinsite",
        "serviceaccount/helm-install-twinsite",
        "service/helm-install-twinsite-metrics",
        "role.rbac.authorization.k8s.io/helm-install-twinsite-leader-election",
        "role.rbac.authorization.k8s.io/helm-install-twinsite-secrets",
        "rolebinding.rbac.authorization.k8s.io/helm-install-twinsite-secrets",
    ] {
        assert!(names.lines().any(|l| l == want), "no {want} in:\n{names}");
    }
    let out = cp
        .helm()
        .args(["uninstall", "helm-install", "--namespace", ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm uninstall: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CRDs stay: Helm never deletes what it installed from crds/.
    let out = cp
        .kubectl()
        .args(["get", "crd", "replicatedvms.twinsite.io"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

fn can_i(cp: &ControlPlane, sa: &str, args: &[&str]) -> bool {
    let out = cp
        .kubectl()
        .args(["auth", "can-i", "--as", sa])
        .args(args)
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i {args:?}: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answer == "yes"
}

#[tokio::test]
async fn the_service_account_gets_exactly_what_the_controller_needs() {
    let cp = envtest::shared().await;
    let ns = "chart-rbac";
    create_namespace(cp, ns);
    let yaml = render(cp, "rbac-check", ns, &[]);
    let out = kubectl_stdin(cp, &["apply", "-f", "-"], &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sa = "system:serviceaccount:chart-rbac:rbac-check-twinsite";

    let allowed: &[&[&str]] = &[
        &["list", "replicatedvms.twinsite.io", "-A"],
        &["watch", "failoverplans.twinsite.io", "-A"],
        &["get", "sites.twinsite.io"],
        &["patch", "replicatedvms.twinsite.io", "-n", "finance"],
        &[
            "update",
            "replicatedvms.twinsite.io",
            "--subresource=status",
            "-n",
            "finance",
        ],
        &[
            "patch",
            "failoverplans.twinsite.io",
            "--subresource=status",
            "-n",
            "finance",
        ],
        &["patch", "sites.twinsite.io", "--subresource=status"],
        &[
            "update",
            "replicatedvms.twinsite.io",
            "--subresource=finalizers",
            "-n",
            "finance",
        ],
        // Secrets: get, and create (the pairs' peer credentials), in the controller's
        // namespace only.
        &["get", "secrets", "-n", ns],
        &["create", "secrets", "-n", ns],
        &["create", "events", "-n", "finance"],
        &["patch", "events.events.k8s.io", "-n", "finance"],
        &["get", "leases.coordination.k8s.io", "-n", ns],
        &["create", "leases.coordination.k8s.io", "-n", ns],
        &["update", "leases.coordination.k8s.io", "-n", ns],
    ];
    let refused: &[&[&str]] = &[
        &["create", "replicatedvms.twinsite.io", "-n", "finance"],
        &["delete", "replicatedvms.twinsite.io", "-n", "finance"],
        &["delete", "sites.twinsite.io"],
        &["create", "failoverplans.twinsite.io", "-n", "finance"],
        &["get", "secrets", "-n", "twinsite-system"],
        &["get", "secrets", "-n", "finance"],
        &["get", "secrets", "-A"],
        &["list", "secrets", "-n", ns],
        &["watch", "secrets", "-n", ns],
        &["list", "secrets", "-A"],
        &["create", "secrets", "-n", "finance"],
        &["update", "secrets", "-n", ns],
        &["delete", "secrets", "-n", ns],
        &["delete", "events", "-n", "finance"],
        &["update", "leases.coordination.k8s.io", "-n", "default"],
        &["delete", "leases.coordination.k8s.io", "-n", ns],
        &["get", "configmaps", "-n", ns],
        &["create", "pods", "-n", ns],
        &["update", "customresourcedefinitions.apiextensions.k8s.io"],
    ];
    let mut wrong = vec![];
    for args in allowed {
        if !can_i(cp, sa, args) {
            wrong.push(format!("refused but needed: {args:?}"));
        }
    }
    for args in refused {
        if can_i(cp, sa, args) {
            wrong.push(format!("allowed but not needed: {args:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn values_shape_the_deployment() {
    let cp = envtest::shared().await;
    let yaml = render(
        cp,
        "values",
        "chart-values",
        &[
            "--set",
            "image.repository=registry.example/twinsite,image.tag=1.2.3,image.pullPolicy=Always",
            "--set",
            "logLevel=debug,replicas=2,metrics.port=9090",
            "--set",
            "resources.limits.memory=1Gi",
            "--set",
            "webhooks.allowedHosts={hooks.example.com,*.ops.example.com},webhooks.signingSecret.name=hook-key",
        ],
    );
    let objects = docs(&yaml);
    let deployment = find(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "registry.example/twinsite:1.2.3");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(c["resources"]["limits"]["memory"], "1Gi");
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    let env = |name: &str| {
        c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no env {name}"))["value"]
            .clone()
    };
    assert_eq!(env("RUST_LOG"), "debug");
    assert_eq!(env("TWINSITE_METRICS_ADDR"), "0.0.0.0:9090");
    assert_eq!(env("TWINSITE_LEADER_ELECTION"), "true");
    assert_eq!(
        env("TWINSITE_WEBHOOK_ALLOWED_HOSTS"),
        "hooks.example.com,*.ops.example.com"
    );
    assert_eq!(env("TWINSITE_WEBHOOK_SIGNING_SECRET"), "hook-key");
    assert_eq!(env("TWINSITE_WEBHOOK_SIGNING_SECRET_KEY"), "key");
    // By default: no allow-list and no signing.
    let plain = docs(&render(cp, "plain", "chart-values", &[]));
    let plain_env = find(&plain, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_sequence()
        .unwrap()
        .clone();
    assert!(
        !plain_env.iter().any(|e| e["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("TWINSITE_WEBHOOK"))),
        "{plain_env:?}"
    );

    // Without leader election there is no Lease Role; two replicas would then be refused.
    let objects = docs(&render(
        cp,
        "single",
        "chart-values",
        &["--set", "leaderElection.enabled=false"],
    ));
    assert!(
        !objects
            .iter()
            .any(|d| d["kind"] == "Role"
                && d["metadata"]["name"] == "single-twinsite-leader-election")
    );
    assert!(
        objects
            .iter()
            .any(|d| d["kind"] == "Role" && d["metadata"]["name"] == "single-twinsite-secrets")
    );
    let out = helm_template(
        cp,
        "double",
        "chart-values",
        &["--set", "leaderElection.enabled=false,replicas=2"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("replicas > 1 needs leaderElection.enabled=true")
    );
}

#[test]
fn the_chart_deploys_this_version() {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "charts/twinsite/Chart.yaml appVersion differs from the crate version"
    );
}

#[tokio::test]
async fn bad_values_are_refused_with_the_name_of_the_value() {
    let cp = envtest::shared().await;
    for (set, name) in [
        ("logFormat=xml", "/logFormat"),
        ("metrics.port=0", "/metrics/port"),
        ("leaderElection.enabled=yes", "/leaderElection/enabled"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        (
            "podDisruptionBudget.maxUnavailable=most",
            "/podDisruptionBudget/maxUnavailable",
        ),
        (
            "metrics.serviceMonitor.interval=often",
            "/metrics/serviceMonitor/interval",
        ),
        ("replicaCount=2", "replicaCount"),
        (
            "webhooks.allowedHosts={https://hooks.example.com/x}",
            "/webhooks/allowedHosts/0",
        ),
    ] {
        let out = helm_template(cp, "bad", "chart-bad", &["--set", set]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            err.contains(name),
            "--set {set} refused without naming {name}: {err}"
        );
    }
    // The same check runs at install time: nothing is installed.
    let out = cp
        .helm()
        .args(["install", "bad-install"])
        .arg(chart_dir())
        .args(["--namespace", "chart-bad", "--create-namespace"])
        .args(["--set", "logFormat=xml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/logFormat"));
    let out = cp
        .kubectl()
        .args(["get", "deployment", "-n", "chart-bad", "-o", "name"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
}

#[tokio::test]
async fn optional_objects_render_when_enabled() {
    let cp = envtest::shared().await;
    let objects = docs(&render(cp, "defaults", "chart-optional", &[]));
    assert!(!objects.iter().any(|d| d["kind"] == "ServiceMonitor"));
    let pdb = find(&objects, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let deployment = find(&objects, "Deployment");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    let yaml = render(
        cp,
        "optional",
        "chart-optional",
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.serviceMonitor.labels.release=prom,podDisruptionBudget.minAvailable=1",
        ],
    );
    let objects = docs(&yaml);
    let np = find(&objects, "NetworkPolicy");
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], "metrics");
    let sm = find(&objects, "ServiceMonitor");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    let service = find(&objects, "Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "ServiceMonitor selects {k:?}"
        );
    }
    let pdb = find(&objects, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(pdb["spec"]["maxUnavailable"].is_null());

    // The API server takes the NetworkPolicy and the PodDisruptionBudget (the ServiceMonitor
    // needs the Prometheus Operator's CRDs, which this API server has not).
    create_namespace(cp, "chart-optional");
    let without_sm: Vec<String> = objects
        .iter()
        .filter(|d| d["kind"] != "ServiceMonitor")
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect();
    let out = kubectl_stdin(
        cp,
        &["apply", "--dry-run=server", "-f", "-"],
        &without_sm.join("---\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = helm_template(
        cp,
        "nosvc",
        "chart-optional",
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.service.enabled=false",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("metrics.service.enabled"));
}

/// The egress rules of a rendered NetworkPolicy as (ports, CIDRs) pairs; every rule has ports.
fn egress_rules(np: &Value) -> Vec<(Vec<i64>, Vec<String>)> {
    np["spec"]["egress"]
        .as_sequence()
        .expect("no egress rules")
        .iter()
        .map(|r| {
            let ports: Vec<i64> = r["ports"]
                .as_sequence()
                .unwrap_or_else(|| panic!("an egress rule without ports: {r:?}"))
                .iter()
                .map(|p| p["port"].as_i64().unwrap())
                .collect();
            let cidrs = r["to"]
                .as_sequence()
                .map(|to| {
                    to.iter()
                        .filter_map(|t| t["ipBlock"]["cidr"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            (ports, cidrs)
        })
        .collect()
}

/// The NetworkPolicy is on by default and closes egress to all but DNS, the API server (its
/// addresses looked up at install), the agents' ports and the webhook hosts it is given; the
/// API server takes it as rendered.
#[tokio::test]
async fn the_network_policy_renders_by_default_and_closes_egress() {
    let cp = envtest::shared().await;
    let objects = docs(&render(cp, "np", "chart-np", &[]));
    let np = find(&objects, "NetworkPolicy");
    assert_eq!(
        np["spec"]["policyTypes"],
        serde_yaml::to_value(["Ingress", "Egress"]).unwrap()
    );
    let rules = egress_rules(np);
    let ports: Vec<Vec<i64>> = rules.iter().map(|r| r.0.clone()).collect();
    assert_eq!(ports, [vec![53, 53], vec![443, 6443], vec![7101]]);
    assert!(np["spec"]["egress"][0]["to"][0]["namespaceSelector"].is_mapping());

    // With the addresses given, every rule names where it goes; webhook hosts get a rule.
    let objects = docs(&render(
        cp,
        "np",
        "chart-np",
        &[
            "--set",
            "networkPolicy.apiServer.cidrs={10.0.0.1/32},networkPolicy.agents.cidrs={10.20.0.5/32}",
            "--set",
            "networkPolicy.webhooks.cidrs={10.9.9.9/32},networkPolicy.webhooks.ports={443}",
        ],
    ));
    let rules = egress_rules(find(&objects, "NetworkPolicy"));
    assert_eq!(rules[1], (vec![443, 6443], vec!["10.0.0.1/32".to_string()]));
    assert_eq!(rules[2], (vec![7101], vec!["10.20.0.5/32".to_string()]));
    assert_eq!(rules[3], (vec![443], vec!["10.9.9.9/32".to_string()]));
    assert_eq!(rules.len(), 4);

    // At install (lookup possible) the API server's rule names its addresses: those of the
    // `kubernetes` Endpoints, which a cluster's API server writes (this test one runs without
    // that reconciler, so the test writes them as it would).
    let out = kubectl_stdin(
        cp,
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Endpoints\nmetadata: {name: kubernetes, namespace: default}\n\
         subsets:\n- addresses: [{ip: 10.96.0.1}]\n  ports: [{name: https, port: 6443, protocol: TCP}]\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = render(cp, "np", "chart-np", &["--dry-run=server"]);
    let objects = docs(&yaml);
    let np = find(&objects, "NetworkPolicy");
    let out = cp
        .kubectl()
        .args([
            "get",
            "endpoints",
            "kubernetes",
            "-n",
            "default",
            "-o",
            "yaml",
        ])
        .output()
        .unwrap();
    let ep: Value = serde_yaml::from_slice(&out.stdout).unwrap_or_default();
    let ip = ep["subsets"][0]["addresses"][0]["ip"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "no address in the kubernetes Endpoints: {ep:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string();
    let rules = egress_rules(np);
    assert_eq!(rules[1].1, vec![format!("{ip}/32")]);
    create_namespace(cp, "chart-np");
    let out = kubectl_stdin(
        cp,
        &["apply", "--dry-run=server", "-f", "-"],
        &serde_yaml::to_string(np).unwrap(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Off when asked.
    let objects = docs(&render(
        cp,
        "np",
        "chart-np",
        &["--set", "networkPolicy.enabled=false"],
    ));
    assert!(!objects.iter().any(|d| d["kind"] == "NetworkPolicy"));
}

/// The controller run as the chart's Deployment runs it: its args, its environment (the
/// fieldRef values resolved as the kubelet resolves them), and the API access of the chart's
/// ServiceAccount (a token from the TokenRequest API; KUBECONFIG stands in for the token file
/// the kubelet mounts).
struct ChartController {
    child: Option<ManagedChild>,
    log: PathBuf,
    /// The port the probes use (the container port they name).
    probe_port: u16,
    liveness: String,
    readiness: String,
    pod: String,
    ns: String,
    fullname: String,
    env: Vec<(String, String)>,
    /// A kubeconfig with the ServiceAccount's token.
    kubeconfig: PathBuf,
}

impl ChartController {
    async fn start(
        cp: &ControlPlane,
        release: &str,
        ns: &str,
        tmp: &tempfile::TempDir,
        set: &[&str],
    ) -> ChartController {
        create_namespace(cp, ns);
        let port = envtest::free_port().unwrap();
        let port_value = format!("metrics.port={port}");
        let mut extra = vec!["--set", port_value.as_str()];
        for s in set {
            extra.extend(["--set", s]);
        }
        let yaml = render(cp, release, ns, &extra);
        let out = kubectl_stdin(cp, &["apply", "-f", "-"], &yaml);
        assert!(
            out.status.success(),
            "applying the chart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let objects = docs(&yaml);
        let deployment = find(&objects, "Deployment");
        let fullname = deployment["metadata"]["name"].as_str().unwrap().to_string();
        let pod_spec = &deployment["spec"]["template"]["spec"];
        let c = &pod_spec["containers"][0];
        let pod = format!("{fullname}-6d4b9c7f58-x7k2q");

        let args: Vec<String> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let env: Vec<(String, String)> = c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|e| {
                let name = e["name"].as_str().unwrap().to_string();
                let value = if let Some(v) = e["value"].as_str() {
                    v.to_string()
                } else {
                    match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                        Some("metadata.namespace") => ns.to_string(),
                        Some("metadata.name") => pod.clone(),
                        other => panic!("env {name}: cannot resolve {other:?}"),
                    }
                };
                (name, value)
            })
            .collect();
        let port_of = |probe: &str| {
            let p = &c[probe]["httpGet"]["port"];
            let named = c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|x| &x["name"] == p || &x["containerPort"] == p)
                .unwrap_or_else(|| panic!("{probe} names no container port"));
            named["containerPort"].as_u64().unwrap() as u16
        };
        let probe_port = port_of("livenessProbe");
        assert_eq!(probe_port, port_of("readinessProbe"));
        assert_eq!(probe_port, port);

        // A token of the chart's ServiceAccount, in a kubeconfig of its own.
        let sa = pod_spec["serviceAccountName"].as_str().unwrap();
        let out = cp
            .kubectl()
            .args(["create", "token", sa, "-n", ns, "--duration", "2h"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl create token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let admin: Value =
            serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig_path()).unwrap()).unwrap();
        let cluster = admin["clusters"][0]["cluster"].clone();
        let kubeconfig: Value = serde_yaml::from_str(&format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: sa\n\
             contexts: [{{name: sa, context: {{cluster: c, user: sa, namespace: {ns}}}}}]\n\
             users: [{{name: sa, user: {{token: {token}}}}}]\nclusters: []\n"
        ))
        .unwrap();
        let mut kubeconfig = kubeconfig;
        kubeconfig["clusters"] =
            serde_yaml::to_value(vec![json!({"name": "c", "cluster": cluster})]).unwrap();
        let kc_path = tmp.path().join(format!("{release}-kubeconfig"));
        std::fs::write(&kc_path, serde_yaml::to_string(&kubeconfig).unwrap()).unwrap();

        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_twinsite"));
        cmd.args(&args)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", &kc_path);
        let log = tmp.path().join(format!("{release}-controller.log"));
        let child = ManagedChild::spawn("chart controller", cmd, &log).unwrap();
        let probe = |p: &str| c[p]["httpGet"]["path"].as_str().unwrap().to_string();
        ChartController {
            child: Some(child),
            log,
            probe_port,
            liveness: probe("livenessProbe"),
            readiness: probe("readinessProbe"),
            pod,
            ns: ns.to_string(),
            fullname,
            env,
            kubeconfig: kc_path,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.probe_port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn env(&self, name: &str) -> &str {
        &self
            .env
            .iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("no env {name}"))
            .1
    }

    /// Waits until `path` answers 200; returns the body.
    async fn wait_ok(&mut self, path: &str) -> String {
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(c) = &mut self.child
                && let Err(e) = c.check_running()
            {
                panic!("the controller stopped: {e}\n{}", self.log());
            }
            if let Ok(r) = reqwest::get(self.url(path)).await
                && r.status().is_success()
            {
                return r.text().await.unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "{path} never answered 200 on port {}\n{}",
                self.probe_port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The probes answer, the metrics are served, and the logs are in the chart's format.
    async fn check_probes(&mut self, log_format: &str) {
        let live = self.liveness.clone();
        let ready = self.readiness.clone();
        self.wait_ok(&live).await;
        self.wait_ok(&ready).await;
        let metrics = self.wait_ok("/metrics").await;
        assert!(metrics.contains("# EOF"), "not OpenMetrics:\n{metrics}");
        let log = self.log();
        let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "the controller logged nothing");
        for l in lines {
            let json = serde_json::from_str::<serde_json::Value>(l).is_ok();
            assert_eq!(
                json,
                log_format == "json",
                "log line in the wrong format: {l}"
            );
        }
    }
}

impl Drop for ChartController {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(10));
        }
    }
}

async fn poll<T>(what: &str, log: impl Fn() -> String, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + LONG;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            let log = log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "timed out waiting for {what}\ncontroller log:\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A Site for `agent`, its token in Secret `<site>-agent` of namespace `secret_ns`.
async fn create_site(client: &kube::Client, agent: &Agent, secret_ns: &str) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), secret_ns);
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("{}-agent", agent.site),
            "labels": {"twinsite.io/site": agent.site}},
        "stringData": {"token": agent.token},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let site: Site = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "Site",
        "metadata": {"name": agent.site},
        "spec": {"agent": {
            "url": agent.url,
            "insecure": agent.url.starts_with("http://"),
            "tokenSecretRef": {"namespace": secret_ns, "name": format!("{}-agent", agent.site), "key": "token"},
        }},
    }))
    .unwrap();
    Api::<Site>::all(client.clone())
        .create(&PostParams::default(), &site)
        .await
        .unwrap();
}

fn protected_at(r: &ReplicatedVM, site: &str) -> bool {
    r.status.as_ref().is_some_and(|s| {
        s.phase == Some(twinsite::api::VmPhase::Protected)
            && s.active_site.as_deref() == Some(site)
            && ready(r)
    })
}

#[tokio::test]
async fn the_controller_runs_as_the_chart_deploys_it_and_fails_a_vm_over() {
    let _one = one_at_a_time().await;
    let cp = envtest::shared().await;
    let client = cp.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ns = "chart-run";
    let mut ctl = ChartController::start(cp, "run", ns, &tmp, &[]).await;
    ctl.check_probes("json").await;

    // The Lease is the chart's, held by the pod.
    let lease_name = ctl.env("TWINSITE_LEASE_NAME").to_string();
    assert_eq!(lease_name, format!("{}-leader", ctl.fullname));
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ctl.ns);
    let holder = poll(
        "the chart's Lease",
        || ctl.log(),
        async || {
            leases
                .get_opt(&lease_name)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity)
        },
    )
    .await;
    assert_eq!(holder, ctl.pod);

    // A failover through it: two agents, Sites whose token Secrets live in the controller's
    // namespace, a ReplicatedVM in a namespace of its own.
    let p = Agent::start("chart-run-primary", &tmp).await;
    let s = Agent::start("chart-run-secondary", &tmp).await;
    for a in [&p, &s] {
        create_site(&client, a, ns).await;
    }
    let vm = "chart-vm";
    p.create_vm(vm, true).await;
    p.write(vm, 0, b"written before the failover").await;
    let vms_ns = "chart-run-vms";
    create_namespace(cp, vms_ns);
    let rvms: Api<ReplicatedVM> = Api::namespaced(client.clone(), vms_ns);
    let rvm: ReplicatedVM = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
        "metadata": {"name": vm},
        "spec": {
            "primarySite": p.site, "recoverySite": s.site,
            "replication": {"enabled": true, "intervalSeconds": 30},
            "failover": {"type": "Planned"},
        },
    }))
    .unwrap();
    rvms.create(&PostParams::default(), &rvm).await.unwrap();
    poll(
        "Protected at the primary",
        || ctl.log(),
        async || {
            rvms.get(vm)
                .await
                .ok()
                .map(health_checked)
                .filter(|r| protected_at(r, &p.site))
        },
    )
    .await;
    rvms.patch(
        vm,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"activeSite": s.site}})),
    )
    .await
    .unwrap();
    let r = poll(
        "Protected at the secondary",
        || ctl.log(),
        async || {
            rvms.get(vm)
                .await
                .ok()
                .map(health_checked)
                .filter(|r| protected_at(r, &s.site))
        },
    )
    .await;
    assert!(
        jobs(&r).contains(&("PlannedFailover".into(), "Succeeded".into())),
        "{:?}",
        jobs(&r)
    );
    assert_eq!(
        s.read(vm, 0, 27).await,
        b"written before the failover".to_vec()
    );
    // The Argo CD health check reads the real objects as kstatus does (every sample above was
    // checked too, through the failover): the VM and both Sites are Healthy now.
    assert_eq!(
        assert_health_agrees(&serde_json::to_value(&r).unwrap()).0,
        "Healthy"
    );
    for site in [&p.site, &s.site] {
        let obj = Api::<Site>::all(client.clone()).get(site).await.unwrap();
        assert_eq!(
            assert_health_agrees(&serde_json::to_value(&obj).unwrap()).0,
            "Healthy"
        );
    }
    // /metrics shows what the objects' status says, as the alerts and the dashboard read it:
    // the VM replicating every 30 s from its new site, both Sites Ready, no stale phase.
    let want = [
        format!(r#"twinsite_replication_interval_seconds{{namespace="{vms_ns}",name="{vm}"}} 30"#),
        format!(r#"twinsite_replication_enabled{{namespace="{vms_ns}",name="{vm}"}} 1"#),
        format!(
            r#"twinsite_replication_state{{namespace="{vms_ns}",name="{vm}",state="Replicating"}} 1"#
        ),
        format!(
            r#"twinsite_phase{{kind="ReplicatedVM",namespace="{vms_ns}",name="{vm}",phase="Protected"}} 1"#
        ),
        format!(
            r#"twinsite_condition{{kind="ReplicatedVM",namespace="{vms_ns}",name="{vm}",condition="Ready",reason="Protected"}} 1"#
        ),
        format!(
            r#"twinsite_condition{{kind="ReplicatedVM",namespace="{vms_ns}",name="{vm}",condition="Stalled",reason="NotStalled"}} 0"#
        ),
        format!(
            r#"twinsite_condition{{kind="Site",namespace="",name="{}",condition="Ready",reason="Connected"}} 1"#,
            p.site
        ),
        format!(
            r#"twinsite_condition{{kind="Site",namespace="",name="{}",condition="Ready",reason="Connected"}} 1"#,
            s.site
        ),
    ];
    let deadline = Instant::now() + LONG;
    let last = loop {
        let last = ctl.wait_ok("/metrics").await;
        if want.iter().all(|w| last.lines().any(|l| l == w)) {
            break last;
        }
        assert!(
            Instant::now() < deadline,
            "/metrics lacks {:?}:\n{last}",
            want.iter()
                .filter(|w| !last.lines().any(|l| l == w.as_str()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        !last.contains(r#"phase="FailingOver""#) && !last.contains(r#"reason="JobRunning""#),
        "a phase or reason the VM left is still shown:\n{last}"
    );
    // The probes still answer after the work.
    ctl.check_probes("json").await;
}

/// `r` after checking that the Argo CD health check agrees with kstatus on it.
fn health_checked(r: ReplicatedVM) -> ReplicatedVM {
    assert_health_agrees(&serde_json::to_value(&r).unwrap());
    r
}

#[tokio::test]
async fn without_leader_election_the_chart_controller_runs_without_a_lease() {
    let _one = one_at_a_time().await;
    let cp = envtest::shared().await;
    let client = cp.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ns = "chart-single";
    let mut ctl = ChartController::start(
        cp,
        "single",
        ns,
        &tmp,
        &["leaderElection.enabled=false", "logFormat=text"],
    )
    .await;
    assert_eq!(ctl.env("TWINSITE_LEADER_ELECTION"), "false");
    ctl.check_probes("text").await;
    // It reconciles: a Site becomes Ready (its token Secret in the controller's namespace).
    let a = Agent::start("chart-single-site", &tmp).await;
    create_site(&client, &a, ns).await;
    let sites: Api<Site> = Api::all(client.clone());
    poll(
        "the Site Ready",
        || ctl.log(),
        async || {
            let site = sites.get(&a.site).await.ok()?;
            site.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), ns);
    let list = leases.list(&Default::default()).await.unwrap();
    assert!(list.items.is_empty(), "a Lease was taken without election");
}

fn site_ready(site: &Site) -> Option<(String, String, String)> {
    site.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The Site's Ready condition as (status, reason, message), once it is set.
async fn site_condition(
    sites: &Api<Site>,
    ctl: &ChartController,
    name: &str,
) -> (String, String, String) {
    poll(
        &format!("Site {name} Ready condition"),
        || ctl.log(),
        async || site_ready(&sites.get(name).await.ok()?),
    )
    .await
}

#[tokio::test]
async fn the_controller_reads_secrets_in_its_own_namespace_only() {
    let _one = one_at_a_time().await;
    let cp = envtest::shared().await;
    let client = cp.client().await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ns = "chart-secrets";
    let elsewhere = "chart-secrets-elsewhere";
    let mut ctl = ChartController::start(cp, "secrets", ns, &tmp, &[]).await;
    ctl.check_probes("json").await;
    create_namespace(cp, elsewhere);

    // One agent, three Sites: its token in the controller's namespace (Ready), its token in
    // another namespace (refused), an https URL whose CA Secret is missing (refused).
    let a = Agent::start("chart-secrets-site", &tmp).await;
    create_site(&client, &a, ns).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), elsewhere);
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "token-elsewhere"},
        "stringData": {"token": a.token},
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &s).await.unwrap();
    let sites: Api<Site> = Api::all(client.clone());
    let make = |name: &str, agent: serde_json::Value| -> Site {
        serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "Site",
            "metadata": {"name": name},
            "spec": {"agent": agent},
        }))
        .unwrap()
    };
    let far = "chart-secrets-far";
    sites
        .create(
            &PostParams::default(),
            &make(
                far,
                json!({"url": a.url, "insecure": true, "tokenSecretRef":
                    {"namespace": elsewhere, "name": "token-elsewhere", "key": "token"}}),
            ),
        )
        .await
        .unwrap();
    let no_ca = "chart-secrets-no-ca";
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "no-ca-token", "labels": {"twinsite.io/site": no_ca}},
        "stringData": {"token": a.token},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .unwrap();
    sites
        .create(
            &PostParams::default(),
            &make(
                no_ca,
                json!({
                    "url": a.url.replace("http://", "https://"),
                    "tokenSecretRef": {"namespace": ns, "name": "no-ca-token", "key": "token"},
                    "caSecretRef": {"namespace": ns, "name": "missing-ca", "key": "ca.crt"},
                }),
            ),
        )
        .await
        .unwrap();

    let (status, reason, _) = site_condition(&sites, &ctl, &a.site).await;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Connected"));

    let (status, reason, message) = site_condition(&sites, &ctl, far).await;
    assert_eq!(status, "False");
    assert_eq!(reason, "SecretNamespace");
    for want in [
        "spec.agent.tokenSecretRef.namespace",
        elsewhere,
        &format!("namespace {ns}"),
    ] {
        assert!(message.contains(want), "no {want:?} in: {message}");
    }

    let (status, reason, message) = site_condition(&sites, &ctl, no_ca).await;
    assert_eq!(status, "False");
    assert_eq!(reason, "CAUnavailable");
    assert!(
        message.contains("spec.agent.caSecretRef") && message.contains("missing-ca"),
        "{message}"
    );
    assert!(!ctl.log().contains(&a.token), "a token was logged");

    // A Ready Site turned to a Secret elsewhere is refused as well.
    sites
        .patch(
            &a.site,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"agent": {"tokenSecretRef":
                {"namespace": elsewhere, "name": "token-elsewhere", "key": "token"}}}})),
        )
        .await
        .unwrap();
    let reason = poll(
        "the Ready Site refused",
        || ctl.log(),
        async || {
            let (status, reason, _) = site_ready(&sites.get(&a.site).await.ok()?)?;
            (status == "False").then_some(reason)
        },
    )
    .await;
    assert_eq!(reason, "SecretNamespace");

    // The chart's ServiceAccount itself cannot read Secrets anywhere else, nor list them.
    let kubectl_sa = |args: &[&str]| {
        let out = std::process::Command::new(cp.bin_dir().join("kubectl"))
            .arg("--kubeconfig")
            .arg(&ctl.kubeconfig)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = kubectl_sa(&["get", "secret", "token-elsewhere", "-n", elsewhere]);
    assert!(!ok && err.contains("Forbidden"), "{err}");
    let (ok, err) = kubectl_sa(&["get", "secrets", "-n", ns]);
    assert!(!ok && err.contains("Forbidden"), "{err}");
    let name = format!("{}-agent", a.site);
    let (ok, err) = kubectl_sa(&["get", "secret", &name, "-n", ns]);
    assert!(ok, "{err}");
}

// ---- Argo CD health check (charts/twinsite/argocd/health.lua) -------------------------------

/// The Lua interpreter the health check runs in here (Debian's lua5.4, installed by
/// scripts/ops-packages.sh as root; Argo CD runs the same script in gopher-lua).
fn lua() -> std::process::Command {
    let lua = std::env::var("TWINSITE_LUA").unwrap_or_else(|_| "lua5.4".into());
    if std::process::Command::new(&lua).arg("-v").output().is_err() {
        panic!("{lua} not found: run scripts/ops-packages.sh as root (installs Debian's lua5.4)");
    }
    std::process::Command::new(lua)
}

/// `v` as a Lua table constructor, the way Argo CD hands an object to a health script (JSON
/// nulls are absent fields).
fn lua_literal(v: &serde_json::Value, out: &mut String) {
    use serde_json::Value as J;
    match v {
        J::Null => out.push_str("nil"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => out.push_str(&format!("{s:?}")),
        J::Array(a) => {
            out.push('{');
            for x in a {
                lua_literal(x, out);
                out.push(',');
            }
            out.push('}');
        }
        J::Object(m) => {
            out.push('{');
            for (k, x) in m {
                if x.is_null() {
                    continue;
                }
                out.push_str(&format!("[{k:?}]="));
                lua_literal(x, out);
                out.push(',');
            }
            out.push('}');
        }
    }
}

/// What the chart's health check answers for `obj`: (status, message).
fn argo_health(obj: &serde_json::Value) -> (String, String) {
    let script = std::fs::read_to_string(chart_dir().join("argocd/health.lua")).unwrap();
    let mut prog = String::from("obj = ");
    lua_literal(obj, &mut prog);
    prog.push_str("\nlocal hs = (function()\n");
    prog.push_str(&script);
    prog.push_str("\nend)()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n");
    let out = lua().args(["-e", &prog]).output().unwrap();
    assert!(
        out.status.success(),
        "health.lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

/// How kstatus (as Flux reads it) sees `obj`: Current, InProgress or Failed.
fn kstatus(obj: &serde_json::Value) -> &'static str {
    let st = &obj["status"];
    let generation = obj["metadata"]["generation"].as_i64();
    if let (Some(g), Some(o)) = (generation, st["observedGeneration"].as_i64())
        && o != g
    {
        return "InProgress";
    }
    let conds = st["conditions"].as_array().cloned().unwrap_or_default();
    let is = |t: &str, s: &str| conds.iter().any(|c| c["type"] == t && c["status"] == s);
    // kstatus reads the conditions in order; the first True Reconciling or Stalled decides.
    for c in &conds {
        if c["status"] == "True" && c["type"] == "Reconciling" {
            return "InProgress";
        }
        if c["status"] == "True" && c["type"] == "Stalled" {
            return "Failed";
        }
    }
    // Flux waits for Ready=True on a kind that has a Ready condition.
    if is("Ready", "False") || is("Ready", "Unknown") {
        return "InProgress";
    }
    "Current"
}

/// The health check and kstatus agree on `obj`: Healthy exactly when Current, Degraded
/// whenever Failed, and Progressing or Suspended only while InProgress.
/// One difference, on purpose: before the controller wrote any condition, kstatus cannot tell
/// and says Current; the health check says Progressing (waiting for the controller).
fn assert_health_agrees(obj: &serde_json::Value) -> (String, String) {
    let (health, message) = argo_health(obj);
    if obj["status"]["conditions"]
        .as_array()
        .is_none_or(|c| c.is_empty())
    {
        assert_eq!(health, "Progressing", "{message}");
        return (health, message);
    }
    let k = kstatus(obj);
    let ok = match health.as_str() {
        "Healthy" => k == "Current",
        "Degraded" => k != "Current",
        "Progressing" | "Suspended" => k == "InProgress",
        _ => false,
    };
    assert!(
        ok,
        "Argo CD health {health} ({message}) disagrees with kstatus {k} on {}",
        serde_json::to_string_pretty(obj).unwrap()
    );
    (health, message)
}

fn conds(
    want: &[twinsite::controller::conditions::Cond],
    generation: i64,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let mut out = Vec::new();
    twinsite::controller::conditions::set_all(
        &mut out,
        want,
        Some(generation),
        jiff::Timestamp::now(),
    );
    out
}

#[test]
fn the_argocd_health_check_reads_every_phase_as_kstatus_does() {
    use twinsite::api::{
        FailoverPlan, FailoverPlanStatus, PlanPhase, ReplicatedVMStatus, ReplicationHealth,
        ReplicationState, ReplicationStatus, SiteStatus, VmPhase,
    };
    use twinsite::controller::conditions::{
        COMMIT_PENDING, CONFLICT, Cond, READY, RECONCILING, STALLED,
    };

    let rvm = |generation: i64,
               observed: i64,
               phase: VmPhase,
               health: Option<ReplicationHealth>,
               want: &[Cond]| {
        let mut r: ReplicatedVM = serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
            "metadata": {"name": "web-01", "namespace": "finance", "generation": generation},
            "spec": {"primarySite": "primary", "recoverySite": "secondary"},
        }))
        .unwrap();
        r.status = Some(ReplicatedVMStatus {
            observed_generation: Some(observed),
            phase: Some(phase),
            active_site: Some("primary".into()),
            replication: health.map(|h| ReplicationStatus {
                state: ReplicationState::Replicating,
                source_site: Some("primary".into()),
                target_site: Some("secondary".into()),
                health: Some(h),
                last_sync_time: None,
                rpo_seconds: Some(700),
                settings: None,
                progress: None,
                divergences: None,
            }),
            conditions: conds(want, observed),
            ..Default::default()
        });
        serde_json::to_value(&r).unwrap()
    };
    let idle = || Cond::new(RECONCILING, false, "Idle", "no job runs");
    let not_stalled = || Cond::new(STALLED, false, "NotStalled", "");
    let no_commit = || Cond::new(COMMIT_PENDING, false, "NoCommitPending", "");
    let no_conflict = || Cond::new(CONFLICT, false, "NoConflict", "");
    let running = |job: &str, step: &str| {
        let msg = format!("{job} web-01-x-1 at step {step}");
        [
            Cond::new(READY, false, "JobRunning", msg.clone()),
            Cond::new(RECONCILING, true, job.to_string(), msg),
            not_stalled(),
            no_commit(),
            no_conflict(),
        ]
    };
    use VmPhase::*;
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "Pending: a site does not answer yet",
            rvm(
                1,
                1,
                Pending,
                None,
                &[
                    Cond::new(
                        READY,
                        false,
                        "SiteUnreachable",
                        "site primary does not answer",
                    ),
                    Cond::new(
                        RECONCILING,
                        true,
                        "SiteUnreachable",
                        "site primary does not answer",
                    ),
                    not_stalled(),
                    no_commit(),
                    no_conflict(),
                ],
            ),
            "Progressing",
        ),
        (
            "InitialReplication",
            rvm(
                1,
                1,
                InitialReplication,
                Some(ReplicationHealth::Warning),
                &running("EnableReplication", "InitialReplication"),
            ),
            "Progressing",
        ),
        (
            "Protected",
            rvm(
                1,
                1,
                Protected,
                Some(ReplicationHealth::Healthy),
                &[
                    Cond::new(READY, true, "Protected", "runs at primary as the spec says"),
                    idle(),
                    not_stalled(),
                    no_commit(),
                    no_conflict(),
                ],
            ),
            "Healthy",
        ),
        (
            "Protected, RPO critical (the alerts cover it; kstatus says Current)",
            rvm(
                1,
                1,
                Protected,
                Some(ReplicationHealth::Critical),
                &[
                    Cond::new(READY, true, "Protected", "runs at primary as the spec says"),
                    idle(),
                    not_stalled(),
                    no_commit(),
                    no_conflict(),
                ],
            ),
            "Healthy",
        ),
        (
            "Unprotected",
            rvm(
                2,
                2,
                Unprotected,
                None,
                &[
                    Cond::new(
                        READY,
                        true,
                        "Unprotected",
                        "runs at primary as the spec says",
                    ),
                    idle(),
                    not_stalled(),
                    no_commit(),
                    no_conflict(),
                ],
            ),
            "Healthy",
        ),
        (
            "Protected, but the spec changed since",
            rvm(
                3,
                2,
                Protected,
                Some(ReplicationHealth::Healthy),
                &[
                    Cond::new(READY, true, "Protected", "runs at primary as the spec says"),
                    idle(),
                    not_stalled(),
                    no_commit(),
                    no_conflict(),
                ],
            ),
            "Progressing",
        ),
        (
            "FailingOver",
            rvm(
                2,
                2,
                FailingOver,
                None,
                &running("PlannedFailover", "SyncRemaining"),
            ),
            "Progressing",
        ),
        (
            "FailedOver, waiting for a manual commit",
            rvm(
                2,
                2,
                FailedOver,
                None,
                &[
                    Cond::new(READY, false, "CommitPending", "waiting for the commit"),
                    Cond::new(RECONCILING, true, "CommitPending", "waiting for the commit"),
                    not_stalled(),
                    Cond::new(
                        COMMIT_PENDING,
                        true,
                        "WaitingForCommit",
                        "annotate the ReplicatedVM with twinsite.io/commit=web-01-failover-2 to commit",
                    ),
                    no_conflict(),
                ],
            ),
            "Suspended",
        ),
        (
            "FailedOver, committing",
            rvm(2, 2, FailedOver, None, &running("Commit", "Commit")),
            "Progressing",
        ),
        (
            "Reprotecting (a reverse replication job)",
            rvm(
                2,
                2,
                Reprotecting,
                None,
                &running("ReverseReplicate", "Resynchronize"),
            ),
            "Progressing",
        ),
        (
            "Reprotecting (a resync the source started)",
            rvm(
                2,
                2,
                Reprotecting,
                Some(ReplicationHealth::Warning),
                &[
                    Cond::new(READY, false, "Resynchronizing", "the source resynchronizes"),
                    Cond::new(
                        RECONCILING,
                        true,
                        "Resynchronizing",
                        "the source resynchronizes",
                    ),
                    not_stalled(),
                    no_commit(),
                    no_conflict(),
                ],
            ),
            "Progressing",
        ),
        (
            "Failed",
            rvm(
                2,
                2,
                Failed,
                None,
                &[
                    Cond::new(
                        READY,
                        false,
                        "JobFailed",
                        "PlannedFailover web-01-failover-2 failed: shutdown timed out",
                    ),
                    idle(),
                    Cond::new(
                        STALLED,
                        true,
                        "JobFailed",
                        "annotate twinsite.io/retry=web-01-failover-2",
                    ),
                    no_commit(),
                    no_conflict(),
                ],
            ),
            "Degraded",
        ),
        (
            "Protected, but the VM is off at its active site",
            rvm(
                1,
                1,
                Protected,
                Some(ReplicationHealth::Warning),
                &[
                    Cond::new(READY, false, "VMNotRunning", "the VM is off at primary"),
                    idle(),
                    Cond::new(STALLED, true, "VMNotRunning", "the VM is off at primary"),
                    no_commit(),
                    no_conflict(),
                ],
            ),
            "Degraded",
        ),
        (
            "Conflict with a FailoverPlan",
            rvm(
                1,
                1,
                Protected,
                Some(ReplicationHealth::Healthy),
                &[
                    Cond::new(READY, false, "Conflict", "selected by two plans"),
                    idle(),
                    Cond::new(STALLED, true, "Conflict", "selected by two plans"),
                    no_commit(),
                    Cond::new(CONFLICT, true, "TwoPlans", "selected by two plans"),
                ],
            ),
            "Degraded",
        ),
    ];

    let plan = |phase: PlanPhase, want: &[Cond]| {
        let mut p: FailoverPlan = serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
            "metadata": {"name": "finance-dr", "namespace": "finance", "generation": 2},
            "spec": {"targetSite": "secondary", "groups": [{"name": "db", "vms": ["db-01"]}]},
        }))
        .unwrap();
        p.status = Some(FailoverPlanStatus {
            observed_generation: Some(2),
            phase: Some(phase),
            conditions: conds(want, 2),
            ..Default::default()
        });
        serde_json::to_value(&p).unwrap()
    };
    let no_wait = || Cond::new("WaitingForApproval", false, "NotWaiting", "");
    let plan_cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "plan Pending",
            plan(
                PlanPhase::Pending,
                &[
                    Cond::new(READY, false, "Pending", "the plan has not run yet"),
                    Cond::new(
                        RECONCILING,
                        true,
                        "Pending",
                        "waiting for the plan's members",
                    ),
                    Cond::new(STALLED, false, "Healthy", ""),
                    no_conflict(),
                    no_wait(),
                ],
            ),
            "Progressing",
        ),
        (
            "plan InProgress",
            plan(
                PlanPhase::InProgress,
                &[
                    Cond::new(
                        READY,
                        false,
                        "JobRunning",
                        "plan job finance-dr-failover-1 is running",
                    ),
                    Cond::new(
                        RECONCILING,
                        true,
                        "JobRunning",
                        "plan job finance-dr-failover-1",
                    ),
                    Cond::new(STALLED, false, "Healthy", ""),
                    no_conflict(),
                    no_wait(),
                ],
            ),
            "Progressing",
        ),
        (
            "plan InProgress, waiting for an approval",
            plan(
                PlanPhase::InProgress,
                &[
                    Cond::new(
                        READY,
                        false,
                        "JobRunning",
                        "plan job finance-dr-failover-1 is running",
                    ),
                    Cond::new(
                        RECONCILING,
                        true,
                        "JobRunning",
                        "plan job finance-dr-failover-1",
                    ),
                    Cond::new(STALLED, false, "Healthy", ""),
                    no_conflict(),
                    Cond::new(
                        "WaitingForApproval",
                        true,
                        "WaitingForApproval",
                        "annotate twinsite.io/approve=db/confirm-fenced",
                    ),
                ],
            ),
            "Suspended",
        ),
        (
            "plan Completed",
            plan(
                PlanPhase::Completed,
                &[
                    Cond::new(
                        READY,
                        true,
                        "Completed",
                        "every VM of the plan is at secondary",
                    ),
                    Cond::new(RECONCILING, false, "Idle", ""),
                    Cond::new(STALLED, false, "Healthy", ""),
                    no_conflict(),
                    no_wait(),
                ],
            ),
            "Healthy",
        ),
        (
            "plan Failed",
            plan(
                PlanPhase::Failed,
                &[
                    Cond::new(
                        READY,
                        false,
                        "JobFailed",
                        "plan job finance-dr-failover-1 failed",
                    ),
                    Cond::new(RECONCILING, false, "Idle", ""),
                    Cond::new(STALLED, true, "JobFailed", "db-01 failed"),
                    no_conflict(),
                    no_wait(),
                ],
            ),
            "Degraded",
        ),
    ];

    let site = |ready: Cond| {
        let mut s: Site = serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "Site",
            "metadata": {"name": "primary", "generation": 1},
            "spec": {"agent": {"url": "http://127.0.0.1:7101",
                "tokenSecretRef": {"namespace": "twinsite-system", "name": "primary-agent", "key": "token"}}},
        }))
        .unwrap();
        s.status = Some(SiteStatus {
            observed_generation: Some(1),
            conditions: conds(&[ready], 1),
            ..Default::default()
        });
        serde_json::to_value(&s).unwrap()
    };
    let site_cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "site Connected",
            site(Cond::new(READY, true, "Connected", "12 VMs")),
            "Healthy",
        ),
        (
            "site Unreachable",
            site(Cond::new(READY, false, "Unreachable", "connection refused")),
            "Degraded",
        ),
        (
            "site Unauthorized",
            site(Cond::new(READY, false, "Unauthorized", "401")),
            "Degraded",
        ),
    ];

    let mut seen = std::collections::BTreeSet::new();
    for (what, obj, want) in cases.iter().chain(&plan_cases).chain(&site_cases) {
        let (health, message) = assert_health_agrees(obj);
        assert_eq!(&health, want, "{what}: {message}");
        assert!(!message.is_empty(), "{what}: no message");
        seen.insert(health);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["Degraded", "Healthy", "Progressing", "Suspended"]
    );
    // The message says why: the failed job's retry value, the RPO of a critical replication.
    let (_, m) = argo_health(&cases[11].1);
    assert!(m.contains("twinsite.io/retry=web-01-failover-2"), "{m}");
    let (_, m) = argo_health(&cases[3].1);
    assert!(m.contains("Critical") && m.contains("700"), "{m}");
    // No status yet: waiting for the controller.
    let mut bare = cases[0].1.clone();
    bare.as_object_mut().unwrap().remove("status");
    assert_eq!(argo_health(&bare).0, "Progressing");
}

// ---- Alerts (templates/prometheusrule.yaml) and the dashboard --------------------------------

/// `helm` without a cluster (`helm template` needs none), its homes under `tmp`.
fn helm_offline(tmp: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(envtest::bin_dir().unwrap().join("helm"));
    cmd.env("HELM_CACHE_HOME", tmp.join("helm/cache"))
        .env("HELM_CONFIG_HOME", tmp.join("helm/config"))
        .env("HELM_DATA_HOME", tmp.join("helm/data"));
    cmd
}

fn render_offline(tmp: &Path, values: &[&str]) -> Output {
    helm_offline(tmp)
        .args(["template", "twinsite"])
        .arg(chart_dir())
        .args(["--namespace", "twinsite-system"])
        .args(values)
        .output()
        .unwrap()
}

/// Debian's promtool: `TWINSITE_PROMTOOL`, else `promtool` on PATH, else the one
/// scripts/ops-packages.sh takes out of Debian's prometheus package (cached).
fn promtool() -> std::process::Command {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let p = PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("TWINSITE_PROMTOOL") {
            return PathBuf::from(p);
        }
        if std::process::Command::new("promtool")
            .arg("--version")
            .output()
            .is_ok()
        {
            return PathBuf::from("promtool");
        }
        let out = std::process::Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ops-packages.sh"),
        )
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "scripts/ops-packages.sh failed: promtool is needed"
        );
        let text = String::from_utf8(out.stdout).unwrap();
        Path::new(text.lines().last().unwrap().trim()).join("promtool")
    });
    std::process::Command::new(p)
}

/// The metric names the controller's registry serves on /metrics (a counter `x` is served as
/// `x_total`). A family shows only once it has a series, so each gets one here;
/// `the_controller_runs_as_the_chart_deploys_it_and_fails_a_vm_over` checks a running
/// controller's /metrics for the status series the alerts use.
fn exported_metric_names() -> std::collections::BTreeSet<String> {
    use twinsite::controller::metrics::*;
    let m = Metrics::new();
    let vm = VmLabels {
        namespace: "ns".into(),
        name: "vm".into(),
    };
    let kind = KindLabels {
        kind: "ReplicatedVM".into(),
    };
    m.rpo_seconds.get_or_create(&vm).set(1);
    m.bytes_replicated.get_or_create(&vm).set(1);
    m.jobs
        .get_or_create(&JobKind {
            r#type: "PlannedFailover".into(),
            outcome: "Failed".into(),
        })
        .inc();
    m.reconcile_errors.get_or_create(&kind).inc();
    m.status_writes.get_or_create(&kind).inc();
    m.site_listings
        .get_or_create(&SiteLabels {
            site: "primary".into(),
        })
        .inc();
    let mut gauges = StatusGauges::default();
    gauges.show(
        &m,
        Snapshot {
            kind: "ReplicatedVM",
            namespace: "ns".into(),
            name: "vm".into(),
            conditions: vec![("Ready".into(), "Protected".into(), true)],
            phase: Some("Protected".into()),
            replication_enabled: Some(true),
            replication_interval: Some(300),
            replication_state: Some("Replicating".into()),
            replica_divergences: Some(0),
        },
    );
    let mut text = m.encode();
    // The site agents' metrics (their own /metrics), with one VM of every kind of series.
    let agent = twinsite::agent::metrics::Metrics::new();
    agent.sent("vm", 1);
    agent.received("vm", 1);
    agent.cycle("vm", 0.5, true);
    agent.cycle("vm", 0.5, false);
    agent.verified("vm", 0);
    let list: twinsite::site::VmList = serde_json::from_value(json!({
        "site": "primary",
        "vms": [{"name": "vm", "power": "Off", "role": "Replica", "integrationServices": true,
                 "disks": [], "replication": {"state": "Replicating", "peerSite": "secondary",
                 "pendingBytes": 1}, "recoveryPoints": {"count": 1}}],
    }))
    .unwrap();
    text.push_str(&agent.encode(&list));
    let mut names = std::collections::BTreeSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_string());
                }
            }
        }
    }
    assert!(names.contains("twinsite_rpo_seconds"), "{text}");
    assert!(names.contains("twinsite_agent_recovery_points"), "{text}");
    names
}

/// Every `twinsite_*` metric name in a PromQL expression.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("twinsite_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn the_prometheus_rule_passes_promtool_and_its_unit_tests() {
    let tmp = tempfile::tempdir().unwrap();
    let ok = |out: Output| {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    // Off by default.
    let objects = docs(&ok(render_offline(tmp.path(), &[])));
    assert!(!objects.iter().any(|d| d["kind"] == "PrometheusRule"));
    // The schema refuses a wait of no minutes, naming the value.
    let out = render_offline(
        tmp.path(),
        &["--set", "prometheusRule.approvalWaitMinutes=0"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("prometheusRule/approvalWaitMinutes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let objects = docs(&ok(render_offline(
        tmp.path(),
        &[
            "--set",
            "prometheusRule.enabled=true,prometheusRule.approvalWaitMinutes=20",
            "--set",
            "prometheusRule.labels.release=prom",
        ],
    )));
    let rule = find(&objects, "PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "prom");
    assert_eq!(rule["metadata"]["namespace"], "twinsite-system");
    let groups = &rule["spec"]["groups"];
    let rules_file = tmp.path().join("rules.yaml");
    std::fs::write(
        &rules_file,
        serde_yaml::to_string(&serde_yaml::Mapping::from_iter([(
            Value::from("groups"),
            groups.clone(),
        )]))
        .unwrap(),
    )
    .unwrap();
    let out = ok(promtool()
        .arg("check")
        .arg("rules")
        .arg(&rules_file)
        .output()
        .unwrap());
    assert!(out.contains("SUCCESS: 10 rules found"), "{out}");

    // Every expression names only metrics the controller exports.
    let exported = exported_metric_names();
    let mut alerts = std::collections::BTreeSet::new();
    for g in groups.as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().unwrap().to_string();
            let expr = r["expr"].as_str().unwrap();
            let used = metric_names_in(expr);
            assert!(!used.is_empty(), "{name}: no twinsite metric in {expr}");
            for m in used {
                assert!(
                    exported.contains(&m),
                    "{name} uses {m}, which the controller does not export ({exported:?})"
                );
            }
            alerts.insert(name);
        }
    }

    // The unit tests: input series, expected alerts; one firing case at least per alert.
    let tests_src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/alerts/twinsite_test.yaml");
    let tests_file = tmp.path().join("twinsite_test.yaml");
    std::fs::copy(&tests_src, &tests_file).unwrap();
    let unit: Value = serde_yaml::from_str(&std::fs::read_to_string(&tests_src).unwrap()).unwrap();
    let mut fired = std::collections::BTreeSet::new();
    for t in unit["tests"].as_sequence().unwrap() {
        for a in t["alert_rule_test"].as_sequence().unwrap() {
            if a["exp_alerts"].as_sequence().is_some_and(|e| !e.is_empty()) {
                fired.insert(a["alertname"].as_str().unwrap().to_string());
            }
        }
    }
    assert_eq!(
        fired, alerts,
        "every alert needs a unit test where it fires"
    );
    let out = promtool()
        .current_dir(tmp.path())
        .args(["test", "rules", "twinsite_test.yaml"])
        .output()
        .unwrap();
    ok(out);
}

#[test]
fn the_dashboard_queries_only_metrics_the_controller_or_agents_export() {
    let tmp = tempfile::tempdir().unwrap();
    let file = chart_dir().join("dashboards/twinsite.json");
    let text = std::fs::read_to_string(&file).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exported = exported_metric_names();
    let check = |what: &str, expr: &str| {
        let used = metric_names_in(expr);
        assert!(!used.is_empty(), "{what}: no twinsite metric in {expr}");
        for m in used {
            assert!(
                exported.contains(&m),
                "{what} queries {m}, which neither the controller nor the agent exports ({exported:?})"
            );
        }
    };
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        let title = p["title"].as_str().unwrap();
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let e = t["expr"].as_str().unwrap();
            check(title, e);
            exprs.push(e.to_string());
        }
    }
    assert!(exprs.len() >= 9, "{exprs:?}");
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("twinsite_agent_replication_sent_bytes_total"))
            && exprs
                .iter()
                .any(|e| e.contains("twinsite_agent_replication_cycle_duration_seconds_bucket")),
        "the dashboard shows the agents' bytes and cycle durations: {exprs:?}"
    );
    for v in dash["templating"]["list"].as_array().unwrap() {
        if v["type"] == "query" {
            check(
                v["name"].as_str().unwrap(),
                v["query"]["query"].as_str().unwrap(),
            );
        }
    }
    // Every panel query is PromQL promtool parses (as recording rules; Grafana's $variables
    // only appear inside label matchers' strings).
    let rules: Vec<serde_json::Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"record": format!("dashboard:query_{i}"), "expr": e}))
        .collect();
    let rules_file = tmp.path().join("dashboard-rules.yaml");
    std::fs::write(
        &rules_file,
        serde_yaml::to_string(&json!({"groups": [{"name": "dashboard", "rules": rules}]})).unwrap(),
    )
    .unwrap();
    let out = promtool()
        .arg("check")
        .arg("rules")
        .arg(&rules_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The chart ships it, when asked, for Grafana's sidecar.
    let out = render_offline(tmp.path(), &[]);
    assert!(
        !docs(&String::from_utf8(out.stdout).unwrap())
            .iter()
            .any(|d| d["kind"] == "ConfigMap")
    );
    let out = render_offline(tmp.path(), &["--set", "grafanaDashboard.enabled=true"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = docs(&String::from_utf8(out.stdout).unwrap());
    let cm = find(&objects, "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: serde_json::Value =
        serde_json::from_str(cm["data"]["twinsite.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dash);
}
