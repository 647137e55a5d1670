//! NBD wire format: constants, encoding of what the client sends and validating decoders for
//! what the server sends. Pure: no I/O, so hostile input can be tested byte by byte.
//!
//! Every decoder checks lengths before indexing and every length field is capped before the
//! client allocates for it, so a broken or malicious server yields an [`NbdError`], never a
//! panic or an unbounded allocation.

use std::collections::BTreeMap;

use super::NbdError;

// Handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// Information items of NBD_OPT_GO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_DF: u16 = 1 << 7;

/// Command flag: answer a READ with one data chunk (no holes).
pub const CMD_FLAG_DF: u16 = 1 << 2;

// Transmission.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// Largest READ/WRITE payload the client sends or accepts: the protocol's customary default
/// maximum when the server does not advertise one.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Cap on option replies (INFO, META_CONTEXT, error strings are all small).
pub const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Cap on a BLOCK_STATUS chunk: 4 bytes of context id plus a million extents.
pub const MAX_BLOCK_STATUS_PAYLOAD: u32 = 4 + 8 * (1 << 20);
/// Cap on error chunks and other non-data chunks.
pub const MAX_ERROR_PAYLOAD: u32 = 64 << 10;
/// Longest name (export or meta context) the protocol allows.
pub const MAX_NAME: usize = 4096;

pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_REPLY_LEN: usize = 20;
pub const OPTION_REPLY_LEN: usize = 20;

fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

fn be16(b: &[u8], at: usize) -> Result<u16, NbdError> {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_be_bytes)
        .ok_or_else(|| protocol("truncated field"))
}

fn be32(b: &[u8], at: usize) -> Result<u32, NbdError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| protocol("truncated field"))
}

fn be64(b: &[u8], at: usize) -> Result<u64, NbdError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| protocol("truncated field"))
}

/// Name of an option, for error messages.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

/// Name and meaning of an `NBD_REP_ERR_*` reply, for error messages.
pub fn rep_err_name(rep: u32) -> &'static str {
    match rep {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (option not supported)",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by server policy)",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid option)",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on this platform)",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (server requires TLS)",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server shutting down)",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD (block size negotiation required)",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (request too big)",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD (extended headers required)",
        _ => "unknown NBD_REP_ERR",
    }
}

/// Whether an option reply type is an error.
pub fn is_rep_err(rep: u32) -> bool {
    rep & REP_FLAG_ERROR != 0
}

/// Name of an NBD error value (the protocol's fixed errno numbering).
pub fn errno_name(errno: u32) -> &'static str {
    match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

/// Name of a command, for error messages.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "NBD_CMD_READ",
        CMD_WRITE => "NBD_CMD_WRITE",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_FLUSH => "NBD_CMD_FLUSH",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

// ---- Handshake -------------------------------------------------------------------------------

/// Decodes the server's greeting (NBDMAGIC, IHAVEOPT, handshake flags) and returns the flags.
/// Only the fixed newstyle handshake is spoken: oldstyle servers and plain newstyle ones are
/// refused.
pub fn decode_greeting(b: &[u8; 18]) -> Result<u16, NbdError> {
    let magic = be64(b, 0)?;
    if magic != NBDMAGIC {
        return Err(protocol(format!("bad greeting magic {magic:#018x}")));
    }
    let opt = be64(b, 8)?;
    if opt != IHAVEOPT {
        return Err(NbdError::Unsupported(
            "newstyle negotiation (server speaks the oldstyle handshake)",
        ));
    }
    let flags = be16(b, 16)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Unsupported("fixed newstyle negotiation"));
    }
    Ok(flags)
}

/// Client flags answering the server's handshake flags.
pub fn client_flags(server: u16) -> u32 {
    let mut f = FLAG_C_FIXED_NEWSTYLE;
    if server & FLAG_NO_ZEROES != 0 {
        f |= FLAG_C_NO_ZEROES;
    }
    f
}

/// An option request: IHAVEOPT, option, length, data.
pub fn encode_option(opt: u32, data: &[u8]) -> Result<Vec<u8>, NbdError> {
    let len = u32::try_from(data.len())
        .map_err(|_| NbdError::InvalidRequest("option data too long".into()))?;
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Ok(out)
}

fn push_name(out: &mut Vec<u8>, name: &str) -> Result<(), NbdError> {
    if name.len() > MAX_NAME {
        return Err(NbdError::InvalidRequest(format!(
            "name of {} bytes is longer than the protocol's {MAX_NAME}",
            name.len()
        )));
    }
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    Ok(())
}

