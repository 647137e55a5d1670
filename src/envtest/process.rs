//! Child processes that never outlive the process that started them.
//!
//! Children are spawned from one long-lived thread with `PR_SET_PDEATHSIG`, so the kernel kills
//! them if this process dies (even by SIGKILL); the signal fires when the *spawning thread* ends,
//! which is why the spawning thread must never end. Children still running at a normal exit
//! (a test binary finishing, on panic too) are stopped by an `atexit` hook.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::EnvtestError;

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("envtest-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the thread alive even if every sender is gone.
                loop {
                    std::thread::park();
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the envtest spawner thread: {e}"));
        // SAFETY: `stop_all_at_exit` is a plain extern "C" fn with no arguments.
        unsafe {
            libc::atexit(stop_all_at_exit);
        }
        Mutex::new(tx)
    })
}

fn live_pids() -> &'static Mutex<Vec<u32>> {
    static PIDS: OnceLock<Mutex<Vec<u32>>> = OnceLock::new();
    PIDS.get_or_init(|| Mutex::new(Vec::new()))
}

fn dirs_to_remove() -> &'static Mutex<Vec<std::path::PathBuf>> {
    static DIRS: OnceLock<Mutex<Vec<std::path::PathBuf>>> = OnceLock::new();
    DIRS.get_or_init(|| Mutex::new(Vec::new()))
}

fn pid_file_dirs() -> &'static Mutex<Vec<PathBuf>> {
    static DIRS: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    DIRS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Kills, when the process exits normally, every process named by a `*.pid` file in `dir`.
/// For daemons that detach (libvirtd, virtlogd, the QEMU processes libvirtd starts): they are
/// not our children, so only their pid files say what to stop, and they say it as of the exit.
pub fn kill_pid_files_at_exit(dir: &Path) {
    spawner();
    if let Ok(mut dirs) = pid_file_dirs().lock() {
        dirs.push(dir.to_path_buf());
    }
}

/// Undoes [`kill_pid_files_at_exit`] once the daemons are stopped.
pub fn forget_pid_files_at_exit(dir: &Path) {
    if let Ok(mut dirs) = pid_file_dirs().lock() {
        dirs.retain(|d| d != dir);
    }
}

/// The pids in the `*.pid` files directly in `dir`.
pub fn pids_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pid"))
        .filter_map(|p| read_pid_file(&p))
        .collect()
}

/// The pid in a pid file, if it holds one.
pub fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is a live process (not gone, not a zombie) whose name starts with `comm`.
/// The name check keeps a stale pid file from pointing us at an unrelated process.
pub fn is_running(pid: u32, comm: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Detached daemons are reparented to pid 1, which may never reap them: a zombie is gone.
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.trim_start().chars().next());
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    state.is_some_and(|s| s != 'Z') && name.starts_with(comm)
}

/// Stops a process that is not our child: SIGTERM, then SIGKILL after `grace`.
pub fn stop_detached(pid: u32, comm: &str, grace: Duration) {
    if !is_running(pid, comm) {
        return;
    }
    // SAFETY: signalling a process we started (checked by name above).
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !is_running(pid, comm) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while is_running(pid, comm) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes `dir` when the process exits normally (after its children are stopped).
pub fn remove_at_exit(dir: &Path) {
    spawner();
    if let Ok(mut dirs) = dirs_to_remove().lock() {
        dirs.push(dir.to_path_buf());
    }
}

extern "C" fn stop_all_at_exit() {
    let pids = match live_pids().lock() {
        Ok(p) => p.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let dirs = match pid_file_dirs().lock() {
        Ok(d) => d.clone(),
        Err(d) => d.into_inner().clone(),
    };
    let detached = dirs.iter().flat_map(|d| pids_in(d));
    for pid in pids.into_iter().chain(detached) {
        // SAFETY: sending a signal to a process we started.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    // Give the kernel a moment to release the children's files before removing their dirs.
    std::thread::sleep(Duration::from_millis(200));
    if let Ok(dirs) = dirs_to_remove().lock() {
        for d in dirs.iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A running child process, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct ManagedChild {
    name: String,
    child: Child,
}

impl ManagedChild {
    /// Starts `cmd` with its output appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self, EnvtestError> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| EnvtestError::io(log, e))?;
        let err = out.try_clone().map_err(|e| EnvtestError::io(log, e))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (tx, rx) = mpsc::channel();
        spawner()
            .lock()
            .map_err(|_| EnvtestError::Spawn(name.into(), "spawner lock poisoned".into()))?
            .send((cmd, tx))
            .map_err(|_| EnvtestError::Spawn(name.into(), "spawner thread gone".into()))?;
        let child = rx
            .recv()
            .map_err(|_| EnvtestError::Spawn(name.into(), "spawner thread gone".into()))?
            .map_err(|e| EnvtestError::Spawn(name.into(), e.to_string()))?;
        if let Ok(mut pids) = live_pids().lock() {
            pids.push(child.id());
        }
        Ok(Self {
            name: name.into(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns an error if the process has already exited.
    pub fn check_running(&mut self) -> Result<(), EnvtestError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(EnvtestError::Exited(self.name.clone(), status.to_string())),
            _ => Ok(()),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let pid = self.child.id() as i32;
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.forget();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.forget();
    }

    fn forget(&self) {
        let pid = self.child.id();
        if let Ok(mut pids) = live_pids().lock() {
            pids.retain(|p| *p != pid);
        }
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}
