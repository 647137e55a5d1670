//! Planner tests: a small in-memory model of two sites answers the planner's calls, so whole
//! procedures run without I/O. The model is idempotent by operation id, as agents are.

use std::collections::{HashMap, HashSet};

use super::MAX_JOBS;
use super::input::*;
use super::*;
use crate::api::*;
use crate::api::{FailoverSpec, TestFailoverSpec};
use crate::controller::conditions::{self, *};
use crate::controller::observe::*;
use crate::controller::vm_jobs::*;
use jiff::Timestamp;
use std::time::Duration;

const P: &str = "primary";
const S: &str = "secondary";

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn spec() -> ReplicatedVMSpec {
    ReplicatedVMSpec {
        vm_name: None,
        primary_site: P.into(),
        recovery_site: S.into(),
        active_site: None,
        replication: ReplicationSpec {
            interval_seconds: 30,
            ..Default::default()
        },
        failover: FailoverSpec::default(),
        test_failover: TestFailoverSpec::default(),
    }
}

fn running_vm(integration: bool) -> SimVm {
    SimVm {
        vm: ObservedVm {
            power: Power::Running,
            role: Role::Primary,
            replication: None,
            recovery_points: None,
            test_copy: None,
        },
        integration,
        digest_ok: true,
    }
}

#[derive(Clone)]
struct SimVm {
    vm: ObservedVm,
    integration: bool,
    digest_ok: bool,
}

struct World {
    spec: ReplicatedVMSpec,
    status: ReplicatedVMStatus,
    generation: i64,
    annotation: Option<String>,
    /// The `twinsite.io/retry` annotation.
    retry: Option<String>,
    /// When the plan job that moves the VM started.
    plan_started: Option<Timestamp>,
    /// The object is being deleted.
    deleting: bool,
    /// No fence before then.
    fence_not_before: Option<Timestamp>,
    /// The source answers a power off with an error.
    fence_refused: bool,
    sites: HashMap<String, Option<SimVm>>,
    down: HashSet<String>,
    /// Sites declared lost (spec.fence: Lost): never called.
    lost: HashSet<String>,
    now: i64,
    /// (step, site call went to, operation id) in call order.
    calls: Vec<(StepName, String)>,
    /// Operation ids the sites have done, with their results.
    done: HashMap<String, Outcome>,
    events: Vec<Note>,
    writes: usize,
    rp_seq: u32,
    /// A plan's conflict holding the VM.
    conflict: Option<Conflict>,
    /// A plan's consistent cut for the VM's failover.
    cut: Option<Cut>,
    /// The source's answer to a cut leaves this VM out.
    cut_leaves_out: bool,
    /// (cut id, VMs asked for) of every cut call, and the recovery point each StartAtTarget
    /// was asked for.
    cut_calls: Vec<(String, Vec<String>)>,
    started_from: Vec<String>,
    /// (source, target, mode) of every EnableReplication call.
    enables: Vec<(String, String, EnableMode)>,
    /// The target refuses to start the VM (StartAtTarget fails).
    start_fails: bool,
    /// The source's copies and cycles keep failing with this error (a full disk at the peer).
    copy_error: Option<String>,
    /// (site, operation id) of every settings call.
    settings_calls: Vec<(String, String)>,
    /// The source refuses settings calls with this error (an agent without the route).
    settings_refused: Option<String>,
    /// The source reports its copies done but the target's listing shows no point yet.
    points_lag: bool,
}

impl World {
    fn new(integration: bool) -> Self {
        let mut sites = HashMap::new();
        sites.insert(P.to_string(), Some(running_vm(integration)));
        sites.insert(S.to_string(), None);
        World {
            spec: spec(),
            status: ReplicatedVMStatus::default(),
            generation: 1,
            annotation: None,
            retry: None,
            plan_started: None,
            deleting: false,
            fence_not_before: None,
            fence_refused: false,
            sites,
            down: HashSet::new(),
            lost: HashSet::new(),
            now: 0,
            calls: vec![],
            done: HashMap::new(),
            events: vec![],
            writes: 0,
            rp_seq: 0,
            conflict: None,
            cut: None,
            cut_leaves_out: false,
            cut_calls: vec![],
            started_from: vec![],
            enables: vec![],
            start_fails: false,
            copy_error: None,
            settings_calls: vec![],
            settings_refused: None,
            points_lag: false,
        }
    }

    fn view(&self, site: &str) -> SiteView {
        if self.lost.contains(site) {
            return SiteView::Lost { since: ts(0) };
        }
        if self.down.contains(site) {
            return SiteView::Unreachable {
                since: ts(self.now),
                reason: "connection refused".into(),
            };
        }
        SiteView::Reachable {
            fetched_at: ts(self.now),
            vm: self.sites[site].as_ref().map(|s| s.vm.clone()),
        }
    }

    fn with_input<R>(&self, f: impl FnOnce(&Input) -> R) -> R {
        let p = self.view(P);
        let s = self.view(S);
        let input = Input {
            name: "web-01",
            uid: "uid1",
            generation: Some(self.generation),
            vm_name: "web-01",
            spec: &self.spec,
            commit_annotation: self.annotation.as_deref(),
            status: &self.status,
            primary: &p,
            recovery: &s,
            now: ts(self.now),
            poll: Duration::from_secs(5),
            conflict: self.conflict.as_ref(),
            cut: self.cut.as_ref(),
            retry: self.retry.as_deref(),
            plan_started: self.plan_started,
            deleting: self.deleting,
            fence_not_before: self.fence_not_before,
        };
        f(&input)
    }

    fn set_spec(&mut self, f: impl FnOnce(&mut ReplicatedVMSpec)) {
        f(&mut self.spec);
        self.generation += 1;
    }

    fn vm_mut(&mut self, site: &str) -> &mut SimVm {
        self.sites.get_mut(site).unwrap().as_mut().unwrap()
    }

    fn new_rp(&mut self) -> ObservedRecoveryPoint {
        self.rp_seq += 1;
        ObservedRecoveryPoint {
            id: format!("rp-{:06}", self.rp_seq),
            time: Some(ts(self.now)),
            app_consistent: false,
        }
    }

    /// Adds a recovery point at `site`.
    fn add_rp(&mut self, site: &str) -> ObservedRecoveryPoint {
        let rp = self.new_rp();
        let vm = self.vm_mut(site);
        let rps = vm.vm.recovery_points.get_or_insert_with(Default::default);
        rps.count += 1;
        rps.latest = Some(rp.clone());
        rp
    }

    /// What the sites do for a call (idempotent by operation id).
    fn execute(&mut self, c: &StepCall) -> Outcome {
        if let Some(o) = self.done.get(&c.op_id) {
            return o.clone();
        }
        let site_of_call = match c.step_name {
            StepName::ConsistentCut
            | StepName::ShutdownSource
            | StepName::FenceSource
            | StepName::SyncRemaining
            | StepName::EnableReplication
            | StepName::RestartSource => c.source.clone(),
            _ => c.target.clone(),
        };
        assert!(
            !self.lost.contains(&site_of_call),
            "{:?} called site {site_of_call}, which is declared lost",
            c.step_name
        );
        if self.down.contains(&site_of_call) {
            return Outcome::Unreachable(format!("site {site_of_call} does not answer"));
        }
        self.calls.push((c.step_name, site_of_call.clone()));
        let o = self.do_step(c);
        self.done.insert(c.op_id.clone(), o.clone());
        o
    }

    fn do_step(&mut self, c: &StepCall) -> Outcome {
        let (src, tgt) = (c.source.as_str(), c.target.as_str());
        match c.step_name {
            StepName::ConsistentCut => {
                self.cut_calls.push((c.op_id.clone(), c.cut_vms.clone()));
                if self.cut_leaves_out {
                    return Outcome::Failed(format!("VM {} is not in cut {}", c.vm, c.op_id));
                }
                let rp = self.add_rp(tgt);
                Outcome::Succeeded {
                    message: Some(format!("recovery point {} of cut {}", rp.id, c.op_id)),
                    recovery_point: Some(rp),
                    test_vm: None,
                }
            }
            StepName::ShutdownSource => {
                let vm = self.vm_mut(src);
                // As at the agent: a VM that is off already is shut down.
                if !vm.integration && vm.vm.power == Power::Running {
                    return Outcome::Failed("no integration services".into());
                }
                vm.vm.power = Power::Off;
                Outcome::ok()
            }
            StepName::FenceSource => {
                if self.fence_refused {
                    return Outcome::Failed(format!("site {src}: power off refused"));
                }
                self.vm_mut(src).vm.power = Power::Off;
                Outcome::ok()
            }
            StepName::RestartSource => {
                self.vm_mut(src).vm.power = Power::Running;
                Outcome::ok()
            }
            StepName::SyncRemaining => {
                let rp = self.add_rp(tgt);
                Outcome::Succeeded {
                    message: None,
                    recovery_point: Some(rp),
                    test_vm: None,
                }
            }
            StepName::VerifyDigests => {
                if self.vm_mut(src).digest_ok {
                    Outcome::ok()
                } else {
                    Outcome::Failed("digest of disk0 differs".into())
                }
            }
            StepName::EnableReplication => {
                self.enables.push((src.into(), tgt.into(), c.mode));
                let state = match c.mode {
                    EnableMode::Initial => ObservedReplicationState::InitialReplication,
                    EnableMode::Resync => ObservedReplicationState::Resynchronizing,
                };
                let now = ts(self.now);
                let vm = self.vm_mut(src);
                // A whole copy or a resync (every block compared): the replica equals the source.
                vm.digest_ok = true;
                vm.vm.replication = Some(ObservedReplication {
                    state,
                    direction: Some(Direction::Outbound),
                    peer_site: Some(tgt.into()),
                    last_sync_time: Some(now),
                    bytes_sent: 0,
                    pending_bytes: 0,
                    last_error: None,
                    interval_seconds: Some(c.replication.interval_seconds),
                    retention_hours: Some(c.replication.recovery_point_retention_hours),
                    app_consistent_hours: Some(c.replication.app_consistent_frequency_hours),
                    progress: None,
                    verification: None,
                    divergences: 0,
                    last_divergence: None,
                });
                let integration = vm.integration;
                let t = self.sites.get_mut(tgt).unwrap();
                match t {
                    Some(t) => {
                        t.vm.role = Role::Replica;
                        t.vm.power = Power::Off;
                        t.vm.replication = None;
                    }
                    None => {
                        *t = Some(SimVm {
                            vm: ObservedVm {
                                power: Power::Off,
                                role: Role::Replica,
                                replication: None,
                                recovery_points: None,
                                test_copy: None,
                            },
                            integration,
                            digest_ok: true,
                        })
                    }
                }
                Outcome::ok()
            }
            StepName::StopReplication => {
                for s in [src, tgt] {
                    if self.down.contains(s) {
                        continue;
                    }
                    if let Some(vm) = self.sites.get_mut(s).unwrap() {
                        vm.vm.replication = None;
                    }
                }
                Outcome::ok()
            }
            StepName::StartAtTarget => {
                self.started_from.push(c.recovery_point.clone());
                if self.start_fails {
                    return Outcome::Failed("the target could not start the VM".into());
                }
                let Some(mut rp) = self.sites[tgt]
                    .as_ref()
                    .and_then(|v| v.vm.recovery_points.as_ref()?.latest.clone())
                else {
                    return Outcome::Failed("no recovery point".into());
                };
                if c.recovery_point.starts_with("rp-") {
                    rp.id = c.recovery_point.clone();
                }
                let vm = self.vm_mut(tgt);
                vm.vm.role = Role::Primary;
                vm.vm.power = Power::Running;
                Outcome::Succeeded {
                    message: None,
                    recovery_point: Some(rp),
                    test_vm: None,
                }
            }
            StepName::Commit => {
                self.vm_mut(tgt).vm.recovery_points = None;
                Outcome::ok()
            }
            StepName::CreateTestCopy => {
                let rp = self.sites[tgt]
                    .as_ref()
                    .and_then(|v| v.vm.recovery_points.as_ref()?.latest.clone());
                self.vm_mut(tgt).vm.test_copy = Some("web-01-test".into());
                Outcome::Succeeded {
                    message: None,
                    recovery_point: rp,
                    test_vm: Some("web-01-test".into()),
                }
            }
            StepName::DeleteTestCopy => {
                self.vm_mut(tgt).vm.test_copy = None;
                Outcome::ok()
            }
            StepName::RemoveReplica => {
                *self.sites.get_mut(tgt).unwrap() = None;
                Outcome::ok()
            }
            StepName::InitialReplication | StepName::Resynchronize => {
                panic!("wait steps call no site")
            }
        }
    }

