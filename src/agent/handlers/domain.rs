//! Routes on a VM that is a hypervisor domain (the `libvirt` runtime): listed and powered
//! through the runtime; its guest writes for itself. Runtime calls block, so they run off the
//! async threads.

use std::time::Duration;

use super::super::runtime::{Domain, READ_WINDOW_BLOCKS, RuntimeKind, read_blocks, windows};
use super::super::{ApiError, ApiResult, ErrorKind, Shared};
use crate::replication::{BLOCK_SIZE, block_count, block_len};
use crate::site::{Power, PowerAction, Role, Vm};
use sha2::Digest;

/// Runs a runtime call off the async threads.
async fn blocking<T: Send + 'static>(
    st: &Shared,
    f: impl FnOnce(&dyn super::super::runtime::Runtime) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || f(st.runtime.as_ref()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// The domain `vm`, if the site's hypervisor has one.
pub(super) async fn find(st: &Shared, vm: &str) -> ApiResult<Option<Domain>> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        // No hypervisor to ask: the hot paths (guest writes) skip the blocking pool.
        return Ok(None);
    }
    let vm = vm.to_string();
    blocking(st, move |rt| rt.domain(&vm)).await
}

/// Every domain of the site.
pub(super) async fn all(st: &Shared) -> ApiResult<Vec<Domain>> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(Vec::new());
    }
    blocking(st, |rt| rt.domains()).await
}

/// A domain as the agent's VM listing shows it.
pub(super) fn view(d: &Domain) -> Vm {
    Vm {
        name: d.name.clone(),
        runtime: Some("libvirt".into()),
        power: d.power,
        role: Role::Primary,
        integration_services: d.guest_agent,
        disks: d.disks.iter().map(|x| x.spec()).collect(),
        replication: Default::default(),
        recovery_points: Default::default(),
        test_copy: None,
        network: None,
        owner: None,
    }
}

/// What the hypervisor knows better than the store of a domain the store holds: whether it
/// runs, its disks' formats, its guest agent.
pub(super) fn overlay(v: &mut Vm, d: &Domain) {
    v.runtime = Some("libvirt".into());
    v.power = d.power;
    v.integration_services = d.guest_agent;
    for disk in &mut v.disks {
        if let Some(x) = d.disks.iter().find(|x| x.name == disk.name) {
            disk.format = Some(x.format.clone());
        }
    }
}

/// Start, graceful shutdown (ACPI, within the agent's shutdown timeout) or hard stop.
pub(super) async fn power(st: &Shared, d: &Domain, action: PowerAction) -> ApiResult<Vm> {
    let name = d.name.clone();
    let timeout: Duration = st.shutdown_timeout;
    blocking(st, move |rt| match action {
        PowerAction::Start => rt.start(&name),
        PowerAction::Shutdown => rt.shutdown(&name, timeout),
        PowerAction::PowerOff => rt.power_off(&name),
    })
    .await?;
    // Done: a listing that fails now (QEMU just exiting) does not undo it.
    let mut v = view(d);
    v.power = match action {
        PowerAction::Start => Power::Running,
        PowerAction::Shutdown | PowerAction::PowerOff => Power::Off,
    };
    if let Ok(Some(now)) = find(st, &d.name).await {
        v = view(&now);
    }
    Ok(v)
}

