//! The client against a real qemu-nbd serving a qcow2 image with a persistent dirty bitmap,
//! the way libvirt's pull-mode backups and the replica's images will be served.

use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use crate::replication::{BLOCK_SIZE, Bitmap, blocks_of_range};

const MIB: u64 = 1 << 20;
/// Larger than one 32 MiB request, so whole-disk reads and writes are split.
const SIZE: u64 = 40 * MIB;

/// (pattern, offset, length) written with qemu-io before serving.
const WRITES: &[(u8, u64, u64)] = &[
    (0xab, 64 * 1024, 4096),
    (0xcd, MIB, 128 * 1024),
    // Straddles the 32 MiB request boundary.
    (0x5a, 32 * MIB - 3 * 4096, 8 * 4096),
    // The very end of the disk.
    (0xef, SIZE - 512, 512),
];

fn bitmap_ctx() -> String {
    dirty_bitmap_context("b0")
}

/// Runs a qemu tool, failing the test (never skipping it) when the tool is missing.
fn run(program: &str, args: &[&str]) {
    let out = match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("{program} not found: install the Debian package qemu-utils")
        }
        Err(e) => panic!("running {program}: {e}"),
    };
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qcow2 image of `size` bytes with the enabled persistent bitmap b0 and `writes` applied
/// through qemu-io, which marks b0 like a running VM would.
fn image(dir: &Path, size: u64, writes: &[(u8, u64, u64)]) -> PathBuf {
    let img = dir.join("disk.qcow2");
    let s = img.to_str().expect("utf-8 temp path");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s, &size.to_string()],
    );
    run("qemu-img", &["bitmap", "--add", "--enable", s, "b0"]);
    for &(pattern, off, len) in writes {
        let cmd = format!("write -P {pattern:#x} {off} {len}");
        run("qemu-io", &["-f", "qcow2", "-c", &cmd, s]);
    }
    img
}

/// What the disk holds after WRITES.
fn expected_data() -> Vec<u8> {
    let mut d = vec![0u8; SIZE as usize];
    for &(pattern, off, len) in WRITES {
        d[off as usize..(off + len) as usize].fill(pattern);
    }
    d
}

fn written_blocks() -> Bitmap {
    blocks_of(SIZE, WRITES)
}

fn blocks_of(size: u64, writes: &[(u8, u64, u64)]) -> Bitmap {
    let mut b = Bitmap::new(size.div_ceil(BLOCK_SIZE));
    for &(_, off, len) in writes {
        for i in blocks_of_range(off, len) {
            b.set(i);
        }
    }
    b
}

/// A qemu-nbd process, killed on drop.
struct QemuNbd {
    child: Child,
    socket: PathBuf,
    // Held so the image outlives the server.
    _dir: tempfile::TempDir,
}

impl QemuNbd {
    /// Serves an image of SIZE with WRITES.
    fn serve(read_only: bool) -> Self {
        Self::serve_image(SIZE, WRITES, read_only)
    }

    fn serve_image(size: u64, writes: &[(u8, u64, u64)], read_only: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = image(dir.path(), size, writes);
        let mut args: Vec<String> = ["-f", "qcow2", "-B", "b0"].map(String::from).to_vec();
        if read_only {
            args.push("-r".into());
        }
        args.push(img.display().to_string());
        Self::start(dir, &args)
    }