    /// The agents' background work: finish initial copies and resyncs, make a recovery point.
    fn tick(&mut self, secs: i64) {
        self.now += secs;
        let names: Vec<String> = self.sites.keys().cloned().collect();
        for s in names {
            if self.down.contains(&s) {
                continue;
            }
            let Some(vm) = self.sites[&s].clone() else {
                continue;
            };
            if let Some(r) = &vm.vm.replication
                && r.direction == Some(Direction::Outbound)
            {
                let peer = r.peer_site.clone().unwrap();
                if let Some(e) = self.copy_error.clone() {
                    let r = self.vm_mut(&s).vm.replication.as_mut().unwrap();
                    r.last_error = Some(e);
                    continue;
                }
                if self.down.contains(&peer) {
                    continue;
                }
                if !self.points_lag {
                    self.add_rp(&peer);
                }
                let now = ts(self.now);
                let r = self.vm_mut(&s).vm.replication.as_mut().unwrap();
                r.state = ObservedReplicationState::Replicating;
                r.last_sync_time = Some(now);
                r.last_error = None;
            }
        }
    }

    /// One plan and its effect. Returns the plan.
    fn step(&mut self) -> Plan {
        let plan = self.with_input(plan);
        match &plan {
            Plan::Write(u) => self.apply(u),
            Plan::Execute(c) => {
                let o = self.execute(c);
                let p = self.with_input(|i| record_outcome(i, c, o));
                match p {
                    Plan::Write(u) => self.apply(&u),
                    Plan::Idle(_) => self.tick(5),
                    other => panic!("record_outcome gave {other:?}"),
                }
            }
            Plan::Fence(f) => {
                let site = f.site.clone();
                assert!(!self.lost.contains(&site), "fenced lost site {site}");
                self.calls.push((StepName::FenceSource, site.clone()));
                self.vm_mut(&site).vm.power = Power::Off;
                let p = self.with_input(|i| record_fence(i, f, Outcome::ok()));
                let Plan::Write(u) = p else { panic!() };
                self.apply(&u);
            }
            Plan::Settings(c) => {
                self.settings_calls.push((c.site.clone(), c.op_id.clone()));
                let o = if self.down.contains(&c.site) {
                    Outcome::Unreachable("connection refused".into())
                } else if let Some(e) = &self.settings_refused {
                    Outcome::Failed(e.clone())
                } else {
                    let r = &c.replication;
                    let rep = self.vm_mut(&c.site).vm.replication.as_mut().unwrap();
                    rep.interval_seconds = Some(r.interval_seconds);
                    rep.retention_hours = Some(r.recovery_point_retention_hours);
                    rep.app_consistent_hours = Some(r.app_consistent_frequency_hours);
                    Outcome::ok()
                };
                let p = self.with_input(|i| record_settings(i, c, o));
                let Plan::Write(u) = p else { panic!() };
                self.apply(&u);
            }
            Plan::Idle(_) => {}
        }
        plan
    }

    fn apply(&mut self, u: &Update) {
        // One job at a time, always.
        assert!(
            u.status
                .jobs
                .iter()
                .filter(|j| j.state == JobState::Running)
                .count()
                <= 1
        );
        // Every step that started or ended records when.
        for j in &u.status.jobs {
            for s in j.steps.iter().filter(|s| s.state != StepState::Pending) {
                let ended = s.state == StepState::Running || s.end_time.is_some();
                assert!(s.start_time.is_some() && ended, "{}: {s:?}", j.name);
            }
        }
        self.status = u.status.clone();
        self.events.extend(u.events.iter().cloned());
        self.writes += 1;
    }

    /// Plans until nothing is left to do (the agents progressing in between), at most `n` plans.
    fn settle(&mut self) {
        let mut idle = 0;
        let mut quiet = 0;
        for _ in 0..500 {
            let writes = self.writes;
            match self.step() {
                // A call whose outcome changed nothing (a site that keeps not answering): time
                // goes on, up to a step's deadline or so.
                Plan::Execute(_) if self.writes == writes => {
                    quiet += 1;
                    if quiet > 150 {
                        return;
                    }
                }
                // A site that refuses new settings is asked again at every plan.
                Plan::Settings(_) if self.settings_refused.is_some() => {
                    idle += 1;
                    if idle > 4 {
                        return;
                    }
                    self.tick(5);
                }
                Plan::Idle(_) => {
                    idle += 1;
                    if idle > 4 {
                        return;
                    }
                    self.tick(5);
                }
                _ => idle = 0,
            }
        }
        panic!("did not settle: {:#?}", self.status);
    }

    fn job_types(&self) -> Vec<JobType> {
        self.status.jobs.iter().map(|j| j.type_).collect()
    }

    fn job(&self, t: JobType) -> &Job {
        self.status
            .jobs
            .iter()
            .rev()
            .find(|j| j.type_ == t)
            .unwrap()
    }

    fn cond(&self, t: &str) -> bool {
        conditions::is_true(&self.status.conditions, t)
    }

    fn condition(&self, t: &str) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        self.status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
    }

    fn steps(&self, t: JobType) -> Vec<(String, StepState)> {
        self.job(t)
            .steps
            .iter()
            .map(|s| (s.name.clone(), s.state))
            .collect()
    }

    fn protected(integration: bool) -> Self {
        let mut w = World::new(integration);
        w.settle();
        assert_eq!(w.status.phase, Some(VmPhase::Protected));
        w.calls.clear();
        w.events.clear();
        w
    }
}

fn st(v: &[(&str, StepState)]) -> Vec<(String, StepState)> {
    v.iter().map(|(n, s)| (n.to_string(), *s)).collect()
}

use StepState::{Failed as F, Skipped as K, Succeeded as OK};

#[test]
fn enable_replication_ends_protected() {
    let mut w = World::new(true);
    w.settle();
    assert_eq!(w.job_types(), [JobType::EnableReplication]);
    let j = &w.status.jobs[0];
    assert_eq!(j.name, "web-01-enable-1");
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(
        w.steps(JobType::EnableReplication),
        st(&[("EnableReplication", OK), ("InitialReplication", OK)])
    );
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    let r = w.status.replication.as_ref().unwrap();
    assert_eq!(r.state, ReplicationState::Replicating);
    assert_eq!(r.source_site.as_deref(), Some(P));
    assert_eq!(r.target_site.as_deref(), Some(S));
    assert_eq!(r.health, Some(ReplicationHealth::Healthy));
    assert!(w.status.recovery_points.as_ref().unwrap().count >= 1);
    assert!(w.cond(READY));
    assert!(!w.cond(RECONCILING));
    assert!(!w.cond(STALLED));
    assert_eq!(w.status.observed_generation, Some(1));
    let reasons: Vec<_> = w.events.iter().map(|e| e.reason).collect();
    assert_eq!(reasons, ["JobStarted", "JobSucceeded"]);
}

#[test]
fn a_copy_is_done_only_when_the_target_lists_a_recovery_point() {
    // The source says Replicating before the target's listing shows the point its copy made:
    // the job would end with no point in status (`kubectl twinsite status` without one).
    let mut w = World::new(true);
    w.points_lag = true;
    w.settle();
    let j = w.job(JobType::EnableReplication);
    assert_eq!(j.state, JobState::Running, "{j:#?}");
    assert_eq!(j.steps[1].state, StepState::Running);
    assert!(
        j.steps[1]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("recovery point")),
        "{j:#?}"
    );
    w.points_lag = false;
    w.settle();
    assert_eq!(w.job(JobType::EnableReplication).state, JobState::Succeeded);
    assert!(w.status.recovery_points.as_ref().unwrap().count >= 1);
}

#[test]
fn a_diverged_replica_is_a_condition_and_an_event_until_a_comparison_matches() {
    let mut w = World::protected(true);
    assert!(
        !w.status
            .conditions
            .iter()
            .any(|c| c.type_ == "ReplicaVerified")
    );
    // The source's comparison at `at` found `n` blocks different.
    let verified = |w: &mut World, at: i64, n: u64| {
        let v = crate::site::Verification {
            time: ts(at),
            differing_blocks: n,
            disk: (n > 0).then(|| "disk0".to_string()),
        };
        let r = w.vm_mut(P).vm.replication.as_mut().unwrap();
        if n > 0 {
            r.divergences += 1;
            r.last_divergence = Some(v.clone());
        }
        r.verification = Some(v);
    };
    let diverged = |w: &World| {
        w.events
            .iter()
            .filter(|e| e.reason == "ReplicaDiverged")
            .count()
    };
    let divergences = |w: &World| w.status.replication.as_ref().unwrap().divergences;
    verified(&mut w, 100, 3);
    w.settle();
    let c = w.condition("ReplicaVerified");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Diverged")
    );
    assert!(
        c.message.contains("3 block(s) of disk disk0"),
        "{}",
        c.message
    );
    assert_eq!(diverged(&w), 1);
    assert_eq!(divergences(&w), Some(1));
    w.settle();
    assert_eq!(diverged(&w), 1, "news once");
    verified(&mut w, 200, 0);
    w.settle();
    let c = w.condition("ReplicaVerified");
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Matched"));
    assert!(c.message.contains("1 divergence(s)"), "{}", c.message);

    // A divergence found and resynchronized between two plans is not missed: the source's count
    // says so.
    verified(&mut w, 300, 5);
    verified(&mut w, 400, 0);
    w.settle();
    assert_eq!(w.condition("ReplicaVerified").reason, "Matched");
    assert_eq!(diverged(&w), 2);
    assert_eq!(divergences(&w), Some(2));
    assert!(
        w.events
            .iter()
            .any(|e| e.reason == "ReplicaDiverged" && e.message.contains("5 block(s)")),
        "{:?}",
        w.events
    );
    // A source that cannot be listed leaves it as it was.
    w.down.insert(P.to_string());
    w.settle();
    assert_eq!(w.condition("ReplicaVerified").reason, "Matched");
}

#[test]
fn step_is_written_running_with_operation_id_before_the_site_is_called() {
    let mut w = World::new(true);
    // First plan: locate the VM, start the job, first step Running: one write.
    let Plan::Write(u) = w.step() else { panic!() };
    let s = &u.status.jobs[0].steps[0];
    assert_eq!(s.state, StepState::Running);
    assert_eq!(
        s.operation_id.as_deref(),
        Some("uid1-web-01-enable-1-EnableReplication")
    );
    assert!(
        w.calls.is_empty(),
        "no site call before the step is written"
    );
    assert_eq!(u.status.phase, Some(VmPhase::InitialReplication));
    assert!(conditions::is_true(&u.status.conditions, RECONCILING));
    // Next plan: the call, with that id.
    let plan = w.with_input(plan);
    let Plan::Execute(c) = plan else {
        panic!("{plan:?}")
    };
    assert_eq!(c.op_id, "uid1-web-01-enable-1-EnableReplication");
    assert_eq!(c.step_name, StepName::EnableReplication);
    assert_eq!(c.mode, EnableMode::Initial);
}

#[test]
fn a_crash_after_the_call_repeats_it_with_the_same_id_and_the_job_ends_once() {
    let mut w = World::protected(true);
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    // Every call is made, then "the controller dies" before recording it: the next plan
    // must repeat the same call with the same id.
    let mut repeated = 0;
    for _ in 0..300 {
        let p = w.with_input(plan);
        match &p {
            Plan::Execute(c) => {
                let first = w.execute(c);
                let again = w.with_input(plan);
                let Plan::Execute(c2) = again else { panic!() };
                assert_eq!(c2.op_id, c.op_id);
                assert_eq!(w.execute(&c2), first);
                repeated += 1;
                let p = w.with_input(|i| record_outcome(i, &c2, first));
                if let Plan::Write(u) = p {
                    w.apply(&u)
                }
            }
            Plan::Write(u) => w.apply(u),
            Plan::Fence(_) => panic!("no fence here"),
            Plan::Settings(_) => panic!("no settings change here"),
            Plan::Idle(_) => {
                if w.status.phase == Some(VmPhase::Protected)
                    && w.status.active_site.as_deref() == Some(S)
                {
                    break;
                }
                w.tick(5)
            }
        }
    }
    assert!(repeated >= 5);
    // Each step was done once at the site.
    let mut per_step: HashMap<StepName, usize> = HashMap::new();
    for (s, _) in &w.calls {
        *per_step.entry(*s).or_default() += 1;
    }
    assert_eq!(per_step[&StepName::StartAtTarget], 1);
    assert_eq!(per_step[&StepName::Commit], 1);
    let names: Vec<_> = w.status.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "web-01-enable-1",
            "web-01-failover-2",
            "web-01-commit-3",
            "web-01-reprotect-4"
        ]
    );
    assert!(w.status.jobs.iter().all(|j| j.state == JobState::Succeeded));
    let ends = w
        .events
        .iter()
        .filter(|e| e.reason == "JobSucceeded")
        .count();
    assert_eq!(ends, 3);
}

