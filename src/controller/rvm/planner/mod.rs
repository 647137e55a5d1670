//! The pure planner: `(spec, status, what the sites show) -> next action`.
//!
//! Every rule of the procedure lives here and nowhere else, so it is tested without I/O. One
//! file per concern, each standing on the ones below it:
//!
//! - [`steps`]: the step catalogue (the steps of each job, optional steps, words, operation
//!   ids);
//! - [`input`]: what the planner reads and what it answers;
//! - [`health`]: replication health, recovery points, progress and settings from the listings;
//! - [`fencing`]: when a VM running where it must not is powered off;
//! - [`next_job`]: which job starts next, and the retry of a failed job;
//! - [`progress`]: the site call of a step, its outcome, skipped and failed steps, a job's end;
//! - [`status`]: phase and conditions;
//! - here: [`plan`] and the `record_*` functions that put the outcome of an action into status.
//!
//! The reconciler repeats: plan, act on the plan (write status, call a site, or wait), plan
//! again. A step is written as `Running` with its operation id before the site is called, so
//! a controller killed at any moment calls it again with the same id and the site does the
//! work once.

mod fencing;
mod health;
mod input;
mod next_job;
mod progress;
mod status;
mod steps;

use std::time::Duration;

use crate::api::{
    JobState, JobStep, JobType, ReplicationHealth, ReplicationSettings, ReplicationState, StepState,
};
use crate::controller::conditions::SPLIT_BRAIN;
use crate::controller::vm_jobs::{current_step, is_failover, running_job};
use fencing::{Drift, SOURCE_STILL_RUNS, drift, fence_needed, source_runs, source_unconfirmed};
use health::{
    note_source_resync, record_listed_settings, refresh_progress, refresh_replication,
    settings_call,
};
use next_job::{
    Next, locate, missing_recovery_point, next_job, refuse_job, retry_due, retry_job, start_job,
};
use progress::{
    WaitCheck, advance, apply_step_success, by_declaration, check_wait, copy_limit, fail_remaining,
    fail_step, overdue, step_call, step_limit,
};
use status::{deletion_noted, finalize};

pub use crate::controller::vm_jobs::Cut;
pub use fencing::{FENCE_BACKOFF_FIRST, FENCE_BACKOFF_MAX, fence_backoff};
pub use health::{SETTINGS_NOT_APPLIED, STATUS_REFRESH, health_of, live_rpo, progress_of};
pub use input::{
    Conflict, EnableMode, FenceCall, Input, Note, Outcome, Plan, RETRY_UNREACHABLE, SettingsCall,
    StepCall, Update,
};
pub use status::VM_NOT_RUNNING;
pub use steps::{
    DEADLINE_PASSED, MAX_JOBS, StepName, is_optional, job_type_str, job_verb, job_word,
    next_job_name, operation_id, steps_of,
};

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
                    let declared = name.and_then(|n| by_declaration(input, job, n));
                    match name {
                        // The source was declared lost while the step waited for it: the
                        // declaration stands for it.
                        Some(_) if declared.is_some() => {
                            let s = &mut st.jobs[ji].steps[si];
                            s.state = StepState::Skipped;
                            s.message = declared;
                            s.end_time = Some(input.now());
                            advance(input, &mut st, &mut events, &mut finished);
                        }
                        // Backing off after a failed power off; a declaration made meanwhile
                        // is seen within a poll.
                        Some(StepName::FenceSource)
                            if unplanned && input.fence_wait().is_some() =>
                        {
                            let d = input.fence_wait().unwrap_or(RETRY_UNREACHABLE);
                            return Plan::Idle(d.min(input.poll.max(RETRY_UNREACHABLE)));
                        }
                        Some(StepName::StartAtTarget)
                            if source_runs && overdue(input, step, step_limit(input, job)) =>
                        {
                            let source = job.source_site.clone().unwrap_or_default();
                            let msg = format!(
                                "not started before its {DEADLINE_PASSED} ({} s, \
                                 spec.failover.stepTimeoutSeconds): VM {} runs at {source} and \
                                 could not be powered off there",
                                step_limit(input, job),
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
        } else if let Drift::SplitBrain(m) = drift(input, &st) {
            // Nothing starts while two copies run and neither may be powered off.
            wait = Some(input::Wait {
                reason: SPLIT_BRAIN,
                message: m,
                stalls: true,
            });
            requeue = input.poll;
        } else if let Drift::Fence(_) = drift(input, &st) {
            // Just located: the copy that must not run is powered off (next plan) before any
            // job starts.
            requeue = Duration::ZERO;
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

fn steady_requeue(input: &Input) -> Duration {
    let interval = u64::try_from(input.spec.replication.interval_seconds.max(1)).unwrap_or(300);
    Duration::from_secs(interval.clamp(15, 60))
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
    let limit = step_limit(input, &st.jobs[call.job]);
    let unanswered = matches!(outcome, Outcome::Unreachable(_));
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
            // No answer says nothing about whether the VM runs there: the failover waits,
            // backing off, until the site powers it off or a person declares it lost (the
            // conditions turn Stalled at the step's deadline). It never starts the VM at the
            // target on its own.
            Outcome::Unreachable(m) => {
                let (source, target) = (call.source.as_str(), call.target.as_str());
                let msg = Some(source_unconfirmed(source, target, m));
                let s = &mut st.jobs[call.job].steps[call.step];
                if s.message.is_none() {
                    events.push(Note {
                        warning: true,
                        action: job_verb(call.job_type),
                        subject: format!("{}/{}", call.job_name, s.name),
                        reason: "SourceNotFenced",
                        message: msg.clone().unwrap_or_default(),
                    });
                }
                s.message = msg;
                finalize(input, &mut st, None, &mut events);
                // Written when something changed (the message, Stalled at the deadline).
                if st == *input.status {
                    return Plan::Idle(RETRY_UNREACHABLE);
                }
                return Plan::Write(Box::new(Update {
                    status: st,
                    events,
                    finished,
                }));
            }
            _ => None,
        };
        if let Some(m) = refused {
            let (source, target) = (call.source.as_str(), call.target.as_str());
            if overdue(input, &job.steps[call.step], limit) {
                let msg = format!(
                    "{SOURCE_STILL_RUNS}: power off at {source} failed until its \
                     {DEADLINE_PASSED} ({limit} s, spec.failover.stepTimeoutSeconds): {m}; the \
                     VM was not started at {target} (if site {source} is gone, declare it lost \
                     with spec.fence: Lost on its Site, then run the job again)"
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
            // A site that never answered says nothing about the replica.
            if call.step_name == StepName::VerifyDigests
                && !unanswered
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

#[cfg(test)]
mod tests;
