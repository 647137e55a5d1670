//! The connection: handshake, then one command at a time.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::proto::{self, BlockSize, Chunk, Coverage, Extent, Info, ReplyKind, Request};
use super::{BASE_ALLOCATION, NbdError, STATE_HOLE, STATE_ZERO};
use crate::replication::Bitmap;

/// Socket read/write timeout set by [`Client::connect`]: long enough for a flush of a busy
/// image, short enough that a wedged server does not hold a replication thread forever.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Largest range asked of BLOCK_STATUS at once. The request length is 32 bits; staying well
/// below it keeps servers that cap block status happy and chunks small.
const BLOCK_STATUS_STEP: u64 = 1 << 30;

/// An NBD connection to one export, in the transmission phase.
pub struct Client {
    stream: UnixStream,
    export: String,
    size: u64,
    flags: u16,
    block_size: BlockSize,
    structured: bool,
    /// Negotiated meta contexts: name -> id the server assigned.
    contexts: HashMap<String, u32>,
    cookie: u64,
    /// Reused buffer for chunk payloads.
    scratch: Vec<u8>,
    broken: bool,
    closed: bool,
}

// By hand: the scratch buffer may hold 32 MiB of disk data.
impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.export)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .field("block_size", &self.block_size)
            .field("structured", &self.structured)
            .field("contexts", &self.contexts)
            .field("broken", &self.broken)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// Most READs [`Client::read_runs`] keeps outstanding. QEMU's NBD server works on up to 16
/// requests of one client at once; a few are enough to keep its I/O busy, and READ requests
/// are small, so sending them while replies are unread never fills the socket.
pub const MAX_IN_FLIGHT: usize = 8;

/// One READ of [`Client::read_runs`]: `len` bytes at `offset`, into run `run` from byte `at`.
struct Piece {
    run: usize,
    at: usize,
    offset: u64,
    len: usize,
}

/// A READ whose reply is complete: its piece and how it went.
type Answered = (usize, Result<(), NbdError>);

/// A READ sent and not yet fully answered.
struct Pending {
    piece: usize,
    req: Request,
    cov: Coverage,
    error: Option<ChunkError>,
}

/// How a command's reply ended.
enum Outcome {
    /// A simple reply with this error value (0: success).
    Simple(u32),
    /// Structured chunks, the first error chunk if any.
    Structured(Option<ChunkError>),
}

struct ChunkError {
    errno: u32,
    message: String,
    offset: Option<u64>,
}

fn read_exact(stream: &mut UnixStream, buf: &mut [u8]) -> Result<(), NbdError> {
    stream.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            NbdError::Closed
        } else {
            NbdError::Io(e)
        }
    })
}

fn read_array<const N: usize>(stream: &mut UnixStream) -> Result<[u8; N], NbdError> {
    let mut b = [0u8; N];
    read_exact(stream, &mut b)?;
    Ok(b)
}

/// Whether an error leaves the byte stream in an unknown state.
fn poisons(e: &NbdError) -> bool {
    matches!(
        e,
        NbdError::Io(_) | NbdError::Closed | NbdError::Protocol(_) | NbdError::Broken
    )
}

impl Client {
    /// Connects to the Unix socket at `socket`, negotiates `export` and the meta `contexts`
    /// (e.g. [`BASE_ALLOCATION`], `qemu:dirty-bitmap:backup-vda`), with [`DEFAULT_TIMEOUT`]
    /// on every socket read and write.
    pub fn connect(
        socket: impl AsRef<Path>,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        Self::handshake(stream, export, contexts)
    }

