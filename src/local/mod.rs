//! `twinsite local`: the whole stack on this machine, for a first look and for demos.
//!
//! A real etcd + kube-apiserver, two site agents (primary on 127.0.0.1:7101, secondary on
//! 127.0.0.1:7102) serving https with certificates of a CA made for this stack, the
//! controller, and the manifests in examples/ applied. With the builtin
//! runtime the agents hold the example VMs; with `--runtime libvirt` each site gets its own
//! libvirtd, and the primary runs one real QEMU guest (`app-01`, the test guest writing its
//! pattern) that its example ReplicatedVM protects. `stack.json` in the folder says where
//! everything is. A process of the stack that exits (an agent killed to try a site fault) is
//! reported and started again; everything stops on Ctrl-C or SIGTERM, or when a process keeps
//! exiting right after its start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::envtest::{ControlPlane, Options};

mod supervisor;
use supervisor::Supervised;

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
    /// What the sites' VMs are: `builtin` (VMs inside the agents) or `libvirt` (a libvirtd per
    /// site and a real QEMU guest; needs root, QEMU and libvirt, and a build with the `libvirt`
    /// feature).
    #[arg(long, value_enum, default_value_t = crate::agent::runtime::RuntimeKind::Builtin)]
    pub runtime: crate::agent::runtime::RuntimeKind,
    /// Port of the primary site's agent; the secondary's is the next one. The Sites' URLs
    /// are set to match.
    #[arg(long, default_value_t = 7101, value_parser = clap::value_parser!(u16).range(1..65535))]
    pub agent_port: u16,
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

/// The VM the libvirt demo runs as a real guest (one of the example ReplicatedVMs).
const LIBVIRT_VM: &str = "app-01";

/// The demo sites, in port order.
const SITES: [&str; 2] = ["primary", "secondary"];

/// Where the controller reads Secrets (its lease namespace, see docs/security.md).
const SECRET_NAMESPACE: &str = "twinsite-system";

