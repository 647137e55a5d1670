//! A real test guest: a Debian kernel and a busybox initramfs (built by `scripts/guest-build.sh`)
//! that boots under QEMU in seconds and writes a verifiable pattern to its disk, so tests check
//! the bytes a VM wrote, as found on a replica, instead of trusting digests.
//!
//! # The pattern
//!
//! The guest writes generation after generation (1, 2, ...; at boot it completes a generation
//! it finds cut short, or else starts after the highest one on the disk). Generation `G` writes record `i` of `N` (`i` in `0..N`, in
//! that order, each synced to the disk before the next) at byte offset `i * 1 MiB`, so records
//! land in distinct 64 KiB replication blocks. A record is 4096 bytes:
//!
//! - bytes `0..4032`: the line `TWINSITE-RECORD v1 gen=G idx=i n=N` and a newline, repeated and
//!   cut at 4032 bytes (deterministic from `G`, `i` and `N`);
//! - bytes `4032..4096`: the lowercase hex SHA-256 of bytes `0..4032`.
//!
//! A block of zeros is a record of generation 0 (nothing written yet). Because records are
//! written in index order, a disk (or a crash-consistent replica of one) holds
//! `G+1 ... G+1 G ... G`: a prefix of the generation being written, then the newest complete
//! one. Anything else (a bad checksum, a record in the wrong place, an older record before a
//! newer one, generations two apart) means blocks were lost, torn or reordered.
//!
//! On the kernel command line: `twinsite.verify=1` makes the guest check the records before
//! writing and print `TWINSITE VERIFY ok gen=G records=N partial=K` (or `TWINSITE VERIFY bad
//! ...`) on its serial console; `twinsite.write=0` stops it writing; `twinsite.records=N`
//! (default 32) and `twinsite.pause=S` (seconds between generations, default 1). After each
//! generation it prints `TWINSITE WROTE gen=G`.
//!
//! # The append-only log
//!
//! With `twinsite.log=1` the guest writes no generations: record `K` (0, 1, ...) is written
//! once, at byte offset `K * 64 KiB` (one replication block each), synced, and then
//! acknowledged on the console as `TWINSITE LOGGED seq=K`. A record is 4096 bytes: the line
//! `TWINSITE-LOG v1 seq=K` and a newline, repeated and cut at 4032 bytes, then the lowercase hex
//! SHA-256 of those bytes. At every boot it checks the records from 0 up to the first blank
//! slot, and that the 64 slots after it are blank, and prints `TWINSITE LOG ok count=C` (then
//! appends from `C`, one record per pause) or `TWINSITE LOG bad ...` (then writes nothing). A
//! record written once and lost later (a copy that missed some writes) stays lost: no later
//! generation rewrites it, so a disk that holds fewer records than the guest acknowledged proves
//! lost writes.

use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::EnvtestError;

/// Size of one pattern record.
pub const RECORD_SIZE: usize = 4096;
/// Distance between records: record `i` starts at `i * RECORD_STRIDE`.
pub const RECORD_STRIDE: u64 = 1 << 20;
/// Records per generation when the command line does not say.
pub const DEFAULT_RECORDS: usize = 32;
const BODY_SIZE: usize = RECORD_SIZE - 64;

/// Serial console line printed after each complete generation.
pub const WROTE_MARK: &str = "TWINSITE WROTE gen=";
/// Serial console line printed when `twinsite.verify=1` found a consistent pattern.
pub const VERIFY_OK_MARK: &str = "TWINSITE VERIFY ok";
/// Serial console line printed when `twinsite.verify=1` found an inconsistent pattern.
pub const VERIFY_BAD_MARK: &str = "TWINSITE VERIFY bad";
/// Serial console line of the append-only log: record `K` is on the disk (synced).
pub const LOGGED_MARK: &str = "TWINSITE LOGGED seq=";
/// Serial console line of the append-only log's check at boot: `C` intact records.
pub const LOG_OK_MARK: &str = "TWINSITE LOG ok count=";
/// Serial console line of the append-only log's check at boot when it failed.
pub const LOG_BAD_MARK: &str = "TWINSITE LOG bad";
/// Distance between records of the append-only log (one replication block).
pub const LOG_STRIDE: u64 = 64 << 10;