/// Data of NBD_OPT_SET_META_CONTEXT: export name, then the queries.
pub fn encode_set_meta_context(export: &str, contexts: &[&str]) -> Result<Vec<u8>, NbdError> {
    let mut out = Vec::new();
    push_name(&mut out, export)?;
    let n = u32::try_from(contexts.len())
        .map_err(|_| NbdError::InvalidRequest("too many meta contexts".into()))?;
    out.extend_from_slice(&n.to_be_bytes());
    for c in contexts {
        push_name(&mut out, c)?;
    }
    Ok(out)
}

/// Data of NBD_OPT_GO: export name, and a request for the block size constraints (the export
/// information is always sent).
pub fn encode_go(export: &str) -> Result<Vec<u8>, NbdError> {
    let mut out = Vec::new();
    push_name(&mut out, export)?;
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    Ok(out)
}

/// Header of an option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReply {
    pub reply: u32,
    pub len: u32,
}

/// Decodes an option reply header, checking its magic, that it answers `opt`, and that its
/// payload is small enough to read.
pub fn decode_option_reply(b: &[u8; OPTION_REPLY_LEN], opt: u32) -> Result<OptionReply, NbdError> {
    let magic = be64(b, 0)?;
    if magic != OPT_REPLY_MAGIC {
        return Err(protocol(format!("bad option reply magic {magic:#018x}")));
    }
    let got = be32(b, 8)?;
    if got != opt {
        return Err(protocol(format!(
            "reply for option {got} while negotiating {}",
            option_name(opt)
        )));
    }
    let reply = be32(b, 12)?;
    let len = be32(b, 16)?;
    if len > MAX_OPTION_REPLY {
        return Err(protocol(format!(
            "option reply of {len} bytes (at most {MAX_OPTION_REPLY} accepted)"
        )));
    }
    if reply == REP_ACK && len != 0 {
        return Err(protocol("NBD_REP_ACK with a payload"));
    }
    Ok(OptionReply { reply, len })
}

/// The server's block size constraints (NBD_INFO_BLOCK_SIZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

impl Default for BlockSize {
    /// What a client assumes when the server says nothing.
    fn default() -> Self {
        Self {
            min: 1,
            preferred: 4096,
            max: MAX_PAYLOAD,
        }
    }
}

/// One NBD_REP_INFO item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize(BlockSize),
    /// Types the client did not ask for or does not know: ignored, as the protocol requires.
    Other(u16),
}

/// Decodes the payload of NBD_REP_INFO.
pub fn decode_info(p: &[u8]) -> Result<Info, NbdError> {
    let ty = be16(p, 0)?;
    match ty {
        INFO_EXPORT => {
            if p.len() != 12 {
                return Err(protocol(format!("NBD_INFO_EXPORT of {} bytes", p.len())));
            }
            let size = be64(p, 2)?;
            let flags = be16(p, 10)?;
            if flags & TFLAG_HAS_FLAGS == 0 {
                return Err(protocol("transmission flags without NBD_FLAG_HAS_FLAGS"));
            }
            if size > i64::MAX as u64 {
                return Err(protocol(format!("export size {size} out of range")));
            }
            Ok(Info::Export { size, flags })
        }
        INFO_BLOCK_SIZE => {
            if p.len() != 14 {
                return Err(protocol(format!(
                    "NBD_INFO_BLOCK_SIZE of {} bytes",
                    p.len()
                )));
            }
            let bs = BlockSize {
                min: be32(p, 2)?,
                preferred: be32(p, 6)?,
                max: be32(p, 10)?,
            };
            // The protocol bounds the minimum at 64 KiB and requires powers of two; anything
            // else would make the client split requests in ways the server rejects.
            if !bs.min.is_power_of_two() || bs.min > 64 << 10 {
                return Err(protocol(format!("minimum block size {} invalid", bs.min)));
            }
            if !bs.preferred.is_power_of_two() || bs.preferred < bs.min {
                return Err(protocol(format!(
                    "preferred block size {} invalid",
                    bs.preferred
                )));
            }
            if bs.max < bs.min || (bs.max != u32::MAX && !bs.max.is_multiple_of(bs.min)) {
                return Err(protocol(format!("maximum block size {} invalid", bs.max)));
            }
            Ok(Info::BlockSize(bs))
        }
        other => Ok(Info::Other(other)),
    }
}

