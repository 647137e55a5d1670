//! Fencing: when a VM running where it must not is powered off, and the backoff after a power
//! off that failed.

use std::time::Duration;

use super::input::{FenceCall, Input};
use crate::api::{Job, ReplicatedVMStatus, StepState};
use crate::controller::observe::{Direction, ObservedReplicationState, ObservedVm, SiteView};
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

/// How the message of a FenceSource step starts while it waits for a source that does not
/// answer: the VM may run there, so it is not started at the target.
pub(super) const SOURCE_UNCONFIRMED: &str = "waiting: the VM may still run at";

/// The message of a FenceSource step whose source did not answer its power off: what the
/// failover waits for, and the two ways on.
pub(super) fn source_unconfirmed(source: &str, target: &str, why: &str) -> String {
    format!(
        "{SOURCE_UNCONFIRMED} {source}, which does not confirm it off ({why}); it is not started \
         at {target} until then. Fix Site {source}'s agent URL or token Secret, or, if the site \
         is gone, declare it lost: kubectl patch site {source} --type merge -p \
         '{{\"spec\":{{\"fence\":\"Lost\"}}}}'"
    )
}

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

/// How the message of a source step skipped because its site is declared lost starts.
pub(super) const BY_DECLARATION: &str = "skipped by declaration";

/// The time a listing must be taken at or after to show the effect of the controller's newest
/// action (a step, a job's end, a fence). Every job counts, not the newest only: a fence records
/// itself in the failover that left the VM behind, which may be older than the newest job (a
/// commit). A listing from the same second as the action may predate it: one second later.
pub(super) fn after_last_action(st: &ReplicatedVMStatus) -> Option<jiff::Timestamp> {
    st.jobs
        .iter()
        .flat_map(|j| {
            j.steps
                .iter()
                .filter_map(|s| s.end_time.as_ref().or(s.start_time.as_ref()))
                .chain(j.end_time.as_ref())
                .chain(j.start_time.as_ref())
        })
        .map(|t| t.0)
        .max()
        .and_then(|t| t.checked_add(jiff::SignedDuration::from_secs(1)).ok())
}

/// What runs where it must not.
pub(super) enum Drift {
    /// Nothing, or nothing seen on a listing newer than the controller's last action.
    None,
    /// Power it off: its copy holds nothing the active one lacks, or its site was given up by
    /// declaration.
    Fence(FenceCall),
    /// The VM runs at both sites and the other copy may hold writes the active one lacks: no
    /// copy is picked by the controller; the message says what to do.
    SplitBrain(String),
}

/// A VM that runs at the site it must not (the VM runs at `st.activeSite`). Never while a
/// failover job runs (its steps own both sites then), and only on a listing taken after the
/// controller's newest action, so its own recent actions are never mistaken for drift.
pub(super) fn drift(input: &Input, st: &ReplicatedVMStatus) -> Drift {
    let Some(active) = st.active_site.as_deref() else {
        return Drift::None;
    };
    if running_job(st).is_some_and(|ji| is_failover(st.jobs[ji].type_)) {
        return Drift::None;
    }
    let since = after_last_action(st);
    let other = input.other(active);
    let view = input.view(other);
    let Some(vm) = view.vm_since(since).filter(|v| v.runs()) else {
        return Drift::None;
    };
    let active_runs = input.view(active).vm_since(since).is_some_and(|v| v.runs());
    if active_runs && let Some(why) = may_be_newer(st, other, active, vm) {
        return Drift::SplitBrain(format!(
            "VM {} runs at both {active} and {other}. It is kept at {active} \
             (status.activeSite{}), but the copy at {other} may hold writes {active} lacks \
             ({why}), so twinsite powers neither off: save what the copy at {other} holds if it \
             matters, then power it off there (or declare {other} lost with spec.fence: Lost on \
             its Site); twinsite then protects the copy at {active} again",
            input.vm_name,
            if input.status.active_site.is_none() {
                ", from spec.activeSite"
            } else {
                ""
            }
        ));
    }
    let at = match view {
        SiteView::Reachable { fetched_at, .. } => fetched_at.as_second(),
        _ => input.now.as_second(),
    };
    Drift::Fence(FenceCall {
        site: other.to_string(),
        vm: input.vm_name.to_string(),
        op_id: format!("{}-fence-{other}-{at}", input.uid),
    })
}

/// Why the copy running at `other` may hold writes the copy at `active` lacks; None when it
/// provably does not (everything it wrote is in a recovery point at `active`), or when the
/// newest failover away from `other` gave it up by declaration (its site declared lost).
fn may_be_newer(
    st: &ReplicatedVMStatus,
    other: &str,
    active: &str,
    vm: &ObservedVm,
) -> Option<String> {
    let declared = st
        .jobs
        .iter()
        .rev()
        .find(|j| is_failover(j.type_) && j.source_site.as_deref() == Some(other))
        .is_some_and(|j| {
            j.steps.iter().any(|s| {
                s.state == StepState::Skipped
                    && s.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with(BY_DECLARATION))
            })
        });
    if declared {
        return None;
    }
    match &vm.replication {
        Some(r)
            if r.direction == Some(Direction::Outbound)
                && r.peer_site.as_deref() == Some(active)
                && r.state == ObservedReplicationState::Replicating =>
        {
            (r.pending_bytes > 0).then(|| {
                format!(
                    "it wrote {} bytes not yet replicated to {active}",
                    r.pending_bytes
                )
            })
        }
        _ => Some(format!("it does not replicate to {active}")),
    }
}

/// A fence of a VM running where it must not, when one is due.
pub(super) fn fence_needed(input: &Input) -> Option<FenceCall> {
    match drift(input, input.status) {
        Drift::Fence(f) => Some(f),
        _ => None,
    }
}

/// What to do about a VM that runs at both sites, when no copy may be powered off.
pub(super) fn split_brain(input: &Input, st: &ReplicatedVMStatus) -> Option<String> {
    match drift(input, st) {
        Drift::SplitBrain(m) => Some(m),
        _ => None,
    }
}