    /// Negotiates on an already connected stream (timeouts are the caller's).
    pub fn handshake(
        mut stream: UnixStream,
        export: &str,
        contexts: &[&str],
    ) -> Result<Self, NbdError> {
        let n = match negotiate(&mut stream, export, contexts) {
            Ok(n) => n,
            Err(e) => {
                if matches!(
                    e,
                    NbdError::Refused { .. }
                        | NbdError::UnknownExport { .. }
                        | NbdError::MissingMetaContext(_)
                ) {
                    // The server answered in good order and refused: say goodbye properly
                    // (best effort, the error is what matters).
                    let abort = proto::encode_option(proto::OPT_ABORT, &[]);
                    if let Ok(abort) = abort {
                        let _ = stream.write_all(&abort);
                    }
                }
                return Err(e);
            }
        };
        tracing::debug!(
            export,
            size = n.size,
            flags = n.flags,
            block_size = ?n.block_size,
            structured = n.structured,
            contexts = ?n.contexts,
            "NBD export negotiated"
        );
        Ok(Self {
            stream,
            export: export.to_owned(),
            size: n.size,
            flags: n.flags,
            block_size: n.block_size,
            structured: n.structured,
            contexts: n.contexts,
            cookie: 0,
            scratch: Vec::new(),
            broken: false,
            closed: false,
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Name of the export.
    pub fn export(&self) -> &str {
        &self.export
    }

    /// Transmission flags (`NBD_FLAG_*`) of the export.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    pub fn is_read_only(&self) -> bool {
        self.flags & proto::TFLAG_READ_ONLY != 0
    }

    /// The server's block size constraints (defaults when it sent none).
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// The id the server assigned to meta context `name`, if negotiated.
    pub fn context_id(&self, name: &str) -> Option<u32> {
        self.contexts.get(name).copied()
    }

    /// Largest READ/WRITE payload: the server's maximum, at most 32 MiB, a multiple of its
    /// minimum block size.
    pub fn max_io(&self) -> u64 {
        let max = self.block_size.max.min(proto::MAX_PAYLOAD);
        let min = self.block_size.min.max(1);
        u64::from(max - max % min).max(1)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                NbdError::InvalidRequest(format!(
                    "{offset}+{len} past the end of the export ({} bytes)",
                    self.size
                ))
            })?;
        // Having asked for block size constraints, the client must honour the minimum; only
        // the export's tail may be shorter.
        let min = u64::from(self.block_size.min.max(1));
        if !offset.is_multiple_of(min) || (!len.is_multiple_of(min) && end != self.size) {
            return Err(NbdError::InvalidRequest(format!(
                "{offset}+{len} not aligned to the server's minimum block size {min}"
            )));
        }
        Ok(())
    }