/// Decodes NBD_REP_META_CONTEXT: the id the server assigned and the context's name.
pub fn decode_meta_context(p: &[u8]) -> Result<(u32, String), NbdError> {
    let id = be32(p, 0)?;
    let name = p.get(4..).unwrap_or_default();
    if name.len() > MAX_NAME {
        return Err(protocol("meta context name too long"));
    }
    let name = std::str::from_utf8(name)
        .map_err(|_| protocol("meta context name is not UTF-8"))?
        .to_owned();
    Ok((id, name))
}

// ---- Transmission ----------------------------------------------------------------------------

/// One command sent to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// End of the requested range; requests are built inside the export, so this cannot
    /// overflow for valid requests, but it saturates rather than trusting that.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// Which kind of reply a magic number announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    Simple,
    Structured,
}

/// Decodes the first four bytes of a reply.
pub fn reply_kind(magic: [u8; 4], structured_negotiated: bool) -> Result<ReplyKind, NbdError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(ReplyKind::Simple),
        STRUCTURED_REPLY_MAGIC if structured_negotiated => Ok(ReplyKind::Structured),
        STRUCTURED_REPLY_MAGIC => Err(protocol("structured reply without negotiating them")),
        m => Err(protocol(format!("bad reply magic {m:#010x}"))),
    }
}

fn check_cookie(got: u64, req: &Request) -> Result<(), NbdError> {
    if got != req.cookie {
        return Err(protocol(format!(
            "reply cookie {got:#x} does not match request cookie {:#x}",
            req.cookie
        )));
    }
    Ok(())
}

/// Decodes a simple reply (magic included) answering `req`; returns the error value (0 for
/// success).
pub fn decode_simple_reply(b: &[u8; SIMPLE_REPLY_LEN], req: &Request) -> Result<u32, NbdError> {
    if be32(b, 0)? != SIMPLE_REPLY_MAGIC {
        return Err(protocol("bad simple reply magic"));
    }
    let error = be32(b, 4)?;
    check_cookie(be64(b, 8)?, req)?;
    Ok(error)
}

/// Header of one structured reply chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub ty: u16,
    pub len: u32,
}

impl ChunkHeader {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Decodes a structured reply chunk header (magic included) answering `req`, and checks that
/// its payload length is plausible for its type before anyone allocates for it.
pub fn decode_chunk_header(
    b: &[u8; STRUCTURED_REPLY_LEN],
    req: &Request,
) -> Result<ChunkHeader, NbdError> {
    if be32(b, 0)? != STRUCTURED_REPLY_MAGIC {
        return Err(protocol("bad structured reply magic"));
    }
    let h = ChunkHeader {
        flags: be16(b, 4)?,
        ty: be16(b, 6)?,
        len: be32(b, 16)?,
    };
    check_cookie(be64(b, 8)?, req)?;
    let cap = match h.ty {
        REPLY_TYPE_NONE => 0,
        REPLY_TYPE_OFFSET_DATA => req.len.saturating_add(8),
        REPLY_TYPE_OFFSET_HOLE => 12,
        REPLY_TYPE_BLOCK_STATUS => MAX_BLOCK_STATUS_PAYLOAD,
        _ => MAX_ERROR_PAYLOAD,
    };
    if h.len > cap {
        return Err(protocol(format!(
            "chunk type {} of {} bytes (at most {cap} possible)",
            h.ty, h.len
        )));
    }
    if h.ty == REPLY_TYPE_NONE && !h.done() {
        return Err(protocol("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE"));
    }
    Ok(h)
}

/// A decoded structured reply chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk<'a> {
    None,
    /// Data at an absolute offset inside the request.
    Data {
        offset: u64,
        data: &'a [u8],
    },
    /// Zeroes at an absolute offset inside the request.
    Hole {
        offset: u64,
        len: u32,
    },
    /// Extents (length, flags) starting at the request's offset.
    BlockStatus {
        context: u32,
        extents: Vec<(u32, u32)>,
    },
    Error {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
}

impl Chunk<'_> {
    /// Short name, for errors (the Debug form may hold megabytes).
    pub fn kind(&self) -> &'static str {
        match self {
            Chunk::None => "NBD_REPLY_TYPE_NONE",
            Chunk::Data { .. } => "NBD_REPLY_TYPE_OFFSET_DATA",
            Chunk::Hole { .. } => "NBD_REPLY_TYPE_OFFSET_HOLE",
            Chunk::BlockStatus { .. } => "NBD_REPLY_TYPE_BLOCK_STATUS",
            Chunk::Error { .. } => "error",
        }
    }
}

