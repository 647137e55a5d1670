//! Undo segments at the replica.
//!
//! The replica's disk image always holds its newest recovery point, so failover to Latest and
//! the digest need no work. Each recovery point N keeps a list of undo segments: the blocks its
//! cycle overwrote, as they were at point N-1. Older points are materialized on a copy by
//! applying the undo lists of the newer points, newest first. Merging a point away appends its
//! list to its successor's (always correct), then [`merge`] folds the list into one segment.
//!
//! A segment `NAME` of disk `d` is two files: `NAME.d.idx` (the index) and `NAME.d.dat` (the
//! blocks, one 64 KiB slot each, in the index's order). The index is [`MAGIC`] and then, per
//! block, its number (u64 LE) and the blake3 hash of its bytes, checked whenever the block is
//! read back: a damaged segment is refused, never applied. An index without the magic (written
//! before the hashes) is block numbers only, applied unchecked.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BLOCK_SIZE, block_len};

/// First 8 bytes of an index with hashes (no block number is this large).
const MAGIC: &[u8; 8] = b"TSUNDO2\0";
const ENTRY: usize = 8 + 32;

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
    let mut entries = Vec::with_capacity(blocks.len());
    for (slot, b) in blocks.iter().enumerate() {
        let len = block_len(size, *b);
        image.read_exact_at(&mut buf[..len], b * BLOCK_SIZE)?;
        dat.write_all_at(&buf[..len], slot as u64 * BLOCK_SIZE)?;
        entries.push((*b, *blake3::hash(&buf[..len]).as_bytes()));
    }
    dat.sync_all()?;
    write_index(&idx_path(dir, name, disk), &entries)
}

fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .read(true)
        .truncate(true)
        .open(path)
}

fn write_index(path: &Path, entries: &[(u64, [u8; 32])]) -> io::Result<()> {
    let mut f = create(path)?;
    let mut bytes = Vec::with_capacity(MAGIC.len() + entries.len() * ENTRY);
    bytes.extend_from_slice(MAGIC);
    for (b, hash) in entries {
        bytes.extend_from_slice(&b.to_le_bytes());
        bytes.extend_from_slice(hash);
    }
    f.write_all(&bytes)?;
    f.sync_all()
}

/// Block numbers of segment `name` of disk `disk`. Every segment has an index for every disk
/// (empty when the disk had no change), so a missing or torn index is an error: the point that
/// lists the segment cannot be materialized.
pub fn index(dir: &Path, name: &str, disk: usize) -> io::Result<Vec<u64>> {
    Ok(entries(dir, name, disk)?
        .into_iter()
        .map(|(b, _)| b)
        .collect())
}

/// Block numbers of a segment with the hash of each block's bytes (none in an index written
/// before the hashes).
fn entries(dir: &Path, name: &str, disk: usize) -> io::Result<Vec<(u64, Option<[u8; 32]>)>> {
    let path = idx_path(dir, name, disk);
    let bytes = fs::read(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("undo index {} of a listed point: {e}", path.display()),
        )
    })?;
    let torn = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("undo index {} is torn", path.display()),
        )
    };
    let number = |c: &[u8]| u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
    if let Some(rest) = bytes.strip_prefix(MAGIC.as_slice()) {
        if rest.len() % ENTRY != 0 {
            return Err(torn());
        }
        return Ok(rest
            .chunks_exact(ENTRY)
            .map(|c| (number(c), c[8..].try_into().ok()))
            .collect());
    }
    if bytes.len() % 8 != 0 {
        return Err(torn());
    }
    Ok(bytes.chunks_exact(8).map(|c| (number(c), None)).collect())
}

/// Reads slot `slot` (block `block`, `buf.len()` bytes) of a segment's data and checks it
/// against its hash.
fn read_checked(
    dat: &File,
    dat_name: &Path,
    slot: usize,
    block: u64,
    hash: Option<&[u8; 32]>,
    buf: &mut [u8],
) -> io::Result<()> {
    dat.read_exact_at(buf, slot as u64 * BLOCK_SIZE)?;
    if hash.is_some_and(|h| blake3::hash(buf).as_bytes() != h) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "undo data {} is damaged: block {block} does not match its checksum",
                dat_name.display()
            ),
        ));
    }
    Ok(())
}

