//! Which ReplicatedVMs a plan holds, the conflicts between plans and VMs, and what a held VM
//! should do. Pure: the FailoverPlan reconciler and the ReplicatedVM reconciler both decide
//! from the same functions, so a VM and its plan never disagree about who moves it.

use std::collections::BTreeMap;

use jiff::Timestamp;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use super::planner::{self, Member};
use crate::api::{FailoverPlan, FailoverSpec, JobState, JobType, ReplicatedVM};
use crate::controller::conditions;
use crate::controller::vm_jobs::{self, Cut};

/// A plan's members, resolved against the ReplicatedVMs of its namespace.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolved {
    /// Members per group, in spec order.
    pub groups: Vec<Vec<Member>>,
    /// Why nothing may move: each names the VM and the cause.
    pub conflicts: Vec<String>,
    /// Names in `vms` that no ReplicatedVM of the namespace has.
    pub missing: Vec<String>,
}

/// The names a plan's groups select, per group, in spec order (duplicates in one group once).
/// Names listed in `vms` are kept whether or not they exist. An invalid selector is an error
/// naming the group.
pub fn selected(plan: &FailoverPlan, rvms: &[ReplicatedVM]) -> Result<Vec<Vec<String>>, String> {
    let mut out = Vec::with_capacity(plan.spec.groups.len());
    for g in &plan.spec.groups {
        let mut names: Vec<String> = Vec::new();
        if let Some(sel) = &g.selector {
            let sel = Selector::try_from(sel.clone())
                .map_err(|e| format!("group {}: invalid selector: {e}", g.name))?;
            let empty = BTreeMap::new();
            for r in rvms {
                let labels = r.metadata.labels.as_ref().unwrap_or(&empty);
                if sel.matches(labels) {
                    names.push(r.name_any());
                }
            }
        }
        for n in &g.vms {
            names.push(n.clone());
        }
        let mut seen = std::collections::BTreeSet::new();
        names.retain(|n| seen.insert(n.clone()));
        out.push(names);
    }
    Ok(out)
}

/// What the plan needs to know of one ReplicatedVM.
pub fn member(rvm: &ReplicatedVM) -> Member {
    let st = rvm.status.clone().unwrap_or_default();
    let newest = st.jobs.last();
    // The resync a failed digest verification starts leaves that failover's failure standing.
    let standing = vm_jobs::standing_job(&st);
    Member {
        name: rvm.name_any(),
        active_site: st.active_site.clone(),
        // Replication jobs (the reverse replication after a failover, for one) do not hold a
        // group back: the VM already runs where it runs.
        busy: newest.is_some_and(|j| j.state == JobState::Running && !replication_only(j.type_)),
        failed: standing.is_some_and(|j| j.state == JobState::Failed),
        uncommitted: vm_jobs::uncommitted_failover(&st).is_some(),
        job_started: standing.and_then(|j| j.start_time.as_ref()).map(|t| t.0),
        drill_running: st.test_failover.is_some(),
        drill_result: st.last_drill.as_ref().map(|d| d.result.clone()),
        drill_time: st
            .last_drill
            .as_ref()
            .and_then(|d| d.time.as_ref())
            .map(|t| t.0),
    }
}

fn replication_only(t: JobType) -> bool {
    matches!(
        t,
        JobType::EnableReplication | JobType::ReverseReplicate | JobType::DisableReplication
    )
}

/// A member that does not exist: it is nowhere, so its group waits for it.
fn absent(name: &str) -> Member {
    Member {
        name: name.to_string(),
        active_site: None,
        busy: false,
        failed: false,
        uncommitted: false,
        job_started: None,
        drill_running: false,
        drill_result: None,
        drill_time: None,
    }
}