/// Where the guest (vmlinuz, initrd.gz, initrd-noacpi.gz, initrd-ga.gz) lives, building it first when needed.
/// `TWINSITE_GUEST_DIR` may point at a built guest (a directory holding `vmlinuz`); otherwise it
/// names the cache the build script uses.
pub fn guest_dir() -> Result<PathBuf, EnvtestError> {
    if let Ok(dir) = std::env::var("TWINSITE_GUEST_DIR") {
        let dir = PathBuf::from(dir);
        if dir.join("vmlinuz").is_file() {
            return Ok(dir);
        }
    }
    super::run_build_script("guest-build.sh")
}

/// Which initramfs the guest boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestVariant {
    /// Powers off on the ACPI power button (`virsh shutdown` works).
    Acpi,
    /// Ignores the power button: a guest whose graceful shutdown fails.
    NoAcpi,
    /// As `Acpi`, with the QEMU guest agent on the channel `org.qemu.guest_agent.0` (see
    /// [`DomainOptions::guest_agent_channel`]) and a file system on the data disk `vdb` (see
    /// [`DomainOptions::data_disk`]) that a writer appends to: what a freeze freezes.
    GuestAgent,
}

impl GuestVariant {
    pub fn initrd(self, guest_dir: &Path) -> PathBuf {
        guest_dir.join(match self {
            Self::Acpi => "initrd.gz",
            Self::NoAcpi => "initrd-noacpi.gz",
            Self::GuestAgent => "initrd-ga.gz",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// What the guest does, passed on its kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestOptions {
    /// Check the records before writing and print the result.
    pub verify: bool,
    /// Write generations forever.
    pub write: bool,
    pub records: usize,
    /// Seconds between generations (between log records with `log`).
    pub pause_secs: u32,
    /// The append-only log instead of generations (see the module documentation).
    pub log: bool,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            verify: false,
            write: true,
            records: DEFAULT_RECORDS,
            pause_secs: 1,
            log: false,
        }
    }
}

impl GuestOptions {
    /// The `twinsite.*` kernel command line options.
    pub fn cmdline(&self) -> String {
        format!(
            "twinsite.verify={} twinsite.write={} twinsite.records={} twinsite.pause={}{}",
            u8::from(self.verify),
            u8::from(self.write),
            self.records,
            self.pause_secs,
            if self.log { " twinsite.log=1" } else { "" }
        )
    }
}

/// A libvirt domain booting the test guest. See [`DomainOptions::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainOptions {
    pub name: String,
    /// The domain's UUID; libvirt picks one when `None`. Redefining an existing domain needs it.
    pub uuid: Option<String>,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub guest: GuestOptions,
    /// The disk the guest sees as `vda`.
    pub disk: PathBuf,
    pub disk_format: DiskFormat,
    /// File that receives the serial console (created by libvirt; the guest's markers land here).
    pub serial_log: PathBuf,
    pub memory_mib: u32,
    /// KVM instead of TCG. Off by default: under nested virtualization a Linux guest can hang in
    /// early boot with KVM, while TCG always works (only slower).
    pub kvm: bool,
    /// A virtio NIC on this libvirt network.
    pub network: Option<String>,
    /// A virtio-serial channel `org.qemu.guest_agent.0` (for a guest agent).
    pub guest_agent_channel: bool,
    /// A second qcow2 disk, `vdb` (the guest agent variant's file system).
    pub data_disk: Option<PathBuf>,
}

