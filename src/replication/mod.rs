//! The replication engine: exact change tracking, the checksummed block stream, recovery points
//! (undo logs at the replica) and their retention.
//!
//! Pure parts (bitmaps, frame encoding, the retention planner) are here; the agent drives the
//! I/O through [`tracker`], [`undo`] and the [`source`] cycle driver.

pub mod frame;
pub mod retention;
pub mod source;
pub mod tracker;
pub mod undo;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Unit of change tracking and transfer.
pub const BLOCK_SIZE: u64 = 64 * 1024;

/// Number of blocks of a disk of `size` bytes (the last one may be short).
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_SIZE)
}

/// Length of block `idx` of a disk of `size` bytes; 0 past the end (saturating, as `idx` may
/// come from the network).
pub fn block_len(size: u64, idx: u64) -> usize {
    let start = idx.saturating_mul(BLOCK_SIZE);
    (size.saturating_sub(start)).min(BLOCK_SIZE) as usize
}

/// Whether block `idx` lies inside a disk of `size` bytes.
pub fn block_in_range(size: u64, idx: u64) -> bool {
    idx < block_count(size)
}

/// Blocks touched by a write of `len` bytes at `offset` (empty for `len == 0`).
pub fn blocks_of_range(offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    offset / BLOCK_SIZE..(offset + len - 1) / BLOCK_SIZE + 1
}

/// One bit per block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn set(&mut self, idx: u64) {
        if idx < self.len {
            self.words[(idx / 64) as usize] |= 1 << (idx % 64);
        }
    }

    pub fn get(&self, idx: u64) -> bool {
        idx < self.len && self.words[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }

    pub fn set_all(&mut self) {
        for i in 0..self.len {
            self.set(i);
        }
    }

    pub fn union(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// The bits as bytes: bit `i % 8` of byte `i / 8` is block `i`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.len.div_ceil(8) as usize);
        out
    }

    /// The inverse of [`Self::to_bytes`]; `None` when `bytes` does not fit `len` bits.
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Option<Self> {
        if bytes.len() as u64 != len.div_ceil(8) {
            return None;
        }
        let mut b = Self::new(len);
        for (i, w) in b.words.iter_mut().enumerate() {
            let mut word = [0u8; 8];
            let chunk = bytes.get(i * 8..).unwrap_or_default();
            let n = chunk.len().min(8);
            word[..n].copy_from_slice(&chunk[..n]);
            *w = u64::from_le_bytes(word);
        }
        if !len.is_multiple_of(64)
            && let Some(last) = b.words.last()
            && last >> (len % 64) != 0
        {
            return None;
        }
        Some(b)
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Indices of the set bits, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter_from(0)
    }

    /// Indices of the set bits from `start` on, ascending.
    pub fn iter_from(&self, start: u64) -> impl Iterator<Item = u64> + '_ {
        let first = (start / 64) as usize;
        let skip = start % 64;
        self.words
            .iter()
            .enumerate()
            .skip(first)
            .flat_map(move |(wi, w)| {
                let mut w = *w;
                if wi == first {
                    w &= u64::MAX << skip;
                }
                std::iter::from_fn(move || {
                    if w == 0 {
                        return None;
                    }
                    let bit = w.trailing_zeros() as u64;
                    w &= w - 1;
                    Some(wi as u64 * 64 + bit)
                })
            })
    }
}

/// Reads block `idx` of `file` (a disk of `size` bytes) into a new buffer.
pub fn read_block(file: &File, size: u64, idx: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; block_len(size, idx)];
    file.read_exact_at(&mut buf, idx.saturating_mul(BLOCK_SIZE))?;
    Ok(buf)
}

/// blake3 of one block: the checksum a block travels with.
pub fn block_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// sha256 (hex) of a whole file, read in large chunks.
pub fn sha256_file(file: &File, size: u64) -> io::Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < size {
        let n = ((size - off) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_map_to_blocks() {
        assert_eq!(blocks_of_range(0, 1), 0..1);
        assert_eq!(blocks_of_range(BLOCK_SIZE - 1, 2), 0..2);
        assert_eq!(blocks_of_range(BLOCK_SIZE, BLOCK_SIZE), 1..2);
        assert_eq!(blocks_of_range(5, 0), 0..0);
        assert_eq!(block_len(BLOCK_SIZE + 10, 1), 10);
        assert_eq!(block_count(BLOCK_SIZE + 10), 2);
    }

    #[test]
    fn block_len_of_a_block_past_the_end_is_zero() {
        // An index from the network must not overflow (a panic in debug builds).
        assert_eq!(block_len(BLOCK_SIZE * 3, u64::MAX), 0);
        assert_eq!(block_len(BLOCK_SIZE * 3, u64::MAX / BLOCK_SIZE + 1), 0);
        assert_eq!(block_len(BLOCK_SIZE * 3, 3), 0);
        assert_eq!(block_len(BLOCK_SIZE * 3, 2), BLOCK_SIZE as usize);
        assert!(block_in_range(BLOCK_SIZE * 3, 2));
        assert!(!block_in_range(BLOCK_SIZE * 3, 3));
        assert!(!block_in_range(BLOCK_SIZE * 3, u64::MAX));
        assert!(block_in_range(BLOCK_SIZE + 1, 1));
    }

    #[test]
    fn bitmap_iterates_set_bits() {
        let mut b = Bitmap::new(200);
        for i in [0, 63, 64, 130, 199, 500] {
            b.set(i);
        }
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 63, 64, 130, 199]);
        assert_eq!(b.iter_from(63).collect::<Vec<_>>(), vec![63, 64, 130, 199]);
        assert_eq!(b.iter_from(65).collect::<Vec<_>>(), vec![130, 199]);
        assert_eq!(b.iter_from(500).count(), 0);
        assert_eq!(b.count(), 5);
        let back = Bitmap::from_bytes(200, &b.to_bytes()).unwrap();
        assert_eq!(back, b);
        assert_eq!(b.to_bytes().len(), 25);
        assert!(Bitmap::from_bytes(201, &b.to_bytes()).is_none());
        let mut c = Bitmap::new(200);
        c.set(1);
        c.union(&b);
        assert_eq!(c.count(), 6);
    }
}
