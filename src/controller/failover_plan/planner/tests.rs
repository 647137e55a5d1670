use super::*;
use crate::api::{FailoverSpec, ManualApproval, PlanGroup, TestFailoverSpec, Webhook};

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn group(name: &str, vms: &[&str]) -> PlanGroup {
    PlanGroup {
        name: name.into(),
        vms: vms.iter().map(|s| s.to_string()).collect(),
        selector: None,
        pre_actions: vec![],
        post_actions: vec![],
    }
}

fn spec(groups: Vec<PlanGroup>, kind: FailoverType) -> FailoverPlanSpec {
    FailoverPlanSpec {
        target_site: "secondary".into(),
        failover: FailoverSpec {
            type_: kind,
            ..Default::default()
        },
        test_failover: TestFailoverSpec::default(),
        groups,
        max_parallel: None,
    }
}

fn member(name: &str, at: &str) -> Member {
    Member {
        name: name.into(),
        active_site: Some(at.into()),
        busy: false,
        failed: false,
        uncommitted: false,
        drill_running: false,
        drill_result: None,
        job_started: None,
        drill_time: None,
    }
}

/// Applies writes until the planner idles or asks for a webhook; returns the last action.
fn drive(
    spec: &FailoverPlanSpec,
    status: &mut FailoverPlanStatus,
    groups: &[Vec<Member>],
    approvals: &[&str],
) -> Action {
    for i in 0..50 {
        let input = Input {
            name: "app",
            generation: Some(2),
            spec,
            status,
            approvals: approvals.iter().map(|s| s.to_string()).collect(),
            retry: None,
            groups: groups.to_vec(),
            conflicts: vec![],
            missing: vec![],
            now: t(i),
        };
        match plan(&input) {
            Action::Write(st, _) => *status = *st,
            other => return other,
        }
    }
    panic!("planner did not settle");
}

fn vm_state(st: &FailoverPlanStatus, vm: &str) -> String {
    st.groups
        .iter()
        .flat_map(|g| &g.vms)
        .find(|v| v.name == vm)
        .map(|v| v.state.clone())
        .unwrap()
}

#[test]
fn second_group_waits_until_first_runs_at_target() {
    let sp = spec(
        vec![group("db", &["db-1", "db-2"]), group("web", &["web-1"])],
        FailoverType::Planned,
    );
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![
        vec![member("db-1", "primary"), member("db-2", "primary")],
        vec![member("web-1", "primary")],
    ];
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.phase, Some(PlanPhase::InProgress));
    assert_eq!(vm_state(&st, "db-1"), VM_RELEASED);
    assert_eq!(vm_state(&st, "db-2"), VM_RELEASED);
    assert_eq!(vm_state(&st, "web-1"), VM_PENDING);
    assert!(released_target(&st, "web-1").is_none());
    assert_eq!(
        released_target(&st, "db-1"),
        Some((JobType::PlanFailover, "secondary".into()))
    );

    // One database arrives: the web group still waits.
    groups[0][0].active_site = Some("secondary".into());
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_SUCCEEDED);
    assert_eq!(vm_state(&st, "web-1"), VM_PENDING);

    // A VM that is at the target but still has a job running does not count yet.
    groups[0][1].active_site = Some("secondary".into());
    groups[0][1].busy = true;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "web-1"), VM_PENDING);

    groups[0][1].busy = false;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "web-1"), VM_RELEASED);
    assert_eq!(st.groups_summary.as_deref(), Some("1/2"));

    groups[1][0].active_site = Some("secondary".into());
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.phase, Some(PlanPhase::Completed));
    assert_eq!(st.jobs.last().unwrap().state, JobState::Succeeded);
    assert_eq!(st.groups_summary.as_deref(), Some("2/2"));
    assert!(conditions::is_true(&st.conditions, conditions::READY));
}

#[test]
fn max_parallel_limits_vms_in_flight() {
    let mut sp = spec(vec![group("all", &["a", "b", "c"])], FailoverType::Planned);
    sp.max_parallel = Some(2);
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![vec![
        member("a", "primary"),
        member("b", "primary"),
        member("c", "primary"),
    ]];
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "c"), VM_PENDING);
    groups[0][0].active_site = Some("secondary".into());
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "c"), VM_RELEASED);
}

