//! The step catalogue: the jobs' steps in order, which may fail without failing the job, the
//! words and verbs of each job type, and operation ids.

use crate::api::{Job, JobType};

/// Jobs kept in status, newest last.
pub const MAX_JOBS: usize = crate::api::MAX_JOBS;

/// Words in the message of a step that failed at its deadline: the Stalled message then names
/// the ways on.
pub const DEADLINE_PASSED: &str = "deadline passed";

/// The steps jobs are made of (their names in `status.jobs[].steps[].name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepName {
    /// Ask the source site for this VM's point of the plan's consistent cut (an Unplanned plan
    /// failover from LatestProcessed); the failover then starts from that point.
    ConsistentCut,
    /// Enable replication at the source (initial copy or delta resync).
    EnableReplication,
    /// Wait until the initial copy is done.
    InitialReplication,
    /// Wait until the delta resync is done.
    Resynchronize,
    /// Graceful shutdown of the source VM.
    ShutdownSource,
    /// Power the source VM off (it could not be shut down, or was not asked to).
    FenceSource,
    /// Send everything not yet sent and make a recovery point.
    SyncRemaining,
    /// Compare disk digests of the source and the target's newest recovery point.
    VerifyDigests,
    /// Stop replication at both sides (recovery points stay).
    StopReplication,
    /// Bring the VM up at the target from a recovery point.
    StartAtTarget,
    /// A planned failover that failed after shutting the source down starts it again.
    RestartSource,
    /// Delete every recovery point of the failed-over VM.
    Commit,
    CreateTestCopy,
    DeleteTestCopy,
    /// Delete the replica at the target.
    RemoveReplica,
}

impl StepName {
    pub const ALL: [StepName; 15] = [
        StepName::ConsistentCut,
        StepName::EnableReplication,
        StepName::InitialReplication,
        StepName::Resynchronize,
        StepName::ShutdownSource,
        StepName::FenceSource,
        StepName::SyncRemaining,
        StepName::VerifyDigests,
        StepName::StopReplication,
        StepName::StartAtTarget,
        StepName::RestartSource,
        StepName::Commit,
        StepName::CreateTestCopy,
        StepName::DeleteTestCopy,
        StepName::RemoveReplica,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepName::ConsistentCut => "ConsistentCut",
            StepName::EnableReplication => "EnableReplication",
            StepName::InitialReplication => "InitialReplication",
            StepName::Resynchronize => "Resynchronize",
            StepName::ShutdownSource => "ShutdownSource",
            StepName::FenceSource => "FenceSource",
            StepName::SyncRemaining => "SyncRemaining",
            StepName::VerifyDigests => crate::controller::vm_jobs::VERIFY_DIGESTS,
            StepName::StopReplication => "StopReplication",
            StepName::StartAtTarget => "StartAtTarget",
            StepName::RestartSource => "RestartSource",
            StepName::Commit => "Commit",
            StepName::CreateTestCopy => "CreateTestCopy",
            StepName::DeleteTestCopy => "DeleteTestCopy",
            StepName::RemoveReplica => "RemoveReplica",
        }
    }

    pub fn parse(s: &str) -> Option<StepName> {
        Self::ALL.into_iter().find(|n| n.as_str() == s)
    }

    /// Steps that call no site: they wait for the site listing to show an outcome.
    pub fn is_wait(self) -> bool {
        matches!(self, StepName::InitialReplication | StepName::Resynchronize)
    }
}

/// The steps of a job, in order.
pub fn steps_of(t: JobType) -> &'static [StepName] {
    use StepName::*;
    match t {
        JobType::EnableReplication => &[EnableReplication, InitialReplication],
        JobType::ReverseReplicate => &[StopReplication, EnableReplication, Resynchronize],
        JobType::UnplannedFailover => &[
            ShutdownSource,
            FenceSource,
            SyncRemaining,
            StopReplication,
            StartAtTarget,
        ],
        JobType::PlannedFailover => &[
            ShutdownSource,
            SyncRemaining,
            VerifyDigests,
            StopReplication,
            StartAtTarget,
        ],
        JobType::Commit => &[Commit],
        JobType::TestFailover => &[CreateTestCopy],
        JobType::TestFailoverCleanup => &[DeleteTestCopy],
        JobType::DisableReplication => &[StopReplication, RemoveReplica],
        JobType::PlanFailover | JobType::PlanTestFailover | JobType::PlanTestFailoverCleanup => &[],
    }
}

