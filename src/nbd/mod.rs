//! A blocking NBD client, for reading disks out of libvirt/QEMU and writing them into
//! qemu-nbd or qemu-storage-daemon exports.
//!
//! At a source site, each replication cycle opens a libvirt pull-mode incremental backup: QEMU
//! exports a point-in-time view of every disk over NBD on a Unix socket, with the meta context
//! `qemu:dirty-bitmap:backup-<disk>` listing the extents changed since the previous
//! checkpoint. [`Client::dirty_blocks`] turns that context into a [`Bitmap`] of
//! [`BLOCK_SIZE`](crate::replication::BLOCK_SIZE) blocks and [`Client::read_runs`] reads them,
//! adjacent blocks as one run.
//! At a replica, [`Client::write_at`] and [`Client::flush`] write blocks into images served over
//! NBD.
//!
//! What is spoken of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`):
//! - the fixed newstyle handshake (with `NBD_FLAG_C_NO_ZEROES` when offered), and the options
//!   `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` and `NBD_OPT_GO` (export size,
//!   transmission flags and block size constraints); no TLS, no `NBD_OPT_EXPORT_NAME`
//!   fallback, no extended headers;
//! - `NBD_CMD_READ` (structured data/hole/error chunks, or simple replies), `NBD_CMD_WRITE`,
//!   `NBD_CMD_FLUSH`, `NBD_CMD_BLOCK_STATUS` (32-bit extents) and `NBD_CMD_DISC`. Reads
//!   ([`Client::read_runs`]) keep up to [`MAX_IN_FLIGHT`] requests outstanding and match
//!   replies by cookie, in whatever order and chunking they come, asking for one data chunk
//!   per read (`NBD_CMD_FLAG_DF`) where the server offers it; writes, flushes and block
//!   status go one at a time. Reads and writes are split at the server's maximum (32 MiB at
//!   most).
//!
//! Everything the server sends is validated ([`proto`] holds the pure decoders): magic
//! numbers, cookies, chunk ranges against the request, and every length before it is
//! allocated. A protocol violation or I/O failure leaves the connection [`NbdError::Broken`]
//! for later calls; an error the server reports for one command does not.
//!
//! [`Bitmap`]: crate::replication::Bitmap

mod client;
pub mod proto;
#[cfg(test)]
mod tests;

pub use client::{Client, DEFAULT_TIMEOUT, MAX_IN_FLIGHT};
pub use proto::{BlockSize, Extent};

/// The meta context every NBD server with block status offers: allocation of the export.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag: the extent changed since the bitmap was created.
pub const STATE_DIRTY: u32 = 1;

/// Name of the meta context through which QEMU exports the dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// Everything that can go wrong talking NBD.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD server closed the connection")]
    Closed,
    #[error("NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("NBD server lacks {0}")]
    Unsupported(&'static str),
    #[error("NBD server has no export {export:?}{}", detail(.message))]
    UnknownExport { export: String, message: String },
    #[error("NBD server refused {option}: {reply}{}", detail(.message))]
    Refused {
        option: &'static str,
        reply: &'static str,
        message: String,
    },
    #[error("NBD server does not offer meta context {0:?} for this export")]
    MissingMetaContext(String),
    #[error("meta context {0:?} was not negotiated on this connection")]
    ContextNotNegotiated(String),
    #[error(
        "NBD server failed {command} of {len} bytes at {offset}: {errno_name} ({errno}){}",
        detail(.message)
    )]
    Command {
        command: &'static str,
        offset: u64,
        len: u64,
        errno: u32,
        errno_name: &'static str,
        message: String,
    },
    #[error("invalid NBD request: {0}")]
    InvalidRequest(String),
    #[error("NBD connection unusable after an earlier failure")]
    Broken,
}

fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}
