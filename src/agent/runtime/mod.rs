//! What a site's VMs are: the seam between the agent and a hypervisor.
//!
//! - `builtin`: VMs the agent keeps itself (disks as files under the data directory, guest
//!   writes through the agent's routes); the store is all there is, so this runtime knows no
//!   domains. It serves fast tests and the scale benchmarks.
//! - `libvirt` (cargo feature `libvirt`): real libvirt/QEMU domains. The agent lists them,
//!   powers them on and off, and refuses guest writes on them (their guests write for
//!   themselves).
//!
//! Handlers ask the runtime first: a VM that is a domain is served from the hypervisor, any
//! other from the store.

#[cfg(feature = "libvirt")]
mod accel;
#[cfg(feature = "libvirt")]
mod bitmaps;
#[cfg(feature = "libvirt")]
mod checkpoints;
pub mod domspec;
#[cfg(feature = "libvirt")]
mod export;
#[cfg(feature = "libvirt")]
mod libvirt;
#[cfg(feature = "libvirt")]
mod overlay;
pub mod xml;

use std::path::Path;
use std::time::Duration;

use super::{ApiError, ApiResult};
use crate::replication::Bitmap;
use crate::site::{DiskSpec, Power};

/// `--runtime`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RuntimeKind {
    #[default]
    Builtin,
    Libvirt,
}

/// `--accel`: the libvirt runtime's accelerator (see docs/libvirt.md).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if a probe proves it boots a Linux kernel here, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// How the runtime is opened.
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    /// libvirt connection URI.
    pub uri: Option<String>,
    pub accel: AccelChoice,
    /// The Linux kernel the `auto` probe boots under KVM.
    pub probe_kernel: Option<std::path::PathBuf>,
}

/// A VM as its hypervisor sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    pub power: Power,
    pub disks: Vec<DomainDisk>,
    /// The guest agent answers (integration services: graceful shutdown, quiesced points).
    pub guest_agent: bool,
}

/// One disk of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainDisk {
    /// The guest's device name (`vda`).
    pub name: String,
    pub size_bytes: u64,
    pub format: String,
    pub path: std::path::PathBuf,
}

impl DomainDisk {
    pub fn spec(&self) -> DiskSpec {
        DiskSpec {
            name: self.name.clone(),
            size_bytes: self.size_bytes,
            format: Some(self.format.clone()),
        }
    }
}