/// A step whose failure does not fail its job: an unplanned failover goes on when the source
/// cannot be cut, shut down, fenced or synced (the disaster does not wait).
pub fn is_optional(t: JobType, s: StepName) -> bool {
    t == JobType::UnplannedFailover
        && matches!(
            s,
            StepName::ConsistentCut
                | StepName::ShutdownSource
                | StepName::FenceSource
                | StepName::SyncRemaining
        )
}

/// The short word of a job type in job names (`web-01-failover-3`).
pub fn job_word(t: JobType) -> &'static str {
    match t {
        JobType::EnableReplication => "enable",
        JobType::PlannedFailover | JobType::UnplannedFailover => "failover",
        JobType::Commit => "commit",
        JobType::ReverseReplicate => "reprotect",
        JobType::TestFailover => "testfailover",
        JobType::TestFailoverCleanup => "testcleanup",
        JobType::DisableReplication => "disable",
        JobType::PlanFailover => "planfailover",
        JobType::PlanTestFailover => "plantestfailover",
        JobType::PlanTestFailoverCleanup => "plantestcleanup",
    }
}

pub fn job_type_str(t: JobType) -> &'static str {
    match t {
        JobType::EnableReplication => "EnableReplication",
        JobType::PlannedFailover => "PlannedFailover",
        JobType::UnplannedFailover => "UnplannedFailover",
        JobType::Commit => "Commit",
        JobType::ReverseReplicate => "ReverseReplicate",
        JobType::TestFailover => "TestFailover",
        JobType::TestFailoverCleanup => "TestFailoverCleanup",
        JobType::DisableReplication => "DisableReplication",
        JobType::PlanFailover => "PlanFailover",
        JobType::PlanTestFailover => "PlanTestFailover",
        JobType::PlanTestFailoverCleanup => "PlanTestFailoverCleanup",
    }
}

/// The next job name: jobs are numbered per VM, and the number survives trimming because the
/// newest jobs are the ones kept.
pub fn next_job_name(rvm: &str, t: JobType, jobs: &[Job]) -> String {
    let n = jobs
        .iter()
        .filter_map(|j| j.name.rsplit('-').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    format!("{rvm}-{}-{n}", job_word(t))
}

/// The idempotency key of a step at the sites.
pub fn operation_id(uid: &str, job: &str, step: StepName) -> String {
    format!("{uid}-{job}-{}", step.as_str())
}

/// The idempotency key of a step of `job` in its current attempt: a retry gets new keys, so
/// the sites run the step again instead of answering the failed attempt from their record.
pub(super) fn attempt_operation_id(uid: &str, job: &Job, step: StepName) -> String {
    match job.attempt.filter(|a| *a > 1) {
        Some(a) => format!("{uid}-{}-a{a}-{}", job.name, step.as_str()),
        None => operation_id(uid, &job.name, step),
    }
}

/// The verb of a job's Events (`action`): Events of one kind of work fold into one series.
pub fn job_verb(t: JobType) -> &'static str {
    match t {
        JobType::EnableReplication => "Replicate",
        JobType::ReverseReplicate => "Reprotect",
        JobType::PlannedFailover | JobType::UnplannedFailover | JobType::PlanFailover => "Failover",
        JobType::Commit => "Commit",
        JobType::TestFailover | JobType::PlanTestFailover => "Drill",
        JobType::TestFailoverCleanup | JobType::PlanTestFailoverCleanup => "CleanUpDrill",
        JobType::DisableReplication => "DisableReplication",
    }
}
