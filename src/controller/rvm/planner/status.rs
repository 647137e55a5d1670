//! Phase and conditions: how Ready, Reconciling, Stalled, CommitPending and the other
//! conditions follow from the jobs and the replication.

use super::fencing::{SOURCE_UNCONFIRMED, split_brain};
use super::health::{
    SETTINGS_NOT_APPLIED, Settings, Verified, newest_divergence, replica_verified,
    replication_error, replication_in_progress, settings_state, vm_off,
};
use super::input::{Input, Note, Wait};
use super::progress::{overdue, step_limit};
use super::steps::{DEADLINE_PASSED, job_type_str};
use crate::api::{
    CommitMode, JobState, JobType, ReplicatedVMStatus, ReplicationState, StepState, VmPhase,
};
use crate::controller::conditions;
use crate::controller::conditions::{
    COMMIT_PENDING, CONFLICT, Cond, READY, RECONCILING, REPLICA_VERIFIED, REPLICATION_ERROR,
    SETTINGS_APPLIED, SPLIT_BRAIN, STALLED,
};
use crate::controller::vm_jobs::{
    current_step, mismatch_resync_running, replication_on, running_job, standing_job,
    uncommitted_failover,
};

/// Ready's reason (Stalled's past the step deadline) while an unplanned failover waits for its
/// source to confirm the VM off.
pub const SOURCE_NOT_FENCED: &str = "SourceNotFenced";

/// Ready's reason (and the Event's) while the VM is off at the site where it runs.
pub const VM_NOT_RUNNING: &str = "VMNotRunning";

/// How Ready's message starts while a deletion waits for the running job.
pub(super) const DELETION_WAITS: &str = "deletion waits for job";

/// Ready already says that a deletion waits for the running job.
pub(super) fn deletion_noted(st: &ReplicatedVMStatus) -> bool {
    st.conditions
        .iter()
        .any(|c| c.type_ == READY && c.message.starts_with(DELETION_WAITS))
}

/// Stalled's message for a failed job: what failed and the two ways on (retry, or a spec
/// change).
pub(super) fn stalled_message(input: &Input, st: &ReplicatedVMStatus) -> String {
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
        " once the site answers again, or, if the source site is gone, declare it lost \
         (spec.fence: Lost on its Site) and set spec.failover.type to Unplanned to fail over now \
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

/// Phase and conditions from the status and the spec, computed in one place.
pub(super) fn finalize(
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
            // A failover that waits for its source to confirm the VM off says so, and past the
            // step's deadline it needs a person (the site back, or declared lost).
            let unconfirmed = current_step(j).map(|(i, _)| &j.steps[i]).filter(|s| {
                s.state == StepState::Running
                    && s.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with(SOURCE_UNCONFIRMED))
            });
            match unconfirmed {
                Some(s) => {
                    let why = format!("{msg}: {}", s.message.as_deref().unwrap_or_default());
                    want.push(Cond::new(READY, false, SOURCE_NOT_FENCED, why.clone()));
                    if overdue(input, s, step_limit(input, j)) {
                        want.push(Cond::new(RECONCILING, false, SOURCE_NOT_FENCED, ""));
                        needs_person = Some((SOURCE_NOT_FENCED, why));
                    } else {
                        want.push(Cond::new(RECONCILING, true, SOURCE_NOT_FENCED, why));
                    }
                }
                None => {
                    want.push(Cond::new(READY, false, "JobRunning", msg.clone()));
                    want.push(Cond::new(RECONCILING, true, job_type_str(j.type_), msg));
                }
            }
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
                if w.stalls {
                    needs_person = Some((w.reason, w.message.clone()));
                } else {
                    progressing = Some((w.reason, w.message.clone()));
                }
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
        (false, _, Some((reason, msg))) => Cond::new(STALLED, true, *reason, msg.clone()),
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
    match replica_verified(input, st) {
        Verified::Set(c) => want.push(c),
        Verified::Remove => st.conditions.retain(|c| c.type_ != REPLICA_VERIFIED),
        Verified::Keep => {}
    }
    // Each divergence the source counted is news once (the count is durable at the source: a
    // divergence resynchronized between two plans is not missed).
    let count = |s: &ReplicatedVMStatus| {
        s.replication
            .as_ref()
            .and_then(|r| r.divergences)
            .unwrap_or(0)
    };
    if count(st) > count(input.status)
        && let Some(m) = newest_divergence(input, st)
    {
        events.push(Note {
            warning: true,
            action: "Verify",
            subject: "replica diverged".into(),
            reason: "ReplicaDiverged",
            message: m,
        });
    }
    let split = split_brain(input, st);
    // Shown once it happened (a VM that never ran twice carries no such condition).
    match &split {
        Some(m) => want.push(Cond::new(SPLIT_BRAIN, true, SPLIT_BRAIN, m.clone())),
        None if st.conditions.iter().any(|c| c.type_ == SPLIT_BRAIN) => {
            want.push(Cond::new(SPLIT_BRAIN, false, "OneCopyRuns", ""))
        }
        None => {}
    }
    if let Some(m) = &split
        && !conditions::is_true(&input.status.conditions, SPLIT_BRAIN)
    {
        events.push(Note {
            warning: true,
            action: "Observe",
            subject: "split-brain".into(),
            reason: SPLIT_BRAIN,
            message: m.clone(),
        });
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