pub async fn run(args: LocalArgs) -> Result<(), LocalError> {
    let dir = std::path::absolute(&args.dir).map_err(|e| LocalError::Io(args.dir.clone(), e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| LocalError::Io(dir.clone(), e))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| LocalError::Io(dir.clone(), e))?;
    let mut manifests = read_manifests(&args.examples)?;
    let libvirt = args.runtime == crate::agent::runtime::RuntimeKind::Libvirt;
    let sites: Vec<(&str, String)> = SITES
        .iter()
        .zip(args.agent_port..)
        .map(|(site, port)| (*site, format!("127.0.0.1:{port}")))
        .collect();
    for (_, addr) in &sites {
        if std::net::TcpListener::bind(addr.as_str()).is_err() {
            return Err(LocalError::Setup(format!(
                "{addr} is in use: is an agent of an earlier `twinsite local` still running? \
                 Stop it (see `ss -ltnp`), then start again"
            )));
        }
    }
    if libvirt {
        // One real guest: only its ReplicatedVM and what it needs are applied.
        manifests.retain(|m| {
            m["kind"] != "FailoverPlan"
                && (m["kind"] != "ReplicatedVM" || m["metadata"]["name"] == LIBVIRT_VM)
        });
    }
    // A CA for this stack and a certificate per agent (127.0.0.1 and localhost).
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).map_err(|e| LocalError::Io(certs.clone(), e))?;
    let ca_pem = crate::envtest::agent_certificates(&certs, &SITES)?;
    let ca_file = certs.join("agent-ca.crt");
    for (site, addr) in &sites {
        use_tls(&mut manifests, site, addr, &ca_pem);
    }
    let mut stack = serde_json::json!({"sites": {}});
    let mut libvirt_sites = Vec::new();

    println!("starting etcd and kube-apiserver (the first run builds them, about 8 minutes)...");
    let cp = ControlPlane::start_with(Options {
        dir: Some(dir.join("control-plane")),
        unsafe_no_fsync: false,
        apiserver_port: None,
    })
    .await?;
    cp.install_crds().await?;
    stack["kubeconfig"] = cp.kubeconfig_path().display().to_string().into();

    let exe = std::env::current_exe().map_err(|e| LocalError::Io("twinsite".into(), e))?;
    crate::init_crypto();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes())
        .map_err(|e| LocalError::Setup(format!("the stack's CA: {e}")))?;
    let http = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .map_err(|e| LocalError::Setup(format!("https client: {e}")))?;
    let mut children: Vec<Supervised> = Vec::new();
    for &(site, ref addr) in &sites {
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
        stack["sites"][site] = serde_json::json!({
            "agentUrl": format!("https://{addr}"),
            "token": token,
            "caFile": ca_file.display().to_string(),
        });
        let mut libvirt_uri = None;
        let mut boot_file_dir = None;
        if libvirt {
            println!("starting libvirtd of site {site}");
            let lv = crate::envtest::libvirt::LibvirtSite::start(site, &site_dir.join("libvirt"))?;
            libvirt_uri = Some(lv.uri().to_string());
            // Replicas boot the test guest's kernel directly from its directory.
            boot_file_dir = Some(crate::envtest::guest::guest_dir()?);
            stack["sites"][site]["libvirtUri"] = lv.uri().into();
            libvirt_sites.push(lv);
        }
        let (exe, site_name, addr_arg, certs) =
            (exe.clone(), site.to_string(), addr.clone(), certs.clone());
        let command = move || {
            let mut cmd = Command::new(&exe);
            cmd.args(["agent", "--site", &site_name, "--listen", &addr_arg])
                .arg("--data-dir")
                .arg(site_dir.join("data"))
                .arg("--token-file")
                .arg(&token_file)
                .arg("--tls-cert")
                .arg(certs.join(format!("{site_name}.crt")))
                .arg("--tls-key")
                .arg(certs.join(format!("{site_name}.key")));
            if let Some(uri) = &libvirt_uri {
                cmd.args(["--runtime", "libvirt", "--libvirt-uri", uri]);
            }
            if let Some(dir) = &boot_file_dir {
                cmd.arg("--boot-file-dir").arg(dir);
            }
            cmd
        };
        println!("starting the {site} site agent on {addr}");
        let agent = Supervised::start(
            &format!("agent {site}"),
            Box::new(command),
            &dir.join(site).join("agent.log"),
        )?;
        stack["sites"][site]["pid"] = agent.pid().into();
        children.push(agent);
        wait_http(&http, &format!("https://{addr}/healthz")).await?;
    }

    let stack_file = dir.join("stack.json");
    write_stack(&stack_file, &stack)?;

    let mut watch = String::new();
    if let Some(primary) = libvirt_sites.first() {
        let console = start_guest(primary, &dir)?;
        println!("VM {LIBVIRT_VM} (a QEMU guest) runs at site primary");
        watch = format!(
            "\nThe guest's console:      tail -f {}\
             \nDomains at each site:     virsh -c '{}' list --all\
             \n                          virsh -c '{}' list --all",
            console.display(),
            primary.uri(),
            libvirt_sites.get(1).map(|s| s.uri()).unwrap_or_default(),
        );
    }
    // The VMs that the example ReplicatedVMs protect, running at their primary site.
    for rvm in manifests
        .iter()
        .filter(|m| m["kind"] == "ReplicatedVM" && !libvirt)
    {
        let name = rvm["spec"]["vmName"]
            .as_str()
            .or(rvm["metadata"]["name"].as_str())
            .unwrap_or_default();
        let primary = rvm["spec"]["primarySite"].as_str().unwrap_or_default();
        let Some((_, addr)) = sites.iter().find(|(s, _)| *s == primary) else {
            continue;
        };
        let token = secret_token(&manifests, &format!("{primary}-agent")).unwrap_or_default();
        let body = serde_json::json!({
            "disks": [{"name": "disk0", "sizeBytes": args.disk_bytes}],
            "power": "Running",
            "integrationServices": true,
        });
        let resp = http
            .put(format!("https://{addr}/v1/vms/{name}"))
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

    // The manifests first: the controller needs the lease namespace they create.
    let applied = dir.join("manifests.yaml");
    let mut text = String::new();
    for m in &manifests {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(m).map_err(|e| LocalError::Setup(e.to_string()))?);
    }
    std::fs::write(&applied, text).map_err(|e| LocalError::Io(applied.clone(), e))?;
    let out = cp
        .kubectl()
        .args(["apply", "-f"])
        .arg(&applied)
        .output()
        .map_err(|e| LocalError::Io("kubectl".into(), e))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        return Err(LocalError::Setup(format!(
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }

    // Its metrics port is picked free, so two stacks (or a stack and the tests) share a machine.
    let metrics_addr = free_local_addr()?;
    let kubeconfig = cp.kubeconfig_path().to_path_buf();
    let command = move || {
        let mut cmd = Command::new(&exe);
        cmd.arg("controller")
            .arg("--metrics-addr")
            .arg(metrics_addr.to_string())
            // The example plan's webhook calls a receiver on this machine.
            .args(["--webhook-allowed-hosts", "127.0.0.1"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info");
        cmd
    };
    println!("starting the controller");
    let controller =
        Supervised::start("controller", Box::new(command), &dir.join("controller.log"))?;
    stack["controller"] = serde_json::json!({
        "metricsUrl": format!("http://{metrics_addr}/metrics"),
        "pid": controller.pid(),
    });
    children.push(controller);
    write_stack(&stack_file, &stack)?;

    let kc = cp.kubeconfig_path().display();
    let kubectl = cp.bin_dir().join("kubectl");
    println!(
        "\ntwinsite is running. In another shell:\n\
         \n  export KUBECONFIG={kc}\n  alias kubectl={}\n\
         \nWatch the VMs:            kubectl get rvm -A -w\
         \nSee jobs and steps:       kubectl describe rvm -n finance app-01\
         \nFail over to secondary:   kubectl patch rvm -n finance app-01 --type merge -p '{{\"spec\":{{\"activeSite\":\"secondary\"}}}}'\
         \nFail back to primary:     kubectl patch rvm -n finance app-01 --type merge -p '{{\"spec\":{{\"activeSite\":\"primary\"}}}}'\
         \nLogs:                     {}{watch}\
         \nWhere everything is:      {}\n\
         \nA process of the stack that exits (kill an agent to try a site fault) is started\
         \nagain and reported here. Ctrl-C stops everything.",
        kubectl.display(),
        dir.display(),
        stack_file.display(),
    );
    // SIGTERM stops it like Ctrl-C: the libvirtds run detached and would outlive it.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| LocalError::Io("signal".into(), e))?;
    let exited = loop {
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                r.map_err(|e| LocalError::Io("signal".into(), e))?;
                break None;
            }
            _ = term.recv() => break None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                match keep_running(&mut children, &mut stack, &stack_file) {
                    Ok(()) => {}
                    Err(e) => break Some(e),
                }
            }
        }
    };
    println!("stopping");
    // Controller first, then the agents, then the control plane.
    while let Some(child) = children.pop() {
        drop(child);
    }
    drop(libvirt_sites);
    drop(cp);
    match exited {
        Some(e) => Err(LocalError::Setup(format!(
            "{e}: the stack is stopped; its logs are in {}",
            dir.display()
        ))),
        None => Ok(()),
    }
}