/// Why a VM selected by `plan` may not move under it, if anything (its own settings): the
/// condition reason and a message that names the cause and the fix.
fn vm_conflict(plan: &FailoverPlan, rvm: &ReplicatedVM) -> Option<(&'static str, String)> {
    let name = rvm.name_any();
    let target = &plan.spec.target_site;
    if *target != rvm.spec.primary_site && *target != rvm.spec.recovery_site {
        return Some((
            "TargetNotASite",
            format!(
                "ReplicatedVM {name} is replicated between {} and {}; the plan's targetSite {target} is neither",
                rvm.spec.primary_site, rvm.spec.recovery_site
            ),
        ));
    }
    if let Some(own) = &rvm.spec.active_site
        && own != target
    {
        return Some((
            "ActiveSiteDisagrees",
            format!(
                "ReplicatedVM {name} sets spec.activeSite {own} but plan {} targets {target}; \
                 unset spec.activeSite on the VM or set it to {target}",
                plan.name_any()
            ),
        ));
    }
    None
}

/// Resolves `plan`'s members and conflicts against every plan and ReplicatedVM of its namespace
/// (`plans` may include `plan` itself; it is recognised by name).
pub fn resolve(plan: &FailoverPlan, plans: &[FailoverPlan], rvms: &[ReplicatedVM]) -> Resolved {
    let by_name: BTreeMap<String, &ReplicatedVM> = rvms.iter().map(|r| (r.name_any(), r)).collect();
    let names = match selected(plan, rvms) {
        Ok(n) => n,
        Err(e) => {
            return Resolved {
                groups: plan.spec.groups.iter().map(|_| Vec::new()).collect(),
                conflicts: vec![e],
                missing: Vec::new(),
            };
        }
    };
    let mut out = Resolved::default();

    // A VM in two groups of this plan.
    let mut group_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (g, vms) in plan.spec.groups.iter().zip(&names) {
        for n in vms {
            if let Some(first) = group_of.insert(n, &g.name) {
                out.conflicts.push(format!(
                    "ReplicatedVM {n} is in two groups of this plan: {first} and {}",
                    g.name
                ));
            }
        }
    }

    // A VM in another plan of the namespace.
    let me = plan.name_any();
    for other in plans.iter().filter(|p| p.name_any() != me) {
        let Ok(theirs) = selected(other, rvms) else {
            continue;
        };
        let mut both: Vec<&String> = theirs
            .iter()
            .flatten()
            .filter(|n| group_of.contains_key(n.as_str()))
            .collect();
        both.sort();
        both.dedup();
        for n in both {
            out.conflicts.push(format!(
                "ReplicatedVM {n} is also in plan {}; a VM can follow one plan only",
                other.name_any()
            ));
        }
    }

    for vms in &names {
        let mut members = Vec::with_capacity(vms.len());
        for n in vms {
            match by_name.get(n) {
                Some(r) => {
                    if let Some((_, c)) = vm_conflict(plan, r) {
                        out.conflicts.push(c);
                    }
                    members.push(member(r));
                }
                None => {
                    out.missing.push(n.clone());
                    members.push(absent(n));
                }
            }
        }
        out.groups.push(members);
    }
    out.missing.sort();
    out.missing.dedup();
    out
}

/// What a ReplicatedVM should do, as far as plans are concerned.
#[derive(Clone, Debug, PartialEq)]
pub enum Hold {
    /// No plan selects the VM: it follows its own spec.
    Free,
    /// A plan holds the VM but has not released it (or a conflict stops the plan): the VM
    /// stays at status.activeSite and starts no failover or drill of its own.
    Held { plan: String },
    /// Released for a plan failover: the desired site is `target`, reached with the plan's
    /// failover settings (type, shutdownSource, recoveryPoint, commit) instead of the VM's.
    /// `job` is the plan job, for the VM's job records. `cut` (Unplanned from LatestProcessed)
    /// names the consistent cut the VM's recovery point must come from: one cut per source
    /// site over every VM of the plan (`status.groups[].vms`, carried as its members) failing
    /// over from that site.
    Failover {
        plan: String,
        job: String,
        target: String,
        failover: FailoverSpec,
        cut: Option<Cut>,
        /// When the plan job started, while it runs: a failover of the VM to `target` that
        /// failed before then is run again (a retry of the plan retries its failed VMs).
        started: Option<Timestamp>,
    },
    /// Released for a plan drill: a drill copy at the other site on the plan's drill network;
    /// the VM itself stays at status.activeSite.
    Drill {
        plan: String,
        job: String,
        network: String,
    },
    /// Released for a plan drill's cleanup: no drill copy; the VM itself stays.
    DrillCleanup { plan: String, job: String },
    /// The VM is in conflict (two plans, or its own activeSite disagrees with its plan): it
    /// stays at status.activeSite and shows condition Conflict with this reason and message
    /// (the cause and what to do about it).
    Conflict {
        reason: &'static str,
        message: String,
    },
}

