//! Point-in-time exports of a libvirt domain's disks over NBD, read with [`crate::nbd`].
//!
//! A running domain is exported by a pull-mode backup job: QEMU serves each disk as it was
//! when the job began (writes after that go to a scratch file first), with the meta context
//! `qemu:dirty-bitmap:backup-<disk>` listing the blocks changed since the incremental
//! checkpoint, and starts the next checkpoint at the same instant. A domain that is off is
//! served read-only by `qemu-nbd` from its images, with the checkpoint's persistent bitmap.
//! Either way the export ends when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::{ApiError, ApiResult};
use crate::nbd::{self, Client};
use crate::replication::{BLOCK_SIZE, Bitmap};
use crate::site::DiskSpec;

use super::Export;

/// How long an export's NBD server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

fn nbd_err(what: &str, e: nbd::NbdError) -> ApiError {
    ApiError::internal(format!("reading {what} over NBD: {e}"))
}

/// One disk of an export: its NBD connection and the context of its changes.
struct Disk {
    name: String,
    size: u64,
    client: Client,
    changes: Option<String>,
}

/// An open export; `end` runs when it is dropped (aborting the backup job, stopping qemu-nbd).
pub struct NbdExport {
    disks: Vec<Disk>,
    checkpoint: Option<String>,
    end: Option<Box<dyn FnOnce() + Send>>,
    /// Holds the sockets; removed last.
    _dir: tempfile::TempDir,
}

impl Drop for NbdExport {
    fn drop(&mut self) {
        // Connections first: the server ends cleanly.
        self.disks.clear();
        if let Some(end) = self.end.take() {
            end();
        }
    }
}

impl Export for NbdExport {
    fn checkpoint(&self) -> Option<&str> {
        self.checkpoint.as_deref()
    }

    fn changed(&mut self, disk: usize) -> ApiResult<Option<Bitmap>> {
        let d = self.disk(disk)?;
        let Some(ctx) = d.changes.clone() else {
            return Ok(None);
        };
        let (size, name) = (d.size, d.name.clone());
        d.client
            .dirty_blocks(&ctx, size, BLOCK_SIZE)
            .map(Some)
            .map_err(|e| nbd_err(&format!("the changes of disk {name}"), e))
    }

    fn allocated(&mut self, disk: usize) -> ApiResult<Bitmap> {
        let d = self.disk(disk)?;
        let (size, name) = (d.size, d.name.clone());
        d.client
            .allocated_blocks(size, BLOCK_SIZE)
            .map_err(|e| nbd_err(&format!("the allocation of disk {name}"), e))
    }

    fn read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> ApiResult<()> {
        let d = self.disk(disk)?;
        let name = d.name.clone();
        d.client
            .read_at(offset, buf)
            .map_err(|e| nbd_err(&format!("disk {name}"), e))
    }

    fn read_runs(&mut self, disk: usize, runs: &mut [(u64, &mut [u8])]) -> ApiResult<()> {
        let d = self.disk(disk)?;
        let name = d.name.clone();
        d.client
            .read_runs(runs)
            .map_err(|e| nbd_err(&format!("disk {name}"), e))
    }
}

impl NbdExport {
    fn disk(&mut self, i: usize) -> ApiResult<&mut Disk> {
        self.disks
            .get_mut(i)
            .ok_or_else(|| ApiError::internal(format!("export has no disk {i}")))
    }
}

/// Names the folders of the agent's NBD sockets: a backup job whose socket is in one was begun
/// by a twinsite agent.
pub const SOCKET_DIR_PREFIX: &str = "twinsite-nbd-";

/// A private directory for an export's sockets. Unix socket paths are short (108 bytes), so
/// it lives in the temporary directory rather than under the data directory.
pub fn socket_dir() -> ApiResult<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(SOCKET_DIR_PREFIX)
        .tempdir()
        .map_err(ApiError::io)
}

