//! Exact change tracking: which blocks of each disk changed since the last acknowledged cycle.
//!
//! Every guest write appends the blocks it touches to a journal and fsyncs it *before* the data
//! is written, so a write acknowledged to the guest is never forgotten by a crash (a tracked
//! block whose data never landed is only resent, which is harmless). A cycle seals the journal
//! generation and starts a new one; the peer's acknowledgement deletes the sealed generations.
//!
//! A journal generation is a file `journal.<gen>` of 32-byte records, little endian:
//!
//! ```text
//! [magic "TSJ2" 4 bytes][disk u32][start u64][count u64][check u64]
//! ```
//!
//! where `check` is the first 8 bytes of blake3 of the 24 bytes before it. The magic doubles as
//! the format version: journals from before checksummed records (24 bytes, no magic) never
//! decode, so they read as damage rather than as garbage blocks.
//!
//! An append that fails is cut back to the last good length; if even that fails, the tracker
//! moves to a new generation, so nothing is ever appended after a fragment. On reading, the only
//! bytes allowed not to decode are a torn tail of the newest generation (at most one record
//! that starts like one, or zeros): a crash during an append that was never acknowledged. It is
//! ignored, and cut away at open. Anything else that does not decode makes [`Tracker::damaged`]
//! true: the journal can no longer vouch for the dirty set, and the disks must be compared
//! whole. Records that still decode count either way.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Bitmap, block_count};

const RECORD: usize = 32;
/// Magic and format version of a record.
const MAGIC: [u8; 4] = *b"TSJ2";

/// The dirty set of one VM's disks plus its on-disk journal.
#[derive(Debug)]
pub struct Tracker {
    dir: PathBuf,
    gen_: u64,
    /// Bytes of good records in the current generation: where the next one goes.
    len: u64,
    /// A failed append could not be cut back: the next record starts a new generation.
    poisoned: bool,
    /// Generations left with a fragment after their last good record, and that record's end,
    /// so this process reads them without calling them damaged.
    fragments: Vec<(u64, u64)>,
    /// One more than the highest generation a read found damaged (0: none), until a sealed
    /// set covering it is acknowledged. Atomic because `unacknowledged` reads through `&self`.
    damaged: AtomicU64,
    dirty: Vec<Bitmap>,
    #[cfg(test)]
    inject: Inject,
}