impl DomainOptions {
    /// The guest from `guest_dir` (see [`guest_dir`]) writing the pattern to `disk`.
    pub fn new(
        name: &str,
        guest_dir: &Path,
        variant: GuestVariant,
        disk: &Path,
        disk_format: DiskFormat,
        serial_log: &Path,
    ) -> Self {
        Self {
            name: name.into(),
            uuid: None,
            kernel: guest_dir.join("vmlinuz"),
            initrd: variant.initrd(guest_dir),
            guest: GuestOptions::default(),
            disk: disk.into(),
            disk_format,
            serial_log: serial_log.into(),
            memory_mib: 192,
            kvm: false,
            network: None,
            guest_agent_channel: variant == GuestVariant::GuestAgent,
            data_disk: None,
        }
    }
}

/// Escapes text for XML content and attribute values.
pub use crate::agent::runtime::xml::escape as xml_escape;

/// Libvirt domain XML for [`DomainOptions`]: direct kernel boot, ACPI, one virtio disk and a
/// serial console written to a file.
pub fn domain_xml(opts: &DomainOptions) -> String {
    let e = |s: &str| xml_escape(s);
    let p = |p: &Path| xml_escape(&p.to_string_lossy());
    let mut x = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        x,
        "<domain type='{ty}'>
  <name>{name}</name>{uuid}
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 {cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
",
        ty = if opts.kvm { "kvm" } else { "qemu" },
        name = e(&opts.name),
        uuid = opts
            .uuid
            .as_deref()
            .map(|u| format!("\n  <uuid>{}</uuid>", e(u)))
            .unwrap_or_default(),
        mem = opts.memory_mib,
        kernel = p(&opts.kernel),
        initrd = p(&opts.initrd),
        cmdline = e(&opts.guest.cmdline()),
        fmt = opts.disk_format.as_str(),
        disk = p(&opts.disk),
    );
    if let Some(data) = &opts.data_disk {
        let _ = write!(
            x,
            "    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
",
            p(data)
        );
    }
    if let Some(net) = &opts.network {
        let _ = write!(
            x,
            "    <interface type='network'>
      <source network='{}'/>
      <model type='virtio'/>
    </interface>
",
            e(net)
        );
    }
    // No append='on': with it, libvirt 9 and QEMU 7.2 write nothing to the file.
    let _ = write!(
        x,
        "    <serial type='file'>
      <source path='{}'/>
      <target port='0'/>
    </serial>
",
        p(&opts.serial_log)
    );
    if opts.guest_agent_channel {
        x.push_str(
            "    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
",
        );
    }
    x.push_str(
        "    <memballoon model='none'/>
  </devices>
</domain>
",
    );
    x
}

/// The outcome of [`verify_records`] on a consistent pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatternSummary {
    /// The newest generation every record holds (or held before the one being written);
    /// 0 when none was completed.
    pub generation: u64,
    /// Records checked.
    pub records: usize,
    /// Leading records already holding `generation + 1` (a generation cut off mid-way).
    pub partial: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("reading record {index} at offset {offset}: {source}")]
    Read {
        index: usize,
        offset: u64,
        source: std::io::Error,
    },
    #[error("record {index}: read {got} bytes, want {RECORD_SIZE}")]
    Short { index: usize, got: usize },
    #[error("record {index} is not a pattern record (header {header:?})")]
    NotARecord { index: usize, header: String },
    #[error("record {index}: checksum mismatch")]
    Checksum { index: usize },
    #[error("record {index} holds record {idx} of {n} (want {index} of {records})")]
    Misplaced {
        index: usize,
        idx: usize,
        n: usize,
        records: usize,
    },
    #[error("record {index} (generation {generation}): content differs from the pattern")]
    Content { index: usize, generation: u64 },
    #[error(
        "record {index} holds generation {generation} after generation {previous} (first record: {first}): blocks lost or reordered"
    )]
    Order {
        index: usize,
        generation: u64,
        previous: u64,
        first: u64,
    },
}