fn check_inside(offset: u64, len: u64, req: &Request, what: &str) -> Result<(), NbdError> {
    let end = offset.checked_add(len);
    if len == 0 || offset < req.offset || end.is_none_or(|e| e > req.end()) {
        return Err(protocol(format!(
            "{what} {offset}+{len} outside the request {}+{}",
            req.offset, req.len
        )));
    }
    Ok(())
}

/// Decodes a chunk's payload, checking it against the request it answers: data and holes
/// must lie inside the requested range, and only READ gets them, only BLOCK_STATUS gets
/// extents.
pub fn decode_chunk<'a>(
    h: &ChunkHeader,
    p: &'a [u8],
    req: &Request,
) -> Result<Chunk<'a>, NbdError> {
    if p.len() != h.len as usize {
        return Err(protocol("chunk payload length differs from its header"));
    }
    let wrong_cmd = |name: &str| {
        protocol(format!(
            "{name} chunk in reply to {}",
            command_name(req.command)
        ))
    };
    match h.ty {
        REPLY_TYPE_NONE => Ok(Chunk::None),
        REPLY_TYPE_OFFSET_DATA => {
            if req.command != CMD_READ {
                return Err(wrong_cmd("NBD_REPLY_TYPE_OFFSET_DATA"));
            }
            let offset = be64(p, 0)?;
            let data = p.get(8..).unwrap_or_default();
            check_inside(offset, data.len() as u64, req, "data chunk")?;
            Ok(Chunk::Data { offset, data })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if req.command != CMD_READ {
                return Err(wrong_cmd("NBD_REPLY_TYPE_OFFSET_HOLE"));
            }
            if p.len() != 12 {
                return Err(protocol("hole chunk of the wrong length"));
            }
            let offset = be64(p, 0)?;
            let len = be32(p, 8)?;
            check_inside(offset, u64::from(len), req, "hole chunk")?;
            Ok(Chunk::Hole { offset, len })
        }
        REPLY_TYPE_BLOCK_STATUS => {
            if req.command != CMD_BLOCK_STATUS {
                return Err(wrong_cmd("NBD_REPLY_TYPE_BLOCK_STATUS"));
            }
            if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
                return Err(protocol(format!("block status chunk of {} bytes", p.len())));
            }
            let context = be32(p, 0)?;
            let extents = p[4..]
                .chunks_exact(8)
                .map(|e| Ok((be32(e, 0)?, be32(e, 4)?)))
                .collect::<Result<Vec<_>, NbdError>>()?;
            Ok(Chunk::BlockStatus { context, extents })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let errno = be32(p, 0)?;
            let mlen = usize::from(be16(p, 4)?);
            let rest = if h.ty == REPLY_TYPE_ERROR_OFFSET {
                8
            } else {
                0
            };
            if p.len() != 6 + mlen + rest {
                return Err(protocol("error chunk length inconsistent with its message"));
            }
            let message = String::from_utf8_lossy(&p[6..6 + mlen]).into_owned();
            let offset = if h.ty == REPLY_TYPE_ERROR_OFFSET {
                let o = be64(p, 6 + mlen)?;
                if o < req.offset || o >= req.end() {
                    return Err(protocol(format!("error offset {o} outside the request")));
                }
                Some(o)
            } else {
                None
            };
            if errno == 0 {
                return Err(protocol("error chunk with error value 0"));
            }
            Ok(Chunk::Error {
                errno,
                message,
                offset,
            })
        }
        ty if ty & REPLY_TYPE_ERROR_BIT != 0 => {
            // Unknown error types still carry the error value and message first.
            let errno = be32(p, 0)?;
            Ok(Chunk::Error {
                errno: if errno == 0 { 5 } else { errno },
                message: format!("unknown error chunk type {ty:#x}"),
                offset: None,
            })
        }
        ty => Err(protocol(format!("unknown chunk type {ty}"))),
    }
}

/// Where the data of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk goes, from its header and the
/// 8-byte offset that starts its payload (so the data can be read straight into place): the
/// absolute offset and the data's length, checked like [`decode_chunk`] checks them.
pub fn data_chunk_at(
    h: &ChunkHeader,
    offset: [u8; 8],
    req: &Request,
) -> Result<(u64, u32), NbdError> {
    if h.ty != REPLY_TYPE_OFFSET_DATA {
        return Err(protocol(format!("chunk type {} is not data", h.ty)));
    }
    if req.command != CMD_READ {
        return Err(protocol(format!(
            "NBD_REPLY_TYPE_OFFSET_DATA chunk in reply to {}",
            command_name(req.command)
        )));
    }
    let len = h
        .len
        .checked_sub(8)
        .ok_or_else(|| protocol("data chunk shorter than its offset"))?;
    let offset = u64::from_be_bytes(offset);
    check_inside(offset, u64::from(len), req, "data chunk")?;
    Ok((offset, len))
}