    /// Runs qemu-nbd with `args` on a socket in `dir`.
    fn start(dir: tempfile::TempDir, args: &[String]) -> Self {
        let socket = dir.path().join("nbd.sock");
        let log = dir.path().join("qemu-nbd.log");
        let mut cmd = Command::new("qemu-nbd");
        cmd.arg(format!("--socket={}", socket.display()))
            .args(["--persistent", "--shared=4"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"));
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                panic!("qemu-nbd not found: install the Debian package qemu-utils")
            }
            Err(e) => panic!("starting qemu-nbd: {e}"),
        };
        let mut server = Self {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("qemu-nbd exited with {status}: {log}");
            }
            // --persistent: this probe connection does not end the server.
            if UnixStream::connect(&server.socket).is_ok() {
                return server;
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not listen in 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn connect(&self, export: &str, contexts: &[&str]) -> Result<Client, NbdError> {
        Client::connect(&self.socket, export, contexts)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn reads_data_and_holes_back_exactly() {
    let server = QemuNbd::serve(true);
    let ctx = bitmap_ctx();
    let mut c = server
        .connect("", &[&ctx, BASE_ALLOCATION])
        .expect("connect");
    assert_eq!(c.size(), SIZE);
    assert!(c.is_read_only());
    assert!(c.structured_replies());
    assert!(c.context_id(&ctx).is_some());
    assert_ne!(c.context_id(&ctx), c.context_id(BASE_ALLOCATION));

    let want = expected_data();
    let got = c.read(0, SIZE as usize).expect("whole-disk read");
    assert!(
        got == want,
        "whole-disk read differs from what qemu-io wrote"
    );

    // Unaligned reads across data and holes, and at the very end.
    for (off, len) in [
        (64 * 1024 + 4000, 200),
        (MIB - 100, 300),
        (SIZE - 1000, 1000),
    ] {
        let got = c.read(off, len).expect("read");
        assert_eq!(
            got,
            want[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }

    // Holes are zero-filled, not left as whatever the buffer held.
    let mut buf = vec![0xffu8; 2 * MIB as usize];
    c.read_at(0, &mut buf).expect("read_at");
    assert!(
        buf == want[..2 * MIB as usize],
        "read_at over holes left stale bytes"
    );

    // Reads past the end are refused before anything is sent; the connection stays usable.
    assert!(matches!(
        c.read(SIZE - 10, 20),
        Err(NbdError::InvalidRequest(_))
    ));
    assert!(matches!(
        c.write_at(0, &[1]),
        Err(NbdError::InvalidRequest(_))
    ));
    assert_eq!(c.read(MIB, 16).expect("read after refusals"), [0xcd; 16]);
    c.close().expect("close");
}

/// Not a multiple of BLOCK_SIZE (qemu rounds sizes to 512 bytes), larger than one request.
const ODD_SIZE: u64 = 40 * MIB + 7 * 512;

/// One distinct pattern per MiB of ODD_SIZE, some straddling MiB and block boundaries, and the
/// disk's last bytes.
fn odd_writes() -> Vec<(u8, u64, u64)> {
    let mut w: Vec<(u8, u64, u64)> = (0..40u64)
        .map(|i| (i as u8 + 1, i * MIB + (i * 20_000) % MIB, 96 * 1024))
        .collect();
    w.push((0x77, ODD_SIZE - 1536, 1536));
    w
}

fn contents(size: u64, writes: &[(u8, u64, u64)]) -> Vec<u8> {
    let mut d = vec![0u8; size as usize];
    for &(pattern, off, len) in writes {
        d[off as usize..(off + len) as usize].fill(pattern);
    }
    d
}

#[test]
fn runs_read_with_several_requests_in_flight_equal_the_image() {
    let writes = odd_writes();
    let server = QemuNbd::serve_image(ODD_SIZE, &writes, true);
    let want = contents(ODD_SIZE, &writes);
    let mut c = server.connect("", &[]).expect("connect");
    assert_eq!(c.size(), ODD_SIZE);
    let max = c.max_io();
    assert!(
        max < ODD_SIZE,
        "the disk must be larger than one request ({max})"
    );

    // The whole disk in one run: split at the server's maximum, the tail shorter than a block.
    let mut whole = vec![0xffu8; ODD_SIZE as usize];
    c.read_runs(&mut [(0, &mut whole[..])]).expect("whole disk");
    assert!(whole == want, "whole-disk run differs from the image");

    // More runs than requests in flight, of every size: single blocks, runs crossing MiB and
    // block boundaries, one longer than the server's maximum, and one ending at the disk's end.
    let mut ranges: Vec<(u64, u64)> = (0..20u64)
        .map(|i| (i * 2 * MIB + i * 4096, BLOCK_SIZE + i * 512))
        .collect();
    ranges.push((MIB / 2, max + 3 * BLOCK_SIZE));
    ranges.push((ODD_SIZE - 3 * BLOCK_SIZE - 100, 3 * BLOCK_SIZE + 100));
    assert!(ranges.len() > MAX_IN_FLIGHT);
    let mut bufs: Vec<Vec<u8>> = ranges
        .iter()
        .map(|&(_, l)| vec![0xff; l as usize])
        .collect();
    let mut runs: Vec<(u64, &mut [u8])> = ranges
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&(o, _), b)| (o, &mut b[..]))
        .collect();
    c.read_runs(&mut runs).expect("runs");
    for (&(o, l), got) in ranges.iter().zip(&bufs) {
        assert!(
            got[..] == want[o as usize..(o + l) as usize],
            "run {o}+{l} differs from the image"
        );
    }

    // A run past the end is refused before anything is sent.
    let mut tail = vec![0u8; 1024];
    let err = c
        .read_runs(&mut [(0, &mut whole[..4096]), (ODD_SIZE - 512, &mut tail[..])])
        .expect_err("past the end");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    assert_eq!(
        c.read(MIB, 16).expect("read after the refusal"),
        want[MIB as usize..][..16]
    );
    c.close().expect("close");
}

#[test]
fn a_failed_read_in_a_pipelined_batch_is_reported_for_its_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("disk.raw");
    let s = img.to_str().expect("utf-8 temp path");
    run("qemu-img", &["create", "-q", "-f", "raw", s, "4M"]);
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 0 4M", s]);
    // blkdebug fails every read that covers the sector at 1 MiB with EIO.
    let conf = dir.path().join("blkdebug.conf");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = \"none\"\niotype = \"read\"\nerrno = \"5\"\nsector = \"2048\"\n",
    )
    .expect("blkdebug config");
    let opts = format!(
        "driver=raw,file.driver=blkdebug,file.config={},file.image.driver=file,file.image.filename={s}",
        conf.display()
    );
    let server = QemuNbd::start(dir, &["-r".into(), "--image-opts".into(), opts]);
    let mut c = server.connect("", &[]).expect("connect");

    let (mut a, mut bad, mut b) = (
        vec![0u8; 256 << 10],
        vec![0u8; 128 << 10],
        vec![0u8; 512 << 10],
    );
    let bad_at = MIB - (64 << 10);
    let err = c
        .read_runs(&mut [
            (0, &mut a[..]),
            (bad_at, &mut bad[..]),
            (3 * MIB, &mut b[..]),
        ])
        .expect_err("the read covering 1 MiB fails");
    assert!(
        matches!(err, NbdError::Command { command: "NBD_CMD_READ", offset, len, errno: 5, .. }
            if offset == bad_at && len == 128 << 10),
        "{err:?}"
    );
    // The other reads of the batch completed, and the connection is still in step.
    assert!(
        a.iter().chain(&b).all(|x| *x == 0x3c),
        "the good runs were not read"
    );
    assert_eq!(
        c.read(2 * MIB, 4096).expect("read after the failure"),
        vec![0x3c; 4096]
    );
    c.close().expect("close");
}

#[test]
fn dirty_bitmap_gives_exactly_the_written_blocks() {
    let server = QemuNbd::serve(true);
    let ctx = bitmap_ctx();
    let mut c = server.connect("", &[&ctx]).expect("connect");

    assert_eq!(
        c.dirty_blocks(&ctx, SIZE, BLOCK_SIZE).expect("dirty"),
        written_blocks()
    );

    // The extents tile the disk exactly, and the dirty ones are exactly the written blocks.
    let ext = c.extents(&ctx, 0, SIZE).expect("extents");
    let mut at = 0;
    let mut dirty = Vec::new();
    for e in &ext {
        assert_eq!(e.offset, at, "extents not contiguous: {ext:?}");
        assert!(e.len > 0);
        assert!(e.flags == 0 || e.flags == STATE_DIRTY, "{ext:?}");
        if e.flags == STATE_DIRTY {
            dirty.push((e.offset, e.len));
        }
        at += e.len;
    }
    assert_eq!(at, SIZE);
    let mut want = Vec::new();
    for &(_, off, len) in WRITES {
        let r = blocks_of_range(off, len);
        want.push((r.start * BLOCK_SIZE, (r.end - r.start) * BLOCK_SIZE));
    }
    assert_eq!(dirty, want);

    // A range starting mid-extent is described from its own start to its own end.
    let sub = c.extents(&ctx, MIB + 4096, MIB).expect("sub-range extents");
    assert_eq!(
        sub,
        vec![
            Extent {
                offset: MIB + 4096,
                len: 128 * 1024 - 4096,
                flags: STATE_DIRTY
            },
            Extent {
                offset: MIB + 128 * 1024,
                len: MIB + 4096 - 128 * 1024,
                flags: 0
            },
        ]
    );
    // Smaller blocks than the bitmap's granularity: every block of a dirty cluster.
    let fine = c.dirty_blocks(&ctx, SIZE, 4096).expect("dirty 4 KiB");
    assert_eq!(fine.count(), written_blocks().count() * (BLOCK_SIZE / 4096));
    assert!(fine.get(64 * 1024 / 4096) && fine.get((MIB + 128 * 1024 - 1) / 4096));
    assert!(!fine.get(0));
}

#[test]
fn block_status_iterates_over_disks_larger_than_one_request() {
    // Block status is asked 1 GiB at a time; a sparse 3 GiB disk needs several requests.
    const GIB: u64 = 1 << 30;
    let size = 3 * GIB + 4096;
    let writes = [
        (1, 0, 4096),
        (2, GIB - 4096, 2 * BLOCK_SIZE),
        (3, 2 * GIB + 512 * 1024, 4096),
        (4, size - 4096, 4096),
    ];
    let server = QemuNbd::serve_image(size, &writes, true);
    let ctx = bitmap_ctx();
    let mut c = server
        .connect("", &[&ctx, BASE_ALLOCATION])
        .expect("connect");
    assert_eq!(c.size(), size);

    let want = blocks_of(size, &writes);
    assert_eq!(c.dirty_blocks(&ctx, size, BLOCK_SIZE).expect("dirty"), want);
    assert_eq!(
        c.allocated_blocks(size, BLOCK_SIZE).expect("allocated"),
        want
    );
    let ext = c.extents(&ctx, 0, size).expect("extents");
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), size);
    // Neighbours with equal flags are merged across request boundaries.
    assert!(ext.windows(2).all(|w| w[0].flags != w[1].flags), "{ext:?}");
    assert_eq!(c.read(GIB - 4096, 8192).expect("read"), vec![2; 8192]);
}

