//! What a replica's newest recovery point holds while some points wait to be applied (points
//! received while a drill copy runs on the image): the image, with the blocks of the waiting
//! points' staging files over it, the newest point's winning.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::replication::{BLOCK_SIZE, blocks_of_range, frame};

pub(super) struct NewestView {
    images: Vec<File>,
    staged: Vec<File>,
    /// (disk, block) → (index into `staged`, offset of the block's data in that file).
    at: HashMap<(usize, u64), (usize, u64)>,
}

impl NewestView {
    /// `images`: the replica's disks; `files`: the staging files of the waiting points, oldest
    /// first.
    pub(super) fn open(images: Vec<File>, dir: &Path, files: &[String]) -> io::Result<Self> {
        let mut staged = Vec::new();
        let mut at = HashMap::new();
        for name in files {
            let file = File::open(dir.join(name))?;
            let mut rd =
                frame::Reader::new(io::BufReader::with_capacity(64 << 10, file.try_clone()?));
            while let Some(h) = rd.header()? {
                at.insert((h.disk as usize, h.block), (staged.len(), rd.position()?));
                rd.skip(&h)?;
            }
            staged.push(file);
        }
        Ok(Self { images, staged, at })
    }

    /// Reads `buf.len()` bytes of disk `disk` at `offset`, as the newest point holds them.
    pub(super) fn read_at(&self, disk: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let image = self
            .images
            .get(disk)
            .ok_or_else(|| io::Error::other("read of a disk the replica does not keep"))?;
        image.read_exact_at(buf, offset)?;
        let end = offset + buf.len() as u64;
        for b in blocks_of_range(offset, buf.len() as u64) {
            let Some(&(f, data)) = self.at.get(&(disk, b)) else {
                continue;
            };
            let start = b * BLOCK_SIZE;
            let (s, e) = (offset.max(start), end.min(start + BLOCK_SIZE));
            self.staged[f].read_exact_at(
                &mut buf[(s - offset) as usize..(e - offset) as usize],
                data + (s - start),
            )?;
        }
        Ok(())
    }

    /// SHA-256 of the whole of disk `disk` (`size` bytes) as the newest point holds it.
    pub(super) fn sha256(&self, disk: usize, size: u64) -> io::Result<String> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 4 << 20];
        let mut off = 0u64;
        while off < size {
            let n = ((size - off) as usize).min(buf.len());
            self.read_at(disk, off, &mut buf[..n])?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        Ok(hex::encode(h.finalize()))
    }
}
