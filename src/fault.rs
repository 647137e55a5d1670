//! Failpoints: named crash points at every durable step of the data path, for the
//! crash-injection suite (`tests/crash_injection.rs`).
//!
//! Compiled in only with the cargo feature `failpoints` (test builds; release builds leave it
//! off, and then [`hit`] is an empty inline function). Armed through the agent's environment:
//! `TWINSITE_FAILPOINT=NAME` kills the process with SIGKILL the first time the data path
//! reaches `NAME`; `NAME@N` on the N-th time. The process dies as a power cut would leave it,
//! minus the page cache: no destructor runs, no buffer is flushed, nothing is answered.

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
    // Replica: failover to an older point, commit.
    "failover.intent",
    "failover.rollback",
    "failover.rolled-back",
    "commit.points",
    // Answers of operations without a VM to record them in.
    "op.record",
];

/// Crashes the process here when the environment armed failpoint `name`.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::Mutex;
    use std::sync::OnceLock;
    static ARMED: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: Mutex<u64> = Mutex::new(0);
    let armed = ARMED.get_or_init(|| {
        let v = std::env::var("TWINSITE_FAILPOINT").ok()?;
        match v.split_once('@') {
            Some((n, k)) => Some((n.to_string(), k.parse().ok()?)),
            None => Some((v, 1)),
        }
    });
    let Some((want, nth)) = armed else {
        return;
    };
    if want != name {
        return;
    }
    let mut hits = HITS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    *hits += 1;
    if *hits == *nth {
        eprintln!("failpoint {name} reached: killing the process");
        // SAFETY: sends SIGKILL to this process; nothing after it runs.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Crashes the process here when the environment armed failpoint `name` (not compiled in).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
