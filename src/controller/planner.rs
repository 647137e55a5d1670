//! The pure planner: `(spec, status, what the sites show) -> next action`.
//!
//! Every rule of the procedure lives here and nowhere else, so it is tested without I/O:
//! which job to start, the steps of each job, which steps may fail without failing the job,
//! when a step is skipped, what a finished job changes in status, when a VM running where it
//! must not is fenced, and how phase and conditions follow from all that.
//!
//! The reconciler repeats: plan, act on the plan (write status, call a site, or wait), plan
//! again. A step is written as `Running` with its operation id before the site is called, so
//! a controller killed at any moment calls it again with the same id and the site does the
//! work once.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::conditions::{
    self, COMMIT_PENDING, CONFLICT, Cond, READY, RECONCILING, REPLICATION_ERROR, SETTINGS_APPLIED,
    STALLED,
};
use super::observe::{
    Direction, ObservedRecoveryPoint, ObservedReplicationState, Power, Role, SiteView,
};
use crate::api::{
    CommitMode, DrillRecord, FailoverType, Job, JobState, JobStep, JobType, RecoveryPointRef,
    RecoveryPointSummary, ReplicatedVMSpec, ReplicatedVMStatus, ReplicationHealth,
    ReplicationProgress, ReplicationSettings, ReplicationSpec, ReplicationState, ReplicationStatus,
    StepState, TestFailoverStatus, VmPhase,
};

/// Jobs kept in status, newest last.
pub const MAX_JOBS: usize = crate::api::MAX_JOBS;
/// A steady VM's replication figures (RPO, last sync, recovery points) are rewritten in status
/// at most this often; live RPO is in the metrics.
pub const STATUS_REFRESH: Duration = Duration::from_secs(300);
/// Ready's reason (and the Event's) while the VM is off at the site where it runs.
pub const VM_NOT_RUNNING: &str = "VMNotRunning";
/// Ready's and Reconciling's reason while the source replicates with other settings than the
/// spec's (until the settings call has changed them).
pub const SETTINGS_NOT_APPLIED: &str = "SettingsNotApplied";
/// How long to wait before retrying a step whose site did not answer.
pub const RETRY_UNREACHABLE: Duration = Duration::from_secs(5);
/// A power off (fence) that failed is tried again after [`fence_backoff`]: from this long,
/// doubling with every failure in a row ...
pub const FENCE_BACKOFF_FIRST: Duration = Duration::from_secs(5);
/// ... up to this long.
pub const FENCE_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// How the message of a FenceSource step starts when it failed while the source still runs the
/// VM: such a failure fails the failover (the VM is never started at the target then), although
/// the step is otherwise optional.
const SOURCE_STILL_RUNS: &str = "the source still runs the VM";

/// How long to wait before powering a VM off again after `failures` failed attempts in a row:
/// 5 s, 10 s, 20 s, ... at most [`FENCE_BACKOFF_MAX`].
pub fn fence_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FENCE_BACKOFF_FIRST
        .saturating_mul(1u32 << doublings)
        .min(FENCE_BACKOFF_MAX)
}

/// How Ready's message starts while a deletion waits for the running job.
const DELETION_WAITS: &str = "deletion waits for job";
/// Words in the message of a step that failed at its deadline: the Stalled message then names
/// the ways on.
const DEADLINE_PASSED: &str = "deadline passed";

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
            StepName::VerifyDigests => "VerifyDigests",
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

fn is_failover(t: JobType) -> bool {
    matches!(t, JobType::PlannedFailover | JobType::UnplannedFailover)
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
fn attempt_operation_id(uid: &str, job: &Job, step: StepName) -> String {
    match job.attempt.filter(|a| *a > 1) {
        Some(a) => format!("{uid}-{}-a{a}-{}", job.name, step.as_str()),
        None => operation_id(uid, &job.name, step),
    }
}

/// The attempt the newest job runs next when it failed and a retry asks for it: the
/// `twinsite.io/retry` annotation names it (`<job>` for attempt 2, `<job>/<n>` for attempt
/// `n`, so an annotation kept in Git runs each attempt once), or the FailoverPlan that moves
/// the VM started a run after this failover to the plan's target failed. A job that is not the
/// newest, one that did not fail, a conflict, and a digest mismatch (resynchronized first) are
/// not retried.
fn retry_due(input: &Input, st: &ReplicatedVMStatus) -> Option<i64> {
    let j = st.jobs.last().filter(|j| j.state == JobState::Failed)?;
    if input.conflict.is_some() || resync_due(st).is_some() {
        return None;
    }
    let next = j.attempt.unwrap_or(1).saturating_add(1);
    let asked = input.retry.is_some_and(|v| retry_names(v, &j.name, next));
    let by_plan = input.plan_started.is_some_and(|started| {
        is_failover(j.type_)
            && j.target_site.as_deref() == Some(input.desired())
            // Status times have whole seconds: a failure in the second the run started counts
            // as before it.
            && j.end_time.as_ref().is_some_and(|e| e.0 <= started)
    });
    (asked || by_plan).then_some(next)
}

/// Whether the retry annotation's `value` asks for attempt `next` of job `job`.
fn retry_names(value: &str, job: &str, next: i64) -> bool {
    let v = value.trim();
    match v.rsplit_once('/') {
        Some((name, n)) => name == job && n.trim().parse::<i64>().ok() == Some(next),
        None => v == job && next == 2,
    }
}

/// Runs the newest (failed) job again as attempt `attempt`, from its first step that did not
/// succeed. A failover that started its source again (RestartSource) undid its earlier steps:
/// it runs again from its first step.
fn retry_job(input: &Input, st: &mut ReplicatedVMStatus, attempt: i64, events: &mut Vec<Note>) {
    let Some(job) = st.jobs.last_mut() else {
        return;
    };
    let restart = StepName::RestartSource.as_str();
    let restarted = job
        .steps
        .iter()
        .any(|s| s.name == restart && s.state == StepState::Succeeded);
    job.steps.retain(|s| s.name != restart);
    let from = if restarted {
        0
    } else {
        job.steps
            .iter()
            .position(|s| s.state != StepState::Succeeded)
            .unwrap_or(job.steps.len())
    };
    let cut = StepName::ConsistentCut.as_str();
    for s in &mut job.steps[from..] {
        if s.name == cut {
            // The plan's cut keeps its id (the site answers it once).
            job.cut_id = None;
            job.recovery_point = None;
        } else {
            s.operation_id = None;
        }
        s.state = StepState::Pending;
        s.message = None;
        s.start_time = None;
        s.end_time = None;
    }
    let first = job
        .steps
        .get(from)
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let previous = job.message.take().unwrap_or_default();
    job.state = JobState::Running;
    job.attempt = Some(attempt);
    job.start_time = Some(input.now());
    job.end_time = None;
    events.push(Note {
        warning: false,
        action: job_verb(job.type_),
        subject: job.name.clone(),
        reason: "JobRetried",
        message: format!(
            "{} {} attempt {attempt} started at step {first} (attempt {} failed: {previous})",
            job_type_str(job.type_),
            job.name,
            attempt - 1
        ),
    });
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

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub name: &'a str,
    /// metadata.uid (or the name when there is none): prefixes operation ids.
    pub uid: &'a str,
    pub generation: Option<i64>,
    pub vm_name: &'a str,
    pub spec: &'a ReplicatedVMSpec,
    /// Value of the `twinsite.io/commit` annotation.
    pub commit_annotation: Option<&'a str>,
    pub status: &'a ReplicatedVMStatus,
    /// What spec.primarySite and spec.recoverySite show of this VM.
    pub primary: &'a SiteView,
    pub recovery: &'a SiteView,
    pub now: Timestamp,
    /// How often the sites are listed: how soon a waiting step can see progress.
    pub poll: Duration,
    /// A FailoverPlan conflict: the VM stays where it runs and shows condition Conflict.
    pub conflict: Option<&'a Conflict>,
    /// The consistent cut a plan failover of this VM starts from (Unplanned, LatestProcessed).
    pub cut: Option<&'a Cut>,
    /// Value of the `twinsite.io/retry` annotation: `<job>` runs that failed job a second
    /// time, `<job>/<n>` runs its attempt `n` (see [`retry_due`]).
    pub retry: Option<&'a str>,
    /// When the running FailoverPlan job that moves this VM started: a failover of the VM to
    /// the plan's target that failed before it is run again (a plan retry).
    pub plan_started: Option<Timestamp>,
    /// The object is being deleted: the running job is driven to its end (deletion waits for
    /// it, and the conditions say so), and no job starts or is retried.
    pub deleting: bool,
    /// A power off of this VM failed lately: no fence (FenceSource, or powering off a VM that
    /// runs where it must not) is tried before then ([`fence_backoff`]).
    pub fence_not_before: Option<Timestamp>,
}

/// Why the FailoverPlans of the VM's namespace hold it where it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// Condition reason (`SelectedByTwoPlans`, `ActiveSiteDisagrees`, ...).
    pub reason: String,
    /// The cause and what to do about it.
    pub message: String,
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

static UNKNOWN: SiteView = SiteView::Unknown;

impl Input<'_> {
    pub fn view(&self, site: &str) -> &SiteView {
        if site == self.spec.primary_site {
            self.primary
        } else if site == self.spec.recovery_site {
            self.recovery
        } else {
            &UNKNOWN
        }
    }

    pub fn other(&self, site: &str) -> &str {
        if site == self.spec.primary_site {
            &self.spec.recovery_site
        } else {
            &self.spec.primary_site
        }
    }

    pub fn desired(&self) -> &str {
        self.spec
            .active_site
            .as_deref()
            .unwrap_or(&self.spec.primary_site)
    }

    fn now(&self) -> Time {
        Time(self.now)
    }

    /// How long a fence must still wait (backing off after failures), if it must.
    fn fence_wait(&self) -> Option<Duration> {
        let nb = self.fence_not_before?;
        let left = (nb - self.now).get_seconds();
        (left > 0).then(|| Duration::from_secs(left.unsigned_abs()))
    }

    /// The newest job failed (the resync after a digest mismatch aside, see [`standing_job`])
    /// and nobody changed the spec since: a person has to look.
    fn stalled(&self) -> bool {
        standing_job(self.status).is_some_and(|j| j.state == JobState::Failed)
            && self.status.observed_generation == self.generation
    }
}

pub use super::writes::Note;

/// A status to write, with what it says happened.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub status: ReplicatedVMStatus,
    pub events: Vec<Note>,
    /// Jobs that ended in this update (for metrics).
    pub finished: Vec<(JobType, JobState)>,
}

/// How replication is enabled at the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnableMode {
    /// Send the whole disk.
    Initial,
    /// Compare block hashes with the peer's copy and send only what differs.
    Resync,
}

