//! A real control plane on loopback: etcd and kube-apiserver (no kubelet, no scheduler), as
//! controller-runtime's envtest runs them. Tests and the local demo use it; nothing is mocked.
//!
//! The binaries come from `scripts/envtest-build.sh`, which builds them from Go modules at pinned
//! versions and caches them. `TWINSITE_ENVTEST_BIN` points at an existing bin directory instead.
//!
//! Real VMs: [`libvirt::LibvirtSite`] runs one libvirtd per site, and [`guest`] builds and
//! describes a tiny guest that writes a verifiable pattern to its disk.

mod certs;
pub mod guest;
pub mod libvirt;
pub mod process;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use tokio::sync::OnceCell;

pub use certs::agent_certificates;
pub use process::ManagedChild;

#[derive(Debug, thiserror::Error)]
pub enum EnvtestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the control plane binaries failed: {0}")]
    Build(String),
    #[error("cannot start {0}: {1}")]
    Spawn(String, String),
    #[error("{0} exited early ({1}); see its log")]
    Exited(String, String),
    #[error("{0} was not ready within {1:?}; see its log at {2}")]
    NotReady(String, Duration, PathBuf),
    #[error("certificates: {0}")]
    Certs(#[from] rcgen::Error),
    #[error("kube client: {0}")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("real VMs need what is missing here: {0}")]
    Missing(String),
    #[error("{name} exited; see {log}")]
    DaemonExited { name: String, log: PathBuf },
}

impl EnvtestError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// Where the control plane binaries live, building them first when needed.
pub fn bin_dir() -> Result<PathBuf, EnvtestError> {
    if let Ok(dir) = std::env::var("TWINSITE_ENVTEST_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let dir = run_build_script("envtest-build.sh")?;
    // Later calls in this process skip the script.
    // SAFETY: set once, before any other thread of ours reads it concurrently matters.
    unsafe { std::env::set_var("TWINSITE_ENVTEST_BIN", &dir) };
    Ok(dir)
}

/// Runs `scripts/<name>` (cached builds of what tests need) and returns the directory it printed
/// as its last line.
pub(crate) fn run_build_script(name: &str) -> Result<PathBuf, EnvtestError> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| EnvtestError::io(&script, e))?;
    if !out.status.success() {
        return Err(EnvtestError::Build(format!(
            "{} exited with {}",
            script.display(),
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| EnvtestError::Build(format!("{} printed no directory", script.display())))
}

/// A free TCP port on 127.0.0.1 (bound and released; the small race is acceptable for tests).
pub fn free_port() -> Result<u16, EnvtestError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| EnvtestError::io("127.0.0.1:0", e))?;
    let port = l
        .local_addr()
        .map_err(|e| EnvtestError::io("127.0.0.1:0", e))?
        .port();
    Ok(port)
}

/// Options for [`ControlPlane::start_with`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory for data, certificates and logs; a fresh temporary one when `None`
    /// (removed when the control plane is dropped).
    pub dir: Option<PathBuf>,
    /// etcd without fsync: quick, for tests only.
    pub unsafe_no_fsync: bool,
    /// Fixed API server port (the demo uses one so the kubeconfig stays valid); free one if None.
    pub apiserver_port: Option<u16>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            dir: None,
            unsafe_no_fsync: true,
            apiserver_port: None,
        }
    }
}

/// A running etcd + kube-apiserver pair. Dropping it stops both.
pub struct ControlPlane {
    // Field order matters: the API server stops before etcd.
    apiserver: ManagedChild,
    etcd: ManagedChild,
    bin: PathBuf,
    dir: PathBuf,
    kubeconfig: PathBuf,
    url: String,
    _tmp: Option<tempfile::TempDir>,
}