#[test]
fn unplanned_failover_with_shutdown_commit_and_reverse_replication() {
    let mut w = World::protected(true);
    w.now += 40;
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
        s.failover.shutdown_source = true;
    });
    w.settle();
    assert_eq!(
        w.job_types(),
        [
            JobType::EnableReplication,
            JobType::UnplannedFailover,
            JobType::Commit,
            JobType::ReverseReplicate
        ]
    );
    assert_eq!(
        w.steps(JobType::UnplannedFailover),
        st(&[
            ("ShutdownSource", OK),
            ("FenceSource", K),
            ("SyncRemaining", OK),
            ("StopReplication", OK),
            ("StartAtTarget", OK),
        ])
    );
    let f = w.job(JobType::UnplannedFailover);
    assert!(f.recovery_point.as_deref().unwrap().starts_with("rp-"));
    assert!(f.recovery_point_age_seconds.is_some());
    assert_eq!(f.source_site.as_deref(), Some(P));
    assert_eq!(f.target_site.as_deref(), Some(S));
    // Replication stopped before the VM started at the target.
    let order: Vec<StepName> = w.calls.iter().map(|c| c.0).collect();
    let stop = order
        .iter()
        .position(|s| *s == StepName::StopReplication)
        .unwrap();
    let start = order
        .iter()
        .position(|s| *s == StepName::StartAtTarget)
        .unwrap();
    assert!(stop < start);
    // Commit came before reverse replication, and reverse replication is a resync.
    assert_eq!(
        w.steps(JobType::ReverseReplicate),
        st(&[
            ("StopReplication", OK),
            ("EnableReplication", OK),
            ("Resynchronize", OK)
        ])
    );
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    let r = w.status.replication.as_ref().unwrap();
    assert_eq!(
        (r.source_site.as_deref(), r.target_site.as_deref()),
        (Some(S), Some(P))
    );
    assert!(w.cond(READY));
    assert!(!w.cond(COMMIT_PENDING));
    // Never running at both sites.
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Off);
}

#[test]
fn unplanned_failover_goes_on_when_shutdown_fails_and_fences_the_source() {
    let mut w = World::protected(false);
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    w.settle();
    assert_eq!(
        w.steps(JobType::UnplannedFailover),
        st(&[
            ("ShutdownSource", F),
            ("FenceSource", OK),
            ("SyncRemaining", OK),
            ("StopReplication", OK),
            ("StartAtTarget", OK),
        ])
    );
    let f = w.job(JobType::UnplannedFailover);
    assert_eq!(f.state, JobState::Succeeded);
    let msg = f.steps[0].message.as_deref().unwrap();
    assert!(
        msg.contains("no integration services") && msg.contains("continues"),
        "{msg}"
    );
    assert!(
        w.events
            .iter()
            .any(|e| e.reason == "StepFailed" && e.warning)
    );
    // Fenced before the VM started at the target.
    let order: Vec<StepName> = w.calls.iter().map(|c| c.0).collect();
    let fence = order
        .iter()
        .position(|s| *s == StepName::FenceSource)
        .unwrap();
    let start = order
        .iter()
        .position(|s| *s == StepName::StartAtTarget)
        .unwrap();
    assert!(fence < start);
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    assert_eq!(w.status.active_site.as_deref(), Some(S));
}

#[test]
fn unplanned_failover_without_shutdown_source_skips_shutdown_and_sync_but_fences() {
    let mut w = World::protected(true);
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
        s.failover.shutdown_source = false;
        s.failover.recovery_point = "LatestProcessed".into();
    });
    // Check the recovery point reaches the call.
    let mut saw = false;
    for _ in 0..100 {
        if let Plan::Execute(c) = w.with_input(plan)
            && c.step_name == StepName::StartAtTarget
        {
            assert_eq!(c.recovery_point, "LatestProcessed");
            saw = true;
        }
        if let Plan::Idle(_) = w.step() {
            w.tick(5);
        }
        if w.status.active_site.as_deref() == Some(S) {
            break;
        }
    }
    assert!(saw);
    w.settle();
    assert_eq!(
        w.steps(JobType::UnplannedFailover),
        st(&[
            ("ShutdownSource", K),
            ("FenceSource", OK),
            ("SyncRemaining", K),
            ("StopReplication", OK),
            ("StartAtTarget", OK),
        ])
    );
}

#[test]
fn lost_source_is_fenced_when_it_comes_back_and_that_is_recorded() {
    let mut w = World::protected(true);
    w.down.insert(P.into());
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    w.settle();
    // A source that does not answer may still run the VM: the failover waits at FenceSource,
    // retrying, and never starts the VM at the target.
    assert_eq!(
        w.steps(JobType::UnplannedFailover),
        st(&[
            ("ShutdownSource", K),
            ("FenceSource", StepState::Running),
            ("SyncRemaining", StepState::Pending),
            ("StopReplication", StepState::Pending),
            ("StartAtTarget", StepState::Pending),
        ])
    );
    assert!(!w.calls.iter().any(|c| c.0 == StepName::StartAtTarget));
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    let ready = w.condition(READY).clone();
    assert_eq!(ready.reason, "SourceNotFenced");
    assert!(
        ready.message.contains("declare it lost") && ready.message.contains(P),
        "{ready:?}"
    );
    assert!(w.events.iter().any(|e| e.reason == "SourceNotFenced"));
    // Past the step's deadline it needs a person, and says so; the job still waits.
    for _ in 0..200 {
        w.tick(5);
        w.step();
    }
    assert!(w.cond(STALLED), "{:?}", w.status.conditions);
    assert_eq!(w.condition(STALLED).reason, "SourceNotFenced");
    assert!(!w.cond(RECONCILING));
    assert_eq!(w.job(JobType::UnplannedFailover).state, JobState::Running);
    assert!(!w.calls.iter().any(|c| c.0 == StepName::StartAtTarget));

    // Declared lost: the declaration stands for the fence, and the site is not called.
    w.lost.insert(P.into());
    w.settle();
    assert_eq!(
        w.steps(JobType::UnplannedFailover),
        st(&[
            ("ShutdownSource", K),
            ("FenceSource", K),
            ("SyncRemaining", K),
            ("StopReplication", OK),
            ("StartAtTarget", OK),
        ])
    );
    let job = w.job(JobType::UnplannedFailover);
    for n in ["FenceSource", "SyncRemaining"] {
        let s = job.steps.iter().find(|s| s.name == n).unwrap();
        assert!(
            s.message.as_deref().unwrap().contains("declared lost"),
            "{s:?}"
        );
    }
    assert_eq!(job.state, JobState::Succeeded);
    // Committed; nothing replicates toward the lost site.
    assert_eq!(w.job_types().last(), Some(&JobType::Commit));
    assert!(!w.cond(READY));
    assert_eq!(w.condition(READY).reason, "SiteLost");
    // Back, the declaration removed, the VM still running there: powered off before anything
    // else.
    w.lost.clear();
    w.down.clear();
    w.tick(1);
    let plan = w.step();
    assert!(
        matches!(plan, Plan::Fence(ref f) if f.site == P),
        "{plan:?}"
    );
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Off);
    let fence = w
        .job(JobType::UnplannedFailover)
        .steps
        .iter()
        .find(|s| s.name == "FenceSource")
        .unwrap();
    assert_eq!(fence.state, StepState::Succeeded);
    assert!(fence.message.as_deref().unwrap().contains("powered off"));
    assert!(w.events.iter().any(|e| e.reason == "Fenced"));
    w.settle();
    assert_eq!(w.job_types().last(), Some(&JobType::ReverseReplicate));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
}

#[test]
fn a_source_that_answers_again_is_fenced_by_the_waiting_failover() {
    let mut w = World::protected(true);
    w.down.insert(P.into());
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    w.settle();
    assert_eq!(w.job(JobType::UnplannedFailover).state, JobState::Running);
    // The token is fixed: the power off goes through and the failover goes on.
    w.down.clear();
    w.fence_not_before = None;
    w.settle();
    assert_eq!(w.job(JobType::UnplannedFailover).state, JobState::Succeeded);
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Off);
    assert!(w.calls.contains(&(StepName::FenceSource, P.to_string())));
    assert_eq!(w.status.active_site.as_deref(), Some(S));
}

#[test]
fn a_failback_to_the_primary_waits_for_a_dead_recovery_site_and_goes_on_once_it_is_lost() {
    let mut w = World::protected(true);
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    w.settle();
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    let jobs = w.status.jobs.len();
    // The recovery site dies; the VM is sent back. A failback is planned and needs both sites:
    // it waits, Stalled, and says how to go on.
    w.down.insert(S.into());
    w.set_spec(|s| s.active_site = Some(P.into()));
    w.settle();
    assert_eq!(w.status.jobs.len(), jobs);
    assert!(w.cond(STALLED));
    let stalled = w.condition(STALLED).clone();
    assert_eq!(stalled.reason, "SiteUnreachable");
    assert!(
        stalled.message.contains("declare it lost") && stalled.message.contains(S),
        "{stalled:?}"
    );
    // Declared lost: an unplanned failover from the newest recovery point at the primary.
    w.lost.insert(S.into());
    w.settle();
    let job = w.job(JobType::UnplannedFailover);
    assert_eq!(job.target_site.as_deref(), Some(P));
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
    assert!(!w.cond(STALLED));
    assert_eq!(w.condition(READY).reason, "SiteLost");
}

#[test]
fn a_planned_failover_from_a_lost_source_runs_unplanned() {
    let mut w = World::protected(true);
    w.lost.insert(P.into());
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert_eq!(w.job(JobType::UnplannedFailover).state, JobState::Succeeded);
    assert!(
        !w.job_types().contains(&JobType::PlannedFailover),
        "{:?}",
        w.job_types()
    );
    assert_eq!(w.status.active_site.as_deref(), Some(S));
}

#[test]
fn planned_failover_fails_when_shutdown_fails_and_the_source_keeps_running() {
    let mut w = World::protected(false);
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    let f = w.job(JobType::PlannedFailover);
    assert_eq!(f.state, JobState::Failed);
    assert_eq!(
        w.steps(JobType::PlannedFailover),
        st(&[
            ("ShutdownSource", F),
            ("SyncRemaining", K),
            ("VerifyDigests", K),
            ("StopReplication", K),
            ("StartAtTarget", K),
        ])
    );
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    assert_eq!(w.status.phase, Some(VmPhase::Failed));
    assert!(w.cond(STALLED));
    assert!(!w.cond(READY));
    assert!(
        w.events
            .iter()
            .any(|e| e.reason == "JobFailed" && e.warning)
    );
    // Not retried on its own.
    assert_eq!(w.job_types().len(), 2);
    // A spec change (here: go unplanned) is a new attempt.
    w.set_spec(|s| s.failover.type_ = FailoverType::Unplanned);
    w.settle();
    assert_eq!(w.job(JobType::UnplannedFailover).state, JobState::Succeeded);
    assert!(!w.cond(STALLED));
}

#[test]
fn planned_failover_syncs_verifies_digests_and_loses_nothing() {
    let mut w = World::protected(true);
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert_eq!(
        w.steps(JobType::PlannedFailover),
        st(&[
            ("ShutdownSource", OK),
            ("SyncRemaining", OK),
            ("VerifyDigests", OK),
            ("StopReplication", OK),
            ("StartAtTarget", OK),
        ])
    );
    let order: Vec<StepName> = w.calls.iter().map(|c| c.0).collect();
    assert_eq!(
        &order[..5],
        [
            StepName::ShutdownSource,
            StepName::SyncRemaining,
            StepName::VerifyDigests,
            StepName::StopReplication,
            StepName::StartAtTarget
        ]
    );
    // The point that came up is the final sync's.
    let sync_rp = format!("rp-{:06}", {
        // the final sync made the newest point at the target before StartAtTarget
        w.job(JobType::PlannedFailover)
            .recovery_point
            .as_deref()
            .unwrap()
            .trim_start_matches("rp-")
            .parse::<u32>()
            .unwrap()
    });
    assert_eq!(
        w.job(JobType::PlannedFailover).recovery_point,
        Some(sync_rp)
    );
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
}

