//! Shared pieces of the controller's integration tests: a real API server (one per test
//! binary), real agent processes and a real controller process, each killed when its guard
//! drops (on panic too).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};
use twinsite::api::{FailoverPlan, ReplicatedVM, Site};
use twinsite::envtest::{self, ControlPlane, ManagedChild};
use twinsite::site::{AgentClient, CreateVm, DiskSpec, Power, SiteProvider};

pub const DISK: &str = "disk0";
pub const DISK_BYTES: u64 = 1 << 20;
/// Generous: machines are shared and slow; no test asserts on timing.
pub const LONG: Duration = Duration::from_secs(240);

fn unique() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinsite"))
}

/// One site agent process.
pub struct Agent {
    pub site: String,
    pub url: String,
    pub token: String,
    pub client: AgentClient,
    pub dir: PathBuf,
    port: u16,
    /// Certificate and key when the agent serves https.
    tls: Option<(PathBuf, PathBuf)>,
    /// More command line arguments (e.g. `--runtime libvirt`).
    args: Vec<String>,
    /// Environment of the process (fault switches, `TWINSITE_FAILPOINT`); cleared before a
    /// restart to run the agent without them.
    pub envs: Vec<(String, String)>,
    child: Option<ManagedChild>,
}

impl Agent {
    pub async fn start(site: &str, tmp: &tempfile::TempDir) -> Agent {
        Self::start_opts(site, tmp, None).await
    }

    /// `tls`: the CA's PEM; the agent then serves https with `<site>.crt`/`<site>.key` from
    /// `tmp/certs` (written by `envtest::agent_certificates`).
    pub async fn start_opts(site: &str, tmp: &tempfile::TempDir, tls: Option<&str>) -> Agent {
        Self::start_args(site, tmp, tls, &[]).await
    }

    /// As [`Agent::start_opts`], with more command line arguments.
    pub async fn start_args(
        site: &str,
        tmp: &tempfile::TempDir,
        tls: Option<&str>,
        args: &[String],
    ) -> Agent {
        let port = envtest::free_port().unwrap();
        let dir = tmp.path().join(site);
        std::fs::create_dir_all(&dir).unwrap();
        let token = format!("token-{site}-{}", unique());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{port}");
        let certs = tmp.path().join("certs");
        let mut a = Agent {
            site: site.into(),
            client: AgentClient::new(&url, &token, tls.map(str::as_bytes)).unwrap(),
            url,
            token,
            dir,
            port,
            tls: tls.map(|_| {
                (
                    certs.join(format!("{site}.crt")),
                    certs.join(format!("{site}.key")),
                )
            }),
            args: args.to_vec(),
            envs: Vec::new(),
            child: None,
        };
        a.spawn().await;
        a
    }

    /// Starts the process without waiting for it to answer (it may be armed to crash early).
    pub fn launch(&mut self) {
        let token_file = self.dir.join("token");
        std::fs::write(&token_file, &self.token).unwrap();
        let data = self.dir.join("data");
        let mut cmd = std::process::Command::new(exe());
        cmd.arg("agent")
            .args(["--site", &self.site])
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(&data)
            .arg("--token-file")
            .arg(&token_file)
            .env("RUST_LOG", "info");
        // Every test agent serves https when the test gives it a certificate and plain http
        // (--insecure-http) otherwise: the agent refuses to start with neither.
        match &self.tls {
            Some((cert, key)) => {
                cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            }
            None => {
                cmd.arg("--insecure-http");
            }
        }
        cmd.args(&self.args);
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        let log = self.dir.join("agent.log");
        self.child = Some(ManagedChild::spawn(&format!("agent {}", self.site), cmd, &log).unwrap());
    }