#[test]
fn base_allocation_shows_the_holes() {
    let server = QemuNbd::serve(true);
    let mut c = server.connect("", &[BASE_ALLOCATION]).expect("connect");

    // qcow2 allocates whole 64 KiB clusters: the allocated blocks are the written ones.
    assert_eq!(
        c.allocated_blocks(SIZE, BLOCK_SIZE).expect("allocated"),
        written_blocks()
    );

    let ext = c.extents(BASE_ALLOCATION, 0, SIZE).expect("extents");
    assert_eq!(ext.first().map(|e| e.flags), Some(STATE_HOLE | STATE_ZERO));
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), SIZE);
    let data = expected_data();
    for e in &ext {
        let bytes = &data[e.offset as usize..(e.offset + e.len) as usize];
        if e.flags & STATE_ZERO != 0 {
            assert!(
                bytes.iter().all(|b| *b == 0),
                "zero extent with data: {e:?}"
            );
        }
    }
    // Every written byte lies in an extent that is data.
    for &(_, off, len) in WRITES {
        let e = ext
            .iter()
            .find(|e| e.offset <= off && off < e.offset + e.len)
            .expect("extent of a write");
        assert_eq!(e.flags, 0, "write {off}+{len} in {e:?}");
        assert!(off + len <= e.offset + e.len, "write {off}+{len} in {e:?}");
    }
}