/// How many groups of `plan` select `rvm` (by name or by label); an invalid selector selects
/// nothing.
fn groups_selecting(plan: &FailoverPlan, rvm: &ReplicatedVM) -> usize {
    let name = rvm.name_any();
    let empty = BTreeMap::new();
    let labels = rvm.metadata.labels.as_ref().unwrap_or(&empty);
    plan.spec
        .groups
        .iter()
        .filter(|g| {
            g.vms.contains(&name)
                || g.selector.as_ref().is_some_and(|sel| {
                    Selector::try_from(sel.clone()).is_ok_and(|sel| sel.matches(labels))
                })
        })
        .count()
}

/// How the plans of the VM's namespace hold `rvm`. The ReplicatedVM reconciler calls this with
/// the plans of the VM's namespace (plans of other namespaces are ignored) and acts on the
/// answer.
pub fn hold(rvm: &ReplicatedVM, plans: &[FailoverPlan]) -> Hold {
    let name = rvm.name_any();
    let ns = rvm.namespace();
    let mut holders: Vec<&FailoverPlan> = Vec::new();
    let mut in_two_groups = None;
    for p in plans.iter().filter(|p| p.namespace() == ns) {
        let count = groups_selecting(p, rvm);
        if count > 0 {
            holders.push(p);
        }
        if count > 1 {
            in_two_groups = Some(p.name_any());
        }
    }
    let Some(plan) = holders.first() else {
        return Hold::Free;
    };
    if holders.len() > 1 {
        let names: Vec<String> = holders.iter().map(|p| p.name_any()).collect();
        return Hold::Conflict {
            reason: "SelectedByTwoPlans",
            message: format!(
                "ReplicatedVM {name} is selected by more than one FailoverPlan: {}; a VM can \
                 follow one plan only: remove it from all but one of them (its name in a \
                 group's vms, or the labels a group's selector matches)",
                names.join(", ")
            ),
        };
    }
    if let Some(p) = in_two_groups {
        return Hold::Conflict {
            reason: "InTwoGroups",
            message: format!(
                "ReplicatedVM {name} is in two groups of FailoverPlan {p}; remove it from one \
                 of them"
            ),
        };
    }
    if let Some((reason, message)) = vm_conflict(plan, rvm) {
        return Hold::Conflict { reason, message };
    }
    let plan_name = plan.name_any();
    let status = plan.status.clone().unwrap_or_default();
    if conditions::is_true(&status.conditions, planner::CONFLICT) {
        return Hold::Held { plan: plan_name };
    }
    let job = status
        .jobs
        .last()
        .map(|j| j.name.clone())
        .unwrap_or_default();
    let cut = status
        .jobs
        .last()
        .and_then(|j| j.cut_id.clone())
        .map(|id| Cut {
            id,
            members: status
                .groups
                .iter()
                .flat_map(|g| g.vms.iter().map(|v| v.name.clone()))
                .collect(),
        });
    match planner::released_target(&status, &name) {
        Some((JobType::PlanTestFailover, _)) => Hold::Drill {
            plan: plan_name,
            job,
            network: plan.spec.test_failover.network.clone(),
        },
        Some((JobType::PlanTestFailoverCleanup, _)) => Hold::DrillCleanup {
            plan: plan_name,
            job,
        },
        Some((_, target)) => Hold::Failover {
            plan: plan_name,
            job,
            target,
            failover: plan.spec.failover.clone(),
            cut,
            started: status
                .jobs
                .last()
                .filter(|j| j.state == JobState::Running)
                .and_then(|j| j.start_time.as_ref())
                .map(|t| t.0),
        },
        None => Hold::Held { plan: plan_name },
    }
}