fn header_line(generation: u64, index: usize, records: usize) -> String {
    format!("TWINSITE-RECORD v1 gen={generation} idx={index} n={records}\n")
}

/// The exact bytes the guest writes as record `index` of `records` in `generation`.
pub fn expected_record(generation: u64, index: usize, records: usize) -> Vec<u8> {
    let line = header_line(generation, index, records);
    let mut rec: Vec<u8> = line.bytes().cycle().take(BODY_SIZE).collect();
    let sum = hex::encode(Sha256::digest(&rec));
    rec.extend_from_slice(sum.as_bytes());
    rec
}

/// Checks one record read from `index * RECORD_STRIDE`; returns its generation (0 for zeros).
pub fn check_record(bytes: &[u8], index: usize, records: usize) -> Result<u64, PatternError> {
    if bytes.len() != RECORD_SIZE {
        return Err(PatternError::Short {
            index,
            got: bytes.len(),
        });
    }
    if bytes.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    let (body, sum) = bytes.split_at(BODY_SIZE);
    let first = body.split(|b| *b == b'\n').next().unwrap_or_default();
    let header = String::from_utf8_lossy(first).into_owned();
    let not_a_record = || PatternError::NotARecord {
        index,
        header: header.chars().take(80).collect(),
    };
    let fields = header
        .strip_prefix("TWINSITE-RECORD v1 ")
        .ok_or_else(not_a_record)?;
    let mut values = fields
        .split(' ')
        .zip(["gen=", "idx=", "n="])
        .map(|(f, key)| {
            f.strip_prefix(key)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(not_a_record)
        });
    let mut next = || values.next().unwrap_or_else(|| Err(not_a_record()));
    let (generation, idx, n) = (next()?, next()?, next()?);
    if hex::encode(Sha256::digest(body)).as_bytes() != sum {
        return Err(PatternError::Checksum { index });
    }
    let (idx, n) = (idx as usize, n as usize);
    if idx != index || n != records {
        return Err(PatternError::Misplaced {
            index,
            idx,
            n,
            records,
        });
    }
    if bytes != expected_record(generation, index, records).as_slice() {
        return Err(PatternError::Content { index, generation });
    }
    Ok(generation)
}

/// Verifies the `records` pattern records; `read(offset, len)` returns the disk's bytes there.
/// Every record must be intact and in place, and together they must read `G+1 ... G+1 G ... G`
/// (see the module documentation). Returns the newest complete generation.
pub fn verify_records(
    mut read: impl FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
    records: usize,
) -> Result<PatternSummary, PatternError> {
    let mut first = None;
    let mut previous = 0;
    let mut partial = 0;
    for index in 0..records {
        let offset = index as u64 * RECORD_STRIDE;
        let bytes = read(offset, RECORD_SIZE).map_err(|source| PatternError::Read {
            index,
            offset,
            source,
        })?;
        let generation = check_record(&bytes, index, records)?;
        let first = *first.get_or_insert(generation);
        if index > 0 && (generation > previous || generation + 1 < first) {
            return Err(PatternError::Order {
                index,
                generation,
                previous,
                first,
            });
        }
        if generation == first {
            partial += 1;
        }
        previous = generation;
    }
    // The last record belongs to the newest complete generation.
    if first == Some(previous) {
        partial = 0;
    }
    Ok(PatternSummary {
        generation: previous,
        records,
        partial,
    })
}

/// The exact bytes the guest writes as record `seq` of its append-only log.
pub fn expected_log_record(seq: u64) -> Vec<u8> {
    let line = format!("TWINSITE-LOG v1 seq={seq}\n");
    let mut rec: Vec<u8> = line.bytes().cycle().take(BODY_SIZE).collect();
    let sum = hex::encode(Sha256::digest(&rec));
    rec.extend_from_slice(sum.as_bytes());
    rec
}