/// Defines and starts the demo guest at the libvirt site `site`: the test guest (built by
/// scripts/guest-build.sh) on a new qcow2 disk, writing its pattern. Returns its console log.
fn start_guest(
    site: &crate::envtest::libvirt::LibvirtSite,
    dir: &Path,
) -> Result<PathBuf, LocalError> {
    use crate::envtest::guest::{self, DiskFormat, DomainOptions, GuestVariant};
    println!("building the test guest (a Debian kernel and busybox; cached after the first run)");
    let guest_dir = guest::guest_dir()?;
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| LocalError::Io(images.clone(), e))?;
    let disk = images.join(format!("{LIBVIRT_VM}.qcow2"));
    let console = images.join(format!("{LIBVIRT_VM}-console.log"));
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("256M"),
    )?;
    let mut opts = DomainOptions::new(
        LIBVIRT_VM,
        &guest_dir,
        GuestVariant::Acpi,
        &disk,
        DiskFormat::Qcow2,
        &console,
    );
    opts.guest.verify = true;
    opts.guest.pause_secs = 5;
    let xml = images.join(format!("{LIBVIRT_VM}.xml"));
    std::fs::write(&xml, guest::domain_xml(&opts)).map_err(|e| LocalError::Io(xml.clone(), e))?;
    run_ok(site.virsh().arg("define").arg(&xml))?;
    run_ok(site.virsh().args(["start", LIBVIRT_VM]))?;
    Ok(console)
}