#[test]
fn write_flush_read_round_trips() {
    let server = QemuNbd::serve(false);
    let ctx = bitmap_ctx();
    let mut c = server.connect("", &[]).expect("connect");
    assert!(!c.is_read_only());
    assert_eq!(c.context_id(&ctx), None);

    // 33 MiB from an unaligned offset: split into two requests.
    let off = 2 * MIB + 512;
    let data: Vec<u8> = (0..33 * MIB).map(|i| (i % 251) as u8).collect();
    c.write_at(off, &data).expect("write");
    c.write_at(SIZE - 4096, &[0x11; 4096])
        .expect("write at the end");
    c.flush().expect("flush");
    assert!(c.read(off, data.len()).expect("read back") == data);
    c.close().expect("close");

    // A new connection sees the data, and the bitmap recorded the NBD writes.
    let mut c = server.connect("", &[&ctx]).expect("reconnect");
    assert!(c.read(off, data.len()).expect("read again") == data);
    assert_eq!(c.read(SIZE - 4096, 4096).expect("tail"), vec![0x11; 4096]);
    assert_eq!(c.read(off - 512, 512).expect("before"), vec![0; 512]);
    let dirty = c.dirty_blocks(&ctx, SIZE, BLOCK_SIZE).expect("dirty");
    let mut want = written_blocks();
    for r in [
        blocks_of_range(off, data.len() as u64),
        blocks_of_range(SIZE - 4096, 4096),
    ] {
        for i in r {
            want.set(i);
        }
    }
    assert_eq!(dirty, want);
}