/// A log slot that holds neither a blank block nor the record that belongs there.
#[derive(Debug, thiserror::Error)]
#[error("log slot {slot} holds neither a blank block nor log record {slot} (first bytes {head:?})")]
pub struct LogError {
    pub slot: u64,
    pub head: String,
}

/// Checks the append-only log in `slots` slots; `read(offset, len)` returns the disk's bytes
/// there. Returns the number of records before the first blank slot, and the slots written
/// after it (a gap: writes lost in between).
pub fn verify_log(
    mut read: impl FnMut(u64, usize) -> std::io::Result<Vec<u8>>,
    slots: u64,
) -> Result<(u64, Vec<u64>), LogError> {
    let mut count = None;
    let mut after_gap = Vec::new();
    for slot in 0..slots {
        let bytes = read(slot * LOG_STRIDE, RECORD_SIZE).map_err(|e| LogError {
            slot,
            head: e.to_string(),
        })?;
        if bytes.iter().all(|b| *b == 0) {
            count.get_or_insert(slot);
            continue;
        }
        if bytes != expected_log_record(slot) {
            return Err(LogError {
                slot,
                head: String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned(),
            });
        }
        if count.is_some() {
            after_gap.push(slot);
        }
    }
    Ok((count.unwrap_or(slots), after_gap))
}

