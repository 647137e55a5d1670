//! Drill overlays: a copy-on-write qcow2 image over a replica's raw image, holding only the
//! blocks where the drill's recovery point differs from the image.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::agent::{ApiError, ApiResult};
use crate::nbd::{self, Client};
use crate::replication::{BLOCK_SIZE, Bitmap};

use super::OverlayDisk;
use super::export::{socket_dir, wait_listening};

/// Makes `disk.overlay` over `disk.base` (`qemu-img create -b BASE -F raw`) and writes the
/// changed blocks of `disk.delta` into it.
pub fn make(disk: &OverlayDisk<'_>) -> ApiResult<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(disk.base)
        .arg(disk.overlay)
        .arg(disk.size.to_string())
        .output()
        .map_err(|e| {
            ApiError::internal(format!("running qemu-img (Debian package qemu-utils): {e}"))
        })?;
    if !out.status.success() {
        return Err(ApiError::internal(format!(
            "qemu-img create of the drill overlay {}: {}",
            disk.overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if disk.changed.is_empty() {
        return Ok(());
    }
    write_blocks(disk.overlay, disk.delta, disk.changed, disk.size)
}

/// Writes the blocks `changed` of the raw file `delta` into the qcow2 image `image` (a drill
/// overlay nothing runs on yet), through a writable `qemu-nbd`, and flushes them.
fn write_blocks(image: &Path, delta: &Path, changed: &Bitmap, size: u64) -> ApiResult<()> {
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(delta).map_err(ApiError::io)?;
    let dir = socket_dir()?;
    let socket = dir.path().join("overlay.sock");
    let mut server = Command::new("qemu-nbd")
        .arg("--format=qcow2")
        .arg(format!("--socket={}", socket.display()))
        .arg("--export-name=overlay")
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            ApiError::internal(format!(
                "starting qemu-nbd (Debian package qemu-utils): {e}"
            ))
        })?;
    let nbd_err =
        |e: nbd::NbdError| ApiError::internal(format!("writing a drill overlay over NBD: {e}"));
    let result = (|| -> ApiResult<()> {
        wait_listening(&socket, Some(&mut server))?;
        let mut client = Client::connect(&socket, "overlay", &[]).map_err(nbd_err)?;
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        for b in changed.iter() {
            let len = crate::replication::block_len(size, b);
            src.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)
                .map_err(ApiError::io)?;
            client
                .write_at(b * BLOCK_SIZE, &buf[..len])
                .map_err(nbd_err)?;
        }
        client.flush().map_err(nbd_err)?;
        client.close().map_err(nbd_err)
    })();
    // Without --persistent, qemu-nbd exits when its client leaves; kill it if it did not.
    let _ = server.kill();
    let _ = server.wait();
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    /// With the real qemu-img and qemu-nbd: the overlay reads as the base with the changed
    /// blocks of the delta over it, and the base is untouched.
    #[test]
    fn overlay_reads_as_the_base_with_the_changed_blocks_over_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A domain disk: a whole number of sectors, the last block short.
        let size = 8 * BLOCK_SIZE + 512;
        let (base, delta) = (dir.path().join("base.img"), dir.path().join("delta"));
        let base_bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(&base, &base_bytes).expect("base");
        let d = std::fs::File::create(&delta).expect("delta");
        d.set_len(size).expect("delta size");
        let mut changed = Bitmap::new(crate::replication::block_count(size));
        let mut expected = base_bytes.clone();
        for b in [1u64, 5, 8] {
            let len = crate::replication::block_len(size, b);
            let data = vec![0xA0 + b as u8; len];
            d.write_all_at(&data, b * BLOCK_SIZE).expect("delta block");
            let at = (b * BLOCK_SIZE) as usize;
            expected[at..at + len].copy_from_slice(&data);
            changed.set(b);
        }
        let overlay = dir.path().join("drill.qcow2");
        make(&OverlayDisk {
            base: &base,
            overlay: &overlay,
            size,
            delta: &delta,
            changed: &changed,
        })
        .expect("overlay made");
        let out = dir.path().join("out.raw");
        let status = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&overlay)
            .arg(&out)
            .status()
            .expect("qemu-img runs");
        assert!(status.success());
        let read = std::fs::read(&out).expect("converted");
        assert_eq!(read.len(), expected.len());
        assert!(
            read == expected,
            "the overlay does not read as base + delta"
        );
        assert!(
            std::fs::read(&base).expect("base") == base_bytes,
            "base changed"
        );
    }
}
