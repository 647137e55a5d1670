//! Real libvirt sites and real QEMU guests, nothing mocked: two libvirtd instances on one
//! machine are as independent as two hosts, and the test guest writes a pattern that survives a
//! power-off and verifies both from outside (the disk's bytes) and from inside (a second boot).
//! Needs root and the Debian packages scripts/test.sh installs.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use twinsite::envtest::guest::{
    self, DiskFormat, DomainOptions, GuestVariant, PatternSummary, VERIFY_BAD_MARK, VERIFY_OK_MARK,
    WROTE_MARK,
};
use twinsite::envtest::libvirt::{LibvirtSite, isolated_network_xml};
use twinsite::envtest::process;

/// Boot under TCG takes 5 to 40 s on an idle machine; a busy one needs far longer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn run(mut cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd.output().unwrap_or_else(|e| panic!("{shown}: {e}"));
    assert!(
        out.status.success(),
        "{shown} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn virsh(site: &LibvirtSite, args: &[&str]) -> String {
    let mut cmd = site.virsh();
    cmd.args(args);
    run(cmd)
}

/// Defines from an XML document written next to the site's files.
fn define(site: &LibvirtSite, what: &str, name: &str, xml: &str) {
    let path = site.dir().join(format!("{what}-{name}.xml"));
    std::fs::write(&path, xml).expect("write the XML file");
    let verb = if what == "net" {
        "net-define"
    } else {
        "define"
    };
    virsh(site, &[verb, path.to_str().expect("utf-8 path")]);
}