#[test]
fn planned_failover_with_digest_mismatch_restarts_the_source_and_fails() {
    let mut w = World::protected(true);
    w.vm_mut(P).digest_ok = false;
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert_eq!(
        w.steps(JobType::PlannedFailover),
        st(&[
            ("ShutdownSource", OK),
            ("SyncRemaining", OK),
            ("VerifyDigests", F),
            ("StopReplication", K),
            ("StartAtTarget", K),
            ("RestartSource", OK),
        ])
    );
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Failed);
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    assert!(w.cond(STALLED));
}

#[test]
fn manual_commit_waits_for_the_annotation_naming_the_job() {
    let mut w = World::protected(true);
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.commit = CommitMode::Manual;
    });
    w.settle();
    assert_eq!(w.job_types().last(), Some(&JobType::PlannedFailover));
    assert_eq!(w.status.phase, Some(VmPhase::FailedOver));
    assert!(w.cond(COMMIT_PENDING));
    assert!(!w.cond(READY));
    let job = w.job(JobType::PlannedFailover).name.clone();
    assert_eq!(job, "web-01-failover-2");
    let msg = &w
        .status
        .conditions
        .iter()
        .find(|c| c.type_ == COMMIT_PENDING)
        .unwrap()
        .message;
    assert!(
        msg.contains("twinsite.io/commit=web-01-failover-2"),
        "{msg}"
    );
    // The recovery points are still there until the commit.
    assert!(w.sites[S].as_ref().unwrap().vm.recovery_points.is_some());
    w.annotation = Some("web-01-failover-1".into());
    w.settle();
    assert_eq!(w.job_types().last(), Some(&JobType::PlannedFailover));
    w.annotation = Some(job);
    w.settle();
    assert_eq!(
        &w.job_types()[2..],
        [JobType::Commit, JobType::ReverseReplicate]
    );
    assert!(!w.cond(COMMIT_PENDING));
    assert!(w.cond(READY));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    // The commit deleted the recovery points at the new active site (the VM there holds
    // only what reverse replication made since, which is at the other site).
    assert!(w.calls.iter().any(|c| c.0 == StepName::Commit && c.1 == S));
}

#[test]
fn commit_clears_recovery_points_and_replication_stays_off_when_disabled() {
    let mut w = World::protected(true);
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.replication.enabled = false;
    });
    w.settle();
    assert_eq!(
        w.job_types(),
        [
            JobType::EnableReplication,
            JobType::PlannedFailover,
            JobType::Commit
        ]
    );
    assert_eq!(w.status.recovery_points, None);
    assert!(w.sites[S].as_ref().unwrap().vm.recovery_points.is_none());
    assert_eq!(w.status.phase, Some(VmPhase::Unprotected));
    assert!(w.cond(READY));
}

#[test]
fn failback_to_a_site_without_a_current_replica_reverse_replicates_first() {
    let mut w = World::protected(true);
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.replication.enabled = false;
    });
    w.settle();
    assert_eq!(w.status.phase, Some(VmPhase::Unprotected));
    w.calls.clear();
    w.set_spec(|s| s.active_site = Some(P.into()));
    w.settle();
    assert_eq!(
        &w.job_types()[3..],
        [
            JobType::ReverseReplicate,
            JobType::PlannedFailover,
            JobType::Commit,
        ]
    );
    let rr = w.job(JobType::ReverseReplicate);
    assert_eq!(rr.source_site.as_deref(), Some(S));
    assert_eq!(rr.target_site.as_deref(), Some(P));
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    assert_eq!(w.status.phase, Some(VmPhase::Unprotected));
    assert!(w.cond(READY));
    // The copy left at the old site does not run.
    assert_eq!(w.sites[S].as_ref().map(|v| v.vm.power), Some(Power::Off));
}

#[test]
fn failback_with_a_current_replica_fails_over_directly() {
    let mut w = World::protected(true);
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    w.set_spec(|s| s.active_site = Some(P.into()));
    w.settle();
    assert_eq!(
        &w.job_types()[4..],
        [
            JobType::PlannedFailover,
            JobType::Commit,
            JobType::ReverseReplicate
        ]
    );
    let r = w.status.replication.as_ref().unwrap();
    assert_eq!(
        (r.source_site.as_deref(), r.target_site.as_deref()),
        (Some(P), Some(S))
    );
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
}

#[test]
fn drill_and_cleanup_leave_replication_alone_and_keep_last_drill() {
    let mut w = World::protected(true);
    w.set_spec(|s| s.test_failover.enabled = true);
    w.settle();
    let j = w.job(JobType::TestFailover);
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.name, "web-01-testfailover-2");
    let tf = w.status.test_failover.as_ref().unwrap();
    assert_eq!(
        (tf.vm_name.as_str(), tf.site.as_str(), tf.state.as_str()),
        ("web-01-test", S, "Running")
    );
    let d = w.status.last_drill.clone().unwrap();
    assert_eq!(
        (d.job.as_str(), d.result.as_str()),
        ("web-01-testfailover-2", "Succeeded")
    );
    assert!(w.cond(READY));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    assert!(
        !w.calls.iter().any(|c| c.0 == StepName::StopReplication),
        "a drill never stops replication"
    );
    w.set_spec(|s| s.test_failover.enabled = false);
    w.settle();
    assert_eq!(w.job_types().last(), Some(&JobType::TestFailoverCleanup));
    assert_eq!(w.status.test_failover, None);
    assert_eq!(w.status.last_drill, Some(d));
    assert_eq!(
        w.status.replication.as_ref().unwrap().state,
        ReplicationState::Replicating
    );
    assert!(w.cond(READY));
}

#[test]
fn disable_replication_removes_the_replica() {
    let mut w = World::protected(true);
    w.set_spec(|s| s.replication.enabled = false);
    w.settle();
    assert_eq!(
        w.steps(JobType::DisableReplication),
        st(&[("StopReplication", OK), ("RemoveReplica", OK)])
    );
    assert!(w.sites[S].is_none());
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
    assert_eq!(w.status.phase, Some(VmPhase::Unprotected));
    assert_eq!(
        w.status.replication.as_ref().unwrap().state,
        ReplicationState::Disabled
    );
    assert!(w.cond(READY));
    // And on again.
    w.set_spec(|s| s.replication.enabled = true);
    w.settle();
    assert_eq!(w.job_types().last(), Some(&JobType::EnableReplication));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
}

#[test]
fn one_job_at_a_time_a_change_waits_for_the_running_job() {
    let mut w = World::new(true);
    // Start the enable job and stop in the middle of it.
    for _ in 0..3 {
        w.step();
    }
    assert_eq!(w.status.jobs[0].state, JobState::Running);
    w.set_spec(|s| s.active_site = Some(S.into()));
    for _ in 0..5 {
        w.step();
        assert_eq!(w.status.jobs.len(), 1);
    }
    w.settle();
    assert_eq!(
        w.job_types(),
        [
            JobType::EnableReplication,
            JobType::PlannedFailover,
            JobType::Commit,
            JobType::ReverseReplicate
        ]
    );
}

#[test]
fn at_most_ten_jobs_kept_newest_last() {
    let mut w = World::protected(true);
    for _ in 0..6 {
        w.set_spec(|s| s.test_failover.enabled = true);
        w.settle();
        w.set_spec(|s| s.test_failover.enabled = false);
        w.settle();
    }
    assert_eq!(w.status.jobs.len(), MAX_JOBS);
    let nums: Vec<u64> = w
        .status
        .jobs
        .iter()
        .map(|j| j.name.rsplit('-').next().unwrap().parse().unwrap())
        .collect();
    assert!(nums.windows(2).all(|p| p[0] < p[1]), "{nums:?}");
    assert_eq!(*nums.last().unwrap(), 13);
    assert_eq!(
        next_job_name("web-01", JobType::Commit, &w.status.jobs),
        "web-01-commit-14"
    );
}

#[test]
fn unreachable_required_step_is_retried_with_the_same_id() {
    let mut w = World::protected(true);
    w.set_spec(|s| s.active_site = Some(S.into()));
    // Run until StartAtTarget is next, then take the target away.
    loop {
        if let Plan::Execute(c) = w.with_input(plan)
            && c.step_name == StepName::StartAtTarget
        {
            break;
        }
        if let Plan::Idle(_) = w.step() {
            w.tick(5)
        }
    }
    w.down.insert(S.into());
    let Plan::Execute(c) = w.with_input(plan) else {
        panic!()
    };
    let o = w.execute(&c);
    assert!(matches!(o, Outcome::Unreachable(_)));
    let Plan::Write(u) = w.with_input(|i| record_outcome(i, &c, o.clone())) else {
        panic!()
    };
    w.apply(&u);
    // Same message again: no write.
    assert!(matches!(
        w.with_input(|i| record_outcome(i, &c, o)),
        Plan::Idle(_)
    ));
    let Plan::Execute(c2) = w.with_input(plan) else {
        panic!()
    };
    assert_eq!(c2.op_id, c.op_id);
    w.down.clear();
    w.settle();
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Succeeded);
}

/// The source's bulk transfer as the listing shows it is copied into status (bytes, percent,
/// the PROGRESS column's text), written once per new listing, kept while the source cannot be
/// listed, and removed once the source shows no transfer: at the end of the initial copy and
/// of a resync the source starts on its own.
#[test]
fn transfer_progress_is_copied_from_the_source_and_cleared_when_it_ends() {
    const MIB: u64 = 1 << 20;
    let progress = |w: &World| {
        w.status
            .replication
            .as_ref()
            .and_then(|r| r.progress.clone())
    };
    let set = |w: &mut World, p: Option<(u64, u64)>| {
        w.vm_mut(P).vm.replication.as_mut().unwrap().progress = p;
    };
    let mut w = World::new(true);
    // Up to the initial copy: the source copies, nothing has ticked.
    let copying = |w: &World| {
        w.status.jobs.last().is_some_and(|j| {
            j.steps
                .iter()
                .any(|s| s.name == "InitialReplication" && s.state == StepState::Running)
        })
    };
    for _ in 0..10 {
        if copying(&w) {
            break;
        }
        w.step();
    }
    assert!(copying(&w), "{:?}", w.status.jobs);
    assert_eq!(w.status.phase, Some(VmPhase::InitialReplication));
    assert_eq!(progress(&w), None);

    set(&mut w, Some((4 * MIB, 16 * MIB)));
    assert!(matches!(w.step(), Plan::Write(_)));
    let want = ReplicationProgress {
        done_bytes: (4 * MIB) as i64,
        total_bytes: (16 * MIB) as i64,
        percent: 25,
        summary: "25%".into(),
    };
    assert_eq!(progress(&w), Some(want.clone()));
    assert_eq!(w.status.phase, Some(VmPhase::InitialReplication));
    // The same listing again: nothing to write.
    assert!(matches!(w.step(), Plan::Idle(_)));
    // The source cannot be listed: the last known progress stays.
    w.down.insert(P.into());
    w.step();
    assert_eq!(progress(&w), Some(want));
    w.down.remove(P);
    // Rounded down: 100% only when every byte is done.
    set(&mut w, Some((16 * MIB - 1, 16 * MIB)));
    w.step();
    assert_eq!(progress(&w).map(|p| p.summary), Some("99%".into()));

    // The copy ends: the source reports no transfer and replicates.
    set(&mut w, None);
    w.tick(5);
    w.settle();
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    assert_eq!(progress(&w), None);

    // A resync the source starts on its own (no job runs) shows the same way.
    {
        let r = w.vm_mut(P).vm.replication.as_mut().unwrap();
        r.state = ObservedReplicationState::Resynchronizing;
        r.progress = Some((0, 8 * MIB));
    }
    w.step();
    let r = w.status.replication.as_ref().unwrap();
    assert_eq!(r.state, ReplicationState::Resynchronizing);
    assert_eq!(r.progress.as_ref().map(|p| p.percent), Some(0));
    {
        let r = w.vm_mut(P).vm.replication.as_mut().unwrap();
        r.state = ObservedReplicationState::Replicating;
        r.progress = None;
    }
    w.tick(5);
    w.step();
    assert_eq!(progress(&w), None);
    assert_eq!(progress_of(0, 0).percent, 100);
    assert_eq!(progress_of(5, 4).done_bytes, 4);
}

#[test]
fn steady_protected_vm_writes_status_at_most_once_per_five_minutes() {
    let mut w = World::protected(true);
    // Let the first refresh land.
    w.settle();
    let start = w.writes;
    // 30 minutes of 30-second cycles, planning every 10 seconds.
    for i in 0..180 {
        w.now += 10;
        if i % 3 == 0 {
            w.tick(0);
        }
        w.step();
    }
    let writes = w.writes - start;
    assert!((5..=7).contains(&writes), "{writes} writes in 30 minutes");
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
}