#[test]
fn manual_approval_pauses_until_annotated() {
    let mut g = group("db", &["db-1"]);
    g.pre_actions.push(PlanAction {
        name: "fenced".into(),
        manual_approval: Some(ManualApproval {
            message: Some("DBA confirms".into()),
        }),
        webhook: None,
    });
    let sp = spec(vec![g], FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    let groups = vec![vec![member("db-1", "primary")]];
    drive(&sp, &mut st, &groups, &[]);
    assert!(conditions::is_true(&st.conditions, WAITING_FOR_APPROVAL));
    assert_eq!(
        vm_state(&st, "db-1"),
        VM_PENDING,
        "nothing moves before approval"
    );
    let step = &st.jobs[0].steps[0];
    assert_eq!(step.name, "pre:db/fenced");
    assert_eq!(step.state, StepState::Running);
    assert!(
        step.message
            .as_deref()
            .unwrap()
            .contains("twinsite.io/approve=db/fenced")
    );

    drive(&sp, &mut st, &groups, &["db/fenced"]);
    assert!(!conditions::is_true(&st.conditions, WAITING_FOR_APPROVAL));
    assert_eq!(st.jobs[0].steps[0].state, StepState::Succeeded);
    assert_eq!(vm_state(&st, "db-1"), VM_RELEASED);
    assert_eq!(st.consumed_approvals, vec!["db/fenced".to_string()]);
}

#[test]
fn a_kept_approval_does_not_pre_approve_the_next_run() {
    let mut g = group("db", &["db-1"]);
    g.pre_actions.push(PlanAction {
        name: "fenced".into(),
        manual_approval: Some(ManualApproval { message: None }),
        webhook: None,
    });
    let sp = spec(vec![g], FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    // Run 1, approved with the plain value, completes.
    drive(
        &sp,
        &mut st,
        &[vec![member("db-1", "primary")]],
        &["db/fenced"],
    );
    drive(
        &sp,
        &mut st,
        &[vec![member("db-1", "secondary")]],
        &["db/fenced"],
    );
    assert_eq!(st.jobs[0].state, JobState::Succeeded);
    // The VM moves away; run 2 starts. The kept annotation does not approve it.
    let back = vec![vec![member("db-1", "primary")]];
    drive(&sp, &mut st, &back, &["db/fenced"]);
    assert_eq!(st.jobs.len(), 2);
    let job2 = st.jobs[1].name.clone();
    assert!(conditions::is_true(&st.conditions, WAITING_FOR_APPROVAL));
    assert_eq!(vm_state(&st, "db-1"), VM_PENDING);
    let msg = st.jobs[1].steps[0].message.clone().unwrap();
    assert!(msg.contains(&format!("db/fenced@{job2}")), "{msg}");
    // A value naming run 2 approves it.
    let scoped = format!("db/fenced@{job2}");
    drive(&sp, &mut st, &back, &["db/fenced", &scoped]);
    assert_eq!(st.jobs[1].steps[0].state, StepState::Succeeded);
    assert_eq!(vm_state(&st, "db-1"), VM_RELEASED);
}

/// A plain approval value, once consumed, never approves again: however many runs follow,
/// each approved with its own scoped value, the plain value left in the annotation is not
/// forgotten.
#[test]
fn a_consumed_plain_approval_stays_consumed_after_many_runs() {
    let mut g = group("db", &["db-1"]);
    g.pre_actions.push(PlanAction {
        name: "fenced".into(),
        manual_approval: Some(ManualApproval { message: None }),
        webhook: None,
    });
    let sp = spec(vec![g], FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    let away = vec![vec![member("db-1", "primary")]];
    let there = vec![vec![member("db-1", "secondary")]];
    // Run 1 with the plain value; the VM ends at the target.
    drive(&sp, &mut st, &away, &["db/fenced"]);
    drive(&sp, &mut st, &there, &["db/fenced"]);
    for run in 0..100 {
        // The VM moved away again (a failback outside the plan): a new run starts.
        let groups = away.clone();
        drive(&sp, &mut st, &groups, &["db/fenced"]);
        let job = st.jobs.last().unwrap().name.clone();
        assert_eq!(
            vm_state(&st, "db-1"),
            VM_PENDING,
            "run {run}: the plain value approved {job} again"
        );
        let scoped = format!("db/fenced@{job}");
        drive(&sp, &mut st, &groups, &["db/fenced", &scoped]);
        assert_eq!(vm_state(&st, "db-1"), VM_RELEASED, "run {run}");
        drive(&sp, &mut st, &there, &["db/fenced", &scoped]);
        assert_eq!(
            st.jobs.last().unwrap().state,
            JobState::Succeeded,
            "run {run}"
        );
    }
}

fn with_webhook(kind: FailoverType) -> FailoverPlanSpec {
    let mut g1 = group("db", &["db-1"]);
    g1.post_actions.push(PlanAction {
        name: "check".into(),
        manual_approval: None,
        webhook: Some(Webhook {
            url: "http://127.0.0.1:1/hook".into(),
            timeout_seconds: 5,
            ca_bundle: None,
        }),
    });
    spec(vec![g1, group("web", &["web-1"])], kind)
}

#[test]
fn failing_webhook_stops_a_planned_plan() {
    let sp = with_webhook(FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    let groups = vec![
        vec![member("db-1", "secondary")],
        vec![member("web-1", "primary")],
    ];
    let Action::CallWebhook(call) = drive(&sp, &mut st, &groups, &[]) else {
        panic!("expected a webhook call");
    };
    assert_eq!(call.group, "db");
    assert_eq!(
        st.jobs[0].steps[1].state,
        StepState::Running,
        "persisted before the call"
    );
    let (next, notes) = record_webhook(&st, &call, Err("HTTP 500".into()), t(99));
    st = next;
    assert!(notes[0].warning);
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[0].state, JobState::Failed);
    assert_eq!(st.phase, Some(PlanPhase::Failed));
    assert_eq!(
        vm_state(&st, "web-1"),
        VM_PENDING,
        "the next group never starts"
    );
    assert!(conditions::is_true(&st.conditions, conditions::STALLED));
}

#[test]
fn failing_webhook_does_not_stop_an_unplanned_plan() {
    let sp = with_webhook(FailoverType::Unplanned);
    let mut st = FailoverPlanStatus::default();
    let groups = vec![
        vec![member("db-1", "secondary")],
        vec![member("web-1", "primary")],
    ];
    let Action::CallWebhook(call) = drive(&sp, &mut st, &groups, &[]) else {
        panic!("expected a webhook call");
    };
    st = record_webhook(&st, &call, Err("timed out".into()), t(99)).0;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[0].steps[1].state, StepState::Failed, "recorded");
    assert_eq!(st.jobs[0].state, JobState::Running);
    assert_eq!(vm_state(&st, "web-1"), VM_RELEASED);
}

#[test]
fn a_failed_vm_fails_the_plan_job() {
    let sp = spec(
        vec![group("db", &["db-1"]), group("web", &["web-1"])],
        FailoverType::Unplanned,
    );
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![
        vec![member("db-1", "primary")],
        vec![member("web-1", "primary")],
    ];
    drive(&sp, &mut st, &groups, &[]);
    groups[0][0].failed = true;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_FAILED);
    assert_eq!(st.jobs[0].state, JobState::Failed);
    assert_eq!(vm_state(&st, "web-1"), VM_PENDING);
}

#[test]
fn conflicts_block_everything() {
    let sp = spec(vec![group("db", &["db-1"])], FailoverType::Planned);
    let st = FailoverPlanStatus::default();
    let input = Input {
        name: "app",
        generation: Some(1),
        spec: &sp,
        status: &st,
        approvals: vec![],
        retry: None,
        groups: vec![vec![member("db-1", "primary")]],
        conflicts: vec!["db-1 is also selected by plan other".into()],
        missing: vec![],
        now: t(0),
    };
    let Action::Write(st, _) = plan(&input) else {
        panic!("expected a status write");
    };
    assert!(st.jobs.is_empty(), "no job starts");
    assert!(conditions::is_true(&st.conditions, CONFLICT));
    assert!(!conditions::is_true(&st.conditions, conditions::READY));
}

#[test]
fn nothing_to_do_when_every_vm_is_at_the_target() {
    let sp = spec(vec![group("db", &["db-1"])], FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    let groups = vec![vec![member("db-1", "secondary")]];
    let last = drive(&sp, &mut st, &groups, &[]);
    assert!(matches!(last, Action::Idle(_)));
    assert!(st.jobs.is_empty());
    assert_eq!(st.phase, Some(PlanPhase::Completed));
}

#[test]
fn drill_then_cleanup_records_the_drill() {
    let mut sp = spec(
        vec![group("db", &["db-1"]), group("web", &["web-1"])],
        FailoverType::Planned,
    );
    sp.test_failover.enabled = true;
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![
        vec![member("db-1", "primary")],
        vec![member("web-1", "primary")],
    ];
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[0].type_, JobType::PlanTestFailover);
    assert_eq!(
        released_target(&st, "db-1"),
        Some((JobType::PlanTestFailover, "secondary".into()))
    );
    for g in groups.iter_mut() {
        for m in g.iter_mut() {
            m.drill_running = true;
        }
    }
    drive(&sp, &mut st, &groups, &[]);
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[0].state, JobState::Succeeded);
    assert!(
        st.last_drill.is_none(),
        "a drill counts only after its cleanup"
    );

    sp.test_failover.enabled = false;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[1].type_, JobType::PlanTestFailoverCleanup);
    for g in groups.iter_mut() {
        for m in g.iter_mut() {
            m.drill_running = false;
            m.drill_result = Some("Succeeded".into());
        }
    }
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[1].state, JobState::Succeeded);
    let drill = st.last_drill.clone().unwrap();
    assert_eq!(drill.job, st.jobs[0].name);
    assert_eq!(drill.result, "Succeeded");
}