impl ControlPlane {
    /// Starts a control plane of its own, in a temporary directory.
    pub async fn start() -> Result<Self, EnvtestError> {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Result<Self, EnvtestError> {
        crate::init_crypto();
        let bin = tokio::task::spawn_blocking(bin_dir)
            .await
            .map_err(|e| EnvtestError::Build(e.to_string()))??;
        let (tmp, dir) = match opts.dir {
            Some(d) => (None, d),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("twinsite-envtest-")
                    .tempdir()
                    .map_err(|e| EnvtestError::io(std::env::temp_dir(), e))?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let certs_dir = dir.join("certs");
        std::fs::create_dir_all(&certs_dir).map_err(|e| EnvtestError::io(&certs_dir, e))?;
        if !certs_dir.join(certs::SA_KEY).exists() {
            certs::generate(&certs_dir)?;
        }

        let etcd_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let mut cmd = Command::new(bin.join("etcd"));
        cmd.arg("--data-dir")
            .arg(dir.join("etcd"))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg("--listen-peer-urls=http://127.0.0.1:0")
            .arg("--log-level=warn");
        if opts.unsafe_no_fsync {
            cmd.arg("--unsafe-no-fsync");
        }
        let etcd_log = dir.join("etcd.log");
        let mut etcd = ManagedChild::spawn("etcd", cmd, &etcd_log)?;
        let plain = reqwest::Client::builder()
            .build()
            .map_err(|e| EnvtestError::Spawn("etcd".into(), e.to_string()))?;
        wait_ready(
            "etcd",
            &mut etcd,
            &plain,
            &format!("{etcd_url}/health"),
            &etcd_log,
        )
        .await?;

        let port = match opts.apiserver_port {
            Some(p) => p,
            None => free_port()?,
        };
        let url = format!("https://127.0.0.1:{port}");
        let c = |name: &str| certs_dir.join(name);
        let mut cmd = Command::new(bin.join("kube-apiserver"));
        cmd.arg(format!("--etcd-servers={etcd_url}"))
            .arg("--cert-dir")
            .arg(dir.join("apiserver-certs"))
            .arg(format!("--secure-port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--authorization-mode=RBAC")
            .arg("--allow-privileged=true")
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg(format!("--service-account-issuer={url}/"))
            .arg("--service-account-key-file")
            .arg(c(certs::SA_PUB))
            .arg("--service-account-signing-key-file")
            .arg(c(certs::SA_KEY))
            .arg("--client-ca-file")
            .arg(c(certs::CLIENT_CA))
            .arg("--tls-cert-file")
            .arg(c(certs::SERVING_CERT))
            .arg("--tls-private-key-file")
            .arg(c(certs::SERVING_KEY))
            .arg("--v=0");
        let api_log = dir.join("kube-apiserver.log");
        let mut apiserver = ManagedChild::spawn("kube-apiserver", cmd, &api_log)?;
        let ca = std::fs::read(c(certs::SERVING_CA))
            .map_err(|e| EnvtestError::io(c(certs::SERVING_CA), e))?;
        let ca = reqwest::Certificate::from_pem(&ca)
            .map_err(|e| EnvtestError::Spawn("kube-apiserver".into(), e.to_string()))?;
        let tls = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .map_err(|e| EnvtestError::Spawn("kube-apiserver".into(), e.to_string()))?;
        wait_ready(
            "kube-apiserver",
            &mut apiserver,
            &tls,
            &format!("{url}/readyz"),
            &api_log,
        )
        .await?;

        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &url, &certs_dir)?;
        Ok(Self {
            apiserver,
            etcd,
            bin,
            dir,
            kubeconfig,
            url,
            _tmp: tmp,
        })
    }

    /// The API server's https URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// An admin kubeconfig (client certificate in group system:masters).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory with data, certificates and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The directory holding etcd, kube-apiserver, kubectl and helm.
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A client for this API server, bound to the calling Tokio runtime.
    pub async fn client(&self) -> Result<kube::Client, EnvtestError> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| EnvtestError::Kubeconfig(e.to_string()))?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|e| EnvtestError::Kubeconfig(e.to_string()))?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// `kubectl` with this control plane's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// `helm` with this control plane's kubeconfig.
    pub fn helm(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("helm"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.join("helm/data"));
        cmd
    }

    /// Applies twinsite's CRDs (server-side apply) and waits until each is Established.
    pub async fn install_crds(&self) -> Result<(), EnvtestError> {
        let client = self.client().await?;
        install_crds(&client).await
    }

    /// Process ids of etcd and kube-apiserver.
    pub fn pids(&self) -> (u32, u32) {
        (self.etcd.pid(), self.apiserver.pid())
    }
}

/// Applies twinsite's CRDs with server-side apply and waits until each is Established.
pub async fn install_crds(client: &kube::Client) -> Result<(), EnvtestError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let pp = PatchParams::apply("twinsite").force();
    for crd in crate::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &pp, &Patch::Apply(&crd)).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for crd in crate::api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        loop {
            let got = api.get(&name).await?;
            let established = got
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(EnvtestError::NotReady(
                    format!("CRD {name}"),
                    Duration::from_secs(30),
                    PathBuf::new(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn wait_ready(
    name: &str,
    child: &mut ManagedChild,
    http: &reqwest::Client,
    url: &str,
    log: &Path,
) -> Result<(), EnvtestError> {
    let limit = Duration::from_secs(120);
    let deadline = Instant::now() + limit;
    loop {
        child.check_running()?;
        if let Ok(resp) = http.get(url).send().await
            && resp.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(EnvtestError::NotReady(
                name.into(),
                limit,
                log.to_path_buf(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write_kubeconfig(path: &Path, url: &str, certs_dir: &Path) -> Result<(), EnvtestError> {
    let c = |name: &str| certs_dir.join(name).display().to_string();
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "twinsite-local", "cluster": {
            "server": url, "certificate-authority": c(certs::SERVING_CA)}}],
        "users": [{"name": "admin", "user": {
            "client-certificate": c(certs::ADMIN_CERT), "client-key": c(certs::ADMIN_KEY)}}],
        "contexts": [{"name": "twinsite-local", "context": {"cluster": "twinsite-local", "user": "admin"}}],
        "current-context": "twinsite-local",
    });
    let text = serde_yaml::to_string(&doc).map_err(|e| EnvtestError::Kubeconfig(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| EnvtestError::io(path, e))
}

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

/// One control plane per test binary with the CRDs installed, started on first use and stopped
/// when the process exits. Tests share it and keep apart by namespace and unique names.
pub async fn shared() -> &'static ControlPlane {
    let cp = SHARED
        .get_or_try_init(|| async {
            let mut cp = ControlPlane::start().await?;
            // A static is never dropped: hand the temporary directory to the exit hook.
            if let Some(tmp) = cp._tmp.take() {
                process::remove_at_exit(&tmp.keep());
            }
            cp.install_crds().await?;
            Ok::<_, EnvtestError>(cp)
        })
        .await;
    match cp {
        Ok(cp) => cp,
        Err(e) => panic!("the shared control plane did not start: {e}"),
    }
}
