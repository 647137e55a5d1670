//! Which accelerator the libvirt runtime's replicas run under: KVM where the host's KVM boots a
//! Linux guest, TCG (QEMU's emulator) otherwise.
//!
//! `/dev/kvm` being there proves little: under nested virtualization KVM can be offered and
//! still hang a Linux guest early in its boot. So `auto` takes KVM only when libvirt offers it
//! (domain capabilities) *and* a Linux kernel, booted once under KVM in a throwaway transient
//! domain, gets through its whole early boot to the point where it looks for its root file
//! system (it has none, so it panics there, which ends the probe domain). Anything else (no
//! kernel to probe with, KVM not offered, the kernel silent or stuck within the time limit) is
//! TCG, and the reason is logged and reported.

use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain as VirDomain;

use super::{AccelChoice, xml};

/// The accelerator replicas run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// As the agent reports it (`GET /v1/vms`).
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// libvirt's domain type for it.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }
}

/// How long the probe kernel may take to reach its root mount under KVM (about a second where
/// KVM works).
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the kernel prints when it has booted as far as mounting its root file system.
const PROBE_REACHED: [&str; 2] = ["Unable to mount root fs", "Kernel panic"];

/// Chooses the accelerator; the reason is for the log.
pub fn choose(
    conn: &Connect,
    choice: AccelChoice,
    probe_kernel: Option<&std::path::Path>,
) -> Result<(Accel, String), String> {
    let offered = conn.get_domain_capabilities(None, Some("x86_64"), None, Some("kvm"), 0);
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, "--accel tcg".into())),
        AccelChoice::Kvm => match offered {
            Ok(_) => Ok((Accel::Kvm, "--accel kvm".into())),
            Err(e) => Err(format!(
                "--accel kvm, but libvirt offers no KVM here: {}",
                e.message()
            )),
        },
        AccelChoice::Auto => {
            if let Err(e) = offered {
                return Ok((
                    Accel::Tcg,
                    format!("libvirt offers no KVM: {}", e.message()),
                ));
            }
            let host_kernel = std::path::PathBuf::from(format!(
                "/boot/vmlinuz-{}",
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
            ));
            let kernel = match probe_kernel {
                Some(k) => k.to_path_buf(),
                None if host_kernel.is_file() => host_kernel,
                None => {
                    return Ok((
                        Accel::Tcg,
                        "no kernel to probe KVM with (--accel-probe-kernel, or the host's \
                         /boot/vmlinuz-RELEASE)"
                            .into(),
                    ));
                }
            };
            Ok(match probe(conn, &kernel) {
                Ok(took) => (
                    Accel::Kvm,
                    format!(
                        "a Linux kernel ({}) booted under KVM in {} ms",
                        kernel.display(),
                        took.as_millis()
                    ),
                ),
                Err(why) => (Accel::Tcg, format!("KVM probe failed: {why}")),
            })
        }
    }
}

/// Boots `kernel` under KVM in a transient domain with no disk: `Ok` with the time it took when
/// it reaches its root mount within [`PROBE_TIMEOUT`].
fn probe(conn: &Connect, kernel: &std::path::Path) -> Result<Duration, String> {
    let dir = tempfile::Builder::new()
        .prefix("twinsite-kvm-probe")
        .tempdir()
        .map_err(|e| format!("a directory for the probe: {e}"))?;
    let console = dir.path().join("console.log");
    let name = format!("twinsite-kvm-probe-{}", std::process::id());
    let text = format!(
        "<domain type='kvm'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel>\
         <cmdline>console=ttyS0 panic=-1</cmdline></os><features><acpi/></features>\
         <on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>\
         <devices><serial type='file'><source path='{}'/><target port='0'/></serial>\
         <memballoon model='none'/></devices></domain>",
        xml::escape(&kernel.to_string_lossy()),
        xml::escape(&console.to_string_lossy()),
    );
    let start = Instant::now();
    let d = VirDomain::create_xml(conn, &text, 0)
        .map_err(|e| format!("starting the probe domain: {}", e.message()))?;
    let result = loop {
        // Whether it ran before the console is read: a kernel that got there ends the domain.
        let ended = !d.is_active().unwrap_or(false);
        let out = std::fs::read_to_string(&console).unwrap_or_default();
        if PROBE_REACHED.iter().any(|m| out.contains(m)) {
            break Ok(start.elapsed());
        }
        if start.elapsed() > PROBE_TIMEOUT {
            let last = out.lines().last().unwrap_or("(nothing)").to_string();
            break Err(format!(
                "the kernel did not reach its root mount within {}s under KVM; its console's \
                 last line: {last}",
                PROBE_TIMEOUT.as_secs()
            ));
        }
        if ended {
            break Err(format!(
                "the probe domain ended before its kernel reached its root mount; its console's \
                 last line: {}",
                out.lines().last().unwrap_or("(nothing)")
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Transient: gone once destroyed (it may have ended by itself already).
    let _ = d.destroy();
    result
}