    async fn spawn(&mut self) {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.client.health().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "agent {} did not start",
                self.site
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the agent process (SIGTERM, then SIGKILL): the site no longer answers.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(5));
        }
    }

    /// Starts the agent again after [`Agent::stop`]: same port, token and data directory.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// Starts the agent again with `envs` as its environment (stopping it first if it runs).
    pub async fn restart_with_env(&mut self, envs: &[(&str, &str)]) {
        self.stop();
        self.envs = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.spawn().await;
    }

    /// The agent process's id while it runs (for SIGSTOP/SIGCONT: a site that hangs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid())
    }

    /// Where the agent keeps a VM: `<data dir>/vms/<vm>`.
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.dir.join("data").join("vms").join(vm)
    }

    pub async fn create_vm(&self, vm: &str, integration: bool) {
        self.create_vm_of(vm, DISK_BYTES, integration).await;
    }

    /// A running VM with one disk of `size` bytes.
    pub async fn create_vm_of(&self, vm: &str, size: u64, integration: bool) {
        self.client
            .create_vm(
                vm,
                &CreateVm {
                    disks: vec![DiskSpec {
                        name: DISK.into(),
                        size_bytes: size,
                        format: None,
                    }],
                    power: Power::Running,
                    integration_services: integration,
                },
            )
            .await
            .unwrap();
    }

    pub async fn write(&self, vm: &str, offset: u64, data: &[u8]) {
        self.client
            .write_disk(vm, DISK, offset, data.to_vec())
            .await
            .unwrap();
    }

    pub async fn read(&self, vm: &str, offset: u64, len: u64) -> Vec<u8> {
        self.client.read_disk(vm, DISK, offset, len).await.unwrap()
    }

    pub async fn digest(&self, vm: &str) -> String {
        self.client.digest(vm, DISK).await.unwrap()
    }

    pub async fn vm(&self, vm: &str) -> Option<twinsite::site::Vm> {
        self.client.get_vm(vm).await.ok()
    }
}

/// The controller process.
pub struct ControllerProc {
    child: Option<ManagedChild>,
    log: PathBuf,
    metrics_port: u16,
    args: Vec<String>,
    kubeconfig: PathBuf,
    pub starts: u32,
}

impl ControllerProc {
    pub fn start(cp: &ControlPlane, ns: &str, tmp: &tempfile::TempDir) -> ControllerProc {
        Self::start_with(cp, ns, tmp, &[])
    }

    pub fn start_with(
        cp: &ControlPlane,
        ns: &str,
        tmp: &tempfile::TempDir,
        extra: &[&str],
    ) -> ControllerProc {
        let metrics_port = envtest::free_port().unwrap();
        let mut c = ControllerProc {
            child: None,
            log: tmp.path().join("controller.log"),
            metrics_port,
            args: vec![
                "controller".into(),
                "--metrics-addr".into(),
                format!("127.0.0.1:{metrics_port}"),
                "--lease-namespace".into(),
                ns.into(),
                "--lease-duration-seconds".into(),
                "4".into(),
                "--site-poll-seconds".into(),
                "2".into(),
            ]
            .into_iter()
            .chain(extra.iter().map(|s| s.to_string()))
            .collect(),
            kubeconfig: cp.kubeconfig_path().to_path_buf(),
            starts: 0,
        };
        c.spawn();
        c
    }

    fn spawn(&mut self) {
        let mut cmd = std::process::Command::new(exe());
        cmd.args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,twinsite=debug,kube=warn");
        self.starts += 1;
        self.child = Some(ManagedChild::spawn("controller", cmd, &self.log).unwrap());
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(c.pid() as i32, libc::SIGKILL);
            }
        }
        // The guard reaps it.
        self.child = None;
    }

    /// SIGTERM, waiting for the process to end (SIGKILL only after a long grace).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(30));
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn metrics_url(&self) -> String {
        self.url("/metrics")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.metrics_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Tests of one binary share its API server, and every controller process acts on every
/// namespace: a binary with more than one test runs them one at a time. Hold the guard for the
/// whole test, taken before the [`World`] (so it is dropped after it).
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::OnceLock<tokio::sync::Mutex<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
        .lock()
        .await
}

/// A test's world: its namespace, two agents, the Site objects and the controller.
pub struct World {
    pub cp: &'static ControlPlane,
    pub client: Client,
    pub ns: String,
    pub primary: Agent,
    pub secondary: Agent,
    pub controller: ControllerProc,
    pub tmp: tempfile::TempDir,
}

impl World {
    pub async fn start(prefix: &str) -> World {
        Self::start_with(prefix, &[]).await
    }

    pub async fn start_with(prefix: &str, controller_args: &[&str]) -> World {
        Self::start_opts(prefix, controller_args, false).await
    }

    /// With `tls`, both agents serve https with certificates of one CA, and each Site names
    /// that CA through `caSecretRef`.
    pub async fn start_opts(prefix: &str, controller_args: &[&str], tls: bool) -> World {
        Self::start_full(prefix, controller_args, tls, [&[], &[]]).await
    }