/// Waits until `socket` exists (the server listens), or `server` exits.
pub(super) fn wait_listening(socket: &Path, server: Option<&mut Child>) -> ApiResult<()> {
    let end = Instant::now() + LISTEN_TIMEOUT;
    let mut server = server;
    while !socket.exists() {
        if let Some(c) = server.as_deref_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            return Err(ApiError::internal(format!(
                "qemu-nbd exited ({status}) before serving {}",
                socket.display()
            )));
        }
        if Instant::now() > end {
            return Err(ApiError::internal(format!(
                "no NBD server listened at {} within {}s",
                socket.display(),
                LISTEN_TIMEOUT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Connects to the backup job's server at `socket` (one export per disk, named after it).
pub fn backup_export(
    dir: tempfile::TempDir,
    socket: &Path,
    disks: &[DiskSpec],
    incremental: bool,
    checkpoint: String,
    end: Box<dyn FnOnce() + Send>,
) -> ApiResult<NbdExport> {
    let mut ex = NbdExport {
        disks: Vec::new(),
        checkpoint: Some(checkpoint),
        end: Some(end),
        _dir: dir,
    };
    wait_listening(socket, None)?;
    for d in disks {
        let changes = incremental.then(|| nbd::dirty_bitmap_context(&format!("backup-{}", d.name)));
        let mut contexts = vec![nbd::BASE_ALLOCATION];
        if let Some(c) = &changes {
            contexts.push(c);
        }
        let client = Client::connect(socket, &d.name, &contexts)
            .map_err(|e| nbd_err(&format!("disk {}", d.name), e))?;
        ex.disks.push(Disk {
            name: d.name.clone(),
            size: d.size_bytes,
            client,
            changes,
        });
    }
    Ok(ex)
}

/// Serves the images of a domain that is off with `qemu-nbd` (read-only), one server per
/// disk, exposing the persistent bitmap of checkpoint `since`. `started`: the checkpoint added
/// to the images just before (the next transfer's base), if any.
pub fn image_export(
    disks: &[(DiskSpec, PathBuf, String)],
    since: Option<&str>,
    started: Option<String>,
) -> ApiResult<NbdExport> {
    let dir = socket_dir()?;
    let mut servers: Vec<Child> = Vec::new();
    let mut opened = Vec::new();
    let result = (|| -> ApiResult<()> {
        for (i, (spec, path, format)) in disks.iter().enumerate() {
            let socket = dir.path().join(format!("{i}.sock"));
            let mut cmd = Command::new("qemu-nbd");
            cmd.arg("--read-only")
                .arg("--shared=1")
                .arg(format!("--format={format}"))
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--export-name={}", spec.name));
            if let Some(cp) = since {
                cmd.arg(format!("--bitmap={cp}"));
            }
            cmd.arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            let child = cmd.spawn().map_err(|e| {
                ApiError::internal(format!(
                    "starting qemu-nbd (Debian package qemu-utils): {e}"
                ))
            })?;
            servers.push(child);
            wait_listening(&socket, servers.last_mut())?;
            let changes = since.map(nbd::dirty_bitmap_context);
            let mut contexts = vec![nbd::BASE_ALLOCATION];
            if let Some(c) = &changes {
                contexts.push(c);
            }
            let client = Client::connect(&socket, &spec.name, &contexts)
                .map_err(|e| nbd_err(&format!("disk {}", spec.name), e))?;
            opened.push(Disk {
                name: spec.name.clone(),
                size: spec.size_bytes,
                client,
                changes,
            });
        }
        Ok(())
    })();
    let stop = move || {
        for mut c in servers {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    match result {
        Ok(()) => Ok(NbdExport {
            disks: opened,
            checkpoint: started,
            end: Some(Box::new(stop)),
            _dir: dir,
        }),
        Err(e) => {
            drop(opened);
            stop();
            Err(e)
        }
    }
}