#[test]
fn unknown_export_and_context_are_clear_errors() {
    let server = QemuNbd::serve(true);

    for contexts in [&[][..], &[BASE_ALLOCATION][..]] {
        let err = server
            .connect("nope", contexts)
            .expect_err("unknown export");
        assert!(
            matches!(&err, NbdError::UnknownExport { export, .. } if export == "nope"),
            "{err:?}"
        );
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }

    let err = server
        .connect("", &[BASE_ALLOCATION, "qemu:dirty-bitmap:nope"])
        .expect_err("unknown context");
    assert!(
        matches!(&err, NbdError::MissingMetaContext(c) if c == "qemu:dirty-bitmap:nope"),
        "{err:?}"
    );
    assert!(err.to_string().contains("qemu:dirty-bitmap:nope"), "{err}");

    // A context not negotiated on this connection is refused locally.
    let mut c = server.connect("", &[BASE_ALLOCATION]).expect("connect");
    let err = c
        .extents(&bitmap_ctx(), 0, SIZE)
        .expect_err("not negotiated");
    assert!(matches!(err, NbdError::ContextNotNegotiated(_)), "{err:?}");
    assert!(c.extents(BASE_ALLOCATION, 0, SIZE).is_ok());
}

/// A server's reply to (cookie, offset, length) of a request.
type Script = fn(u64, u64, u32) -> Vec<u8>;

/// A scripted server on the other end of a socket pair: negotiates a 1 MiB export with
/// structured replies, then answers the first request with `reply(cookie, offset, len)`.
fn fake_server(reply: Script) -> Client {
    Client::handshake(fake_socket(true, reply), "", &[]).expect("fake handshake")
}

/// The client's end of a scripted server; `structured`: whether structured replies are
/// accepted (else refused with NBD_REP_ERR_UNSUP).
fn fake_socket(structured: bool, reply: Script) -> UnixStream {
    use std::io::{Read, Write};
    fake_socket_serving(structured, move |server| {
        let mut req = [0u8; 28];
        server.read_exact(&mut req)?;
        let (cookie, offset, len) = request_of(&req);
        server.write_all(&reply(cookie, offset, len))
    })
}

