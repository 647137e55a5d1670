//! The block stream between agents: a batch is a sequence of frames
//! `[disk u32][len u32][block u64][blake3 32 bytes][data len bytes]`, little endian.
//!
//! The checksum is blake3 of the first 16 header bytes (disk, len, block) then the data, so a
//! damaged disk index, block index or length fails verification like damaged data does.

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
    /// True when disk, block, length and data match the checksum they travelled with.
    pub fn verify(&self) -> bool {
        checksum(self.disk, self.block, self.data) == self.hash
    }
}

/// The checksum a frame travels with: blake3 over its disk, length and block (as framed) and
/// its data. Not [`super::block_hash`], which covers the data only.
pub fn checksum(disk: u32, block: u64, data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&disk.to_le_bytes());
    h.update(&(data.len() as u32).to_le_bytes());
    h.update(&block.to_le_bytes());
    h.update(data);
    *h.finalize().as_bytes()
}

/// Appends one block to a batch, with its checksum.
pub fn push(buf: &mut Vec<u8>, disk: u32, block: u64, data: &[u8]) {
    push_with_hash(buf, disk, block, &checksum(disk, block, data), data);
}

/// Appends a block with a given checksum (a frame resent unchanged, or fault injection sending
/// a damaged block).
pub fn push_with_hash(buf: &mut Vec<u8>, disk: u32, block: u64, hash: &[u8; 32], data: &[u8]) {
    buf.extend_from_slice(&disk.to_le_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
    buf.extend_from_slice(&block.to_le_bytes());
    buf.extend_from_slice(hash);
    buf.extend_from_slice(data);
}

/// Appends one block of `len` bytes whose data `fill` writes in place (read straight from a
/// file into the batch, with no copy of its own), with its checksum.
pub fn push_from(
    buf: &mut Vec<u8>,
    disk: u32,
    block: u64,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let start = buf.len();
    buf.resize(start + HEADER + len, 0);
    let (head, data) = buf[start..].split_at_mut(HEADER);
    if let Err(e) = fill(data) {
        buf.truncate(start);
        return Err(e);
    }
    let hash = checksum(disk, block, data);
    head[0..4].copy_from_slice(&disk.to_le_bytes());
    head[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    head[8..16].copy_from_slice(&block.to_le_bytes());
    head[16..48].copy_from_slice(&hash);
    Ok(())
}

/// Whether each frame of a batch matches its checksum, in order; `None` when the batch is
/// malformed.
pub fn verify_batch(buf: &[u8]) -> Option<Vec<bool>> {
    Some(parse(buf)?.iter().map(Frame::verify).collect())
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

/// Header of one frame read from a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub disk: u32,
    pub block: u64,
    pub hash: [u8; 32],
    pub len: usize,
}

/// Reads frames one at a time from a stream (a staging file), so a whole cycle never needs to
/// be in memory.
pub struct Reader<R> {
    inner: R,
}

impl<R: std::io::Read> Reader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner }
    }

    /// The next frame's header; `Ok(None)` at a clean end, an error when the stream ends inside
    /// a frame. The data is then read with [`Self::data`] or skipped with [`Self::skip`].
    pub fn header(&mut self) -> std::io::Result<Option<Header>> {
        let mut h = [0u8; HEADER];
        let mut got = 0;
        while got < HEADER {
            let n = self.inner.read(&mut h[got..])?;
            if n == 0 {
                if got == 0 {
                    return Ok(None);
                }
                return Err(torn());
            }
            got += n;
        }
        let word = |r: std::ops::Range<usize>| -> [u8; 8] {
            let mut w = [0u8; 8];
            w[..r.len()].copy_from_slice(&h[r]);
            w
        };
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&h[16..48]);
        Ok(Some(Header {
            disk: u64::from_le_bytes(word(0..4)) as u32,
            len: u64::from_le_bytes(word(4..8)) as usize,
            block: u64::from_le_bytes(word(8..16)),
            hash,
        }))
    }

    /// Reads the data of the frame whose header was just read into `buf` (resized to it).
    pub fn data(&mut self, h: &Header, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.resize(h.len, 0);
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                torn()
            } else {
                e
            }
        })
    }
}

impl<R: std::io::Read + std::io::Seek> Reader<R> {
    /// Skips the data of the frame whose header was just read; an error if the stream is
    /// shorter than the frame says.
    pub fn skip(&mut self, h: &Header) -> std::io::Result<()> {
        let pos = self.inner.stream_position()?;
        let end = self.inner.seek(std::io::SeekFrom::End(0))?;
        if end < pos + h.len as u64 {
            return Err(torn());
        }
        self.inner
            .seek(std::io::SeekFrom::Start(pos + h.len as u64))?;
        Ok(())
    }
}

fn torn() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, "torn frame stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_streams_frames_and_detects_a_torn_end() {
        let mut b = Vec::new();
        push(&mut b, 0, 7, b"hello");
        push(&mut b, 1, 9, &[3u8; 100]);
        let mut r = Reader::new(std::io::Cursor::new(&b[..]));
        let mut buf = Vec::new();
        let h = r.header().unwrap().unwrap();
        assert_eq!((h.disk, h.block, h.len), (0, 7, 5));
        r.data(&h, &mut buf).unwrap();
        assert_eq!(buf, b"hello");
        let h = r.header().unwrap().unwrap();
        assert_eq!((h.disk, h.block, h.len), (1, 9, 100));
        r.skip(&h).unwrap();
        assert!(r.header().unwrap().is_none());
        let mut r = Reader::new(std::io::Cursor::new(&b[..b.len() - 1]));
        let h = r.header().unwrap().unwrap();
        r.skip(&h).unwrap();
        let h = r.header().unwrap().unwrap();
        assert!(r.skip(&h).is_err());
        let mut r = Reader::new(std::io::Cursor::new(&b[..10]));
        assert!(r.header().is_err());
    }

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
        let mut c = Vec::new();
        push_from(&mut c, 0, 7, 5, |d| {
            d.copy_from_slice(b"hello");
            Ok(())
        })
        .unwrap();
        assert!(push_from(&mut c, 0, 8, 5, |_| Err(std::io::Error::other("x"))).is_err());
        assert_eq!(c, b[..HEADER + 5]);
        assert!(parse(&b[..b.len() - 1]).is_none());
    }

    #[test]
    fn checksum_covers_disk_block_and_length() {
        let mut b = Vec::new();
        push(&mut b, 2, 7, b"hello");
        let f = &parse(&b).unwrap()[0];
        assert!(f.verify());
        assert!(
            !Frame {
                block: 8,
                ..f.clone()
            }
            .verify()
        );
        assert!(
            !Frame {
                disk: 3,
                ..f.clone()
            }
            .verify()
        );
        assert!(
            !Frame {
                data: b"hell",
                ..f.clone()
            }
            .verify()
        );
        // Damage to the header bytes on the wire is caught the same way.
        for at in [0, 9] {
            let mut bad = b.clone();
            bad[at] ^= 1;
            assert_eq!(verify_batch(&bad), Some(vec![false]));
        }
    }
}
