//! The FailoverPlan planner: a pure function from (spec, status, members) to the next action.
//!
//! A plan job walks its steps in order: per group, its pre-actions, the group itself, its
//! post-actions. A group step *releases* the group's VMs (at most `maxParallel` in flight); a
//! released VM takes its desired site from the plan, so its own ReplicatedVM jobs move it. The
//! group step succeeds when every VM of the group runs at the target; only then does the next
//! step start. Which VMs are released lives in `status.groups[].vms[].state`, so the
//! ReplicatedVM controller can read it and a restarted controller resumes where it was.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    CommitMode, FailoverPlanSpec, FailoverPlanStatus, FailoverType, GroupStatus, GroupVmStatus,
    Job, JobState, JobStep, JobType, PlanAction, PlanPhase, StepState,
};
use crate::controller::conditions::{self, Cond};

pub const WAITING_FOR_APPROVAL: &str = "WaitingForApproval";
pub const CONFLICT: &str = conditions::CONFLICT;
/// True while a ReplicatedVM named in `vms` does not exist (the plan waits for it).
pub const MEMBERS_MISSING: &str = "MembersMissing";

/// States of a VM within a plan group.
pub const VM_PENDING: &str = "Pending";
pub const VM_RELEASED: &str = "Released";
pub const VM_SUCCEEDED: &str = "Succeeded";
pub const VM_FAILED: &str = "Failed";

/// Jobs kept in status, newest last.
const MAX_JOBS: usize = 10;
/// Consumed approval values kept in status: one per manual approval a spec can hold (100
/// groups of 10 pre- and 10 post-actions), so no value of the plan's own is ever forgotten.
const MAX_APPROVALS: usize = 2000;

/// The annotation value that approves action `key` (`<group>/<action>`) in plan job `job`:
/// `<key>@<job>` always does; the plain `<key>` does once, unless an earlier run consumed it
/// (`status.consumedApprovals`). The controller never removes the annotation, so a value a
/// GitOps tool keeps does not silently approve the next run.
fn approval_for(input: &Input, st: &FailoverPlanStatus, key: &str, job: &str) -> Option<String> {
    let scoped = format!("{key}@{job}");
    if input.approvals.contains(&scoped) {
        return Some(scoped);
    }
    (input.approvals.iter().any(|a| a == key) && !st.consumed_approvals.iter().any(|c| c == key))
        .then(|| key.to_string())
}

/// Records that the plain value `key` approved a run. Only plain values are kept: a scoped
/// value (`<key>@<job>`) names its job and cannot approve another. When the list is full, the
/// oldest value naming no manual approval of today's spec goes first; a value of the spec is
/// never dropped (there are at most `MAX_APPROVALS` of them), so it never approves twice.
fn consume_approval(spec: &FailoverPlanSpec, consumed: &mut Vec<String>, key: &str) {
    if !consumed.iter().any(|c| c == key) {
        consumed.push(key.to_string());
    }
    while consumed.len() > MAX_APPROVALS {
        let in_spec = |v: &String| {
            spec.groups.iter().any(|g| {
                g.pre_actions
                    .iter()
                    .chain(&g.post_actions)
                    .any(|a| a.manual_approval.is_some() && *v == format!("{}/{}", g.name, a.name))
            })
        };
        match consumed.iter().position(|v| !in_spec(v)) {
            Some(i) => consumed.remove(i),
            None => consumed.remove(0),
        };
    }
}