/// Tracks which bytes of a READ the chunks have covered, so overlapping chunks and replies
/// that leave gaps are caught.
#[derive(Debug)]
pub struct Coverage {
    start: u64,
    len: u64,
    // start -> end of each covered range; neighbours are never merged, the count is bounded
    // by the request length.
    ranges: BTreeMap<u64, u64>,
    covered: u64,
}

impl Coverage {
    pub fn new(req: &Request) -> Self {
        Self {
            start: req.offset,
            len: u64::from(req.len),
            ranges: BTreeMap::new(),
            covered: 0,
        }
    }

    /// Records `offset..offset+len` (already checked to lie inside the request).
    pub fn add(&mut self, offset: u64, len: u64) -> Result<(), NbdError> {
        let end = offset.saturating_add(len);
        let overlaps_before = self
            .ranges
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, &e)| e > offset);
        let overlaps_after = self
            .ranges
            .range(offset..)
            .next()
            .is_some_and(|(&s, _)| s < end);
        if overlaps_before || overlaps_after {
            return Err(protocol(format!(
                "chunk {offset}+{len} overlaps an earlier chunk"
            )));
        }
        self.ranges.insert(offset, end);
        self.covered += len;
        Ok(())
    }

    pub fn complete(&self) -> bool {
        self.covered == self.len
    }

    /// How much the chunks covered, for the error when the reply ends early.
    pub fn describe(&self) -> String {
        format!(
            "reply covered {} of {} bytes at {}",
            self.covered, self.len, self.start
        )
    }
}

/// An extent of a meta context: `len` bytes at `offset` share `flags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