    /// As [`World::start_opts`], with more command line arguments for the primary's and the
    /// secondary's agent.
    pub async fn start_full(
        prefix: &str,
        controller_args: &[&str],
        tls: bool,
        agent_args: [&[String]; 2],
    ) -> World {
        Self::start_sites(prefix, controller_args, tls, agent_args, None).await
    }

    /// As [`World::start_full`], with the Sites named `sites` instead of
    /// `<prefix>-<id>-primary`/`-secondary` (Sites are cluster-wide: one test at a time may use
    /// a given name).
    pub async fn start_sites(
        prefix: &str,
        controller_args: &[&str],
        tls: bool,
        agent_args: [&[String]; 2],
        sites: Option<[&str; 2]>,
    ) -> World {
        twinsite::init_crypto();
        let cp = envtest::shared().await;
        let client = cp.client().await.unwrap();
        let id = unique();
        let ns = format!("{prefix}-{id}");
        let nsapi: Api<Namespace> = Api::all(client.clone());
        let mut n = Namespace::default();
        n.metadata.name = Some(ns.clone());
        nsapi.create(&PostParams::default(), &n).await.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let (p, s) = match sites {
            Some([p, s]) => (p.to_string(), s.to_string()),
            None => (
                format!("{prefix}-{id}-primary"),
                format!("{prefix}-{id}-secondary"),
            ),
        };
        let ca_pem = tls.then(|| {
            let dir = tmp.path().join("certs");
            std::fs::create_dir_all(&dir).unwrap();
            envtest::agent_certificates(&dir, &[&p, &s]).unwrap()
        });
        let primary = Agent::start_args(&p, &tmp, ca_pem.as_deref(), agent_args[0]).await;
        let secondary = Agent::start_args(&s, &tmp, ca_pem.as_deref(), agent_args[1]).await;
        for a in [&primary, &secondary] {
            let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
            let s: Secret = serde_json::from_value(json!({
                "metadata": {"name": format!("{}-agent", a.site),
                    "labels": {"twinsite.io/site": a.site}},
                "stringData": {"token": a.token, "ca.crt": ca_pem.clone().unwrap_or_default()},
            }))
            .unwrap();
            secrets.create(&PostParams::default(), &s).await.unwrap();
            let sites: Api<Site> = Api::all(client.clone());
            let secret = |key: &str| json!({"namespace": ns, "name": format!("{}-agent", a.site), "key": key});
            let mut agent = json!({"url": a.url, "tokenSecretRef": secret("token")});
            if tls {
                agent["caSecretRef"] = secret("ca.crt");
            } else {
                // Plain http on loopback: allowed only where the Site says so.
                agent["insecure"] = json!(true);
            }
            let site: Site = serde_json::from_value(json!({
                "apiVersion": "twinsite.io/v1alpha1", "kind": "Site",
                "metadata": {"name": a.site},
                "spec": {"agent": agent},
            }))
            .unwrap();
            sites.create(&PostParams::default(), &site).await.unwrap();
        }
        let controller = ControllerProc::start_with(cp, &ns, &tmp, controller_args);
        World {
            cp,
            client,
            ns,
            primary,
            secondary,
            controller,
            tmp,
        }
    }