/// [`verify_records`] on a raw disk image file.
pub fn verify_raw_image(path: &Path, records: usize) -> Result<PatternSummary, PatternError> {
    let mut file = std::fs::File::open(path).map_err(|source| PatternError::Read {
        index: 0,
        offset: 0,
        source,
    })?;
    verify_records(
        |offset, len| {
            file.seek(SeekFrom::Start(offset))?;
            let mut buf = vec![0; len];
            file.read_exact(&mut buf)?;
            Ok(buf)
        },
        records,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(gens: &[u64]) -> Vec<Vec<u8>> {
        let n = gens.len();
        gens.iter()
            .enumerate()
            .map(|(i, g)| {
                if *g == 0 {
                    vec![0; RECORD_SIZE]
                } else {
                    expected_record(*g, i, n)
                }
            })
            .collect()
    }

    fn verify(recs: &[Vec<u8>]) -> Result<PatternSummary, PatternError> {
        verify_records(
            |off, _| Ok(recs[(off / RECORD_STRIDE) as usize].clone()),
            recs.len(),
        )
    }

    #[test]
    fn domain_xml_escapes_and_boots_the_kernel_directly() {
        let mut opts = DomainOptions::new(
            "a<b>&'c\"",
            Path::new("/g"),
            GuestVariant::NoAcpi,
            Path::new("/d/x&y.qcow2"),
            DiskFormat::Qcow2,
            Path::new("/s/serial.log"),
        );
        opts.network = Some("net".into());
        opts.uuid = Some("2b1c7a36-5a3e-4a56-9d6b-3c1f3b0f0a01".into());
        let x = domain_xml(&opts);
        assert!(x.starts_with("<domain type='qemu'>"));
        assert!(x.contains("<name>a&lt;b&gt;&amp;&apos;c&quot;</name>"));
        assert!(x.contains("<uuid>2b1c7a36-5a3e-4a56-9d6b-3c1f3b0f0a01</uuid>"));
        assert!(x.contains("<initrd>/g/initrd-noacpi.gz</initrd>"));
        assert!(x.contains("<source file='/d/x&amp;y.qcow2'/>"));
        assert!(x.contains("<driver name='qemu' type='qcow2'/>"));
        assert!(x.contains("console=ttyS0 twinsite.verify=0 twinsite.write=1 twinsite.records=32"));
        assert!(x.contains("<source network='net'/>"));
        assert!(!x.contains("append="));
        assert!(!x.contains("guest_agent"));
        let mut ga = DomainOptions::new(
            "ga",
            Path::new("/g"),
            GuestVariant::GuestAgent,
            Path::new("/d/a.qcow2"),
            DiskFormat::Qcow2,
            Path::new("/s/serial.log"),
        );
        ga.data_disk = Some("/d/b.qcow2".into());
        let x = domain_xml(&ga);
        assert!(x.contains("<initrd>/g/initrd-ga.gz</initrd>"), "{x}");
        assert!(x.contains("name='org.qemu.guest_agent.0'"), "{x}");
        assert!(
            x.contains("<source file='/d/b.qcow2'/>\n      <target dev='vdb' bus='virtio'/>"),
            "{x}"
        );
    }

    #[test]
    fn record_layout_matches_the_guest() {
        let r = expected_record(7, 3, 32);
        assert_eq!(r.len(), RECORD_SIZE);
        assert!(r.starts_with(b"TWINSITE-RECORD v1 gen=7 idx=3 n=32\nTWINSITE-RECORD"));
        assert_eq!(check_record(&r, 3, 32).expect("valid"), 7);
    }

    #[test]
    fn complete_and_cut_generations_verify() {
        let s = verify(&disk(&[5, 5, 5, 5])).expect("complete");
        assert_eq!((s.generation, s.records, s.partial), (5, 4, 0));
        let s = verify(&disk(&[6, 6, 5, 5])).expect("cut");
        assert_eq!((s.generation, s.partial), (5, 2));
        let s = verify(&disk(&[1, 0, 0])).expect("first generation cut");
        assert_eq!((s.generation, s.partial), (0, 1));
        let s = verify(&disk(&[0, 0])).expect("blank");
        assert_eq!(s.generation, 0);
    }

    #[test]
    fn the_log_counts_records_up_to_its_first_gap_and_names_those_after_it() {
        let slots = 8u64;
        let mut disk = vec![0u8; (slots * LOG_STRIDE) as usize];
        let put = |disk: &mut Vec<u8>, k: u64| {
            let at = (k * LOG_STRIDE) as usize;
            disk[at..at + RECORD_SIZE].copy_from_slice(&expected_log_record(k));
        };
        for k in [0, 1, 2, 5] {
            put(&mut disk, k);
        }
        let read = |disk: &Vec<u8>| {
            let d = disk.clone();
            move |off: u64, len: usize| Ok(d[off as usize..off as usize + len].to_vec())
        };
        let (count, after) = verify_log(read(&disk), slots).expect("intact records");
        assert_eq!((count, after), (3, vec![5]));
        let r = expected_log_record(4);
        assert!(r.starts_with(b"TWINSITE-LOG v1 seq=4\nTWINSITE-LOG"));
        assert_eq!(r.len(), RECORD_SIZE);
        // Record 3 in slot 4: misplaced.
        let at = (4 * LOG_STRIDE) as usize;
        disk[at..at + RECORD_SIZE].copy_from_slice(&expected_log_record(3));
        assert_eq!(
            verify_log(read(&disk), slots).map_err(|e| e.slot).err(),
            Some(4)
        );
    }

    #[test]
    fn lost_torn_and_reordered_blocks_fail() {
        assert!(matches!(
            verify(&disk(&[5, 6, 6])),
            Err(PatternError::Order { index: 1, .. })
        ));
        assert!(matches!(
            verify(&disk(&[7, 5, 5])),
            Err(PatternError::Order { index: 1, .. })
        ));
        let mut recs = disk(&[4, 4, 4]);
        recs[2][100] ^= 1;
        assert!(matches!(
            verify(&recs),
            Err(PatternError::Checksum { index: 2 })
        ));
        let mut recs = disk(&[4, 4, 4]);
        recs.swap(0, 1);
        assert!(matches!(
            verify(&recs),
            Err(PatternError::Misplaced {
                index: 0,
                idx: 1,
                ..
            })
        ));
        let mut recs = disk(&[4, 4]);
        recs[1][..4].copy_from_slice(b"junk");
        assert!(matches!(
            verify(&recs),
            Err(PatternError::NotARecord { index: 1, .. })
        ));
    }
}