/// A site call for the Running step `step` of job `job` (already persisted as Running).
#[derive(Clone, Debug, PartialEq)]
pub struct StepCall {
    pub job: usize,
    pub step: usize,
    pub job_name: String,
    pub job_type: JobType,
    pub step_name: StepName,
    pub vm: String,
    pub source: String,
    pub target: String,
    pub op_id: String,
    pub recovery_point: String,
    pub network: String,
    pub mode: EnableMode,
    pub replication: ReplicationSpec,
    pub optional: bool,
    /// Name of the drill copy (cleanup).
    pub test_vm: Option<String>,
    /// ConsistentCut: the VMs the cut is asked for (the plan's members, this VM among them).
    /// The cut id is the step's operation id.
    pub cut_vms: Vec<String>,
    /// The source site's listing fails: a best-effort call there (StopReplication's source
    /// side in an unplanned failover) is not made, as it would only wait for its timeout.
    pub source_unreachable: bool,
}

/// Power the VM off at `site`, where it runs although it must not.
#[derive(Clone, Debug, PartialEq)]
pub struct FenceCall {
    pub site: String,
    pub vm: String,
    pub op_id: String,
}

/// Send the spec's replication settings to the source's running replication (a change of
/// `spec.replication`), then [`record_settings`]. Not a job: the replication goes on as it is.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingsCall {
    pub site: String,
    pub vm: String,
    /// Names the settings and the spec generation asking for them: a repeat is answered from
    /// the site's record, a later change is a new operation.
    pub op_id: String,
    pub replication: ReplicationSpec,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Write this status, publish its events, then plan again.
    Write(Box<Update>),
    /// Call a site for a step already written as Running, then [`record_outcome`].
    Execute(Box<StepCall>),
    /// Power off a VM that runs where it must not, then [`record_fence`].
    Fence(FenceCall),
    /// Apply changed replication settings at the source, then [`record_settings`].
    Settings(SettingsCall),
    /// Nothing to do now; plan again after this long.
    Idle(Duration),
}

/// What a site call gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Succeeded {
        message: Option<String>,
        recovery_point: Option<ObservedRecoveryPoint>,
        test_vm: Option<String>,
    },
    Failed(String),
    /// The site did not answer: a required step is retried with the same operation id.
    Unreachable(String),
}

impl Outcome {
    pub fn ok() -> Self {
        Outcome::Succeeded {
            message: None,
            recovery_point: None,
            test_vm: None,
        }
    }
}

/// Why no job can start yet (shown in the Ready condition).
struct Wait {
    reason: &'static str,
    message: String,
}

/// The next action for this VM.
pub fn plan(input: &Input) -> Plan {
    if let Some(f) = fence_needed(input) {
        return match input.fence_wait() {
            Some(d) => Plan::Idle(d),
            None => Plan::Fence(f),
        };
    }
    let mut st = input.status.clone();
    let mut events = Vec::new();
    let mut finished = Vec::new();
    let mut wait = None;
    let mut requeue = steady_requeue(input);

    if st.active_site.is_none() {
        match locate(input) {
            Ok(site) => st.active_site = Some(site),
            Err(w) => {
                wait = Some(w);
                requeue = input.poll;
            }
        }
    }

    if st.active_site.is_some() {
        if let Some(ji) = running_job(&st) {
            let job = &st.jobs[ji];
            match current_step(job) {
                Some((si, StepState::Running)) => {
                    let step = &job.steps[si];
                    let name = StepName::parse(&step.name);
                    let unplanned = job.type_ == JobType::UnplannedFailover;
                    // An unplanned failover never starts the VM at the target while a listing
                    // taken since the source was last acted on shows it running there.
                    let source_runs = unplanned
                        && name == Some(StepName::StartAtTarget)
                        && source_runs(input, job);
                    match name {
                        Some(StepName::FenceSource)
                            if unplanned && input.fence_wait().is_some() =>
                        {
                            return Plan::Idle(input.fence_wait().unwrap_or(RETRY_UNREACHABLE));
                        }
                        Some(StepName::StartAtTarget)
                            if source_runs
                                && overdue(input, step, input.spec.failover.step_timeout()) =>
                        {
                            let source = job.source_site.clone().unwrap_or_default();
                            let msg = format!(
                                "not started before its {DEADLINE_PASSED} ({} s, \
                                 spec.failover.stepTimeoutSeconds): VM {} runs at {source} and \
                                 could not be powered off there",
                                input.spec.failover.step_timeout(),
                                input.vm_name
                            );
                            let t = job.type_;
                            let n = StepName::StartAtTarget;
                            fail_step(input, &mut st, ji, si, t, n, msg, &mut events);
                            advance(input, &mut st, &mut events, &mut finished);
                        }
                        Some(StepName::StartAtTarget) if source_runs => {
                            if let Some(d) = input.fence_wait() {
                                return Plan::Idle(d);
                            }
                            let source = job.source_site.clone().unwrap_or_default();
                            let at = input.now.as_second();
                            return Plan::Fence(FenceCall {
                                op_id: format!("{}-fence-{source}-{at}", input.uid),
                                site: source,
                                vm: input.vm_name.to_string(),
                            });
                        }
                        Some(n) if n.is_wait() => {
                            match check_wait(input, job, step) {
                                WaitCheck::Done => {
                                    apply_step_success(
                                        input,
                                        &mut st,
                                        ji,
                                        si,
                                        &Outcome::ok(),
                                        None,
                                    );
                                    advance(input, &mut st, &mut events, &mut finished);
                                }
                                WaitCheck::Message(m)
                                    if overdue(input, step, copy_limit(input)) =>
                                {
                                    let msg = format!(
                                        "not done when its {DEADLINE_PASSED} ({} s, \
                                         spec.replication.copyTimeoutSeconds){}",
                                        copy_limit(input),
                                        m.map(|m| format!(": {m}")).unwrap_or_default()
                                    );
                                    let t = job.type_;
                                    fail_step(input, &mut st, ji, si, t, n, msg, &mut events);
                                    advance(input, &mut st, &mut events, &mut finished);
                                }
                                WaitCheck::Message(m) => {
                                    st.jobs[ji].steps[si].message = m;
                                }
                            }
                            requeue = input.poll;
                        }
                        // A deletion that has just begun is written down (Ready says the
                        // deletion waits for this job) before the step's site is called.
                        Some(n) if !input.deleting || deletion_noted(input.status) => {
                            return Plan::Execute(Box::new(step_call(input, &st, ji, si, n)));
                        }
                        Some(_) => {}
                        None => {
                            // A step this controller does not know (written by a newer one):
                            // fail it rather than guess.
                            let s = &mut st.jobs[ji].steps[si];
                            s.state = StepState::Failed;
                            s.message = Some("unknown step".into());
                            s.end_time = Some(input.now());
                            advance(input, &mut st, &mut events, &mut finished);
                        }
                    }
                }
                _ => advance(input, &mut st, &mut events, &mut finished),
            }
        } else if input.deleting {
            // Deletion waits for a running job only: nothing new starts.
        } else if let Some(attempt) = retry_due(input, &st) {
            retry_job(input, &mut st, attempt, &mut events);
            advance(input, &mut st, &mut events, &mut finished);
        } else {
            match next_job(input, &st) {
                Next::Start(t, source, target) => {
                    let missing = missing_recovery_point(input, t, &source, &target);
                    start_job(input, &mut st, t, source, target, &mut events);
                    match missing {
                        Some(why) => refuse_job(input, &mut st, why, &mut events, &mut finished),
                        None => advance(input, &mut st, &mut events, &mut finished),
                    }
                }
                Next::Wait(w) => {
                    wait = Some(w);
                    requeue = input.poll;
                }
                Next::Nothing => {}
            }
        }
    }

    if running_job(&st).is_none() {
        let before = st.replication.as_ref().map(|r| r.state);
        refresh_replication(input, &mut st);
        note_source_resync(input, &st, before, &mut events);
        record_listed_settings(input, &mut st);
    }
    refresh_progress(input, &mut st);
    finalize(input, &mut st, wait, &mut events);
    if st != *input.status {
        Plan::Write(Box::new(Update {
            status: st,
            events,
            finished,
        }))
    } else if let Some(c) = settings_call(input, &st) {
        Plan::Settings(c)
    } else {
        Plan::Idle(requeue)
    }
}

/// The settings call due: no job runs, the spec replicates, and the source, listed after the
/// newest job ended, replicates outbound with other settings than the spec's.
fn settings_call(input: &Input, st: &ReplicatedVMStatus) -> Option<SettingsCall> {
    if running_job(st).is_some() || !input.spec.replication.enabled {
        return None;
    }
    if !matches!(settings_state(input, st), Settings::NotApplied(_)) {
        return None;
    }
    let source = replication_on(st)?.source_site.clone()?;
    input
        .view(&source)
        .vm_since(newest_job_end(st))?
        .replication
        .as_ref()
        .filter(|r| r.direction == Some(Direction::Outbound))?;
    let r = &input.spec.replication;
    Some(SettingsCall {
        op_id: format!(
            "{}-settings-g{}-{}-{}-{}",
            input.uid,
            input.generation.unwrap_or(0),
            r.interval_seconds,
            r.recovery_point_retention_hours,
            r.app_consistent_frequency_hours
        ),
        site: source,
        vm: input.vm_name.to_string(),
        replication: r.clone(),
    })
}

/// The source lists all its settings (after the newest job ended): `status.replication.settings`
/// says the same, also when the controller stopped between a settings call and its record.
fn record_listed_settings(input: &Input, st: &mut ReplicatedVMStatus) {
    let Some(source) = replication_on(st).and_then(|r| r.source_site.clone()) else {
        return;
    };
    let Some(l) = input
        .view(&source)
        .vm_since(newest_job_end(st))
        .and_then(|v| v.replication.as_ref())
        .filter(|r| r.direction == Some(Direction::Outbound))
    else {
        return;
    };
    let (Some(i), Some(r), Some(a)) = (
        l.interval_seconds,
        l.retention_hours,
        l.app_consistent_hours,
    ) else {
        return;
    };
    let listed = ReplicationSettings {
        interval_seconds: i,
        recovery_point_retention_hours: r,
        app_consistent_frequency_hours: a,
    };
    if let Some(rep) = st.replication.as_mut()
        && rep.settings.as_ref() != Some(&listed)
    {
        rep.settings = Some(listed);
    }
}

