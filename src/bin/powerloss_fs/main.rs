//! `twinsite-powerloss-fs BACKING MOUNTPOINT`: a FUSE filesystem that forgets, at a power cut,
//! every write that was not made durable (the approach of LazyFS). A test-support binary for
//! the crash suite (tests/crash_injection.rs); built with the `failpoints` feature only.
//!
//! It loads the durable tree from BACKING, mounts it at MOUNTPOINT, prints `mounted` and then
//! serves from memory (see `model.rs` for what becomes durable when). Its standard input takes
//! commands, one per line:
//! - `cut`: the power cut. The durable tree replaces BACKING, `cut` is printed, and the process
//!   exits without answering anything more: the mount is dead until the next start (which
//!   detaches it first) shows exactly what survived.
//! - end of input: unmounts and exits, writing nothing.
//!
//! Needs root (or `fusermount3`) for the mount.

mod backing;
mod model;

use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use model::{FsError, Model, Node};

/// The kernel may cache names and attributes this long: this process is the only writer.
const TTL: Duration = Duration::from_secs(1);

struct PowerLossFs {
    model: Arc<Mutex<Model>>,
    /// One fixed time for every inode: no invariant is about times.
    epoch: SystemTime,
}

fn errno(e: FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::Exists => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::Invalid => Errno::EINVAL,
    }
}

impl PowerLossFs {
    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        // A panic while holding the lock leaves the model as the last operation left it.
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr(&self, m: &Model, ino: u64) -> Result<FileAttr, FsError> {
        let node = m.node(ino).ok_or(FsError::NotFound)?;
        let (kind, size) = match node {
            Node::File { data, .. } => (FileType::RegularFile, data.len() as u64),
            Node::Dir { entries, .. } => (FileType::Directory, entries.len() as u64),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.epoch,
            mtime: self.epoch,
            ctime: self.epoch,
            crtime: self.epoch,
            kind,
            perm: node.mode() as u16,
            nlink: m.links(ino).max(1),
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn make(&self, parent: INodeNo, name: &OsStr, node: Node) -> Result<(u64, FileAttr), FsError> {
        let mut m = self.model();
        let ino = m.create(parent.0, name, node)?;
        Ok((ino, self.attr(&m, ino)?))
    }
}

impl Filesystem for PowerLossFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let m = self.model();
        match m.lookup(parent.0, name).and_then(|ino| self.attr(&m, ino)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let m = self.model();
        match self.attr(&m, ino.0) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut m = self.model();
        let res = (|| {
            if let Some(mode) = mode {
                m.chmod(ino.0, mode)?;
            }
            if let Some(size) = size {
                m.truncate(ino.0, size)?;
            }
            self.attr(&m, ino.0)
        })();
        match res {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let node = Node::Dir {
            entries: Default::default(),
            mode: mode & !umask & 0o7777,
        };
        match self.make(parent, name, node) {
            Ok((_, a)) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let node = Node::File {
            data: Vec::new(),
            mode: mode & !umask & 0o7777,
        };
        match self.make(parent, name, node) {
            Ok((ino, a)) => {
                self.model().opened(ino);
                reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty())
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.model().remove(parent.0, name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.model().remove(parent.0, name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self
            .model()
            .rename(parent.0, name, newparent.0, newname, no_replace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut m = self.model();
        match m
            .link(ino.0, newparent.0, newname)
            .and_then(|()| self.attr(&m, ino.0))
        {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut m = self.model();
        if m.node(ino.0).is_none() {
            reply.error(Errno::ENOENT);
            return;
        }
        m.opened(ino.0);
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.model().read(ino.0, offset, size) {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.model().write(ino.0, offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.model().released(ino.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.model().fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let m = self.model();
        let entries = match m.entries(ino.0) {
            Ok(e) => e,
            Err(e) => {
                reply.error(errno(e));
                return;
            }
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsStr::new(".").to_owned()),
            (ino.0, FileType::Directory, OsStr::new("..").to_owned()),
        ];
        for (name, child) in entries {
            let kind = match m.node(child) {
                Some(Node::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((child, kind, name));
        }
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.model().fsync(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Room enough for any test; the agent checks free space against its own limit.
        reply.statfs(1 << 24, 1 << 23, 1 << 23, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("twinsite-powerloss-fs: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [backing, mountpoint] = args.as_slice() else {
        return Err("usage: twinsite-powerloss-fs BACKING MOUNTPOINT".into());
    };
    // A mount left dead by an earlier cut goes first.
    if let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
        // SAFETY: a valid C string; the result is ignored (nothing was mounted, mostly).
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let tree = backing::load(backing).map_err(|e| format!("loading {}: {e}", backing.display()))?;
    let model = Arc::new(Mutex::new(Model::from_durable(tree)));
    let fs = PowerLossFs {
        model: model.clone(),
        epoch: SystemTime::now(),
    };
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName("twinsite-powerloss".into())];
    let session = fuser::Session::new(fs, mountpoint, &config)
        .map_err(|e| format!("mounting {}: {e}", mountpoint.display()))?;
    let bg = session
        .spawn()
        .map_err(|e| format!("serving {}: {e}", mountpoint.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "mounted")
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        match line.trim() {
            "cut" => {
                // The lock is never released: nothing is answered after the cut.
                let m = model.lock().unwrap_or_else(|p| p.into_inner());
                backing::save(backing, &m.durable_tree())
                    .map_err(|e| format!("saving {}: {e}", backing.display()))?;
                writeln!(out, "cut")
                    .and_then(|()| out.flush())
                    .map_err(|e| e.to_string())?;
                std::process::exit(0);
            }
            other => eprintln!("twinsite-powerloss-fs: unknown command {other:?}"),
        }
    }
    bg.umount_and_join().map_err(|e| e.to_string())
}
