//! Job progress: the site call of a step, what a step's outcome changes, skipped and failed
//! steps, and what a finished job changes in status.

use super::fencing::{BY_DECLARATION, SOURCE_STILL_RUNS};
use super::health::{disabled_replication, refresh_replication_now};
use super::input::{EnableMode, Input, Note, Outcome, StepCall};
use super::steps::{StepName, attempt_operation_id, is_optional, job_type_str, job_verb, job_word};
use crate::api::{
    DrillRecord, Job, JobParameters, JobState, JobStep, JobType, ReplicatedVMStatus,
    ReplicationHealth, ReplicationSettings, ReplicationSpec, ReplicationState, ReplicationStatus,
    StepState, TestFailoverStatus,
};
use crate::controller::observe::{Direction, ObservedReplicationState};
use crate::controller::vm_jobs::{current_step, is_failover, running_job};

pub(super) enum WaitCheck {
    Done,
    Message(Option<String>),
}

/// A waiting step is done when listings taken after the step began show the source
/// replicating to the target and the target holding a recovery point: a copy is done when
/// there is something to fail over to, and status shows it when the job ends.
pub(super) fn check_wait(input: &Input, job: &Job, step: &JobStep) -> WaitCheck {
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
            let has_point = input
                .view(target)
                .vm_since(since)
                .is_some_and(|t| t.recovery_points.as_ref().is_some_and(|p| p.count > 0));
            if has_point {
                WaitCheck::Done
            } else {
                WaitCheck::Message(Some(format!(
                    "copy done at {source}, waiting for {target} to list its recovery point"
                )))
            }
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

pub(super) fn step_call(
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
        _ => job
            .parameters
            .as_ref()
            .and_then(|p| p.recovery_point.clone())
            .unwrap_or_else(|| input.spec.failover.recovery_point.clone()),
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
        network: job
            .parameters
            .as_ref()
            .and_then(|p| p.network.clone())
            .unwrap_or_else(|| input.spec.test_failover.network.clone()),
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
        deadline: step_deadline(step_limit(input, job), input, &job.steps[si]),
    }
}

/// The step deadline of `job` in seconds: `spec.failover.stepTimeoutSeconds` as it was when the
/// job started (a job written before parameters were recorded reads the spec).
pub(super) fn step_limit(input: &Input, job: &Job) -> i64 {
    job.parameters
        .as_ref()
        .and_then(|p| p.step_timeout_seconds)
        .unwrap_or_else(|| input.spec.failover.step_timeout())
}

/// The parameters a job starts with, from the spec now.
pub(super) fn parameters(input: &Input, t: JobType) -> JobParameters {
    let f = &input.spec.failover;
    let failover = matches!(t, JobType::PlannedFailover | JobType::UnplannedFailover);
    JobParameters {
        recovery_point: (t == JobType::UnplannedFailover || t == JobType::TestFailover)
            .then(|| f.recovery_point.clone()),
        shutdown_source: failover.then_some(f.shutdown_source),
        step_timeout_seconds: Some(f.step_timeout()),
        network: (t == JobType::TestFailover).then(|| input.spec.test_failover.network.clone()),
    }
}

/// When step `step` is overdue (see [`overdue`]): its start, or now for a step not started
/// yet, plus the step timeout.
fn step_deadline(limit: i64, input: &Input, step: &JobStep) -> jiff::Timestamp {
    let start = step.start_time.as_ref().map_or(input.now, |t| t.0);
    start
        .checked_add(jiff::SignedDuration::from_secs(limit))
        .unwrap_or(start)
}

/// Why a pending step is skipped, if it is.
pub(super) fn skip_reason(input: &Input, job: &Job, step: StepName) -> Option<String> {
    let step_state = |n: StepName| {
        job.steps
            .iter()
            .find(|s| s.name == n.as_str())
            .map(|s| s.state)
    };
    let source = job.source_site.as_deref().unwrap_or_default();
    let target = job.target_site.as_deref().unwrap_or_default();
    if let Some(why) = by_declaration(input, job, step) {
        return Some(why);
    }
    let view = input.view(source);
    match (job.type_, step) {
        (JobType::UnplannedFailover, StepName::ShutdownSource | StepName::SyncRemaining)
            if !job
                .parameters
                .as_ref()
                .and_then(|p| p.shutdown_source)
                .unwrap_or(input.spec.failover.shutdown_source) =>
        {
            Some("shutdownSource is false".into())
        }
        // A source that cannot be listed is not called for what only serves the data (a cut,
        // a graceful shutdown): a call would only wait for its timeout. That it cannot be listed
        // says nothing about whether the VM runs there (a refused token, a 5xx, a timeout):
        // FenceSource must still power it off before the VM starts at the target.
        (JobType::UnplannedFailover, StepName::ConsistentCut) if !view.reachable() => {
            Some(format!(
                "skipped: site {source} cannot be listed ({}); the failover starts without \
                 the plan's cut",
                view.why_not()
            ))
        }
        (JobType::UnplannedFailover, StepName::ShutdownSource) if !view.reachable() => {
            Some(format!(
                "skipped: site {source} cannot be listed ({}); FenceSource powers the VM off \
                 there before it starts at {target}",
                view.why_not()
            ))
        }
        (JobType::UnplannedFailover, StepName::FenceSource)
            if step_state(StepName::ShutdownSource) == Some(StepState::Succeeded) =>
        {
            Some("source shut down".into())
        }
        _ => None,
    }
}

/// Why a source step of an unplanned failover is not made because its site is declared lost:
/// the declaration stands for the shutdown and the fence, and nothing is asked of that site.
pub(super) fn by_declaration(input: &Input, job: &Job, step: StepName) -> Option<String> {
    let source = job.source_site.as_deref().unwrap_or_default();
    let source_step = matches!(
        step,
        StepName::ConsistentCut
            | StepName::ShutdownSource
            | StepName::FenceSource
            | StepName::SyncRemaining
    );
    (job.type_ == JobType::UnplannedFailover && source_step && input.view(source).lost()).then(
        || {
            format!(
                "{BY_DECLARATION}: site {source} is declared lost (Site {source} \
                 spec.fence: Lost), so it is taken as fenced and not called; its VMs that must \
                 not run there are powered off once the declaration is removed and it answers"
            )
        },
    )
}

/// Moves the running job forward: skips what is to be skipped, marks the next step Running
/// with its operation id (persisted before the site is called), or ends the job.
pub(super) fn advance(
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

pub(super) fn finish_job(
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
                    divergences: None,
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
pub(super) fn where_failed_failover_left_the_vm(job: &Job) -> String {
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

/// Whether `step` started at least `limit` seconds ago.
pub(super) fn overdue(input: &Input, step: &JobStep, limit: i64) -> bool {
    step.start_time
        .as_ref()
        .is_some_and(|t| (input.now - t.0).get_seconds() >= limit)
}

pub(super) fn copy_limit(input: &Input) -> i64 {
    input.spec.replication.copy_timeout()
}

/// Marks step `si` of job `ji` Failed with `m`, with its Event; a required step fails the rest
/// of the job (see [`fail_remaining`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn fail_step(
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
pub(super) fn fail_remaining(input: &Input, st: &mut ReplicatedVMStatus, ji: usize) {
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
pub(super) fn apply_step_success(
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
                divergences: None,
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
