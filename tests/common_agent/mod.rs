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
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl AgentProc {
    pub fn start(site: &str, root: &Path) -> Self {
        Self::start_with_env(site, root, &[])
    }

    pub fn start_with_env(site: &str, root: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_with(site, root, env, &[])
    }

    pub fn start_with(site: &str, root: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let data_dir = root.join(site);
        std::fs::create_dir_all(&data_dir).unwrap();
        let token_file = root.join(format!("{site}.token"));
        std::fs::write(&token_file, TOKEN).unwrap();
        let mut a = AgentProc {
            child: None,
            url: String::new(),
            port: free_port(),
            site: site.into(),
            data_dir,
            token_file,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        a.spawn();
        a
    }

    /// Starts the agent process (again, after [`Self::kill`]) on the same port and data dir.
    pub fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_twinsite"))
            .args(["agent", "--site", &self.site, "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(["--max-disk-bytes", "1073741824"])
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let scheme = if self.args.iter().any(|a| a == "--tls-cert") {
            "https"
        } else {
            "http"
        };
        self.url = format!("{scheme}://127.0.0.1:{}", self.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("agent {} exited: {st}", self.site);
            }
            assert!(
                Instant::now() < deadline,
                "agent {} did not listen",
                self.site
            );
            std::thread::sleep(Duration::from_millis(50));
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