/// Restarts any process of the stack that exited, reports it, and records its new pid in
/// stack.json.
fn keep_running(
    children: &mut [Supervised],
    stack: &mut serde_json::Value,
    stack_file: &Path,
) -> Result<(), LocalError> {
    for child in children.iter_mut() {
        if let Some(report) = child.keep_running()? {
            println!("{report}");
            tracing::warn!(process = child.name(), "{report}");
            match child.name().strip_prefix("agent ") {
                Some(site) => stack["sites"][site]["pid"] = child.pid().into(),
                None => stack["controller"]["pid"] = child.pid().into(),
            }
            write_stack(stack_file, stack)?;
        }
    }
    Ok(())
}

/// Writes stack.json whole through a temporary file, so a reader never sees half of it.
fn write_stack(path: &Path, stack: &serde_json::Value) -> Result<(), LocalError> {
    let text = serde_json::to_string_pretty(stack).unwrap_or_default();
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| LocalError::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| LocalError::Io(path.to_path_buf(), e))
}

/// A free port on 127.0.0.1, for a listener the stack starts next.
fn free_local_addr() -> Result<std::net::SocketAddr, LocalError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| LocalError::Io("127.0.0.1:0".into(), e))
}

fn run_ok(cmd: &mut Command) -> Result<(), LocalError> {
    let out = cmd
        .output()
        .map_err(|e| LocalError::Setup(format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(LocalError::Setup(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
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

/// Points the Site `site` of the manifests at its agent on `addr` over https, trusting the
/// stack's CA: sets its URL, gives it a `caSecretRef` when it has none, and adds the Secret
/// that reference names (in the controller's namespace) holding `ca_pem`.
fn use_tls(manifests: &mut Vec<serde_json::Value>, site: &str, addr: &str, ca_pem: &str) {
    let Some(m) = manifests
        .iter_mut()
        .find(|m| m["kind"] == "Site" && m["metadata"]["name"] == site)
    else {
        return;
    };
    let agent = &mut m["spec"]["agent"];
    agent["url"] = format!("https://{addr}").into();
    if !agent["caSecretRef"].is_object() {
        agent["caSecretRef"] = serde_json::json!({
            "namespace": SECRET_NAMESPACE,
            "name": format!("{site}-agent-ca"),
            "key": "ca.crt",
        });
    }
    let r = agent["caSecretRef"].clone();
    let namespace = r["namespace"]
        .as_str()
        .unwrap_or(SECRET_NAMESPACE)
        .to_string();
    let name = r["name"].as_str().unwrap_or_default().to_string();
    let key = r["key"].as_str().unwrap_or("ca.crt").to_string();
    manifests.retain(|m| {
        !(m["kind"] == "Secret"
            && m["metadata"]["name"] == name.as_str()
            && m["metadata"]["namespace"] == namespace.as_str())
    });
    // After the Namespace objects, before the Sites.
    let at = manifests
        .iter()
        .position(|m| m["kind"] != "Namespace")
        .unwrap_or(manifests.len());
    manifests.insert(
        at,
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace,
                "labels": {crate::controller::site::SITE_LABEL: site}},
            "type": "Opaque",
            "stringData": {key: ca_pem},
        }),
    );
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
