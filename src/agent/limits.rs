//! What a peer may make this site keep: disks per VM, bytes staged in one cycle, recovery
//! points per VM, and commit times no later than this site's clock. Each is checked before
//! anything is written, so a refused request changes nothing (a 4xx naming what was over).

use jiff::Timestamp;

use super::replica::{BeginCycle, CommitCycle};
use super::store::VmRec;
use super::{ApiError, ApiResult, ErrorKind};
use crate::replication::retention;
use crate::site::DiskSpec;

/// `--max-disks-per-vm`.
pub const DEFAULT_MAX_DISKS: usize = 64;
/// `--max-points-per-vm`: a second's interval keeps 3,600 points of the last hour and one an
/// hour for a year of retention beside them; this leaves room for app-consistent points too.
pub const DEFAULT_MAX_POINTS: usize = 20_000;
/// `--max-clock-skew-seconds`.
pub const DEFAULT_MAX_CLOCK_SKEW_SECONDS: u64 = 300;

/// The agent's limits on what peers send.
#[derive(Clone, Copy, Debug)]
pub struct PeerLimits {
    pub max_disks: usize,
    pub max_points: usize,
    /// How far a commit's `time` may be ahead of this site's clock.
    pub max_clock_skew_seconds: u64,
}

impl Default for PeerLimits {
    fn default() -> Self {
        Self {
            max_disks: DEFAULT_MAX_DISKS,
            max_points: DEFAULT_MAX_POINTS,
            max_clock_skew_seconds: DEFAULT_MAX_CLOCK_SKEW_SECONDS,
        }
    }
}

impl PeerLimits {
    /// A `begin` replicates at most `max_disks` disks.
    pub fn check_begin(&self, b: &BeginCycle) -> ApiResult<()> {
        if b.disks.len() > self.max_disks {
            return Err(ApiError::bad(format!(
                "disks holds {} disks, at most {} are allowed (--max-disks-per-vm)",
                b.disks.len(),
                self.max_disks
            )));
        }
        Ok(())
    }

    /// A commit's `time` is no later than `now` plus the allowed skew: a point from the future
    /// would outlive its retention and report a recovery point objective never met.
    pub fn check_commit_time(&self, c: &CommitCycle, now: Timestamp) -> ApiResult<()> {
        let skew = i64::try_from(self.max_clock_skew_seconds).unwrap_or(i64::MAX);
        let latest = now.as_second().saturating_add(skew);
        if c.time.as_second() > latest {
            return Err(ApiError::bad(format!(
                "time {} is later than this site's clock ({now}) plus {} s \
                 (--max-clock-skew-seconds)",
                c.time, self.max_clock_skew_seconds
            )));
        }
        Ok(())
    }
}

/// The most a cycle may stage for a VM with `disks`: every block twice (a batch sent again
/// after a lost answer is staged again), frame headers included.
pub fn staging_allowance(disks: &[DiskSpec]) -> u64 {
    let total: u64 = disks.iter().map(|d| d.size_bytes).sum();
    total.saturating_mul(2).saturating_add(1 << 20)
}

impl VmRec {
    /// Refuses a batch of `len` bytes that would take cycle `cycle`'s staging past
    /// [`staging_allowance`] (413). Bulk batches are written into the images, not staged.
    pub(super) fn check_staging(&self, cycle: &str, bulk: bool, len: u64) -> ApiResult<()> {
        if bulk {
            return Ok(());
        }
        let path = super::replica::staging(&self.dir, cycle);
        let staged = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(ApiError::io(e)),
        };
        let allowed = staging_allowance(&self.meta.disks);
        if staged.saturating_add(len) > allowed {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "staging of cycle {cycle} of {} would hold {} bytes, more than the {allowed} \
                     allowed (twice the VM's disks); begin the cycle again",
                    self.meta.name,
                    staged.saturating_add(len)
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a commit whose point would leave this VM more than `max` recovery points
    /// after retention (while a drill defers retention, every point counts). A commit the
    /// replica already made is answered again, never refused.
    pub(super) fn check_points(
        &self,
        c: &CommitCycle,
        max: usize,
        now: Timestamp,
    ) -> ApiResult<()> {
        let Some(i) = &self.meta.inbound else {
            return Ok(());
        };
        if c.bulk
            || i.last_cycle
                .as_ref()
                .is_some_and(|(id, _)| *id == c.cycle_id)
        {
            return Ok(());
        }
        let mut infos: Vec<retention::PointInfo> = i
            .rps
            .iter()
            .map(|p| retention::PointInfo {
                seq: p.seq,
                time: p.time,
                kind: p.kind,
            })
            .collect();
        infos.push(retention::PointInfo {
            seq: i.next_seq.max(1),
            time: c.time,
            kind: c.kind,
        });
        let kept = if self.deferring() {
            infos.len()
        } else {
            infos.len() - retention::plan(&infos, now, i.retention_hours).delete.len()
        };
        if kept > max {
            return Err(ApiError::conflict(format!(
                "recovery points: VM {} would keep {kept} points here, at most {max} are \
                 allowed (--max-points-per-vm); the commit of cycle {} is refused",
                self.meta.name, c.cycle_id
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::RecoveryPointKind;

    fn commit(time: &str) -> CommitCycle {
        CommitCycle {
            cycle_id: "c1".into(),
            bulk: false,
            time: time.parse().expect("a time"),
            kind: RecoveryPointKind::CrashConsistent,
            cut_id: None,
        }
    }

    #[test]
    fn a_commit_time_ahead_of_the_clock_beyond_the_skew_is_refused() {
        let l = PeerLimits::default();
        let now: Timestamp = "2026-12-01T12:00:00Z".parse().expect("a time");
        assert!(
            l.check_commit_time(&commit("2026-12-01T12:05:00Z"), now)
                .is_ok()
        );
        assert!(
            l.check_commit_time(&commit("2020-01-01T00:00:00Z"), now)
                .is_ok()
        );
        let e = l
            .check_commit_time(&commit("2026-12-01T12:05:01Z"), now)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.starts_with("time "), "{}", e.message);
    }

    #[test]
    fn staging_allows_every_block_twice() {
        let d = |n: u64| DiskSpec {
            name: "d".into(),
            size_bytes: n,
            format: None,
        };
        assert_eq!(staging_allowance(&[d(10), d(20)]), 60 + (1 << 20));
        assert_eq!(staging_allowance(&[d(u64::MAX)]), u64::MAX);
    }
}