#[test]
fn a_failure_from_before_the_plan_job_does_not_fail_it() {
    let sp = spec(vec![group("db", &["db-1"])], FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![vec![member("db-1", "primary")]];
    // The VM's newest job failed long before the plan job.
    groups[0][0].failed = true;
    groups[0][0].job_started = Some(t(-1000));
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_RELEASED);
    assert_eq!(st.jobs[0].state, JobState::Running);
    // A failure of a job started for the plan does.
    groups[0][0].job_started = Some(t(30));
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_FAILED);
    assert_eq!(st.jobs[0].state, JobState::Failed);
}

#[test]
fn a_conflict_holds_a_running_job() {
    let sp = spec(
        vec![group("db", &["db-1"]), group("web", &["web-1"])],
        FailoverType::Planned,
    );
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![
        vec![member("db-1", "primary")],
        vec![member("web-1", "primary")],
    ];
    drive(&sp, &mut st, &groups, &[]);
    groups[0][0].active_site = Some("secondary".into());
    let input = Input {
        name: "app",
        generation: Some(2),
        spec: &sp,
        status: &st,
        approvals: vec![],
        retry: None,
        groups: groups.clone(),
        conflicts: vec!["web-1 is also in plan other".into()],
        missing: vec![],
        now: t(100),
    };
    let Action::Write(held, notes) = plan(&input) else {
        panic!("expected the Conflict condition to be written");
    };
    assert!(conditions::is_true(&held.conditions, CONFLICT));
    assert_eq!(vm_state(&held, "web-1"), VM_PENDING, "nothing is released");
    assert_eq!(vm_state(&held, "db-1"), VM_RELEASED, "no step advances");
    assert!(notes.iter().any(|n| n.reason == "Conflict" && n.warning));
    // Once the conflict is gone the job goes on.
    st = *held;
    drive(&sp, &mut st, &groups, &[]);
    assert!(!conditions::is_true(&st.conditions, CONFLICT));
    assert_eq!(vm_state(&st, "web-1"), VM_RELEASED);
}

