//! The Helm chart: rendered with `helm template` and checked by a real API server.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde_yaml::Value;
use twinsite::envtest::{self, ControlPlane};

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
            "Role",
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
        &["get", "secrets", "-n", "twinsite-system"],
        &["watch", "secrets", "-A"],
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
        &["create", "secrets", "-n", "twinsite-system"],
        &["update", "secrets", "-n", "twinsite-system"],
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

    // Without leader election there is no Lease Role; two replicas would then be refused.
    let objects = docs(&render(
        cp,
        "single",
        "chart-values",
        &["--set", "leaderElection.enabled=false"],
    ));
    assert!(!objects.iter().any(|d| d["kind"] == "Role"));
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