    /// Runs one command exchange; errors that desynchronize the stream mark the connection
    /// broken so no later call reads garbage as a reply.
    fn guarded<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, NbdError>,
    ) -> Result<T, NbdError> {
        if self.broken || self.closed {
            return Err(NbdError::Broken);
        }
        let r = f(self);
        if let Err(e) = &r
            && poisons(e)
        {
            tracing::warn!(export = %self.export, error = %e, "NBD connection broken");
            self.broken = true;
        }
        r
    }

    fn send(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<Request, NbdError> {
        self.cookie = self.cookie.wrapping_add(1);
        let req = Request {
            flags,
            command,
            cookie: self.cookie,
            offset,
            len,
        };
        self.stream.write_all(&req.encode())?;
        if !data.is_empty() {
            self.stream.write_all(data)?;
        }
        Ok(req)
    }

    /// Reads the reply to `req`. For a simple reply only its header is consumed (a READ's data
    /// follows); structured chunks are handed to `on_chunk` until the last one.
    fn reply(
        &mut self,
        req: &Request,
        mut on_chunk: impl FnMut(Chunk<'_>) -> Result<(), NbdError>,
    ) -> Result<Outcome, NbdError> {
        let magic: [u8; 4] = read_array(&mut self.stream)?;
        match proto::reply_kind(magic, self.structured)? {
            ReplyKind::Simple => {
                let mut b = [0u8; proto::SIMPLE_REPLY_LEN];
                b[..4].copy_from_slice(&magic);
                read_exact(&mut self.stream, &mut b[4..])?;
                Ok(Outcome::Simple(proto::decode_simple_reply(&b, req)?))
            }
            ReplyKind::Structured => {
                let mut first = Some(magic);
                let mut error = None;
                loop {
                    let mut b = [0u8; proto::STRUCTURED_REPLY_LEN];
                    match first.take() {
                        Some(m) => {
                            b[..4].copy_from_slice(&m);
                            read_exact(&mut self.stream, &mut b[4..])?;
                        }
                        None => read_exact(&mut self.stream, &mut b)?,
                    }
                    let h = proto::decode_chunk_header(&b, req)?;
                    // Bounded by decode_chunk_header for every chunk type.
                    let len = h.len as usize;
                    self.scratch.clear();
                    self.scratch.resize(len, 0);
                    read_exact(&mut self.stream, &mut self.scratch)?;
                    match proto::decode_chunk(&h, &self.scratch, req)? {
                        Chunk::Error {
                            errno,
                            message,
                            offset,
                        } => {
                            // Keep reading to the last chunk so the stream stays in step.
                            error.get_or_insert(ChunkError {
                                errno,
                                message,
                                offset,
                            });
                        }
                        chunk => on_chunk(chunk)?,
                    }
                    if h.done() {
                        break;
                    }
                }
                // Small buffers are kept for the next command; one that held a 32 MiB read is
                // not worth pinning for the life of the connection.
                if self.scratch.capacity() > 1 << 20 {
                    self.scratch = Vec::new();
                }
                Ok(Outcome::Structured(error))
            }
        }
    }

    fn command_error(req: &Request, errno: u32, message: String) -> NbdError {
        NbdError::Command {
            command: proto::command_name(req.command),
            offset: req.offset,
            len: u64::from(req.len),
            errno,
            errno_name: proto::errno_name(errno),
            message,
        }
    }

    /// Reply to a command that carries no data back (WRITE, FLUSH).
    fn no_data_reply(&mut self, req: &Request) -> Result<(), NbdError> {
        match self.reply(req, |_| Ok(()))? {
            Outcome::Simple(0) | Outcome::Structured(None) => Ok(()),
            Outcome::Simple(errno) => Err(Self::command_error(req, errno, String::new())),
            Outcome::Structured(Some(e)) => Err(chunk_error(req, e)),
        }
    }

    /// Reads `buf.len()` bytes at `offset`; holes come back as zeroes.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.read_runs(&mut [(offset, buf)])
    }

    /// Reads `len` bytes at `offset` into a new buffer.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, NbdError> {
        self.check_range(offset, len as u64)?;
        let mut buf = vec![0u8; len];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// Fills each `(offset, buffer)` with the bytes at `offset` (holes as zeroes): one READ per
    /// run of up to the server's maximum, with up to [`MAX_IN_FLIGHT`] of them outstanding and
    /// their replies taken in whatever order the server sends them. Every range is checked
    /// before anything is sent. An error the server reports for one READ does not stop the
    /// others (the stream stays in step): once all have been answered, the failure of the
    /// earliest failed READ is returned, naming its offset and length.
    pub fn read_runs(&mut self, runs: &mut [(u64, &mut [u8])]) -> Result<(), NbdError> {
        for (offset, buf) in runs.iter() {
            self.check_range(*offset, buf.len() as u64)?;
        }
        let step = self.max_io() as usize;
        let mut pieces = Vec::new();
        for (run, (offset, buf)) in runs.iter().enumerate() {
            let mut at = 0;
            while at < buf.len() {
                let len = step.min(buf.len() - at);
                pieces.push(Piece {
                    run,
                    at,
                    offset: offset + at as u64,
                    len,
                });
                at += len;
            }
        }
        let r = self.guarded(|c| c.pipeline(runs, &pieces));
        // A buffer that held a 32 MiB chunk is not worth pinning for the life of the connection.
        if self.scratch.capacity() > 1 << 20 {
            self.scratch = Vec::new();
        }
        r
    }

    /// Sends the READs of `pieces`, at most [`MAX_IN_FLIGHT`] outstanding, until all are
    /// answered.
    fn pipeline(
        &mut self,
        runs: &mut [(u64, &mut [u8])],
        pieces: &[Piece],
    ) -> Result<(), NbdError> {
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut next = 0;
        let mut failed: Option<(usize, NbdError)> = None;
        // Data in one chunk, holes as zeroes: QEMU then reads without a block status lookup
        // per request, and answers a failed read with an error reply, where its sparse read
        // drops the connection.
        let flags = if self.structured && self.flags & proto::TFLAG_SEND_DF != 0 {
            proto::CMD_FLAG_DF
        } else {
            0
        };
        while next < pieces.len() || !pending.is_empty() {
            while next < pieces.len() && pending.len() < MAX_IN_FLIGHT {
                let p = &pieces[next];
                // At most max_io, which fits 32 bits.
                let req = self.send(flags, proto::CMD_READ, p.offset, p.len as u32, &[])?;
                pending.insert(
                    req.cookie,
                    Pending {
                        piece: next,
                        cov: Coverage::new(&req),
                        req,
                        error: None,
                    },
                );
                next += 1;
            }
            if let Some((piece, Err(e))) = self.read_reply_part(&mut pending, runs, pieces)?
                && failed.as_ref().is_none_or(|(f, _)| piece < *f)
            {
                failed = Some((piece, e));
            }
        }
        match failed {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Reads one simple reply or one structured chunk answering a READ in `pending`, puts its
    /// data where that READ's piece goes, and returns the piece's outcome once its reply is
    /// complete. An error returned (rather than an outcome) means the stream is out of step.
    fn read_reply_part(
        &mut self,
        pending: &mut HashMap<u64, Pending>,
        runs: &mut [(u64, &mut [u8])],
        pieces: &[Piece],
    ) -> Result<Option<Answered>, NbdError> {
        let magic: [u8; 4] = read_array(&mut self.stream)?;
        let kind = proto::reply_kind(magic, self.structured)?;
        let mut head = [0u8; proto::STRUCTURED_REPLY_LEN];
        let head_len = match kind {
            ReplyKind::Simple => proto::SIMPLE_REPLY_LEN,
            ReplyKind::Structured => proto::STRUCTURED_REPLY_LEN,
        };
        head[..4].copy_from_slice(&magic);
        read_exact(&mut self.stream, &mut head[4..head_len])?;
        // Both kinds carry the cookie at bytes 8..16.
        let mut cookie = [0u8; 8];
        cookie.copy_from_slice(&head[8..16]);
        let cookie = u64::from_be_bytes(cookie);
        let Some(p) = pending.get_mut(&cookie) else {
            return Err(NbdError::Protocol(format!(
                "reply cookie {cookie:#x} matches no request in flight"
            )));
        };
        let piece = &pieces[p.piece];
        let buf = &mut runs[piece.run].1[piece.at..piece.at + piece.len];
        match kind {
            ReplyKind::Simple => {
                let mut b = [0u8; proto::SIMPLE_REPLY_LEN];
                b.copy_from_slice(&head[..proto::SIMPLE_REPLY_LEN]);
                let errno = proto::decode_simple_reply(&b, &p.req)?;
                let req = p.req;
                let index = p.piece;
                pending.remove(&cookie);
                if errno == 0 {
                    read_exact(&mut self.stream, buf)?;
                    return Ok(Some((index, Ok(()))));
                }
                let e = Self::command_error(&req, errno, String::new());
                if !self.structured {
                    // Without structured replies the protocol leaves it open whether data
                    // follows a failed read, so the stream cannot be trusted any more.
                    self.broken = true;
                    return Err(e);
                }
                Ok(Some((index, Err(e))))
            }
            ReplyKind::Structured => {
                let h = proto::decode_chunk_header(&head, &p.req)?;
                let req = p.req;
                if h.ty == proto::REPLY_TYPE_OFFSET_DATA {
                    // Data goes straight into place, checked before a byte of it is read.
                    let (o, len) = proto::data_chunk_at(&h, read_array(&mut self.stream)?, &req)?;
                    p.cov.add(o, u64::from(len))?;
                    let at = (o - req.offset) as usize;
                    read_exact(&mut self.stream, &mut buf[at..at + len as usize])?;
                    return self.chunk_done(pending, cookie, &h);
                }
                // Bounded by decode_chunk_header for every chunk type.
                self.scratch.clear();
                self.scratch.resize(h.len as usize, 0);
                read_exact(&mut self.stream, &mut self.scratch)?;
                match proto::decode_chunk(&h, &self.scratch, &req)? {
                    Chunk::Data { offset: o, data } => {
                        p.cov.add(o, data.len() as u64)?;
                        let at = (o - req.offset) as usize;
                        buf[at..at + data.len()].copy_from_slice(data);
                    }
                    Chunk::Hole { offset: o, len } => {
                        p.cov.add(o, u64::from(len))?;
                        let at = (o - req.offset) as usize;
                        buf[at..at + len as usize].fill(0);
                    }
                    Chunk::Error {
                        errno,
                        message,
                        offset,
                    } => {
                        // Keep reading to the last chunk so the stream stays in step.
                        p.error.get_or_insert(ChunkError {
                            errno,
                            message,
                            offset,
                        });
                    }
                    Chunk::None => {}
                    other => {
                        return Err(NbdError::Protocol(format!(
                            "{} chunk in a read",
                            other.kind()
                        )));
                    }
                }
                self.chunk_done(pending, cookie, &h)
            }
        }
    }

    /// After a chunk of the READ `cookie`: its outcome when that chunk was the last.
    fn chunk_done(
        &mut self,
        pending: &mut HashMap<u64, Pending>,
        cookie: u64,
        h: &proto::ChunkHeader,
    ) -> Result<Option<Answered>, NbdError> {
        if !h.done() {
            return Ok(None);
        }
        let Some(p) = pending.remove(&cookie) else {
            return Ok(None);
        };
        let outcome = match p.error {
            Some(e) => Err(chunk_error(&p.req, e)),
            None if !p.cov.complete() => return Err(NbdError::Protocol(p.cov.describe())),
            None => Ok(()),
        };
        Ok(Some((p.piece, outcome)))
    }

    /// Writes `data` at `offset` (not durable before [`Self::flush`]).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        if self.is_read_only() {
            return Err(NbdError::InvalidRequest(format!(
                "export {:?} is read-only",
                self.export
            )));
        }
        self.check_range(offset, data.len() as u64)?;
        let step = self.max_io() as usize;
        let mut at = offset;
        for part in data.chunks(step) {
            self.guarded(|c| {
                let req = c.send(0, proto::CMD_WRITE, at, part.len() as u32, part)?;
                c.no_data_reply(&req)
            })?;
            at += part.len() as u64;
        }
        Ok(())
    }

    /// Makes completed writes durable. A server that does not offer flush writes through,
    /// so there is nothing to do.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        if self.flags & proto::TFLAG_SEND_FLUSH == 0 {
            tracing::debug!(export = %self.export, "NBD server does not offer flush");
            return Ok(());
        }
        self.guarded(|c| {
            let req = c.send(0, proto::CMD_FLUSH, 0, 0, &[])?;
            c.no_data_reply(&req)
        })
    }

    /// One BLOCK_STATUS request for `context` starting at `offset`: extents from `offset` on,
    /// clamped to `len`, but possibly covering less than `len` (the server decides).
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let id = self
            .context_id(context)
            .ok_or_else(|| NbdError::ContextNotNegotiated(context.to_owned()))?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                NbdError::InvalidRequest(format!(
                    "{offset}+{len} past the end of the export ({} bytes)",
                    self.size
                ))
            })?;
        let len = (end - offset).min(BLOCK_STATUS_STEP) as u32;
        let known: Vec<u32> = self.contexts.values().copied().collect();
        self.guarded(|c| {
            let req = c.send(0, proto::CMD_BLOCK_STATUS, offset, len, &[])?;
            let mut found: Option<Vec<Extent>> = None;
            let mut seen = Vec::new();
            let outcome = c.reply(&req, |chunk| match chunk {
                Chunk::BlockStatus {
                    context: got,
                    extents,
                } => {
                    if !known.contains(&got) {
                        return Err(NbdError::Protocol(format!(
                            "block status for meta context id {got}, which was not negotiated"
                        )));
                    }
                    if seen.contains(&got) {
                        return Err(NbdError::Protocol(format!(
                            "two block status chunks for meta context id {got}"
                        )));
                    }
                    seen.push(got);
                    if got == id {
                        found = Some(proto::extents_of(&req, &extents)?);
                    }
                    Ok(())
                }
                Chunk::None => Ok(()),
                other => Err(NbdError::Protocol(format!(
                    "{} chunk in a block status reply",
                    other.kind()
                ))),
            })?;
            match outcome {
                Outcome::Simple(0) => Err(NbdError::Protocol(
                    "simple reply without extents to NBD_CMD_BLOCK_STATUS".into(),
                )),
                Outcome::Simple(errno) => Err(Self::command_error(&req, errno, String::new())),
                Outcome::Structured(Some(e)) => Err(chunk_error(&req, e)),
                Outcome::Structured(None) => found.ok_or_else(|| {
                    NbdError::Protocol(format!("no extents for meta context {context:?}"))
                }),
            }
        })
    }

    /// Extents of `context` covering exactly `offset..offset+len`, neighbours with equal
    /// flags merged.
    pub fn extents(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| NbdError::InvalidRequest(format!("{offset}+{len} overflows")))?;
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        while at < end {
            // Every answer is non-empty with non-zero lengths (checked in proto), so `at`
            // advances.
            for e in self.block_status(context, at, end - at)? {
                at = e.offset + e.len;
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.offset + last.len == e.offset => {
                        last.len += e.len;
                    }
                    _ => out.push(e),
                }
            }
        }
        Ok(out)
    }

    /// Blocks of `block_size` bytes, over the first `size` bytes, touched by an extent of
    /// `context` with non-zero flags: for `qemu:dirty-bitmap:*`, the changed blocks.
    pub fn dirty_blocks(
        &mut self,
        context: &str,
        size: u64,
        block_size: u64,
    ) -> Result<Bitmap, NbdError> {
        self.blocks_where(context, size, block_size, |flags| flags != 0)
    }

    /// Blocks of `block_size` bytes, over the first `size` bytes, that are not entirely
    /// unallocated zeroes (`base:allocation` hole and zero): the blocks a full copy must read.
    pub fn allocated_blocks(&mut self, size: u64, block_size: u64) -> Result<Bitmap, NbdError> {
        let both = STATE_HOLE | STATE_ZERO;
        self.blocks_where(BASE_ALLOCATION, size, block_size, |flags| {
            flags & both != both
        })
    }

    fn blocks_where(
        &mut self,
        context: &str,
        size: u64,
        block_size: u64,
        marks: impl Fn(u32) -> bool,
    ) -> Result<Bitmap, NbdError> {
        if block_size == 0 {
            return Err(NbdError::InvalidRequest("block size 0".into()));
        }
        let mut map = Bitmap::new(size.div_ceil(block_size));
        for e in self.extents(context, 0, size)? {
            if marks(e.flags) && e.len > 0 {
                for b in e.offset / block_size..=(e.offset + e.len - 1) / block_size {
                    map.set(b);
                }
            }
        }
        Ok(map)
    }

    /// Ends the session cleanly (NBD_CMD_DISC) and reports a failure to send it.
    pub fn close(mut self) -> Result<(), NbdError> {
        self.disconnect()
    }

    fn disconnect(&mut self) -> Result<(), NbdError> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        if self.broken {
            let _ = self.stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        self.cookie = self.cookie.wrapping_add(1);
        let req = Request {
            flags: 0,
            command: proto::CMD_DISC,
            cookie: self.cookie,
            offset: 0,
            len: 0,
        };
        let sent = self.stream.write_all(&req.encode());
        let _ = self.stream.shutdown(Shutdown::Both);
        Ok(sent?)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Err(e) = self.disconnect() {
            tracing::debug!(export = %self.export, error = %e, "NBD disconnect failed");
        }
    }
}