#[test]
fn a_missing_member_is_reported_and_waited_for() {
    let sp = spec(vec![group("db", &["db-1"])], FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    let mut nowhere = member("db-1", "x");
    nowhere.active_site = None;
    let groups = vec![vec![nowhere]];
    let input = Input {
        name: "app",
        generation: Some(1),
        spec: &sp,
        status: &st,
        approvals: vec![],
        retry: None,
        groups: groups.clone(),
        conflicts: vec![],
        missing: vec!["db-1".into()],
        now: t(0),
    };
    let Action::Write(next, _) = plan(&input) else {
        panic!("expected a write");
    };
    st = *next;
    assert!(conditions::is_true(&st.conditions, MEMBERS_MISSING));
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == MEMBERS_MISSING)
        .unwrap();
    assert!(c.message.contains("db-1"));
    assert_eq!(st.jobs[0].state, JobState::Running);
    // The VM appears and arrives: the group completes and the condition clears.
    drive(&sp, &mut st, &[vec![member("db-1", "secondary")]], &[]);
    assert_eq!(st.jobs[0].state, JobState::Succeeded);
    assert!(!conditions::is_true(&st.conditions, MEMBERS_MISSING));
}

#[test]
fn a_vm_that_leaves_the_group_leaves_its_status() {
    let sp = spec(
        vec![group("web", &["web-1", "web-2"])],
        FailoverType::Planned,
    );
    let mut st = FailoverPlanStatus::default();
    let groups = vec![vec![member("web-1", "primary"), member("web-2", "primary")]];
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.groups[0].vms.len(), 2);
    // web-2's labels no longer match: only web-1 is waited for.
    drive(&sp, &mut st, &[vec![member("web-1", "secondary")]], &[]);
    assert_eq!(st.groups[0].vms.len(), 1);
    assert_eq!(st.jobs[0].state, JobState::Succeeded);
}

