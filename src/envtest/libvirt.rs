//! A libvirt "site" on this machine: its own virtlogd and libvirtd in a private mount namespace
//! and network namespace, so two sites on one host are as independent as two hosts (domains,
//! checkpoints, networks and bridges of one are invisible to the other).
//!
//! The site directory holds everything: `run` (sockets, pid files, QEMU pid files), `etc` (the
//! daemons' configuration), `lib`, `log` and `cache`, bind-mounted inside the namespace over
//! `/var/run/libvirt`, `/etc/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt` and
//! `/var/cache/libvirt`. Clients reach it at [`LibvirtSite::uri`]. Needs root.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::EnvtestError;
use super::guest::xml_escape;
use super::process;

/// Debian packages the sites and the test guest need.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "busybox-static",
    "iptables",
];

/// How long libvirtd may take to answer: its first start probes QEMU's capabilities (about 8 s
/// on an idle 2-core machine), much longer when the machine is busy.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

// Inside the namespace: loopback up, the site's directories over libvirt's, then the daemons.
// The site directory is $1. Networks need iptables before libvirtd starts (it sets its chains
// up at start).
const START_SCRIPT: &str = r#"set -e
ip link set lo up
mount --bind "$1/run" /var/run/libvirt
mount --bind "$1/etc" /etc/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$1/cache" /var/cache/libvirt
virtlogd -d -p "$1/run/virtlogd.pid"
libvirtd -d -p "$1/run/libvirtd.pid"
"#;

const MOUNT_POINTS: &[&str] = &[
    "/var/run/libvirt",
    "/etc/libvirt",
    "/var/lib/libvirt",
    "/var/log/libvirt",
    "/var/cache/libvirt",
];

// QEMU runs as root with no security driver and no ownership changes: inside a sandbox that
// owns every file, anything else only adds ways to fail.
const QEMU_CONF: &str = r#"user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
"#;
const LIBVIRTD_CONF: &str = "log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n";
const VIRTLOGD_CONF: &str = "log_outputs = \"3:file:/var/log/libvirt/virtlogd.log\"\n";

/// One site's libvirtd (and virtlogd). Dropping it stops the site's QEMU processes and both
/// daemons; so does a normal exit of the process.
pub struct LibvirtSite {
    name: String,
    dir: PathBuf,
    uri: String,
}

impl LibvirtSite {
    /// Starts a site with its state in `dir` (created if needed; daemons a previous run left
    /// there are stopped first) and waits until libvirtd answers.
    pub fn start(name: &str, dir: &Path) -> Result<Self, EnvtestError> {
        check_requirements()?;
        std::fs::create_dir_all(dir).map_err(|e| EnvtestError::io(dir, e))?;
        let dir = dir.canonicalize().map_err(|e| EnvtestError::io(dir, e))?;
        let site = Self {
            name: name.into(),
            uri: format!(
                "qemu+unix:///system?socket={}",
                dir.join("run/libvirt-sock").display()
            ),
            dir,
        };
        site.stop_daemons();
        site.prepare()?;
        let run = site.dir.join("run");
        process::kill_pid_files_at_exit(&run);
        process::kill_pid_files_at_exit(&run.join("qemu"));

        let launch_log = site.dir.join("log/launch.log");
        let out =
            std::fs::File::create(&launch_log).map_err(|e| EnvtestError::io(&launch_log, e))?;
        let err = out
            .try_clone()
            .map_err(|e| EnvtestError::io(&launch_log, e))?;
        // The daemons fork into the background and keep the namespaces alive; the shell exits.
        let status = Command::new("unshare")
            .args([
                "-m",
                "-n",
                "--propagation",
                "private",
                "sh",
                "-c",
                START_SCRIPT,
                "sh",
            ])
            .arg(&site.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| EnvtestError::Spawn(format!("libvirtd of site {name}"), e.to_string()))?;
        if !status.success() {
            return Err(EnvtestError::DaemonExited {
                name: format!("starting libvirtd of site {name} ({status})"),
                log: launch_log,
            });
        }
        site.wait_ready()?;
        Ok(site)
    }