/// A site's hypervisor.
pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;
    /// The accelerator replicas boot under (`kvm` or `tcg`); `None` without a hypervisor.
    fn accelerator(&self) -> Option<&'static str>;
    /// Every domain of the site.
    fn domains(&self) -> ApiResult<Vec<Domain>>;
    /// The domain `name`, if the hypervisor has one.
    fn domain(&self, name: &str) -> ApiResult<Option<Domain>>;
    fn start(&self, name: &str) -> ApiResult<()>;
    /// A graceful (ACPI) shutdown; fails when the guest is still running after `timeout`.
    fn shutdown(&self, name: &str, timeout: Duration) -> ApiResult<()>;
    /// A hard stop.
    fn power_off(&self, name: &str) -> ApiResult<()>;
    /// A point-in-time view of the disks of domain `name` (`disks`, in that order), with the
    /// changes since checkpoint `since` (none: a full copy). A running domain starts checkpoint
    /// `next` at the same instant; a domain that is off is read from its images and keeps
    /// `since` (nothing can write to it), or, without one, starts `next` in its images. `next`
    /// is `None` for a read of a domain that is off that starts no checkpoint. `scratch` holds
    /// the export's temporary files.
    fn export(
        &self,
        name: &str,
        disks: &[DiskSpec],
        since: Option<&str>,
        next: Option<&str>,
        scratch: &Path,
    ) -> ApiResult<Box<dyn Export>>;
    /// Pauses domain `name` (its vCPUs stop; nothing it holds is lost): `false` when it is not
    /// running, so there is nothing to pause.
    fn pause(&self, name: &str) -> ApiResult<bool>;
    /// Resumes what [`Runtime::pause`] paused; nothing when it is not paused.
    fn resume(&self, name: &str) -> ApiResult<()>;
    /// Freezes the filesystems of domain `name`'s guest through its guest agent (for an
    /// app-consistent point); the number frozen. Waits at most `timeout`.
    fn freeze(&self, name: &str, timeout: Duration) -> ApiResult<u64>;
    /// Thaws what [`Runtime::freeze`] froze; the number thawed (0 when nothing was frozen).
    fn thaw(&self, name: &str, timeout: Duration) -> ApiResult<u64>;
    /// Makes `keep` the only checkpoint of domain `name` (the peer holds everything before it).
    fn keep_checkpoint(&self, name: &str, keep: &str) -> ApiResult<()>;
    /// Drops checkpoint `cp` of domain `name` after a transfer that failed: its changes are
    /// merged into its parent's, so the next transfer from the parent still sends them.
    fn drop_checkpoint(&self, name: &str, cp: &str) -> ApiResult<()>;
    /// The persistent definition of domain `name`, which replicas keep for a failover.
    fn definition(&self, name: &str) -> ApiResult<String>;
    /// Boots a replica as domain `name` (a failover): defines it from the source's
    /// `definition` with its disks on the replica's images (`images`: disk name and raw image
    /// path; MAC addresses and the rest kept), and starts it with checkpoint `checkpoint`
    /// taken before its first instruction, so every write it makes is tracked. Each NIC on a
    /// network `networks` maps (source's name, this site's) moves to the mapped network; every
    /// network the domain then uses must exist here. A domain that runs already on the
    /// replica's images (an earlier attempt booted it) is kept; one on other disks is refused.
    /// Returns the checkpoint its writes are tracked from (an earlier attempt's, if it made one).
    fn boot_replica(
        &self,
        name: &str,
        definition: &str,
        images: &[(String, std::path::PathBuf)],
        checkpoint: &str,
        networks: &[(String, String)],
    ) -> ApiResult<String>;
    /// Makes one disk of a drill copy: a copy-on-write overlay over the replica's image, so a
    /// drill copies nothing and never changes the replica (see [`OverlayDisk`]).
    fn make_overlay(&self, disk: &OverlayDisk<'_>) -> ApiResult<()>;
    /// Whether a replica defined from `definition` with `networks` mapped (see
    /// [`Runtime::boot_replica`]) finds every network it needs here; a conflict naming the
    /// missing ones if not.
    fn check_networks(&self, definition: &str, networks: &[(String, String)]) -> ApiResult<()>;
    /// Boots drill copy `copy` of domain `name`: as [`Runtime::boot_replica`] on the copy's
    /// overlays (`images`: disk name and overlay path), with every NIC on the network
    /// `network` (made, isolated, if missing).
    fn boot_drill(
        &self,
        name: &str,
        copy: &str,
        network: &str,
        definition: &str,
        images: &[(String, std::path::PathBuf)],
    ) -> ApiResult<()>;
    /// Stops and undefines domain `name` (a drill copy being cleaned up); nothing if absent.
    fn remove(&self, name: &str) -> ApiResult<()>;
    /// Domain `name` at a site that now holds its replica (`images`: the replica's raw images):
    /// one defined on those images (it ran here after a failover) is undefined, so nothing
    /// starts it into what replication writes (a failover here defines it again); any other
    /// (on its own images) loses its autostart. One that runs is left alone.
    fn demote(&self, name: &str, images: &[std::path::PathBuf]) -> ApiResult<()>;
}

/// One disk of a drill copy: `overlay` is made over the raw image `base` (which must not change
/// while the overlay exists), holding the blocks `changed` of the raw file `delta` (the chosen
/// point's content where it differs from the image, `size` bytes long).
pub struct OverlayDisk<'a> {
    pub base: &'a std::path::Path,
    pub overlay: &'a std::path::Path,
    pub size: u64,
    pub delta: &'a std::path::Path,
    pub changed: &'a Bitmap,
}