#[test]
fn an_older_failed_drill_does_not_taint_the_plan_drill() {
    let mut sp = spec(vec![group("db", &["db-1"])], FailoverType::Planned);
    sp.test_failover.enabled = true;
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![vec![member("db-1", "primary")]];
    groups[0][0].drill_result = Some("Failed".into());
    groups[0][0].drill_time = Some(t(-500));
    drive(&sp, &mut st, &groups, &[]);
    groups[0][0].drill_running = true;
    drive(&sp, &mut st, &groups, &[]);
    sp.test_failover.enabled = false;
    drive(&sp, &mut st, &groups, &[]);
    groups[0][0].drill_running = false;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.last_drill.as_ref().unwrap().result, "Succeeded");
}

#[test]
fn webhook_call_names_its_stage() {
    let sp = with_webhook(FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    let groups = vec![
        vec![member("db-1", "secondary")],
        vec![member("web-1", "primary")],
    ];
    let Action::CallWebhook(call) = drive(&sp, &mut st, &groups, &[]) else {
        panic!("expected a webhook call");
    };
    assert_eq!(call.stage, "post");
    assert_eq!(call.direction, "failover");
    assert_eq!(call.target_site, "secondary");
}

#[test]
fn a_failed_job_runs_again_when_the_retry_annotation_names_it() {
    let sp = with_webhook(FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    let groups = vec![
        vec![member("db-1", "secondary")],
        vec![member("web-1", "primary")],
    ];
    let Action::CallWebhook(call) = drive(&sp, &mut st, &groups, &[]) else {
        panic!("expected a webhook call");
    };
    st = record_webhook(&st, &call, Err("HTTP 500".into()), t(99)).0;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[0].state, JobState::Failed);
    let failed = st.jobs[0].name.clone();
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(
        ready
            .message
            .contains(&format!("twinsite.io/retry={failed}"))
    );

    let retry = |st: &FailoverPlanStatus, name: &str| {
        plan(&Input {
            name: "app",
            generation: Some(2),
            spec: &sp,
            status: st,
            approvals: vec![],
            retry: Some(name.into()),
            groups: groups.clone(),
            conflicts: vec![],
            missing: vec![],
            now: t(200),
        })
    };
    // A retry naming another job does nothing.
    assert!(matches!(retry(&st, "app-failover-7"), Action::Idle(_)));
    // Not in the second the failed run ended: its VMs tell that run's failures from the new
    // run's by time.
    let ended = st.jobs[0].end_time.clone().unwrap().0;
    let same_second = plan(&Input {
        name: "app",
        generation: Some(2),
        spec: &sp,
        status: &st,
        approvals: vec![],
        retry: Some(failed.clone()),
        groups: groups.clone(),
        conflicts: vec![],
        missing: vec![],
        now: ended,
    });
    match same_second {
        Action::Idle(d) => assert_eq!(d, Duration::from_secs(1)),
        Action::Write(next, _) => assert_eq!(next.jobs.len(), 1, "{next:?}"),
        other => panic!("unexpected {other:?}"),
    }
    let Action::Write(next, _) = retry(&st, &failed) else {
        panic!("expected a new job");
    };
    assert_eq!(next.jobs.len(), 2);
    assert_eq!(next.jobs[1].state, JobState::Running);
    assert_eq!(next.jobs[1].name, "app-failover-2");
}

#[test]
fn an_unplanned_plan_from_latest_processed_names_a_consistent_cut() {
    let mut sp = spec(vec![group("db", &["db-1"])], FailoverType::Unplanned);
    let groups = vec![vec![member("db-1", "primary")]];
    let mut st = FailoverPlanStatus::default();
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[0].cut_id, None, "Latest needs no cut");
    sp.failover.recovery_point = "LatestProcessed".into();
    let mut st = FailoverPlanStatus::default();
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(st.jobs[0].cut_id.as_deref(), Some("app-failover-1-cut"));
}