/// Records what a settings call gave: on success the settings sent (status.replication.settings)
/// and an Event; on failure a warning Event only (the call is made again at the next plan).
pub fn record_settings(input: &Input, call: &SettingsCall, outcome: Outcome) -> Plan {
    let mut st = input.status.clone();
    let mut events = Vec::new();
    let r = &call.replication;
    let what = format!(
        "intervalSeconds {}, recoveryPointRetentionHours {}, appConsistentFrequencyHours {}",
        r.interval_seconds, r.recovery_point_retention_hours, r.app_consistent_frequency_hours
    );
    match outcome {
        Outcome::Succeeded { .. } => {
            if let Some(rep) = st.replication.as_mut() {
                rep.settings = Some(ReplicationSettings::from(r));
            }
            events.push(Note {
                warning: false,
                action: "UpdateSettings",
                subject: call.op_id.clone(),
                reason: "SettingsChanged",
                message: format!(
                    "site {} replicates VM {} with {what} from its next cycle",
                    call.site, call.vm
                ),
            });
            finalize(input, &mut st, None, &mut events);
        }
        Outcome::Failed(m) | Outcome::Unreachable(m) => {
            events.push(Note {
                warning: true,
                action: "UpdateSettings",
                subject: format!("settings-{}", call.site),
                reason: "SettingsFailed",
                message: format!(
                    "site {} did not take the replication settings of VM {} ({what}): {m}",
                    call.site, call.vm
                ),
            });
        }
    }
    Plan::Write(Box::new(Update {
        status: st,
        events,
        finished: vec![],
    }))
}

