//! Which job starts next: from the spec, the status and the sites, the job that moves the VM
//! toward what the spec asks, or why none can start yet; and the retry of a failed job.

use super::input::{Input, Note, Wait};
use super::progress::parameters;
use super::steps::{MAX_JOBS, StepName, job_type_str, job_verb, next_job_name, steps_of};
use crate::api::{
    CommitMode, FailoverType, Job, JobState, JobStep, JobType, ReplicatedVMStatus,
    ReplicationState, StepState,
};
use crate::controller::observe::{ObservedRecoveryPoint, SiteView};
use crate::controller::vm_jobs::{
    has_replica, is_failover, replication_on, resync_due, running_job, uncommitted_failover,
};

/// The attempt the newest job runs next when it failed and a retry asks for it: the
/// `twinsite.io/retry` annotation names it (`<job>` for attempt 2, `<job>/<n>` for attempt
/// `n`, so an annotation kept in Git runs each attempt once), or the FailoverPlan that moves
/// the VM started a run after this failover to the plan's target failed. A job that is not the
/// newest, one that did not fail, a conflict, and a digest mismatch (resynchronized first) are
/// not retried.
pub(super) fn retry_due(input: &Input, st: &ReplicatedVMStatus) -> Option<i64> {
    let j = st.jobs.last().filter(|j| j.state == JobState::Failed)?;
    if input.conflict.is_some() || resync_due(st).is_some() {
        return None;
    }
    let next = j.attempt.unwrap_or(1).saturating_add(1);
    let asked = input.retry.is_some_and(|v| retry_names(v, &j.name, next));
    let by_plan = input.plan_started.is_some_and(|started| {
        is_failover(j.type_)
            && j.target_site.as_deref() == Some(input.desired())
            // Status times have whole seconds: a failure in the second the run started may be
            // the run's own, and is not retried (a plan starts a run only in a later second than
            // its previous run ended, so the failures of that run are all before it).
            && j.end_time.as_ref().is_some_and(|e| e.0 < started)
    });
    (asked || by_plan).then_some(next)
}

/// Whether the retry annotation's `value` asks for attempt `next` of job `job`.
pub(super) fn retry_names(value: &str, job: &str, next: i64) -> bool {
    let v = value.trim();
    match v.rsplit_once('/') {
        Some((name, n)) => name == job && n.trim().parse::<i64>().ok() == Some(next),
        None => v == job && next == 2,
    }
}

/// Runs the newest (failed) job again as attempt `attempt`, from its first step that did not
/// succeed. A failover that started its source again (RestartSource) undid its earlier steps:
/// it runs again from its first step.
pub(super) fn retry_job(
    input: &Input,
    st: &mut ReplicatedVMStatus,
    attempt: i64,
    events: &mut Vec<Note>,
) {
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
    // A retry runs with the spec as it is now (a person may have fixed it to retry).
    job.parameters = Some(parameters(input, job.type_));
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

/// Where the VM runs now, for a VM the controller has not seen yet.
pub(super) fn locate(input: &Input) -> Result<String, Wait> {
    let p = &input.spec.primary_site;
    let r = &input.spec.recovery_site;
    let role_primary = |v: &SiteView| {
        v.vm()
            .is_some_and(|vm| vm.role == crate::controller::observe::Role::Primary)
    };
    // A VM that runs at both sites is where the spec says: the controller never picks a copy
    // by itself (which copy may be powered off is the drift fence's decision).
    if input.primary.vm().is_some_and(|v| v.runs()) && input.recovery.vm().is_some_and(|v| v.runs())
    {
        return Ok(input.desired().to_string());
    }
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
            stalls: false,
        })
    } else {
        Err(Wait {
            reason: "SiteUnreachable",
            message: format!("waiting for site {}", unreachable.join(", ")),
            stalls: false,
        })
    }
}

pub(super) enum Next {
    Start(JobType, String, String),
    Wait(Wait),
    Nothing,
}

