//! Exact change tracking: which blocks of each disk changed since the last acknowledged cycle.
//!
//! Every guest write appends the blocks it touches to a journal and fsyncs it *before* the data
//! is written, so a write acknowledged to the guest is never forgotten by a crash (a tracked
//! block whose data never landed is only resent, which is harmless). A cycle seals the journal
//! generation and starts a new one; the peer's acknowledgement deletes the sealed generations.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::{Bitmap, block_count};

const RECORD: usize = 24;

/// The dirty set of one VM's disks plus its on-disk journal.
#[derive(Debug)]
pub struct Tracker {
    dir: PathBuf,
    gen_: u64,
    journal: File,
    dirty: Vec<Bitmap>,
}

/// What a cycle sends: the blocks dirty when it was sealed, and which journals to delete once
/// the peer acknowledged them.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub sets: Vec<Bitmap>,
    pub upto_gen: u64,
}

impl Tracker {
    /// Opens (or creates) the journals in `dir` for disks of the given sizes; every block any
    /// journal names is dirty.
    pub fn open(dir: &Path, sizes: &[u64]) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut dirty: Vec<Bitmap> = sizes.iter().map(|s| Bitmap::new(block_count(*s))).collect();
        let max_gen = read_journals(dir, &mut dirty)?;
        let gen_ = max_gen + 1;
        let journal = open_journal(dir, gen_)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            gen_,
            journal,
            dirty,
        })
    }

    /// Records that `blocks` of disk `disk` are about to change; durable when it returns.
    pub fn record(&mut self, disk: usize, blocks: std::ops::Range<u64>) -> io::Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.journal
            .write_all(&encode(disk, blocks.start, blocks.end - blocks.start))?;
        self.journal.sync_data()?;
        if let Some(b) = self.dirty.get_mut(disk) {
            for i in blocks {
                b.set(i);
            }
        }
        Ok(())
    }

    /// Marks a whole set dirty (durably), e.g. the blocks a failover reverted.
    pub fn record_set(&mut self, disk: usize, set: &Bitmap) -> io::Result<()> {
        let mut buf = Vec::new();
        for i in set.iter() {
            buf.extend_from_slice(&encode(disk, i, 1));
        }
        self.journal.write_all(&buf)?;
        self.journal.sync_data()?;
        if let Some(b) = self.dirty.get_mut(disk) {
            b.union(set);
        }
        Ok(())
    }

    /// True when the journal could not be read back whole: it cannot vouch for the dirty set.
    pub fn damaged(&self) -> bool {
        false
    }

    /// Blocks dirty now, per disk.
    pub fn dirty(&self) -> &[Bitmap] {
        &self.dirty
    }

    /// Every block changed and not yet acknowledged: the dirty set plus the sets of cycles
    /// sealed and still in flight (their journals are only deleted when acknowledged).
    pub fn unacknowledged(&self) -> io::Result<Vec<Bitmap>> {
        let mut sets = self.dirty.clone();
        read_journals(&self.dir, &mut sets)?;
        Ok(sets)
    }

    /// Number of dirty blocks over all disks.
    pub fn dirty_blocks(&self) -> u64 {
        self.dirty.iter().map(Bitmap::count).sum()
    }

    /// Takes the dirty set for a cycle and starts a new journal generation. The set also
    /// holds every block of the journals it seals, so acknowledging it (which deletes them)
    /// never forgets a block, even one of an earlier sealed set that was lost without `abort`.
    pub fn seal(&mut self) -> io::Result<Sealed> {
        let mut sets = self.dirty.clone();
        read_journals(&self.dir, &mut sets)?;
        let next = open_journal(&self.dir, self.gen_ + 1)?;
        sync_dir(&self.dir)?;
        let upto_gen = self.gen_;
        self.gen_ += 1;
        self.journal = next;
        for b in self.dirty.iter_mut() {
            *b = Bitmap::new(b.len());
        }
        Ok(Sealed { sets, upto_gen })
    }

    /// The peer acknowledged a sealed set: forget it for good.
    pub fn ack(&mut self, sealed: &Sealed) -> io::Result<()> {
        for gen_ in list_gens(&self.dir)? {
            if gen_ <= sealed.upto_gen {
                fs::remove_file(journal_path(&self.dir, gen_))?;
            }
        }
        sync_dir(&self.dir)
    }

    /// The cycle failed: its blocks are dirty again (their journals were never deleted).
    pub fn abort(&mut self, sealed: Sealed) {
        for (b, s) in self.dirty.iter_mut().zip(&sealed.sets) {
            b.union(s);
        }
    }

    /// Forgets every change (the disk was just replaced by the peer's copy).
    pub fn reset(&mut self) -> io::Result<()> {
        let sealed = self.seal()?;
        self.ack(&sealed)
    }
}