/// What makes a drill's overlays ([`Runtime::make_overlay`] of the agent's runtime).
pub type MakeOverlay<'a> = &'a dyn Fn(&OverlayDisk<'_>) -> ApiResult<()>;

/// A point-in-time view of a domain's disks, open for one transfer.
pub trait Export: Send {
    /// The checkpoint this export started (the next transfer's `since`), or `None` when the
    /// domain was off and the old one stays.
    fn checkpoint(&self) -> Option<&str>;
    /// The blocks of disk `disk` changed since the export's `since`; `None` for a full copy.
    fn changed(&mut self, disk: usize) -> ApiResult<Option<Bitmap>>;
    /// The blocks of disk `disk` that may hold data (a full copy reads no others).
    fn allocated(&mut self, disk: usize) -> ApiResult<Bitmap>;
    /// Reads `buf.len()` bytes of disk `disk` at `offset`.
    fn read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> ApiResult<()>;
    /// Fills each `(offset, buffer)` of `runs` from disk `disk`: an export that can keeps
    /// several reads in flight; the default reads them one after the other.
    fn read_runs(&mut self, disk: usize, runs: &mut [(u64, &mut [u8])]) -> ApiResult<()> {
        for (offset, buf) in runs.iter_mut() {
            self.read(disk, *offset, buf)?;
        }
        Ok(())
    }
}

/// Most blocks read from an export at once (4 MiB): the bound on a reader's buffer, and a
/// run long enough that a read costs one round trip per megabytes rather than per block.
pub const READ_WINDOW_BLOCKS: usize = 64;

/// Runs of adjacent blocks among `blocks` (in their order) of a disk of `size` bytes: the
/// byte offset and length of each.
pub fn block_runs(size: u64, blocks: &[u64]) -> Vec<(u64, usize)> {
    let mut runs: Vec<(u64, usize)> = Vec::new();
    let mut prev: Option<u64> = None;
    for &b in blocks {
        let len = crate::replication::block_len(size, b);
        match runs.last_mut() {
            Some(last) if prev.is_some_and(|p| p.checked_add(1) == Some(b)) => last.1 += len,
            _ => runs.push((b.saturating_mul(crate::replication::BLOCK_SIZE), len)),
        }
        prev = Some(b);
    }
    runs
}

/// `blocks` in windows of at most [`READ_WINDOW_BLOCKS`], in their order: what one
/// [`read_blocks`] reads.
pub fn windows(mut blocks: impl Iterator<Item = u64>) -> impl Iterator<Item = Vec<u64>> {
    std::iter::from_fn(move || {
        let w: Vec<u64> = blocks.by_ref().take(READ_WINDOW_BLOCKS).collect();
        (!w.is_empty()).then_some(w)
    })
}

/// Reads `blocks` of disk `disk` (of `size` bytes) into `buf`, one after the other, adjacent
/// blocks as one run and all runs at once (see [`Export::read_runs`]). Returns the runs read
/// (byte offset and length), in `buf`'s order.
pub fn read_blocks(
    ex: &mut dyn Export,
    disk: usize,
    size: u64,
    blocks: &[u64],
    buf: &mut Vec<u8>,
) -> ApiResult<Vec<(u64, usize)>> {
    let runs = block_runs(size, blocks);
    buf.clear();
    buf.resize(runs.iter().map(|r| r.1).sum(), 0);
    let mut parts: Vec<(u64, &mut [u8])> = Vec::with_capacity(runs.len());
    let mut rest: &mut [u8] = buf;
    for &(offset, len) in &runs {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(len);
        parts.push((offset, part));
        rest = tail;
    }
    ex.read_runs(disk, &mut parts)?;
    Ok(runs)
}

/// The builtin runtime: the agent's own VMs, all in the store.
pub struct Builtin;

impl Runtime for Builtin {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Builtin
    }
    fn accelerator(&self) -> Option<&'static str> {
        None
    }
    fn domains(&self) -> ApiResult<Vec<Domain>> {
        Ok(Vec::new())
    }
    fn domain(&self, _name: &str) -> ApiResult<Option<Domain>> {
        Ok(None)
    }
    fn start(&self, name: &str) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn shutdown(&self, name: &str, _timeout: Duration) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn power_off(&self, name: &str) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn export(
        &self,
        name: &str,
        _disks: &[DiskSpec],
        _since: Option<&str>,
        _next: Option<&str>,
        _scratch: &Path,
    ) -> ApiResult<Box<dyn Export>> {
        Err(not_a_domain(name))
    }
    fn pause(&self, name: &str) -> ApiResult<bool> {
        Err(not_a_domain(name))
    }
    fn resume(&self, name: &str) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn freeze(&self, name: &str, _timeout: Duration) -> ApiResult<u64> {
        Err(not_a_domain(name))
    }
    fn thaw(&self, name: &str, _timeout: Duration) -> ApiResult<u64> {
        Err(not_a_domain(name))
    }
    fn keep_checkpoint(&self, name: &str, _keep: &str) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn drop_checkpoint(&self, name: &str, _cp: &str) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn definition(&self, name: &str) -> ApiResult<String> {
        Err(not_a_domain(name))
    }
    fn boot_replica(
        &self,
        name: &str,
        _definition: &str,
        _images: &[(String, std::path::PathBuf)],
        _checkpoint: &str,
        _networks: &[(String, String)],
    ) -> ApiResult<String> {
        Err(not_a_domain(name))
    }
    fn make_overlay(&self, disk: &OverlayDisk<'_>) -> ApiResult<()> {
        Err(ApiError::conflict(format!(
            "the builtin runtime copies drill disks; no overlay for {}",
            disk.overlay.display()
        )))
    }
    fn check_networks(&self, _definition: &str, _networks: &[(String, String)]) -> ApiResult<()> {
        Ok(())
    }
    fn boot_drill(
        &self,
        name: &str,
        _copy: &str,
        _network: &str,
        _definition: &str,
        _images: &[(String, std::path::PathBuf)],
    ) -> ApiResult<()> {
        Err(not_a_domain(name))
    }
    fn remove(&self, _name: &str) -> ApiResult<()> {
        Ok(())
    }
    fn demote(&self, _name: &str, _images: &[std::path::PathBuf]) -> ApiResult<()> {
        Ok(())
    }
}