#[test]
fn health_changes_are_written_at_once() {
    let mut w = World::protected(true);
    w.settle();
    assert_eq!(
        w.status.replication.as_ref().unwrap().health,
        Some(ReplicationHealth::Healthy)
    );
    // The target stops receiving: RPO grows past 2x, then 3x the interval.
    w.down.insert(S.into());
    w.now += 70;
    w.step();
    assert_eq!(
        w.status.replication.as_ref().unwrap().health,
        Some(ReplicationHealth::Warning)
    );
    w.now += 30;
    w.step();
    assert_eq!(
        w.status.replication.as_ref().unwrap().health,
        Some(ReplicationHealth::Critical)
    );
}

#[test]
fn health_thresholds() {
    assert_eq!(health_of(60, 30), ReplicationHealth::Healthy);
    assert_eq!(health_of(61, 30), ReplicationHealth::Warning);
    assert_eq!(health_of(89, 30), ReplicationHealth::Warning);
    assert_eq!(health_of(90, 30), ReplicationHealth::Critical);
}

#[test]
fn no_fence_from_a_listing_older_than_the_last_job() {
    let mut w = World::protected(true);
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    // A stale listing (taken before the failover) shows the VM running at the old site.
    let stale = SiteView::Reachable {
        fetched_at: ts(0),
        vm: Some(running_vm(true).vm),
    };
    let s = w.view(S);
    let input = Input {
        name: "web-01",
        uid: "uid1",
        generation: Some(w.generation),
        vm_name: "web-01",
        spec: &w.spec,
        commit_annotation: None,
        status: &w.status,
        primary: &stale,
        recovery: &s,
        now: ts(w.now),
        poll: Duration::from_secs(5),
        conflict: None,
        cut: None,
        retry: None,
        plan_started: None,
        deleting: false,
        fence_not_before: None,
    };
    assert!(!matches!(plan(&input), Plan::Fence(_)));
    // A fresh one does fence (its copy sent everything it wrote to the site the VM runs at).
    let mut vm = running_vm(true).vm;
    vm.replication = Some(ObservedReplication {
        state: ObservedReplicationState::Replicating,
        direction: Some(Direction::Outbound),
        peer_site: Some(S.into()),
        last_sync_time: Some(ts(w.now)),
        bytes_sent: 0,
        pending_bytes: 0,
        last_error: None,
        interval_seconds: None,
        retention_hours: None,
        app_consistent_hours: None,
        progress: None,
        verification: None,
        divergences: 0,
        last_divergence: None,
    });
    let fresh = SiteView::Reachable {
        fetched_at: ts(w.now),
        vm: Some(vm),
    };
    let input = Input {
        primary: &fresh,
        ..input
    };
    assert!(matches!(plan(&input), Plan::Fence(ref f) if f.site == P));
}

#[test]
fn a_vm_not_found_anywhere_waits_pending() {
    let mut w = World::new(true);
    *w.sites.get_mut(P).unwrap() = None;
    let plan = w.step();
    assert!(matches!(plan, Plan::Write(_)));
    assert_eq!(w.status.phase, Some(VmPhase::Pending));
    let ready = &w.status.conditions[0];
    assert_eq!(
        (ready.type_.as_str(), ready.reason.as_str()),
        (READY, "VMNotFound")
    );
    assert!(matches!(w.step(), Plan::Idle(_)));
}

#[test]
fn step_names_round_trip() {
    for n in StepName::ALL {
        assert_eq!(StepName::parse(n.as_str()), Some(n));
    }
    assert_eq!(operation_id("u", "j", StepName::Commit), "u-j-Commit");
}

fn plan_cut() -> Cut {
    Cut {
        id: "dr-failover-1-cut".into(),
        members: vec!["db-01".into(), "web-01".into(), "app-01".into()],
    }
}

fn unplanned_from_latest_processed(w: &mut World) {
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
        s.failover.recovery_point = "LatestProcessed".into();
    });
}

#[test]
fn a_plan_failover_with_a_cut_starts_from_the_vms_point_of_the_cut() {
    let mut w = World::protected(true);
    w.cut = Some(plan_cut());
    unplanned_from_latest_processed(&mut w);
    w.settle();
    assert_eq!(
        w.steps(JobType::UnplannedFailover),
        st(&[
            ("ConsistentCut", OK),
            ("ShutdownSource", OK),
            ("FenceSource", K),
            ("SyncRemaining", OK),
            ("StopReplication", OK),
            ("StartAtTarget", OK),
        ])
    );
    // The cut is asked of the source, by the cut id, for every member of the plan.
    assert_eq!(
        w.cut_calls,
        vec![(
            "dr-failover-1-cut".to_string(),
            vec!["db-01".to_string(), "web-01".into(), "app-01".into()]
        )]
    );
    assert_eq!(w.calls[0], (StepName::ConsistentCut, P.to_string()));
    let f = w.job(JobType::UnplannedFailover);
    assert_eq!(f.state, JobState::Succeeded);
    assert_eq!(f.cut_id.as_deref(), Some("dr-failover-1-cut"));
    let cut_step = &f.steps[0];
    assert_eq!(
        cut_step.operation_id.as_deref(),
        Some("dr-failover-1-cut"),
        "the cut id is the step's operation id"
    );
    let msg = cut_step.message.as_deref().unwrap();
    // The failover started from the cut's point, not from the newer one the sync made.
    assert_eq!(w.started_from.len(), 1);
    let point = &w.started_from[0];
    assert!(
        point.starts_with("rp-") && msg.contains(point.as_str()),
        "{msg}"
    );
    assert_eq!(f.recovery_point.as_deref(), Some(point.as_str()));
    assert_eq!(w.status.active_site.as_deref(), Some(S));
}

#[test]
fn a_failed_cut_is_recorded_and_the_failover_goes_on_from_latest_processed() {
    // The source site does not answer (the usual case in a disaster).
    let mut w = World::protected(true);
    w.cut = Some(plan_cut());
    unplanned_from_latest_processed(&mut w);
    w.lost.insert(P.into());
    w.settle();
    let f = w.job(JobType::UnplannedFailover);
    assert_eq!(f.state, JobState::Succeeded, "{f:?}");
    assert_eq!(f.steps[0].name, "ConsistentCut");
    // The source is declared lost: the cut is skipped, not asked for.
    assert_eq!(f.steps[0].state, K);
    let msg = f.steps[0].message.as_deref().unwrap();
    assert!(msg.contains(P) && msg.contains("declared lost"), "{msg}");
    assert_eq!(f.cut_id, None, "no cut was used");
    assert_eq!(w.started_from, vec!["LatestProcessed".to_string()]);
    assert_eq!(w.status.active_site.as_deref(), Some(S));

    // The source answers but leaves the VM out of the cut: the same.
    let mut w = World::protected(true);
    w.cut = Some(plan_cut());
    w.cut_leaves_out = true;
    unplanned_from_latest_processed(&mut w);
    w.settle();
    let f = w.job(JobType::UnplannedFailover);
    assert_eq!(f.state, JobState::Succeeded);
    assert_eq!(f.steps[0].state, F);
    assert_eq!(f.cut_id, None);
    assert_eq!(w.started_from, vec!["LatestProcessed".to_string()]);
}

#[test]
fn a_cut_only_goes_into_unplanned_failovers() {
    let mut w = World::protected(true);
    w.cut = Some(plan_cut());
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert!(w.cut_calls.is_empty());
    let f = w.job(JobType::PlannedFailover);
    assert!(f.steps.iter().all(|s| s.name != "ConsistentCut"));
    assert_eq!(f.cut_id, None);
}

#[test]
fn a_conflict_holds_the_vm_shows_once_and_clears() {
    let mut w = World::protected(true);
    assert!(!w.cond(CONFLICT));
    let c = w.condition(CONFLICT);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "NoConflict")
    );
    w.conflict = Some(Conflict {
        reason: "SelectedByTwoPlans".into(),
        message: "ReplicatedVM web-01 is selected by more than one FailoverPlan: a, b".into(),
    });
    w.settle();
    assert!(w.cond(CONFLICT) && w.cond(STALLED) && !w.cond(READY));
    let c = w.condition(CONFLICT);
    assert_eq!(c.reason, "SelectedByTwoPlans");
    assert!(c.message.contains("a, b"));
    let conflicts: Vec<_> = w.events.iter().filter(|e| e.reason == "Conflict").collect();
    assert_eq!(conflicts.len(), 1, "{:?}", w.events);
    assert!(conflicts[0].warning);
    // Steady: no more writes while the conflict lasts.
    let writes = w.writes;
    for _ in 0..10 {
        assert!(matches!(w.step(), Plan::Idle(_)));
        w.tick(5);
    }
    assert_eq!(w.writes, writes);
    // Fixed: the condition turns False, Ready again.
    w.conflict = None;
    w.settle();
    assert!(!w.cond(CONFLICT) && !w.cond(STALLED) && w.cond(READY));
    assert_eq!(
        w.events.iter().filter(|e| e.reason == "Conflict").count(),
        1
    );
}

fn health(w: &World) -> Option<ReplicationHealth> {
    w.status.replication.as_ref().and_then(|r| r.health)
}

fn rep_state(w: &World) -> Option<ReplicationState> {
    w.status.replication.as_ref().map(|r| r.state)
}

/// Plans (the agents progressing in between) until `f` holds, checking `each` on every status
/// written on the way.
fn run_until(w: &mut World, f: impl Fn(&World) -> bool, each: impl Fn(&World)) {
    for _ in 0..500 {
        if f(w) {
            return;
        }
        if let Plan::Idle(_) = w.step() {
            w.tick(5);
        }
        each(w);
    }
    panic!("never reached: {:#?}", w.status);
}

fn digest_mismatch_failed(w: &World) -> bool {
    w.status
        .jobs
        .iter()
        .any(|j| j.type_ == JobType::PlannedFailover && j.state == JobState::Failed)
}

#[test]
fn digest_mismatch_resynchronizes_the_replica_and_is_never_healthy_meanwhile() {
    let mut w = World::protected(true);
    w.vm_mut(P).digest_ok = false;
    w.set_spec(|s| s.active_site = Some(S.into()));
    run_until(&mut w, digest_mismatch_failed, |_| {});
    // The failover failed on the digests: the replica is known to differ.
    assert_eq!(w.job(JobType::PlannedFailover).steps[2].state, F);
    assert_ne!(health(&w), Some(ReplicationHealth::Healthy));
    assert_ne!(w.status.phase, Some(VmPhase::Protected));
    // Replication to the same target is resynchronized on its own; until it ends the VM is
    // never shown Healthy nor Protected.
    let resynced = |w: &World| {
        w.status
            .jobs
            .last()
            .is_some_and(|j| j.type_ == JobType::ReverseReplicate && j.state == JobState::Succeeded)
    };
    let mut saw_resync = false;
    for _ in 0..500 {
        if resynced(&w) {
            break;
        }
        if let Plan::Idle(_) = w.step() {
            w.tick(5);
        }
        if resynced(&w) {
            break;
        }
        assert_ne!(
            health(&w),
            Some(ReplicationHealth::Healthy),
            "{:#?}",
            w.status
        );
        assert_ne!(w.status.phase, Some(VmPhase::Protected));
        saw_resync |= rep_state(&w) == Some(ReplicationState::Resynchronizing);
    }
    assert!(resynced(&w), "{:#?}", w.status);
    assert!(
        saw_resync,
        "REPLICATION showed Resynchronizing during the resync"
    );
    w.settle();
    assert_eq!(
        w.job_types(),
        [
            JobType::EnableReplication,
            JobType::PlannedFailover,
            JobType::ReverseReplicate
        ]
    );
    let rr = w.job(JobType::ReverseReplicate);
    assert_eq!(rr.name, "web-01-reprotect-3");
    assert_eq!(
        (rr.source_site.as_deref(), rr.target_site.as_deref()),
        (Some(P), Some(S))
    );
    assert_eq!(
        w.steps(JobType::ReverseReplicate),
        st(&[
            ("StopReplication", OK),
            ("EnableReplication", OK),
            ("Resynchronize", OK)
        ])
    );
    assert_eq!(
        w.enables.last(),
        Some(&(P.to_string(), S.to_string(), EnableMode::Resync))
    );
    let r = w.status.replication.as_ref().unwrap();
    assert_eq!(r.state, ReplicationState::Replicating);
    assert_eq!(r.health, Some(ReplicationHealth::Healthy));
    // The VM runs where it ran; the failed failover still needs a person (it is not tried
    // again on its own: it shuts the VM down).
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
    assert_eq!(w.status.phase, Some(VmPhase::Failed));
    assert!(w.cond(STALLED) && !w.cond(READY));
    assert!(
        w.condition(READY).message.contains("web-01-failover-2"),
        "{:?}",
        w.condition(READY)
    );
    // A spec change is a new attempt, from the resynchronized replica.
    w.set_spec(|_| {});
    w.settle();
    assert_eq!(
        &w.job_types()[3..],
        [
            JobType::PlannedFailover,
            JobType::Commit,
            JobType::ReverseReplicate
        ]
    );
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Succeeded);
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
}