/// The sites a job needs must answer, and their listings must postdate the newest job's end
/// (decisions are never made on a picture older than the controller's own last action).
pub(super) fn need_sites(input: &Input, sites: &[&str]) -> Option<Wait> {
    // A site declared lost is waited for until the declaration is removed: nothing is
    // replicated to it or started there meanwhile.
    let lost: Vec<&str> = sites
        .iter()
        .copied()
        .filter(|s| input.view(s).lost())
        .collect();
    if !lost.is_empty() {
        return Some(Wait {
            reason: "SiteLost",
            message: format!(
                "site {} is declared lost (spec.fence: Lost): nothing is replicated to it or \
                 started there until the declaration is removed from its Site",
                lost.join(", ")
            ),
            stalls: false,
        });
    }
    let down: Vec<String> = sites
        .iter()
        .copied()
        .filter(|s| !input.view(s).reachable())
        .map(|s| format!("{s} ({})", input.view(s).why_not()))
        .collect();
    if !down.is_empty() {
        return Some(Wait {
            reason: "SiteUnreachable",
            message: format!("waiting for site {}", down.join(", ")),
            stalls: false,
        });
    }
    let since = input
        .status
        .jobs
        .last()
        .and_then(|j| j.end_time.as_ref())
        .map(|t| t.0);
    // A VM running where it must not is powered off (or reported as a split brain) on a listing
    // taken after the controller's newest action: no job starts on an older one that shows it.
    let fence_since = super::fencing::after_last_action(input.status);
    let active = input.status.active_site.as_deref();
    let stale: Vec<&str> = sites
        .iter()
        .copied()
        .filter(|s| {
            let v = input.view(s);
            let runs_elsewhere = Some(*s) != active && v.vm().is_some_and(|vm| vm.runs());
            !v.fetched_since(since) || runs_elsewhere && !v.fetched_since(fence_since)
        })
        .collect();
    (!stale.is_empty()).then(|| Wait {
        reason: "Observing",
        message: format!("waiting for a fresh listing of site {}", stale.join(", ")),
        stalls: false,
    })
}

/// Which job to start, given no job runs. Order matters: commit before anything; a drill
/// copy is cleaned up before a failover; a failover needs a current replica at its target
/// (reverse-replicate first otherwise); replication follows the spec; drills last.
pub(super) fn next_job(input: &Input, st: &ReplicatedVMStatus) -> Next {
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
            stalls: false,
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
            let t = failover_type(input, st, &active, &desired);
            if t == FailoverType::Planned
                && input.view(&desired).reachable()
                && !input.view(&active).reachable()
            {
                return Next::Wait(planned_without_source(input, &active, &desired));
            }
            return match t {
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
                stalls: false,
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
                stalls: false,
            });
        }
    }
    Next::Nothing
}

/// A planned failover (a failback among them) from `active`, which cannot be listed: it needs
/// that site, and only a person can say it is gone.
fn planned_without_source(input: &Input, active: &str, desired: &str) -> Wait {
    Wait {
        reason: "SiteUnreachable",
        message: format!(
            "the planned failover to {desired} waits for site {active}, which does not answer \
             ({}): it runs once {active} answers (fix the Site's agent URL or token Secret); \
             to fail over without {active} now from the newest recovery point at {desired}, \
             declare it lost: kubectl patch site {active} --type merge -p \
             '{{\"spec\":{{\"fence\":\"Lost\"}}}}'",
            input.view(active).why_not()
        ),
        stalls: true,
    }
}

/// How a change of activeSite from `active` to `desired` is carried out. A failback (back to
/// spec.primarySite, where replication first came from) is Planned: the VM is shut down, synced
/// and its digests compared, so nothing is lost. It is Unplanned only when the person asked for
/// that in this move: spec.failover.type is Unplanned and differs from the type of the newest
/// failover job in status (the one that moved the VM away, or a failback that failed), so the
/// Unplanned left over from the move away does not count. Any other move follows
/// spec.failover.type.
pub(super) fn failover_type(
    input: &Input,
    st: &ReplicatedVMStatus,
    active: &str,
    desired: &str,
) -> FailoverType {
    // A source declared lost cannot take part: whatever was asked, the VM starts from a
    // recovery point without it.
    if input.view(active).lost() {
        return FailoverType::Unplanned;
    }
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
pub(super) fn missing_recovery_point(
    input: &Input,
    t: JobType,
    source: &str,
    target: &str,
) -> Option<String> {
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

pub(super) fn describe_point(p: &ObservedRecoveryPoint) -> String {
    match p.time {
        Some(t) => format!("{} ({t})", p.id),
        None => p.id.clone(),
    }
}

/// Ends the job just started before any step ran: every step Skipped, the job Failed with `why`.
pub(super) fn refuse_job(
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

pub(super) fn start_job(
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
        parameters: Some(parameters(input, t)),
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
pub(super) fn trim_jobs(st: &mut ReplicatedVMStatus) {
    while st.jobs.len() > MAX_JOBS {
        match st.jobs.iter().position(|j| j.state != JobState::Running) {
            Some(i) => {
                st.jobs.remove(i);
            }
            None => break,
        }
    }
}
