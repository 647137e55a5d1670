//! The block stream between agents: a batch is a sequence of frames
//! `[disk u32][len u32][block u64][blake3 32 bytes][data len bytes]`, little endian.

use super::block_hash;

pub const HEADER: usize = 48;

/// One block as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    pub disk: u32,
    pub block: u64,
    pub hash: [u8; 32],
    pub data: &'a [u8],
}

impl Frame<'_> {
    /// True when the data matches the checksum it travelled with.
    pub fn verify(&self) -> bool {
        block_hash(self.data) == self.hash
    }
}

/// Appends one block to a batch, with its checksum.
pub fn push(buf: &mut Vec<u8>, disk: u32, block: u64, data: &[u8]) {
    push_with_hash(buf, disk, block, &block_hash(data), data);
}

/// Appends a block with a given checksum (fault injection sends a damaged block this way).
pub fn push_with_hash(buf: &mut Vec<u8>, disk: u32, block: u64, hash: &[u8; 32], data: &[u8]) {
    buf.extend_from_slice(&disk.to_le_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(&block.to_le_bytes());
    buf.extend_from_slice(hash);
    buf.extend_from_slice(data);
}

/// Splits a batch into frames; `None` when it is truncated or malformed.
pub fn parse(mut buf: &[u8]) -> Option<Vec<Frame<'_>>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < HEADER {
            return None;
        }
        let disk = u32::from_le_bytes(buf[0..4].try_into().ok()?);
        let len = u32::from_le_bytes(buf[4..8].try_into().ok()?) as usize;
        let block = u64::from_le_bytes(buf[8..16].try_into().ok()?);
        let hash: [u8; 32] = buf[16..48].try_into().ok()?;
        if buf.len() < HEADER + len {
            return None;
        }
        out.push(Frame {
            disk,
            block,
            hash,
            data: &buf[HEADER..HEADER + len],
        });
        buf = &buf[HEADER + len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detect_damage() {
        let mut b = Vec::new();
        push(&mut b, 0, 7, b"hello");
        push(&mut b, 1, 9, &[3u8; 100]);
        let mut frames = parse(&b).unwrap();
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(Frame::verify));
        frames[1].data = &[4u8; 100];
        assert!(!frames[1].verify());
        assert!(parse(&b[..b.len() - 1]).is_none());
    }
}
