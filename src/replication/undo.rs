//! Undo segments at the replica.
//!
//! The replica's disk image always holds its newest recovery point, so failover to Latest and
//! the digest need no work. Each recovery point N keeps a list of undo segments: the blocks its
//! cycle overwrote, as they were at point N-1. Older points are materialized on a copy by
//! applying the undo lists of the newer points, newest first. Merging a point away appends its
//! list to its successor's (always correct), then [`merge`] folds the list into one segment.
//!
//! A segment `NAME` of disk `d` is two files: `NAME.d.idx` (block numbers, u64 LE) and
//! `NAME.d.dat` (the blocks, one 64 KiB slot each, in the same order).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BLOCK_SIZE, block_len};

fn idx_path(dir: &Path, name: &str, disk: usize) -> PathBuf {
    dir.join(format!("{name}.{disk}.idx"))
}

fn dat_path(dir: &Path, name: &str, disk: usize) -> PathBuf {
    dir.join(format!("{name}.{disk}.dat"))
}

/// Saves the current content of `blocks` of `image` as segment `name` of disk `disk`, durably.
pub fn write(
    dir: &Path,
    name: &str,
    disk: usize,
    image: &File,
    size: u64,
    blocks: &[u64],
) -> io::Result<()> {
    let dat = create(&dat_path(dir, name, disk))?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for (slot, b) in blocks.iter().enumerate() {
        let len = block_len(size, *b);
        image.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)?;
        dat.write_all_at(&buf[..len], slot as u64 * BLOCK_SIZE)?;
    }
    dat.sync_all()?;
    write_index(&idx_path(dir, name, disk), blocks)
}

fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .read(true)
        .truncate(true)
        .open(path)
}

fn write_index(path: &Path, blocks: &[u64]) -> io::Result<()> {
    let mut f = create(path)?;
    let mut bytes = Vec::with_capacity(blocks.len() * 8);
    for b in blocks {
        bytes.extend_from_slice(&b.to_le_bytes());
    }
    f.write_all(&bytes)?;
    f.sync_all()
}

/// Block numbers of segment `name` of disk `disk`. Every segment has an index for every disk
/// (empty when the disk had no change), so a missing or torn index is an error: the point that
/// lists the segment cannot be materialized.
pub fn index(dir: &Path, name: &str, disk: usize) -> io::Result<Vec<u64>> {
    let path = idx_path(dir, name, disk);
    let bytes = fs::read(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("undo index {} of a listed point: {e}", path.display()),
        )
    })?;
    if bytes.len() % 8 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("undo index {} is torn", path.display()),
        ));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// Writes segment `name` of disk `disk` back into `target` (a disk of `size` bytes).
pub fn apply(dir: &Path, name: &str, disk: usize, target: &File, size: u64) -> io::Result<()> {
    let blocks = index(dir, name, disk)?;
    if blocks.is_empty() {
        return Ok(());
    }
    let dat = File::open(dat_path(dir, name, disk))?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for (slot, b) in blocks.iter().enumerate() {
        let len = block_len(size, *b);
        dat.read_exact_at(&mut buf[..len], slot as u64 * BLOCK_SIZE)?;
        target.write_all_at(&buf[..len], b * BLOCK_SIZE)?;
    }
    Ok(())
}

/// Folds segments `names` (applied in that order) of disk `disk` into one segment `out`.
pub fn merge(dir: &Path, names: &[String], out: &str, disk: usize, size: u64) -> io::Result<()> {
    // Later segments win: applying them in order leaves their content.
    let mut src: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    let mut files = Vec::new();
    for (si, n) in names.iter().enumerate() {
        let blocks = index(dir, n, disk)?;
        if !blocks.is_empty() {
            files.push(Some(File::open(dat_path(dir, n, disk))?));
        } else {
            files.push(None);
        }
        for (slot, b) in blocks.into_iter().enumerate() {
            src.insert(b, (si, slot));
        }
    }
    let dat = create(&dat_path(dir, out, disk))?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut blocks = Vec::with_capacity(src.len());
    for (slot, (b, (si, sslot))) in src.iter().enumerate() {
        let len = block_len(size, *b);
        if let Some(f) = &files[*si] {
            f.read_exact_at(&mut buf[..len], *sslot as u64 * BLOCK_SIZE)?;
        }
        dat.write_all_at(&buf[..len], slot as u64 * BLOCK_SIZE)?;
        blocks.push(*b);
    }
    dat.sync_all()?;
    write_index(&idx_path(dir, out, disk), &blocks)
}

/// Removes segment `name` of disk `disk`.
pub fn remove(dir: &Path, name: &str, disk: usize) -> io::Result<()> {
    for p in [idx_path(dir, name, disk), dat_path(dir, name, disk)] {
        match fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Segment name a file in the undo directory belongs to.
pub fn segment_of(file_name: &str) -> Option<&str> {
    let base = file_name
        .strip_suffix(".idx")
        .or_else(|| file_name.strip_suffix(".dat"))?;
    base.rsplit_once('.').map(|(n, _)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_segments_apply_like_the_list() {
        let d = tempfile::tempdir().unwrap();
        let size = 4 * BLOCK_SIZE;
        let img = create(&d.path().join("img")).unwrap();
        img.set_len(size).unwrap();
        let fill = |b: u64, v: u8| {
            img.write_all_at(&vec![v; BLOCK_SIZE as usize], b * BLOCK_SIZE)
                .unwrap()
        };
        fill(0, 1);
        fill(1, 1);
        assert!(
            index(d.path(), "a", 0).is_err(),
            "a missing index is an error"
        );
        write(d.path(), "a", 0, &img, size, &[0, 1]).unwrap(); // state 1
        fill(0, 2);
        fill(1, 2);
        write(d.path(), "b", 0, &img, size, &[1, 2]).unwrap(); // 1:2, 2:0
        fill(1, 3);
        fill(2, 3);
        merge(d.path(), &["b".into(), "a".into()], "m", 0, size).unwrap();
        apply(d.path(), "m", 0, &img, size).unwrap();
        let mut buf = [0u8; 1];
        for (b, want) in [(0, 1), (1, 1), (2, 0)] {
            img.read_exact_at(&mut buf, b * BLOCK_SIZE).unwrap();
            assert_eq!(buf[0], want, "block {b}");
        }
        assert_eq!(segment_of("u12.0.idx"), Some("u12"));
    }
}