/// Writes segment `name` of disk `disk` back into `target` (a disk of `size` bytes).
/// Every block is checked before any is written: a damaged segment leaves `target` untouched.
pub fn apply(dir: &Path, name: &str, disk: usize, target: &File, size: u64) -> io::Result<()> {
    let blocks = entries(dir, name, disk)?;
    if blocks.is_empty() {
        return Ok(());
    }
    let path = dat_path(dir, name, disk);
    let dat = File::open(&path)?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for (slot, (b, hash)) in blocks.iter().enumerate() {
        let len = block_len(size, *b);
        read_checked(&dat, &path, slot, *b, hash.as_ref(), &mut buf[..len])?;
    }
    for (slot, (b, _)) in blocks.iter().enumerate() {
        let len = block_len(size, *b);
        dat.read_exact_at(&mut buf[..len], slot as u64 * BLOCK_SIZE)?;
        target.write_all_at(&buf[..len], b * BLOCK_SIZE)?;
    }
    Ok(())
}

/// Folds segments `names` (applied in that order) of disk `disk` into one segment `out`.
pub fn merge(dir: &Path, names: &[String], out: &str, disk: usize, size: u64) -> io::Result<()> {
    // Later segments win: applying them in order leaves their content.
    let mut src: BTreeMap<u64, (usize, usize, Option<[u8; 32]>)> = BTreeMap::new();
    let mut files = Vec::new();
    for (si, n) in names.iter().enumerate() {
        let blocks = entries(dir, n, disk)?;
        if !blocks.is_empty() {
            let path = dat_path(dir, n, disk);
            files.push(Some((File::open(&path)?, path)));
        } else {
            files.push(None);
        }
        for (slot, (b, hash)) in blocks.into_iter().enumerate() {
            src.insert(b, (si, slot, hash));
        }
    }
    let dat = create(&dat_path(dir, out, disk))?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let mut blocks = Vec::with_capacity(src.len());
    for (slot, (b, (si, sslot, hash))) in src.iter().enumerate() {
        let len = block_len(size, *b);
        if let Some((f, path)) = &files[*si] {
            // A damaged block is never carried into the merged segment under a new hash.
            read_checked(f, path, *sslot, *b, hash.as_ref(), &mut buf[..len])?;
        }
        dat.write_all_at(&buf[..len], slot as u64 * BLOCK_SIZE)?;
        blocks.push((*b, *blake3::hash(&buf[..len]).as_bytes()));
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

    #[test]
    fn a_damaged_segment_is_refused_and_leaves_the_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let size = 3 * BLOCK_SIZE;
        let img = create(&d.path().join("img")).unwrap();
        img.set_len(size).unwrap();
        img.write_all_at(&vec![7u8; size as usize], 0).unwrap();
        write(d.path(), "a", 0, &img, size, &[0, 2]).unwrap();
        let dat = OpenOptions::new()
            .write(true)
            .open(dat_path(d.path(), "a", 0))
            .unwrap();
        dat.write_all_at(&[8u8], BLOCK_SIZE + 5).unwrap();
        let target = create(&d.path().join("target")).unwrap();
        target.set_len(size).unwrap();
        let err = apply(d.path(), "a", 0, &target, size).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("block 2"), "{err}");
        let mut buf = vec![1u8; size as usize];
        target.read_exact_at(&mut buf, 0).unwrap();
        assert!(
            buf.iter().all(|b| *b == 0),
            "a refused segment wrote blocks"
        );
        assert!(merge(d.path(), &["a".into()], "m", 0, size).is_err());
    }

    #[test]
    fn an_index_without_hashes_still_applies() {
        let d = tempfile::tempdir().unwrap();
        let size = 2 * BLOCK_SIZE;
        fs::write(dat_path(d.path(), "old", 0), vec![5u8; BLOCK_SIZE as usize]).unwrap();
        fs::write(idx_path(d.path(), "old", 0), 1u64.to_le_bytes()).unwrap();
        assert_eq!(index(d.path(), "old", 0).unwrap(), vec![1]);
        let target = create(&d.path().join("target")).unwrap();
        target.set_len(size).unwrap();
        apply(d.path(), "old", 0, &target, size).unwrap();
        let mut buf = [0u8; 1];
        target.read_exact_at(&mut buf, BLOCK_SIZE).unwrap();
        assert_eq!(buf[0], 5);
    }
}