/// What the plan needs to know of one member ReplicatedVM.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub name: String,
    /// status.activeSite: where it runs now.
    pub active_site: Option<String>,
    /// A job of the VM is running.
    pub busy: bool,
    /// The VM's newest job failed.
    pub failed: bool,
    /// A failover of the VM succeeded and has not been committed yet (its commit has not run,
    /// runs, or failed).
    pub uncommitted: bool,
    /// When the VM's newest job started: a failure from before the plan job is not the plan's.
    pub job_started: Option<Timestamp>,
    /// The VM has a drill copy now.
    pub drill_running: bool,
    /// The VM's newest drill (status.lastDrill) result, when it has one.
    pub drill_result: Option<String>,
    /// When that drill was recorded: an older drill is not the plan's.
    pub drill_time: Option<Timestamp>,
}

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub name: &'a str,
    pub generation: Option<i64>,
    pub spec: &'a FailoverPlanSpec,
    pub status: &'a FailoverPlanStatus,
    /// `<group>/<action>` values of the `twinsite.io/approve` annotation.
    pub approvals: Vec<String>,
    /// The `twinsite.io/retry` annotation: the name of a failed plan job to run again.
    pub retry: Option<String>,
    /// Members per group, in spec order.
    pub groups: Vec<Vec<Member>>,
    /// Conflicts found (a VM in two plans, a VM whose own activeSite disagrees).
    pub conflicts: Vec<String>,
    /// Named members that do not exist (yet); they appear in `groups` as members that are
    /// nowhere, so a group waits for them.
    pub missing: Vec<String>,
    pub now: Timestamp,
}

/// An Event to publish for the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

impl From<&Note> for crate::controller::notes::Note {
    /// A plan's events are told apart by their message: different jobs and steps stay apart,
    /// and repeats of one fold together.
    fn from(n: &Note) -> Self {
        Self {
            warning: n.warning,
            action: plan_verb(n.reason),
            subject: n.message.clone(),
            reason: n.reason,
            message: n.message.clone(),
        }
    }
}

/// The verb of a plan Event (its `action`), from its reason.
fn plan_verb(reason: &str) -> &'static str {
    match reason {
        "WaitingForApproval" | "Approved" => "Approve",
        "WebhookFailed" | "WebhookSucceeded" => "CallWebhook",
        "Conflict" => "Hold",
        _ => "RunPlan",
    }
}

/// A webhook to call for a step already written as Running.
#[derive(Clone, PartialEq)]
pub struct WebhookCall {
    pub job: usize,
    pub step: usize,
    pub group: String,
    pub action: String,
    /// `pre` or `post`: before or after the group's VMs move.
    pub stage: String,
    /// The URL as written in the spec; show it only through [`crate::redact::redact`].
    pub url: String,
    /// PEM CAs an https receiver must chain to (`webhook.caBundle`).
    pub ca_bundle: Option<String>,
    pub timeout: Duration,
    /// `failover`, `testFailover` or `testFailoverCleanup`, and the target site.
    pub direction: String,
    pub target_site: String,
}

/// The URL without its user info and query, the CA bundle by its length.
impl std::fmt::Debug for WebhookCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookCall")
            .field("job", &self.job)
            .field("step", &self.step)
            .field("group", &self.group)
            .field("action", &self.action)
            .field("stage", &self.stage)
            .field("url", &crate::redact::redact(&self.url))
            .field("ca_bundle", &self.ca_bundle.as_ref().map(|b| b.len()))
            .field("timeout", &self.timeout)
            .field("direction", &self.direction)
            .field("target_site", &self.target_site)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write this status, publish the events, then plan again.
    Write(Box<FailoverPlanStatus>, Vec<Note>),
    /// POST the webhook, then [`record_webhook`].
    CallWebhook(Box<WebhookCall>),
    /// Nothing to do; look again after this long (member changes also wake the plan).
    Idle(Duration),
}

/// The kind of plan job a spec asks for.
fn wanted_job(spec: &FailoverPlanSpec) -> JobType {
    if spec.test_failover.enabled {
        JobType::PlanTestFailover
    } else {
        JobType::PlanFailover
    }
}

fn direction(t: JobType) -> &'static str {
    match t {
        JobType::PlanTestFailover => "testFailover",
        JobType::PlanTestFailoverCleanup => "testFailoverCleanup",
        _ => "failover",
    }
}