/// Failures a test makes an append hit.
#[cfg(test)]
#[derive(Debug, Default)]
struct Inject {
    /// The next append writes this many bytes, then fails.
    write_fails_after: Option<usize>,
    /// Cutting a failed append back fails.
    truncate_fails: bool,
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
    /// journal names is dirty. A journal that does not decode makes [`Self::damaged`] true.
    pub fn open(dir: &Path, sizes: &[u64]) -> io::Result<Self> {
        create_dir_durable(dir)?;
        let mut dirty: Vec<Bitmap> = sizes.iter().map(|s| Bitmap::new(block_count(*s))).collect();
        let scan = read_journals(dir, &mut dirty, &[])?;
        if let Some((gen_, good)) = scan.torn {
            // Cut the torn append away, so this generation reads clean once it is no longer the
            // newest.
            let f = OpenOptions::new()
                .write(true)
                .open(journal_path(dir, gen_))?;
            f.set_len(good)?;
            f.sync_all()?;
        }
        let gen_ = scan.max_gen + 1;
        let len = open_journal(dir, gen_)?.metadata()?.len();
        // The new generation must exist after a crash: seal refers to it.
        sync_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            gen_,
            len,
            poisoned: false,
            fragments: Vec::new(),
            damaged: AtomicU64::new(scan.damaged_gen.map_or(0, |g| g.saturating_add(1))),
            dirty,
            #[cfg(test)]
            inject: Inject::default(),
        })
    }

    /// Records that `blocks` of disk `disk` are about to change; durable when it returns.
    pub fn record(&mut self, disk: usize, blocks: std::ops::Range<u64>) -> io::Result<()> {
        if blocks.is_empty() {
            return Ok(());
        }
        self.append(&encode(
            disk_index(disk)?,
            blocks.start,
            blocks.end - blocks.start,
        ))?;
        if let Some(b) = self.dirty.get_mut(disk) {
            for i in blocks {
                b.set(i);
            }
        }
        Ok(())
    }

    /// Marks a whole set dirty (durably), e.g. the blocks a failover reverted.
    pub fn record_set(&mut self, disk: usize, set: &Bitmap) -> io::Result<()> {
        let d = disk_index(disk)?;
        let mut buf = Vec::new();
        for i in set.iter() {
            buf.extend_from_slice(&encode(d, i, 1));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.append(&buf)?;
        if let Some(b) = self.dirty.get_mut(disk) {
            b.union(set);
        }
        Ok(())
    }

    /// True when a journal did not decode (damage, or a journal from before checksummed
    /// records): the dirty set may be missing blocks, so the next cycle must compare the disks
    /// whole (by block hashes) instead of trusting it. Stays true until a sealed set covering
    /// the damaged journal is acknowledged (or [`Self::reset`]).
    pub fn damaged(&self) -> bool {
        self.damaged.load(Ordering::Relaxed) != 0
    }

    /// Blocks dirty now, per disk.
    pub fn dirty(&self) -> &[Bitmap] {
        &self.dirty
    }

    /// Every block changed and not yet acknowledged: the dirty set plus the sets of cycles
    /// sealed and still in flight (their journals are only deleted when acknowledged).
    pub fn unacknowledged(&self) -> io::Result<Vec<Bitmap>> {
        let mut sets = self.dirty.clone();
        let scan = read_journals(&self.dir, &mut sets, &self.fragments)?;
        self.note_damage(scan.damaged_gen);
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
        let scan = read_journals(&self.dir, &mut sets, &self.fragments)?;
        self.note_damage(scan.damaged_gen);
        let upto_gen = self.gen_;
        self.next_gen()?;
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
        sync_dir(&self.dir)?;
        self.fragments.retain(|(g, _)| *g > sealed.upto_gen);
        let d = self.damaged.load(Ordering::Relaxed);
        if d != 0 && d - 1 <= sealed.upto_gen {
            self.damaged.store(0, Ordering::Relaxed);
        }
        Ok(())
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

    /// Appends records durably at the end of the good ones; on failure, cuts them away again so
    /// a later append never lands after a fragment.
    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.poisoned {
            self.next_gen()?;
        }
        // Opened per append, not kept: an idle VM holds no descriptor.
        let journal = open_journal(&self.dir, self.gen_)?;
        let res = self
            .write_at_end(&journal, buf)
            .and_then(|()| journal.sync_data());
        if let Err(e) = res {
            if self.cut_back(&journal).is_err() {
                self.poisoned = true;
                self.fragments.push((self.gen_, self.len));
            }
            return Err(e);
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    fn write_at_end(&mut self, journal: &File, buf: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.inject.write_fails_after.take() {
            journal.write_all_at(&buf[..n.min(buf.len())], self.len)?;
            return Err(io::Error::other("injected write failure"));
        }
        // At the known end rather than O_APPEND: a fragment past it is overwritten.
        journal.write_all_at(buf, self.len)
    }

    fn cut_back(&mut self, journal: &File) -> io::Result<()> {
        #[cfg(test)]
        if self.inject.truncate_fails {
            return Err(io::Error::other("injected truncate failure"));
        }
        journal.set_len(self.len)
    }

    /// Starts the next journal generation, durably named.
    fn next_gen(&mut self) -> io::Result<()> {
        let next = open_journal(&self.dir, self.gen_ + 1)?;
        sync_dir(&self.dir)?;
        self.len = next.metadata()?.len();
        self.gen_ += 1;
        self.poisoned = false;
        Ok(())
    }

    fn note_damage(&self, gen_: Option<u64>) {
        if let Some(g) = gen_ {
            self.damaged
                .fetch_max(g.saturating_add(1), Ordering::Relaxed);
        }
    }
}

/// What reading the journals found.
struct Scan {
    max_gen: u64,
    /// The newest generation ends in a torn append: its generation and good length.
    torn: Option<(u64, u64)>,
    /// The highest generation holding bytes that do not decode otherwise.
    damaged_gen: Option<u64>,
}

/// Marks every block any journal in `dir` names. `fragments` are generations this process
/// left with a fragment after a good length; only that length of them is read.
fn read_journals(dir: &Path, dirty: &mut [Bitmap], fragments: &[(u64, u64)]) -> io::Result<Scan> {
    let gens = list_gens(dir)?;
    let newest = gens.last().copied();
    let mut scan = Scan {
        max_gen: newest.unwrap_or(0),
        torn: None,
        damaged_gen: None,
    };
    for gen_ in gens {
        let mut bytes = match fs::read(journal_path(dir, gen_)) {
            Ok(b) => b,
            // Acknowledged (and removed) meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some((_, good)) = fragments.iter().find(|(g, _)| *g == gen_) {
            bytes.truncate(usize::try_from(*good).unwrap_or(usize::MAX));
        }
        let (end, skipped) = decode_all(&bytes, dirty);
        let tail = &bytes[end..];
        if skipped {
            scan.damaged_gen = Some(gen_);
        } else if !tail.is_empty() {
            // Only the newest generation is ever appended to, so only it can end in an
            // append a crash cut short.
            if Some(gen_) == newest && tail.len() <= RECORD && looks_torn(tail) {
                scan.torn = Some((gen_, end as u64));
            } else {
                scan.damaged_gen = Some(gen_);
            }
        }
    }
    Ok(scan)
}

/// Marks the blocks of every record of `bytes` that decodes; returns the end of the last one
/// and whether bytes before it did not decode. After a bad stretch it resumes at the next byte
/// where a record decodes, so records after a fragment still count.
fn decode_all(bytes: &[u8], dirty: &mut [Bitmap]) -> (usize, bool) {
    let (mut at, mut end, mut skipped) = (0, 0, false);
    while let Some(rec) = bytes.get(at..at + RECORD) {
        let Some((disk, start, count)) = decode(rec) else {
            at += 1;
            continue;
        };
        skipped |= at != end;
        if let Some(b) = usize::try_from(disk).ok().and_then(|d| dirty.get_mut(d)) {
            for i in start..start.saturating_add(count).min(b.len()) {
                b.set(i);
            }
        }
        at += RECORD;
        end = at;
    }
    (end, skipped)
}

/// What an interrupted append can leave: the start of a record, or zeros where the file grew
/// but the data never landed.
fn looks_torn(tail: &[u8]) -> bool {
    tail.iter().all(|b| *b == 0) || tail.iter().zip(MAGIC).all(|(a, b)| *a == b)
}

fn encode(disk: u32, start: u64, count: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0..4].copy_from_slice(&MAGIC);
    r[4..8].copy_from_slice(&disk.to_le_bytes());
    r[8..16].copy_from_slice(&start.to_le_bytes());
    r[16..24].copy_from_slice(&count.to_le_bytes());
    let check = check(&r[..24]);
    r[24..32].copy_from_slice(&check);
    r
}

/// `(disk, start, count)` of a record; `None` unless its magic and checksum match.
fn decode(rec: &[u8]) -> Option<(u32, u64, u64)> {
    if rec.len() != RECORD || rec[0..4] != MAGIC || rec[24..32] != check(&rec[..24]) {
        return None;
    }
    Some((
        u32::from_le_bytes(rec[4..8].try_into().ok()?),
        u64::from_le_bytes(rec[8..16].try_into().ok()?),
        u64::from_le_bytes(rec[16..24].try_into().ok()?),
    ))
}

fn check(fields: &[u8]) -> [u8; 8] {
    let mut c = [0u8; 8];
    c.copy_from_slice(&blake3::hash(fields).as_bytes()[..8]);
    c
}

fn disk_index(disk: usize) -> io::Result<u32> {
    u32::try_from(disk)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "disk index out of range"))
}

