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
    /// The buffer grows with the data actually read, so a damaged length field costs no more
    /// memory than the stream holds.
    pub fn data(&mut self, h: &Header, buf: &mut Vec<u8>) -> std::io::Result<()> {
        use std::io::Read as _;
        buf.clear();
        let got = (&mut self.inner).take(h.len as u64).read_to_end(buf)?;
        if got < h.len {
            return Err(torn());
        }
        Ok(())
    }
}

impl<R: std::io::Read + std::io::Seek> Reader<R> {
    /// Where the stream is: after [`Self::header`], the offset of the frame's data.
    pub fn position(&mut self) -> std::io::Result<u64> {
        self.inner.stream_position()
    }

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

    /// A damaged length field (a staging file hit by a bad sector, say) claims far more data
    /// than the stream holds: reading it is a torn-frame error, and the buffer never grows
    /// to the claimed size.
    #[test]
    fn a_huge_length_field_does_not_allocate_what_the_stream_lacks() {
        let mut b = Vec::new();
        push(&mut b, 0, 7, b"hello");
        b[4..8].copy_from_slice(&(256u32 << 20).to_le_bytes());
        let mut r = Reader::new(std::io::Cursor::new(&b[..]));
        let h = r.header().unwrap().unwrap();
        assert_eq!(h.len, 256 << 20);
        let mut buf = Vec::with_capacity(64 << 10);
        let e = r.data(&h, &mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(
            buf.capacity() < 1 << 20,
            "{} bytes allocated",
            buf.capacity()
        );
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

/// Property tests of the decoder on arbitrary and damaged batches (see `crate::fuzz`).
#[cfg(test)]
mod fuzz {
    use proptest::collection::vec;
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;

    type Owned = (u32, u64, Vec<u8>);

    fn frames() -> impl Strategy<Value = Vec<Owned>> {
        vec((any::<u32>(), any::<u64>(), vec(any::<u8>(), 0..200)), 0..6)
    }

    fn encode(frames: &[Owned]) -> Vec<u8> {
        let mut b = Vec::new();
        for (disk, block, data) in frames {
            push(&mut b, *disk, *block, data);
        }
        b
    }

    /// Damage done to an encoded batch.
    #[derive(Debug, Clone)]
    enum Damage {
        Flip(Index, u8),
        Truncate(Index),
        Insert(Index, Vec<u8>),
        Remove(Index, usize),
        /// A frame's length field (at a frame start, or anywhere) set to this value.
        Length(Index, u32),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (any::<Index>(), 1..=255u8).prop_map(|(i, x)| Damage::Flip(i, x)),
            any::<Index>().prop_map(Damage::Truncate),
            (any::<Index>(), vec(any::<u8>(), 1..64)).prop_map(|(i, b)| Damage::Insert(i, b)),
            (any::<Index>(), 1..64usize).prop_map(|(i, n)| Damage::Remove(i, n)),
            (
                any::<Index>(),
                prop_oneof![Just(u32::MAX), Just(1 << 30), any::<u32>(), 0..300u32]
            )
                .prop_map(|(i, n)| Damage::Length(i, n)),
        ]
    }

    fn apply(b: &mut Vec<u8>, d: &Damage) {
        if b.is_empty() {
            return;
        }
        match d {
            Damage::Flip(i, x) => {
                let i = i.index(b.len());
                b[i] ^= x;
            }
            Damage::Truncate(i) => b.truncate(i.index(b.len())),
            Damage::Insert(i, bytes) => {
                let at = i.index(b.len() + 1);
                b.splice(at..at, bytes.iter().copied());
            }
            Damage::Remove(i, n) => {
                let at = i.index(b.len());
                let end = (at + n).min(b.len());
                b.drain(at..end);
            }
            Damage::Length(i, n) => {
                if b.len() >= 8 {
                    let at = i.index(b.len() - 7);
                    b[at..at + 4].copy_from_slice(&n.to_le_bytes());
                }
            }
        }
    }

    /// Every frame the stream reader gives, with whether it verifies; stops at the first error.
    fn read_all(b: &[u8]) -> (Vec<(Owned, bool)>, bool) {
        let mut r = Reader::new(std::io::Cursor::new(b));
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            match r.header() {
                Ok(None) => return (out, true),
                Err(_) => return (out, false),
                Ok(Some(h)) => {
                    if r.data(&h, &mut buf).is_err() {
                        return (out, false);
                    }
                    // Never what a damaged length claims (up to 4 GiB): about what the stream holds.
                    assert!(
                        buf.capacity() <= 2 * b.len() + (64 << 10),
                        "{} bytes allocated for a {}-byte stream",
                        buf.capacity(),
                        b.len()
                    );
                    let ok = checksum(h.disk, h.block, &buf) == h.hash;
                    out.push(((h.disk, h.block, buf.clone()), ok));
                }
            }
        }
    }

    /// A damaged batch never panics the decoder, and whatever verifies is a frame that was
    /// sent: damage is either refused (malformed batch, torn stream) or caught by a checksum.
    fn check_damaged(sent: &[Owned], b: &[u8]) -> Result<(), TestCaseError> {
        let parsed = parse(b);
        prop_assert_eq!(
            verify_batch(b),
            parsed
                .as_ref()
                .map(|f| f.iter().map(Frame::verify).collect())
        );
        if let Some(frames) = &parsed {
            for f in frames.iter().filter(|f| f.verify()) {
                prop_assert!(
                    sent.iter()
                        .any(|(d, k, data)| (*d, *k, &data[..]) == (f.disk, f.block, f.data)),
                    "a damaged frame verified: {:?}",
                    f
                );
            }
        }
        let (read, clean) = read_all(b);
        for (frame, ok) in &read {
            if *ok {
                prop_assert!(
                    sent.contains(frame),
                    "a damaged frame verified: {:?}",
                    frame
                );
            }
        }
        // The stream reader and the batch parser agree on a batch that parses.
        if let Some(frames) = parsed {
            prop_assert!(clean);
            prop_assert_eq!(frames.len(), read.len());
        }
        Ok(())
    }

    #[test]
    fn fuzz_frames_round_trip() {
        crate::fuzz::run("block stream round trip", frames(), |sent| {
            let b = encode(&sent);
            let parsed = parse(&b).expect("an encoded batch parses");
            let got: Vec<Owned> = parsed
                .iter()
                .map(|f| (f.disk, f.block, f.data.to_vec()))
                .collect();
            prop_assert_eq!(&got, &sent);
            prop_assert!(parsed.iter().all(Frame::verify));
            let (read, clean) = read_all(&b);
            prop_assert!(clean);
            prop_assert_eq!(
                read,
                sent.into_iter().map(|f| (f, true)).collect::<Vec<_>>()
            );
            Ok(())
        });
    }

    #[test]
    fn fuzz_damaged_frames() {
        crate::fuzz::run(
            "damaged block stream",
            (frames(), vec(damage(), 1..4)),
            |(sent, damage)| {
                let mut b = encode(&sent);
                for d in &damage {
                    apply(&mut b, d);
                }
                check_damaged(&sent, &b)
            },
        );
    }

    #[test]
    fn fuzz_arbitrary_bytes_as_frames() {
        crate::fuzz::run(
            "arbitrary bytes as a block stream",
            vec(any::<u8>(), 0..400),
            |b| check_damaged(&[], &b),
        );
    }
}