/// What the option haggling settled.
struct Negotiated {
    size: u64,
    flags: u16,
    block_size: BlockSize,
    structured: bool,
    contexts: HashMap<String, u32>,
}

/// The handshake from the greeting to the ACK of NBD_OPT_GO.
fn negotiate(
    stream: &mut UnixStream,
    export: &str,
    contexts: &[&str],
) -> Result<Negotiated, NbdError> {
    let greeting: [u8; 18] = read_array(stream)?;
    let server_flags = proto::decode_greeting(&greeting)?;
    stream.write_all(&proto::client_flags(server_flags).to_be_bytes())?;

    let mut wanted: Vec<&str> = Vec::new();
    for c in contexts {
        if !wanted.contains(c) {
            wanted.push(c);
        }
    }

    // Structured replies give holes in reads and are required for block status.
    let structured = match option(stream, proto::OPT_STRUCTURED_REPLY, &[])? {
        OptionAnswer::Ack(r) if r.is_empty() => true,
        OptionAnswer::Ack(_) => {
            return Err(NbdError::Protocol(
                "replies other than ACK to NBD_OPT_STRUCTURED_REPLY".into(),
            ));
        }
        OptionAnswer::Err { reply, .. } if reply == proto::REP_ERR_UNSUP && wanted.is_empty() => {
            false
        }
        OptionAnswer::Err { reply, message } => {
            return Err(NbdError::Refused {
                option: "NBD_OPT_STRUCTURED_REPLY",
                reply: proto::rep_err_name(reply),
                message,
            });
        }
    };

    let mut ids = HashMap::new();
    if !wanted.is_empty() {
        let data = proto::encode_set_meta_context(export, &wanted)?;
        let replies = match option(stream, proto::OPT_SET_META_CONTEXT, &data)? {
            OptionAnswer::Ack(r) => r,
            OptionAnswer::Err { reply, message } => {
                return Err(refused_or_unknown(
                    "NBD_OPT_SET_META_CONTEXT",
                    reply,
                    message,
                    export,
                ));
            }
        };
        for (reply, payload) in replies {
            if reply != proto::REP_META_CONTEXT {
                return Err(NbdError::Protocol(format!(
                    "reply type {reply} to NBD_OPT_SET_META_CONTEXT"
                )));
            }
            let (id, name) = proto::decode_meta_context(&payload)?;
            if !wanted.contains(&name.as_str()) {
                return Err(NbdError::Protocol(format!(
                    "server selected meta context {name:?}, which was not asked for"
                )));
            }
            if ids.values().any(|&v| v == id) || ids.contains_key(&name) {
                return Err(NbdError::Protocol(format!(
                    "meta context id {id} or name {name:?} given twice"
                )));
            }
            ids.insert(name, id);
        }
        if let Some(missing) = wanted.iter().find(|c| !ids.contains_key(**c)) {
            return Err(NbdError::MissingMetaContext((*missing).to_owned()));
        }
    }

    let replies = match option(stream, proto::OPT_GO, &proto::encode_go(export)?)? {
        OptionAnswer::Ack(r) => r,
        OptionAnswer::Err { reply, message } => {
            return Err(refused_or_unknown("NBD_OPT_GO", reply, message, export));
        }
    };
    let mut exported = None;
    let mut block_size = BlockSize::default();
    for (reply, payload) in replies {
        if reply != proto::REP_INFO {
            return Err(NbdError::Protocol(format!(
                "reply type {reply} to NBD_OPT_GO"
            )));
        }
        match proto::decode_info(&payload)? {
            Info::Export { size, flags } => exported = Some((size, flags)),
            Info::BlockSize(bs) => block_size = bs,
            Info::Other(_) => {}
        }
    }
    let (size, flags) = exported
        .ok_or_else(|| NbdError::Protocol("NBD_OPT_GO ended without NBD_INFO_EXPORT".into()))?;
    Ok(Negotiated {
        size,
        flags,
        block_size,
        structured,
        contexts: ids,
    })
}

