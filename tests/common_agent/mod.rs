//! Helpers for tests that run real `twinsite agent` processes.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN: &str = "test-token-1234";

/// A running agent; killed (and waited for) when dropped, on panic too.
pub struct AgentProc {
    pub child: Option<Child>,
    pub url: String,
    pub port: u16,
    pub site: String,
    pub data_dir: PathBuf,
    pub token_file: PathBuf,
    pub env: Vec<(String, String)>,
    /// Extra command-line arguments (e.g. `--tls-cert`; the URL is then https).
    pub args: Vec<String>,
    /// When set, the agent's stderr is appended to this file (every start), else inherited.
    pub stderr_log: Option<PathBuf>,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The base URL of an agent on `port` started with `args` (https with `--tls-cert`).
fn url_of(port: u16, args: &[impl AsRef<str>]) -> String {
    let scheme = if args.iter().any(|a| a.as_ref() == "--tls-cert") {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://127.0.0.1:{port}")
}

impl AgentProc {
    pub fn start(site: &str, root: &Path) -> Self {
        Self::start_with_env(site, root, &[])
    }

    pub fn start_with_env(site: &str, root: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with(site, root, env, &[])
    }

    pub fn start_with(site: &str, root: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut a = Self::unstarted(site, root, env, args);
        a.spawn();
        a
    }

    /// An agent of `site` under `root` (data dir, token file and port chosen) that is not
    /// started yet: set fields such as `stderr_log`, then [`Self::spawn`] or [`Self::try_spawn`].
    pub fn unstarted(site: &str, root: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let data_dir = root.join(site);
        std::fs::create_dir_all(&data_dir).unwrap();
        let token_file = root.join(format!("{site}.token"));
        std::fs::write(&token_file, TOKEN).unwrap();
        let port = free_port();
        AgentProc {
            child: None,
            url: url_of(port, args),
            port,
            site: site.into(),
            data_dir,
            token_file,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
            stderr_log: None,
        }
    }

    /// Starts the agent process (again, after [`Self::kill`]) on the same port and data dir.
    pub fn spawn(&mut self) {
        if let Err(e) = self.try_spawn(Duration::from_secs(20)) {
            panic!("{e}");
        }
    }

    /// Starts the agent process (again) and waits until it listens, at most `timeout`; an
    /// error (not a panic) when it exits first or does not listen in time.
    pub fn try_spawn(&mut self, timeout: Duration) -> Result<(), String> {
        let stderr = match &self.stderr_log {
            Some(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Stdio::from)
                .map_err(|e| format!("opening {}: {e}", path.display()))?,
            None => Stdio::inherit(),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_twinsite"))
            .args(["agent", "--site", &self.site, "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(["--max-disk-bytes", "1073741824"])
            .args(&self.args)
            // Plain http unless the test gives a certificate (the agent refuses to start
            // without either).
            .args(
                (!self
                    .args
                    .iter()
                    .any(|a| a == "--tls-cert" || a == "--insecure-http"))
                .then_some("--insecure-http"),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("starting agent {}: {e}", self.site))?;
        self.child = Some(child);
        self.url = url_of(self.port, &self.args);
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Some(st) = self.exited() {
                return Err(format!("agent {} exited: {st}", self.site));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "agent {} did not listen within {timeout:?}",
                    self.site
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status of the agent process if it has exited (it is then reaped: `child` is
    /// cleared); `None` while it runs or when none was started.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(st)
    }

    /// Sets (`Some`) or removes (`None`) an environment variable for the next starts.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// SIGKILL, then start again on the same port and data dir.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn client(&self) -> twinsite::site::AgentClient {
        twinsite::init_crypto();
        twinsite::site::AgentClient::new(&self.url, TOKEN, None).unwrap()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running VM with one disk `disk0` of `size` bytes.
pub fn vm_spec(size: u64, integration_services: bool) -> twinsite::site::CreateVm {
    twinsite::site::CreateVm {
        disks: vec![twinsite::site::DiskSpec {
            name: "disk0".into(),
            size_bytes: size,
            format: None,
        }],
        power: twinsite::site::Power::Running,
        integration_services,
    }
}

/// Replication to `peer` over plain http: 900 s between cycles (none runs during a test unless
/// it asks), 24 h of recovery points, no app-consistent points.
/// At the agent of `target` (client `target`), lets `source` replicate into `vm`: what the
/// controller does before enabling replication at the source.
pub async fn accept(target: &twinsite::site::AgentClient, vm: &str, source: &AgentProc, op: &str) {
    use twinsite::site::SiteProvider;
    target
        .accept_replication(
            vm,
            &twinsite::site::AcceptReplication {
                operation_id: op.into(),
                source_site: source.site.clone(),
            },
        )
        .await
        .unwrap();
}

/// At the agent of `target` (client `target`), lets site `source` replicate into `vm`, with an
/// operation id of its own.
pub async fn accept_site(target: &twinsite::site::AgentClient, vm: &str, source: &str) {
    use std::sync::atomic::{AtomicU32, Ordering};
    use twinsite::site::SiteProvider;
    static N: AtomicU32 = AtomicU32::new(0);
    target
        .accept_replication(
            vm,
            &twinsite::site::AcceptReplication {
                operation_id: format!("acc-{vm}-{source}-{}", N.fetch_add(1, Ordering::SeqCst)),
                source_site: source.into(),
            },
        )
        .await
        .unwrap();
}

pub fn enable_to(
    op: &str,
    peer: &AgentProc,
    mode: twinsite::site::ReplicationMode,
) -> twinsite::site::EnableReplication {
    twinsite::site::EnableReplication {
        operation_id: op.into(),
        peer_site: peer.site.clone(),
        peer_url: peer.url.clone(),
        peer_token: TOKEN.into(),
        peer_ca_pem: None,
        interval_seconds: 900,
        recovery_point_retention_hours: 24,
        app_consistent_frequency_hours: 0,
        mode,
    }
}