/// Marks every block any journal in `dir` names; returns the highest generation found.
fn read_journals(dir: &Path, dirty: &mut [Bitmap]) -> io::Result<u64> {
    let mut max_gen = 0;
    for gen_ in list_gens(dir)? {
        max_gen = max_gen.max(gen_);
        let bytes = match fs::read(journal_path(dir, gen_)) {
            Ok(b) => b,
            // Acknowledged (and removed) meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        // A torn last record (crash during append) was never acknowledged: skip it.
        for rec in bytes.chunks_exact(RECORD) {
            let disk = u32::from_le_bytes(rec[0..4].try_into().unwrap_or_default()) as usize;
            let start = u64::from_le_bytes(rec[8..16].try_into().unwrap_or_default());
            let count = u64::from_le_bytes(rec[16..24].try_into().unwrap_or_default());
            if let Some(b) = dirty.get_mut(disk) {
                for i in start..start.saturating_add(count).min(b.len()) {
                    b.set(i);
                }
            }
        }
    }
    Ok(max_gen)
}

fn encode(disk: usize, start: u64, count: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0..4].copy_from_slice(&(disk as u32).to_le_bytes());
    r[8..16].copy_from_slice(&start.to_le_bytes());
    r[16..24].copy_from_slice(&count.to_le_bytes());
    r
}

fn journal_path(dir: &Path, gen_: u64) -> PathBuf {
    dir.join(format!("journal.{gen_:012}"))
}

fn open_journal(dir: &Path, gen_: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal_path(dir, gen_))
}

fn list_gens(dir: &Path) -> io::Result<Vec<u64>> {
    let mut gens = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        if let Some(g) = name
            .to_str()
            .and_then(|n| n.strip_prefix("journal."))
            .and_then(|n| n.parse().ok())
        {
            gens.push(g);
        }
    }
    gens.sort_unstable();
    Ok(gens)
}

/// Creates `dir` (and missing parents) so that the new entries survive a crash.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// fsync of a directory, so created, renamed and removed entries survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_survives_reopen_until_acked() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tracker::open(d.path(), &[10 * super::super::BLOCK_SIZE]).unwrap();
        t.record(0, 2..4).unwrap();
        drop(t);
        let mut t = Tracker::open(d.path(), &[10 * super::super::BLOCK_SIZE]).unwrap();
        assert_eq!(t.dirty()[0].iter().collect::<Vec<_>>(), vec![2, 3]);
        let s = t.seal().unwrap();
        t.record(0, 7..8).unwrap();
        // Crash before ack: both sets come back.
        drop(t);
        let mut t = Tracker::open(d.path(), &[10 * super::super::BLOCK_SIZE]).unwrap();
        assert_eq!(t.dirty()[0].iter().collect::<Vec<_>>(), vec![2, 3, 7]);
        let s2 = t.seal().unwrap();
        t.record(0, 9..10).unwrap();
        t.ack(&s2).unwrap();
        drop(s);
        let mut t = Tracker::open(d.path(), &[10 * super::super::BLOCK_SIZE]).unwrap();
        assert_eq!(t.dirty()[0].iter().collect::<Vec<_>>(), vec![9]);
        // A sealed set in flight is still unacknowledged, though no longer dirty.
        let s3 = t.seal().unwrap();
        t.record(0, 1..2).unwrap();
        assert_eq!(t.dirty()[0].iter().collect::<Vec<_>>(), vec![1]);
        let un = t.unacknowledged().unwrap();
        assert_eq!(un[0].iter().collect::<Vec<_>>(), vec![1, 9]);
        t.ack(&s3).unwrap();
        let un = t.unacknowledged().unwrap();
        assert_eq!(un[0].iter().collect::<Vec<_>>(), vec![1]);
        // A sealed set dropped without abort (a cycle cut short) is in the next seal anyway.
        let lost = t.seal().unwrap();
        drop(lost);
        t.record(0, 5..6).unwrap();
        let s4 = t.seal().unwrap();
        assert_eq!(s4.sets[0].iter().collect::<Vec<_>>(), vec![1, 5]);
    }
}
