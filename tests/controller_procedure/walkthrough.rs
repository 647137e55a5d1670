//! docs/walkthrough.md, run: every command of its `console test` blocks runs in a shell
//! against this test's stack (kubectl, the `kubectl twinsite` plugin process, curl to the
//! agent), and its output must match the page once ages, durations and numbers are masked.
//! Then the plugin's script side (`-o json|yaml`, `--dry-run`, refusals) and the agents'
//! /metrics after all that replication.
//!
//! `TWINSITE_WALKTHROUGH_UPDATE=1` writes the outputs of this run into the page instead of
//! comparing them (then review the diff).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// One command of the page and the output the page shows for it.
#[derive(Debug)]
struct Step {
    command: String,
    expected: Vec<String>,
    /// Line range of the expected output in the page (for the update mode).
    lines: std::ops::Range<usize>,
}

/// The commands of the page's `console test` blocks, in order.
fn steps(page: &str) -> Vec<Step> {
    let lines: Vec<&str> = page.lines().collect();
    let mut out: Vec<Step> = vec![];
    let mut in_block = false;
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if !in_block {
            in_block = l.trim() == "```console test";
            i += 1;
            continue;
        }
        if l.trim() == "```" {
            in_block = false;
            i += 1;
            continue;
        }
        if let Some(cmd) = l.strip_prefix("$ ") {
            let mut command = cmd.to_string();
            i += 1;
            // Continued lines, and a here-document up to its EOF.
            while command.ends_with('\\') && i < lines.len() {
                command.push('\n');
                command.push_str(lines[i]);
                i += 1;
            }
            if command.contains("<<EOF") {
                while i < lines.len() {
                    command.push('\n');
                    command.push_str(lines[i]);
                    i += 1;
                    if lines[i - 1] == "EOF" {
                        break;
                    }
                }
            }
            let start = i;
            while i < lines.len() && !lines[i].starts_with("$ ") && lines[i].trim() != "```" {
                i += 1;
            }
            out.push(Step {
                command,
                expected: lines[start..i].iter().map(|s| s.to_string()).collect(),
                lines: start..i,
            });
            continue;
        }
        panic!("walkthrough.md line {}: output before any command", i + 1);
    }
    out
}

/// A line with whatever differs between runs masked: durations and ages (`1.2s`, `4m10s`)
/// become `<d>`, other numbers `<n>`; runs of spaces (column widths) become one.
fn shape(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    let is_word = |c: Option<&char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            // A duration: one or more of digits[.digits] then ms|s|m|h|d, not followed by a letter.
            let mut j = i;
            let mut groups = 0;
            loop {
                let mut k = j;
                while k < chars.len() && (chars[k].is_ascii_digit() || chars[k] == '.') {
                    k += 1;
                }
                if k == j {
                    break;
                }
                // A unit ends the number's word, or another group follows (`4m10s`).
                let unit = ["ms", "s", "m", "h", "d"].iter().find(|u| {
                    let u: Vec<char> = u.chars().collect();
                    let next = chars.get(k + u.len());
                    chars.get(k..k + u.len()) == Some(&u[..])
                        && (!is_word(next) || next.is_some_and(|c| c.is_ascii_digit()))
                });
                match unit {
                    Some(u) => {
                        j = k + u.len();
                        groups += 1;
                    }
                    None => break,
                }
            }
            if groups > 0 {
                out.push_str("<d>");
                i = j;
            } else {
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                out.push_str("<n>");
            }
            continue;
        }
        if c.is_whitespace() {
            while i < chars.len() && chars[i].is_whitespace() {
                i += 1;
            }
            out.push(' ');
            continue;
        }
        out.push(c);
        i += 1;
    }
    out.trim().to_string()
}

#[test]
fn shape_masks_what_differs_between_runs() {
    assert_eq!(
        shape("crm-01   primary   Protected   12   4m10s  1.2s ago  rp-000003 64 MiB 0.1s"),
        "crm-<n> primary Protected <n> <d> <d> ago rp-<n> <n> MiB <d>"
    );
    assert_eq!(shape("Phase:   FailedOver"), "Phase: FailedOver");
}

struct Shell {
    path: String,
    kubeconfig: PathBuf,
    envs: Vec<(String, String)>,
}