/// Seconds-precision now: status times are whole seconds, so comparisons stay exact.
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        FailoverPlanSpec, FailoverPlanStatus, GroupStatus, GroupVmStatus, Job, JobStep, PlanGroup,
        ReplicatedVMSpec, ReplicatedVMStatus, StepState,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};

    fn rvm(name: &str, labels: &[(&str, &str)], own: Option<&str>) -> ReplicatedVM {
        let mut r = ReplicatedVM::new(
            name,
            ReplicatedVMSpec {
                vm_name: None,
                primary_site: "primary".into(),
                recovery_site: "secondary".into(),
                active_site: own.map(str::to_string),
                replication: Default::default(),
                failover: Default::default(),
                test_failover: Default::default(),
            },
        );
        r.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        r
    }

    fn group(name: &str, vms: &[&str], sel: Option<(&str, &str)>) -> PlanGroup {
        PlanGroup {
            name: name.into(),
            vms: vms.iter().map(|s| s.to_string()).collect(),
            selector: sel.map(|(k, v)| LabelSelector {
                match_labels: Some([(k.to_string(), v.to_string())].into()),
                match_expressions: None,
            }),
            pre_actions: vec![],
            post_actions: vec![],
        }
    }

    fn fp(name: &str, groups: Vec<PlanGroup>) -> FailoverPlan {
        FailoverPlan::new(
            name,
            FailoverPlanSpec {
                target_site: "secondary".into(),
                failover: Default::default(),
                test_failover: Default::default(),
                groups,
                max_parallel: None,
            },
        )
    }

    #[test]
    fn names_and_selectors_resolve_and_missing_names_are_reported() {
        let rvms = vec![
            rvm("db-1", &[], None),
            rvm("web-1", &[("tier", "web")], None),
            rvm("web-2", &[("tier", "web")], Some("secondary")),
            rvm("other", &[("tier", "batch")], None),
        ];
        let p = fp(
            "app",
            vec![
                group("db", &["db-1", "db-2"], None),
                group("web", &[], Some(("tier", "web"))),
            ],
        );
        let r = resolve(&p, std::slice::from_ref(&p), &rvms);
        let names: Vec<Vec<&str>> = r
            .groups
            .iter()
            .map(|g| g.iter().map(|m| m.name.as_str()).collect())
            .collect();
        assert_eq!(names, vec![vec!["db-1", "db-2"], vec!["web-1", "web-2"]]);
        assert_eq!(r.missing, vec!["db-2".to_string()]);
        assert!(r.conflicts.is_empty(), "{:?}", r.conflicts);
        assert_eq!(r.groups[0][1].active_site, None);
    }

    #[test]
    fn a_vm_in_two_plans_conflicts_on_both_and_on_the_vm() {
        let rvms = vec![rvm("db-1", &[("app", "x")], None)];
        let a = fp("a", vec![group("db", &["db-1"], None)]);
        let b = fp("b", vec![group("all", &[], Some(("app", "x")))]);
        let plans = vec![a.clone(), b.clone()];
        let ra = resolve(&a, &plans, &rvms);
        let rb = resolve(&b, &plans, &rvms);
        assert!(
            ra.conflicts[0].contains("also in plan b"),
            "{:?}",
            ra.conflicts
        );
        assert!(
            rb.conflicts[0].contains("also in plan a"),
            "{:?}",
            rb.conflicts
        );
        let Hold::Conflict { message, reason } = hold(&rvms[0], &plans) else {
            panic!("expected a conflict");
        };
        assert!(message.contains("a, b"));
        assert_eq!(reason, "SelectedByTwoPlans");
    }

    #[test]
    fn a_vm_in_two_groups_conflicts() {
        let rvms = vec![rvm("db-1", &[("app", "x")], None)];
        let a = fp(
            "a",
            vec![
                group("db", &["db-1"], None),
                group("all", &[], Some(("app", "x"))),
            ],
        );
        let r = resolve(&a, std::slice::from_ref(&a), &rvms);
        assert_eq!(r.conflicts.len(), 1);
        assert!(r.conflicts[0].contains("two groups"));
        assert!(matches!(
            hold(&rvms[0], std::slice::from_ref(&a)),
            Hold::Conflict { .. }
        ));
    }

    #[test]
    fn a_vm_whose_own_active_site_disagrees_conflicts() {
        let rvms = vec![rvm("db-1", &[], Some("primary"))];
        let a = fp("a", vec![group("db", &["db-1"], None)]);
        let r = resolve(&a, std::slice::from_ref(&a), &rvms);
        assert!(r.conflicts[0].contains("spec.activeSite primary"));
        assert!(matches!(
            hold(&rvms[0], std::slice::from_ref(&a)),
            Hold::Conflict { .. }
        ));
        // A target that is neither of the VM's sites conflicts too.
        let mut far = a.clone();
        far.spec.target_site = "elsewhere".into();
        let ok = vec![rvm("db-1", &[], None)];
        let r = resolve(&far, std::slice::from_ref(&far), &ok);
        assert!(r.conflicts[0].contains("neither"));
    }

    #[test]
    fn hold_follows_the_plan_status() {
        let rvms = [rvm("db-1", &[], None), rvm("loose", &[], None)];
        let mut a = fp("a", vec![group("db", &["db-1"], None)]);
        assert_eq!(hold(&rvms[1], std::slice::from_ref(&a)), Hold::Free);
        assert_eq!(
            hold(&rvms[0], std::slice::from_ref(&a)),
            Hold::Held { plan: "a".into() }
        );
        let job = |t: JobType| Job {
            name: "a-failover-1".into(),
            type_: t,
            source_site: None,
            target_site: Some("secondary".into()),
            state: JobState::Running,
            start_time: None,
            end_time: None,
            recovery_point: None,
            recovery_point_age_seconds: None,
            cut_id: None,
            attempt: None,
            parameters: None,
            message: None,
            steps: vec![],
        };
        let mut st = FailoverPlanStatus {
            jobs: vec![job(JobType::PlanFailover)],
            groups: vec![GroupStatus {
                name: "db".into(),
                state: "Running".into(),
                vms: vec![GroupVmStatus {
                    name: "db-1".into(),
                    state: planner::VM_PENDING.into(),
                }],
            }],
            ..Default::default()
        };
        a.status = Some(st.clone());
        assert_eq!(
            hold(&rvms[0], std::slice::from_ref(&a)),
            Hold::Held { plan: "a".into() }
        );
        st.groups[0].vms[0].state = planner::VM_RELEASED.into();
        a.status = Some(st.clone());
        assert_eq!(
            hold(&rvms[0], std::slice::from_ref(&a)),
            Hold::Failover {
                plan: "a".into(),
                job: "a-failover-1".into(),
                target: "secondary".into(),
                failover: FailoverSpec::default(),
                cut: None,
                started: None,
            }
        );
        // A plan job that names a cut hands it on with every member of the plan.
        let mut with_cut = st.clone();
        with_cut.jobs[0].cut_id = Some("a-failover-1-cut".into());
        with_cut.groups.push(GroupStatus {
            name: "web".into(),
            state: "Pending".into(),
            vms: vec![GroupVmStatus {
                name: "web-1".into(),
                state: planner::VM_PENDING.into(),
            }],
        });
        a.status = Some(with_cut);
        let Hold::Failover { cut: Some(cut), .. } = hold(&rvms[0], std::slice::from_ref(&a)) else {
            panic!("expected a failover with a cut");
        };
        assert_eq!(cut.id, "a-failover-1-cut");
        assert_eq!(cut.members, ["db-1", "web-1"]);
        st.jobs = vec![job(JobType::PlanTestFailover)];
        a.status = Some(st.clone());
        assert_eq!(
            hold(&rvms[0], std::slice::from_ref(&a)),
            Hold::Drill {
                plan: "a".into(),
                job: "a-failover-1".into(),
                network: "isolated".into()
            }
        );
        st.jobs = vec![job(JobType::PlanTestFailoverCleanup)];
        a.status = Some(st);
        assert_eq!(
            hold(&rvms[0], std::slice::from_ref(&a)),
            Hold::DrillCleanup {
                plan: "a".into(),
                job: "a-failover-1".into()
            }
        );
    }

    #[test]
    fn member_reads_the_vm_status() {
        let mut r = rvm("db-1", &[], None);
        let job = |t: JobType, s: JobState| Job {
            name: "j".into(),
            type_: t,
            source_site: None,
            target_site: None,
            state: s,
            start_time: None,
            end_time: None,
            recovery_point: None,
            recovery_point_age_seconds: None,
            cut_id: None,
            attempt: None,
            parameters: None,
            message: None,
            steps: vec![],
        };
        r.status = Some(ReplicatedVMStatus {
            active_site: Some("secondary".into()),
            jobs: vec![job(JobType::PlannedFailover, JobState::Running)],
            ..Default::default()
        });
        let m = member(&r);
        assert!(m.busy && !m.failed);
        assert_eq!(m.active_site.as_deref(), Some("secondary"));
        // Reverse replication after the failover does not hold the group back.
        r.status.as_mut().unwrap().jobs = vec![job(JobType::ReverseReplicate, JobState::Running)];
        assert!(!member(&r).busy);
        r.status.as_mut().unwrap().jobs = vec![job(JobType::PlannedFailover, JobState::Failed)];
        assert!(member(&r).failed);
        // A failover that succeeded is uncommitted until a commit after it succeeds.
        let done = job(JobType::PlannedFailover, JobState::Succeeded);
        r.status.as_mut().unwrap().jobs = vec![done.clone()];
        assert!(member(&r).uncommitted);
        for s in [JobState::Running, JobState::Failed] {
            r.status.as_mut().unwrap().jobs = vec![done.clone(), job(JobType::Commit, s)];
            assert!(member(&r).uncommitted, "{s:?}");
        }
        r.status.as_mut().unwrap().jobs = vec![done, job(JobType::Commit, JobState::Succeeded)];
        assert!(!member(&r).uncommitted);
    }

    #[test]
    fn the_resync_after_a_digest_mismatch_leaves_the_failover_failed() {
        let mut r = rvm("db-1", &[], None);
        let t = |s: i64| Time(jiff::Timestamp::from_second(1_800_000_000 + s).unwrap());
        let job = |name: &str, t_: JobType, s: JobState, start: i64, step: (&str, StepState)| Job {
            name: name.into(),
            type_: t_,
            source_site: Some("primary".into()),
            target_site: Some("secondary".into()),
            state: s,
            start_time: Some(t(start)),
            end_time: None,
            recovery_point: None,
            recovery_point_age_seconds: None,
            cut_id: None,
            attempt: None,
            parameters: None,
            message: None,
            steps: vec![JobStep {
                name: step.0.into(),
                state: step.1,
                message: None,
                operation_id: None,
                start_time: None,
                end_time: None,
            }],
        };
        let failover = job(
            "db-1-failover-2",
            JobType::PlannedFailover,
            JobState::Failed,
            10,
            ("VerifyDigests", StepState::Failed),
        );
        for state in [JobState::Running, JobState::Succeeded] {
            let resync = job(
                "db-1-reprotect-3",
                JobType::ReverseReplicate,
                state,
                20,
                ("EnableReplication", StepState::Succeeded),
            );
            r.status = Some(ReplicatedVMStatus {
                active_site: Some("primary".into()),
                jobs: vec![failover.clone(), resync],
                ..Default::default()
            });
            let m = member(&r);
            assert!(m.failed && !m.busy, "{state:?}");
            assert_eq!(m.job_started, Some(t(10).0));
        }
    }
}