/// Step names: `pre:<group>/<action>`, `group:<group>`, `post:<group>/<action>`.
fn step_names(spec: &FailoverPlanSpec, with_actions: bool) -> Vec<String> {
    let mut out = Vec::new();
    for g in &spec.groups {
        if with_actions {
            out.extend(
                g.pre_actions
                    .iter()
                    .map(|a| format!("pre:{}/{}", g.name, a.name)),
            );
        }
        out.push(format!("group:{}", g.name));
        if with_actions {
            out.extend(
                g.post_actions
                    .iter()
                    .map(|a| format!("post:{}/{}", g.name, a.name)),
            );
        }
    }
    out
}

enum StepKind<'s> {
    Group(usize),
    Action(usize, &'s PlanAction),
}

fn step_kind<'s>(spec: &'s FailoverPlanSpec, step: &str) -> Option<StepKind<'s>> {
    if let Some(g) = step.strip_prefix("group:") {
        return spec
            .groups
            .iter()
            .position(|x| x.name == g)
            .map(StepKind::Group);
    }
    let (pre, rest) = if let Some(r) = step.strip_prefix("pre:") {
        (true, r)
    } else {
        (false, step.strip_prefix("post:")?)
    };
    let (g, a) = rest.split_once('/')?;
    let gi = spec.groups.iter().position(|x| x.name == g)?;
    let group = &spec.groups[gi];
    let list = if pre {
        &group.pre_actions
    } else {
        &group.post_actions
    };
    list.iter()
        .find(|x| x.name == a)
        .map(|x| StepKind::Action(gi, x))
}

/// Whether member `m` is where the job wants it. A failover is done when the VM runs at the
/// target, no job of it runs, and, when the plan commits automatically, its commit has ended
/// too: a VM between its failover and its commit (or whose commit failed) is not done.
fn member_done(spec: &FailoverPlanSpec, t: JobType, target: &str, m: &Member) -> bool {
    match t {
        JobType::PlanTestFailover => m.drill_running && !m.busy,
        JobType::PlanTestFailoverCleanup => !m.drill_running && !m.busy,
        _ => {
            m.active_site.as_deref() == Some(target)
                && !m.busy
                && !(m.uncommitted && spec.failover.commit == CommitMode::Automatic)
        }
    }
}

/// Whether any work remains for job type `t`.
fn work_remains(input: &Input, t: JobType) -> bool {
    input
        .groups
        .iter()
        .flatten()
        .any(|m| !member_done(input.spec, t, &input.spec.target_site, m))
}

/// Whether a new plan job of type `t` has anything to do. A VM that already runs at the target
/// and is busy with its own follow-up jobs (commit, reprotect) is not work for a failover: a
/// plan job that just ended would otherwise start another run at once, which asks for its
/// approvals again.
fn work_to_start(input: &Input, t: JobType) -> bool {
    match t {
        JobType::PlanFailover => input
            .groups
            .iter()
            .flatten()
            .any(|m| m.active_site.as_deref() != Some(input.spec.target_site.as_str())),
        _ => work_remains(input, t),
    }
}