/// (cookie, offset, length) of an encoded request.
fn request_of(req: &[u8; 28]) -> (u64, u64, u32) {
    let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
    let offset = u64::from_be_bytes(req[16..24].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(req[24..28].try_into().unwrap_or_default());
    (cookie, offset, len)
}

/// The client's end of a scripted server that negotiates as [`fake_socket`] and then runs
/// `serve` on its end.
fn fake_socket_serving(
    structured: bool,
    serve: impl FnOnce(&mut UnixStream) -> std::io::Result<()> + Send + 'static,
) -> UnixStream {
    use std::io::{Read, Write};
    let (client, mut server) = UnixStream::pair().expect("socket pair");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    std::thread::spawn(move || -> std::io::Result<()> {
        let mut greeting = proto::NBDMAGIC.to_be_bytes().to_vec();
        greeting.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        greeting.extend_from_slice(&3u16.to_be_bytes());
        server.write_all(&greeting)?;
        let mut flags = [0u8; 4];
        server.read_exact(&mut flags)?;
        let opt_reply = |opt: u32, ty: u32, data: &[u8]| {
            let mut r = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&ty.to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(data);
            r
        };
        for _ in 0..2 {
            let mut h = [0u8; 16];
            server.read_exact(&mut h)?;
            let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            std::io::copy(
                &mut (&mut server).take(u64::from(len)),
                &mut std::io::sink(),
            )?;
            if opt == proto::OPT_STRUCTURED_REPLY && !structured {
                server.write_all(&opt_reply(opt, proto::REP_ERR_UNSUP, b"old server"))?;
                continue;
            }
            if opt == proto::OPT_GO {
                let mut info = vec![0, 0];
                info.extend_from_slice(&MIB.to_be_bytes());
                info.extend_from_slice(
                    &(proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH).to_be_bytes(),
                );
                server.write_all(&opt_reply(opt, proto::REP_INFO, &info))?;
            }
            server.write_all(&opt_reply(opt, proto::REP_ACK, &[]))?;
        }
        serve(&mut server)?;
        // Hold the socket open until the client is done.
        let _ = server.read(&mut [0u8; 1]);
        Ok(())
    });
    client
}

fn chunk(flags: u16, ty: u16, cookie: u64, payload: &[u8], claimed_len: Option<u32>) -> Vec<u8> {
    let mut c = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    c.extend_from_slice(&flags.to_be_bytes());
    c.extend_from_slice(&ty.to_be_bytes());
    c.extend_from_slice(&cookie.to_be_bytes());
    c.extend_from_slice(&claimed_len.unwrap_or(payload.len() as u32).to_be_bytes());
    c.extend_from_slice(payload);
    c
}

#[test]
fn hostile_replies_break_the_connection_without_panics() {
    let cases: [(&str, Script); 5] = [
        ("wrong cookie", |cookie, offset, len| {
            let mut p = offset.to_be_bytes().to_vec();
            p.resize(8 + len as usize, 1);
            chunk(1, proto::REPLY_TYPE_OFFSET_DATA, cookie + 1, &p, None)
        }),
        ("huge length", |cookie, _, _| {
            chunk(
                1,
                proto::REPLY_TYPE_OFFSET_DATA,
                cookie,
                &[],
                Some(u32::MAX),
            )
        }),
        ("data outside the request", |cookie, offset, len| {
            let mut p = (offset + 4096).to_be_bytes().to_vec();
            p.resize(8 + len as usize, 1);
            chunk(1, proto::REPLY_TYPE_OFFSET_DATA, cookie, &p, None)
        }),
        ("gap", |cookie, offset, _| {
            let mut p = offset.to_be_bytes().to_vec();
            p.resize(8 + 512, 1);
            chunk(1, proto::REPLY_TYPE_OFFSET_DATA, cookie, &p, None)
        }),
        ("wrong magic", |cookie, _, _| {
            let mut c = chunk(1, proto::REPLY_TYPE_NONE, cookie, &[], None);
            c[0] ^= 0x80;
            c
        }),
    ];
    for (name, reply) in cases {
        let mut c = fake_server(reply);
        assert_eq!(c.size(), MIB);
        let err = c.read(0, 4096).expect_err(name);
        assert!(matches!(err, NbdError::Protocol(_)), "{name}: {err:?}");
        let err = c.read(0, 4096).expect_err(name);
        assert!(matches!(err, NbdError::Broken), "{name}: {err:?}");
    }

    // An error chunk is the command's failure, reported with the server's message.
    let mut c = fake_server(|cookie, _, _| {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4u16.to_be_bytes());
        p.extend_from_slice(b"disk");
        chunk(1, proto::REPLY_TYPE_ERROR, cookie, &p, None)
    });
    let err = c.read(0, 4096).expect_err("error chunk");
    assert!(
        matches!(&err, NbdError::Command { errno: 5, message, .. } if message == "disk"),
        "{err:?}"
    );
}