impl Shell {
    fn run(&self, cmd: &str) -> std::process::Output {
        Command::new("bash")
            .args(["-c", cmd])
            .env("PATH", &self.path)
            .env("KUBECONFIG", &self.kubeconfig)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }
}

fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_kubectl-twinsite"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walkthrough_page_runs_as_written() {
    let _serial = one_at_a_time().await;
    // The Sites of `twinsite local`, as on the page (no other test of this binary names them).
    let w = World::start_sites(
        "walk",
        &[],
        true,
        [&[], &[]],
        Some(["primary", "secondary"]),
    )
    .await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());

    // kubectl and the plugin on PATH, the test's namespace as the context's.
    let kubeconfig = w.tmp.path().join("kubeconfig");
    std::fs::copy(w.cp.kubeconfig_path(), &kubeconfig).unwrap();
    let path = format!(
        "{}:{}:{}",
        plugin_dir().display(),
        w.cp.bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let sh = Shell {
        path,
        kubeconfig,
        envs: vec![
            ("PRIMARY_URL".into(), w.primary.url.clone()),
            ("PRIMARY_TOKEN".into(), w.primary.token.clone()),
            (
                "CA_FILE".into(),
                w.tmp
                    .path()
                    .join("certs/agent-ca.crt")
                    .display()
                    .to_string(),
            ),
        ],
    };
    let out = sh.run(&format!(
        "kubectl config set-context --current --namespace {}",
        w.ns
    ));
    assert!(out.status.success(), "{out:?}");

    let page_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/walkthrough.md");
    let page = std::fs::read_to_string(&page_file).unwrap();
    let steps = steps(&page);
    assert!(steps.len() >= 15, "{steps:#?}");
    // The page's site and namespace names are those of `twinsite local`.
    let word = |text: &str, from: &str, to: &str| -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find(from) {
            let before = rest[..i].chars().last();
            let after = rest[i + from.len()..].chars().next();
            let alone = |c: Option<char>| !c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-');
            out.push_str(&rest[..i]);
            out.push_str(if alone(before) && alone(after) {
                to
            } else {
                from
            });
            rest = &rest[i + from.len()..];
        }
        out + rest
    };
    let update = std::env::var_os("TWINSITE_WALKTHROUGH_UPDATE").is_some();
    let mut page_lines: Vec<String> = page.lines().map(str::to_string).collect();
    let mut replaced: Vec<(std::ops::Range<usize>, Vec<String>)> = vec![];
    for step in &steps {
        let cmd = word(&word(&step.command, "primary", &p), "secondary", &s);
        let out = sh.run(&cmd);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let objects = sh.run("kubectl get rvm -o yaml");
            panic!(
                "`{cmd}` failed:\n{text}\nobjects:\n{}\ncontroller log:\n{}",
                String::from_utf8_lossy(&objects.stdout),
                w.controller.log()
            );
        }
        assert!(!text.contains('\x1b'), "colour in a pipe: {text:?}");
        let actual: Vec<String> = text
            .lines()
            .map(|l| {
                word(
                    &word(&word(l, &p, "primary"), &s, "secondary"),
                    &w.ns,
                    "crm",
                )
            })
            .collect();
        if update {
            replaced.push((step.lines.clone(), actual));
            continue;
        }
        let want: Vec<String> = step.expected.iter().map(|l| shape(l)).collect();
        let got: Vec<String> = actual.iter().map(|l| shape(l)).collect();
        assert_eq!(
            got,
            want,
            "`{}` printed (masked) what the page does not show:\n{}\npage:\n{}",
            step.command,
            actual.join("\n"),
            step.expected.join("\n")
        );
    }
    if update {
        for (range, lines) in replaced.into_iter().rev() {
            page_lines.splice(range, lines);
        }
        std::fs::write(&page_file, page_lines.join("\n") + "\n").unwrap();
    }

    script_side(&w, &sh).await;
    agent_metrics(&w).await;
}