/// Before a failover at this site: a replica of a libvirt domain must find every network its
/// NICs use here (after `networks` maps them). Nothing to check for other VMs, or for one that
/// runs already (an earlier attempt booted it).
pub(super) async fn check_networks(
    st: &Shared,
    vm: &str,
    networks: &[(String, String)],
) -> ApiResult<()> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(());
    }
    let (st2, name, networks) = (st.clone(), vm.to_string(), networks.to_vec());
    tokio::task::spawn_blocking(move || {
        let definition = match st2.store.read_vm(&name, |r| Ok(r.meta.definition.clone())) {
            Ok(Some(d)) => d,
            // No replica of a domain here: the store's failover answers for it.
            Ok(None) | Err(_) => return Ok(()),
        };
        if st2
            .runtime
            .domain(&name)?
            .is_some_and(|d| d.power == Power::Running)
        {
            return Ok(());
        }
        st2.runtime.check_networks(&definition, &networks)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// After a failover at this site: a replica of a libvirt domain is defined from the source's
/// definition on its images and started, tracked from its first write (its checkpoint becomes
/// the base of reverse replication); its NICs on the networks `networks` maps move to the
/// mapped ones. Nothing to do for other VMs, or when it runs already.
pub(super) async fn boot_failed_over(
    st: &Shared,
    vm: &str,
    networks: Vec<(String, String)>,
) -> ApiResult<()> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(());
    }
    let st2 = st.clone();
    let name = vm.to_string();
    tokio::task::spawn_blocking(move || {
        st2.store.write_vm(&name, |r| {
            let Some(definition) = r.meta.definition.clone() else {
                return Ok(());
            };
            let images: Vec<(String, std::path::PathBuf)> = r
                .meta
                .disks
                .iter()
                .map(|d| {
                    (
                        d.name.clone(),
                        r.dir.join("disks").join(format!("{}.img", d.name)),
                    )
                })
                .collect();
            let cp = format!("twinsite-failover-{}", jiff::Timestamp::now().as_second());
            // A retry finds the domain booted: it is a domain all the same (its guest writes
            // through QEMU, which only its checkpoints see), whatever the first attempt saved.
            let cp = st2
                .runtime
                .boot_replica(&name, &definition, &images, &cp, &networks)?;
            if r.meta.domain.as_ref().and_then(|d| d.checkpoint.as_deref()) != Some(cp.as_str()) {
                r.meta.domain = Some(super::super::meta::DomainLink {
                    checkpoint: Some(cp),
                });
                r.save()?;
            }
            Ok(())
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// An open export, the disk's index in it, and the disk's size.
type OwnImage = (Box<dyn super::super::runtime::Export>, usize, u64);

/// An export of disk `disk` of `name` when it is a domain on its own images (where it was
/// first protected, or not protected at all) and off; `None` for every other VM (the store
/// reads its files). A running guest's disk is read only by replication.
fn own_image_export(
    st: &Shared,
    name: &str,
    disk: &str,
    what: &str,
) -> ApiResult<Option<OwnImage>> {
    let stored = st.store.read_vm(name, |r| {
        Ok((r.meta.domain.is_some() && r.disks.is_empty())
            .then(|| (r.meta.disks.clone(), r.dir.join("spool"))))
    });
    let dom = st.runtime.domain(name)?;
    let (disks, scratch) = match (stored, &dom) {
        (Ok(Some(found)), _) => found,
        (Err(e), Some(d)) if e.kind == ErrorKind::NotFound => (
            d.disks.iter().map(|x| x.spec()).collect(),
            std::env::temp_dir(),
        ),
        _ => return Ok(None),
    };
    let i = disks
        .iter()
        .position(|d| d.name == disk)
        .ok_or_else(|| ApiError::not_found(format!("VM {name} has no disk {disk}")))?;
    if dom.is_some_and(|d| d.power != Power::Off) {
        return Err(ApiError::conflict(format!(
            "VM {name} runs: {what} is taken of a VM that is off"
        )));
    }
    let ex = st.runtime.export(name, &disks, None, None, &scratch)?;
    Ok(Some((ex, i, disks[i].size_bytes)))
}

/// The digest of a disk of a domain on its own images (see [`own_image_export`]).
pub(super) async fn digest(st: &Shared, vm: &str, disk: &str) -> ApiResult<Option<String>> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(None);
    }
    let (st2, name, disk) = (st.clone(), vm.to_string(), disk.to_string());
    tokio::task::spawn_blocking(move || {
        let Some((mut ex, i, size)) = own_image_export(&st2, &name, &disk, "a digest")? else {
            return Ok(None);
        };
        let allocated = ex.allocated(i)?;
        let mut h = sha2::Sha256::new();
        let mut buf = Vec::new();
        let mut window = Vec::with_capacity(READ_WINDOW_BLOCKS);
        let n = block_count(size);
        // A window of blocks at a time: the allocated ones read at once (adjacent ones as
        // one run), the others hashed as the zeroes they read as.
        let mut first = 0;
        while first < n {
            let end = n.min(first + READ_WINDOW_BLOCKS as u64);
            window.clear();
            window.extend((first..end).filter(|&b| allocated.get(b)));
            read_blocks(ex.as_mut(), i, size, &window, &mut buf)?;
            let mut at = 0;
            for b in first..end {
                let len = block_len(size, b);
                if allocated.get(b) {
                    h.update(&buf[at..at + len]);
                    at += len;
                } else {
                    h.update(&ZEROS[..len]);
                }
            }
            first = end;
        }
        Ok(Some(hex::encode(h.finalize())))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// A read of a disk of a domain on its own images (see [`own_image_export`]).
pub(super) async fn read(
    st: &Shared,
    vm: &str,
    disk: &str,
    offset: u64,
    length: u64,
) -> ApiResult<Option<Vec<u8>>> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(None);
    }
    let (st2, name, disk) = (st.clone(), vm.to_string(), disk.to_string());
    tokio::task::spawn_blocking(move || {
        let Some((mut ex, i, size)) = own_image_export(&st2, &name, &disk, "a read")? else {
            return Ok(None);
        };
        if offset.checked_add(length).is_none_or(|end| end > size) {
            return Err(ApiError::bad(format!(
                "read of {length} bytes at {offset} goes past the end of disk {disk} ({size} bytes)"
            )));
        }
        if length > MAX_READ {
            return Err(ApiError::bad("reads are limited to 256 MiB"));
        }
        let mut buf = vec![0u8; length as usize];
        ex.read(i, offset, &mut buf)?;
        Ok(Some(buf))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// The largest guest read, as for the agent's own VMs.
const MAX_READ: u64 = 256 << 20;

static ZEROS: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];

/// Before a domain on its own images becomes the replica of `source` (reverse replication
/// toward the site where it was first protected): its disks are copied, locally and sparse,
/// into image files of the agent's, which the transfer then brings up to date (block hashes
/// compared: only what differs travels). The domain's own images are left as they are; a
/// failover back here defines the domain on the agent's images. Only for a domain that is off
/// and that the controller let `source` replicate into; anything else is left to `begin`.
pub(super) async fn take_images(st: &Shared, vm: &str, source: &str) -> ApiResult<()> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(());
    }
    let (st2, name, source) = (st.clone(), vm.to_string(), source.to_string());
    tokio::task::spawn_blocking(move || {
        let found = st2.store.read_vm(&name, |r| {
            Ok((r.meta.domain.is_some()
                && r.disks.is_empty()
                && r.meta.accept_from.as_deref() == Some(source.as_str()))
            .then(|| (r.meta.disks.clone(), r.dir.clone())))
        });
        let Ok(Some((disks, dir))) = found else {
            return Ok(());
        };
        if st2
            .runtime
            .domain(&name)?
            .is_some_and(|d| d.power != Power::Off)
        {
            return Err(ApiError::conflict(format!(
                "VM {name} runs at this site; it cannot receive replication"
            )));
        }
        let mut ex = st2
            .runtime
            .export(&name, &disks, None, None, &dir.join("spool"))?;
        let mut buf = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let path = dir.join("disks").join(format!("{}.img", d.name));
            let tmp = path.with_extension("img.tmp");
            let f = std::fs::File::create(&tmp).map_err(ApiError::io)?;
            f.set_len(d.size_bytes).map_err(ApiError::io)?;
            let allocated = ex.allocated(i)?;
            for window in windows(allocated.iter()) {
                // Each run read lands where it was read from.
                let mut at = 0;
                for (offset, len) in read_blocks(ex.as_mut(), i, d.size_bytes, &window, &mut buf)? {
                    std::os::unix::fs::FileExt::write_all_at(&f, &buf[at..at + len], offset)
                        .map_err(ApiError::io)?;
                    at += len;
                }
            }
            f.sync_all().map_err(ApiError::io)?;
            std::fs::rename(&tmp, &path).map_err(ApiError::io)?;
        }
        drop(ex);
        crate::replication::tracker::sync_dir(&dir.join("disks")).map_err(ApiError::io)?;
        st2.store.write_vm(&name, |r| r.attach_files())
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// After a bulk transfer began into `vm` here (this site holds its replica now): a domain of
/// that name on the replica's images is undefined, another one loses its autostart (see
/// `Runtime::demote`). A failure is logged; the next bulk transfer tries again.
pub(super) async fn demote(st: &Shared, vm: &str) {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return;
    }
    let (st2, name) = (st.clone(), vm.to_string());
    let res = tokio::task::spawn_blocking(move || {
        let images = st2.store.read_vm(&name, |r| {
            Ok(r.meta
                .disks
                .iter()
                .map(|d| r.dir.join("disks").join(format!("{}.img", d.name)))
                .collect::<Vec<_>>())
        })?;
        st2.runtime.demote(&name, &images)
    })
    .await;
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(vm, error = %e.message, "demoting the domain of a replica"),
        Err(e) => tracing::warn!(vm, error = %e, "demoting the domain of a replica"),
    }
}

/// After a test failover at this site: the drill copy `copy` of a replica of a libvirt domain
/// boots as a domain, its NICs on `network`. Nothing to do for other VMs.
pub(super) async fn boot_drill(st: &Shared, vm: &str, copy: &str, network: &str) -> ApiResult<()> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(());
    }
    let (st2, name, copy, network) = (
        st.clone(),
        vm.to_string(),
        copy.to_string(),
        network.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        // Under the replica's lock: a retry of the same drill waits for the first boot.
        st2.store.write_vm(&name, |r| {
            let Some(definition) = r.meta.definition.clone() else {
                return Ok(());
            };
            let images = st2.store.read_vm(&copy, |c| {
                Ok(c.meta
                    .disks
                    .iter()
                    .map(|d| {
                        (
                            d.name.clone(),
                            c.dir.join("disks").join(format!("{}.qcow2", d.name)),
                        )
                    })
                    .collect::<Vec<_>>())
            })?;
            st2.runtime
                .boot_drill(&name, &copy, &network, &definition, &images)
        })
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
}

/// Stops and undefines domain `copy` (the drill copy of `vm`) if the hypervisor has it, under
/// `vm`'s lock like the drill's boot.
pub(super) async fn remove(st: &Shared, vm: &str, copy: &str) -> ApiResult<()> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(());
    }
    let (st2, vm, copy) = (st.clone(), vm.to_string(), copy.to_string());
    tokio::task::spawn_blocking(move || st2.store.write_vm(&vm, |_| st2.runtime.remove(&copy)))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// A domain's guest writes for itself: the agent never writes into its disks.
pub(super) fn no_guest_writes(d: &Domain) -> ApiError {
    ApiError::conflict(format!(
        "VM {} is a libvirt domain: its guest writes to its disks itself",
        d.name
    ))
}

/// Why `PUT /v1/vms/{vm}` cannot define a VM over an existing domain.
pub(super) fn exists(d: &Domain) -> ApiError {
    ApiError::conflict(format!(
        "VM {} exists already as a libvirt domain at this site; protect it instead",
        d.name
    ))
}

/// Whether replication can be enabled on `d`: change tracking needs qcow2 disks (QEMU keeps
/// its dirty bitmaps in them). A refusal says how to convert.
pub(super) fn check_protectable(d: &Domain) -> ApiResult<()> {
    if let Some(raw) = d.disks.iter().find(|x| x.format != "qcow2") {
        return Err(ApiError::conflict(format!(
            "disk {} of VM {} is {} at {}: change tracking needs qcow2. Shut the VM down, run \
             `qemu-img convert -O qcow2 {} {}.qcow2`, point the domain's disk at the new \
             file (virsh edit {}), then protect it again",
            raw.name,
            d.name,
            raw.format,
            raw.path.display(),
            raw.path.display(),
            raw.path.with_extension("").display(),
            d.name,
        )));
    }
    Ok(())
}