/// Turns the raw (length, flags) list of a BLOCK_STATUS chunk into absolute extents, clamped
/// to the request (the server may describe past its end). Empty lists and zero-length extents
/// are refused: they would make a caller that iterates never advance.
pub fn extents_of(req: &Request, raw: &[(u32, u32)]) -> Result<Vec<Extent>, NbdError> {
    if raw.is_empty() {
        return Err(protocol("block status chunk without extents"));
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut at = req.offset;
    let end = req.end();
    for &(len, flags) in raw {
        if len == 0 {
            return Err(protocol("zero-length extent"));
        }
        if at >= end {
            // Extents past the request carry nothing the caller asked about; the protocol
            // only allows the last one to run past, but tolerating more costs nothing.
            break;
        }
        let len = u64::from(len).min(end - at);
        out.push(Extent {
            offset: at,
            len,
            flags,
        });
        at += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(command: u16, offset: u64, len: u32) -> Request {
        Request {
            flags: 0,
            command,
            cookie: 7,
            offset,
            len,
        }
    }

    fn chunk_header(flags: u16, ty: u16, cookie: u64, len: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&ty.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..20].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn greeting(magic: u64, opt: u64, flags: u16) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0..8].copy_from_slice(&magic.to_be_bytes());
        b[8..16].copy_from_slice(&opt.to_be_bytes());
        b[16..18].copy_from_slice(&flags.to_be_bytes());
        b
    }

    #[test]
    fn greeting_needs_fixed_newstyle() {
        let flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;
        assert_eq!(
            decode_greeting(&greeting(NBDMAGIC, IHAVEOPT, flags)).unwrap(),
            flags
        );
        assert_eq!(
            client_flags(flags),
            FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
        );
        assert_eq!(client_flags(FLAG_FIXED_NEWSTYLE), FLAG_C_FIXED_NEWSTYLE);
        assert!(matches!(
            decode_greeting(&greeting(0x1234, IHAVEOPT, flags)),
            Err(NbdError::Protocol(_))
        ));
        // Oldstyle: the cliserv magic follows NBDMAGIC.
        assert!(matches!(
            decode_greeting(&greeting(NBDMAGIC, 0x0000_4202_8186_1253, flags)),
            Err(NbdError::Unsupported(_))
        ));
        assert!(matches!(
            decode_greeting(&greeting(NBDMAGIC, IHAVEOPT, 0)),
            Err(NbdError::Unsupported(_))
        ));
    }

    #[test]
    fn option_encoding() {
        let go = encode_go("disk").unwrap();
        assert_eq!(go, [0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 1, 0, 3]);
        let o = encode_option(OPT_GO, &go).unwrap();
        assert_eq!(&o[0..8], b"IHAVEOPT");
        assert_eq!(&o[8..16], &[0, 0, 0, 7, 0, 0, 0, 12]);
        let m = encode_set_meta_context("", &["base:allocation"]).unwrap();
        assert_eq!(&m[0..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&m[8..12], &[0, 0, 0, 15]);
        assert!(encode_go(&"x".repeat(MAX_NAME + 1)).is_err());
    }

    fn option_reply(magic: u64, opt: u32, reply: u32, len: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&magic.to_be_bytes());
        b[8..12].copy_from_slice(&opt.to_be_bytes());
        b[12..16].copy_from_slice(&reply.to_be_bytes());
        b[16..20].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn option_replies_are_checked() {
        let ok = decode_option_reply(&option_reply(OPT_REPLY_MAGIC, OPT_GO, REP_INFO, 12), OPT_GO);
        assert_eq!(
            ok.unwrap(),
            OptionReply {
                reply: REP_INFO,
                len: 12
            }
        );
        // Wrong magic, an answer to another option, a huge payload, an ACK with data.
        for (b, opt) in [
            (option_reply(1, OPT_GO, REP_ACK, 0), OPT_GO),
            (
                option_reply(OPT_REPLY_MAGIC, OPT_GO, REP_ACK, 0),
                OPT_SET_META_CONTEXT,
            ),
            (
                option_reply(OPT_REPLY_MAGIC, OPT_GO, REP_INFO, u32::MAX),
                OPT_GO,
            ),
            (option_reply(OPT_REPLY_MAGIC, OPT_GO, REP_ACK, 4), OPT_GO),
        ] {
            assert!(matches!(
                decode_option_reply(&b, opt),
                Err(NbdError::Protocol(_))
            ));
        }
        assert!(is_rep_err(REP_ERR_UNKNOWN));
        assert!(rep_err_name(REP_ERR_UNKNOWN).contains("no such export"));
    }

    #[test]
    fn info_items() {
        let mut e = vec![0, 0];
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
        assert_eq!(
            decode_info(&e).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: 3
            }
        );
        assert!(decode_info(&e[..11]).is_err());
        let mut no_flags = e.clone();
        no_flags[11] = 0;
        assert!(decode_info(&no_flags).is_err());

        let bs = |min: u32, pref: u32, max: u32| {
            let mut b = vec![0, 3];
            for v in [min, pref, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            decode_info(&b)
        };
        assert_eq!(
            bs(1, 4096, 32 << 20).unwrap(),
            Info::BlockSize(BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20
            })
        );
        assert!(bs(3, 4096, 4096).is_err());
        assert!(bs(1 << 20, 1 << 20, 1 << 20).is_err());
        assert!(bs(512, 4096, 100).is_err());
        assert!(bs(512, 4096, 1000).is_err());
        assert_eq!(decode_info(&[0, 9, 1, 2]).unwrap(), Info::Other(9));
        assert!(decode_info(&[0]).is_err());
    }

    #[test]
    fn meta_context_reply() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"base:allocation");
        assert_eq!(
            decode_meta_context(&p).unwrap(),
            (5, "base:allocation".into())
        );
        assert!(decode_meta_context(&[0, 0]).is_err());
        assert!(decode_meta_context(&[0, 0, 0, 1, 0xff, 0xfe]).is_err());
    }

    #[test]
    fn request_encoding() {
        let r = Request {
            flags: 0,
            command: CMD_READ,
            cookie: 0x0102,
            offset: 0x10000,
            len: 512,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(&b[14..16], &[1, 2]);
        assert_eq!(&b[21..24], &[1, 0, 0]);
        assert_eq!(&b[26..28], &[2, 0]);
    }

    #[test]
    fn reply_magic_and_cookie() {
        assert_eq!(
            reply_kind(SIMPLE_REPLY_MAGIC.to_be_bytes(), false).unwrap(),
            ReplyKind::Simple
        );
        assert_eq!(
            reply_kind(STRUCTURED_REPLY_MAGIC.to_be_bytes(), true).unwrap(),
            ReplyKind::Structured
        );
        assert!(reply_kind(STRUCTURED_REPLY_MAGIC.to_be_bytes(), false).is_err());
        assert!(reply_kind(*b"junk", true).is_err());

        let r = req(CMD_WRITE, 0, 512);
        let mut s = [0u8; 16];
        s[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        s[4..8].copy_from_slice(&28u32.to_be_bytes());
        s[8..16].copy_from_slice(&7u64.to_be_bytes());
        assert_eq!(decode_simple_reply(&s, &r).unwrap(), 28);
        s[15] = 8;
        assert!(
            matches!(decode_simple_reply(&s, &r), Err(NbdError::Protocol(m)) if m.contains("cookie"))
        );
        s[0] = 0;
        assert!(decode_simple_reply(&s, &r).is_err());
    }

    #[test]
    fn chunk_headers_are_bounded() {
        let r = req(CMD_READ, 4096, 4096);
        let h = decode_chunk_header(&chunk_header(1, REPLY_TYPE_OFFSET_DATA, 7, 8 + 4096), &r);
        assert!(h.unwrap().done());
        // Wrong cookie, more data than requested, a huge error, a huge block status, NONE
        // without DONE, wrong magic.
        let bad = [
            chunk_header(0, REPLY_TYPE_OFFSET_DATA, 8, 16),
            chunk_header(0, REPLY_TYPE_OFFSET_DATA, 7, 8 + 4097),
            chunk_header(0, REPLY_TYPE_ERROR, 7, u32::MAX),
            chunk_header(0, REPLY_TYPE_BLOCK_STATUS, 7, u32::MAX),
            chunk_header(0, REPLY_TYPE_NONE, 7, 0),
            chunk_header(1, REPLY_TYPE_NONE, 7, 4),
        ];
        for b in bad {
            assert!(
                matches!(decode_chunk_header(&b, &r), Err(NbdError::Protocol(_))),
                "{b:?}"
            );
        }
        let mut m = chunk_header(1, REPLY_TYPE_NONE, 7, 0);
        m[3] ^= 1;
        assert!(decode_chunk_header(&m, &r).is_err());
    }

    fn decode(ty: u16, p: &[u8], r: &Request) -> Result<Chunk<'static>, NbdError> {
        let h = ChunkHeader {
            flags: 0,
            ty,
            len: p.len() as u32,
        };
        let p: &'static [u8] = Box::leak(p.to_vec().into_boxed_slice());
        decode_chunk(&h, p, r)
    }

    fn data_payload(offset: u64, len: usize) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.resize(8 + len, 0xab);
        p
    }

    fn hole_payload(offset: u64, len: u32) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        p
    }

    #[test]
    fn data_and_holes_must_lie_inside_the_request() {
        let r = req(CMD_READ, 4096, 4096);
        assert_eq!(
            decode(REPLY_TYPE_OFFSET_DATA, &data_payload(4096 + 512, 512), &r).unwrap(),
            Chunk::Data {
                offset: 4608,
                data: &[0xab; 512]
            }
        );
        assert_eq!(
            decode(REPLY_TYPE_OFFSET_HOLE, &hole_payload(4096, 4096), &r).unwrap(),
            Chunk::Hole {
                offset: 4096,
                len: 4096
            }
        );
        for (ty, p) in [
            (REPLY_TYPE_OFFSET_DATA, data_payload(0, 512)),
            (REPLY_TYPE_OFFSET_DATA, data_payload(8000, 512)),
            (REPLY_TYPE_OFFSET_DATA, data_payload(u64::MAX - 10, 512)),
            (REPLY_TYPE_OFFSET_DATA, data_payload(4096, 0)),
            (REPLY_TYPE_OFFSET_DATA, vec![0, 1, 2]),
            (REPLY_TYPE_OFFSET_HOLE, hole_payload(4096, 4097)),
            (REPLY_TYPE_OFFSET_HOLE, hole_payload(u64::MAX, u32::MAX)),
            (REPLY_TYPE_OFFSET_HOLE, hole_payload(4096, 0)),
            (REPLY_TYPE_OFFSET_HOLE, vec![0; 8]),
        ] {
            assert!(
                matches!(decode(ty, &p, &r), Err(NbdError::Protocol(_))),
                "{ty} {p:?}"
            );
        }
        // The header-and-offset check of data read straight into place agrees with the full
        // decoder, on good chunks and bad.
        for p in [
            data_payload(4096 + 512, 512),
            data_payload(4096, 4096),
            data_payload(0, 512),
            data_payload(8000, 512),
            data_payload(u64::MAX - 10, 512),
            data_payload(4096, 0),
            data_payload(4096, 4097),
        ] {
            let h = ChunkHeader {
                flags: 0,
                ty: REPLY_TYPE_OFFSET_DATA,
                len: p.len() as u32,
            };
            let offset: [u8; 8] = p[..8].try_into().unwrap();
            match (
                decode(REPLY_TYPE_OFFSET_DATA, &p, &r),
                data_chunk_at(&h, offset, &r),
            ) {
                (Ok(Chunk::Data { offset, data }), Ok(at)) => {
                    assert_eq!(at, (offset, data.len() as u32));
                }
                (Err(_), Err(NbdError::Protocol(_))) => {}
                (full, direct) => panic!("{p:?}: {full:?} against {direct:?}"),
            }
        }
        let short = ChunkHeader {
            flags: 0,
            ty: REPLY_TYPE_OFFSET_DATA,
            len: 3,
        };
        assert!(data_chunk_at(&short, [0; 8], &r).is_err());
        // Data for a command that is not a read.
        let w = req(CMD_WRITE, 4096, 4096);
        let h = ChunkHeader {
            flags: 0,
            ty: REPLY_TYPE_OFFSET_DATA,
            len: 520,
        };
        assert!(data_chunk_at(&h, 4096u64.to_be_bytes(), &w).is_err());
        assert!(decode(REPLY_TYPE_OFFSET_DATA, &data_payload(4096, 512), &w).is_err());
        // Payload length disagreeing with the header.
        let h = ChunkHeader {
            flags: 0,
            ty: REPLY_TYPE_OFFSET_HOLE,
            len: 13,
        };
        assert!(decode_chunk(&h, &hole_payload(4096, 1), &r).is_err());
    }

    #[test]
    fn error_chunks() {
        let r = req(CMD_READ, 4096, 4096);
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        assert_eq!(
            decode(REPLY_TYPE_ERROR, &p, &r).unwrap(),
            Chunk::Error {
                errno: 5,
                message: "bad".into(),
                offset: None
            }
        );
        let mut po = p.clone();
        po.extend_from_slice(&5000u64.to_be_bytes());
        assert_eq!(
            decode(REPLY_TYPE_ERROR_OFFSET, &po, &r).unwrap(),
            Chunk::Error {
                errno: 5,
                message: "bad".into(),
                offset: Some(5000)
            }
        );
        // Message length past the payload, offset outside the request, error value 0.
        let mut long = p.clone();
        long[5] = 200;
        assert!(decode(REPLY_TYPE_ERROR, &long, &r).is_err());
        let mut outside = p.clone();
        outside.extend_from_slice(&100u64.to_be_bytes());
        assert!(decode(REPLY_TYPE_ERROR_OFFSET, &outside, &r).is_err());
        let mut zero = p.clone();
        zero[3] = 0;
        assert!(decode(REPLY_TYPE_ERROR, &zero, &r).is_err());
        assert!(decode(REPLY_TYPE_ERROR, &[0, 0], &r).is_err());
        assert!(decode(77, &[], &r).is_err());
    }

    #[test]
    fn block_status_chunks() {
        let r = req(CMD_BLOCK_STATUS, 1 << 20, 1 << 20);
        let mut p = 3u32.to_be_bytes().to_vec();
        for (len, flags) in [(65536u32, 1u32), (1 << 21, 0)] {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        let Chunk::BlockStatus { context, extents } =
            decode(REPLY_TYPE_BLOCK_STATUS, &p, &r).unwrap()
        else {
            panic!("not a block status chunk");
        };
        assert_eq!(context, 3);
        // The last extent runs past the request and is clamped.
        assert_eq!(
            extents_of(&r, &extents).unwrap(),
            vec![
                Extent {
                    offset: 1 << 20,
                    len: 65536,
                    flags: 1
                },
                Extent {
                    offset: (1 << 20) + 65536,
                    len: (1 << 20) - 65536,
                    flags: 0
                },
            ]
        );
        assert!(decode(REPLY_TYPE_BLOCK_STATUS, &p[..p.len() - 1], &r).is_err());
        assert!(decode(REPLY_TYPE_BLOCK_STATUS, &p[..4], &r).is_err());
        assert!(decode(REPLY_TYPE_BLOCK_STATUS, &p, &req(CMD_READ, 0, 1)).is_err());
        assert!(extents_of(&r, &[]).is_err());
        assert!(extents_of(&r, &[(0, 1)]).is_err());
    }

    #[test]
    fn coverage_catches_overlaps_and_gaps() {
        let r = req(CMD_READ, 1000, 100);
        let mut c = Coverage::new(&r);
        c.add(1050, 50).unwrap();
        assert!(!c.complete());
        assert!(c.add(1040, 20).is_err());
        assert!(c.add(1099, 1).is_err());
        c.add(1000, 10).unwrap();
        assert!(c.add(1005, 1).is_err());
        c.add(1010, 40).unwrap();
        assert!(c.complete());
    }
}