/// `-o json|yaml`, `--dry-run` and a refused action, on the walkthrough's VM.
async fn script_side(w: &World, sh: &Shell) {
    let vm = "crm-01";
    let before = w.get(vm).await;
    let out = sh.run(&format!("kubectl twinsite failback {vm} --dry-run -o json"));
    assert!(out.status.success(), "{out:?}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["dryRun"], true);
    assert_eq!(r["patch"]["spec"]["activeSite"], w.primary.site);
    let after = w.get(vm).await;
    assert_eq!(
        after.metadata.generation, before.metadata.generation,
        "a dry run changes nothing"
    );

    let out = sh.run("kubectl twinsite status -o yaml");
    assert!(out.status.success(), "{out:?}");
    let list: Vec<twinsite::api::ReplicatedVM> = serde_yaml::from_slice(&out.stdout).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].metadata.name.as_deref(), Some(vm));

    let out = sh.run(&format!("kubectl twinsite status {vm} -o json"));
    let one: twinsite::api::ReplicatedVM = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        one.status.and_then(|s| s.active_site),
        Some(w.secondary.site.clone())
    );

    // A plan approval is the annotation, added to what is there.
    let plan: twinsite::api::FailoverPlan = serde_json::from_value(serde_json::json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": "crm-dr", "annotations": {"twinsite.io/approve": "app/other"}},
        "spec": {"targetSite": w.secondary.site, "groups": [{"name": "app", "vms": [vm],
                 "preActions": [{"name": "confirm", "manualApproval": {"message": "ok?"}}]}]},
    }))
    .unwrap();
    let plans: kube::Api<twinsite::api::FailoverPlan> =
        kube::Api::namespaced(w.client.clone(), &w.ns);
    plans
        .create(&kube::api::PostParams::default(), &plan)
        .await
        .unwrap();
    let out = sh.run("kubectl twinsite approve crm-dr app/confirm");
    assert!(out.status.success(), "{out:?}");
    let approved = plans.get("crm-dr").await.unwrap();
    let value = approved.metadata.annotations.unwrap()["twinsite.io/approve"].clone();
    assert!(
        value.starts_with("app/other,app/confirm"),
        "{value}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = sh.run("kubectl twinsite approve crm-dr confirm");
    assert!(!out.status.success(), "{out:?}");

    let out = sh.run(&format!("kubectl twinsite failover {vm} --to elsewhere"));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site elsewhere is neither"), "{err}");
    let out = sh.run(&format!("kubectl twinsite retry {vm} {vm}-nope"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("has no job"),
        "{out:?}"
    );
}

/// Both agents replicated (each way once at least): their /metrics show every agent metric
/// the chart's dashboard queries, with the walkthrough's VM.
async fn agent_metrics(w: &World) {
    let ca = std::fs::read(w.tmp.path().join("certs/agent-ca.crt")).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .build()
        .unwrap();
    let mut names = std::collections::BTreeSet::new();
    let mut text = String::new();
    for a in [&w.primary, &w.secondary] {
        // No token: Prometheus scrapes it as it scrapes /healthz.
        let resp = http.get(format!("{}/metrics", a.url)).send().await.unwrap();
        assert!(resp.status().is_success(), "{resp:?}");
        let body = resp.text().await.unwrap();
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            if let Some(name) = l.split(['{', ' ']).next() {
                names.insert(name.to_string());
            }
        }
        text.push_str(&body);
    }
    for m in [
        "twinsite_agent_replication_sent_bytes_total{vm=\"crm-01\"}",
        "twinsite_agent_replication_received_bytes_total{vm=\"crm-01\"}",
        "twinsite_agent_replication_cycle_duration_seconds_count{vm=\"crm-01\"}",
        "twinsite_agent_recovery_points{vm=\"crm-01\"}",
    ] {
        assert!(
            text.contains(m),
            "{m} missing from the agents' /metrics:\n{text}"
        );
    }
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/twinsite/dashboards/twinsite.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut used = 0;
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            let e = t["expr"].as_str().unwrap();
            let mut rest = e;
            while let Some(i) = rest.find("twinsite_agent_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let m = &tail[..end];
                // Errors have no series until a cycle fails; the rest must be there.
                if !m.starts_with("twinsite_agent_replication_errors") {
                    assert!(
                        names.contains(m),
                        "the dashboard queries {m}, which no agent exported after replicating:\n{text}"
                    );
                    used += 1;
                }
                rest = &tail[end..];
            }
        }
    }
    assert!(used >= 4, "the dashboard queries the agents' metrics");
}