fn chunk_error(req: &Request, e: ChunkError) -> NbdError {
    let message = match e.offset {
        Some(o) => format!("{} (at offset {o})", e.message),
        None => e.message,
    };
    Client::command_error(req, e.errno, message)
}

fn refused_or_unknown(option: &'static str, reply: u32, message: String, export: &str) -> NbdError {
    if reply == proto::REP_ERR_UNKNOWN {
        NbdError::UnknownExport {
            export: export.to_owned(),
            message,
        }
    } else {
        NbdError::Refused {
            option,
            reply: proto::rep_err_name(reply),
            message,
        }
    }
}

/// The server's answer to one option: the replies before NBD_REP_ACK, or an error reply.
enum OptionAnswer {
    Ack(Vec<(u32, Vec<u8>)>),
    Err { reply: u32, message: String },
}

/// Most replies an option may get before its ACK: a handful of INFO items or one
/// META_CONTEXT per query.
const MAX_OPTION_REPLIES: usize = 1024;

fn option(stream: &mut UnixStream, opt: u32, data: &[u8]) -> Result<OptionAnswer, NbdError> {
    stream.write_all(&proto::encode_option(opt, data)?)?;
    let mut replies = Vec::new();
    loop {
        let h = proto::decode_option_reply(&read_array(stream)?, opt)?;
        // Bounded by decode_option_reply.
        let mut payload = vec![0u8; h.len as usize];
        read_exact(stream, &mut payload)?;
        if h.reply == proto::REP_ACK {
            return Ok(OptionAnswer::Ack(replies));
        }
        if proto::is_rep_err(h.reply) {
            let message = String::from_utf8_lossy(&payload).into_owned();
            return Ok(OptionAnswer::Err {
                reply: h.reply,
                message,
            });
        }
        if replies.len() >= MAX_OPTION_REPLIES {
            return Err(NbdError::Protocol(format!(
                "more than {MAX_OPTION_REPLIES} replies to {}",
                proto::option_name(opt)
            )));
        }
        replies.push((h.reply, payload));
    }
}