fn next_job_name(plan: &str, t: JobType, jobs: &[Job]) -> String {
    let n = jobs
        .iter()
        .filter_map(|j| j.name.rsplit('-').next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let word = match t {
        JobType::PlanTestFailover => "testfailover",
        JobType::PlanTestFailoverCleanup => "testfailovercleanup",
        _ => "failover",
    };
    format!("{plan}-{word}-{n}")
}

fn groups_summary(status: &FailoverPlanStatus) -> String {
    let done = status
        .groups
        .iter()
        .filter(|g| g.state == "Succeeded")
        .count();
    format!("{done}/{}", status.groups.len())
}

/// Sets the conditions and phase that follow from the jobs and the conflicts.
fn settle(input: &Input, st: &mut FailoverPlanStatus, waiting: Option<String>) {
    let running = st.jobs.last().filter(|j| j.state == JobState::Running);
    let failed = st.jobs.last().filter(|j| j.state == JobState::Failed);
    let conflict = !input.conflicts.is_empty();
    st.phase = Some(if running.is_some() {
        PlanPhase::InProgress
    } else if failed.is_some() {
        PlanPhase::Failed
    } else if st.jobs.is_empty() && work_remains(input, wanted_job(input.spec)) {
        PlanPhase::Pending
    } else {
        PlanPhase::Completed
    });
    // Pending (members missing, or nothing started yet) is not Ready: the plan still waits.
    let pending = st.phase == Some(PlanPhase::Pending) || !input.missing.is_empty();
    let ready = running.is_none() && failed.is_none() && !conflict && !pending;
    // kstatus: not Ready and not Stalled means Reconciling.
    let reconciling = !ready && failed.is_none() && !conflict;
    let mut want = vec![
        Cond::new(
            conditions::READY,
            ready,
            if conflict {
                "Conflict"
            } else if running.is_some() {
                "JobRunning"
            } else if failed.is_some() {
                "JobFailed"
            } else if pending {
                "Pending"
            } else {
                "Completed"
            },
            if conflict {
                input.conflicts.join("; ")
            } else if let Some(j) = running {
                format!("plan job {} is running", j.name)
            } else if pending && failed.is_none() {
                if input.missing.is_empty() {
                    "the plan has not run yet".to_string()
                } else {
                    format!(
                        "waiting for ReplicatedVMs that do not exist yet: {}",
                        input.missing.join(", ")
                    )
                }
            } else if let Some(j) = failed {
                format!(
                    "plan job {} failed: {}; fix the cause, then run it again with \
                     kubectl annotate fp {} twinsite.io/retry={} (or change the plan's spec)",
                    j.name,
                    j.message.clone().unwrap_or_default(),
                    input.name,
                    j.name
                )
            } else {
                format!("every VM of the plan is at {}", input.spec.target_site)
            },
        ),
        Cond::new(
            conditions::RECONCILING,
            reconciling,
            if running.is_some() {
                "JobRunning"
            } else if reconciling {
                "Pending"
            } else {
                "Idle"
            },
            match running {
                Some(j) => format!("plan job {}", j.name),
                None if reconciling => "waiting for the plan's members".to_string(),
                None => String::new(),
            },
        ),
        Cond::new(
            conditions::STALLED,
            failed.is_some() || conflict,
            if conflict {
                "Conflict"
            } else if failed.is_some() {
                "JobFailed"
            } else {
                "Healthy"
            },
            if conflict {
                input.conflicts.join("; ")
            } else {
                failed
                    .map(|j| j.message.clone().unwrap_or_default())
                    .unwrap_or_default()
            },
        ),
        Cond::new(
            CONFLICT,
            conflict,
            if conflict { "Conflict" } else { "NoConflict" },
            input.conflicts.join("; "),
        ),
    ];
    want.push(match waiting {
        Some(msg) => Cond::new(WAITING_FOR_APPROVAL, true, "WaitingForApproval", msg),
        None => Cond::new(WAITING_FOR_APPROVAL, false, "NotWaiting", ""),
    });
    want.push(if input.missing.is_empty() {
        Cond::new(MEMBERS_MISSING, false, "AllFound", "")
    } else {
        Cond::new(
            MEMBERS_MISSING,
            true,
            "NotFound",
            format!(
                "ReplicatedVMs not found in the namespace (the plan waits for them): {}",
                input.missing.join(", ")
            ),
        )
    });
    conditions::set_all(&mut st.conditions, &want, input.generation, input.now);
    st.observed_generation = input.generation;
    st.groups_summary = Some(groups_summary(st));
}

/// Plans the next action of a FailoverPlan.
pub fn plan(input: &Input) -> Action {
    let mut st = input.status.clone();
    let now = Time(input.now);
    let mut notes = Vec::new();

    let running = st.jobs.iter().rposition(|j| j.state == JobState::Running);

    let Some(ji) = running else {
        // No job runs. Start one when work remains and the spec asks for something new.
        let mut t = wanted_job(input.spec);
        if t == JobType::PlanFailover && input.groups.iter().flatten().any(|m| m.drill_running) {
            t = JobType::PlanTestFailoverCleanup;
        }
        let last = st.jobs.last();
        let new_spec = last.is_none_or(|j| {
            j.type_ != t
                || j.target_site.as_deref() != Some(&input.spec.target_site)
                || j.state == JobState::Succeeded
                || input.status.observed_generation != input.generation
                || (j.state == JobState::Failed && input.retry.as_deref() == Some(&j.name))
        });
        // A run after a failed one starts in a later second than that one ended: status times
        // have whole seconds, and a VM tells a failure of the earlier run (which the new run
        // retries) from one of the new run by time.
        let too_soon = last
            .filter(|j| j.state == JobState::Failed)
            .and_then(|j| j.end_time.as_ref())
            .is_some_and(|e| e.0 >= input.now);
        let start = input.conflicts.is_empty() && new_spec && work_to_start(input, t);
        if start && too_soon {
            settle(input, &mut st, None);
            return match write_or_idle(input, st, notes) {
                Action::Idle(_) => Action::Idle(Duration::from_secs(1)),
                other => other,
            };
        }
        if start {
            let name = next_job_name(input.name, t, &st.jobs);
            let with_actions = t == JobType::PlanFailover;
            st.jobs.push(Job {
                name: name.clone(),
                type_: t,
                source_site: None,
                target_site: Some(input.spec.target_site.clone()),
                state: JobState::Running,
                start_time: Some(now.clone()),
                end_time: None,
                recovery_point: None,
                recovery_point_age_seconds: None,
                cut_id: consistent_cut(input.spec, t, &name),
                attempt: Some(1),
                parameters: None,
                message: None,
                steps: step_names(input.spec, with_actions)
                    .into_iter()
                    .map(|n| JobStep {
                        name: n,
                        state: StepState::Pending,
                        message: None,
                        operation_id: None,
                        start_time: None,
                        end_time: None,
                    })
                    .collect(),
            });
            if st.jobs.len() > MAX_JOBS {
                let extra = st.jobs.len() - MAX_JOBS;
                st.jobs.drain(..extra);
            }
            st.groups = input
                .spec
                .groups
                .iter()
                .zip(&input.groups)
                .map(|(g, members)| GroupStatus {
                    name: g.name.clone(),
                    state: "Pending".into(),
                    vms: members
                        .iter()
                        .map(|m| GroupVmStatus {
                            name: m.name.clone(),
                            state: VM_PENDING.into(),
                        })
                        .collect(),
                })
                .collect();
            notes.push(Note {
                warning: false,
                reason: "JobStarted",
                message: format!(
                    "plan job {name} started: {} to {}",
                    direction(t),
                    input.spec.target_site
                ),
            });
        }
        settle(input, &mut st, None);
        return write_or_idle(input, st, notes);
    };

    if !input.conflicts.is_empty() {
        // Nothing moves while a conflict lasts: no step advances, no VM is released.
        settle(input, &mut st, None);
        return write_or_idle(input, st, notes);
    }

    let job_type = st.jobs[ji].type_;
    let job_start = st.jobs[ji].start_time.as_ref().map(|t| t.0);
    let target = st.jobs[ji]
        .target_site
        .clone()
        .unwrap_or_else(|| input.spec.target_site.clone());
    let planned = input.spec.failover.type_ == FailoverType::Planned;
    let mut waiting = None;

    // Walk the steps in order; act on the first one not finished.
    let nsteps = st.jobs[ji].steps.len();
    let mut si = 0;
    while si < nsteps {
        let step = st.jobs[ji].steps[si].clone();
        if matches!(step.state, StepState::Succeeded | StepState::Skipped)
            || (step.state == StepState::Failed && !planned)
        {
            si += 1;
            continue;
        }
        if step.state == StepState::Failed {
            // A failed step of a Planned plan stops it.
            finish(
                &mut st.jobs[ji],
                JobState::Failed,
                &now,
                step.message.clone(),
            );
            notes.push(end_note(&st.jobs[ji]));
            break;
        }
        match step_kind(input.spec, &step.name) {
            None => {
                // The spec changed under a running job; the step no longer exists.
                let s = &mut st.jobs[ji].steps[si];
                s.state = StepState::Skipped;
                s.message = Some("no longer in the plan".into());
                s.end_time = Some(now.clone());
                si += 1;
                continue;
            }
            Some(StepKind::Action(gi, action)) => {
                let group = &input.spec.groups[gi].name;
                if action.manual_approval.is_some() {
                    let key = format!("{group}/{}", action.name);
                    let job_name = st.jobs[ji].name.clone();
                    if let Some(value) = approval_for(input, &st, &key, &job_name) {
                        if value == key {
                            consume_approval(input.spec, &mut st.consumed_approvals, &key);
                        }
                        let s = &mut st.jobs[ji].steps[si];
                        s.state = StepState::Succeeded;
                        s.message = Some(format!("approved ({value})"));
                        s.start_time.get_or_insert(now.clone());
                        s.end_time = Some(now.clone());
                        si += 1;
                        continue;
                    }
                    let msg = action
                        .manual_approval
                        .as_ref()
                        .and_then(|m| m.message.clone())
                        .unwrap_or_default();
                    let value = if st.consumed_approvals.contains(&key) {
                        // The plain value approved an earlier run: this run needs its own.
                        format!("{key}@{job_name}")
                    } else {
                        key.clone()
                    };
                    let hint = format!(
                        "waiting for approval of {key}: {msg}; approve with kubectl annotate fp {} twinsite.io/approve={value} --overwrite",
                        input.name
                    );
                    let s = &mut st.jobs[ji].steps[si];
                    if s.state != StepState::Running {
                        s.state = StepState::Running;
                        s.start_time = Some(now.clone());
                        notes.push(Note {
                            warning: false,
                            reason: "WaitingForApproval",
                            message: hint.clone(),
                        });
                    }
                    s.message = Some(hint.clone());
                    waiting = Some(hint);
                    break;
                }
                if let Some(hook) = &action.webhook {
                    let s = &mut st.jobs[ji].steps[si];
                    if s.state == StepState::Pending {
                        // Persist Running before the call, then call.
                        s.state = StepState::Running;
                        s.start_time = Some(now.clone());
                        s.message = Some(format!("POST {}", crate::redact::redact(&hook.url)));
                        break;
                    }
                    settle(input, &mut st, None);
                    if st != *input.status {
                        return Action::Write(Box::new(st), notes);
                    }
                    return Action::CallWebhook(Box::new(WebhookCall {
                        job: ji,
                        step: si,
                        group: group.clone(),
                        action: action.name.clone(),
                        stage: if step.name.starts_with("pre:") {
                            "pre".into()
                        } else {
                            "post".into()
                        },
                        url: hook.url.clone(),
                        ca_bundle: hook.ca_bundle.clone(),
                        timeout: Duration::from_secs(hook.timeout_seconds.max(1) as u64),
                        direction: direction(job_type).into(),
                        target_site: target.clone(),
                    }));
                }
                // An action with neither kind does nothing.
                let s = &mut st.jobs[ji].steps[si];
                s.state = StepState::Skipped;
                s.end_time = Some(now.clone());
                si += 1;
                continue;
            }
            Some(StepKind::Group(gi)) => {
                let members = &input.groups[gi];
                let limit = input.spec.max_parallel.unwrap_or(i32::MAX).max(1) as usize;
                let Some(gs) = st
                    .groups
                    .iter_mut()
                    .find(|g| g.name == input.spec.groups[gi].name)
                else {
                    break;
                };
                // Members that left the group (labels changed) leave its status; members
                // added since the job started join as Pending.
                gs.vms.retain(|v| members.iter().any(|m| m.name == v.name));
                for m in members {
                    if !gs.vms.iter().any(|v| v.name == m.name) {
                        gs.vms.push(GroupVmStatus {
                            name: m.name.clone(),
                            state: VM_PENDING.into(),
                        });
                    }
                }
                for v in gs.vms.iter_mut() {
                    let Some(m) = members.iter().find(|m| m.name == v.name) else {
                        continue;
                    };
                    if v.state == VM_RELEASED || v.state == VM_PENDING {
                        if member_done(input.spec, job_type, &target, m) {
                            v.state = VM_SUCCEEDED.into();
                        } else if v.state == VM_RELEASED
                            && m.failed
                            && !m.busy
                            && since(m.job_started, job_start)
                        {
                            v.state = VM_FAILED.into();
                        }
                    }
                }
                let in_flight = gs.vms.iter().filter(|v| v.state == VM_RELEASED).count();
                let mut room = limit.saturating_sub(in_flight);
                for v in gs.vms.iter_mut() {
                    if room == 0 {
                        break;
                    }
                    if v.state == VM_PENDING {
                        v.state = VM_RELEASED.into();
                        room -= 1;
                    }
                }
                let total = gs.vms.len();
                let ok = gs.vms.iter().filter(|v| v.state == VM_SUCCEEDED).count();
                let bad: Vec<String> = gs
                    .vms
                    .iter()
                    .filter(|v| v.state == VM_FAILED)
                    .map(|v| v.name.clone())
                    .collect();
                let open = total - ok - bad.len();
                let s = &mut st.jobs[ji].steps[si];
                s.start_time.get_or_insert(now.clone());
                if open > 0 {
                    gs.state = "Running".into();
                    s.state = StepState::Running;
                    s.message = Some(format!("{ok}/{total} VMs at {target}"));
                    break;
                }
                s.end_time = Some(now.clone());
                if bad.is_empty() {
                    gs.state = "Succeeded".into();
                    s.state = StepState::Succeeded;
                    s.message = Some(format!("{total} VMs at {target}"));
                    si += 1;
                    continue;
                }
                gs.state = "Failed".into();
                s.state = StepState::Failed;
                let msg = format!("VMs failed: {}; see their jobs", bad.join(", "));
                s.message = Some(msg.clone());
                notes.push(Note {
                    warning: true,
                    reason: "StepFailed",
                    message: msg.clone(),
                });
                // The next group waits for every VM of this one: a failed VM stops the plan.
                finish(&mut st.jobs[ji], JobState::Failed, &now, Some(msg));
                notes.push(end_note(&st.jobs[ji]));
                break;
            }
        }
    }
    if si >= nsteps && st.jobs[ji].state == JobState::Running {
        finish(&mut st.jobs[ji], JobState::Succeeded, &now, None);
        notes.push(end_note(&st.jobs[ji]));
        if job_type == JobType::PlanTestFailoverCleanup {
            st.last_drill = drill_record(input, &st.jobs);
        }
    }
    settle(input, &mut st, waiting);
    write_or_idle(input, st, notes)
}

/// The consistent cut of an Unplanned plan failover from LatestProcessed: every member that
/// fails over from one source site comes back from recovery points cut at one instant, named
/// by this id (the ReplicatedVM controller asks the site for the cut by it).
fn consistent_cut(spec: &FailoverPlanSpec, t: JobType, job: &str) -> Option<String> {
    (t == JobType::PlanFailover
        && spec.failover.type_ == FailoverType::Unplanned
        && spec.failover.recovery_point == "LatestProcessed")
        .then(|| format!("{job}-cut"))
}

/// After a drill's cleanup: the drill counts as done, with the members' outcome.
fn drill_record(input: &Input, jobs: &[Job]) -> Option<crate::api::DrillRecord> {
    let drill = jobs
        .iter()
        .rev()
        .find(|j| j.type_ == JobType::PlanTestFailover)?;
    let start = drill.start_time.as_ref().map(|t| t.0);
    let failed = input.groups.iter().flatten().any(|m| {
        m.drill_result.as_deref().is_some_and(|r| r != "Succeeded") && since(m.drill_time, start)
    });
    Some(crate::api::DrillRecord {
        job: drill.name.clone(),
        time: Some(Time(input.now)),
        result: if drill.state == JobState::Succeeded && !failed {
            "Succeeded".into()
        } else {
            "Failed".into()
        },
    })
}

/// Whether something that happened at `t` belongs to a job that started at `start`
/// (unknown times count: better a failure reported twice than one missed).
fn since(t: Option<Timestamp>, start: Option<Timestamp>) -> bool {
    match (t, start) {
        (Some(t), Some(s)) => t >= s,
        _ => true,
    }
}

fn write_or_idle(input: &Input, st: FailoverPlanStatus, mut notes: Vec<Note>) -> Action {
    // A conflict or a missing member is news once, when its condition turns True.
    for (type_, reason) in [(CONFLICT, "Conflict"), (MEMBERS_MISSING, "MembersMissing")] {
        if conditions::is_true(&st.conditions, type_)
            && !conditions::is_true(&input.status.conditions, type_)
            && let Some(c) = st.conditions.iter().find(|c| c.type_ == type_)
        {
            notes.push(Note {
                warning: true,
                reason,
                message: c.message.clone(),
            });
        }
    }
    if st != *input.status {
        Action::Write(Box::new(st), notes)
    } else if st.jobs.last().is_some_and(|j| j.state == JobState::Running) {
        Action::Idle(Duration::from_secs(5))
    } else {
        Action::Idle(Duration::from_secs(300))
    }
}

fn finish(job: &mut Job, state: JobState, now: &Time, message: Option<String>) {
    job.state = state;
    job.end_time = Some(now.clone());
    job.message = message;
}

fn end_note(job: &Job) -> Note {
    let ok = job.state == JobState::Succeeded;
    Note {
        warning: !ok,
        reason: if ok { "JobSucceeded" } else { "JobFailed" },
        message: format!(
            "plan job {} {}{}",
            job.name,
            if ok { "succeeded" } else { "failed" },
            job.message
                .as_ref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        ),
    }
}

/// Records a webhook's outcome on its Running step.
pub fn record_webhook(
    status: &FailoverPlanStatus,
    call: &WebhookCall,
    result: Result<String, String>,
    now: Timestamp,
) -> (FailoverPlanStatus, Vec<Note>) {
    let mut st = status.clone();
    let mut notes = Vec::new();
    if let Some(step) = st
        .jobs
        .get_mut(call.job)
        .and_then(|j| j.steps.get_mut(call.step))
    {
        step.end_time = Some(Time(now));
        match result {
            Ok(msg) => {
                step.state = StepState::Succeeded;
                step.message = Some(msg);
            }
            Err(msg) => {
                step.state = StepState::Failed;
                step.message = Some(msg.clone());
                notes.push(Note {
                    warning: true,
                    reason: "StepFailed",
                    message: format!("{} of group {}: {msg}", call.action, call.group),
                });
            }
        }
    }
    (st, notes)
}

/// The site a member should run at under this plan, if the plan has released it.
/// The ReplicatedVM controller calls this with the plan that selects the VM.
pub fn released_target(status: &FailoverPlanStatus, vm: &str) -> Option<(JobType, String)> {
    let job = status.jobs.last()?;
    let released = status
        .groups
        .iter()
        .flat_map(|g| g.vms.iter())
        .any(|v| v.name == vm && (v.state == VM_RELEASED || v.state == VM_SUCCEEDED));
    if !released {
        return None;
    }
    Some((job.type_, job.target_site.clone()?))
}

#[cfg(test)]
mod tests;