#[test]
fn a_vm_busy_at_the_target_after_the_run_starts_no_new_run() {
    let sp = spec(vec![group("db", &["db-1"])], FailoverType::Planned);
    let mut st = FailoverPlanStatus::default();
    drive(&sp, &mut st, &[vec![member("db-1", "primary")]], &[]);
    drive(&sp, &mut st, &[vec![member("db-1", "secondary")]], &[]);
    assert_eq!(st.jobs.len(), 1);
    assert_eq!(st.jobs[0].state, JobState::Succeeded);
    // The VM commits and reprotects at the target: its own jobs, not the plan's work.
    let mut busy = member("db-1", "secondary");
    busy.busy = true;
    drive(&sp, &mut st, &[vec![busy]], &[]);
    assert_eq!(st.jobs.len(), 1, "{:?}", st.jobs);
}

#[test]
fn a_group_is_done_only_when_its_automatic_commits_have_ended() {
    let sp = spec(
        vec![group("db", &["db-1"]), group("web", &["web-1"])],
        FailoverType::Planned,
    );
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![
        vec![member("db-1", "primary")],
        vec![member("web-1", "primary")],
    ];
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_RELEASED);

    // The failover ended, its commit has not run yet: the VM is at the target and no job of it
    // runs, but the group is not done.
    groups[0][0].active_site = Some("secondary".into());
    groups[0][0].uncommitted = true;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_RELEASED);
    assert_eq!(vm_state(&st, "web-1"), VM_PENDING);
    assert_eq!(st.groups[0].state, "Running");

    // The commit runs.
    groups[0][0].busy = true;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "web-1"), VM_PENDING);

    // The commit ended: now the next group goes.
    groups[0][0].busy = false;
    groups[0][0].uncommitted = false;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_SUCCEEDED);
    assert_eq!(vm_state(&st, "web-1"), VM_RELEASED);
}

#[test]
fn a_commit_that_fails_fails_the_group() {
    let sp = spec(
        vec![group("db", &["db-1"]), group("web", &["web-1"])],
        FailoverType::Planned,
    );
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![
        vec![member("db-1", "primary")],
        vec![member("web-1", "primary")],
    ];
    drive(&sp, &mut st, &groups, &[]);
    // The failover succeeded at the target; its commit (started after the plan job) failed.
    let m = &mut groups[0][0];
    m.active_site = Some("secondary".into());
    m.uncommitted = true;
    m.failed = true;
    m.job_started = Some(t(100));
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_FAILED);
    assert_eq!(st.groups[0].state, "Failed");
    assert_eq!(vm_state(&st, "web-1"), VM_PENDING);
    assert_eq!(st.jobs.last().unwrap().state, JobState::Failed);
    assert_eq!(st.phase, Some(PlanPhase::Failed));
}

#[test]
fn a_manual_commit_does_not_hold_the_group() {
    let mut sp = spec(
        vec![group("db", &["db-1"]), group("web", &["web-1"])],
        FailoverType::Planned,
    );
    sp.failover.commit = crate::api::CommitMode::Manual;
    let mut st = FailoverPlanStatus::default();
    let mut groups = vec![
        vec![member("db-1", "primary")],
        vec![member("web-1", "primary")],
    ];
    drive(&sp, &mut st, &groups, &[]);
    groups[0][0].active_site = Some("secondary".into());
    groups[0][0].uncommitted = true;
    drive(&sp, &mut st, &groups, &[]);
    assert_eq!(vm_state(&st, "db-1"), VM_SUCCEEDED);
    assert_eq!(vm_state(&st, "web-1"), VM_RELEASED);
}