#[test]
fn replies_to_reads_in_flight_match_by_cookie_in_any_order_and_chunking() {
    use std::io::{Read, Write};
    const RUNS: usize = 4;
    let sock = fake_socket_serving(true, |server| {
        let mut reqs = Vec::new();
        for _ in 0..RUNS {
            let mut req = [0u8; 28];
            server.read_exact(&mut req)?;
            reqs.push(request_of(&req));
        }
        // Every READ answered in two chunks, the last requests first, their chunks
        // interleaved: the second half as data, then the first half as a hole.
        for &(cookie, offset, len) in reqs.iter().rev() {
            let half = u64::from(len / 2);
            let mut p = (offset + half).to_be_bytes().to_vec();
            p.resize(8 + half as usize, (offset / 4096) as u8);
            server.write_all(&chunk(0, proto::REPLY_TYPE_OFFSET_DATA, cookie, &p, None))?;
        }
        for &(cookie, offset, len) in &reqs {
            let mut p = offset.to_be_bytes().to_vec();
            p.extend_from_slice(&(len / 2).to_be_bytes());
            server.write_all(&chunk(1, proto::REPLY_TYPE_OFFSET_HOLE, cookie, &p, None))?;
        }
        Ok(())
    });
    let mut c = Client::handshake(sock, "", &[]).expect("fake handshake");
    let mut bufs = vec![vec![0xffu8; 4096]; RUNS];
    let mut runs: Vec<(u64, &mut [u8])> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| (4096 * (2 * i as u64 + 1), &mut b[..]))
        .collect();
    c.read_runs(&mut runs).expect("reads answered out of order");
    for (i, b) in bufs.iter().enumerate() {
        let mark = (2 * i + 1) as u8;
        assert!(
            b[..2048].iter().all(|x| *x == 0) && b[2048..].iter().all(|x| *x == mark),
            "run {i} holds the wrong bytes"
        );
    }
}

#[test]
fn simple_replies_from_an_old_server() {
    let mut c = Client::handshake(
        fake_socket(false, |cookie, _, len| {
            let mut r = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&0u32.to_be_bytes());
            r.extend_from_slice(&cookie.to_be_bytes());
            r.resize(16 + len as usize, 0x42);
            r
        }),
        "",
        &[],
    )
    .expect("handshake without structured replies");
    assert!(!c.structured_replies());
    assert_eq!(c.read(4096, 4096).expect("simple read"), vec![0x42; 4096]);

    // Block status needs structured replies: asking for a context fails the handshake.
    let err = Client::handshake(
        fake_socket(false, |_, _, _| Vec::new()),
        "",
        &[BASE_ALLOCATION],
    )
    .expect_err("contexts without structured replies");
    assert!(
        matches!(&err, NbdError::Refused { option: "NBD_OPT_STRUCTURED_REPLY", message, .. } if message == "old server"),
        "{err:?}"
    );
}
