//! Failpoints: named crash points at every durable step of the data path, for the
//! crash-injection suite (`tests/crash_injection.rs`).
//!
//! Compiled in only with the cargo feature `failpoints` (test builds; release builds leave it
//! off, and then [`hit`] is an empty inline function). Armed through the agent's environment:
//! `TWINSITE_FAILPOINT=NAME` kills the process with SIGKILL the first time the data path
//! reaches `NAME`; `NAME@N` on the N-th time. The process dies as a power cut would leave it,
//! minus the page cache: no destructor runs, no buffer is flushed, nothing is answered.
//! `NAME:error` (or `NAME:error@N`) makes the step fail with an I/O error instead, where the
//! code checks with [`fail`] (a disk error, not a crash: the process goes on).
//!
//! The environment switches of the agent's other fault-injection hooks (`TWINSITE_FAULT_*`) are
//! read through [`switch`], which is compiled in only with the same feature.

/// Every failpoint, in the order the data path reaches them (the suite iterates this list).
pub const ALL: &[&str] = &[
    // Source: a guest write and a cycle.
    "guest.journal",
    "guest.data",
    "source.seal",
    "source.spool",
    "source.inflight",
    "source.ack",
    // Replica: a cycle arrives and becomes a recovery point.
    "replica.begin",
    "replica.stage",
    "replica.undo",
    "replica.point",
    "replica.apply",
    "replica.applied",
    "replica.retention",
    "replica.bulk-commit",
    // Replica: points received during a drill, applied after it.
    "replica.deferred-undo",
    // Replica: failover to an older point, commit.
    "failover.intent",
    "failover.rollback",
    "failover.rolled-back",
    "commit.points",
    // Answers of operations without a VM to record them in.
    "op.record",
];

/// Failpoints of the libvirt runtime's data path only. The crash suite drives builtin VMs and
/// never reaches them; the real-VM tests arm them.
pub const LIBVIRT: &[&str] = &[
    // Source: a libvirt pull backup is open (its job and NBD server live in libvirtd).
    "source.export",
    // Target: a failed-over domain was started paused, its failover checkpoint not made yet.
    "failover.boot",
    // Source: a consistent cut paused its domains, their exports not open yet.
    "cut.paused",
];

/// Failpoints armed only as `NAME:error` (an I/O error, not a crash): steps whose crash the
/// failpoints above already cover.
pub const ERRORS: &[&str] = &[
    // Any save of a VM's `vm.json`.
    "meta.save",
];

/// How a failpoint is armed.
#[cfg(feature = "failpoints")]
struct Armed {
    name: String,
    nth: u64,
    error: bool,
}

#[cfg(feature = "failpoints")]
fn armed() -> Option<&'static Armed> {
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let v = std::env::var("TWINSITE_FAILPOINT").ok()?;
            let (spec, nth) = match v.split_once('@') {
                Some((n, k)) => (n.to_string(), k.parse().ok()?),
                None => (v, 1),
            };
            let (name, error) = match spec.strip_suffix(":error") {
                Some(n) => (n.to_string(), true),
                None => (spec, false),
            };
            Some(Armed { name, nth, error })
        })
        .as_ref()
}

/// True when this is the armed failpoint's N-th hit.
#[cfg(feature = "failpoints")]
fn triggered(name: &str) -> Option<&'static Armed> {
    use std::sync::Mutex;
    static HITS: Mutex<u64> = Mutex::new(0);
    let a = armed().filter(|a| a.name == name)?;
    let mut hits = HITS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *hits += 1;
    (*hits == a.nth).then_some(a)
}

/// Crashes the process here when the environment armed failpoint `name`.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if triggered(name).is_some() {
        kill(name);
    }
}

/// Like [`hit`], and where the failpoint is armed with `:error`, fails the step instead.
#[cfg(feature = "failpoints")]
pub fn fail(name: &str) -> std::io::Result<()> {
    match triggered(name) {
        Some(a) if a.error => Err(std::io::Error::other(format!(
            "injected I/O error at {name}"
        ))),
        Some(_) => {
            kill(name);
            Ok(())
        }
        None => Ok(()),
    }
}

#[cfg(feature = "failpoints")]
fn kill(name: &str) {
    eprintln!("failpoint {name} reached: killing the process");
    // SAFETY: sends SIGKILL to this process; nothing after it runs.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// Crashes the process here when the environment armed failpoint `name` (not compiled in).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Fails the step here when armed (not compiled in).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn fail(_name: &str) -> std::io::Result<()> {
    Ok(())
}

/// The value of the test-only environment switch `name` (`TWINSITE_FAULT_*`, docs/agent.md):
/// the fault-injection hooks of the agent read their switches only through this. Without the
/// feature it is `None` and the environment is never read, so the hooks compile to nothing.
#[cfg(feature = "failpoints")]
pub fn switch(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Not compiled in: no environment switch is ever on.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn switch(_name: &str) -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::switch;

    /// PATH is set wherever tests run: the switch reads it only when the hooks are compiled in.
    #[test]
    fn environment_switches_are_read_only_with_the_feature() {
        #[cfg(feature = "failpoints")]
        assert!(switch("PATH").is_some());
        #[cfg(not(feature = "failpoints"))]
        assert_eq!(switch("PATH"), None);
    }
}