#[test]
fn a_spec_change_while_the_resync_after_a_digest_mismatch_runs_is_acted_on_after_it() {
    let mut w = World::protected(true);
    w.vm_mut(P).digest_ok = false;
    w.set_spec(|s| s.active_site = Some(S.into()));
    run_until(&mut w, digest_mismatch_failed, |_| {});
    run_until(
        &mut w,
        |w| w.status.jobs.last().map(|j| j.type_) == Some(JobType::ReverseReplicate),
        |_| {},
    );
    // The person answers the failed failover at once, while the resync runs: go Unplanned.
    w.set_spec(|s| s.failover.type_ = FailoverType::Unplanned);
    w.settle();
    assert_eq!(
        &w.job_types()[2..],
        [
            JobType::ReverseReplicate,
            JobType::UnplannedFailover,
            JobType::Commit,
            JobType::ReverseReplicate
        ]
    );
    assert_eq!(w.job(JobType::UnplannedFailover).state, JobState::Succeeded);
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert!(!w.cond(STALLED));
}

#[test]
fn an_unplanned_failover_asked_for_after_a_digest_mismatch_waits_for_the_resync() {
    let mut w = World::protected(true);
    w.vm_mut(P).digest_ok = false;
    w.set_spec(|s| s.active_site = Some(S.into()));
    run_until(&mut w, digest_mismatch_failed, |_| {});
    // Straight away, before the resync started: the damaged copy is never started.
    w.set_spec(|s| s.failover.type_ = FailoverType::Unplanned);
    w.settle();
    assert_eq!(
        &w.job_types()[2..4],
        [JobType::ReverseReplicate, JobType::UnplannedFailover]
    );
    assert_eq!(w.status.active_site.as_deref(), Some(S));
}

#[test]
fn a_resync_the_source_started_on_its_own_is_shown_and_not_healthy() {
    let mut w = World::protected(true);
    w.settle();
    assert_eq!(health(&w), Some(ReplicationHealth::Healthy));
    w.events.clear();
    // The replica refused a cycle (its copy was lost): the source agent resynchronizes.
    {
        let r = w.vm_mut(P).vm.replication.as_mut().unwrap();
        r.state = ObservedReplicationState::Resynchronizing;
        r.last_error = Some("the replica refused cycle 7: wrong parent".into());
    }
    w.now += 5;
    assert!(matches!(w.step(), Plan::Write(_)));
    assert_eq!(rep_state(&w), Some(ReplicationState::Resynchronizing));
    assert_eq!(health(&w), Some(ReplicationHealth::Warning));
    assert_eq!(w.status.phase, Some(VmPhase::Reprotecting));
    assert!(!w.cond(READY));
    let ready = w.condition(READY);
    assert_eq!(ready.reason, "Resynchronizing");
    assert!(ready.message.contains("wrong parent"), "{}", ready.message);
    assert!(w.status.jobs.iter().all(|j| j.state != JobState::Running));
    let notes: Vec<_> = w
        .events
        .iter()
        .filter(|e| e.reason == "Resynchronizing")
        .collect();
    assert_eq!(notes.len(), 1, "{:?}", w.events);
    assert!(notes[0].warning && notes[0].message.contains("wrong parent"));
    // Steady while it lasts: no more writes.
    let writes = w.writes;
    w.now += 5;
    assert!(matches!(w.step(), Plan::Idle(_)));
    assert_eq!(w.writes, writes);
    // The RPO grows past 3x the interval meanwhile: Critical.
    w.now += 120;
    w.step();
    assert_eq!(health(&w), Some(ReplicationHealth::Critical));
    // The resync ends: Replicating and Healthy again, no job was needed.
    w.settle();
    assert_eq!(rep_state(&w), Some(ReplicationState::Replicating));
    assert_eq!(health(&w), Some(ReplicationHealth::Healthy));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    assert!(w.cond(READY));
    assert_eq!(w.job_types(), [JobType::EnableReplication]);
}

#[test]
fn an_initial_copy_the_source_restarted_is_not_healthy() {
    let mut w = World::protected(true);
    w.settle();
    w.vm_mut(P).vm.replication.as_mut().unwrap().state =
        ObservedReplicationState::InitialReplication;
    w.now += 5;
    w.step();
    assert_eq!(rep_state(&w), Some(ReplicationState::InitialReplication));
    assert_eq!(health(&w), Some(ReplicationHealth::Warning));
    assert_eq!(w.status.phase, Some(VmPhase::InitialReplication));
    assert_eq!(w.condition(READY).reason, "InitialReplication");
}

#[test]
fn replication_being_set_up_is_never_shown_healthy() {
    let mut w = World::new(true);
    run_until(
        &mut w,
        |w| w.status.phase == Some(VmPhase::Protected),
        |w| {
            if rep_state(w) == Some(ReplicationState::InitialReplication) {
                assert_eq!(health(w), Some(ReplicationHealth::Warning));
            }
        },
    );
}

#[test]
fn a_target_without_a_replica_point_is_critical_until_it_holds_one_again() {
    let mut w = World::protected(true);
    w.settle();
    assert_eq!(health(&w), Some(ReplicationHealth::Healthy));
    // The replica's copy is lost; the source has not noticed yet (still Replicating).
    let replica = w.sites[S].clone().unwrap();
    *w.sites.get_mut(S).unwrap() = None;
    w.now += 5;
    w.step();
    assert_eq!(rep_state(&w), Some(ReplicationState::Replicating));
    assert_eq!(health(&w), Some(ReplicationHealth::Critical));
    // A replica is back but holds no recovery point yet (a resync is filling it).
    let mut empty = replica;
    empty.vm.recovery_points = None;
    *w.sites.get_mut(S).unwrap() = Some(empty);
    w.now += 5;
    w.step();
    assert_eq!(health(&w), Some(ReplicationHealth::Critical));
    // Its first point lands: Healthy again.
    w.add_rp(S);
    w.now += 1;
    w.step();
    assert_eq!(health(&w), Some(ReplicationHealth::Healthy));
    assert_eq!(w.job_types(), [JobType::EnableReplication]);
}

#[test]
fn a_failback_after_an_unplanned_failover_is_planned() {
    let mut w = World::protected(true);
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    w.settle();
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    // Back to the original primary; spec.failover.type still says Unplanned from the move
    // away: the failback is planned (shut down, sync, digests) and loses nothing.
    w.set_spec(|s| s.active_site = Some(P.into()));
    w.settle();
    assert_eq!(
        &w.job_types()[4..],
        [
            JobType::PlannedFailover,
            JobType::Commit,
            JobType::ReverseReplicate
        ]
    );
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Succeeded);
    assert_eq!(w.status.active_site.as_deref(), Some(P));
}

#[test]
fn a_failback_is_unplanned_only_when_the_move_asks_for_it() {
    let mut w = World::protected(true);
    // Away planned, back with Unplanned set in the same change: the person asked for it.
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    w.set_spec(|s| {
        s.active_site = Some(P.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    w.settle();
    assert_eq!(
        &w.job_types()[4..],
        [
            JobType::UnplannedFailover,
            JobType::Commit,
            JobType::ReverseReplicate
        ]
    );
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    // A failover away from the primary follows spec.failover.type as before.
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert_eq!(w.job_types()[7], JobType::UnplannedFailover);
}

#[test]
fn an_unplanned_failover_to_a_missing_recovery_point_fails_before_the_source_is_shut_down() {
    let mut w = World::protected(true);
    // The replica holds recovery points, none app-consistent.
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
        s.failover.recovery_point = "LatestAppConsistent".into();
    });
    w.settle();
    let f = w.job(JobType::UnplannedFailover);
    assert_eq!(f.state, JobState::Failed, "{f:?}");
    assert!(
        f.steps.iter().all(|s| s.state == K),
        "no step ran: {:?}",
        f.steps
    );
    let msg = f.message.as_deref().unwrap_or_default();
    assert!(
        msg.contains("LatestAppConsistent")
            && msg.contains("none app-consistent")
            && msg.contains("rp-")
            && msg.contains(S),
        "{msg}"
    );
    // The source was never shut down: the VM keeps running where it ran.
    assert!(w.calls.is_empty(), "{:?}", w.calls);
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    assert_eq!(w.status.phase, Some(VmPhase::Failed));
    assert!(w.cond(STALLED));
    // The point exists once the replica holds an app-consistent one: a spec change is the next
    // attempt.
    let mut rp = w.add_rp(S);
    rp.app_consistent = true;
    w.vm_mut(S)
        .vm
        .recovery_points
        .as_mut()
        .unwrap()
        .latest_app_consistent = Some(rp);
    w.set_spec(|_| {});
    w.settle();
    assert_eq!(w.job(JobType::UnplannedFailover).state, JobState::Succeeded);
    assert_eq!(w.status.active_site.as_deref(), Some(S));
}

#[test]
fn a_failed_unplanned_failover_restarts_the_source_and_says_where_the_vm_runs() {
    for integration in [true, false] {
        let mut w = World::protected(integration);
        w.start_fails = true;
        w.set_spec(|s| {
            s.active_site = Some(S.into());
            s.failover.type_ = FailoverType::Unplanned;
        });
        w.settle();
        let (shutdown, fence) = if integration { (OK, K) } else { (F, OK) };
        assert_eq!(
            w.steps(JobType::UnplannedFailover),
            st(&[
                ("ShutdownSource", shutdown),
                ("FenceSource", fence),
                ("SyncRemaining", OK),
                ("StopReplication", OK),
                ("StartAtTarget", F),
                ("RestartSource", OK),
            ])
        );
        let f = w.job(JobType::UnplannedFailover);
        assert_eq!(f.state, JobState::Failed);
        let msg = f.message.as_deref().unwrap_or_default();
        assert!(
            msg.contains("could not start") && msg.contains(&format!("runs at {P}")),
            "{msg}"
        );
        // Running somewhere: at the source, started again.
        assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
        assert_eq!(w.status.active_site.as_deref(), Some(P));
        assert!(w.cond(STALLED));
    }
}

#[test]
fn status_shows_replication_stopped_after_a_failed_planned_failover() {
    let mut w = World::protected(true);
    w.settle();
    w.start_fails = true;
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    assert_eq!(
        w.steps(JobType::PlannedFailover),
        st(&[
            ("ShutdownSource", OK),
            ("SyncRemaining", OK),
            ("VerifyDigests", OK),
            ("StopReplication", OK),
            ("StartAtTarget", F),
            ("RestartSource", OK),
        ])
    );
    // Nothing replicates any more, and status says so: no stale health, RPO or direction.
    let r = w.status.replication.clone().unwrap();
    assert_eq!(r.state, ReplicationState::Disabled);
    assert_eq!(
        (r.health, r.rpo_seconds, r.source_site, r.target_site),
        (None, None, None, None)
    );
    assert_eq!(w.status.phase, Some(VmPhase::Failed));
    // The person's answer (here: stay at the primary) protects the VM again.
    w.start_fails = false;
    w.set_spec(|s| s.active_site = Some(P.into()));
    w.settle();
    assert_eq!(rep_state(&w), Some(ReplicationState::Replicating));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
}

#[test]
fn a_source_that_reports_replication_disabled_is_shown_disabled_and_protected_again() {
    let mut w = World::protected(true);
    w.settle();
    assert_eq!(health(&w), Some(ReplicationHealth::Healthy));
    // Someone stopped replication at the site (the site reports Disabled).
    w.vm_mut(P).vm.replication = None;
    w.now += 5;
    assert!(matches!(w.step(), Plan::Write(_)));
    let r = w.status.replication.clone().unwrap();
    assert_eq!(r.state, ReplicationState::Disabled);
    assert_eq!((r.health, r.rpo_seconds), (None, None));
    assert_ne!(w.status.phase, Some(VmPhase::Protected));
    // The spec still asks for replication: the controller sets it up again.
    w.settle();
    assert_eq!(
        w.job_types(),
        [JobType::EnableReplication, JobType::ReverseReplicate]
    );
    assert_eq!(rep_state(&w), Some(ReplicationState::Replicating));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
}

#[test]
fn a_vm_off_at_its_active_site_is_not_healthy_and_is_not_started() {
    let mut w = World::protected(true);
    w.settle();
    assert!(w.cond(READY));
    w.vm_mut(P).vm.power = Power::Off;
    w.now += 5;
    assert!(matches!(w.step(), Plan::Write(_)));
    assert_eq!(health(&w), Some(ReplicationHealth::Warning));
    assert!(!w.cond(READY));
    let ready = w.condition(READY);
    assert_eq!(ready.reason, "VMNotRunning");
    assert!(
        ready.message.contains("off") && ready.message.contains(P),
        "{}",
        ready.message
    );
    w.settle();
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Off);
    assert!(w.calls.is_empty(), "{:?}", w.calls);
    assert_ne!(health(&w), Some(ReplicationHealth::Healthy));
    // Started again by a person: Healthy and Ready.
    w.vm_mut(P).vm.power = Power::Running;
    w.now += 5;
    w.settle();
    assert_eq!(health(&w), Some(ReplicationHealth::Healthy));
    assert!(w.cond(READY));
}

