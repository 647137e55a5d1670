//! Every manifest in examples/ is accepted by a real API server as written, and `twinsite
//! local` runs them with agents that serve https only.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinsite::envtest;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// (kind, name) of every object in examples/, in file-name order.
fn example_objects() -> Vec<(String, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut objects = vec![];
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap().to_string();
            let name = v["metadata"]["name"].as_str().unwrap().to_string();
            objects.push((kind, name));
        }
    }
    objects
}

#[tokio::test]
async fn every_example_is_accepted_as_written() {
    let cp = envtest::shared().await;
    let objects = example_objects();
    for kind in [
        "Namespace",
        "Secret",
        "Site",
        "ReplicatedVM",
        "FailoverPlan",
    ] {
        assert!(
            objects.iter().any(|(k, _)| k == kind),
            "examples/ has no {kind}"
        );
    }

    // The same command the README and `twinsite local` use.
    let out = cp
        .kubectl()
        .args(["apply", "-R", "-f"])
        .arg(examples_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl apply -f examples/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (kind, name) in &objects {
        // kubectl prints `kind[.group]/name created`.
        let kind = kind.to_lowercase();
        let tail = format!("/{name} created");
        assert!(
            stdout.lines().any(|l| l.ends_with(&tail)
                && (l.starts_with(&format!("{kind}/")) || l.starts_with(&format!("{kind}.")))),
            "no {kind} {name} created in:\n{stdout}"
        );
    }

    // Applied again, nothing changes: defaults filled in by the API server do not fight
    // kubectl apply. (Secrets written with stringData always show as configured.)
    let out = cp
        .kubectl()
        .args(["apply", "-R", "-f"])
        .arg(examples_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.ends_with(" unchanged") && !l.starts_with("secret/"))
            .count(),
        objects.iter().filter(|(k, _)| k != "Secret").count(),
        "{stdout}"
    );

    // What the demo relies on: the sites' addresses and tokens, the VMs' copy frequency.
    let get = |args: &[&str]| {
        let out = cp.kubectl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        get(&["get", "site", "primary", "-o", "jsonpath={.spec.agent.url}"]),
        "https://127.0.0.1:7101"
    );
    assert_eq!(
        get(&[
            "get",
            "site",
            "secondary",
            "-o",
            "jsonpath={.spec.agent.url}"
        ]),
        "https://127.0.0.1:7102"
    );
    for site in ["primary", "secondary"] {
        assert_eq!(
            get(&[
                "get",
                "site",
                site,
                "-o",
                "jsonpath={.spec.agent.caSecretRef.namespace}/{.spec.agent.caSecretRef.name}/{.spec.agent.caSecretRef.key}"
            ]),
            format!("twinsite-system/{site}-agent-ca/ca.crt"),
            "site {site} names no CA Secret"
        );
    }
    for secret in ["primary-agent", "secondary-agent"] {
        let token = get(&[
            "get",
            "secret",
            "-n",
            "twinsite-system",
            secret,
            "-o",
            "jsonpath={.data.token}",
        ]);
        assert!(!token.is_empty(), "secret {secret} has no token");
    }
    let intervals = get(&[
        "get",
        "rvm",
        "-n",
        "finance",
        "-o",
        "jsonpath={range .items[*]}{.spec.replication.intervalSeconds}{\"\\n\"}{end}",
    ]);
    assert!(intervals.lines().count() >= 2, "{intervals}");
    assert!(intervals.lines().all(|l| l == "30"), "{intervals}");
}