fn journal_path(dir: &Path, gen_: u64) -> PathBuf {
    dir.join(format!("journal.{gen_:012}"))
}

/// Opens a generation for writing at its end; not `O_APPEND`, which would ignore the offset.
fn open_journal(dir: &Path, gen_: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
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

/// fsync of a directory, so created, renamed and removed entries survive a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `create_dir_all` whose new entries survive a crash: fsyncs the parent of every directory it
/// created.
pub fn create_dir_durable(path: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut p = path;
    while !p.as_os_str().is_empty() && !p.try_exists()? {
        missing.push(p);
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    fs::create_dir_all(path)?;
    for d in missing.iter().rev() {
        match d.parent() {
            Some(q) if !q.as_os_str().is_empty() => sync_dir(q)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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

    const SIZE: u64 = 10 * super::super::BLOCK_SIZE;

    fn blocks(t: &Tracker) -> Vec<u64> {
        t.dirty()[0].iter().collect()
    }

    fn gen_files(dir: &Path) -> Vec<PathBuf> {
        list_gens(dir)
            .unwrap()
            .into_iter()
            .map(|g| journal_path(dir, g))
            .collect()
    }

    fn append_raw(path: &Path, bytes: &[u8]) {
        OpenOptions::new()
            .append(true)
            .open(path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
    }

    fn flip(path: &Path, at: usize) {
        let mut b = fs::read(path).unwrap();
        b[at] ^= 0x40;
        fs::write(path, b).unwrap();
    }

    #[test]
    fn torn_tail_is_ignored_and_truncated() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tracker::open(d.path(), &[SIZE]).unwrap();
        t.record(0, 2..3).unwrap();
        t.record(0, 5..6).unwrap();
        drop(t);
        // A crash in the middle of appending block 8.
        let newest = gen_files(d.path()).pop().unwrap();
        append_raw(&newest, &encode(0, 8, 1)[..10]);
        let mut t = Tracker::open(d.path(), &[SIZE]).unwrap();
        assert_eq!(blocks(&t), vec![2, 5]);
        assert!(!t.damaged());
        assert_eq!(fs::metadata(&newest).unwrap().len(), 2 * RECORD as u64);
        t.record(0, 7..8).unwrap();
        drop(t);
        // A whole last record that fails its checksum is a torn append too.
        let newest = gen_files(d.path()).pop().unwrap();
        flip(&newest, RECORD - 1);
        let t = Tracker::open(d.path(), &[SIZE]).unwrap();
        assert_eq!(blocks(&t), vec![2, 5]);
        assert!(!t.damaged());
    }

    #[test]
    fn fragment_of_a_failed_append_does_not_misalign_later_records() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tracker::open(d.path(), &[SIZE]).unwrap();
        t.record(0, 1..2).unwrap();
        // What a write cut short by ENOSPC leaves behind.
        let newest = gen_files(d.path()).pop().unwrap();
        append_raw(&newest, &encode(0, 9, 1)[..RECORD / 2 + 3]);
        t.record(0, 4..5).unwrap();
        t.record(0, 6..7).unwrap();
        assert_eq!(
            t.unacknowledged().unwrap()[0].iter().collect::<Vec<_>>(),
            vec![1, 4, 6]
        );
        drop(t);
        let t = Tracker::open(d.path(), &[SIZE]).unwrap();
        assert_eq!(blocks(&t), vec![1, 4, 6]);
        assert!(!t.damaged());
    }

    #[test]
    fn damaged_middle_record_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tracker::open(d.path(), &[SIZE]).unwrap();
        for b in [1, 3, 5] {
            t.record(0, b..b + 1).unwrap();
        }
        drop(t);
        let newest = gen_files(d.path()).pop().unwrap();
        flip(&newest, RECORD + 9);
        let t = Tracker::open(d.path(), &[SIZE]).unwrap();
        assert!(t.damaged());
        // Every record that still decodes counts.
        assert_eq!(blocks(&t), vec![1, 5]);
    }

    #[test]
    fn torn_record_in_an_older_generation_is_damage() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tracker::open(d.path(), &[SIZE]).unwrap();
        t.record(0, 1..2).unwrap();
        t.record(0, 2..3).unwrap();
        let _sealed = t.seal().unwrap();
        t.record(0, 3..4).unwrap();
        drop(t);
        let older = gen_files(d.path()).into_iter().next().unwrap();
        flip(&older, RECORD + 2);
        let t = Tracker::open(d.path(), &[SIZE]).unwrap();
        assert!(t.damaged());
        assert_eq!(blocks(&t), vec![1, 3]);
    }

    #[test]
    fn journal_of_the_old_format_is_damage() {
        // Records of 24 bytes without magic or checksum, from before checksummed records.
        let old = |disk: u32, start: u64, count: u64| {
            let mut r = [0u8; 24];
            r[0..4].copy_from_slice(&disk.to_le_bytes());
            r[8..16].copy_from_slice(&start.to_le_bytes());
            r[16..24].copy_from_slice(&count.to_le_bytes());
            r
        };
        for n in 1..=4u64 {
            let d = tempfile::tempdir().unwrap();
            let bytes: Vec<u8> = (0..n).flat_map(|i| old(0, i, 1)).collect();
            fs::write(journal_path(d.path(), 1), bytes).unwrap();
            let t = Tracker::open(d.path(), &[SIZE]).unwrap();
            assert!(t.damaged(), "{n} old records");
        }
    }

    #[test]
    fn failed_append_is_cut_back() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tracker::open(d.path(), &[SIZE]).unwrap();
        t.record(0, 1..2).unwrap();
        t.inject.write_fails_after = Some(RECORD / 2);
        assert!(t.record(0, 9..10).is_err());
        let newest = gen_files(d.path()).pop().unwrap();
        assert_eq!(fs::metadata(&newest).unwrap().len(), RECORD as u64);
        assert_eq!(blocks(&t), vec![1]);
        t.record(0, 4..5).unwrap();
        drop(t);
        let t = Tracker::open(d.path(), &[SIZE]).unwrap();
        assert_eq!(blocks(&t), vec![1, 4]);
        assert!(!t.damaged());
    }

    #[test]
    fn fragment_that_cannot_be_cut_back_ends_its_generation() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tracker::open(d.path(), &[SIZE]).unwrap();
        t.record(0, 1..2).unwrap();
        t.inject.write_fails_after = Some(RECORD / 2);
        t.inject.truncate_fails = true;
        let mut set = Bitmap::new(10);
        set.set(8);
        set.set(9);
        assert!(t.record_set(0, &set).is_err());
        assert_eq!(gen_files(d.path()).len(), 1);
        t.record(0, 4..5).unwrap();
        // Never appended after the fragment: the next record went to a new generation.
        let files = gen_files(d.path());
        assert_eq!(files.len(), 2);
        assert_eq!(
            fs::metadata(&files[0]).unwrap().len(),
            RECORD as u64 * 3 / 2
        );
        assert_eq!(fs::metadata(&files[1]).unwrap().len(), RECORD as u64);
        // This process knows where the fragment starts.
        assert_eq!(
            t.unacknowledged().unwrap()[0].iter().collect::<Vec<_>>(),
            vec![1, 4]
        );
        assert!(!t.damaged());
        drop(t);
        // After a restart the fragment is in an older generation: the journal cannot tell it
        // from damage, so it says so, and every record that decodes still counts.
        let t = Tracker::open(d.path(), &[SIZE]).unwrap();
        assert!(t.damaged());
        assert_eq!(blocks(&t), vec![1, 4]);
    }

    #[test]
    fn damage_is_reported_until_a_seal_covering_it_is_acked() {
        let d = tempfile::tempdir().unwrap();
        let mut t = Tracker::open(d.path(), &[SIZE]).unwrap();
        t.record(0, 1..2).unwrap();
        t.record(0, 2..3).unwrap();
        let s = t.seal().unwrap();
        t.record(0, 3..4).unwrap();
        // Damage found while running (a sealed journal rotted) is reported too.
        let older = gen_files(d.path()).into_iter().next().unwrap();
        flip(&older, 5);
        assert_eq!(
            t.unacknowledged().unwrap()[0].iter().collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(t.damaged());
        t.abort(s);
        let s = t.seal().unwrap();
        assert!(t.damaged());
        t.record(0, 7..8).unwrap();
        t.ack(&s).unwrap();
        assert!(!t.damaged());
        drop(t);
        let t = Tracker::open(d.path(), &[SIZE]).unwrap();
        assert!(!t.damaged());
        assert_eq!(blocks(&t), vec![7]);
    }

    #[test]
    fn open_creates_missing_directories() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("vms/a/track");
        let mut t = Tracker::open(&dir, &[SIZE]).unwrap();
        t.record(0, 1..2).unwrap();
        assert_eq!(gen_files(&dir).len(), 1);
        create_dir_durable(&dir).unwrap();
        assert!(create_dir_durable(&dir.join("journal.000000000001/x")).is_err());
    }
}