#[test]
fn the_retry_annotation_runs_a_failed_job_again_from_the_step_that_failed() {
    let mut w = World::protected(false);
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    let job = w.job(JobType::PlannedFailover).clone();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.attempt, Some(1));
    assert!(w.cond(STALLED) && !w.cond(RECONCILING) && !w.cond(READY));
    assert!(
        w.condition(STALLED)
            .message
            .contains(&format!("twinsite.io/retry={}", job.name)),
        "{:?}",
        w.condition(STALLED)
    );
    // An annotation naming another job does nothing.
    w.retry = Some("web-01-failover-7".into());
    w.settle();
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Failed);
    // The operator powers the VM off and names the job: attempt 2 runs from ShutdownSource,
    // with operation ids of its own.
    w.vm_mut(P).vm.power = Power::Off;
    w.retry = Some(job.name.clone());
    w.settle();
    let done = w.job(JobType::PlannedFailover).clone();
    assert_eq!(done.name, job.name);
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, Some(2));
    assert!(
        done.steps
            .iter()
            .all(|s| s.operation_id.as_deref().unwrap_or("").contains("-a2-")),
        "{done:?}"
    );
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert!(w.events.iter().any(|e| e.reason == "JobRetried"));
    assert!(!w.cond(STALLED));
}

#[test]
fn a_kept_retry_annotation_runs_each_attempt_once() {
    let mut w = World::protected(false);
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    let name = w.job(JobType::PlannedFailover).name.clone();
    // Attempt 2 fails the same way (the VM still runs and cannot shut down).
    w.retry = Some(name.clone());
    w.settle();
    let j = w.job(JobType::PlannedFailover);
    assert_eq!((j.state, j.attempt), (JobState::Failed, Some(2)));
    // The kept annotation named a job that was retried already: nothing more runs.
    w.tick(30);
    w.settle();
    let j = w.job(JobType::PlannedFailover);
    assert_eq!((j.state, j.attempt), (JobState::Failed, Some(2)));
    assert!(w.condition(STALLED).message.contains(&format!("{name}/3")));
    // `<job>/3` asks for attempt 3.
    w.vm_mut(P).vm.power = Power::Off;
    w.retry = Some(format!("{name}/3"));
    w.settle();
    let j = w.job(JobType::PlannedFailover);
    assert_eq!((j.state, j.attempt), (JobState::Succeeded, Some(3)));
}

#[test]
fn a_plan_run_started_after_a_failover_failed_retries_it() {
    let mut w = World::protected(false);
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    let failed_at = w.job(JobType::PlannedFailover).end_time.clone().unwrap().0;
    w.vm_mut(P).vm.power = Power::Off;
    w.tick(5);
    w.plan_started = Some(ts(w.now));
    assert!(ts(w.now) > failed_at);
    w.settle();
    let j = w.job(JobType::PlannedFailover);
    assert_eq!((j.state, j.attempt), (JobState::Succeeded, Some(2)));
}

#[test]
fn a_failover_failing_in_the_second_its_plan_run_started_is_not_retried_in_that_run() {
    let mut w = World::protected(false);
    w.plan_started = Some(ts(w.now));
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.settle();
    let j = w.job(JobType::PlannedFailover);
    assert_eq!((j.state, j.attempt), (JobState::Failed, Some(1)));
}

/// Runs plans until the next call would be `step`.
fn run_to_step(w: &mut World, step: StepName) {
    for _ in 0..200 {
        if let Plan::Execute(c) = w.with_input(plan)
            && c.step_name == step
        {
            return;
        }
        if let Plan::Idle(_) = w.step() {
            w.tick(5)
        }
    }
    panic!("{step:?} never came: {:#?}", w.status);
}

#[test]
fn a_planned_failover_whose_source_dies_after_shutdown_fails_at_the_step_deadline() {
    let mut w = World::protected(true);
    w.set_spec(|s| {
        s.failover.step_timeout_seconds = Some(60);
        s.active_site = Some(S.into());
    });
    run_to_step(&mut w, StepName::SyncRemaining);
    // The source dies right after it shut the VM down: SyncRemaining and then RestartSource
    // cannot reach it. Each is retried until its deadline, then the job fails.
    w.down.insert(P.into());
    w.settle();
    let job = w.job(JobType::PlannedFailover).clone();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(
        w.steps(JobType::PlannedFailover),
        st(&[
            ("ShutdownSource", OK),
            ("SyncRemaining", F),
            ("VerifyDigests", K),
            ("StopReplication", K),
            ("StartAtTarget", K),
            ("RestartSource", F),
        ])
    );
    let sync = &job.steps[1];
    let msg = sync.message.as_deref().unwrap_or_default();
    assert!(
        msg.contains(DEADLINE_PASSED) && msg.contains("60 s") && msg.contains(P),
        "{msg}"
    );
    let jm = job.message.as_deref().unwrap_or_default();
    assert!(
        jm.starts_with("SyncRemaining failed") && jm.contains(P),
        "{jm}"
    );
    assert!(jm.contains("neither site"), "{jm}");
    // Each step was given up no sooner than its deadline.
    let secs = |s: &JobStep| {
        (s.end_time.as_ref().unwrap().0 - s.start_time.as_ref().unwrap().0).get_seconds()
    };
    assert!(secs(sync) >= 60 && secs(&job.steps[5]) >= 60);
    assert!(w.cond(STALLED) && !w.cond(RECONCILING) && !w.cond(READY));
    let stalled = &w.condition(STALLED).message;
    assert!(
        stalled.contains("spec.failover.type to Unplanned")
            && stalled.contains(&format!("twinsite.io/retry={}", job.name)),
        "{stalled}"
    );
    // The way on: the source site declared lost, the same move as an unplanned failover, from
    // the target's newest point.
    w.lost.insert(P.into());
    w.set_spec(|s| s.failover.type_ = FailoverType::Unplanned);
    w.settle();
    let u = w.job(JobType::UnplannedFailover);
    assert_eq!(u.state, JobState::Succeeded, "{u:#?}");
    for (name, state) in w.steps(JobType::UnplannedFailover) {
        if ["ShutdownSource", "FenceSource", "SyncRemaining"].contains(&name.as_str()) {
            assert_eq!(state, K, "{name}");
        }
    }
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert!(!w.cond(STALLED));
}

#[test]
fn a_required_step_is_retried_until_its_deadline_and_no_longer() {
    let mut w = World::protected(true);
    w.set_spec(|s| s.active_site = Some(S.into()));
    run_to_step(&mut w, StepName::StartAtTarget);
    w.down.insert(S.into());
    // Retried (same id) while the deadline has not passed.
    for _ in 0..3 {
        w.step();
        w.tick(5);
    }
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Running);
    // The default deadline: 600 s.
    w.tick(600);
    w.settle();
    let job = w.job(JobType::PlannedFailover);
    assert_eq!(job.state, JobState::Failed);
    let start = job
        .steps
        .iter()
        .find(|s| s.name == "StartAtTarget")
        .unwrap();
    let msg = start.message.as_deref().unwrap_or_default();
    assert!(msg.contains("600 s") && msg.contains(S), "{msg}");
    // The source, shut down by the job, is started again.
    assert_eq!(w.vm_mut(P).vm.power, Power::Running);
}

#[test]
fn an_initial_copy_that_keeps_failing_fails_at_the_copy_deadline_with_the_agents_error() {
    let mut w = World::new(true);
    w.spec.replication.copy_timeout_seconds = Some(120);
    w.copy_error = Some("peer: no space left on device".into());
    run_until(
        &mut w,
        |w| {
            w.status
                .jobs
                .first()
                .is_some_and(|j| j.state != JobState::Running)
        },
        |w| {
            // Meanwhile the wait shows the agent's reason.
            if let Some(s) = w.status.jobs.first().and_then(|j| j.steps.get(1))
                && s.state == StepState::Running
                && s.message.is_some()
            {
                assert!(s.message.as_deref().unwrap().contains("no space left"));
            }
        },
    );
    w.settle();
    let job = w.job(JobType::EnableReplication).clone();
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    let wait = &job.steps[1];
    assert_eq!(wait.name, "InitialReplication");
    assert_eq!(wait.state, StepState::Failed);
    let msg = wait.message.as_deref().unwrap_or_default();
    assert!(
        msg.contains("no space left on device")
            && msg.contains("copyTimeoutSeconds")
            && msg.contains(P),
        "{msg}"
    );
    assert!(w.cond(STALLED));
    assert_eq!(w.status.phase, Some(VmPhase::Failed));
    // The agent's error is on the object, with its message.
    assert!(w.cond(REPLICATION_ERROR));
    let c = w.condition(REPLICATION_ERROR);
    assert_eq!(c.reason, "AgentError");
    assert!(c.message.contains("no space left on device"), "{c:?}");
    // Freed: the retry waits again and the copy ends; the error clears.
    w.copy_error = None;
    w.retry = Some(job.name.clone());
    w.settle();
    let job = w.job(JobType::EnableReplication);
    assert_eq!((job.state, job.attempt), (JobState::Succeeded, Some(2)));
    assert!(!w.cond(REPLICATION_ERROR) && !w.cond(STALLED) && w.cond(READY));
}

#[test]
fn an_agent_error_on_a_protected_vm_is_a_condition_and_clears() {
    let mut w = World::protected(true);
    assert!(!w.cond(REPLICATION_ERROR));
    w.copy_error = Some("peer refused the cycle: VM runs there".into());
    w.tick(30);
    w.settle();
    assert!(w.cond(REPLICATION_ERROR));
    assert!(
        w.condition(REPLICATION_ERROR)
            .message
            .contains("VM runs there")
    );
    // A listing that fails keeps what the source said last.
    w.down.insert(P.into());
    w.tick(5);
    w.settle();
    assert!(w.cond(REPLICATION_ERROR));
    w.down.clear();
    w.copy_error = None;
    w.tick(30);
    w.settle();
    assert!(!w.cond(REPLICATION_ERROR));
}

#[test]
fn a_changed_interval_is_sent_to_the_running_replication_and_health_follows_the_source() {
    let mut w = World::protected(true);
    w.settle();
    assert!(w.cond(READY));
    // A source that refuses the change (an agent without the settings route) keeps cycling
    // every 30 s: not applied, shown, and asked again; no job, no person needed.
    w.settings_refused = Some("404 no such route".into());
    w.set_spec(|s| s.replication.interval_seconds = 300);
    w.settle();
    assert!(!w.cond(READY) && !w.cond(STALLED) && w.cond(RECONCILING));
    let ready = w.condition(READY);
    assert_eq!(ready.reason, SETTINGS_NOT_APPLIED);
    assert!(
        ready.message.contains("intervalSeconds 30 (spec: 300)"),
        "{ready:?}"
    );
    assert!(!w.cond(SETTINGS_APPLIED));
    assert!(!w.settings_calls.is_empty());
    assert!(
        w.events.iter().any(|e| e.reason == "SettingsFailed"
            && e.warning
            && e.message.contains("404 no such route")),
        "{:?}",
        w.events
    );
    assert_eq!(w.job_types(), [JobType::EnableReplication]);
    // Health against the interval in force at the source (30 s): an RPO of 75 s is Warning
    // there, where the spec's 300 s would call it Healthy.
    w.down.insert(S.into());
    w.now += 70;
    w.step();
    w.step();
    assert_eq!(health(&w), Some(ReplicationHealth::Warning));
    // The source takes it: applied without a job, recorded, and health against 300 s.
    w.down.clear();
    w.settings_refused = None;
    w.settle();
    assert!(w.cond(READY) && !w.cond(STALLED) && w.cond(SETTINGS_APPLIED));
    assert_eq!(w.job_types(), [JobType::EnableReplication]);
    let src = w.sites[P].as_ref().unwrap().vm.replication.clone().unwrap();
    assert_eq!(src.interval_seconds, Some(300));
    let sent = w.status.replication.as_ref().unwrap().settings.clone();
    assert_eq!(sent.map(|s| s.interval_seconds), Some(300));
    assert_eq!(
        w.events
            .iter()
            .filter(|e| e.reason == "SettingsChanged" && !e.warning)
            .count(),
        1,
        "{:?}",
        w.events
    );
    // Every call of this change had one operation id: a repeat is answered from the site.
    let ids: HashSet<&String> = w.settings_calls.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 1, "{:?}", w.settings_calls);
    let calls = w.settings_calls.len();
    w.tick(300);
    w.settle();
    assert_eq!(w.settings_calls.len(), calls, "nothing left to send");
    assert_eq!(health(&w), Some(ReplicationHealth::Healthy));
}