    pub fn rvms(&self) -> Api<ReplicatedVM> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a ReplicatedVM for `vm` from primary to secondary.
    pub async fn create_rvm(&self, vm: &str, failover: serde_json::Value) {
        let rvm: ReplicatedVM = serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
            "metadata": {"name": vm},
            "spec": {
                "primarySite": self.primary.site,
                "recoverySite": self.secondary.site,
                "replication": {"enabled": true, "intervalSeconds": 30},
                "failover": failover,
            },
        }))
        .unwrap();
        self.rvms()
            .create(&PostParams::default(), &rvm)
            .await
            .unwrap();
    }

    pub async fn patch_spec(&self, vm: &str, spec: serde_json::Value) {
        self.rvms()
            .patch(
                vm,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await
            .unwrap();
    }

    pub async fn get(&self, vm: &str) -> ReplicatedVM {
        self.rvms().get(vm).await.unwrap()
    }

    /// Polls the object until `f` holds; panics with the object and the controller log after
    /// [`LONG`].
    pub async fn wait_for(
        &self,
        vm: &str,
        what: &str,
        f: impl Fn(&ReplicatedVM) -> bool,
    ) -> ReplicatedVM {
        let deadline = Instant::now() + LONG;
        loop {
            if let Ok(r) = self.rvms().get(vm).await
                && f(&r)
            {
                return r;
            }
            if Instant::now() > deadline {
                let r = self.rvms().get(vm).await.ok();
                let tail = |log: String| {
                    let lines: Vec<&str> = log.lines().collect();
                    lines[lines.len().saturating_sub(60)..].join("\n")
                };
                let agent_log = |a: &Agent| {
                    std::fs::read_to_string(a.dir.join("agent.log")).unwrap_or_default()
                };
                panic!(
                    "timed out waiting for {what}\nobject: {}\ncontroller log tail:\n{}\n\
                     primary agent log tail:\n{}\nsecondary agent log tail:\n{}",
                    serde_json::to_string_pretty(&r.map(|r| r.status)).unwrap(),
                    tail(self.controller.log()),
                    tail(agent_log(&self.primary)),
                    tail(agent_log(&self.secondary)),
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits for the VM to be Protected and Ready, running at `site`, replicating to `to`.
    pub async fn wait_protected(&self, vm: &str, site: &str, to: &str) -> ReplicatedVM {
        self.wait_for(vm, &format!("{vm} Protected at {site} -> {to}"), |r| {
            let Some(s) = &r.status else { return false };
            s.phase == Some(twinsite::api::VmPhase::Protected)
                && s.active_site.as_deref() == Some(site)
                && s.replication.as_ref().is_some_and(|x| {
                    x.source_site.as_deref() == Some(site) && x.target_site.as_deref() == Some(to)
                })
                && ready(r)
        })
        .await
    }

    pub fn agent(&self, site: &str) -> &Agent {
        if site == self.primary.site {
            &self.primary
        } else {
            &self.secondary
        }
    }

    /// Events recorded for the object, as (reason, note).
    pub async fn events(&self, vm: &str) -> Vec<(String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.ns);
        let list = api.list(&ListParams::default()).await.unwrap();
        let mut out: Vec<_> = list
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(vm))
            .map(|e| {
                (
                    e.reason.clone().unwrap_or_default(),
                    e.note.clone().unwrap_or_default(),
                )
            })
            .collect();
        out.sort();
        out
    }
}

pub fn ready(r: &ReplicatedVM) -> bool {
    cond(r, "Ready")
}

pub fn cond(r: &ReplicatedVM, t: &str) -> bool {
    r.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == t && c.status == "True" && c.observed_generation == r.metadata.generation
        })
    })
}

/// (type, state) of every job, oldest first.
pub fn jobs(r: &ReplicatedVM) -> Vec<(String, String)> {
    r.status
        .as_ref()
        .map(|s| {
            s.jobs
                .iter()
                .map(|j| (format!("{:?}", j.type_), format!("{:?}", j.state)))
                .collect()
        })
        .unwrap_or_default()
}

/// (step, state) of the newest job of type `t`.
pub fn steps(r: &ReplicatedVM, t: &str) -> Vec<(String, String)> {
    r.status
        .as_ref()
        .and_then(|s| s.jobs.iter().rev().find(|j| format!("{:?}", j.type_) == t))
        .map(|j| {
            j.steps
                .iter()
                .map(|s| (s.name.clone(), format!("{:?}", s.state)))
                .collect()
        })
        .unwrap_or_default()
}

/// sha256 of a disk of [`DISK_BYTES`] zero bytes with `writes` applied in order.
pub fn expected_digest(writes: &[(u64, &[u8])]) -> String {
    let mut disk = vec![0u8; DISK_BYTES as usize];
    for (off, data) in writes {
        let o = *off as usize;
        disk[o..o + data.len()].copy_from_slice(data);
    }
    hex::encode(Sha256::digest(&disk))
}

/// Creates plan `name` (`spec` without targetSite) targeting the primary site, where every VM
/// runs, then turns it to the secondary site: the plan job starts.
pub async fn run_plan(w: &World, name: &str, mut spec: serde_json::Value) -> Api<FailoverPlan> {
    let plans: Api<FailoverPlan> = Api::namespaced(w.client.clone(), &w.ns);
    spec["targetSite"] = json!(w.primary.site);
    let fp: FailoverPlan = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    plans.create(&PostParams::default(), &fp).await.unwrap();
    let target = json!({"spec": {"targetSite": w.secondary.site}});
    plans
        .patch(name, &PatchParams::default(), &Patch::Merge(target))
        .await
        .unwrap();
    plans
}