fn not_a_domain(name: &str) -> ApiError {
    ApiError::not_found(format!("VM {name} is not a hypervisor domain at this site"))
}

/// Opens the runtime the agent was started with.
pub fn open(kind: RuntimeKind, opts: &RuntimeOptions) -> Result<Box<dyn Runtime>, String> {
    match kind {
        RuntimeKind::Builtin => Ok(Box::new(Builtin)),
        #[cfg(feature = "libvirt")]
        RuntimeKind::Libvirt => Ok(Box::new(libvirt::Libvirt::connect(
            opts.uri.as_deref().unwrap_or("qemu:///system"),
            opts.accel,
            opts.probe_kernel.as_deref(),
        )?)),
        #[cfg(not(feature = "libvirt"))]
        RuntimeKind::Libvirt => {
            let _ = opts;
            Err(
                "this twinsite was built without the libvirt runtime; build it with \
                 `cargo build --features libvirt` (needs Debian's libvirt-dev)"
                    .into(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::block_runs;
    use crate::replication::BLOCK_SIZE;

    #[test]
    fn adjacent_blocks_form_one_run_and_the_last_block_may_be_short() {
        let size = 10 * BLOCK_SIZE + 100;
        let bs = BLOCK_SIZE as usize;
        assert_eq!(block_runs(size, &[]), vec![]);
        assert_eq!(
            block_runs(size, &[0, 1, 2, 5, 7, 8, 9, 10]),
            vec![
                (0, 3 * bs),
                (5 * BLOCK_SIZE, bs),
                (7 * BLOCK_SIZE, 3 * bs + 100)
            ]
        );
        // Out of order: a run only where the next block follows the one before.
        assert_eq!(
            block_runs(size, &[3, 2, 3]),
            vec![(3 * BLOCK_SIZE, bs), (2 * BLOCK_SIZE, 2 * bs)]
        );
    }
}