#[test]
fn a_changed_retention_is_sent_to_the_source_without_a_job() {
    let mut w = World::protected(true);
    w.settle();
    let sent = w.status.replication.as_ref().unwrap().settings.clone();
    assert_eq!(
        sent.map(|s| (
            s.interval_seconds,
            s.recovery_point_retention_hours,
            s.app_consistent_frequency_hours
        )),
        Some((30, 24, 0))
    );
    w.set_spec(|s| {
        s.replication.recovery_point_retention_hours = 2;
        s.replication.app_consistent_frequency_hours = 1;
    });
    w.settle();
    assert!(w.cond(READY) && w.cond(SETTINGS_APPLIED) && !w.cond(STALLED));
    assert_eq!(w.job_types(), [JobType::EnableReplication]);
    assert_eq!(w.settings_calls.len(), 1);
    assert_eq!(w.settings_calls[0].0, P);
    let src = w.sites[P].as_ref().unwrap().vm.replication.clone().unwrap();
    assert_eq!(
        (src.retention_hours, src.app_consistent_hours),
        (Some(2), Some(1))
    );
    let sent = w.status.replication.clone().unwrap().settings.unwrap();
    assert_eq!(
        (
            sent.recovery_point_retention_hours,
            sent.app_consistent_frequency_hours
        ),
        (2, 1)
    );
    // A source that does not list retention: what was last sent to it stands for it.
    w.vm_mut(P).vm.replication.as_mut().unwrap().retention_hours = None;
    w.tick(5);
    w.settle();
    assert!(w.cond(SETTINGS_APPLIED));
    assert_eq!(w.settings_calls.len(), 1);
    // A failover and the reprotect after it enable replication with the spec's settings.
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    w.settle();
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert_eq!(w.job(JobType::ReverseReplicate).state, JobState::Succeeded);
    assert!(w.cond(READY) && w.cond(SETTINGS_APPLIED) && !w.cond(STALLED));
    assert_eq!(w.settings_calls.len(), 1);
}

#[test]
fn settings_the_source_took_before_the_controller_recorded_them_are_recorded() {
    let mut w = World::protected(true);
    w.settle();
    // The controller died after the source took the change and before it wrote the status:
    // the source lists the spec's new settings, the status still has the old ones.
    w.set_spec(|s| s.replication.interval_seconds = 300);
    let rep = w.vm_mut(P).vm.replication.as_mut().unwrap();
    rep.interval_seconds = Some(300);
    w.settle();
    assert!(w.settings_calls.is_empty(), "{:?}", w.settings_calls);
    assert!(w.cond(READY) && w.cond(SETTINGS_APPLIED));
    let sent = w.status.replication.clone().unwrap().settings.unwrap();
    assert_eq!(
        (
            sent.interval_seconds,
            sent.recovery_point_retention_hours,
            sent.app_consistent_frequency_hours
        ),
        (300, 24, 0)
    );
}

#[test]
fn a_deletion_during_a_failover_drives_it_to_its_end_and_starts_nothing_after_it() {
    let mut w = World::protected(true);
    w.now += 40;
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Planned;
    });
    // The failover starts and its first step is written Running.
    while w.status.jobs.last().map(|j| j.type_) != Some(JobType::PlannedFailover) {
        w.step();
    }
    w.deleting = true;
    let j = w.job(JobType::PlannedFailover).name.clone();
    let msg = |w: &World| {
        w.status
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| c.message.clone())
            .unwrap_or_default()
    };
    // Written down before the next site call.
    assert!(matches!(w.step(), Plan::Write(_)));
    assert!(
        msg(&w).starts_with(&format!("deletion waits for job {j} to end")),
        "{}",
        msg(&w)
    );
    assert!(w.cond(RECONCILING));
    w.settle();
    // The failover ended; its commit and the reverse replication never started.
    assert_eq!(
        w.job_types(),
        [JobType::EnableReplication, JobType::PlannedFailover]
    );
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Succeeded);
    assert_eq!(w.status.active_site.as_deref(), Some(S));
}

#[test]
fn a_deletion_does_not_retry_a_failed_job() {
    let mut w = World::protected(false);
    w.now += 40;
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Planned;
    });
    w.settle();
    let j = w.job(JobType::PlannedFailover).name.clone();
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Failed);
    w.deleting = true;
    w.retry = Some(j);
    w.settle();
    assert_eq!(w.job(JobType::PlannedFailover).attempt, Some(1));
    assert_eq!(w.job(JobType::PlannedFailover).state, JobState::Failed);
}

#[test]
fn fence_backoff_doubles_up_to_its_cap() {
    let secs: Vec<u64> = (1..=9).map(|n| fence_backoff(n).as_secs()).collect();
    assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(fence_backoff(u32::MAX), FENCE_BACKOFF_MAX);
}

#[test]
fn a_fence_refused_by_a_source_that_answers_never_starts_the_vm_at_the_target() {
    // No integration services: the shutdown fails; the power off is answered with an error.
    let mut w = World::protected(false);
    w.fence_refused = true;
    w.now += 40;
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
        s.failover.step_timeout_seconds = Some(30);
    });
    w.settle();
    let f = w.job(JobType::UnplannedFailover);
    assert_eq!(f.state, JobState::Failed, "{f:#?}");
    assert_eq!(
        w.steps(JobType::UnplannedFailover),
        st(&[
            ("ShutdownSource", F),
            ("FenceSource", F),
            ("SyncRemaining", K),
            ("StopReplication", K),
            ("StartAtTarget", K),
        ])
    );
    let fence = f.steps.iter().find(|s| s.name == "FenceSource").unwrap();
    assert!(
        fence
            .message
            .as_deref()
            .unwrap()
            .contains("power off refused"),
        "{fence:?}"
    );
    assert!(
        f.message
            .as_deref()
            .unwrap()
            .contains(&format!("runs at {P}")),
        "{f:?}"
    );
    // The fence was tried more than once; the VM never started at the target.
    let fences = w
        .calls
        .iter()
        .filter(|c| c.0 == StepName::FenceSource)
        .count();
    assert!(fences >= 1);
    assert!(!w.calls.iter().any(|c| c.0 == StepName::StartAtTarget));
    assert_eq!(w.status.active_site.as_deref(), Some(P));
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
    assert!(w.cond(STALLED));
}

#[test]
fn a_fence_that_failed_backs_off_before_the_next_power_off() {
    let mut w = World::protected(false);
    w.fence_refused = true;
    w.now += 40;
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    // Up to the first refused power off.
    while !w.calls.iter().any(|c| c.0 == StepName::FenceSource) {
        w.step();
    }
    let job = w.job(JobType::UnplannedFailover);
    assert_eq!(job.state, JobState::Running);
    // The reconciler backs off: no power off before then, at the step or anywhere.
    w.fence_not_before = Some(ts(w.now + 10));
    // Looked at again within a poll (a site may be declared lost meanwhile), never powered off
    // before the backoff ends.
    assert_eq!(
        w.with_input(plan),
        Plan::Idle(Duration::from_secs(5)),
        "a fence was tried again before its backoff ended"
    );
    w.now += 10;
    assert!(matches!(
        w.with_input(plan),
        Plan::Execute(ref c) if c.step_name == StepName::FenceSource
    ));
}

#[test]
fn a_source_seen_running_again_is_powered_off_before_the_vm_starts_at_the_target() {
    let mut w = World::protected(true);
    w.now += 40;
    w.lost.insert(P.to_string());
    w.set_spec(|s| {
        s.active_site = Some(S.into());
        s.failover.type_ = FailoverType::Unplanned;
    });
    let start_state = |w: &World| {
        w.status
            .jobs
            .last()
            .filter(|j| j.type_ == JobType::UnplannedFailover)
            .and_then(|j| j.steps.iter().find(|s| s.name == "StartAtTarget"))
            .map(|s| s.state)
    };
    while start_state(&w) != Some(StepState::Running) {
        w.step();
    }
    // The declaration is removed and the source answers, the VM running there: it is powered
    // off first.
    w.lost.remove(P);
    w.now += 2;
    match w.with_input(plan) {
        Plan::Fence(f) => assert_eq!(f.site, P),
        other => panic!("expected a fence of {P}, got {other:?}"),
    }
    // Backing off after a failed power off: nothing starts at the target meanwhile.
    w.fence_not_before = Some(ts(w.now + 20));
    assert!(matches!(w.with_input(plan), Plan::Idle(_)));
    w.fence_not_before = None;
    w.settle();
    assert_eq!(w.job(JobType::UnplannedFailover).state, JobState::Succeeded);
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Off);
    let order: Vec<StepName> = w.calls.iter().map(|c| c.0).collect();
    let fence = order
        .iter()
        .position(|s| *s == StepName::FenceSource)
        .unwrap();
    let start = order
        .iter()
        .position(|s| *s == StepName::StartAtTarget)
        .unwrap();
    assert!(fence < start, "{order:?}");
}

/// The management cluster was rebuilt without status after a failover to the recovery site,
/// and the VM runs at both sites.
fn both_running_status_wiped(pending_at_primary: u64) -> World {
    let mut w = World::protected(true);
    let s = w.vm_mut(S);
    s.vm.power = Power::Running;
    s.vm.role = Role::Primary;
    s.vm.replication = None;
    w.vm_mut(P).vm.replication.as_mut().unwrap().pending_bytes = pending_at_primary;
    w.status = ReplicatedVMStatus::default();
    w.set_spec(|s| s.active_site = Some(S.into()));
    w.tick(5);
    w
}

#[test]
fn a_vm_running_at_both_sites_without_status_follows_the_spec_and_no_unsure_copy_is_fenced() {
    let mut w = both_running_status_wiped(4096);
    w.settle();
    // Where the spec says, never the primary by itself.
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert!(!w.calls.iter().any(|c| c.0 == StepName::FenceSource));
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Running);
    assert_eq!(w.sites[S].as_ref().unwrap().vm.power, Power::Running);
    assert!(w.cond(SPLIT_BRAIN));
    let m = &w.condition(SPLIT_BRAIN).message;
    assert!(
        m.contains("4096 bytes not yet replicated") && m.contains("power it off"),
        "{m}"
    );
    assert!(w.cond(STALLED));
    assert_eq!(w.condition(READY).reason, SPLIT_BRAIN);
    assert!(w.status.jobs.is_empty(), "{:?}", w.job_types());
    assert_eq!(
        w.events.iter().filter(|e| e.reason == SPLIT_BRAIN).count(),
        1
    );
    // The operator saves what the primary's copy holds and powers it off: protected again
    // from the copy the spec names.
    w.vm_mut(P).vm.power = Power::Off;
    w.tick(5);
    w.settle();
    assert!(!w.cond(SPLIT_BRAIN));
    assert_eq!(w.job_types().last(), Some(&JobType::ReverseReplicate));
    assert_eq!(w.status.phase, Some(VmPhase::Protected));
    assert_eq!(w.sites[S].as_ref().unwrap().vm.power, Power::Running);
}

#[test]
fn a_second_copy_whose_writes_all_reached_the_kept_one_is_powered_off() {
    let mut w = both_running_status_wiped(0);
    w.settle();
    assert_eq!(w.status.active_site.as_deref(), Some(S));
    assert!(
        w.calls.contains(&(StepName::FenceSource, P.to_string())),
        "{:?} {:#?} {:#?}",
        w.calls,
        w.sites[P].as_ref().map(|v| v.vm.clone()),
        w.status
    );
    assert_eq!(w.sites[P].as_ref().unwrap().vm.power, Power::Off);
    assert_eq!(w.sites[S].as_ref().unwrap().vm.power, Power::Running);
    assert!(!w.cond(SPLIT_BRAIN));
}