/// `kubectl annotate fp <plan> twinsite.io/approve=<what>`.
pub fn approve(w: &World, plan: &str, what: &str) {
    let value = format!("twinsite.io/approve={what}");
    let args = ["annotate", "fp", plan, "-n", &w.ns, &value];
    let out = w.cp.kubectl().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl annotate: {err}");
}

/// `kubectl annotate <kind> <name> <key>=<value> --overwrite` in the world's namespace.
pub fn annotate(w: &World, kind: &str, name: &str, key: &str, value: &str) {
    let kv = format!("{key}={value}");
    let args = ["annotate", kind, name, "-n", &w.ns, &kv, "--overwrite"];
    let out = w.cp.kubectl().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl annotate: {err}");
}

/// Status of condition `t` ("True"/"False"), when it is set.
pub fn cond_status(r: &ReplicatedVM, t: &str) -> Option<String> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| c.status.clone())
}

pub fn pattern(tag: &str, len: usize) -> Vec<u8> {
    tag.bytes().cycle().take(len).collect()
}

pub fn name_of(r: &ReplicatedVM) -> String {
    r.name_any()
}

/// Peak resident memory (VmHWM) of a process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// An HTTP proxy in front of an agent that forwards every request, except that while
/// `fail_power_off` is set it answers `POST /v1/vms/{vm}/power` with action `PowerOff` itself,
/// with a 500: a site that answers, but whose power off fails. With `lose_failover_answer`
/// set, the next failover request is forwarded (the agent does it) and its answer replaced by
/// a 502, as a proxy that lost the agent's answer.
pub struct FaultProxy {
    pub url: String,
    pub fail_power_off: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub lose_failover_answer: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// PowerOff requests answered with the fault.
    pub power_offs_refused: std::sync::Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        use axum::body::{Body, to_bytes};
        use axum::extract::{Request, State};
        use axum::response::{IntoResponse, Response};
        use std::sync::atomic::AtomicBool;

        #[derive(Clone)]
        struct S {
            upstream: String,
            http: reqwest::Client,
            fail: std::sync::Arc<AtomicBool>,
            refused: std::sync::Arc<AtomicU32>,
            lose: std::sync::Arc<AtomicBool>,
        }
        async fn forward(State(s): State<S>, req: Request) -> Response {
            let (parts, body) = req.into_parts();
            let body = to_bytes(body, usize::MAX).await.unwrap_or_default();
            let path = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            if s.fail.load(Ordering::SeqCst)
                && parts.method == axum::http::Method::POST
                && path.starts_with("/v1/vms/")
                && path.ends_with("/power")
                && String::from_utf8_lossy(&body).contains("PowerOff")
            {
                s.refused.fetch_add(1, Ordering::SeqCst);
                return (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"error": "injected fault: the hypervisor refused to power the VM off"})),
                )
                    .into_response();
            }
            let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
                .unwrap_or(reqwest::Method::GET);
            let mut r = s.http.request(method, format!("{}{path}", s.upstream));
            for (k, v) in parts.headers.iter() {
                if k.as_str() != "host" && k.as_str() != "content-length" {
                    r = r.header(k.as_str(), v.as_bytes());
                }
            }
            let lose = parts.method == axum::http::Method::POST
                && path.starts_with("/v1/vms/")
                && path.ends_with("/failover")
                && s.lose.swap(false, Ordering::SeqCst);
            match r.body(body.to_vec()).send().await {
                Ok(_) if lose => (
                    axum::http::StatusCode::BAD_GATEWAY,
                    "injected fault: the agent's answer was lost",
                )
                    .into_response(),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let ctype = resp
                        .headers()
                        .get("content-type")
                        .map(|v| v.as_bytes().to_vec());
                    let bytes = resp.bytes().await.unwrap_or_default();
                    let mut out = Response::new(Body::from(bytes));
                    *out.status_mut() = axum::http::StatusCode::from_u16(status)
                        .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
                    if let Some(c) = ctype
                        && let Ok(v) = axum::http::HeaderValue::from_bytes(&c)
                    {
                        out.headers_mut().insert("content-type", v);
                    }
                    out
                }
                Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
            }
        }
        let fail = std::sync::Arc::new(AtomicBool::new(false));
        let refused = std::sync::Arc::new(AtomicU32::new(0));
        let lose = std::sync::Arc::new(AtomicBool::new(false));
        let state = S {
            lose: lose.clone(),
            upstream: upstream.to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap(),
            fail: fail.clone(),
            refused: refused.clone(),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FaultProxy {
            url,
            fail_power_off: fail,
            lose_failover_answer: lose,
            power_offs_refused: refused,
            task,
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Declares Site `site` lost (`spec.fence: Lost`) or removes the declaration, as an operator
/// does with `kubectl patch`.
pub async fn declare_lost(w: &World, site: &str, lost: bool) {
    let sites: Api<Site> = Api::all(w.client.clone());
    let fence = if lost { json!("Lost") } else { json!(null) };
    sites
        .patch(
            site,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"fence": fence}})),
        )
        .await
        .unwrap();
}

