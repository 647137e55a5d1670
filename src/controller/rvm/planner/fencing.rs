//! Fencing: when a VM running where it must not is powered off, and the backoff after a power
//! off that failed.

use std::time::Duration;

use super::input::{FenceCall, Input};
use crate::api::Job;
use crate::controller::observe::SiteView;
use crate::controller::vm_jobs::{is_failover, running_job};

/// A power off (fence) that failed is tried again after [`fence_backoff`]: from this long,
/// doubling with every failure in a row ...
pub const FENCE_BACKOFF_FIRST: Duration = Duration::from_secs(5);

/// ... up to this long.
pub const FENCE_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How the message of a FenceSource step starts when it failed while the source still runs the
/// VM: such a failure fails the failover (the VM is never started at the target then), although
/// the step is otherwise optional.
pub(super) const SOURCE_STILL_RUNS: &str = "the source still runs the VM";

/// How long to wait before powering a VM off again after `failures` failed attempts in a row:
/// 5 s, 10 s, 20 s, ... at most [`FENCE_BACKOFF_MAX`].
pub fn fence_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FENCE_BACKOFF_FIRST
        .saturating_mul(1u32 << doublings)
        .min(FENCE_BACKOFF_MAX)
}

/// The source of failover `job` runs the VM, as a listing taken after the job's latest step
/// ended (and after the current step started) shows it.
pub(super) fn source_runs(input: &Input, job: &Job) -> bool {
    let Some(source) = job.source_site.as_deref() else {
        return false;
    };
    let since = job
        .steps
        .iter()
        .filter_map(|s| s.end_time.as_ref().or(s.start_time.as_ref()))
        .map(|t| t.0)
        .max();
    // A listing from the same second as the last action may predate it.
    let since = since.and_then(|t| t.checked_add(jiff::SignedDuration::from_secs(1)).ok());
    input.view(source).vm_since(since).is_some_and(|v| v.runs())
}

/// A VM that runs at the site it must not (the VM runs at status.activeSite). Never while a
/// failover job runs (its steps own both sites then), and only on a listing taken after the
/// newest job ended, so the controller's own recent actions are never mistaken for drift.
pub(super) fn fence_needed(input: &Input) -> Option<FenceCall> {
    let st = input.status;
    let active = st.active_site.as_deref()?;
    if running_job(st).is_some_and(|ji| is_failover(st.jobs[ji].type_)) {
        return None;
    }
    let since = st.jobs.last().and_then(|j| {
        j.steps
            .iter()
            .filter_map(|s| s.end_time.as_ref().or(s.start_time.as_ref()))
            .chain(j.end_time.as_ref())
            .chain(j.start_time.as_ref())
            .map(|t| t.0)
            .max()
    });
    // A listing from the same second as our last action may predate it: ask for a later one.
    let since = since.and_then(|t| t.checked_add(jiff::SignedDuration::from_secs(1)).ok());
    let other = input.other(active);
    let view = input.view(other);
    let vm = view.vm_since(since)?;
    if !vm.runs() {
        return None;
    }
    let at = match view {
        SiteView::Reachable { fetched_at, .. } => fetched_at.as_second(),
        _ => input.now.as_second(),
    };
    Some(FenceCall {
        site: other.to_string(),
        vm: input.vm_name.to_string(),
        op_id: format!("{}-fence-{other}-{at}", input.uid),
    })
}
