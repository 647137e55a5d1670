//! Real VMs: libvirt/QEMU guests at two sites (one libvirtd each, in their own namespaces).
//!
//! Here, the seed's procedure: agents with `--runtime libvirt` and the controller against a real
//! API server. The guests write a checksummed pattern; the tests check those bytes where they
//! land (replica images, the consoles of guests booted from them), not only digests. In
//! [`sites`], the harness itself: isolated sites, the test guest, ACPI.

#[path = "../controller_common/mod.rs"]
mod controller_common;
mod sites;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use controller_common::*;
use serde_json::json;
use twinsite::envtest::guest::{self, DiskFormat, DomainOptions, GuestVariant};
use twinsite::envtest::libvirt::LibvirtSite;
use twinsite::site::SiteProvider as _;

/// Boot to the guest's init takes 5 to 40 s under TCG on a loaded machine.
const BOOT: Duration = Duration::from_secs(180);

fn virsh(site: &LibvirtSite, args: &[&str]) -> String {
    let out = site.virsh().args(args).output().expect("virsh runs");
    assert!(
        out.status.success(),
        "virsh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn domstate(site: &LibvirtSite, name: &str) -> String {
    let out = site
        .virsh()
        .args(["domstate", name])
        .output()
        .expect("virsh runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The console line after the last `mark` in `log`, once one is there.
async fn wait_mark(log: &Path, mark: &str, after: usize) -> String {
    let deadline = Instant::now() + BOOT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .filter(|l| l.contains(mark))
            .nth(after)
            .map(str::to_string)
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no {mark:?} on the console {} within {BOOT:?}; it reads:\n{}",
            log.display(),
            text.lines().rev().take(30).collect::<Vec<_>>().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The generation in a `... gen=G ...` console line.
fn generation(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("gen="))
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {line:?}"))
}

/// The newest generation the guest reported writing on console `log`.
fn last_wrote(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(guest::WROTE_MARK))
        .map(generation)
        .max()
        .unwrap_or(0)
}

/// A guest at `site` on a new qcow2 disk, running, with its console in `dir`.
fn define_guest(
    site: &LibvirtSite,
    dir: &Path,
    name: &str,
    variant: GuestVariant,
) -> (PathBuf, PathBuf) {
    define_guest_with(site, dir, name, variant, |_| {})
}

/// As [`define_guest`], with the domain's options changed by `edit`.
fn define_guest_with(
    site: &LibvirtSite,
    dir: &Path,
    name: &str,
    variant: GuestVariant,
    edit: impl FnOnce(&mut DomainOptions),
) -> (PathBuf, PathBuf) {
    let guest_dir = guest::guest_dir().expect("the test guest builds (scripts/guest-build.sh)");
    let disk = dir.join(format!("{name}.qcow2"));
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("64M")
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let console = dir.join(format!("{name}-console.log"));
    let mut opts = DomainOptions::new(
        name,
        &guest_dir,
        variant,
        &disk,
        DiskFormat::Qcow2,
        &console,
    );
    opts.guest.verify = true;
    edit(&mut opts);
    let xml = dir.join(format!("{name}.xml"));
    std::fs::write(&xml, guest::domain_xml(&opts)).expect("writes the definition");
    virsh(site, &["define", &xml.to_string_lossy()]);
    virsh(site, &["start", name]);
    (disk, console)
}

/// The guest's records as the replica at `agent` holds them: read in one request, so no
/// cycle's apply is seen half done.
async fn verify_at(agent: &Agent, vm: &str) -> guest::PatternSummary {
    let n = guest::DEFAULT_RECORDS;
    let all = agent
        .client
        .read_disk(vm, "vda", 0, n as u64 * guest::RECORD_STRIDE)
        .await
        .expect("the replica's disk reads");
    guest::verify_records(
        |offset, len| Ok(all[offset as usize..offset as usize + len].to_vec()),
        n,
    )
    .expect("the replica holds an intact pattern")
}

/// The agent reads and digests the disks of a domain that is off through qemu-nbd, and refuses
/// to for one that runs.
async fn read_through_the_agent(w: &World, site: &LibvirtSite, dir: &Path) {
    let disk = dir.join("idle.qcow2");
    for args in [
        vec![
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            disk.to_str().unwrap(),
            "16M",
        ],
        vec![
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 64k",
            disk.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let xml = format!(
        "<domain type='qemu'><name>idle</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        disk.display()
    );
    let file = dir.join("idle.xml");
    std::fs::write(&file, xml).expect("writes");
    virsh(site, &["define", &file.to_string_lossy()]);
    let c = &w.primary.client;
    let data = c
        .read_disk("idle", "vda", (1 << 20) - 4, 8)
        .await
        .expect("reads");
    assert_eq!(data, [0, 0, 0, 0, 0x5a, 0x5a, 0x5a, 0x5a]);
    let mut raw = vec![0u8; 16 << 20];
    raw[1 << 20..(1 << 20) + (64 << 10)].fill(0x5a);
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&raw))
    };
    assert_eq!(c.digest("idle", "vda").await.expect("a digest"), want);
    assert!(
        c.read_disk("app", "vda", 0, 8).await.is_err(),
        "a running guest's disk is not read"
    );
    virsh(site, &["undefine", "idle"]);
}

fn agent_args(site: &LibvirtSite) -> Vec<String> {
    let guest_dir = guest::guest_dir().expect("the test guest builds (scripts/guest-build.sh)");
    let mut args: Vec<String> = [
        "--runtime",
        "libvirt",
        "--libvirt-uri",
        site.uri(),
        // A guest that ignores ACPI fails its shutdown after this long.
        "--shutdown-timeout-seconds",
        "20",
        // A Linux guest hangs under nested KVM on some hosts; every test but the probe's runs
        // under TCG.
        "--accel",
        "tcg",
    ]
    .map(str::to_string)
    .to_vec();
    // Replicas boot the test guest's kernel directly: it is this directory's.
    args.push("--boot-file-dir".into());
    args.push(guest_dir.to_string_lossy().into_owned());
    args
}

fn job_steps(r: &twinsite::api::ReplicatedVM, job_type: &str) -> Vec<(String, String)> {
    steps(r, job_type)
}

/// Follows the consoles `logs` (guest `i` is `logs[i]`) from now on, recording when each
/// `TWINSITE WROTE gen=N` line first appeared, as `(i, N) → Instant`.
fn watch_generations(
    logs: Vec<PathBuf>,
) -> std::sync::Arc<std::sync::Mutex<std::collections::HashMap<(usize, u64), Instant>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let out = seen.clone();
    std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1800) {
            for (i, log) in logs.iter().enumerate() {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let now = Instant::now();
                let Ok(mut seen) = seen.lock() else { return };
                // A line still being written has no number yet: it is read again next time.
                for g in text.lines().filter_map(|l| {
                    l.split_once(guest::WROTE_MARK)
                        .and_then(|(_, n)| n.trim().parse::<u64>().ok())
                }) {
                    seen.entry((i, g)).or_insert(now);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    out
}

/// `qemu-img info` of an image, as JSON.
fn qemu_img_info(path: &std::path::Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(path)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img info {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img info answers JSON")
}

fn sha256_of(path: &std::path::Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path).expect("read image"),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_guests_are_protected_drilled_failed_over_reprotected_and_failed_back() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let w = World::start_full("lv", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());

    // A guest at the primary writing its pattern, protected.
    let (_disk, console) = define_guest(&pl, lv.path(), "app", GuestVariant::Acpi);
    read_through_the_agent(&w, &pl, lv.path()).await;
    wait_mark(&console, guest::WROTE_MARK, 0).await;
    w.create_rvm("app", json!({"type": "Planned"})).await;
    w.wait_protected("app", &p, &s).await;

    // Drill: a copy boots at the secondary on the isolated network from a recovery point and
    // finds its data; the replica keeps replicating.
    w.patch_spec(
        "app",
        json!({"testFailover": {"enabled": true, "network": "isolated"}}),
    )
    .await;
    w.wait_for("app", "drill copy running", |r| {
        r.status
            .as_ref()
            .and_then(|s| s.test_failover.as_ref())
            .is_some_and(|t| t.vm_name == "app-test" && t.state == "Running")
    })
    .await;
    assert_eq!(domstate(&sl, "app-test"), "running");
    let drill_xml = virsh(&sl, &["dumpxml", "app-test"]);
    assert!(drill_xml.contains("network='isolated'") || !drill_xml.contains("<interface"));
    let drill_console = w.secondary.vm_dir("app-test").join("console.log");
    let line = wait_mark(&drill_console, guest::VERIFY_OK_MARK, 0).await;
    assert!(
        generation(&line) >= 1,
        "the drill copy found no data: {line}"
    );
    assert_eq!(
        domstate(&pl, "app"),
        "running",
        "the drill left the primary alone"
    );
    // The copy runs on a copy-on-write overlay of the replica's image, which stays untouched:
    // points that arrive meanwhile wait until the drill is cleaned up.
    let overlay = w
        .secondary
        .vm_dir("app-test")
        .join("disks")
        .join("vda.qcow2");
    assert!(
        drill_xml.contains(&*overlay.to_string_lossy()),
        "{drill_xml}"
    );
    let replica_image = w.secondary.vm_dir("app").join("disks").join("vda.img");
    let info = qemu_img_info(&overlay);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(
        std::path::Path::new(info["backing-filename"].as_str().unwrap_or_default()),
        std::fs::canonicalize(&replica_image).expect("replica image"),
        "{info}"
    );
    let overlay_bytes = std::fs::metadata(&overlay).expect("overlay").len();
    assert!(
        overlay_bytes < 16 << 20,
        "the overlay holds only what the copy wrote: {overlay_bytes} bytes"
    );
    let at_drill = sha256_of(&replica_image);
    let during = w
        .primary
        .client
        .sync("app", "lv-drill-sync")
        .await
        .expect("a cycle during the drill");
    let points = w
        .secondary
        .client
        .recovery_points("app")
        .await
        .expect("points at the secondary");
    assert_eq!(
        points.last().map(|p| &p.id),
        Some(&during.recovery_point.id),
        "the point received during the drill is listed"
    );
    assert_eq!(
        sha256_of(&replica_image),
        at_drill,
        "a point received during the drill changed the image under its overlay"
    );
    w.patch_spec("app", json!({"testFailover": {"enabled": false}}))
        .await;
    w.wait_for("app", "drill cleaned up", |r| {
        r.status.as_ref().is_some_and(|s| s.test_failover.is_none())
    })
    .await;
    assert!(
        !virsh(&sl, &["list", "--all", "--name"]).contains("app-test"),
        "cleanup removes the drill copy's domain"
    );

    // Planned failover: the guest shuts down by ACPI, the rest is synced, it boots at the
    // secondary and finds every generation it completed.
    let wrote_before = last_wrote(&console);
    w.patch_spec("app", json!({"activeSite": s})).await;
    let r = w.wait_protected("app", &s, &p).await;
    let fo = job_steps(&r, "PlannedFailover");
    assert!(
        fo.iter()
            .all(|(_, state)| state == "Succeeded" || state == "Skipped"),
        "{fo:?}"
    );
    assert_eq!(
        domstate(&pl, "app"),
        "shut off",
        "the old source stays defined and off"
    );
    let wrote_at_shutdown = last_wrote(&console);
    assert!(wrote_at_shutdown >= wrote_before);
    let at_secondary = w.secondary.vm_dir("app").join("console.log");
    let line = wait_mark(&at_secondary, guest::VERIFY_OK_MARK, 0).await;
    assert!(
        generation(&line) >= wrote_at_shutdown,
        "the VM at the secondary lost generations: {line}, wrote {wrote_at_shutdown} at the primary"
    );
    let image = w.secondary.vm_dir("app").join("disks").join("vda.img");
    let summary = guest::verify_raw_image(&image, guest::DEFAULT_RECORDS).expect("pattern intact");
    assert!(summary.generation >= wrote_at_shutdown, "{summary:?}");

    // Reprotected toward the primary: the old source's images hold the secondary's writes.
    wait_mark(&at_secondary, guest::WROTE_MARK, 0).await;
    let wrote_at_secondary = last_wrote(&at_secondary);
    w.agent(&s)
        .client
        .sync("app", "lv-sync-1")
        .await
        .expect("a sync toward the primary");
    let summary = verify_at(w.agent(&p), "app").await;
    assert!(summary.generation >= wrote_at_secondary, "{summary:?}");

    // Failback: planned, to the primary, onto the agent's images there.
    w.patch_spec("app", json!({"activeSite": p})).await;
    w.wait_protected("app", &p, &s).await;
    assert_eq!(domstate(&pl, "app"), "running");
    assert!(
        !virsh(&sl, &["list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == "app"),
        "the secondary holds the replica again and keeps no domain on it"
    );
    let at_primary = w.primary.vm_dir("app").join("console.log");
    let line = wait_mark(&at_primary, guest::VERIFY_OK_MARK, 0).await;
    assert!(generation(&line) >= wrote_at_secondary, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_that_ignores_acpi_fails_over_unplanned_and_its_source_is_fenced() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let w = World::start_full("lvu", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let (_disk, console) = define_guest(&pl, lv.path(), "db", GuestVariant::NoAcpi);
    wait_mark(&console, guest::WROTE_MARK, 0).await;
    w.create_rvm(
        "db",
        json!({"type": "Unplanned", "shutdownSource": true, "recoveryPoint": "Latest"}),
    )
    .await;
    w.wait_protected("db", &p, &s).await;
    wait_mark(&console, guest::WROTE_MARK, 1).await;

    w.patch_spec("db", json!({"activeSite": s})).await;
    let r = w
        .wait_for("db", "db running at the secondary", |r| {
            r.status
                .as_ref()
                .is_some_and(|st| st.active_site.as_deref() == Some(s.as_str()))
                && jobs(r)
                    .iter()
                    .any(|(t, state)| t == "UnplannedFailover" && state == "Succeeded")
        })
        .await;
    let fo = job_steps(&r, "UnplannedFailover");
    let state_of = |name: &str| {
        fo.iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    assert_eq!(state_of("ShutdownSource"), "Failed", "{fo:?}");
    assert_eq!(state_of("StartAtTarget"), "Succeeded", "{fo:?}");
    assert_eq!(
        domstate(&pl, "db"),
        "shut off",
        "the source is fenced: {fo:?}"
    );
    let at_secondary = w.secondary.vm_dir("db").join("console.log");
    let line = wait_mark(&at_secondary, guest::VERIFY_OK_MARK, 0).await;
    assert!(generation(&line) >= 1, "{line}");
    // Reprotected toward the fenced old source.
    w.wait_protected("db", &s, &p).await;
}

/// Crashes on the data path of a real guest. An agent killed while a pull backup of its guest
/// is open leaves the backup job in libvirtd; started again, it ends that job and replication
/// goes on from its last checkpoint. A QEMU killed leaves bitmaps that cannot be trusted: the
/// agent resynchronizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_of_a_real_guest_survives_its_agent_and_its_qemu_crashing() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let mut w = World::start_full("lvk", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let (_disk, console) = define_guest(&pl, lv.path(), "web", GuestVariant::Acpi);
    wait_mark(&console, guest::WROTE_MARK, 0).await;
    w.create_rvm("web", json!({"type": "Planned"})).await;
    w.wait_protected("web", &p, &s).await;

    // The next cycle's export kills the agent while libvirt's backup job is open.
    w.primary.envs = vec![("TWINSITE_FAILPOINT".into(), "source.export".into())];
    w.primary.stop();
    w.primary.launch();
    let _ = w.primary.client.sync("web", "lvk-sync-1").await;
    let log = w.primary.dir.join("agent.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("failpoint source.export reached")
    {
        assert!(Instant::now() < deadline, "the export never began");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job = virsh(&pl, &["domjobinfo", "web"]);
    assert!(
        job.contains("Backup"),
        "the backup job outlives the agent: {job}"
    );

    // Started again: a sync succeeds and brings every generation the guest completed before it.
    w.primary.envs.clear();
    w.primary.restart().await;
    let wrote = last_wrote(&console);
    w.primary
        .client
        .sync("web", "lvk-sync-2")
        .await
        .expect("a sync after the agent's restart");
    let summary = verify_at(&w.secondary, "web").await;
    assert!(summary.generation >= wrote, "{summary:?}, wrote {wrote}");
    let job = virsh(&pl, &["domjobinfo", "web"]);
    assert!(
        !job.contains("Backup"),
        "the old backup job was ended: {job}"
    );
    let checkpoints = virsh(&pl, &["checkpoint-list", "web", "--name"]);
    assert_eq!(
        checkpoints.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "one checkpoint left, the one the replica acknowledged: {checkpoints}"
    );

    // QEMU dies as in a host crash: the image's bitmaps are left marked in use. Started again,
    // the guest's changes cannot be read from its checkpoint, so the agent resynchronizes by
    // block hashes (only differing blocks travel) and replication goes on.
    let sent_before = replication_of(&w.primary, "web").await.bytes_sent;
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", "guest=web,"])
        .status()
        .expect("pkill runs");
    assert!(killed.success(), "the guest's QEMU was found");
    let deadline = Instant::now() + Duration::from_secs(60);
    while domstate(&pl, "web") == "running" {
        assert!(Instant::now() < deadline, "QEMU did not die");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let marks = std::fs::read_to_string(&console)
        .unwrap_or_default()
        .matches(guest::WROTE_MARK)
        .count();
    virsh(&pl, &["start", "web"]);
    wait_mark(&console, guest::WROTE_MARK, marks).await;
    let deadline = Instant::now() + BOOT;
    let mut n = 3;
    let wrote = loop {
        let wrote = last_wrote(&console);
        match w.primary.client.sync("web", &format!("lvk-sync-{n}")).await {
            Ok(_) => break wrote,
            Err(e) => assert!(
                Instant::now() < deadline,
                "replication did not come back after QEMU died: {e:?}"
            ),
        }
        n += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let summary = verify_at(&w.secondary, "web").await;
    assert!(summary.generation >= wrote, "{summary:?}, wrote {wrote}");
    let agent_log = std::fs::read_to_string(w.primary.dir.join("agent.log")).unwrap_or_default();
    assert!(
        agent_log.contains("cannot be read since its last checkpoint"),
        "the agent resynchronized: {}",
        agent_log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let after = replication_of(&w.primary, "web").await;
    eprintln!(
        "after QEMU died: {} bytes sent, disk 64 MiB",
        after.bytes_sent - sent_before
    );
    assert!(
        after.bytes_sent - sent_before < 32 << 20,
        "a resync sends the blocks that differ, not the disk: {after:?}"
    );
}

async fn replication_of(agent: &Agent, vm: &str) -> twinsite::site::ReplicationInfo {
    agent.vm(vm).await.expect("the VM is listed").replication
}

/// The message of step `step` of the newest job of type `job_type`.
fn step_message(r: &twinsite::api::ReplicatedVM, job_type: &str, step: &str) -> Option<String> {
    r.status
        .as_ref()?
        .jobs
        .iter()
        .rev()
        .find(|j| format!("{:?}", j.type_) == job_type)?
        .steps
        .iter()
        .find(|s| s.name == step)?
        .message
        .clone()
}

/// The secondary's Site maps the primary's networks to its own: at failover a guest's NIC moves
/// to the mapped network there; a mapped network that does not exist fails StartAtTarget,
/// naming it, before the guest is defined or started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_moves_nics_to_the_networks_the_target_site_maps() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    for (site, net, bridge) in [
        (&pl, "prod-a", "br-proda"),
        (&pl, "prod-c", "br-prodc"),
        (&sl, "prod-b", "br-prodb"),
    ] {
        site.create_network(net, bridge)
            .expect("the network starts");
    }
    let w = World::start_full("lvn", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let sites: kube::Api<twinsite::api::Site> = kube::Api::all(w.client.clone());
    sites
        .patch(
            &s,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"networkMappings": [
                {"site": p, "from": "prod-a", "to": "prod-b"},
                {"site": p, "from": "prod-c", "to": "prod-missing"},
            ]}})),
        )
        .await
        .expect("the Site takes the mappings");

    let (_, mapped_console) = define_guest_on(&pl, lv.path(), "mapped", Some("prod-a"));
    let (_, missing_console) = define_guest_on(&pl, lv.path(), "unmapped", Some("prod-c"));
    for (vm, console) in [("mapped", &mapped_console), ("unmapped", &missing_console)] {
        wait_mark(console, guest::WROTE_MARK, 0).await;
        w.create_rvm(vm, json!({"type": "Planned"})).await;
    }
    for vm in ["mapped", "unmapped"] {
        w.wait_protected(vm, &p, &s).await;
        w.patch_spec(vm, json!({"activeSite": s})).await;
    }

    // Mapped: the guest runs at the secondary with its NIC on prod-b, its MAC kept, under the
    // accelerator the agent reports (TCG: `--accel tcg`).
    w.wait_protected("mapped", &s, &p).await;
    let live = virsh(&sl, &["dumpxml", "mapped"]);
    let listing = w.secondary.client.list_vms().await.expect("the listing");
    assert_eq!(listing.accelerator.as_deref(), Some("tcg"));
    assert!(live.starts_with("<domain type='qemu'"), "{live}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let site = sites.get(&s).await.expect("the Site");
        let accel = site.status.as_ref().and_then(|st| st.accelerator.clone());
        if accel.as_deref() == Some("tcg") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the Site's status shows no accelerator: {accel:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let nets = twinsite::agent::runtime::xml::networks(&live).expect("the live XML parses");
    assert_eq!(nets, vec!["prod-b"], "{live}");
    let source = virsh(&pl, &["dumpxml", "--inactive", "mapped"]);
    let mac = |xml: &str| {
        xml.lines()
            .find(|l| l.contains("<mac address="))
            .map(|l| l.trim().to_string())
    };
    assert_eq!(mac(&live), mac(&source), "the MAC address stays");
    let at_secondary = w.secondary.vm_dir("mapped").join("console.log");
    let line = wait_mark(&at_secondary, guest::VERIFY_OK_MARK, 0).await;
    assert!(generation(&line) >= 1, "{line}");

    // Mapped to a network the secondary lacks: StartAtTarget fails naming it, nothing starts.
    let r = w
        .wait_for("unmapped", "StartAtTarget failed", |r| {
            job_steps(r, "PlannedFailover")
                .iter()
                .any(|(n, state)| n == "StartAtTarget" && state == "Failed")
        })
        .await;
    let msg = step_message(&r, "PlannedFailover", "StartAtTarget").unwrap_or_default();
    assert!(
        msg.contains("prod-missing") && msg.contains("prod-c"),
        "the step names the missing network: {msg}"
    );
    assert!(
        !virsh(&sl, &["list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == "unmapped"),
        "no domain was defined at the secondary"
    );
}

/// As [`define_guest`], with a NIC on libvirt network `network`.
fn define_guest_on(
    site: &LibvirtSite,
    dir: &Path,
    name: &str,
    network: Option<&str>,
) -> (PathBuf, PathBuf) {
    define_guest_with(site, dir, name, GuestVariant::Acpi, |o| {
        o.network = network.map(str::to_string);
    })
}

/// `--accel auto` decides by booting a Linux kernel under KVM once at the agent's start: the
/// agent reports what it chose and why, and leaves no probe domain behind. (Which one it
/// chooses depends on the host: under nested virtualization KVM may hang the kernel.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_accel_probes_kvm_with_a_real_kernel() {
    let _serial = one_at_a_time().await;
    twinsite::init_crypto();
    let lv = tempfile::tempdir().expect("tempdir");
    let site = LibvirtSite::start("probe", &lv.path().join("probe")).expect("libvirtd starts");
    let guest_dir = guest::guest_dir().expect("the test guest builds (scripts/guest-build.sh)");
    let args: Vec<String> = [
        "--runtime",
        "libvirt",
        "--libvirt-uri",
        site.uri(),
        "--accel",
        "auto",
        "--accel-probe-kernel",
    ]
    .map(str::to_string)
    .into_iter()
    .chain([guest_dir.join("vmlinuz").to_string_lossy().into_owned()])
    .collect();
    let agent = Agent::start_args("probe-site", &lv, None, &args).await;
    let listing = agent.client.list_vms().await.expect("the listing");
    let chose = listing
        .accelerator
        .expect("a libvirt agent reports its accelerator");
    let log = std::fs::read_to_string(agent.dir.join("agent.log")).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("replicas boot under"))
        .unwrap_or_else(|| panic!("the agent logs its choice: {log}"));
    eprintln!("{line}");
    match chose.as_str() {
        "kvm" => assert!(line.contains("booted under KVM"), "{line}"),
        "tcg" => assert!(
            line.contains("KVM probe failed") || line.contains("libvirt offers no KVM"),
            "{line}"
        ),
        other => panic!("accelerator {other}"),
    }
    assert!(
        !virsh(&site, &["list", "--all", "--name"]).contains("twinsite-kvm-probe"),
        "the probe domain is gone"
    );
}

/// A ReplicatedVM for `vm` from primary to secondary taking an app-consistent point every hour.
async fn create_rvm_app_consistent(w: &World, vm: &str, failover: serde_json::Value) {
    let rvm: twinsite::api::ReplicatedVM = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
        "metadata": {"name": vm},
        "spec": {
            "primarySite": w.primary.site,
            "recoverySite": w.secondary.site,
            "replication": {"enabled": true, "intervalSeconds": 30, "appConsistentFrequencyHours": 1},
            "failover": failover,
        },
    }))
    .expect("a ReplicatedVM");
    w.rvms()
        .create(&kube::api::PostParams::default(), &rvm)
        .await
        .expect("the ReplicatedVM is created");
}

/// A guest whose QEMU guest agent answers has integration services: its app-consistent points
/// are taken with its file system frozen (qemu-ga's fsfreeze around the checkpoint), and the
/// source reports the freeze. A guest without one never gets an app-consistent point, and an
/// unplanned failover to LatestAppConsistent is refused before its source is shut down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn app_consistent_points_freeze_the_guest_through_its_guest_agent() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let w = World::start_full("lvq", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());

    let data = lv.path().join("ga-data.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&data)
        .arg("32M")
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, ga_console) = define_guest_with(&pl, lv.path(), "ga", GuestVariant::GuestAgent, |o| {
        o.data_disk = Some(data.clone());
    });
    let (_, plain_console) = define_guest(&pl, lv.path(), "plain", GuestVariant::Acpi);
    wait_mark(&ga_console, "TWINSITE FS mounted", 0).await;
    wait_mark(&ga_console, "TWINSITE GA started", 0).await;
    wait_mark(&plain_console, guest::WROTE_MARK, 0).await;
    create_rvm_app_consistent(&w, "ga", json!({"type": "Planned"})).await;
    create_rvm_app_consistent(
        &w,
        "plain",
        json!({"type": "Unplanned", "shutdownSource": true, "recoveryPoint": "LatestAppConsistent"}),
    )
    .await;
    w.wait_protected("ga", &p, &s).await;
    w.wait_protected("plain", &p, &s).await;

    // With its guest agent: integration services, a freeze of its one file system reported by
    // the source, and an app-consistent point at the replica.
    let deadline = Instant::now() + BOOT;
    let quiesce = loop {
        let v = w.primary.vm("ga").await.expect("ga is listed");
        assert!(v.integration_services, "qemu-ga answers: {v:?}");
        if let Some(q) = v.replication.last_quiesce {
            break q;
        }
        assert!(
            Instant::now() < deadline,
            "no freeze within {BOOT:?}: {v:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert_eq!(
        quiesce.filesystems, 1,
        "the ext2 file system on vdb: {quiesce:?}"
    );
    eprintln!("freeze: {quiesce:?}");
    let agent_log = std::fs::read_to_string(w.primary.dir.join("agent.log")).unwrap_or_default();
    assert!(
        agent_log.contains("guest filesystems frozen for an app-consistent point"),
        "the freeze is logged"
    );
    let deadline = Instant::now() + BOOT;
    loop {
        let rps = w
            .secondary
            .client
            .recovery_points("ga")
            .await
            .expect("the replica's points");
        if rps.iter().any(|rp| rp.app_consistent) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no app-consistent point: {rps:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Thawed right after the checkpoint.
    let status = qga(&pl, "ga", "guest-fsfreeze-status");
    assert!(status.contains("thawed"), "{status}");

    // Without a guest agent: no point is app-consistent, no freeze is reported.
    let rp = w
        .primary
        .client
        .sync("plain", "lvq-sync-1")
        .await
        .expect("a sync of plain")
        .recovery_point;
    assert!(!rp.app_consistent, "{rp:?}");
    let v = w.primary.vm("plain").await.expect("plain is listed");
    assert!(
        !v.integration_services && v.replication.last_quiesce.is_none(),
        "{v:?}"
    );
    let rps = w
        .secondary
        .client
        .recovery_points("plain")
        .await
        .expect("the replica's points");
    assert!(rps.iter().all(|rp| !rp.app_consistent), "{rps:?}");
    // An unplanned failover to LatestAppConsistent fails before the source is shut down.
    w.patch_spec("plain", json!({"activeSite": s})).await;
    let r = w
        .wait_for("plain", "the failover refused", |r| {
            jobs(r)
                .iter()
                .any(|(t, state)| t == "UnplannedFailover" && state == "Failed")
        })
        .await;
    let msg = r
        .status
        .as_ref()
        .and_then(|st| st.jobs.iter().rev().find_map(|j| j.message.clone()))
        .unwrap_or_default();
    assert!(msg.contains("LatestAppConsistent"), "{msg}");
    assert_eq!(
        domstate(&pl, "plain"),
        "running",
        "the source was not shut down"
    );
}

/// Runs guest agent command `cmd` in domain `name` through libvirt.
fn qga(site: &LibvirtSite, name: &str, cmd: &str) -> String {
    virsh(
        site,
        &[
            "qemu-agent-command",
            name,
            &format!(r#"{{"execute":"{cmd}"}}"#),
        ],
    )
}

/// The newest job of type `t` of the VM.
fn newest_job(r: &twinsite::api::ReplicatedVM, t: &str) -> Option<twinsite::api::Job> {
    r.status
        .as_ref()?
        .jobs
        .iter()
        .rev()
        .find(|j| format!("{:?}", j.type_) == t)
        .cloned()
}

/// A two-tier FailoverPlan of real guests ("db", then "web", each writing generation after
/// generation) fails over from one consistent cut: the source pauses both domains, takes one
/// checkpoint each, resumes them and logs the pause; each guest boots at the target from the
/// cut's point with every generation it completed before the plan started.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_tier_plan_of_real_guests_fails_over_from_one_cut() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let w = World::start_full("lvc", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let mut consoles = Vec::new();
    for vm in ["db", "web"] {
        let (_, console) = define_guest(&pl, lv.path(), vm, GuestVariant::Acpi);
        consoles.push(console);
    }
    for (vm, console) in ["db", "web"].iter().zip(&consoles) {
        wait_mark(console, guest::WROTE_MARK, 0).await;
        w.create_rvm(vm, json!({"type": "Planned"})).await;
    }
    for vm in ["db", "web"] {
        w.wait_protected(vm, &p, &s).await;
    }
    let wrote_before: Vec<u64> = consoles.iter().map(|c| last_wrote(c)).collect();
    // When each generation's line reached the host: a guest prints it after the generation is
    // on its disk, so a generation a point holds was printed before the cut (or right after
    // its pause ends), and one it lacks was printed after the cut.
    let printed = watch_generations(consoles.clone());

    run_plan(
        &w,
        "tiers",
        json!({
            "failover": {"type": "Unplanned", "recoveryPoint": "LatestProcessed",
                         "shutdownSource": true, "commit": "Manual"},
            "groups": [
                {"name": "data", "vms": ["db"]},
                {"name": "front", "vms": ["web"]},
            ],
        }),
    )
    .await;
    let mut cut = None;
    let mut held = Vec::new();
    for (i, vm) in ["db", "web"].into_iter().enumerate() {
        let r = w
            .wait_for(vm, &format!("{vm} failed over from the cut"), |r| {
                r.status.as_ref().and_then(|s| s.active_site.as_deref()) == Some(s.as_str())
                    && newest_job(r, "UnplannedFailover")
                        .is_some_and(|j| format!("{:?}", j.state) == "Succeeded")
            })
            .await;
        let job = newest_job(&r, "UnplannedFailover").expect("the failover job");
        let id = job.cut_id.clone().expect("the job names its cut");
        assert_eq!(cut.get_or_insert(id.clone()), &id, "{vm}: one cut for both");
        let rp = job.recovery_point.clone().expect("the failover's point");
        let points = w
            .secondary
            .client
            .recovery_points(vm)
            .await
            .expect("points");
        let point = points
            .iter()
            .find(|x| x.id == rp)
            .unwrap_or_else(|| panic!("{vm}: {rp} not at the target: {points:?}"));
        assert_eq!(point.cut_id.as_deref(), Some(id.as_str()), "{vm}");
        let at_secondary = w.secondary.vm_dir(vm).join("console.log");
        let line = wait_mark(&at_secondary, guest::VERIFY_OK_MARK, 0).await;
        assert!(
            generation(&line) >= wrote_before[i],
            "{vm} lost generations written before the plan: {line}, wrote {}",
            wrote_before[i]
        );
        held.push(generation(&line));
    }
    // One instant separates what the cut holds from what it lacks, across both guests: no
    // generation either point holds was written after one the other point lacks (the web
    // tier never got ahead of the db writes it followed).
    let printed = printed.lock().expect("watcher").clone();
    let at = |vm: usize, g: u64| printed.get(&(vm, g)).copied();
    let last_in: Vec<Instant> = (0..2).filter_map(|vm| at(vm, held[vm])).collect();
    let first_out: Vec<Instant> = (0..2).filter_map(|vm| at(vm, held[vm] + 1)).collect();
    assert!(
        !first_out.is_empty(),
        "neither guest wrote after the cut (held {held:?}): the check would prove nothing"
    );
    if let (Some(a), Some(b)) = (last_in.iter().max(), first_out.iter().min()) {
        assert!(
            a < b,
            "a generation the cut holds was written {:?} after one it lacks (held {held:?})",
            a.duration_since(*b)
        );
    }
    let log = std::fs::read_to_string(w.primary.dir.join("agent.log")).unwrap_or_default();
    let paused = log
        .lines()
        .find(|l| l.contains("domains paused for a consistent cut"))
        .unwrap_or_else(|| panic!("the source logs the pause"));
    assert!(paused.contains("db") && paused.contains("web"), "{paused}");
    eprintln!("{paused}");
}

/// The newest record the guest acknowledged on console `log` (its append-only log), if any.
fn last_logged(log: &Path) -> Option<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(guest::LOGGED_MARK))
        .filter_map(|(_, k)| k.trim().parse::<u64>().ok())
        .max()
}

/// The guest's check of its log at boot `nth` on console `log`: the records it found.
async fn log_checked(log: &Path, nth: usize) -> u64 {
    let line = wait_mark(log, "TWINSITE LOG ", nth).await;
    assert!(
        !line.contains(guest::LOG_BAD_MARK),
        "the guest found its log damaged: {line}"
    );
    line.split_once(guest::LOG_OK_MARK)
        .and_then(|(_, c)| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no record count in {line:?}"))
}

/// Waits until the guest on console `log` has acknowledged record `seq`.
async fn wait_logged(log: &Path, seq: u64) {
    let deadline = Instant::now() + BOOT;
    while last_logged(log).is_none_or(|k| k < seq) {
        assert!(
            Instant::now() < deadline,
            "the guest on {} acknowledged no record {seq} within {BOOT:?}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// (device, inode) of a file.
fn file_id(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.dev(), m.ino())
}

/// (device, inode) of every file the QEMU of domain `name` at `site` holds open.
fn qemu_open_files(site: &LibvirtSite, name: &str) -> Vec<(u64, u64)> {
    let pid_file = site.dir().join("run/qemu").join(format!("{name}.pid"));
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no QEMU pid in {}", pid_file.display()));
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("QEMU's open files")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::metadata(e.path()).ok())
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        })
        .collect()
}

/// Waits until the newest planned failover of `vm` made `to` its active site and waits for its
/// commit; returns the job's name.
async fn failed_over(w: &World, vm: &str, to: &str) -> String {
    let r = w
        .wait_for(
            vm,
            &format!("{vm} failed over to {to}, not committed"),
            |r| {
                r.status.as_ref().is_some_and(|st| {
                    st.active_site.as_deref() == Some(to)
                        && st.phase == Some(twinsite::api::VmPhase::FailedOver)
                }) && newest_job(r, "PlannedFailover")
                    .is_some_and(|j| format!("{:?}", j.state) == "Succeeded")
            },
        )
        .await;
    let steps = job_steps(&r, "PlannedFailover");
    assert!(
        steps
            .iter()
            .all(|(_, st)| st == "Succeeded" || st == "Skipped"),
        "{steps:?}"
    );
    newest_job(&r, "PlannedFailover")
        .expect("the failover job")
        .name
}

/// The way there and back with a guest whose records are each written once (an append-only
/// log, every record synced before the next, checked at every boot): a planned failover, its
/// commit once the guest wrote at the new site, reverse replication that reaches
/// Replicating/Healthy, more records written at the new site, and a planned failback that passes VerifyDigests at its first attempt. The guest at
/// the primary then finds every record it acknowledged at either site, and so did the copy
/// the reverse replication called healthy. From failover to failback QEMU at the secondary
/// writes into the agent's image there (the same inode).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_record_a_real_guest_acknowledged_survives_failover_and_failback() {
    round_trip("lvl", false).await;
}

/// As [`every_record_a_real_guest_acknowledged_survives_failover_and_failback`], with the
/// target's agent killed during the failover after it started the domain paused: the retried
/// StartAtTarget finds the domain booted and still tracks its writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_whose_boot_is_retried_loses_no_record() {
    round_trip("lvr", true).await;
}

async fn round_trip(tag: &str, crash_at_boot: bool) {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let mut w = World::start_full(tag, &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let (_disk, first) = define_guest_with(&pl, lv.path(), "app", GuestVariant::Acpi, |o| {
        o.guest.log = true;
    });
    assert_eq!(
        log_checked(&first, 0).await,
        0,
        "a new disk holds no record"
    );
    wait_logged(&first, 0).await;
    w.create_rvm("app", json!({"type": "Planned", "commit": "Manual"}))
        .await;
    w.wait_protected("app", &p, &s).await;

    // Planned failover; the guest runs at the secondary a while before it is committed and
    // reprotected toward the primary, as a person checks an application before committing.
    if crash_at_boot {
        w.secondary.envs = vec![("TWINSITE_FAILPOINT".into(), "failover.boot".into())];
        w.secondary.restart().await;
    }
    w.patch_spec("app", json!({"activeSite": s})).await;
    if crash_at_boot {
        let log = w.secondary.dir.join("agent.log");
        let deadline = Instant::now() + BOOT;
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("failpoint failover.boot reached")
        {
            assert!(
                Instant::now() < deadline,
                "the failover never booted the domain"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            domstate(&sl, "app"),
            "paused",
            "started paused, then the agent died"
        );
        w.secondary.envs.clear();
        w.secondary.restart().await;
    }
    let job = failed_over(&w, "app", &s).await;
    let at_primary = last_logged(&first).expect("records written at the primary");
    let second = w.secondary.vm_dir("app").join("console.log");
    let found = log_checked(&second, 0).await;
    assert!(
        found > at_primary,
        "the guest at the secondary found {found} records; it acknowledged 0..={at_primary}"
    );
    wait_logged(&second, found + 5).await;
    annotate(&w, "rvm", "app", twinsite::api::COMMIT_ANNOTATION, &job);
    w.wait_protected("app", &s, &p).await;
    let image = w.secondary.vm_dir("app").join("disks").join("vda.img");
    let wrapper = image.with_extension("qcow2");
    let held = qemu_open_files(&sl, "app");
    let files = [file_id(&image), file_id(&wrapper)];
    assert!(
        files.iter().all(|f| held.contains(f)),
        "QEMU at the secondary runs on other files than the agent's image and its wrapper"
    );
    let health = |r: &twinsite::api::ReplicatedVM| {
        r.status
            .as_ref()
            .and_then(|s| s.replication.as_ref())
            .map(|x| format!("{:?}/{:?}", x.state, x.health))
            .unwrap_or_default()
    };
    let r = w
        .wait_for("app", "reverse replication Replicating/Healthy", |r| {
            health(r) == "Replicating/Some(Healthy)"
        })
        .await;
    eprintln!("reverse replication: {}", health(&r));

    // More records at the secondary; a point taken after them holds every one (read back from
    // the primary's copy, which status calls healthy).
    let before = last_logged(&second).unwrap_or(found);
    wait_logged(&second, before + 3).await;
    let acked = last_logged(&second).expect("records written at the secondary");
    w.agent(&s)
        .client
        .sync("app", &format!("{tag}-sync-1"))
        .await
        .expect("a sync toward the primary");
    let slots = acked + 1 + 64;
    let bytes = w
        .primary
        .client
        .read_disk("app", "vda", 0, slots * guest::LOG_STRIDE)
        .await
        .expect("the primary's copy reads");
    let (held, after_gap) = guest::verify_log(
        |off, len| Ok(bytes[off as usize..off as usize + len].to_vec()),
        slots,
    )
    .expect("the primary's copy holds intact records");
    assert!(
        held > acked && after_gap.is_empty(),
        "the primary's copy holds records 0..{held} (and {after_gap:?} after a gap); the guest \
         acknowledged 0..={acked} before the point was taken (0..={at_primary} at the primary)"
    );

    // Planned failback: VerifyDigests passes at the first attempt, the guest finds every record.
    wait_logged(&second, acked + 2).await;
    assert_eq!(
        [file_id(&image), file_id(&wrapper)],
        files,
        "the agent's image at the secondary was replaced while the guest ran on it"
    );
    let held = qemu_open_files(&sl, "app");
    assert!(
        files.iter().all(|f| held.contains(f)),
        "QEMU's files changed"
    );
    let failovers = |r: &twinsite::api::ReplicatedVM| {
        jobs(r)
            .iter()
            .filter(|(t, _)| t == "PlannedFailover")
            .count()
    };
    let earlier = failovers(&w.get("app").await);
    w.patch_spec("app", json!({"activeSite": p})).await;
    let r = w
        .wait_for("app", "the failback ends", |r| {
            failovers(r) > earlier
                && newest_job(r, "PlannedFailover").is_some_and(|j| {
                    matches!(format!("{:?}", j.state).as_str(), "Succeeded" | "Failed")
                })
        })
        .await;
    let job = newest_job(&r, "PlannedFailover").expect("the failback job");
    assert!(
        format!("{:?}", job.state) == "Succeeded" && job.attempt.unwrap_or(1) == 1,
        "the failback did not pass at its first attempt: {:?}, steps {:?}, message {:?}",
        job.state,
        job_steps(&r, "PlannedFailover"),
        job.message
    );
    let job = failed_over(&w, "app", &p).await;
    annotate(&w, "rvm", "app", twinsite::api::COMMIT_ANNOTATION, &job);
    w.wait_protected("app", &p, &s).await;
    // The secondary holds the replica again: no domain there may start into its image.
    assert!(
        !virsh(&sl, &["list", "--all", "--name"])
            .lines()
            .any(|l| l.trim() == "app"),
        "the secondary keeps a domain on the replica's image"
    );
    let acked = last_logged(&second).expect("records written at the secondary");
    let third = w.primary.vm_dir("app").join("console.log");
    let found = log_checked(&third, 0).await;
    assert!(
        found > acked,
        "the guest back at the primary found {found} records; it acknowledged 0..={acked} at \
         the secondary"
    );
}

/// Runs `qemu-io` command `cmd` on qcow2 image `image` (a domain that is off), waiting while a
/// cycle's reader holds the image.
fn qemu_io(image: &Path, cmd: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd])
            .arg(image)
            .output()
            .expect("qemu-io runs");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !err.contains("lock") {
            return;
        }
        assert!(
            err.contains("lock") && Instant::now() < deadline,
            "qemu-io {cmd}: {err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A domain that is protected while it is off gets recovery points like one that runs: its
/// first transfer starts a checkpoint (a persistent bitmap in its images, which libvirt knows),
/// and each cycle sends what changed in its images since, here a write made while it was off.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_domain_that_is_off_gets_recovery_points() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let w = World::start_full("lvo", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let disk = lv.path().join("off.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk)
        .arg("16M")
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success());
    qemu_io(&disk, "write -P 0x5a 1M 64k");
    let xml = format!(
        "<domain type='qemu'><name>off</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        disk.display()
    );
    let file = lv.path().join("off.xml");
    std::fs::write(&file, xml).expect("writes");
    virsh(&pl, &["define", &file.to_string_lossy()]);
    w.create_rvm("off", json!({"type": "Planned"})).await;
    // Protected and replicating (never Ready: a VM that is off where it should run is not).
    w.wait_for("off", "off protected, replicating", |r| {
        r.status.as_ref().is_some_and(|st| {
            st.phase == Some(twinsite::api::VmPhase::Protected)
                && st.replication.as_ref().is_some_and(|x| {
                    x.source_site.as_deref() == Some(p.as_str())
                        && x.target_site.as_deref() == Some(s.as_str())
                        && format!("{:?}", x.state) == "Replicating"
                })
        })
    })
    .await;
    let first = w
        .primary
        .client
        .sync("off", "lvo-sync-1")
        .await
        .expect("a cycle of a domain that is off");
    qemu_io(&disk, "write -P 0xa5 2M 64k");
    let second = w
        .primary
        .client
        .sync("off", "lvo-sync-2")
        .await
        .expect("a cycle after a write to its image");
    assert_ne!(first.recovery_point.id, second.recovery_point.id);
    for (off, byte) in [(1u64 << 20, 0x5au8), (2 << 20, 0xa5)] {
        let got = w
            .secondary
            .client
            .read_disk("off", "vda", off, 8)
            .await
            .expect("the replica reads");
        assert_eq!(got, [byte; 8], "the replica at {off}");
    }
    let v = w.primary.vm("off").await.expect("off is listed");
    assert_eq!(
        format!("{:?}", v.replication.state),
        "Replicating",
        "no resync: {v:?}"
    );
    assert_eq!(domstate(&pl, "off"), "shut off");
}

/// Defines domain `name` at `site`, off, on the one qcow2 disk `disk`.
fn define_off_domain(site: &LibvirtSite, dir: &Path, name: &str, disk: &Path) {
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>\
         <devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
         <source file='{}'/><target dev='vda' bus='virtio'/></disk></devices></domain>",
        disk.display()
    );
    let file = dir.join(format!("{name}.xml"));
    std::fs::write(&file, xml).expect("writes");
    virsh(site, &["define", &file.to_string_lossy()]);
}

/// The replica of `vm` at the secondary holds exactly what the source's disk `top` (a qcow2
/// image, read through its backing chain) holds.
fn assert_replica_equals(w: &World, vm: &str, top: &Path, scratch: &Path) {
    let raw = scratch.join(format!("{vm}-source.raw"));
    let out = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(top)
        .arg(&raw)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replica = w.secondary.vm_dir(vm).join("disks/vda.img");
    assert_eq!(
        sha256_of(&replica),
        sha256_of(&raw),
        "the replica of {vm} differs from its source"
    );
}

/// A domain that is off is read with its checkpoint's bitmap only when every layer of each
/// disk proves that bitmap complete. After an external snapshot (a new top image the bitmap is
/// not in, so qemu-nbd would find the old one in the backing file, which saw none of the
/// writes since) and after a tool died with the image open (the bitmap stays `in-use`), the
/// next transfer compares block hashes, and the replica equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_domain_that_is_off_is_compared_by_hashes_when_its_bitmap_is_not_trusted() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let w = World::start_full("lvb", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let base = lv.path().join("snap.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M")
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success());
    qemu_io(&base, "write -P 0x5a 1M 64k");
    define_off_domain(&pl, lv.path(), "snap", &base);
    w.create_rvm("snap", json!({"type": "Planned"})).await;
    w.wait_for("snap", "snap replicating", |r| {
        r.status.as_ref().is_some_and(|st| {
            st.replication
                .as_ref()
                .is_some_and(|x| format!("{:?}", x.state) == "Replicating")
        })
    })
    .await;
    w.primary
        .client
        .sync("snap", "lvb-sync-1")
        .await
        .expect("a cycle of a domain that is off");
    assert_replica_equals(&w, "snap", &base, lv.path());

    // An external snapshot taken by another tool: the domain now runs on a new top image.
    let top = lv.path().join("snap-top.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top)
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success());
    let xml = virsh(&pl, &["dumpxml", "--inactive", "snap"]).replace(
        &format!("'{}'", base.display()),
        &format!("'{}'", top.display()),
    );
    assert!(xml.contains(&top.display().to_string()), "{xml}");
    let file = lv.path().join("snap-top.xml");
    std::fs::write(&file, xml).expect("writes");
    virsh(&pl, &["define", &file.to_string_lossy()]);
    qemu_io(&top, "write -P 0x3c 3M 64k");
    let untrusted = w.primary.client.sync("snap", "lvb-sync-2").await;
    let msg = format!("{untrusted:?}");
    assert!(
        untrusted.is_err() && msg.contains("block hashes"),
        "the bitmap in the backing file only is not trusted: {msg}"
    );
    w.primary
        .client
        .sync("snap", "lvb-sync-3")
        .await
        .expect("the resync by block hashes");
    assert_replica_equals(&w, "snap", &top, lv.path());
    w.primary
        .client
        .sync("snap", "lvb-sync-4")
        .await
        .expect("a cycle from the new top image's bitmap");

    // A tool that dies with the image open leaves its bitmap `in-use`: what it wrote may be
    // missing from it.
    qemu_io(&top, "write -P 0x4b 4M 64k");
    let mut holder = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&top)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !qemu_img_info(&top).to_string().contains("in-use") {
        assert!(Instant::now() < deadline, "qemu-io never opened {top:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    holder.kill().expect("kills qemu-io");
    let _ = holder.wait();
    let untrusted = w.primary.client.sync("snap", "lvb-sync-5").await;
    let msg = format!("{untrusted:?}");
    assert!(
        untrusted.is_err() && msg.contains("block hashes"),
        "an in-use bitmap is not trusted: {msg}"
    );
    w.primary
        .client
        .sync("snap", "lvb-sync-6")
        .await
        .expect("the resync by block hashes");
    assert_replica_equals(&w, "snap", &top, lv.path());
    let got = w
        .secondary
        .client
        .read_disk("snap", "vda", 3 << 20, 8)
        .await
        .expect("the replica reads");
    assert_eq!(got, [0x3c; 8], "the write into the snapshot's top image");
}

/// An export that fails for a reason that leaves the checkpoint intact is retried from it; only
/// a lost or broken checkpoint resynchronizes. Here, a backup job of another tool (the export
/// waits for it) and a restart of the site's libvirtd between cycles (the agent connects again):
/// the cycles after each succeed from the same base, nothing is resynchronized, and the
/// replica holds every generation the guest completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_job_of_another_tool_and_a_libvirtd_restart_cost_no_resync() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let w = World::start_full("lvr", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let (_disk, console) = define_guest(&pl, lv.path(), "web", GuestVariant::Acpi);
    wait_mark(&console, guest::WROTE_MARK, 0).await;
    w.create_rvm("web", json!({"type": "Planned"})).await;
    w.wait_protected("web", &p, &s).await;
    w.primary
        .client
        .sync("web", "lvr-sync-1")
        .await
        .expect("a first cycle");

    // Another tool's backup job: the cycle waits (409) and keeps its base.
    let backup = lv.path().join("other-backup.xml");
    std::fs::write(
        &backup,
        format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{}'/>\
             <disks><disk name='vda' backup='yes' type='file'><scratch file='{}'/></disk>\
             </disks></domainbackup>",
            lv.path().join("other.sock").display(),
            lv.path().join("other.scratch").display()
        ),
    )
    .expect("writes");
    virsh(&pl, &["backup-begin", "web", &backup.to_string_lossy()]);
    let waited = w.primary.client.sync("web", "lvr-sync-2").await;
    let msg = format!("{waited:?}");
    assert!(
        waited.is_err() && msg.contains("did not start"),
        "the export waits for the other tool's backup: {msg}"
    );
    let v = replication_of(&w.primary, "web").await;
    assert_eq!(format!("{:?}", v.state), "Replicating", "no resync: {v:?}");
    virsh(&pl, &["domjobabort", "web"]);
    let wrote = last_wrote(&console);
    w.primary
        .client
        .sync("web", "lvr-sync-3")
        .await
        .expect("a cycle once the other backup ended");
    let summary = verify_at(&w.secondary, "web").await;
    assert!(summary.generation >= wrote, "{summary:?}, wrote {wrote}");

    // libvirtd restarts between two cycles: the guest runs on, the agent connects again.
    pl.restart_libvirtd().expect("libvirtd restarts");
    assert_eq!(domstate(&pl, "web"), "running");
    for n in 4..6 {
        let wrote = last_wrote(&console);
        w.primary
            .client
            .sync("web", &format!("lvr-sync-{n}"))
            .await
            .expect("a cycle after libvirtd restarted");
        let summary = verify_at(&w.secondary, "web").await;
        assert!(summary.generation >= wrote, "{summary:?}, wrote {wrote}");
    }
    let v = replication_of(&w.primary, "web").await;
    assert_eq!(format!("{:?}", v.state), "Replicating", "no resync: {v:?}");
    let agent_log = std::fs::read_to_string(w.primary.dir.join("agent.log")).unwrap_or_default();
    assert!(
        !agent_log.contains("cannot be read since its last checkpoint")
            && !agent_log.contains("resync by block hashes"),
        "nothing was resynchronized: {}",
        agent_log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A consistent cut pauses its domains; an agent killed while they are paused (failpoint
/// `cut.paused`) leaves them paused, and its next start resumes them: the cut recorded them
/// before pausing. The guest then writes on, and replication goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_guest_paused_for_a_cut_runs_again_when_the_agent_that_died_starts() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let mut w = World::start_full("lvp", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let (_disk, console) = define_guest(&pl, lv.path(), "db", GuestVariant::Acpi);
    wait_mark(&console, guest::WROTE_MARK, 0).await;
    w.create_rvm("db", json!({"type": "Planned"})).await;
    w.wait_protected("db", &p, &s).await;

    w.primary.envs = vec![("TWINSITE_FAILPOINT".into(), "cut.paused".into())];
    w.primary.stop();
    w.primary.launch();
    let req = twinsite::site::CutRequest {
        cut_id: "lvp-cut-1".into(),
        vms: vec!["db".into()],
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.primary.client.health().await.is_err() {
        assert!(Instant::now() < deadline, "the agent did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut = w.primary.client.cut(&req).await;
    assert!(cut.is_err(), "the agent died during the cut: {cut:?}");
    let log = w.primary.dir.join("agent.log");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("failpoint cut.paused reached"),
        "the agent died with the domain paused"
    );
    assert_eq!(domstate(&pl, "db"), "paused", "the guest was paused");

    w.primary.envs.clear();
    w.primary.restart().await;
    assert_eq!(
        domstate(&pl, "db"),
        "running",
        "the agent's start resumed the guest"
    );
    let marks = std::fs::read_to_string(&console)
        .unwrap_or_default()
        .matches(guest::WROTE_MARK)
        .count();
    wait_mark(&console, guest::WROTE_MARK, marks).await;
    let wrote = last_wrote(&console);
    w.primary
        .client
        .sync("db", "lvp-sync-1")
        .await
        .expect("a cycle after the restart");
    let summary = verify_at(&w.secondary, "db").await;
    assert!(summary.generation >= wrote, "{summary:?}, wrote {wrote}");
}

/// A disk that grows under a protected guest (`virsh blockresize`) is never replicated, nor
/// digested, at its old size: the next cycle fails, naming the disk and both sizes, so the
/// replica is not reported current while it lacks the disk's tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disk_that_grows_is_not_replicated_at_its_old_size() {
    let _serial = one_at_a_time().await;
    let lv = tempfile::tempdir().expect("tempdir");
    let pl = LibvirtSite::start("primary", &lv.path().join("primary")).expect("libvirtd starts");
    let sl =
        LibvirtSite::start("secondary", &lv.path().join("secondary")).expect("libvirtd starts");
    let w = World::start_full("lvg", &[], false, [&agent_args(&pl), &agent_args(&sl)]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let (_disk, console) = define_guest(&pl, lv.path(), "web", GuestVariant::Acpi);
    wait_mark(&console, guest::WROTE_MARK, 0).await;
    w.create_rvm("web", json!({"type": "Planned"})).await;
    w.wait_protected("web", &p, &s).await;
    w.primary
        .client
        .sync("web", "lvg-sync-1")
        .await
        .expect("a cycle before the disk grows");
    let info = virsh(&pl, &["domblkinfo", "web", "vda", "--human"]);
    let size: u64 = virsh(&pl, &["domblkinfo", "web", "vda"])
        .lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("the disk's capacity: {info}"));
    let grown = size + (16 << 20);
    virsh(&pl, &["blockresize", "web", "vda", &format!("{grown}B")]);
    let refused = w.primary.client.sync("web", "lvg-sync-2").await;
    let msg = format!("{refused:?}");
    assert!(
        refused.is_err() && msg.contains(&grown.to_string()) && msg.contains(&size.to_string()),
        "a cycle at the old size is refused, naming both sizes: {msg}"
    );
    let v = replication_of(&w.primary, "web").await;
    assert!(
        v.last_error
            .as_deref()
            .is_some_and(|e| e.contains("size changed")),
        "the VM's status says why: {v:?}"
    );
}