/// Sets the token in Site `site`'s token Secret (`<site>-agent`), as a rotation does.
pub async fn set_site_token(w: &World, site: &str, token: &str) {
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), &w.ns);
    secrets
        .patch(
            &format!("{site}-agent"),
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"token": token}})),
        )
        .await
        .unwrap();
}

/// Polls Site `site` until its Ready condition has `status` and `reason`.
pub async fn wait_site_ready(w: &World, site: &str, status: &str, reason: &str) -> Site {
    let sites: Api<Site> = Api::all(w.client.clone());
    let deadline = Instant::now() + LONG;
    loop {
        let s = sites.get(site).await.unwrap();
        let ok = s.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == status && c.reason == reason)
        });
        if ok {
            return s;
        }
        assert!(Instant::now() < deadline, "site {site}: {:?}", s.status);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Condition `t` of the object, when it is set.
pub fn condition(
    r: &ReplicatedVM,
    t: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .cloned()
}

/// A TCP listener standing in front of an agent as a Site's URL, for an agent that hangs: it
/// accepts every connection and passes the bytes both ways until a request carries every one
/// of `hang_on` (for example a route of one VM); that connection is then held open and never
/// answered. With `hang_on` empty every connection is held from its first byte: an agent that
/// accepts connections and never answers.
pub struct HangingAgent {
    pub url: String,
    /// Connections held so far.
    pub held: std::sync::Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl HangingAgent {
    pub async fn start(upstream: &str, hang_on: &[&str]) -> HangingAgent {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let hang_on: Vec<String> = hang_on.iter().map(|s| s.to_string()).collect();
        let held = std::sync::Arc::new(AtomicU32::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let counter = held.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (upstream, hang_on, held) =
                    (upstream.clone(), hang_on.clone(), counter.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let hold = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let up = if hang_on.is_empty() {
                        None
                    } else {
                        tokio::net::TcpStream::connect(&upstream).await.ok()
                    };
                    let Some(up) = up else {
                        held.fetch_add(1, Ordering::SeqCst);
                        std::future::pending::<()>().await;
                        drop((cr, cw));
                        return;
                    };
                    let (mut ur, mut uw) = up.into_split();
                    let down_hold = hold.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match ur.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if down_hold.load(Ordering::SeqCst) {
                                std::future::pending::<()>().await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        if down_hold.load(Ordering::SeqCst) {
                            std::future::pending::<()>().await;
                        }
                    });
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let text = String::from_utf8_lossy(&buf[..n]);
                        if hang_on.iter().all(|p| text.contains(p.as_str())) {
                            hold.store(true, Ordering::SeqCst);
                            held.fetch_add(1, Ordering::SeqCst);
                            std::future::pending::<()>().await;
                        }
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        HangingAgent { url, held, task }
    }
}

impl Drop for HangingAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Points Site `site` at `url` and waits until the controller reaches it there.
pub async fn move_site(w: &World, site: &str, url: &str) {
    let sites: Api<Site> = Api::all(w.client.clone());
    sites
        .patch(
            site,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"agent": {"url": url}}})),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + LONG;
    loop {
        let s = sites.get(site).await.unwrap();
        let there = s.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True" && c.message.contains(url))
        });
        if there {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "site {site} never reached at {url}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
