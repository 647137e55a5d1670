//! What the deletion of a ReplicatedVM may do, decided without I/O: the finalizer
//! (`rvm::cleanup`) asks these functions and acts on their answers.
//!
//! - A job that runs is never cut off: deletion waits for it to end (the planner drives it to
//!   its end and starts nothing new, see `planner::Input::deleting`), unless it only waits for
//!   the source's copy (no site call in flight; the cleanup stops that replication).
//! - The replica at the site where the VM does not run is deleted, unless it is the only copy
//!   of a VM that runs nowhere: then the deletion waits for the annotation
//!   [`DELETE_LAST_COPY_ANNOTATION`] (`"true"`).

use jiff::Timestamp;

use super::planner::StepName;
use crate::api::{DELETE_LAST_COPY_ANNOTATION, Job, JobState, ReplicatedVMStatus, StepState};
use crate::controller::conditions::{self, Cond, READY, RECONCILING, STALLED};

/// Ready's and Stalled's reason while the deletion keeps the only copy of the VM.
pub const LAST_COPY: &str = "LastCopy";

/// What a site holds of the VM, as far as deletion cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copy {
    /// The VM runs there.
    Running,
    /// The VM (or its replica) is there and does not run.
    Off,
    /// The site answers without the VM, or no Site object names it any more.
    Absent,
}

/// The job deletion waits for, if one runs. A job that only waits for the source's copy
/// (InitialReplication, Resynchronize: no site call in flight, possibly for hours) is not
/// waited for: the cleanup stops that replication anyway.
pub fn running_job(st: &ReplicatedVMStatus) -> Option<&Job> {
    st.jobs
        .iter()
        .rev()
        .find(|j| j.state == JobState::Running && !waits_for_copy(j))
}

fn waits_for_copy(j: &Job) -> bool {
    j.steps
        .iter()
        .find(|s| matches!(s.state, StepState::Pending | StepState::Running))
        .and_then(|s| StepName::parse(&s.name))
        .is_some_and(StepName::is_wait)
}

/// Whether the annotation value allows deleting the last copy.
pub fn last_copy_allowed(value: Option<&str>) -> bool {
    value.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Why the copy at `other` (the site where the VM should not run) must be kept, if it must:
/// it is the only copy of VM `vm`, which runs nowhere (`active`, where the VM should run,
/// holds nothing of it), and deleting the last copy was not asked for.
pub fn keep_last_copy(
    vm: &str,
    active: &str,
    at_active: Copy,
    other: &str,
    at_other: Copy,
    allowed: bool,
) -> Option<String> {
    if allowed || at_active != Copy::Absent || at_other != Copy::Off {
        return None;
    }
    Some(format!(
        "deletion keeps the replica of VM {vm} at {other}: it is the only copy of the VM, which \
         runs nowhere ({active} holds no VM {vm}); to delete it with the ReplicatedVM: kubectl \
         annotate rvm <name> {DELETE_LAST_COPY_ANNOTATION}=true"
    ))
}

/// The status while the deletion keeps the last copy: Ready False and Stalled True (reason
/// [`LAST_COPY`], a person decides), Reconciling False.
pub fn held(
    st: &ReplicatedVMStatus,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> ReplicatedVMStatus {
    let mut new = st.clone();
    conditions::set_all(
        &mut new.conditions,
        &[
            Cond::new(READY, false, LAST_COPY, message),
            Cond::new(RECONCILING, false, LAST_COPY, message),
            Cond::new(STALLED, true, LAST_COPY, message),
        ],
        generation,
        now,
    );
    new
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_only_copy_of_a_vm_that_runs_nowhere_is_kept() {
        let keep = |a, o, allowed| keep_last_copy("web-01", "primary", a, "secondary", o, allowed);
        let msg = keep(Copy::Absent, Copy::Off, false).expect("kept");
        assert!(msg.contains("only copy"), "{msg}");
        assert!(msg.contains("twinsite.io/delete-last-copy=true"), "{msg}");
        // Asked for explicitly: deleted.
        assert_eq!(keep(Copy::Absent, Copy::Off, true), None);
        // The VM is at its active site (running or off): the replica is not the only copy.
        assert_eq!(keep(Copy::Running, Copy::Off, false), None);
        assert_eq!(keep(Copy::Off, Copy::Off, false), None);
        // Nothing to delete, or the VM runs at the other site (never touched anyway).
        assert_eq!(keep(Copy::Absent, Copy::Absent, false), None);
        assert_eq!(keep(Copy::Absent, Copy::Running, false), None);
    }

    #[test]
    fn deletion_waits_for_a_running_job_but_not_for_a_copy() {
        use crate::api::{JobStep, JobType};
        let step = |n: &str, s: StepState| JobStep {
            name: n.into(),
            state: s,
            message: None,
            operation_id: None,
            start_time: None,
            end_time: None,
        };
        let job = |t: JobType, state: JobState, steps: Vec<JobStep>| Job {
            name: "j".into(),
            type_: t,
            source_site: None,
            target_site: None,
            state,
            start_time: None,
            end_time: None,
            recovery_point: None,
            recovery_point_age_seconds: None,
            cut_id: None,
            attempt: None,
            parameters: None,
            message: None,
            steps,
        };
        let mut st = ReplicatedVMStatus {
            jobs: vec![job(
                JobType::PlannedFailover,
                JobState::Running,
                vec![
                    step("ShutdownSource", StepState::Running),
                    step("StartAtTarget", StepState::Pending),
                ],
            )],
            ..Default::default()
        };
        assert!(running_job(&st).is_some());
        st.jobs[0].state = JobState::Failed;
        assert!(running_job(&st).is_none());
        st.jobs = vec![job(
            JobType::EnableReplication,
            JobState::Running,
            vec![
                step("EnableReplication", StepState::Succeeded),
                step("InitialReplication", StepState::Running),
            ],
        )];
        assert!(running_job(&st).is_none());
        st.jobs[0].steps[0].state = StepState::Running;
        st.jobs[0].steps[1].state = StepState::Pending;
        assert!(running_job(&st).is_some());
    }

    #[test]
    fn the_annotation_must_say_true() {
        assert!(last_copy_allowed(Some("true")));
        assert!(last_copy_allowed(Some(" True ")));
        assert!(!last_copy_allowed(Some("yes")));
        assert!(!last_copy_allowed(Some("false")));
        assert!(!last_copy_allowed(None));
    }

    #[test]
    fn a_held_deletion_is_stalled_not_ready() {
        let st = held(
            &ReplicatedVMStatus::default(),
            "kept",
            Some(3),
            Timestamp::from_second(1_800_000_000).unwrap(),
        );
        assert!(!conditions::is_true(&st.conditions, READY));
        assert!(!conditions::is_true(&st.conditions, RECONCILING));
        assert!(conditions::is_true(&st.conditions, STALLED));
        assert!(st.conditions.iter().all(|c| c.reason == LAST_COPY));
    }
}