/// The source of failover `job` runs the VM, as a listing taken after the job's latest step
/// ended (and after the current step started) shows it.
fn source_runs(input: &Input, job: &Job) -> bool {
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

/// Ready already says that a deletion waits for the running job.
fn deletion_noted(st: &ReplicatedVMStatus) -> bool {
    st.conditions
        .iter()
        .any(|c| c.type_ == READY && c.message.starts_with(DELETION_WAITS))
}

fn steady_requeue(input: &Input) -> Duration {
    let interval = u64::try_from(input.spec.replication.interval_seconds.max(1)).unwrap_or(300);
    Duration::from_secs(interval.clamp(15, 60))
}

/// Where the VM runs now, for a VM the controller has not seen yet.
fn locate(input: &Input) -> Result<String, Wait> {
    let p = &input.spec.primary_site;
    let r = &input.spec.recovery_site;
    let role_primary = |v: &SiteView| {
        v.vm()
            .is_some_and(|vm| vm.role == super::observe::Role::Primary)
    };
    // A VM that runs somewhere is where it is; otherwise a stopped one at the primary site.
    if input.primary.vm().is_some_and(|v| v.runs()) {
        return Ok(p.clone());
    }
    if input.recovery.vm().is_some_and(|v| v.runs()) {
        return Ok(r.clone());
    }
    if role_primary(input.primary) {
        return Ok(p.clone());
    }
    if role_primary(input.recovery) {
        return Ok(r.clone());
    }
    let unreachable: Vec<&str> = [(p, input.primary), (r, input.recovery)]
        .into_iter()
        .filter(|(_, v)| !v.reachable())
        .map(|(n, _)| n.as_str())
        .collect();
    if unreachable.is_empty() {
        Err(Wait {
            reason: "VMNotFound",
            message: format!("VM {} is at neither {p} nor {r}", input.vm_name),
        })
    } else {
        Err(Wait {
            reason: "SiteUnreachable",
            message: format!("waiting for site {}", unreachable.join(", ")),
        })
    }
}

fn running_job(st: &ReplicatedVMStatus) -> Option<usize> {
    st.jobs.iter().rposition(|j| j.state == JobState::Running)
}

/// The first step that is not done, with its state.
fn current_step(job: &Job) -> Option<(usize, StepState)> {
    job.steps
        .iter()
        .enumerate()
        .find(|(_, s)| matches!(s.state, StepState::Pending | StepState::Running))
        .map(|(i, s)| (i, s.state))
}

enum WaitCheck {
    Done,
    Message(Option<String>),
}

/// A waiting step is done when a listing taken after the step began shows the source
/// replicating to the target.
fn check_wait(input: &Input, job: &Job, step: &JobStep) -> WaitCheck {
    let (Some(source), Some(target)) = (&job.source_site, &job.target_site) else {
        return WaitCheck::Done;
    };
    let since = step.start_time.as_ref().map(|t| t.0);
    let Some(vm) = input.view(source).vm_since(since) else {
        return WaitCheck::Message(step.message.clone());
    };
    match &vm.replication {
        Some(r)
            if r.state == ObservedReplicationState::Replicating
                && r.direction != Some(Direction::Inbound)
                && r.peer_site.as_deref().is_none_or(|p| p == target) =>
        {
            WaitCheck::Done
        }
        // The agent's own reason, as long as it reports one (a copy that keeps failing stays
        // InitialReplication or Resynchronizing at the source, with its last error).
        Some(r) if r.state == ObservedReplicationState::Error || r.last_error.is_some() => {
            WaitCheck::Message(Some(format!(
                "replication error at {source}: {}",
                r.last_error.as_deref().unwrap_or("unknown")
            )))
        }
        _ => WaitCheck::Message(step.message.clone()),
    }
}

fn step_call(
    input: &Input,
    st: &ReplicatedVMStatus,
    ji: usize,
    si: usize,
    n: StepName,
) -> StepCall {
    let job = &st.jobs[ji];
    let source = job.source_site.clone().unwrap_or_default();
    let target = job.target_site.clone().unwrap_or_default();
    let source_unreachable =
        job.type_ == JobType::UnplannedFailover && !input.view(&source).reachable();
    let recovery_point = match (job.type_, &job.cut_id, &job.recovery_point) {
        // A planned failover brings up everything the final sync sent.
        (JobType::PlannedFailover, _, _) => "Latest".to_string(),
        // The ConsistentCut step succeeded: this VM's point of the cut.
        (_, Some(_), Some(rp)) => rp.clone(),
        _ => input.spec.failover.recovery_point.clone(),
    };
    let cut_vms = match (n, input.cut) {
        (StepName::ConsistentCut, Some(c)) => {
            let mut vms = c.members.clone();
            if !vms.iter().any(|v| v == input.name) {
                vms.push(input.name.to_string());
            }
            vms
        }
        (StepName::ConsistentCut, None) => vec![input.name.to_string()],
        _ => Vec::new(),
    };
    StepCall {
        job: ji,
        step: si,
        job_name: job.name.clone(),
        job_type: job.type_,
        step_name: n,
        vm: input.vm_name.to_string(),
        source,
        target,
        op_id: job.steps[si]
            .operation_id
            .clone()
            .unwrap_or_else(|| attempt_operation_id(input.uid, job, n)),
        recovery_point,
        network: input.spec.test_failover.network.clone(),
        mode: if job.type_ == JobType::ReverseReplicate {
            EnableMode::Resync
        } else {
            EnableMode::Initial
        },
        replication: input.spec.replication.clone(),
        optional: is_optional(job.type_, n),
        test_vm: st.test_failover.as_ref().map(|t| t.vm_name.clone()),
        cut_vms,
        source_unreachable,
    }
}

enum Next {
    Start(JobType, String, String),
    Wait(Wait),
    Nothing,
}

/// Newest failover job that succeeded and is not committed yet.
pub(crate) fn uncommitted_failover(st: &ReplicatedVMStatus) -> Option<&Job> {
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
fn replication_on(st: &ReplicatedVMStatus) -> Option<&ReplicationStatus> {
    st.replication
        .as_ref()
        .filter(|r| r.state != ReplicationState::Disabled)
}

/// The target holds a replica that a failover can start from.
fn has_replica(st: &ReplicatedVMStatus, source: &str, target: &str) -> bool {
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
/// source holds (or could not be compared).
fn digest_mismatch(j: &Job) -> bool {
    j.type_ == JobType::PlannedFailover
        && j.state == JobState::Failed
        && j.steps
            .iter()
            .any(|s| s.name == StepName::VerifyDigests.as_str() && s.state == StepState::Failed)
}

/// (source, target) of the resync to start now: the newest job is a failover that failed on
/// its digests, and the VM still runs at that failover's source.
fn resync_due(st: &ReplicatedVMStatus) -> Option<(&str, &str)> {
    let j = st.jobs.last().filter(|j| digest_mismatch(j))?;
    let (source, target) = (j.source_site.as_deref()?, j.target_site.as_deref()?);
    (st.active_site.as_deref() == Some(source)).then_some((source, target))
}

/// Job `i` is the resync the planner started after a digest mismatch: a ReverseReplicate
/// right after that failover, in the same direction.
fn is_mismatch_resync(st: &ReplicatedVMStatus, i: usize) -> bool {
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

fn mismatch_resync_running(st: &ReplicatedVMStatus) -> bool {
    running_job(st).is_some_and(|i| is_mismatch_resync(st, i))
}

/// The job whose outcome stands for the VM: the newest, except that the resync after a digest
/// mismatch (running or succeeded) leaves the failed failover standing. The failover is not
/// tried again on its own (it shuts the VM down); a person changes the spec to try again.
pub(crate) fn standing_job(st: &ReplicatedVMStatus) -> Option<&Job> {
    let i = st.jobs.len().checked_sub(1)?;
    if is_mismatch_resync(st, i) && st.jobs[i].state != JobState::Failed {
        st.jobs.get(i - 1)
    } else {
        st.jobs.get(i)
    }
}

/// Why replication is not yet what the spec asks when the source is still copying or
/// resynchronizing (a resync the source agent started on its own after the replica refused a
/// cycle, or one the controller started): Ready's reason and message.
fn replication_in_progress(
    input: &Input,
    st: &ReplicatedVMStatus,
) -> Option<(&'static str, String)> {
    let r = replication_on(st)?;
    let (source, target) = (r.source_site.as_deref()?, r.target_site.as_deref()?);
    let why = input
        .view(source)
        .vm()
        .and_then(|v| v.replication.as_ref()?.last_error.clone())
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    match r.state {
        ReplicationState::Resynchronizing => Some((
            "Resynchronizing",
            format!(
                "replication {source} -> {target} is resynchronizing: {source} compares block \
                 hashes with the replica and sends the blocks that differ{why}"
            ),
        )),
        ReplicationState::InitialReplication => Some((
            "InitialReplication",
            format!("replication {source} -> {target}: the initial copy is running{why}"),
        )),
        _ => None,
    }
}

/// A Warning Event when the listing shows the source resynchronizing on its own (the replica
/// refused a cycle: its copy was lost or is not the one the source built on).
fn note_source_resync(
    input: &Input,
    st: &ReplicatedVMStatus,
    before: Option<ReplicationState>,
    events: &mut Vec<Note>,
) {
    if before != Some(ReplicationState::Replicating) {
        return;
    }
    let Some(r) = replication_on(st).filter(|r| r.state == ReplicationState::Resynchronizing)
    else {
        return;
    };
    if let Some((_, msg)) = replication_in_progress(input, st) {
        events.push(Note {
            warning: true,
            action: "Resynchronize",
            subject: format!(
                "resync {} -> {}",
                r.source_site.as_deref().unwrap_or_default(),
                r.target_site.as_deref().unwrap_or_default()
            ),
            reason: "Resynchronizing",
            message: msg,
        });
    }
}

/// The sites a job needs must answer, and their listings must postdate the newest job's end
/// (decisions are never made on a picture older than the controller's own last action).
fn need_sites(input: &Input, sites: &[&str]) -> Option<Wait> {
    let down: Vec<&str> = sites
        .iter()
        .copied()
        .filter(|s| !input.view(s).reachable())
        .collect();
    if !down.is_empty() {
        return Some(Wait {
            reason: "SiteUnreachable",
            message: format!("waiting for site {}", down.join(", ")),
        });
    }
    let since = input
        .status
        .jobs
        .last()
        .and_then(|j| j.end_time.as_ref())
        .map(|t| t.0);
    let stale: Vec<&str> = sites
        .iter()
        .copied()
        .filter(|s| !input.view(s).fetched_since(since))
        .collect();
    (!stale.is_empty()).then(|| Wait {
        reason: "Observing",
        message: format!("waiting for a fresh listing of site {}", stale.join(", ")),
    })
}

/// Which job to start, given no job runs. Order matters: commit before anything; a drill
/// copy is cleaned up before a failover; a failover needs a current replica at its target
/// (reverse-replicate first otherwise); replication follows the spec; drills last.
fn next_job(input: &Input, st: &ReplicatedVMStatus) -> Next {
    // A planned failover found the replica different from the source: resynchronize it before
    // anything else (a failover must never start that copy), whether the VM is stalled or not.
    if input.spec.replication.enabled
        && let Some((source, target)) = resync_due(st)
    {
        return match need_sites(input, &[source, target]) {
            Some(w) => Next::Wait(w),
            None => Next::Start(
                JobType::ReverseReplicate,
                source.to_string(),
                target.to_string(),
            ),
        };
    }
    if input.stalled() {
        return Next::Nothing;
    }
    let Some(active) = st.active_site.clone() else {
        return Next::Nothing;
    };
    let other = input.other(&active).to_string();
    let desired = input.desired().to_string();
    let spec = input.spec;

    let start =
        |t: JobType, source: &str, target: &str, need: &[&str]| match need_sites(input, need) {
            Some(w) => Next::Wait(w),
            None => Next::Start(t, source.to_string(), target.to_string()),
        };

    if let Some(f) = uncommitted_failover(st) {
        let (src, tgt) = (
            f.source_site.clone().unwrap_or_default(),
            f.target_site.clone().unwrap_or_else(|| active.clone()),
        );
        if spec.failover.commit == CommitMode::Automatic
            || input.commit_annotation == Some(f.name.as_str())
        {
            return start(JobType::Commit, &src, &tgt, &[&tgt]);
        }
        return Next::Wait(Wait {
            reason: "CommitPending",
            message: format!(
                "failover {} waits for commit: kubectl annotate rvm {} {}={}",
                f.name,
                input.name,
                crate::api::COMMIT_ANNOTATION,
                f.name
            ),
        });
    }

    let drill_site = st.test_failover.as_ref().map(|t| t.site.clone());
    if let Some(ds) = &drill_site
        && (!spec.test_failover.enabled || desired != active)
    {
        return start(JobType::TestFailoverCleanup, &active, ds, &[ds]);
    }

    if desired != active {
        if has_replica(st, &active, &desired) {
            return match failover_type(input, st, &active, &desired) {
                FailoverType::Planned => start(
                    JobType::PlannedFailover,
                    &active,
                    &desired,
                    &[&active, &desired],
                ),
                FailoverType::Unplanned => {
                    start(JobType::UnplannedFailover, &active, &desired, &[&desired])
                }
            };
        }
        // A failback to a site without a current replica: protect toward it first.
        if replication_on(st).is_some_and(|r| r.target_site.as_deref() == Some(&desired)) {
            // Replication toward it is being set up; wait for it.
            return Next::Nothing;
        }
        if let Some(w) = need_sites(input, &[&active, &desired]) {
            return Next::Wait(w);
        }
        let t = if input.view(&desired).vm().is_some() {
            JobType::ReverseReplicate
        } else {
            JobType::EnableReplication
        };
        return Next::Start(t, active, desired);
    }

    let on = replication_on(st).is_some();
    if spec.replication.enabled && !on {
        if let Some(w) = need_sites(input, &[&active, &other]) {
            return Next::Wait(w);
        }
        if input.view(&active).vm().is_none() {
            return Next::Wait(Wait {
                reason: "VMNotFound",
                message: format!("VM {} is not at site {active}", input.vm_name),
            });
        }
        let t = if input.view(&other).vm().is_some() {
            JobType::ReverseReplicate
        } else {
            JobType::EnableReplication
        };
        return Next::Start(t, active, other);
    }
    if !spec.replication.enabled && on {
        return start(JobType::DisableReplication, &active, &other, &[&other]);
    }

    if spec.test_failover.enabled && drill_site.is_none() {
        let replicating =
            replication_on(st).is_some_and(|r| r.state == ReplicationState::Replicating);
        let last_drill_failed = st
            .jobs
            .iter()
            .rev()
            .find(|j| j.type_ == JobType::TestFailover)
            .is_some_and(|j| j.state == JobState::Failed)
            && input.status.observed_generation == input.generation;
        if replicating && !last_drill_failed {
            return start(JobType::TestFailover, &active, &other, &[&other]);
        }
        if !replicating {
            return Next::Wait(Wait {
                reason: "WaitingForReplication",
                message: "a drill needs replication to be running".into(),
            });
        }
    }
    Next::Nothing
}

/// How a change of activeSite from `active` to `desired` is carried out. A failback (back to
/// spec.primarySite, where replication first came from) is Planned: the VM is shut down, synced
/// and its digests compared, so nothing is lost. It is Unplanned only when the person asked for
/// that in this move: spec.failover.type is Unplanned and differs from the type of the newest
/// failover job in status (the one that moved the VM away, or a failback that failed), so the
/// Unplanned left over from the move away does not count. Any other move follows
/// spec.failover.type.
fn failover_type(
    input: &Input,
    st: &ReplicatedVMStatus,
    active: &str,
    desired: &str,
) -> FailoverType {
    let asked = input.spec.failover.type_;
    let failback = desired == input.spec.primary_site && active != desired;
    if !failback || asked == FailoverType::Planned {
        return asked;
    }
    let last = st.jobs.iter().rev().find(|j| is_failover(j.type_));
    match last.map(|j| j.type_) {
        Some(JobType::PlannedFailover) => FailoverType::Unplanned,
        _ => FailoverType::Planned,
    }
}

/// Why an unplanned failover from `source` to `target` cannot start from the recovery point
/// the spec selects, judged on the target's listing (fresh: the job needs the target): checked
/// before the source is shut down, so a selector that names nothing never leaves the VM off.
/// An id that is neither the newest point nor the newest app-consistent one cannot be judged
/// from the listing and is left to StartAtTarget (a failure there starts the source again).
fn missing_recovery_point(input: &Input, t: JobType, source: &str, target: &str) -> Option<String> {
    if t != JobType::UnplannedFailover {
        return None;
    }
    let view = input.view(target);
    if !view.reachable() {
        return None;
    }
    let selector = input.spec.failover.recovery_point.as_str();
    let rps = view.vm().and_then(|v| v.recovery_points.as_ref());
    let exists = match (selector, rps) {
        (_, None) => false,
        ("LatestAppConsistent", Some(p)) => p.latest_app_consistent.is_some(),
        _ => true,
    };
    if exists {
        return None;
    }
    let what = match rps {
        None => format!("{target} holds no recovery point of VM {}", input.vm_name),
        Some(p) => {
            let latest = p
                .latest
                .as_ref()
                .map(|l| format!(", the newest is {}", describe_point(l)))
                .unwrap_or_default();
            let consistent = match &p.latest_app_consistent {
                Some(a) => format!(", the newest app-consistent is {}", describe_point(a)),
                None => ", none app-consistent".to_string(),
            };
            format!(
                "{target} holds {} recovery points{latest}{consistent}",
                p.count
            )
        }
    };
    Some(format!(
        "recovery point {selector} (spec.failover.recoveryPoint) does not exist: {what}; \
         the failover did not start and {source} was not shut down"
    ))
}

fn describe_point(p: &ObservedRecoveryPoint) -> String {
    match p.time {
        Some(t) => format!("{} ({t})", p.id),
        None => p.id.clone(),
    }
}

/// Ends the job just started before any step ran: every step Skipped, the job Failed with `why`.
fn refuse_job(
    input: &Input,
    st: &mut ReplicatedVMStatus,
    why: String,
    events: &mut Vec<Note>,
    finished: &mut Vec<(JobType, JobState)>,
) {
    let Some(ji) = running_job(st) else { return };
    let now = input.now();
    let job = &mut st.jobs[ji];
    for s in &mut job.steps {
        s.state = StepState::Skipped;
        s.message = Some("the recovery point check failed".into());
        s.start_time = s.start_time.take().or_else(|| Some(now.clone()));
        s.end_time = Some(now.clone());
    }
    job.state = JobState::Failed;
    job.end_time = Some(now);
    job.message = Some(why.clone());
    events.push(Note {
        warning: true,
        action: job_verb(job.type_),
        subject: job.name.clone(),
        reason: "JobFailed",
        message: format!("{} {} Failed: {why}", job_type_str(job.type_), job.name),
    });
    finished.push((job.type_, JobState::Failed));
}

fn start_job(
    input: &Input,
    st: &mut ReplicatedVMStatus,
    t: JobType,
    source: String,
    target: String,
    events: &mut Vec<Note>,
) {
    let name = next_job_name(input.name, t, &st.jobs);
    // A plan's unplanned failover first takes its point of the plan's consistent cut; the
    // cut id is the step's operation id (the site is idempotent by it).
    let cut = input.cut.filter(|_| t == JobType::UnplannedFailover);
    events.push(Note {
        warning: false,
        action: job_verb(t),
        subject: name.clone(),
        reason: "JobStarted",
        message: format!("{} {name} started: {source} -> {target}", job_type_str(t)),
    });
    st.jobs.push(Job {
        name,
        type_: t,
        source_site: Some(source),
        target_site: Some(target),
        state: JobState::Running,
        start_time: Some(input.now()),
        end_time: None,
        recovery_point: None,
        recovery_point_age_seconds: None,
        cut_id: None,
        attempt: Some(1),
        message: None,
        steps: cut
            .iter()
            .map(|c| (StepName::ConsistentCut, Some(c.id.clone())))
            .chain(steps_of(t).iter().map(|s| (*s, None)))
            .map(|(s, operation_id)| JobStep {
                name: s.as_str().to_string(),
                state: StepState::Pending,
                message: None,
                operation_id,
                start_time: None,
                end_time: None,
            })
            .collect(),
    });
    trim_jobs(st);
}

/// Keeps the newest [`MAX_JOBS`] jobs, never dropping a running one.
fn trim_jobs(st: &mut ReplicatedVMStatus) {
    while st.jobs.len() > MAX_JOBS {
        match st.jobs.iter().position(|j| j.state != JobState::Running) {
            Some(i) => {
                st.jobs.remove(i);
            }
            None => break,
        }
    }
}

/// Why a pending step is skipped, if it is.
fn skip_reason(input: &Input, job: &Job, step: StepName) -> Option<String> {
    let step_state = |n: StepName| {
        job.steps
            .iter()
            .find(|s| s.name == n.as_str())
            .map(|s| s.state)
    };
    let source = job.source_site.as_deref().unwrap_or_default();
    match (job.type_, step) {
        (JobType::UnplannedFailover, StepName::ShutdownSource | StepName::SyncRemaining)
            if !input.spec.failover.shutdown_source =>
        {
            Some("shutdownSource is false".into())
        }
        // The disaster does not wait for a site known to be down: a call to it would only
        // hang until its timeout. It is fenced when it answers again.
        (
            JobType::UnplannedFailover,
            StepName::ConsistentCut
            | StepName::ShutdownSource
            | StepName::FenceSource
            | StepName::SyncRemaining,
        ) if !input.view(source).reachable() => Some(format!(
            "skipped: site {source} is unreachable (its listing fails); the failover continues, \
             and {source} is fenced when it answers again"
        )),
        (JobType::UnplannedFailover, StepName::FenceSource)
            if step_state(StepName::ShutdownSource) == Some(StepState::Succeeded) =>
        {
            Some("source shut down".into())
        }
        _ => None,
    }
}

/// Moves the running job forward: skips what is to be skipped, marks the next step Running
/// with its operation id (persisted before the site is called), or ends the job.
fn advance(
    input: &Input,
    st: &mut ReplicatedVMStatus,
    events: &mut Vec<Note>,
    finished: &mut Vec<(JobType, JobState)>,
) {
    let Some(ji) = running_job(st) else { return };
    loop {
        let job = &st.jobs[ji];
        match current_step(job) {
            Some((_, StepState::Running)) => return,
            Some((si, _)) => {
                let name = StepName::parse(&job.steps[si].name);
                let skip = name.and_then(|n| skip_reason(input, job, n));
                let op = name.map(|n| attempt_operation_id(input.uid, job, n));
                let s = &mut st.jobs[ji].steps[si];
                match skip {
                    Some(why) => {
                        // A skipped step starts and ends when the job reaches it.
                        s.state = StepState::Skipped;
                        s.message = Some(why);
                        s.start_time = Some(input.now());
                        s.end_time = Some(input.now());
                    }
                    None => {
                        s.state = StepState::Running;
                        // A step that names its operation id already (ConsistentCut) keeps it.
                        s.operation_id = s.operation_id.take().or(op);
                        s.start_time = Some(input.now());
                        return;
                    }
                }
            }
            None => {
                finish_job(input, st, ji, events, finished);
                return;
            }
        }
    }
}

fn finish_job(
    input: &Input,
    st: &mut ReplicatedVMStatus,
    ji: usize,
    events: &mut Vec<Note>,
    finished: &mut Vec<(JobType, JobState)>,
) {
    let t = st.jobs[ji].type_;
    let failed_step = st.jobs[ji]
        .steps
        .iter()
        .find(|s| {
            s.state == StepState::Failed
                && (StepName::parse(&s.name).is_none_or(|n| !is_optional(t, n))
                    || s.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with(SOURCE_STILL_RUNS)))
        })
        .map(|s| format!("{} failed: {}", s.name, s.message.as_deref().unwrap_or("")));
    let state = if failed_step.is_some() {
        JobState::Failed
    } else {
        JobState::Succeeded
    };
    let now = input.now();
    let job = &mut st.jobs[ji];
    job.state = state;
    job.end_time = Some(now.clone());
    if job.message.is_none() || state == JobState::Failed {
        job.message = failed_step.or_else(|| job.message.clone());
    }
    if state == JobState::Failed && is_failover(t) {
        let where_ = where_failed_failover_left_the_vm(job);
        job.message = Some(match job.message.take() {
            Some(m) => format!("{m}; {where_}"),
            None => where_,
        });
    }
    let name = job.name.clone();
    let source = job.source_site.clone();
    let target = job.target_site.clone();
    if state == JobState::Succeeded {
        match t {
            JobType::PlannedFailover | JobType::UnplannedFailover => {
                st.active_site = target.clone();
                st.replication = Some(disabled_replication());
            }
            JobType::EnableReplication | JobType::ReverseReplicate => {
                // What the job's EnableReplication step sent.
                let settings = st.replication.as_ref().and_then(|r| r.settings.clone());
                st.replication = Some(ReplicationStatus {
                    state: ReplicationState::Replicating,
                    source_site: source,
                    target_site: target,
                    health: Some(ReplicationHealth::Healthy),
                    last_sync_time: None,
                    rpo_seconds: None,
                    settings,
                    progress: None,
                });
                // Figures from the listing right away, not in five minutes.
                refresh_replication_now(input, st);
            }
            JobType::Commit => st.recovery_points = None,
            JobType::DisableReplication => {
                st.replication = Some(disabled_replication());
                st.recovery_points = None;
            }
            JobType::TestFailoverCleanup => st.test_failover = None,
            _ => {}
        }
    }
    if t == JobType::TestFailover {
        st.last_drill = Some(DrillRecord {
            job: name.clone(),
            time: Some(now),
            result: if state == JobState::Succeeded {
                "Succeeded".into()
            } else {
                "Failed".into()
            },
        });
    }
    let job = &st.jobs[ji];
    events.push(Note {
        warning: state == JobState::Failed,
        action: job_verb(t),
        subject: name.clone(),
        reason: if state == JobState::Failed {
            "JobFailed"
        } else {
            "JobSucceeded"
        },
        message: match &job.message {
            Some(m) => format!("{} {name} {state:?}: {m}", job_type_str(t)),
            None => format!("{} {name} {state:?}", job_type_str(t)),
        },
    });
    finished.push((t, state));
}

/// Where a failed failover left the VM, for the job's message.
fn where_failed_failover_left_the_vm(job: &Job) -> String {
    let state = |n: StepName| {
        job.steps
            .iter()
            .find(|s| s.name == n.as_str())
            .map(|s| s.state)
    };
    let ok = |n: StepName| state(n) == Some(StepState::Succeeded);
    let source = job.source_site.as_deref().unwrap_or("the source");
    let target = job.target_site.as_deref().unwrap_or("the target");
    if ok(StepName::StartAtTarget) {
        format!("the VM runs at {target}")
    } else if ok(StepName::RestartSource) {
        format!("the VM runs at {source} (started again there)")
    } else if state(StepName::RestartSource).is_some() {
        format!(
            "the VM runs at neither site: it was stopped at {source} and starting it again there \
             failed"
        )
    } else if ok(StepName::ShutdownSource) || ok(StepName::FenceSource) {
        format!("the VM is off at {source}")
    } else {
        format!("the VM runs at {source}: it was not stopped there")
    }
}

fn disabled_replication() -> ReplicationStatus {
    ReplicationStatus {
        state: ReplicationState::Disabled,
        source_site: None,
        target_site: None,
        health: None,
        last_sync_time: None,
        rpo_seconds: None,
        settings: None,
        progress: None,
    }
}

/// Records what a site call gave for the step it was made for, and moves the job on.
pub fn record_outcome(input: &Input, call: &StepCall, outcome: Outcome) -> Plan {
    let mut st = input.status.clone();
    let valid = st
        .jobs
        .get(call.job)
        .filter(|j| j.name == call.job_name && j.state == JobState::Running)
        .and_then(|j| j.steps.get(call.step))
        .is_some_and(|s| s.state == StepState::Running);
    if !valid {
        // The status moved on meanwhile (another writer): plan again from it.
        return Plan::Idle(Duration::ZERO);
    }
    let mut events = Vec::new();
    let mut finished = Vec::new();
    // A required step whose site has not answered by its deadline fails its job: the operator
    // gets a stalled job and a way on instead of a retry without end.
    let limit = input.spec.failover.step_timeout();
    let outcome = match outcome {
        Outcome::Unreachable(m)
            if !call.optional && overdue(input, &st.jobs[call.job].steps[call.step], limit) =>
        {
            Outcome::Failed(format!(
                "no answer before its {DEADLINE_PASSED} ({limit} s, \
                 spec.failover.stepTimeoutSeconds): {m}"
            ))
        }
        o => o,
    };
    // FenceSource of an unplanned failover that failed while the source is known to run the
    // VM (its power off was answered with an error, or a fresh listing shows the VM running):
    // the failover must not go on to start the VM at the target. The fence is retried, backing
    // off, until the step's deadline; then the failover fails with the VM at the source.
    if call.job_type == JobType::UnplannedFailover && call.step_name == StepName::FenceSource {
        let job = &st.jobs[call.job];
        let refused = match &outcome {
            Outcome::Failed(m) => Some(m.clone()),
            Outcome::Unreachable(m) if source_runs(input, job) => Some(m.clone()),
            _ => None,
        };
        if let Some(m) = refused {
            let (source, target) = (call.source.as_str(), call.target.as_str());
            if overdue(input, &job.steps[call.step], limit) {
                let msg = format!(
                    "{SOURCE_STILL_RUNS}: power off at {source} failed until its \
                     {DEADLINE_PASSED} ({limit} s, spec.failover.stepTimeoutSeconds): {m}; the \
                     VM was not started at {target}"
                );
                let job = &mut st.jobs[call.job];
                let s = &mut job.steps[call.step];
                s.state = StepState::Failed;
                s.end_time = Some(input.now());
                s.message = Some(msg.clone());
                events.push(Note {
                    warning: true,
                    action: job_verb(call.job_type),
                    subject: format!("{}/{}", job.name, s.name),
                    reason: "StepFailed",
                    message: format!("{}: {} failed: {msg}", job.name, s.name),
                });
                fail_remaining(input, &mut st, call.job);
                advance(input, &mut st, &mut events, &mut finished);
            } else {
                let msg = Some(format!(
                    "retrying, backing off: power off failed: {m}; the VM is not started at \
                     {target} while it runs at {source}"
                ));
                let s = &mut st.jobs[call.job].steps[call.step];
                if s.message == msg {
                    return Plan::Idle(RETRY_UNREACHABLE);
                }
                s.message = msg;
            }
            finalize(input, &mut st, None, &mut events);
            return Plan::Write(Box::new(Update {
                status: st,
                events,
                finished,
            }));
        }
    }
    match outcome {
        Outcome::Unreachable(m) if !call.optional => {
            // Retried with the same operation id; the site does the work once.
            let s = &mut st.jobs[call.job].steps[call.step];
            let msg = Some(format!("retrying: {m}"));
            if s.message == msg {
                return Plan::Idle(RETRY_UNREACHABLE);
            }
            s.message = msg;
        }
        Outcome::Succeeded { .. } => {
            apply_step_success(
                input,
                &mut st,
                call.job,
                call.step,
                &outcome,
                Some(&call.replication),
            );
            advance(input, &mut st, &mut events, &mut finished);
        }
        Outcome::Failed(m) | Outcome::Unreachable(m) => {
            fail_step(
                input,
                &mut st,
                call.job,
                call.step,
                call.job_type,
                call.step_name,
                m,
                &mut events,
            );
            if call.step_name == StepName::VerifyDigests
                && let Some(r) = st
                    .replication
                    .as_mut()
                    .filter(|r| r.state != ReplicationState::Disabled)
            {
                // The replica is not what the source holds: never Healthy until resynchronized.
                r.health = Some(ReplicationHealth::Critical);
            }
            advance(input, &mut st, &mut events, &mut finished);
        }
    }
    finalize(input, &mut st, None, &mut events);
    Plan::Write(Box::new(Update {
        status: st,
        events,
        finished,
    }))
}

/// Whether `step` started at least `limit` seconds ago.
fn overdue(input: &Input, step: &JobStep, limit: i64) -> bool {
    step.start_time
        .as_ref()
        .is_some_and(|t| (input.now - t.0).get_seconds() >= limit)
}

fn copy_limit(input: &Input) -> i64 {
    input.spec.replication.copy_timeout()
}

/// Marks step `si` of job `ji` Failed with `m`, with its Event; a required step fails the rest
/// of the job (see [`fail_remaining`]).
#[allow(clippy::too_many_arguments)]
fn fail_step(
    input: &Input,
    st: &mut ReplicatedVMStatus,
    ji: usize,
    si: usize,
    job_type: JobType,
    step: StepName,
    m: String,
    events: &mut Vec<Note>,
) {
    let optional = is_optional(job_type, step);
    let job = &mut st.jobs[ji];
    let s = &mut job.steps[si];
    s.state = StepState::Failed;
    s.end_time = Some(input.now());
    let msg = if optional {
        format!("{m}; {} continues", job_word(job_type))
    } else {
        m
    };
    s.message = Some(msg.clone());
    events.push(Note {
        warning: true,
        action: job_verb(job_type),
        subject: format!("{}/{}", job.name, s.name),
        reason: "StepFailed",
        message: format!("{}: {} failed: {msg}", job.name, s.name),
    });
    if !optional {
        fail_remaining(input, st, ji);
    }
}

/// A required step failed: the steps after it are skipped, and a planned failover that had
/// shut the source down starts it again (the VM keeps running where it was).
fn fail_remaining(input: &Input, st: &mut ReplicatedVMStatus, ji: usize) {
    let now = input.now();
    let job = &mut st.jobs[ji];
    for s in job
        .steps
        .iter_mut()
        .filter(|s| s.state == StepState::Pending)
    {
        s.state = StepState::Skipped;
        s.message = Some("an earlier step failed".into());
        s.start_time = Some(now.clone());
        s.end_time = Some(now.clone());
    }
    // Shut down or powered off by this job: an unplanned failover that stopped the source
    // starts it again too, so a failure never leaves the VM off at both sites.
    let shut_down = job.steps.iter().any(|s| {
        (s.name == StepName::ShutdownSource.as_str() || s.name == StepName::FenceSource.as_str())
            && s.state == StepState::Succeeded
    });
    let started = job
        .steps
        .iter()
        .any(|s| s.name == StepName::StartAtTarget.as_str() && s.state == StepState::Succeeded);
    let restarting = job
        .steps
        .iter()
        .any(|s| s.name == StepName::RestartSource.as_str());
    if is_failover(job.type_) && shut_down && !started && !restarting {
        job.steps.push(JobStep {
            name: StepName::RestartSource.as_str().into(),
            state: StepState::Pending,
            message: None,
            operation_id: None,
            start_time: None,
            end_time: None,
        });
    }
}

/// `sent`: the replication settings the step's call sent (EnableReplication).
fn apply_step_success(
    input: &Input,
    st: &mut ReplicatedVMStatus,
    ji: usize,
    si: usize,
    outcome: &Outcome,
    sent: Option<&ReplicationSpec>,
) {
    let now = input.now();
    let job = &mut st.jobs[ji];
    let name = StepName::parse(&job.steps[si].name);
    let (message, rp, test_vm) = match outcome {
        Outcome::Succeeded {
            message,
            recovery_point,
            test_vm,
        } => (message.clone(), recovery_point.clone(), test_vm.clone()),
        _ => (None, None, None),
    };
    {
        let s = &mut job.steps[si];
        s.state = StepState::Succeeded;
        s.end_time = Some(now.clone());
        s.message = message;
    }
    let source = job.source_site.clone();
    let target = job.target_site.clone();
    match name {
        Some(StepName::ConsistentCut) => {
            // The cut id is recorded only when the cut gave this VM its point; StartAtTarget
            // then starts from that point.
            if let Some(rp) = &rp {
                job.cut_id = job.steps[si].operation_id.clone();
                job.recovery_point = Some(rp.id.clone());
            }
        }
        Some(StepName::StartAtTarget) => {
            if let Some(rp) = &rp {
                job.recovery_point = Some(rp.id.clone());
                job.recovery_point_age_seconds =
                    rp.time.map(|t| (input.now - t).get_seconds().max(0));
            }
            // The VM runs at the target from here on, whatever happens next.
            st.active_site = target;
        }
        Some(StepName::CreateTestCopy) => {
            if let Some(rp) = &rp {
                job.recovery_point = Some(rp.id.clone());
                job.recovery_point_age_seconds =
                    rp.time.map(|t| (input.now - t).get_seconds().max(0));
            }
            st.test_failover = Some(TestFailoverStatus {
                state: "Running".into(),
                vm_name: test_vm.unwrap_or_else(|| format!("{}-test", input.vm_name)),
                site: target.unwrap_or_default(),
            });
        }
        Some(StepName::DeleteTestCopy) => st.test_failover = None,
        Some(StepName::EnableReplication) => {
            st.replication = Some(ReplicationStatus {
                state: if job.type_ == JobType::ReverseReplicate {
                    ReplicationState::Resynchronizing
                } else {
                    ReplicationState::InitialReplication
                },
                source_site: source,
                target_site: target,
                // No replica to fail over to until the copy or resync ends.
                health: Some(ReplicationHealth::Warning),
                last_sync_time: None,
                rpo_seconds: None,
                settings: sent.map(ReplicationSettings::from),
                progress: None,
            });
        }
        // Nothing replicates from here on (the recovery points stay at the target), whatever
        // happens next: a failover that fails after this step leaves replication stopped.
        Some(StepName::StopReplication) => st.replication = Some(disabled_replication()),
        Some(StepName::RemoveReplica) => st.recovery_points = None,
        Some(StepName::Commit) => st.recovery_points = None,
        _ => {}
    }
}

/// A VM that runs at the site it must not (the VM runs at status.activeSite). Never while a
/// failover job runs (its steps own both sites then), and only on a listing taken after the
/// newest job ended, so the controller's own recent actions are never mistaken for drift.
fn fence_needed(input: &Input) -> Option<FenceCall> {
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

/// Records a fence. The failover that left the VM behind carries it: its FenceSource step
/// (failed at the time, the site did not answer) becomes Succeeded, or one is added.
pub fn record_fence(input: &Input, fence: &FenceCall, outcome: Outcome) -> Plan {
    let mut st = input.status.clone();
    let mut events = Vec::new();
    match outcome {
        Outcome::Succeeded { .. } => {
            let msg = format!(
                "VM {} found running at {} where it must not run; powered off",
                fence.vm, fence.site
            );
            let job = st.jobs.iter_mut().rev().find(|j| {
                is_failover(j.type_) && j.source_site.as_deref() == Some(fence.site.as_str())
            });
            if let Some(job) = job {
                let existing = job.steps.iter_mut().find(|s| {
                    s.name == StepName::FenceSource.as_str() && s.state != StepState::Succeeded
                });
                match existing {
                    Some(s) => {
                        s.state = StepState::Succeeded;
                        s.message = Some(msg.clone());
                        s.operation_id = Some(fence.op_id.clone());
                        s.start_time = s.start_time.take().or_else(|| Some(input.now()));
                        s.end_time = Some(input.now());
                    }
                    None => job.steps.push(JobStep {
                        name: StepName::FenceSource.as_str().into(),
                        state: StepState::Succeeded,
                        message: Some(msg.clone()),
                        operation_id: Some(fence.op_id.clone()),
                        start_time: Some(input.now()),
                        end_time: Some(input.now()),
                    }),
                }
            }
            events.push(Note {
                warning: true,
                action: "Fence",
                subject: fence.op_id.clone(),
                reason: "Fenced",
                message: msg,
            });
        }
        Outcome::Failed(m) | Outcome::Unreachable(m) => {
            events.push(Note {
                warning: true,
                action: "Fence",
                subject: format!("fence-{}", fence.site),
                reason: "FenceFailed",
                message: format!(
                    "VM {} runs at {} where it must not; power off failed: {m}",
                    fence.vm, fence.site
                ),
            });
            return Plan::Write(Box::new(Update {
                status: st,
                events,
                finished: vec![],
            }));
        }
    }
    finalize(input, &mut st, None, &mut events);
    Plan::Write(Box::new(Update {
        status: st,
        events,
        finished: vec![],
    }))
}

/// Live RPO: age of the newest recovery point at the replication target.
pub fn live_rpo(input: &Input, st: &ReplicatedVMStatus) -> Option<i64> {
    let r = replication_on(st)?;
    let target = r.target_site.as_deref()?;
    let source = r.source_site.as_deref()?;
    let t = input
        .view(target)
        .vm()
        .and_then(|v| v.recovery_points.as_ref()?.latest.as_ref()?.time)
        .or_else(|| {
            input
                .view(source)
                .vm()?
                .replication
                .as_ref()?
                .last_sync_time
        })?;
    Some((input.now - t).get_seconds().max(0))
}

/// Health from RPO: Warning over 2x the interval, Critical at 3x or more.
pub fn health_of(rpo: i64, interval: i64) -> ReplicationHealth {
    let interval = interval.max(1);
    if rpo >= 3 * interval {
        ReplicationHealth::Critical
    } else if rpo > 2 * interval {
        ReplicationHealth::Warning
    } else {
        ReplicationHealth::Healthy
    }
}

fn observed_state(s: ObservedReplicationState) -> Option<ReplicationState> {
    Some(match s {
        ObservedReplicationState::Disabled => ReplicationState::Disabled,
        ObservedReplicationState::InitialReplication => ReplicationState::InitialReplication,
        ObservedReplicationState::Replicating => ReplicationState::Replicating,
        ObservedReplicationState::Resynchronizing => ReplicationState::Resynchronizing,
        ObservedReplicationState::Error => ReplicationState::Error,
        ObservedReplicationState::Other => return None,
    })
}

/// The replication block and recovery point summary as the listings show them now.
fn observed_replication(
    input: &Input,
    st: &ReplicatedVMStatus,
) -> Option<(ReplicationStatus, Option<RecoveryPointSummary>)> {
    let r = replication_on(st)?;
    let source = r.source_site.as_deref()?;
    let target = r.target_site.as_deref()?;
    let rps = input
        .view(target)
        .vm()
        .and_then(|v| v.recovery_points.as_ref())
        .map(|p| RecoveryPointSummary {
            count: p.count,
            latest: p.latest.as_ref().map(rp_ref),
            latest_app_consistent: p.latest_app_consistent.as_ref().map(rp_ref),
        });
    // The source, listed after the newest job ended, replicates no more (its replication was
    // stopped, or disabled at the site): the status says so, with no stale health, RPO or
    // direction.
    let src_view = input.view(source);
    if src_view.fetched_since(newest_job_end(st))
        && src_view.vm().is_some_and(|v| {
            v.replication
                .as_ref()
                .is_none_or(|rep| rep.state == ObservedReplicationState::Disabled)
        })
    {
        return Some((
            disabled_replication(),
            rps.or_else(|| st.recovery_points.clone()),
        ));
    }
    let mut new = r.clone();
    let src = src_view.vm();
    if let Some(state) = src
        .and_then(|v| v.replication.as_ref())
        .and_then(|rep| observed_state(rep.state))
        && state != ReplicationState::Disabled
    {
        new.state = state;
    }
    if let Some(t) = src.and_then(|v| v.replication.as_ref()?.last_sync_time) {
        new.last_sync_time = Some(Time(t));
    }
    if new.last_sync_time.is_none()
        && let Some(t) = rps.as_ref().and_then(|p| p.latest.as_ref()?.time.clone())
    {
        new.last_sync_time = Some(t);
    }
    new.rpo_seconds = live_rpo(input, st);
    // Health against the copy frequency the source runs with: a spec change it has not taken
    // is shown as such (SettingsApplied), not as an RPO the site was never asked to meet.
    let interval = src
        .and_then(|v| v.replication.as_ref()?.interval_seconds)
        .unwrap_or(input.spec.replication.interval_seconds);
    new.health = match (new.state, new.rpo_seconds) {
        (
            ReplicationState::Replicating | ReplicationState::Error | ReplicationState::Paused,
            Some(rpo),
        ) => Some(health_of(rpo, interval)),
        (ReplicationState::Error, None) => Some(ReplicationHealth::Critical),
        // The target holds no replica a failover can trust until the copy or resync ends:
        // Warning at best, Critical once the RPO says so.
        (ReplicationState::InitialReplication | ReplicationState::Resynchronizing, rpo) => {
            Some(match rpo.map(|r| health_of(r, interval)) {
                Some(ReplicationHealth::Critical) => ReplicationHealth::Critical,
                _ => ReplicationHealth::Warning,
            })
        }
        _ => new.health,
    };
    // The target, listed after the newest job ended, holds no recovery point of the VM (its
    // copy was lost, or a resync is filling a new one): nothing a failover could start from,
    // whatever the source still reports.
    let target_view = input.view(target);
    let no_point = target_view.fetched_since(newest_job_end(st))
        && target_view.vm().is_none_or(|v| v.recovery_points.is_none());
    if no_point
        && matches!(
            new.state,
            ReplicationState::Replicating | ReplicationState::Error | ReplicationState::Paused
        )
    {
        new.health = Some(ReplicationHealth::Critical);
    }
    if resync_due(st).is_some() {
        // A failed digest verification: the replica differs until the resync has run.
        new.health = Some(ReplicationHealth::Critical);
    }
    // A VM that is off makes no new data, but it does not run either: not Healthy.
    if vm_off(input, st).is_some() && new.health == Some(ReplicationHealth::Healthy) {
        new.health = Some(ReplicationHealth::Warning);
    }
    Some((new, rps.or_else(|| st.recovery_points.clone())))
}

fn newest_job_end(st: &ReplicatedVMStatus) -> Option<Timestamp> {
    st.jobs
        .last()
        .and_then(|j| j.end_time.as_ref())
        .map(|t| t.0)
}

/// The VM is off at the site where it runs (a listing taken after the newest job ended): the
/// Ready message. The controller never starts it on its own; a person does.
fn vm_off(input: &Input, st: &ReplicatedVMStatus) -> Option<String> {
    let active = st.active_site.as_deref()?;
    let vm = input.view(active).vm_since(newest_job_end(st))?;
    (vm.power == Power::Off && vm.role == Role::Primary).then(|| {
        format!(
            "VM {} is off at {active}, where it should run; twinsite does not start it on its \
             own: start it at {active}",
            input.vm_name
        )
    })
}

fn rp_ref(p: &ObservedRecoveryPoint) -> RecoveryPointRef {
    RecoveryPointRef {
        id: p.id.clone(),
        time: p.time.map(Time),
        app_consistent: p.app_consistent,
    }
}

/// Brings the replication figures up to date, but only at a coarse period: at once when the
/// state, direction or health changes, otherwise when the recorded last sync is at least
/// [`STATUS_REFRESH`] older than the observed one. A steady VM writes its status rarely.
fn refresh_replication(input: &Input, st: &mut ReplicatedVMStatus) {
    let Some((new, rps)) = observed_replication(input, st) else {
        return;
    };
    let Some(old) = st.replication.as_ref() else {
        return;
    };
    let significant = old.state != new.state
        || old.health != new.health
        || old.source_site != new.source_site
        || old.target_site != new.target_site
        || old.rpo_seconds.is_none() && new.rpo_seconds.is_some();
    let stale = match (&old.last_sync_time, &new.last_sync_time) {
        (None, Some(_)) => true,
        (Some(o), Some(n)) => (n.0 - o.0).get_seconds() >= STATUS_REFRESH.as_secs() as i64,
        _ => false,
    };
    if significant || stale {
        st.replication = Some(new);
        st.recovery_points = rps;
    }
}

/// The source's bulk transfer (initial copy or resync) as the newest listing of the source
/// shows it: copied into status while one runs, removed once the listing shows none. Kept as
/// it was while the source cannot be listed. A listing changes once per site poll, so this
/// changes status at most that often.
fn refresh_progress(input: &Input, st: &mut ReplicatedVMStatus) {
    let Some(r) = st.replication.as_mut() else {
        return;
    };
    let observed = match (r.state, r.source_site.as_deref()) {
        (ReplicationState::Disabled, _) | (_, None) => None,
        (_, Some(source)) => {
            let view = input.view(source);
            if !view.reachable() {
                return;
            }
            view.vm()
                .and_then(|v| v.replication.as_ref())
                .filter(|rep| {
                    rep.direction != Some(Direction::Inbound)
                        && rep
                            .peer_site
                            .as_deref()
                            .is_none_or(|p| Some(p) == r.target_site.as_deref())
                })
                .and_then(|rep| rep.progress)
        }
    };
    r.progress = observed.map(|(done, total)| progress_of(done, total));
}

/// Bytes done of a total as status shows them (done never past total).
pub fn progress_of(done: u64, total: u64) -> ReplicationProgress {
    let done = done.min(total);
    let percent = if total == 0 {
        100
    } else {
        (u128::from(done) * 100 / u128::from(total)) as i64
    };
    ReplicationProgress {
        done_bytes: i64::try_from(done).unwrap_or(i64::MAX),
        total_bytes: i64::try_from(total).unwrap_or(i64::MAX),
        percent,
        summary: format!("{percent}%"),
    }
}

fn refresh_replication_now(input: &Input, st: &mut ReplicatedVMStatus) {
    if let Some((new, rps)) = observed_replication(input, st) {
        st.replication = Some(new);
        st.recovery_points = rps;
    }
}

/// Stalled's message for a failed job: what failed and the two ways on (retry, or a spec
/// change).
fn stalled_message(input: &Input, st: &ReplicatedVMStatus) -> String {
    let Some(j) = standing_job(st) else {
        return "the newest job failed; change the spec to try again".into();
    };
    if st.jobs.last() != Some(j) {
        // A planned failover that failed on its digests, resynchronized since: a spec change
        // is its next attempt (a retry would run it from VerifyDigests on a new copy).
        return format!(
            "{} {} failed: {}; change the spec to try again",
            job_type_str(j.type_),
            j.name,
            j.message.as_deref().unwrap_or("")
        );
    }
    let next = j.attempt.unwrap_or(1).saturating_add(1);
    let value = if next == 2 {
        j.name.clone()
    } else {
        format!("{}/{next}", j.name)
    };
    // A planned failover that a site let down at its deadline: it can also go on as an
    // unplanned one, from a recovery point, without the source.
    let timed_out = j.type_ == JobType::PlannedFailover
        && j.steps.iter().any(|s| {
            s.state == StepState::Failed
                && s.message
                    .as_deref()
                    .is_some_and(|m| m.contains(DEADLINE_PASSED))
        });
    let unplanned = if timed_out {
        " once the site answers again, or set spec.failover.type to Unplanned to fail over now \
         from a recovery point without the source (what was written after the newest recovery \
         point at the target is lost)"
    } else {
        ", or change the spec"
    };
    format!(
        "{} {} failed (attempt {}): {}; fix the cause, then run it again from the step that \
         failed with kubectl annotate rvm {} {}={value} --overwrite{unplanned}",
        job_type_str(j.type_),
        j.name,
        next - 1,
        j.message.as_deref().unwrap_or(""),
        input.name,
        crate::api::RETRY_ANNOTATION,
    )
}

/// Whether the replication source runs with the spec's settings.
enum Settings {
    /// The source has not been listed since the newest job ended, or does not say.
    Unknown,
    Applied,
    NoReplication,
    /// Ready's message: what the source runs with, and the ways on.
    NotApplied(String),
}

/// The source's listing (taken after the newest job ended) against the spec's settings. A
/// settings change is sent to the running replication ([`settings_call`]); until the source
/// shows it, it is not applied.
fn settings_state(input: &Input, st: &ReplicatedVMStatus) -> Settings {
    let Some(r) = replication_on(st) else {
        return Settings::NoReplication;
    };
    let Some(source) = r.source_site.as_deref() else {
        return Settings::NoReplication;
    };
    let spec = &input.spec.replication;
    // What the source runs with: its listing, else what was last sent to it (an older site
    // does not list retention and app-consistent frequency).
    let listed = input
        .view(source)
        .vm_since(newest_job_end(st))
        .and_then(|v| v.replication.as_ref());
    let sent = r.settings.as_ref();
    let interval = listed
        .and_then(|l| l.interval_seconds)
        .or(sent.map(|s| s.interval_seconds));
    let retention = listed
        .and_then(|l| l.retention_hours)
        .or(sent.map(|s| s.recovery_point_retention_hours));
    let app_consistent = listed
        .and_then(|l| l.app_consistent_hours)
        .or(sent.map(|s| s.app_consistent_frequency_hours));
    let mut differ = Vec::new();
    let mut check = |field: &str, runs: Option<i64>, asked: i64| {
        if let Some(runs) = runs.filter(|r| *r != asked) {
            differ.push(format!("{field} {runs} (spec: {asked})"));
        }
    };
    check("intervalSeconds", interval, spec.interval_seconds);
    check(
        "recoveryPointRetentionHours",
        retention,
        spec.recovery_point_retention_hours,
    );
    check(
        "appConsistentFrequencyHours",
        app_consistent,
        spec.app_consistent_frequency_hours,
    );
    if differ.is_empty() {
        return if interval.is_some() {
            Settings::Applied
        } else {
            Settings::Unknown
        };
    }
    Settings::NotApplied(format!(
        "site {source} replicates VM {} with {}; the spec's settings are being sent to its \
         running replication (no new copy, the recovery points stay)",
        input.vm_name,
        differ.join(", ")
    ))
}

/// Condition ReplicationError from the replication source's listing: True with the agent's
/// own message while it reports an error for the VM's outbound replication (a copy or cycle
/// that keeps failing: the peer refuses it, a disk is full, the peer does not answer). None
/// when the source cannot be listed now.
fn replication_error(input: &Input, st: &ReplicatedVMStatus) -> Option<Cond> {
    let no_error = || Some(Cond::new(REPLICATION_ERROR, false, "NoError", ""));
    let Some(source) = replication_on(st).and_then(|r| r.source_site.as_deref()) else {
        return no_error();
    };
    let view = input.view(source);
    if !view.reachable() {
        return None;
    }
    let error = view
        .vm()
        .and_then(|v| v.replication.as_ref())
        .filter(|r| r.direction != Some(Direction::Inbound))
        .and_then(|r| r.last_error.as_deref());
    match error {
        Some(e) => Some(Cond::new(
            REPLICATION_ERROR,
            true,
            "AgentError",
            format!(
                "site {source} reports an error replicating VM {}: {e}",
                input.vm_name
            ),
        )),
        None => no_error(),
    }
}

/// Phase and conditions from the status and the spec, computed in one place.
fn finalize(
    input: &Input,
    st: &mut ReplicatedVMStatus,
    wait: Option<Wait>,
    events: &mut Vec<Note>,
) {
    // A spec change while the resync after a digest mismatch runs is the answer to the failed
    // failover: it is observed only once that resync has ended, so the failover's stall does
    // not swallow it.
    st.observed_generation = if mismatch_resync_running(input.status) || mismatch_resync_running(st)
    {
        input.status.observed_generation.or(input.generation)
    } else {
        input.generation
    };
    let running = running_job(st).map(|i| st.jobs[i].clone());
    let running = running.as_ref();
    let stalled = running.is_none()
        && standing_job(st).is_some_and(|j| j.state == JobState::Failed)
        && input
            .status
            .observed_generation
            .is_none_or(|g| Some(g) == input.generation)
        && wait.is_none();
    let commit = uncommitted_failover(st)
        .filter(|_| running.is_none())
        .cloned();
    let commit_pending = commit.is_some() && input.spec.failover.commit == CommitMode::Manual;
    let rep_state = replication_on(st).map(|r| r.state);

    let base_phase = if st.active_site.is_none() {
        VmPhase::Pending
    } else {
        match rep_state {
            Some(ReplicationState::InitialReplication) => VmPhase::InitialReplication,
            Some(ReplicationState::Resynchronizing) => VmPhase::Reprotecting,
            Some(_) => VmPhase::Protected,
            None => VmPhase::Unprotected,
        }
    };
    let phase = match running.map(|j| j.type_) {
        Some(JobType::EnableReplication) => VmPhase::InitialReplication,
        Some(JobType::PlannedFailover | JobType::UnplannedFailover) => VmPhase::FailingOver,
        Some(JobType::ReverseReplicate) => VmPhase::Reprotecting,
        Some(JobType::Commit) => VmPhase::FailedOver,
        Some(_) => base_phase,
        None if stalled => VmPhase::Failed,
        None if commit.is_some() => VmPhase::FailedOver,
        None => base_phase,
    };
    st.phase = Some(phase);

    let mut want = Vec::new();
    // Why a VM that is not Ready still moves on its own (Reconciling=True), or why it needs a
    // person although no job failed (Stalled=True).
    let mut progressing: Option<(&'static str, String)> = None;
    // Why a person is needed although no job failed (Stalled's reason and message).
    let mut needs_person: Option<(&'static str, String)> = None;
    let settings = if running.is_none() {
        settings_state(input, st)
    } else {
        Settings::Unknown
    };
    match running {
        Some(j) => {
            let step = current_step(j)
                .map(|(i, _)| j.steps[i].name.clone())
                .unwrap_or_default();
            let mut msg = format!("{} {} at step {step}", job_type_str(j.type_), j.name);
            if input.deleting {
                msg = format!("{DELETION_WAITS} {} to end ({msg})", j.name);
            }
            want.push(Cond::new(READY, false, "JobRunning", msg.clone()));
            want.push(Cond::new(RECONCILING, true, job_type_str(j.type_), msg));
        }
        None => {
            let desired = input.desired();
            let in_place = st.active_site.as_deref() == Some(desired);
            let replication_matches = input.spec.replication.enabled
                == rep_state.is_some_and(|s| s == ReplicationState::Replicating)
                || !input.spec.replication.enabled && rep_state.is_none();
            let drill_matches = input.spec.test_failover.enabled == st.test_failover.is_some();
            if stalled {
                let j = standing_job(st);
                let msg = j
                    .map(|j| {
                        format!(
                            "{} {} failed: {}",
                            job_type_str(j.type_),
                            j.name,
                            j.message.as_deref().unwrap_or("")
                        )
                    })
                    .unwrap_or_default();
                want.push(Cond::new(READY, false, "JobFailed", msg));
            } else if let Some(c) = input.conflict {
                want.push(Cond::new(READY, false, "Conflict", c.message.clone()));
            } else if let Some(w) = &wait {
                want.push(Cond::new(READY, false, w.reason, w.message.clone()));
                progressing = Some((w.reason, w.message.clone()));
            } else if let Some(msg) = vm_off(input, st) {
                if !input
                    .status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == READY && c.status == "False" && c.reason == VM_NOT_RUNNING)
                {
                    events.push(Note {
                        warning: true,
                        action: "Observe",
                        subject: format!("vm-off-{}", st.active_site.as_deref().unwrap_or("")),
                        reason: VM_NOT_RUNNING,
                        message: msg.clone(),
                    });
                }
                want.push(Cond::new(READY, false, VM_NOT_RUNNING, msg.clone()));
                // The controller does not start it: only a person can.
                needs_person = Some((VM_NOT_RUNNING, msg));
            } else if let Settings::NotApplied(msg) = &settings
                && input.spec.replication.enabled
            {
                // The settings call that follows makes the Event (SettingsChanged or
                // SettingsFailed).
                want.push(Cond::new(READY, false, SETTINGS_NOT_APPLIED, msg.clone()));
                // The controller sends them to the source: progress, not a person's job.
                progressing = Some((SETTINGS_NOT_APPLIED, msg.clone()));
            } else if let Some((reason, msg)) = replication_in_progress(input, st)
                && in_place
                && input.spec.replication.enabled
            {
                want.push(Cond::new(READY, false, reason, msg.clone()));
                progressing = Some((reason, msg));
            } else if in_place
                && replication_matches
                && drill_matches
                && matches!(phase, VmPhase::Protected | VmPhase::Unprotected)
            {
                let reason = match phase {
                    VmPhase::Protected => "Protected",
                    _ => "Unprotected",
                };
                want.push(Cond::new(
                    READY,
                    true,
                    reason,
                    format!("runs at {desired} as the spec says"),
                ));
            } else {
                let msg = "the next job is being planned";
                want.push(Cond::new(READY, false, "Progressing", msg));
                progressing = Some(("Progressing", msg.to_string()));
            }
            // kstatus: a VM that is not Ready is either still progressing (Reconciling) or
            // needs a person (Stalled), never neither.
            want.push(match &progressing {
                Some((reason, msg)) => Cond::new(RECONCILING, true, *reason, msg.clone()),
                None => Cond::new(RECONCILING, false, "Idle", "no job runs"),
            });
        }
    }
    want.push(match (stalled, input.conflict, &needs_person) {
        (true, _, _) => Cond::new(STALLED, true, "JobFailed", stalled_message(input, st)),
        // A conflict needs a person too; a job already running still ends first.
        (false, Some(c), _) if running.is_none() => {
            Cond::new(STALLED, true, "Conflict", c.message.clone())
        }
        (false, None, Some((reason, msg))) => Cond::new(STALLED, true, *reason, msg.clone()),
        _ => Cond::new(STALLED, false, "NotStalled", ""),
    });
    want.push(match (commit_pending, &commit) {
        (true, Some(j)) => Cond::new(
            COMMIT_PENDING,
            true,
            "WaitingForCommit",
            format!(
                "annotate the ReplicatedVM with {}={} to commit",
                crate::api::COMMIT_ANNOTATION,
                j.name
            ),
        ),
        _ => Cond::new(COMMIT_PENDING, false, "NoCommitPending", ""),
    });
    want.push(match input.conflict {
        Some(c) => Cond::new(CONFLICT, true, c.reason.clone(), c.message.clone()),
        None => Cond::new(CONFLICT, false, "NoConflict", ""),
    });
    match settings {
        Settings::Unknown if st.conditions.iter().any(|c| c.type_ == SETTINGS_APPLIED) => {}
        Settings::Unknown | Settings::Applied => {
            want.push(Cond::new(SETTINGS_APPLIED, true, "Applied", ""))
        }
        Settings::NoReplication => {
            want.push(Cond::new(SETTINGS_APPLIED, true, "NoReplication", ""))
        }
        Settings::NotApplied(m) => {
            want.push(Cond::new(SETTINGS_APPLIED, false, SETTINGS_NOT_APPLIED, m))
        }
    }
    match replication_error(input, st) {
        Some(c) => want.push(c),
        // The source cannot be listed now: what it reported last stands.
        None if st.conditions.iter().any(|c| c.type_ == REPLICATION_ERROR) => {}
        None => want.push(Cond::new(REPLICATION_ERROR, false, "NoError", "")),
    }
    conditions::set_all(&mut st.conditions, &want, input.generation, input.now);
    // A conflict is news once, when its condition turns True.
    if let Some(c) = input.conflict
        && !conditions::is_true(&input.status.conditions, CONFLICT)
    {
        events.push(Note {
            warning: true,
            action: "Hold",
            subject: format!("conflict: {}", c.message),
            reason: "Conflict",
            message: format!("held where it runs, no job starts: {}", c.message),
        });
    }
}

#[cfg(test)]
mod tests;