    /// The connection URI, for `virsh -c` or a libvirt client.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The site directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// libvirtd's log (warnings and errors).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log/libvirtd.log")
    }

    /// Where libvirt keeps each domain's QEMU log (`NAME.log`).
    pub fn qemu_log_dir(&self) -> PathBuf {
        self.dir.join("log/qemu")
    }

    /// Defines and starts isolated network `name` at this site (see [`isolated_network_xml`]),
    /// on bridge `bridge` (at most 15 characters; the site's network namespace is its own).
    pub fn create_network(&self, name: &str, bridge: &str) -> Result<(), EnvtestError> {
        let path = self.dir.join(format!("net-{name}.xml"));
        std::fs::write(&path, isolated_network_xml(name, bridge))
            .map_err(|e| EnvtestError::io(&path, e))?;
        for args in [
            vec!["net-define".into(), path.to_string_lossy().into_owned()],
            vec!["net-start".to_string(), name.to_string()],
        ] {
            let out = self
                .virsh()
                .args(&args)
                .output()
                .map_err(|e| EnvtestError::Spawn("virsh".into(), e.to_string()))?;
            if !out.status.success() {
                return Err(EnvtestError::Exited(
                    format!("virsh {}", args.join(" ")),
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
        }
        Ok(())
    }

    /// `virsh -c URI`.
    pub fn virsh(&self) -> Command {
        let mut cmd = Command::new("virsh");
        cmd.arg("-c").arg(&self.uri);
        cmd
    }

    /// Directories, configuration and mount points.
    fn prepare(&self) -> Result<(), EnvtestError> {
        for sub in ["run", "etc", "lib", "log", "cache"] {
            let d = self.dir.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| EnvtestError::io(&d, e))?;
        }
        for m in MOUNT_POINTS {
            std::fs::create_dir_all(m).map_err(|e| EnvtestError::io(m, e))?;
        }
        // Only the top-level configuration files: /etc/libvirt/qemu and /etc/libvirt/qemu/networks
        // hold the host's own domains and networks, which are no site's.
        let etc = self.dir.join("etc");
        if let Ok(entries) = std::fs::read_dir("/etc/libvirt") {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_file() {
                    let to = etc.join(entry.file_name());
                    std::fs::copy(&path, &to).map_err(|e| EnvtestError::io(&to, e))?;
                }
            }
        }
        for (file, text) in [
            ("qemu.conf", QEMU_CONF),
            ("libvirtd.conf", LIBVIRTD_CONF),
            ("virtlogd.conf", VIRTLOGD_CONF),
        ] {
            let path = etc.join(file);
            std::fs::write(&path, text).map_err(|e| EnvtestError::io(&path, e))?;
        }
        Ok(())
    }

    fn wait_ready(&self) -> Result<(), EnvtestError> {
        let pid_file = self.dir.join("run/libvirtd.pid");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let answered = self
                .virsh()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if answered {
                return Ok(());
            }
            // libvirtd reports a failed driver start only in its log, after it forked.
            let alive = process::read_pid_file(&pid_file)
                .is_some_and(|pid| process::is_running(pid, "libvirtd"));
            if !alive {
                return Err(EnvtestError::DaemonExited {
                    name: format!("libvirtd of site {}", self.name),
                    log: self.log_path(),
                });
            }
            if Instant::now() > deadline {
                return Err(EnvtestError::NotReady(
                    format!("libvirtd of site {}", self.name),
                    READY_TIMEOUT,
                    self.log_path(),
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Restarts the site's libvirtd (as an upgrade or a crash and its service manager would):
    /// stopped, then started again in the site's namespaces; its QEMU processes run on, and
    /// every client connection is broken.
    pub fn restart_libvirtd(&self) -> Result<(), EnvtestError> {
        let run = self.dir.join("run");
        let pid_file = run.join("libvirtd.pid");
        // virtlogd stays: it holds the namespaces the new libvirtd joins.
        let Some(logd) = process::read_pid_file(&run.join("virtlogd.pid")) else {
            return Err(EnvtestError::DaemonExited {
                name: format!("virtlogd of site {}", self.name),
                log: self.log_path(),
            });
        };
        if let Some(pid) = process::read_pid_file(&pid_file) {
            process::stop_detached(pid, "libvirtd", Duration::from_secs(10));
        }
        let status = Command::new("nsenter")
            .arg("-t")
            .arg(logd.to_string())
            .args(["-m", "-n", "libvirtd", "-d", "-p"])
            .arg(&pid_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| {
                EnvtestError::Spawn(format!("libvirtd of site {}", self.name), e.to_string())
            })?;
        if !status.success() {
            return Err(EnvtestError::DaemonExited {
                name: format!("restarting libvirtd of site {} ({status})", self.name),
                log: self.log_path(),
            });
        }
        self.wait_ready()
    }

    /// Stops the site's QEMU processes, then libvirtd, then virtlogd.
    fn stop_daemons(&self) {
        let run = self.dir.join("run");
        for pid in process::pids_in(&run.join("qemu")) {
            process::stop_detached(pid, "qemu-system", Duration::from_secs(3));
        }
        for (file, comm) in [("libvirtd.pid", "libvirtd"), ("virtlogd.pid", "virtlogd")] {
            if let Some(pid) = process::read_pid_file(&run.join(file)) {
                process::stop_detached(pid, comm, Duration::from_secs(5));
            }
        }
    }
}

impl Drop for LibvirtSite {
    fn drop(&mut self) {
        self.stop_daemons();
        let run = self.dir.join("run");
        process::forget_pid_files_at_exit(&run);
        process::forget_pid_files_at_exit(&run.join("qemu"));
    }
}

/// A network with a bridge and nothing else: no forwarding, no addresses, no dnsmasq.
pub fn isolated_network_xml(name: &str, bridge: &str) -> String {
    format!(
        "<network>\n  <name>{}</name>\n  <bridge name='{}'/>\n</network>\n",
        xml_escape(name),
        xml_escape(bridge)
    )
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // Root's tools live in sbin, which a user's PATH may lack.
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn user_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: getpwnam with a valid C string; only the null check reads the result.
    !unsafe { libc::getpwnam(c.as_ptr()) }.is_null()
}

/// Checks what a site needs, and says what to install when something is missing.
pub fn check_requirements() -> Result<(), EnvtestError> {
    let mut missing = Vec::new();
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (libvirtd per site needs mount and network namespaces)".to_string());
    }
    let mut packages = Vec::new();
    for (bin, package) in [
        ("libvirtd", "libvirt-daemon"),
        ("virtlogd", "libvirt-daemon"),
        ("virsh", "libvirt-clients"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("iptables", "iptables"),
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
    ] {
        if find_in_path(bin).is_none() {
            missing.push(format!("{bin} (Debian package {package})"));
            if !packages.contains(&package) {
                packages.push(package);
            }
        }
    }
    let qemu_driver = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.path()
                .join("libvirt/connection-driver/libvirt_driver_qemu.so")
                .is_file()
        });
    if !qemu_driver {
        missing.push("libvirt's QEMU driver (Debian package libvirt-daemon-driver-qemu)".into());
        packages.push("libvirt-daemon-driver-qemu");
    }
    // libvirt 9 resolves its default QEMU user before it reads qemu.conf, so the user must exist
    // even though the site's qemu.conf runs QEMU as root.
    if !user_exists("libvirt-qemu") {
        missing
            .push("the user libvirt-qemu (useradd -r -M -s /usr/sbin/nologin libvirt-qemu)".into());
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut msg = missing.join(", ");
    if !packages.is_empty() {
        msg.push_str(&format!(
            "; install with: apt-get install -y --no-install-recommends {}",
            packages.join(" ")
        ));
    }
    Err(EnvtestError::Missing(msg))
}
