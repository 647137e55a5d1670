//! `twinsite local`: the whole stack on this machine, for a first look and for demos.
//!
//! A real etcd + kube-apiserver, two site agents (primary on 127.0.0.1:7101, secondary on
//! 127.0.0.1:7102) holding the example VMs, the controller, and every manifest in examples/
//! applied. Everything stops on Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::envtest::{ControlPlane, ManagedChild, Options};

#[derive(clap::Args, Debug)]
pub struct LocalArgs {
    /// Folder for the control plane, agents and logs; emptied at start.
    #[arg(long, default_value = ".twinsite-local")]
    pub dir: PathBuf,
    /// Folder of manifests to apply.
    #[arg(long, default_value = "examples")]
    pub examples: PathBuf,
    /// Size of each example VM's disk.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub disk_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Envtest(#[from] crate::envtest::EnvtestError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Setup(String),
}

/// The demo sites: name, listen address.
const SITES: [(&str, &str); 2] = [
    ("primary", "127.0.0.1:7101"),
    ("secondary", "127.0.0.1:7102"),
];

pub async fn run(args: LocalArgs) -> Result<(), LocalError> {
    let dir = std::path::absolute(&args.dir).map_err(|e| LocalError::Io(args.dir.clone(), e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| LocalError::Io(dir.clone(), e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| LocalError::Io(dir.clone(), e))?;
    let manifests = read_manifests(&args.examples)?;

    println!("starting etcd and kube-apiserver (the first run builds them, about 8 minutes)...");
    let cp = ControlPlane::start_with(Options {
        dir: Some(dir.join("control-plane")),
        unsafe_no_fsync: false,
        apiserver_port: None,
    })
    .await?;
    cp.install_crds().await?;

    let exe = std::env::current_exe().map_err(|e| LocalError::Io("twinsite".into(), e))?;
    let http = reqwest::Client::new();
    let mut children: Vec<ManagedChild> = Vec::new();
    for (site, addr) in SITES {
        let token = secret_token(&manifests, &format!("{site}-agent")).ok_or_else(|| {
            LocalError::Setup(format!(
                "no Secret {site}-agent with stringData.token in {}",
                args.examples.display()
            ))
        })?;
        let site_dir = dir.join(site);
        std::fs::create_dir_all(&site_dir).map_err(|e| LocalError::Io(site_dir.clone(), e))?;
        let token_file = site_dir.join("token");
        std::fs::write(&token_file, &token).map_err(|e| LocalError::Io(token_file.clone(), e))?;
        let mut cmd = Command::new(&exe);
        cmd.args(["agent", "--site", site, "--listen", addr])
            .arg("--data-dir")
            .arg(site_dir.join("data"))
            .arg("--token-file")
            .arg(&token_file);
        println!("starting the {site} site agent on {addr}");
        children.push(ManagedChild::spawn(
            &format!("agent {site}"),
            cmd,
            &site_dir.join("agent.log"),
        )?);
        wait_http(&http, &format!("http://{addr}/healthz")).await?;
    }

    // The VMs that the example ReplicatedVMs protect, running at their primary site.
    for rvm in manifests.iter().filter(|m| m["kind"] == "ReplicatedVM") {
        let name = rvm["spec"]["vmName"]
            .as_str()
            .or(rvm["metadata"]["name"].as_str())
            .unwrap_or_default();
        let primary = rvm["spec"]["primarySite"].as_str().unwrap_or_default();
        let Some((_, addr)) = SITES.iter().find(|(s, _)| *s == primary) else {
            continue;
        };
        let token = secret_token(&manifests, &format!("{primary}-agent")).unwrap_or_default();
        let body = serde_json::json!({
            "disks": [{"name": "disk0", "sizeBytes": args.disk_bytes}],
            "power": "Running",
            "integrationServices": true,
        });
        let resp = http
            .put(format!("http://{addr}/v1/vms/{name}"))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .map_err(|e| LocalError::Setup(format!("creating VM {name}: {e}")))?;
        if !resp.status().is_success() {
            return Err(LocalError::Setup(format!(
                "creating VM {name} at {primary}: {}",
                resp.status()
            )));
        }
        println!("VM {name} runs at site {primary}");
    }

    let mut cmd = Command::new(&exe);
    cmd.arg("controller")
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("RUST_LOG", "info");
    println!("starting the controller");
    children.push(ManagedChild::spawn(
        "controller",
        cmd,
        &dir.join("controller.log"),
    )?);

    let out = cp
        .kubectl()
        .args(["apply", "-R", "-f"])
        .arg(&args.examples)
        .output()
        .map_err(|e| LocalError::Io("kubectl".into(), e))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        return Err(LocalError::Setup(format!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }

    let kc = cp.kubeconfig_path().display();
    let kubectl = cp.bin_dir().join("kubectl");
    println!(
        "\ntwinsite is running. In another shell:\n\
         \n  export KUBECONFIG={kc}\n  alias kubectl={}\n\
         \nWatch the VMs:            kubectl get rvm -A -w\
         \nSee jobs and steps:       kubectl describe rvm -n finance app-01\
         \nFail over to secondary:   kubectl patch rvm -n finance app-01 --type merge -p '{{\"spec\":{{\"activeSite\":\"secondary\"}}}}'\
         \nFail back to primary:     kubectl patch rvm -n finance app-01 --type merge -p '{{\"spec\":{{\"activeSite\":\"primary\"}}}}'\
         \nLogs:                     {}\n\
         \nCtrl-C stops everything.",
        kubectl.display(),
        dir.display()
    );
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| LocalError::Io("signal".into(), e))?;
    println!("stopping");
    // Controller first, then the agents, then the control plane.
    while let Some(child) = children.pop() {
        drop(child);
    }
    drop(cp);
    Ok(())
}

fn read_manifests(dir: &Path) -> Result<Vec<serde_json::Value>, LocalError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| LocalError::Io(dir.to_path_buf(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| LocalError::Io(f.clone(), e))?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_json::Value::deserialize(doc)
                .map_err(|e| LocalError::Setup(format!("{}: {e}", f.display())))?;
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    Ok(out)
}

fn secret_token(manifests: &[serde_json::Value], name: &str) -> Option<String> {
    manifests
        .iter()
        .find(|m| m["kind"] == "Secret" && m["metadata"]["name"] == name)
        .and_then(|m| m["stringData"]["token"].as_str())
        .map(str::to_string)
}

async fn wait_http(http: &reqwest::Client, url: &str) -> Result<(), LocalError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LocalError::Setup(format!(
                "{url} did not answer within 30s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
