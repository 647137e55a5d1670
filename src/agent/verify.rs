//! Verification of a replica against its source: at a cycle's cut, when due, the source hashes
//! every block of its disks as they were at that instant; once the replica committed the
//! cycle, its newest point must hold the same blocks. A difference (a write the change tracking
//! missed, a replica image altered behind the agent's back, a bad disk) is never left silent:
//! the source resynchronizes by block hashes and the listing reports it until a later
//! verification finds the copies equal.
//!
//! One verification runs at a time per agent (they read whole disks), and a VM's next one is due
//! `--verify-interval-seconds` after the last, at once after one that found a difference.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::Timestamp;

use super::meta::Outbound;
use super::runtime::READ_WINDOW_BLOCKS;
use crate::replication::{BLOCK_SIZE, block_count, block_hash};
use crate::site::Verification;

/// Whether the next cycle of a source verifies its replica.
pub(super) fn due(o: &Outbound, now: Timestamp, every: Duration) -> bool {
    if o.bulk.is_some() || o.stopped {
        return false;
    }
    match &o.last_verification {
        None => true,
        Some(v) if v.differing_blocks > 0 => true,
        Some(v) => (now - v.time).get_seconds() >= every.as_secs() as i64,
    }
}

/// The agent's one verification at a time; released when dropped.
pub(super) struct Slot<'a>(&'a AtomicBool);

impl<'a> Slot<'a> {
    pub(super) fn try_take(busy: &'a AtomicBool) -> Option<Self> {
        busy.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Slot(busy))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The hash of every block of each disk (`sizes` bytes), 32 bytes per block in block order,
/// as the replica's `hashes` route answers them; `read` reads a disk's bytes at an offset, a
/// window of blocks at a time (one request of an export, not one per block).
pub(super) fn hash_disks<E>(
    sizes: &[u64],
    mut read: impl FnMut(usize, u64, &mut [u8]) -> Result<(), E>,
) -> Result<Vec<Vec<u8>>, E> {
    let window = READ_WINDOW_BLOCKS as u64 * BLOCK_SIZE;
    let mut buf = vec![0u8; window as usize];
    let mut out = Vec::with_capacity(sizes.len());
    for (d, size) in sizes.iter().enumerate() {
        let mut hashes = Vec::with_capacity(block_count(*size) as usize * 32);
        let mut offset = 0;
        while offset < *size {
            let len = (*size - offset).min(window) as usize;
            read(d, offset, &mut buf[..len])?;
            for block in buf[..len].chunks(BLOCK_SIZE as usize) {
                hashes.extend_from_slice(&block_hash(block));
            }
            offset += len as u64;
        }
        out.push(hashes);
    }
    Ok(out)
}

/// Blocks whose hashes differ between the source's (`ours`) and the replica's (`theirs`) of one
/// disk; a replica answer of another length differs in every block.
pub(super) fn differing(ours: &[u8], theirs: &[u8]) -> u64 {
    if ours.len() != theirs.len() {
        return (ours.len().max(theirs.len()) / 32) as u64;
    }
    ours.chunks(32)
        .zip(theirs.chunks(32))
        .filter(|(a, b)| a != b)
        .count() as u64
}

/// The outcome of one verification at `time`: per disk (name, differing blocks).
pub(super) fn outcome(time: Timestamp, per_disk: &[(String, u64)]) -> Verification {
    Verification {
        time,
        differing_blocks: per_disk.iter().map(|(_, n)| n).sum(),
        disk: per_disk
            .iter()
            .find(|(_, n)| *n > 0)
            .map(|(name, _)| name.clone()),
    }
}

/// What the source records when its replica differed: its lastError until the resync ends.
pub(super) fn divergence_message(v: &Verification) -> String {
    format!(
        "replica diverged: {} block(s){} differed from this source at {}; resynchronizing by \
         block hashes",
        v.differing_blocks,
        v.disk
            .as_deref()
            .map(|d| format!(" of disk {d}"))
            .unwrap_or_default(),
        v.time
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(v: Option<Verification>) -> Outbound {
        let mut o = Outbound::from_enable(&crate::site::EnableReplication {
            operation_id: "op".into(),
            peer_site: "b".into(),
            peer_url: "https://b".into(),
            peer_token: "t".into(),
            peer_ca_pem: None,
            interval_seconds: 30,
            recovery_point_retention_hours: 24,
            app_consistent_frequency_hours: 0,
            mode: crate::site::ReplicationMode::Initial,
        });
        o.bulk = None;
        o.last_verification = v;
        o
    }

    #[test]
    fn due_first_after_the_interval_and_again_at_once_after_a_difference() {
        let t = |s: i64| Timestamp::from_second(s).unwrap();
        let every = Duration::from_secs(3600);
        assert!(due(&outbound(None), t(10), every));
        let ok = |at, n| {
            Some(Verification {
                time: t(at),
                differing_blocks: n,
                disk: None,
            })
        };
        assert!(!due(&outbound(ok(0, 0)), t(3599), every));
        assert!(due(&outbound(ok(0, 0)), t(3600), every));
        assert!(due(&outbound(ok(0, 3)), t(1), every));
        let mut bulk = outbound(None);
        bulk.bulk = Some(crate::site::ReplicationMode::Resync);
        assert!(!due(&bulk, t(10), every));
    }

    #[test]
    fn hashes_compare_block_by_block() {
        let sizes = [3 * BLOCK_SIZE + 10, 70 * BLOCK_SIZE];
        let disk: Vec<u8> = (0..sizes[1]).map(|i| (i % 251) as u8).collect();
        let ours = hash_disks(&sizes, |_, off, buf: &mut [u8]| -> Result<(), ()> {
            buf.copy_from_slice(&disk[off as usize..off as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        assert_eq!(ours[0].len(), 4 * 32);
        assert_eq!(ours[1].len(), 70 * 32);
        assert_eq!(&ours[0][32..64], &block_hash(&disk[65536..131072])[..]);
        assert_eq!(
            &ours[0][96..],
            &block_hash(&disk[3 * 65536..3 * 65536 + 10])[..]
        );
        let mut theirs = ours[0].clone();
        assert_eq!(differing(&ours[0], &theirs), 0);
        theirs[32 * 3] ^= 1;
        theirs[5] ^= 1;
        assert_eq!(differing(&ours[0], &theirs), 2);
        assert_eq!(differing(&ours[0], &theirs[..64]), 4);
        let v = outcome(
            Timestamp::UNIX_EPOCH,
            &[("a".into(), 0), ("b".into(), 2), ("c".into(), 1)],
        );
        assert_eq!((v.differing_blocks, v.disk.as_deref()), (3, Some("b")));
    }
}
