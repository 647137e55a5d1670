//! Reading a ReplicatedVM's job record: the running job and step, the job that stands for the
//! VM, an uncommitted failover, the replica, the resync after a digest mismatch; and the
//! consistent cut a plan hands its VMs. Shared by the ReplicatedVM planner and the FailoverPlan
//! controller.

use jiff::Timestamp;

use crate::api::{
    Job, JobState, JobType, ReplicatedVMStatus, ReplicationState, ReplicationStatus, StepState,
};

/// The name of the step that compares digests (the step catalogue names it the same).
pub const VERIFY_DIGESTS: &str = "VerifyDigests";

pub fn is_failover(t: JobType) -> bool {
    matches!(t, JobType::PlannedFailover | JobType::UnplannedFailover)
}

/// A plan's consistent cut: an unplanned failover of the VM first asks its source site for the
/// cut `id` over every member of the plan (the site cuts those that replicate outbound from it,
/// all at one instant, once per id) and then fails over to this VM's point of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Cut {
    pub id: String,
    /// The plan's members (ReplicatedVM names, from its status groups).
    pub members: Vec<String>,
}

pub fn running_job(st: &ReplicatedVMStatus) -> Option<usize> {
    st.jobs.iter().rposition(|j| j.state == JobState::Running)
}

/// The first step that is not done, with its state.
pub fn current_step(job: &Job) -> Option<(usize, StepState)> {
    job.steps
        .iter()
        .enumerate()
        .find(|(_, s)| matches!(s.state, StepState::Pending | StepState::Running))
        .map(|(i, s)| (i, s.state))
}

/// Newest failover job that succeeded and is not committed yet.
pub fn uncommitted_failover(st: &ReplicatedVMStatus) -> Option<&Job> {
    let fi = st.jobs.iter().rposition(|j| is_failover(j.type_))?;
    let f = &st.jobs[fi];
    if f.state != JobState::Succeeded {
        return None;
    }
    let committed = st.jobs[fi + 1..]
        .iter()
        .any(|j| j.type_ == JobType::Commit && j.state == JobState::Succeeded);
    (!committed).then_some(f)
}

/// The replication the status records, when it is on (any state but Disabled).
pub fn replication_on(st: &ReplicatedVMStatus) -> Option<&ReplicationStatus> {
    st.replication
        .as_ref()
        .filter(|r| r.state != ReplicationState::Disabled)
}

/// The target holds a replica that a failover can start from.
pub fn has_replica(st: &ReplicatedVMStatus, source: &str, target: &str) -> bool {
    replication_on(st).is_some_and(|r| {
        r.source_site.as_deref() == Some(source)
            && r.target_site.as_deref() == Some(target)
            && matches!(
                r.state,
                ReplicationState::Replicating | ReplicationState::Paused | ReplicationState::Error
            )
    })
}

/// A planned failover that failed at VerifyDigests: the replica at its target is not what the
/// source holds (or a site refused to compare it). A site that gave no answer until the step's
/// deadline says nothing about the replica: not a mismatch, so nothing is resynchronized
/// toward a site that may be gone.
pub fn digest_mismatch(j: &Job) -> bool {
    j.type_ == JobType::PlannedFailover
        && j.state == JobState::Failed
        && j.steps.iter().any(|s| {
            s.name == VERIFY_DIGESTS
                && s.state == StepState::Failed
                && !s
                    .message
                    .as_deref()
                    .is_some_and(|m| m.contains(crate::controller::rvm::planner::DEADLINE_PASSED))
        })
}

/// (source, target) of the resync to start now: the newest job is a failover that failed on
/// its digests, and the VM still runs at that failover's source.
pub fn resync_due(st: &ReplicatedVMStatus) -> Option<(&str, &str)> {
    let j = st.jobs.last().filter(|j| digest_mismatch(j))?;
    let (source, target) = (j.source_site.as_deref()?, j.target_site.as_deref()?);
    (st.active_site.as_deref() == Some(source)).then_some((source, target))
}

/// Job `i` is the resync the planner started after a digest mismatch: a ReverseReplicate
/// right after that failover, in the same direction.
pub fn is_mismatch_resync(st: &ReplicatedVMStatus, i: usize) -> bool {
    let (Some(j), Some(f)) = (
        st.jobs.get(i),
        i.checked_sub(1).and_then(|p| st.jobs.get(p)),
    ) else {
        return false;
    };
    j.type_ == JobType::ReverseReplicate
        && digest_mismatch(f)
        && j.source_site == f.source_site
        && j.target_site == f.target_site
}

pub fn mismatch_resync_running(st: &ReplicatedVMStatus) -> bool {
    running_job(st).is_some_and(|i| is_mismatch_resync(st, i))
}

/// The job whose outcome stands for the VM: the newest, except that the resync after a digest
/// mismatch (running or succeeded) leaves the failed failover standing. The failover is not
/// tried again on its own (it shuts the VM down); a person changes the spec to try again.
pub fn standing_job(st: &ReplicatedVMStatus) -> Option<&Job> {
    let i = st.jobs.len().checked_sub(1)?;
    if is_mismatch_resync(st, i) && st.jobs[i].state != JobState::Failed {
        st.jobs.get(i - 1)
    } else {
        st.jobs.get(i)
    }
}

pub fn newest_job_end(st: &ReplicatedVMStatus) -> Option<Timestamp> {
    st.jobs
        .last()
        .and_then(|j| j.end_time.as_ref())
        .map(|t| t.0)
}