/// Two consecutive free ports on 127.0.0.1.
fn free_port_pair() -> u16 {
    loop {
        let port = envtest::free_port().unwrap();
        if port < 65535 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// `twinsite local` makes a CA, runs both agents with https certificates of it, and the Sites
/// it applies use https and that CA: the agents answer https to a client that trusts the CA
/// and refuse plain http, `stack.json` names the CA, both Sites become Ready and the example
/// VMs get protected (replication between the agents over TLS). It shares the machine: the
/// port a controller listens on by default (8080) is taken, and the stack still comes up with
/// the controller's metrics where stack.json says. An agent killed (a site fault tried on the
/// stack) is reported and started again while the rest of the stack runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stack_serves_https_with_its_own_ca() {
    twinsite::init_crypto();
    // Taken here, or by something else on this machine: either way not free for the stack.
    let _taken = std::net::TcpListener::bind("127.0.0.1:8080");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("local");
    let port = free_port_pair();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_twinsite"));
    cmd.arg("local")
        .arg("--dir")
        .arg(&dir)
        .arg("--examples")
        .arg(examples_dir())
        .args(["--disk-bytes", "1048576"])
        .args(["--agent-port", &port.to_string()]);
    let log = tmp.path().join("local.log");
    let mut local = envtest::ManagedChild::spawn("twinsite local", cmd, &log).unwrap();

    // stack.json is written once both agents answer.
    let stack_file = dir.join("stack.json");
    let deadline = Instant::now() + Duration::from_secs(900);
    let stack: serde_json::Value = loop {
        if let Ok(text) = std::fs::read_to_string(&stack_file)
            && let Ok(v) = serde_json::from_str(&text)
        {
            break v;
        }
        if let Err(e) = local.check_running() {
            panic!(
                "{e}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "no stack.json");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    for (i, site) in ["primary", "secondary"].into_iter().enumerate() {
        let s = &stack["sites"][site];
        let addr = format!("127.0.0.1:{}", port + i as u16);
        assert_eq!(s["agentUrl"], format!("https://{addr}"), "{stack}");
        let ca_file = s["caFile"].as_str().expect("stack.json names no caFile");
        let ca = std::fs::read(ca_file).unwrap();
        let trusting = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
            .build()
            .unwrap();
        let r = trusting
            .get(format!("https://{addr}/v1/vms"))
            .bearer_auth(s["token"].as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{site}: {}", r.status());

        // Plain http gets no answer from an agent that serves https.
        let plain = reqwest::Client::new()
            .get(format!("http://{addr}/healthz"))
            .send()
            .await;
        assert!(
            plain.is_err(),
            "{site} answered plain http: {:?}",
            plain.map(|r| r.status())
        );
        // A client that does not trust the stack's CA refuses the agent.
        let other_ca = tempfile::tempdir().unwrap();
        let other = envtest::agent_certificates(other_ca.path(), &[]).unwrap();
        let untrusting = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(other.as_bytes()).unwrap()])
            .build()
            .unwrap();
        assert!(
            untrusting
                .get(format!("https://{addr}/healthz"))
                .send()
                .await
                .is_err(),
            "{site}'s certificate chains to another CA"
        );
    }

    // The controller reaches both agents over https with the CA Secrets, and the example VMs
    // replicate between them.
    let kubeconfig =
        kube::config::Kubeconfig::read_from(stack["kubeconfig"].as_str().unwrap()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).unwrap();
    let sites: kube::Api<twinsite::api::Site> = kube::Api::all(client.clone());
    let rvms: kube::Api<twinsite::api::ReplicatedVM> = kube::Api::namespaced(client, "finance");
    let ready = |v: serde_json::Value| {
        v["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut all = true;
        let mut seen = Vec::new();
        for site in ["primary", "secondary"] {
            // The manifests are applied after stack.json is written.
            let v = serde_json::to_value(sites.get_opt(site).await.unwrap()).unwrap();
            all &= ready(v.clone());
            seen.push(v);
        }
        let list = rvms.list(&Default::default()).await.unwrap();
        all &= !list.items.is_empty();
        for r in list.items {
            let v = serde_json::to_value(r).unwrap();
            all &= v["status"]["phase"] == "Protected";
            seen.push(v);
        }
        if all {
            break;
        }
        if let Err(e) = local.check_running() {
            panic!(
                "{e}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "not every Site Ready and VM Protected: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The controller's metrics are where stack.json says (not on the taken 8080).
    let stack: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stack_file).unwrap()).unwrap();
    let metrics_url = stack["controller"]["metricsUrl"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!metrics_url.contains(":8080/"), "{metrics_url}");
    let r = reqwest::get(&metrics_url).await.unwrap();
    assert!(r.status().is_success(), "{metrics_url}: {}", r.status());

    // The primary's agent is killed: the stack reports it, starts it again (a new pid in
    // stack.json) and keeps running; the agent answers again.
    let old_pid = stack["sites"]["primary"]["pid"].as_u64().unwrap();
    assert_eq!(
        std::process::Command::new("kill")
            .args(["-KILL", &old_pid.to_string()])
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    let ca = std::fs::read(stack["sites"]["primary"]["caFile"].as_str().unwrap()).unwrap();
    let trusting = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .build()
        .unwrap();
    let healthz = format!("https://127.0.0.1:{port}/healthz");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Err(e) = local.check_running() {
            panic!(
                "the stack stopped when an agent died: {e}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let now: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stack_file).unwrap()).unwrap();
        let new_pid = now["sites"]["primary"]["pid"].as_u64();
        let answers = trusting
            .get(&healthz)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if new_pid.is_some_and(|p| p != old_pid) && answers {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the killed agent was not started again: {now}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let printed = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        printed.contains("agent primary") && printed.contains("started again"),
        "the restart was not reported:\n{printed}"
    );
    local.stop(Duration::from_secs(60));
}