fn names(site: &LibvirtSite, what: &str) -> Vec<String> {
    let args: &[&str] = if what == "net" {
        &["net-list", "--all", "--name"]
    } else {
        &["list", "--all", "--name"]
    };
    virsh(site, args)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

fn domstate(site: &LibvirtSite, name: &str) -> String {
    virsh(site, &["domstate", name]).trim().to_string()
}

fn wait_state(site: &LibvirtSite, name: &str, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let state = domstate(site, name);
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} at site {} is {state:?}, not {want:?}, after {limit:?}",
            site.name()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits for a serial console line containing `mark`; returns the last such line.
fn wait_serial(site: &LibvirtSite, name: &str, serial: &Path, mark: &str) -> String {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(serial).unwrap_or_default()).into_owned();
        if let Some(line) = text.lines().rev().find(|l| l.contains(mark)) {
            return line.trim().to_string();
        }
        if Instant::now() > deadline {
            let qemu_log = site.qemu_log_dir().join(format!("{name}.log"));
            panic!(
                "no {mark:?} from {name} within {BOOT_TIMEOUT:?}; serial console:\n{}\nQEMU log:\n{}",
                tail(&text),
                std::fs::read_to_string(&qemu_log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The generation in the last `TWINSITE WROTE gen=G` line of a serial console.
fn last_wrote(serial: &Path) -> u64 {
    let text =
        String::from_utf8_lossy(&std::fs::read(serial).expect("read the serial log")).into_owned();
    text.lines()
        .rev()
        .find_map(|l| l.split(WROTE_MARK).nth(1))
        .and_then(|g| g.trim().parse().ok())
        .expect("a WROTE line with a generation")
}

/// Verifies the pattern from the disk's bytes (a qcow2 read through qemu-img).
fn verify_disk(disk: &Path, format: DiskFormat, scratch: &Path) -> PatternSummary {
    let raw = match format {
        DiskFormat::Raw => disk.to_path_buf(),
        DiskFormat::Qcow2 => {
            let mut cmd = Command::new("qemu-img");
            cmd.args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(disk)
                .arg(scratch);
            run(cmd);
            scratch.to_path_buf()
        }
    };
    guest::verify_raw_image(&raw, guest::DEFAULT_RECORDS)
        .unwrap_or_else(|e| panic!("the pattern on {} does not verify: {e}", disk.display()))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("twinsite-libvirt-")
        .tempdir()
        .expect("temporary directory")
}

#[test]
fn sites_are_isolated_like_two_hosts() {
    let tmp = tempdir();
    let a = LibvirtSite::start("a", &tmp.path().join("site-a")).expect("site a starts");
    let b = LibvirtSite::start("b", &tmp.path().join("site-b")).expect("site b starts");
    assert_ne!(a.uri(), b.uri());

    // Defining needs no kernel or disk yet: only starting does.
    let opts = DomainOptions::new(
        "probe",
        tmp.path(),
        GuestVariant::Acpi,
        &tmp.path().join("probe.qcow2"),
        DiskFormat::Qcow2,
        &tmp.path().join("probe.serial"),
    );
    define(&a, "dom", "probe", &guest::domain_xml(&opts));
    assert!(names(&a, "dom").contains(&"probe".to_string()));
    assert!(
        !names(&b, "dom").contains(&"probe".to_string()),
        "a domain defined at site a is listed at site b"
    );

    // Same network, same bridge name at both: each site's bridges live in its own namespace.
    for site in [&a, &b] {
        define(
            site,
            "net",
            "tsnet",
            &isolated_network_xml("tsnet", "tsbr0"),
        );
        virsh(site, &["net-start", "tsnet"]);
        assert_eq!(names(site, "net"), vec!["tsnet".to_string()]);
    }
    let host = Command::new("ip")
        .args(["link", "show", "tsbr0"])
        .output()
        .expect("ip link");
    assert!(
        !host.status.success(),
        "a site's bridge leaked into the host's network namespace"
    );

    virsh(&a, &["undefine", "probe"]);
    for site in [&a, &b] {
        virsh(site, &["net-destroy", "tsnet"]);
        virsh(site, &["net-undefine", "tsnet"]);
    }
}

#[test]
fn guest_writes_a_pattern_that_survives_power_off_and_verifies() {
    let guest_dir = guest::guest_dir().expect("the test guest builds");
    let tmp = tempdir();
    let dir = tmp.path();
    let a = LibvirtSite::start("a", &dir.join("site-a")).expect("site a starts");
    let b = LibvirtSite::start("b", &dir.join("site-b")).expect("site b starts");

    // Site a: the guest that honours the power button, on a qcow2 disk and a network.
    let disk_a = dir.join("a.qcow2");
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(&disk_a)
        .arg("64M");
    run(cmd);
    define(&a, "net", "tsnet", &isolated_network_xml("tsnet", "tsbr0"));
    virsh(&a, &["net-start", "tsnet"]);
    let serial_a = dir.join("a-boot1.serial");
    let mut opts_a = DomainOptions::new(
        "writer",
        &guest_dir,
        GuestVariant::Acpi,
        &disk_a,
        DiskFormat::Qcow2,
        &serial_a,
    );
    opts_a.network = Some("tsnet".into());
    define(&a, "dom", "writer", &guest::domain_xml(&opts_a));

    // Site b: the guest that ignores it, on a raw disk.
    let disk_b = dir.join("b.raw");
    std::fs::File::create(&disk_b)
        .and_then(|f| f.set_len(64 << 20))
        .expect("raw disk");
    let serial_b = dir.join("b.serial");
    let opts_b = DomainOptions::new(
        "stubborn",
        &guest_dir,
        GuestVariant::NoAcpi,
        &disk_b,
        DiskFormat::Raw,
        &serial_b,
    );
    define(&b, "dom", "stubborn", &guest::domain_xml(&opts_b));

    let started = Instant::now();
    virsh(&a, &["start", "writer"]);
    virsh(&b, &["start", "stubborn"]);
    let line = wait_serial(&a, "writer", &serial_a, WROTE_MARK);
    eprintln!("writer: {line} after {:?}", started.elapsed());
    let line = wait_serial(&b, "stubborn", &serial_b, WROTE_MARK);
    eprintln!("stubborn: {line} after {:?}", started.elapsed());

    let asked = Instant::now();
    virsh(&a, &["shutdown", "writer"]);
    virsh(&b, &["shutdown", "stubborn"]);
    wait_state(&a, "writer", "shut off", Duration::from_secs(120));
    eprintln!("writer powered off {:?} after the request", asked.elapsed());
    let grace = Duration::from_secs(15);
    std::thread::sleep(grace.saturating_sub(asked.elapsed()));
    assert_eq!(
        domstate(&b, "stubborn"),
        "running",
        "the guest without acpid obeyed a shutdown request"
    );
    virsh(&b, &["destroy", "stubborn"]);
    wait_state(&b, "stubborn", "shut off", Duration::from_secs(30));

    // From outside: every record the guest wrote, read from the disk files.
    let summary_a = verify_disk(&disk_a, DiskFormat::Qcow2, &dir.join("a.raw"));
    let wrote_a = last_wrote(&serial_a);
    assert!(
        summary_a.generation >= wrote_a,
        "disk holds generation {} but the guest reported {wrote_a} written",
        summary_a.generation
    );
    let summary_b = verify_disk(&disk_b, DiskFormat::Raw, &dir.join("unused"));
    assert!(summary_b.generation >= last_wrote(&serial_b));
    eprintln!("disk a: {summary_a:?}; disk b: {summary_b:?}");

    // From inside: a second boot finds what the first wrote.
    let serial_a2 = dir.join("a-boot2.serial");
    opts_a.serial_log = serial_a2.clone();
    opts_a.guest.verify = true;
    opts_a.guest.write = false;
    // Without its UUID in the XML, libvirt refuses to redefine a domain.
    opts_a.uuid = Some(virsh(&a, &["domuuid", "writer"]).trim().to_string());
    define(&a, "dom", "writer", &guest::domain_xml(&opts_a));
    virsh(&a, &["start", "writer"]);
    let line = wait_serial(&a, "writer", &serial_a2, "TWINSITE VERIFY");
    assert!(!line.contains(VERIFY_BAD_MARK), "second boot: {line}");
    assert!(
        line.contains(&format!(
            "{VERIFY_OK_MARK} gen={} records={}",
            summary_a.generation,
            guest::DEFAULT_RECORDS
        )),
        "second boot: {line}, outside verification: {summary_a:?}"
    );
    virsh(&a, &["destroy", "writer"]);

    virsh(&a, &["undefine", "writer"]);
    virsh(&b, &["undefine", "stubborn"]);
    virsh(&a, &["net-destroy", "tsnet"]);
    virsh(&a, &["net-undefine", "tsnet"]);
    // Dropping a site stops its daemons.
    let libvirtd = |site: &LibvirtSite| {
        process::read_pid_file(&site.dir().join("run/libvirtd.pid")).expect("libvirtd pid file")
    };
    let pids = [libvirtd(&a), libvirtd(&b)];
    drop(a);
    drop(b);
    for pid in pids {
        assert!(
            !process::is_running(pid, "libvirtd"),
            "libvirtd {pid} still runs"
        );
    }
}
