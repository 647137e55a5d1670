//! The FailoverPlan reconciler against a real kube-apiserver.
//!
//! These tests prove the plan's orchestration: which VMs it releases and when, approvals,
//! webhooks, conflicts and drills. No site agents run here and neither does the ReplicatedVM
//! controller: the test itself plays the VMs, moving them by patching their status through the
//! status subresource (status.activeSite, status.jobs, status.testFailover, status.lastDrill),
//! as the ReplicatedVM controller would once a plan releases them. The full stack, with agents
//! and the ReplicatedVM controller, is proved by its own tests.
//!
//! Each test has its own namespace and runs its own plan controller scoped to it, in-process.

use std::io::Write;
use std::process::Stdio;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use twinsite::api::{FailoverPlan, JobState, JobType, ReplicatedVM, StepState};
use twinsite::controller::failover_plan::{self, planner, webhook};
use twinsite::envtest::{self, ControlPlane};

/// A plan controller scoped to one namespace, stopped when dropped (on panic too).
struct Controller(JoinHandle<()>);

impl Drop for Controller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One test's world: a namespace of its own and a plan controller for it.
struct Env {
    cp: &'static ControlPlane,
    ns: String,
    plans: Api<FailoverPlan>,
    rvms: Api<ReplicatedVM>,
    events: Api<Event>,
    _ctrl: Controller,
}

impl Env {
    async fn new(what: &str) -> Self {
        Self::with_settings(what, |_| local_hooks()).await
    }

    /// A world whose plan controller has these webhook settings (made from the namespace's
    /// name, which also serves as the controller's secret namespace).
    async fn with_settings(what: &str, settings: impl Fn(&str) -> webhook::Settings) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let cp = envtest::shared().await;
        let ns = format!(
            "plan-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        kubectl(cp, &["create", "namespace", &ns]);
        let client = cp.client().await.unwrap();
        Self {
            cp,
            plans: Api::namespaced(client.clone(), &ns),
            rvms: Api::namespaced(client.clone(), &ns),
            events: Api::namespaced(client.clone(), &ns),
            _ctrl: start_controller_with(client, &ns, settings(&ns)),
            ns,
        }
    }

    /// Stops the plan controller and starts a new one, as a controller restart would.
    async fn restart_controller(&mut self) {
        self._ctrl.0.abort();
        let client = self.cp.client().await.unwrap();
        self._ctrl = start_controller(client, &self.ns);
    }

    /// `kubectl apply` of a manifest in this namespace.
    fn apply(&self, yaml: &str) {
        let mut child = self
            .cp
            .kubectl()
            .args(["apply", "-n", &self.ns, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl apply refused:\n{yaml}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        kubectl(self.cp, &all)
    }

    /// A ReplicatedVM between primary and secondary that runs at primary (as its controller
    /// would have reported), with labels and extra spec lines.
    async fn vm(&self, name: &str, labels: &str, spec_extra: &str) {
        self.apply(&format!(
            "apiVersion: twinsite.io/v1alpha1\nkind: ReplicatedVM\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\n\
             spec:\n  primarySite: primary\n  recoverySite: secondary\n{spec_extra}"
        ));
        self.vm_status(name, json!({"activeSite": "primary", "phase": "Protected"}))
            .await;
    }

    /// What the ReplicatedVM controller would write: a merge patch of the VM's status.
    async fn vm_status(&self, name: &str, status: Value) {
        self.rvms
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({ "status": status })),
            )
            .await
            .unwrap();
    }

    /// The VM arrives at `site`: its failover job ended with `state`.
    /// The VM's failover job in `state`; a failover that succeeded is followed by its commit,
    /// as the ReplicatedVM controller runs it (the plans here commit automatically, and a group
    /// is done only when its commits are).
    async fn vm_moved(&self, name: &str, site: &str, state: &str) {
        let mut jobs = vec![job(&format!("{name}-failover-1"), "PlannedFailover", state)];
        if state == "Succeeded" {
            jobs.push(job(&format!("{name}-commit-1"), "Commit", "Succeeded"));
        }
        self.vm_status(name, json!({"activeSite": site, "jobs": jobs}))
            .await;
    }

    async fn plan(&self, name: &str) -> FailoverPlan {
        self.plans.get(name).await.unwrap()
    }

    /// Polls the plan until `ok` holds. The limit only keeps a broken run from hanging: it is
    /// far above anything the reconciler needs, and no test asserts on how long it took.
    async fn wait(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&FailoverPlan) -> bool,
    ) -> FailoverPlan {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let fp = self.plan(name).await;
            if ok(&fp) {
                return fp;
            }
            if Instant::now() > deadline {
                panic!(
                    "plan {name}: {what} never happened; status:\n{}",
                    serde_yaml::to_string(&fp.status).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reasons of the Events published for plan `name`.
    async fn event_reasons(&self, name: &str) -> Vec<String> {
        self.events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.reason)
            .collect()
    }
}

/// The tests' receivers listen on 127.0.0.1, which the allow-list must name itself.
fn local_hooks() -> webhook::Settings {
    webhook::Settings {
        allowed_hosts: webhook::AllowedHosts::new(&["127.0.0.1"]),
        signing_secret: None,
    }
}

fn start_controller(client: kube::Client, ns: &str) -> Controller {
    start_controller_with(client, ns, local_hooks())
}

fn start_controller_with(
    client: kube::Client,
    ns: &str,
    settings: webhook::Settings,
) -> Controller {
    let ns = ns.to_string();
    Controller(tokio::spawn(async move {
        failover_plan::run_with(client, Some(&ns), settings, std::future::pending())
            .await
            .unwrap();
    }))
}

fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.kubectl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn job(name: &str, type_: &str, state: &str) -> Value {
    json!({
        "name": name,
        "type": type_,
        "state": state,
        "startTime": jiff::Timestamp::now().round(jiff::Unit::Second).unwrap().to_string(),
    })
}

fn vm_state(fp: &FailoverPlan, vm: &str) -> String {
    fp.status
        .as_ref()
        .and_then(|s| {
            s.groups
                .iter()
                .flat_map(|g| &g.vms)
                .find(|v| v.name == vm)
                .map(|v| v.state.clone())
        })
        .unwrap_or_default()
}

fn cond(fp: &FailoverPlan, type_: &str) -> Option<(String, String)> {
    fp.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.message.clone()))
    })
}

fn is_true(fp: &FailoverPlan, type_: &str) -> bool {
    cond(fp, type_).is_some_and(|(s, _)| s == "True")
}

fn newest_job(fp: &FailoverPlan) -> Option<&twinsite::api::Job> {
    fp.status.as_ref().and_then(|s| s.jobs.last())
}

fn step<'a>(fp: &'a FailoverPlan, name: &str) -> &'a twinsite::api::JobStep {
    newest_job(fp)
        .and_then(|j| j.steps.iter().find(|s| s.name == name))
        .unwrap_or_else(|| panic!("no step {name}"))
}

fn phase(fp: &FailoverPlan) -> String {
    fp.status
        .as_ref()
        .and_then(|s| s.phase)
        .map(|p| format!("{p:?}"))
        .unwrap_or_default()
}

fn summary(fp: &FailoverPlan) -> String {
    fp.status
        .as_ref()
        .and_then(|s| s.groups_summary.clone())
        .unwrap_or_default()
}

fn plan_yaml(name: &str, spec: &str) -> String {
    plan_to(name, "secondary", spec)
}

fn plan_to(name: &str, target: &str, spec: &str) -> String {
    format!(
        "apiVersion: twinsite.io/v1alpha1\nkind: FailoverPlan\nmetadata:\n  name: {name}\n\
         spec:\n  targetSite: {target}\n{spec}"
    )
}

/// Each call's body as received and its X-Twinsite-Signature header.
type Received = Arc<Mutex<Vec<(Vec<u8>, Option<String>)>>>;

/// A webhook receiver on 127.0.0.1: answers every POST with `code` and keeps the bodies.
struct Hook {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    raw: Received,
    /// The HTTP status it answers with; a test may change it.
    code: Arc<AtomicU16>,
    task: JoinHandle<()>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(code: u16) -> Hook {
    #[derive(Clone)]
    struct S {
        code: Arc<AtomicU16>,
        bodies: Arc<Mutex<Vec<Value>>>,
        raw: Received,
    }
    async fn handle(
        State(s): State<S>,
        headers: axum::http::HeaderMap,
        body: String,
    ) -> (StatusCode, &'static str) {
        let sig = headers
            .get(webhook::SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        s.raw.lock().unwrap().push((body.clone().into_bytes(), sig));
        let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
        s.bodies.lock().unwrap().push(v);
        let code = StatusCode::from_u16(s.code.load(Ordering::SeqCst)).unwrap();
        (code, "hook says so")
    }
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let raw = Arc::new(Mutex::new(Vec::new()));
    let code = Arc::new(AtomicU16::new(code));
    let state = S {
        code: code.clone(),
        bodies: bodies.clone(),
        raw: raw.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/check", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route("/hooks/check", post(handle))
        .with_state(state);
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    Hook {
        url,
        bodies,
        raw,
        code,
        task,
    }
}

#[tokio::test]
async fn groups_run_in_order_and_the_second_waits_for_the_first() {
    let env = Env::new("order").await;
    env.vm("db-1", "", "").await;
    env.vm("db-2", "", "").await;
    env.vm("web-1", "tier: web", "").await;
    env.vm("web-2", "tier: web", "").await;
    env.vm("batch-1", "tier: batch", "").await;
    env.apply(&plan_yaml(
        "app",
        "  groups:\n  - name: db\n    vms: [db-1, db-2]\n  - name: web\n    selector: {matchLabels: {tier: web}}\n",
    ));

    let fp = env
        .wait("app", "the databases released", |fp| {
            vm_state(fp, "db-1") == planner::VM_RELEASED
                && vm_state(fp, "db-2") == planner::VM_RELEASED
        })
        .await;
    let j = newest_job(&fp).unwrap();
    assert_eq!(j.type_, JobType::PlanFailover);
    assert_eq!(j.state, JobState::Running);
    assert_eq!(phase(&fp), "InProgress");
    assert_eq!(summary(&fp), "0/2");
    assert_eq!(vm_state(&fp, "web-1"), planner::VM_PENDING);
    assert_eq!(vm_state(&fp, "web-2"), planner::VM_PENDING);
    assert_eq!(
        vm_state(&fp, "batch-1"),
        "",
        "the selector picks the web tier only"
    );
    let steps: Vec<&str> = j.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["group:db", "group:web"]);

    // db-2 reaches the target but its failover job still runs; then db-1 arrives. The plan
    // sees db-1 arrive only after it has seen db-2's state, so once db-1 shows Succeeded the
    // plan has judged db-2 too: still in flight, and the web group still waits.
    env.vm_moved("db-2", "secondary", "Running").await;
    env.vm_moved("db-1", "secondary", "Succeeded").await;
    let fp = env
        .wait("app", "db-1 done", |fp| {
            vm_state(fp, "db-1") == planner::VM_SUCCEEDED
        })
        .await;
    assert_eq!(vm_state(&fp, "db-2"), planner::VM_RELEASED);
    assert_eq!(vm_state(&fp, "web-1"), planner::VM_PENDING);
    assert_eq!(vm_state(&fp, "web-2"), planner::VM_PENDING);

    // db-2's job ends: now, and only now, the web group is released.
    env.vm_moved("db-2", "secondary", "Succeeded").await;
    let fp = env
        .wait("app", "the web group released", |fp| {
            vm_state(fp, "web-1") == planner::VM_RELEASED
        })
        .await;
    assert_eq!(vm_state(&fp, "web-2"), planner::VM_RELEASED);
    assert_eq!(summary(&fp), "1/2");
    for db in ["db-1", "db-2"] {
        let r = env.rvms.get(db).await.unwrap();
        let st = r.status.unwrap();
        assert_eq!(st.active_site.as_deref(), Some("secondary"));
        assert_ne!(st.jobs.last().unwrap().state, JobState::Running);
    }
    // The ReplicatedVM controller learns the same from the plan.
    let plans = vec![fp.clone()];
    let vms = env.rvms.list(&ListParams::default()).await.unwrap().items;
    let web1 = vms
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("web-1"))
        .unwrap();
    let batch = vms
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("batch-1"))
        .unwrap();
    let failover_plan::Hold::Failover {
        plan,
        job,
        target,
        failover,
        cut,
        started,
    } = failover_plan::hold(web1, &plans)
    else {
        panic!("web-1 should be released for the failover");
    };
    assert_eq!((plan.as_str(), target.as_str()), ("app", "secondary"));
    assert_eq!(job, newest_job(&fp).unwrap().name);
    assert_eq!(failover.type_, twinsite::api::FailoverType::Planned);
    assert_eq!(cut, None, "a planned failover needs no cut");
    assert!(
        started.is_some(),
        "the running plan job's start is handed on"
    );
    assert_eq!(
        failover_plan::hold(batch, &plans),
        failover_plan::Hold::Free
    );

    env.vm_moved("web-1", "secondary", "Succeeded").await;
    env.vm_moved("web-2", "secondary", "Succeeded").await;
    let fp = env
        .wait("app", "the plan completed", |fp| phase(fp) == "Completed")
        .await;
    assert_eq!(newest_job(&fp).unwrap().state, JobState::Succeeded);
    assert_eq!(summary(&fp), "2/2");
    assert!(is_true(&fp, "Ready"));
    assert!(!is_true(&fp, "Reconciling"));
    assert_eq!(
        fp.status.as_ref().unwrap().observed_generation,
        fp.metadata.generation
    );

    // Printer columns.
    let out = env.kubectl(&["get", "fp", "app"]);
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "TARGET", "PHASE", "GROUPS", "AGE"]);
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..4], ["app", "secondary", "Completed", "2/2"]);

    // Events for the job's start and end.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reasons = env.event_reasons("app").await;
        if reasons.iter().any(|r| r == "JobStarted") && reasons.iter().any(|r| r == "JobSucceeded")
        {
            break;
        }
        assert!(Instant::now() < deadline, "events: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn max_parallel_limits_the_vms_in_flight() {
    let env = Env::new("parallel").await;
    for vm in ["a", "b", "c"] {
        env.vm(vm, "", "").await;
    }
    env.apply(&plan_yaml(
        "app",
        "  maxParallel: 2\n  groups:\n  - name: all\n    vms: [a, b, c]\n",
    ));
    let fp = env
        .wait("app", "two released", |fp| {
            vm_state(fp, "a") == planner::VM_RELEASED && vm_state(fp, "b") == planner::VM_RELEASED
        })
        .await;
    assert_eq!(vm_state(&fp, "c"), planner::VM_PENDING);
    env.vm_moved("a", "secondary", "Succeeded").await;
    env.wait("app", "c released once a is done", |fp| {
        vm_state(fp, "c") == planner::VM_RELEASED
    })
    .await;
}

#[tokio::test]
async fn a_manual_approval_pauses_the_plan_until_annotated() {
    let env = Env::new("approval").await;
    env.vm("db-1", "", "").await;
    env.apply(&plan_yaml(
        "app",
        "  groups:\n  - name: db\n    vms: [db-1]\n    preActions:\n    - name: fenced\n      \
         manualApproval: {message: DBA confirms the old primary is fenced}\n",
    ));
    let fp = env
        .wait("app", "waiting for approval", |fp| {
            is_true(fp, planner::WAITING_FOR_APPROVAL)
        })
        .await;
    let (_, msg) = cond(&fp, planner::WAITING_FOR_APPROVAL).unwrap();
    assert!(
        msg.contains("db/fenced") && msg.contains("DBA confirms"),
        "{msg}"
    );
    assert_eq!(step(&fp, "pre:db/fenced").state, StepState::Running);
    assert_eq!(
        vm_state(&fp, "db-1"),
        planner::VM_PENDING,
        "nothing released"
    );
    assert_eq!(phase(&fp), "InProgress");

    // An approval of another action changes nothing: once the plan has seen it (the
    // annotation's generation-less change still wakes it), db-1 is still held.
    env.kubectl(&["annotate", "fp", "app", "twinsite.io/approve=web/other"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fp = env.plan("app").await;
    assert_eq!(vm_state(&fp, "db-1"), planner::VM_PENDING);
    assert!(is_true(&fp, planner::WAITING_FOR_APPROVAL));

    env.kubectl(&[
        "annotate",
        "--overwrite",
        "fp",
        "app",
        "twinsite.io/approve=web/other,db/fenced",
    ]);
    let fp = env
        .wait("app", "released after the approval", |fp| {
            vm_state(fp, "db-1") == planner::VM_RELEASED
        })
        .await;
    assert!(!is_true(&fp, planner::WAITING_FOR_APPROVAL));
    assert_eq!(step(&fp, "pre:db/fenced").state, StepState::Succeeded);

    env.vm_moved("db-1", "secondary", "Succeeded").await;
    let fp = env
        .wait("app", "completed", |fp| phase(fp) == "Completed")
        .await;
    // The annotation stays as the operator (or a GitOps tool) wrote it; the value that
    // approved is recorded as used, so the next run asks again.
    assert_eq!(
        fp.metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .get("twinsite.io/approve")
            .map(String::as_str),
        Some("web/other,db/fenced")
    );
    assert_eq!(
        fp.status.clone().unwrap_or_default().consumed_approvals,
        vec!["db/fenced".to_string()]
    );
    assert!(
        env.event_reasons("app")
            .await
            .iter()
            .any(|r| r == "WaitingForApproval")
    );
}

/// A plan whose first group has a post-action webhook, then a second group.
fn webhook_plan(kind: &str, url: &str) -> String {
    plan_yaml(
        "app",
        &format!(
            "  failover: {{type: {kind}}}\n  groups:\n  - name: db\n    vms: [db-1]\n    postActions:\n    \
             - name: check\n      webhook: {{url: \"{url}\", timeoutSeconds: 10}}\n  - name: web\n    vms: [web-1]\n"
        ),
    )
}

#[tokio::test]
async fn a_failing_webhook_stops_a_planned_plan() {
    let env = Env::new("hookplanned").await;
    let hook = hook(500).await;
    env.vm("db-1", "", "").await;
    env.vm("web-1", "", "").await;
    env.apply(&webhook_plan("Planned", &hook.url));
    env.wait("app", "db released", |fp| {
        vm_state(fp, "db-1") == planner::VM_RELEASED
    })
    .await;
    env.vm_moved("db-1", "secondary", "Succeeded").await;
    let fp = env
        .wait("app", "the plan failed", |fp| phase(fp) == "Failed")
        .await;
    assert_eq!(
        hook.bodies.lock().unwrap().len(),
        1,
        "the hook was called once"
    );
    let s = step(&fp, "post:db/check");
    assert_eq!(s.state, StepState::Failed);
    let msg = s.message.clone().unwrap_or_default();
    assert!(msg.contains("500"), "{msg}");
    assert_eq!(newest_job(&fp).unwrap().state, JobState::Failed);
    assert_eq!(step(&fp, "group:web").state, StepState::Pending);
    assert_eq!(
        vm_state(&fp, "web-1"),
        planner::VM_PENDING,
        "the next group never starts"
    );
    assert!(is_true(&fp, "Stalled"));
    assert!(!is_true(&fp, "Ready"));
    // It stays stopped: a VM change wakes the plan, and nothing moves.
    env.vm_status("web-1", json!({"phase": "Protected"})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fp = env.plan("app").await;
    assert_eq!(vm_state(&fp, "web-1"), planner::VM_PENDING);
    assert!(
        env.event_reasons("app")
            .await
            .iter()
            .any(|r| r == "StepFailed")
    );

    // The cause is fixed and the failed job is named for a retry: a new job runs, finds the
    // databases at the target, calls the hook again and releases the web group.
    hook.code.store(200, Ordering::SeqCst);
    let failed = newest_job(&fp).unwrap().name.clone();
    env.kubectl(&[
        "annotate",
        "fp",
        "app",
        &format!("twinsite.io/retry={failed}"),
    ]);
    let fp = env
        .wait("app", "web released by the retry", |fp| {
            vm_state(fp, "web-1") == planner::VM_RELEASED
        })
        .await;
    let jobs = &fp.status.as_ref().unwrap().jobs;
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0].state, JobState::Failed);
    assert_eq!(jobs[1].state, JobState::Running);
    assert_eq!(step(&fp, "post:db/check").state, StepState::Succeeded);
    assert_eq!(hook.bodies.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_failing_webhook_does_not_stop_an_unplanned_plan() {
    let env = Env::new("hookunplanned").await;
    let hook = hook(500).await;
    env.vm("db-1", "", "").await;
    env.vm("web-1", "", "").await;
    env.apply(&webhook_plan("Unplanned", &hook.url));
    env.wait("app", "db released", |fp| {
        vm_state(fp, "db-1") == planner::VM_RELEASED
    })
    .await;
    env.vm_moved("db-1", "secondary", "Succeeded").await;
    let fp = env
        .wait("app", "web released", |fp| {
            vm_state(fp, "web-1") == planner::VM_RELEASED
        })
        .await;
    let s = step(&fp, "post:db/check");
    assert_eq!(s.state, StepState::Failed, "the failure is recorded");
    assert!(s.message.clone().unwrap_or_default().contains("500"));
    assert!(!hook.bodies.lock().unwrap().is_empty());
    assert_eq!(newest_job(&fp).unwrap().state, JobState::Running);
    env.vm_moved("web-1", "secondary", "Succeeded").await;
    let fp = env
        .wait("app", "completed", |fp| phase(fp) == "Completed")
        .await;
    assert_eq!(newest_job(&fp).unwrap().state, JobState::Succeeded);
}

#[tokio::test]
async fn an_unreachable_webhook_fails_with_the_reason() {
    let env = Env::new("hookdown").await;
    // A port that was free a moment ago: nothing answers there.
    let port = envtest::free_port().unwrap();
    env.vm("db-1", "", "").await;
    env.apply(&plan_yaml(
        "app",
        &format!(
            "  groups:\n  - name: db\n    vms: [db-1]\n    preActions:\n    - name: check\n      \
             webhook: {{url: \"http://127.0.0.1:{port}/hook\", timeoutSeconds: 5}}\n"
        ),
    ));
    let fp = env
        .wait("app", "the plan failed", |fp| phase(fp) == "Failed")
        .await;
    let msg = step(&fp, "pre:db/check")
        .message
        .clone()
        .unwrap_or_default();
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert_eq!(vm_state(&fp, "db-1"), planner::VM_PENDING);
}

#[tokio::test]
async fn a_succeeding_webhook_receives_the_plan_group_and_direction() {
    let env = Env::new("hookok").await;
    let hook = hook(204).await;
    env.vm("db-1", "", "").await;
    env.apply(&plan_yaml(
        "app",
        &format!(
            "  groups:\n  - name: db\n    vms: [db-1]\n    preActions:\n    - name: drain\n      \
             webhook: {{url: \"{}\", timeoutSeconds: 10}}\n",
            hook.url
        ),
    ));
    let fp = env
        .wait("app", "db released after the hook", |fp| {
            vm_state(fp, "db-1") == planner::VM_RELEASED
        })
        .await;
    let s = step(&fp, "pre:db/drain");
    assert_eq!(s.state, StepState::Succeeded);
    let bodies = hook.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    let b = &bodies[0];
    assert_eq!(b["plan"], "app");
    assert_eq!(b["namespace"], env.ns.as_str());
    assert_eq!(b["group"], "db");
    assert_eq!(b["action"], "drain");
    assert_eq!(b["stage"], "pre");
    assert_eq!(b["direction"], "failover");
    assert_eq!(b["targetSite"], "secondary");
    assert_eq!(b["failoverType"], "Planned");
    assert_eq!(b["job"], newest_job(&fp).unwrap().name.as_str());
}

#[tokio::test]
async fn a_vm_in_two_plans_is_a_conflict_on_both_and_nothing_moves() {
    let env = Env::new("conflict").await;
    env.vm("db-1", "app: shop", "").await;
    env.vm("db-2", "", "").await;
    env.apply(&plan_yaml(
        "a",
        "  groups:\n  - name: db\n    vms: [db-1, db-2]\n",
    ));
    env.apply(&plan_yaml(
        "b",
        "  groups:\n  - name: all\n    selector: {matchLabels: {app: shop}}\n",
    ));
    // Plan a may have started before b appeared; either way, once both show the conflict,
    // nothing is released from then on.
    let a = env
        .wait("a", "conflict", |fp| is_true(fp, planner::CONFLICT))
        .await;
    let b = env
        .wait("b", "conflict", |fp| is_true(fp, planner::CONFLICT))
        .await;
    assert!(
        cond(&a, planner::CONFLICT)
            .unwrap()
            .1
            .contains("also in plan b")
    );
    assert!(
        cond(&b, planner::CONFLICT)
            .unwrap()
            .1
            .contains("also in plan a")
    );
    assert!(newest_job(&b).is_none(), "b never started");
    assert!(!is_true(&b, "Ready"));
    assert!(is_true(&b, "Stalled"));
    let vms = env.rvms.list(&ListParams::default()).await.unwrap().items;
    let plans = vec![a.clone(), b.clone()];
    assert!(matches!(
        failover_plan::hold(&vms[0], &plans),
        failover_plan::Hold::Conflict { .. }
    ));
    // With a job of a running: the conflict holds it where it was.
    let released_before: Vec<String> = ["db-1", "db-2"].iter().map(|v| vm_state(&a, v)).collect();
    env.vm_moved("db-2", "secondary", "Succeeded").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = env.plan("a").await;
    let now: Vec<String> = ["db-1", "db-2"].iter().map(|v| vm_state(&a, v)).collect();
    assert_eq!(
        released_before, now,
        "nothing moves while the conflict lasts"
    );

    // Removing the label ends the conflict on both plans; a goes on.
    env.kubectl(&["label", "rvm", "db-1", "app-"]);
    let a = env
        .wait("a", "conflict gone and db-1 released", |fp| {
            !is_true(fp, planner::CONFLICT) && vm_state(fp, "db-1") == planner::VM_RELEASED
        })
        .await;
    assert_eq!(vm_state(&a, "db-2"), planner::VM_SUCCEEDED);
    env.wait("b", "conflict gone", |fp| !is_true(fp, planner::CONFLICT))
        .await;
}

#[tokio::test]
async fn a_vm_whose_own_active_site_disagrees_is_a_conflict() {
    let env = Env::new("ownsite").await;
    env.vm("db-1", "", "  activeSite: primary\n").await;
    env.apply(&plan_yaml(
        "app",
        "  groups:\n  - name: db\n    vms: [db-1]\n",
    ));
    let fp = env
        .wait("app", "conflict", |fp| is_true(fp, planner::CONFLICT))
        .await;
    let msg = cond(&fp, planner::CONFLICT).unwrap().1;
    assert!(
        msg.contains("db-1") && msg.contains("spec.activeSite primary"),
        "{msg}"
    );
    assert!(newest_job(&fp).is_none(), "nothing starts");
    assert_eq!(phase(&fp), "Pending");
    assert!(
        env.event_reasons("app")
            .await
            .iter()
            .any(|r| r == "Conflict")
    );

    // The VM gives its desired site up to the plan: the plan starts.
    env.kubectl(&[
        "patch",
        "rvm",
        "db-1",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/activeSite"}]"#,
    ]);
    env.wait("app", "db-1 released", |fp| {
        !is_true(fp, planner::CONFLICT) && vm_state(fp, "db-1") == planner::VM_RELEASED
    })
    .await;
}

#[tokio::test]
async fn a_missing_vm_is_reported_and_waited_for() {
    let env = Env::new("missing").await;
    env.apply(&plan_yaml(
        "app",
        "  groups:\n  - name: db\n    vms: [db-1]\n",
    ));
    let fp = env
        .wait("app", "missing reported", |fp| {
            is_true(fp, planner::MEMBERS_MISSING)
        })
        .await;
    assert!(
        cond(&fp, planner::MEMBERS_MISSING)
            .unwrap()
            .1
            .contains("db-1")
    );
    env.vm("db-1", "", "").await;
    env.wait("app", "db-1 found and released", |fp| {
        !is_true(fp, planner::MEMBERS_MISSING) && vm_state(fp, "db-1") == planner::VM_RELEASED
    })
    .await;
}

#[tokio::test]
async fn a_plan_drill_and_its_cleanup() {
    let env = Env::new("drill").await;
    env.vm("db-1", "", "").await;
    env.vm("web-1", "", "").await;
    // The plan keeps the VMs where they run (primary); the drill copies start at the other
    // site, secondary.
    env.apply(&plan_to(
        "app",
        "primary",
        "  testFailover: {enabled: true}\n  groups:\n  - name: db\n    vms: [db-1]\n  - name: web\n    vms: [web-1]\n",
    ));
    let fp = env
        .wait("app", "db released for the drill", |fp| {
            vm_state(fp, "db-1") == planner::VM_RELEASED
        })
        .await;
    let drill = newest_job(&fp).unwrap().clone();
    assert_eq!(drill.type_, JobType::PlanTestFailover);
    assert_eq!(vm_state(&fp, "web-1"), planner::VM_PENDING);
    let plans = vec![fp.clone()];
    let vms = env.rvms.list(&ListParams::default()).await.unwrap().items;
    let db = vms
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("db-1"))
        .unwrap();
    assert_eq!(
        failover_plan::hold(db, &plans),
        failover_plan::Hold::Drill {
            plan: "app".into(),
            job: drill.name.clone(),
            network: "isolated".into()
        }
    );

    let copy =
        |vm: &str| json!({"state": "Running", "vmName": format!("{vm}-test"), "site": "secondary"});
    env.vm_status("db-1", json!({"testFailover": copy("db-1")}))
        .await;
    env.wait("app", "web released for the drill", |fp| {
        vm_state(fp, "web-1") == planner::VM_RELEASED
    })
    .await;
    env.vm_status("web-1", json!({"testFailover": copy("web-1")}))
        .await;
    let fp = env
        .wait("app", "drill done", |fp| {
            newest_job(fp).is_some_and(|j| j.state == JobState::Succeeded)
        })
        .await;
    assert_eq!(phase(&fp), "Completed");
    assert!(
        fp.status.as_ref().unwrap().last_drill.is_none(),
        "a drill counts only after its cleanup"
    );

    env.kubectl(&[
        "patch",
        "fp",
        "app",
        "--type=merge",
        "-p",
        r#"{"spec":{"testFailover":{"enabled":false}}}"#,
    ]);
    let fp = env
        .wait("app", "cleanup released", |fp| {
            newest_job(fp).is_some_and(|j| j.type_ == JobType::PlanTestFailoverCleanup)
                && vm_state(fp, "db-1") == planner::VM_RELEASED
        })
        .await;
    assert_eq!(newest_job(&fp).unwrap().state, JobState::Running);
    let done = |vm: &str| {
        json!({
            "testFailover": null,
            "lastDrill": {"job": format!("{vm}-testfailover-1"), "time": jiff::Timestamp::now().round(jiff::Unit::Second).unwrap().to_string(), "result": "Succeeded"},
        })
    };
    env.vm_status("db-1", done("db-1")).await;
    env.vm_status("web-1", done("web-1")).await;
    let fp = env
        .wait("app", "drill recorded", |fp| {
            fp.status.as_ref().is_some_and(|s| s.last_drill.is_some())
        })
        .await;
    let rec = fp.status.as_ref().unwrap().last_drill.clone().unwrap();
    assert_eq!(rec.job, drill.name);
    assert_eq!(rec.result, "Succeeded");
    assert!(rec.time.is_some());
    assert_eq!(newest_job(&fp).unwrap().state, JobState::Succeeded);
    // The VMs never moved.
    for vm in ["db-1", "web-1"] {
        let r = env.rvms.get(vm).await.unwrap();
        assert_eq!(r.status.unwrap().active_site.as_deref(), Some("primary"));
    }
}

/// Many VMs in five groups, the test moving each VM the moment the plan releases it (as an
/// instant ReplicatedVM controller would). Proves the order at scale: no VM of a group is
/// released before every VM of the groups before it runs at the target. Prints how long the
/// plan took and its overhead per group (from the last VM of a group arriving to the next
/// group's release, as seen by polling); nothing asserts on those figures.
/// `TWINSITE_PLAN_SCALE_VMS` sets the number of VMs (default 100).
#[tokio::test]
async fn a_plan_of_many_vms_moves_group_after_group() {
    use futures::StreamExt;
    use std::collections::{BTreeMap, HashSet};

    let n: usize = std::env::var("TWINSITE_PLAN_SCALE_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    const GROUPS: usize = 5;
    let env = Env::new("scale").await;
    let name = |i: usize| format!("vm-{i:04}");
    let group_of = |i: usize| i * GROUPS / n;
    let mut yaml = String::new();
    for i in 0..n {
        yaml.push_str(&format!(
            "---\napiVersion: twinsite.io/v1alpha1\nkind: ReplicatedVM\nmetadata:\n  name: {}\n  \
             labels: {{group: g{}}}\nspec:\n  primarySite: primary\n  recoverySite: secondary\n",
            name(i),
            group_of(i)
        ));
    }
    env.apply(&yaml);
    let env = &env;
    futures::stream::iter(0..n)
        .map(|i| async move {
            env.vm_status(&name(i), json!({"activeSite": "primary"}))
                .await
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let mut groups = String::from("  groups:\n");
    for g in 0..GROUPS {
        groups.push_str(&format!(
            "  - name: g{g}\n    selector: {{matchLabels: {{group: g{g}}}}}\n"
        ));
    }
    let start = Instant::now();
    env.apply(&plan_yaml("big", &groups));

    let group_index: BTreeMap<String, usize> = (0..n).map(|i| (name(i), group_of(i))).collect();
    let mut moved: HashSet<String> = HashSet::new();
    let mut first_release: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut last_move: BTreeMap<usize, Duration> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let fp = env.plan("big").await;
        if phase(&fp) == "Completed" {
            break;
        }
        assert!(Instant::now() < deadline, "the plan did not complete");
        let released: Vec<String> = fp
            .status
            .iter()
            .flat_map(|s| &s.groups)
            .flat_map(|g| &g.vms)
            .filter(|v| v.state == planner::VM_RELEASED && !moved.contains(&v.name))
            .map(|v| v.name.clone())
            .collect();
        for vm in &released {
            let g = group_index[vm];
            first_release.entry(g).or_insert_with(|| start.elapsed());
            for (other, og) in &group_index {
                assert!(
                    *og >= g || moved.contains(other),
                    "{vm} (group {g}) released before {other} (group {og}) arrived"
                );
            }
        }
        futures::stream::iter(released.iter().cloned())
            .map(|vm| async move {
                env.vm_moved(&vm, "secondary", "Succeeded").await;
                vm
            })
            .buffer_unordered(16)
            .for_each(|vm| {
                last_move.insert(group_index[&vm], start.elapsed());
                moved.insert(vm);
                async {}
            })
            .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = start.elapsed();
    assert_eq!(moved.len(), n, "every VM was released once");
    let fp = env.plan("big").await;
    assert_eq!(summary(&fp), format!("{GROUPS}/{GROUPS}"));
    eprintln!("plan of {n} VMs in {GROUPS} groups (test moving VMs itself): {total:?}");
    for g in 1..GROUPS {
        if let (Some(done), Some(next)) = (last_move.get(&(g - 1)), first_release.get(&g)) {
            eprintln!(
                "  group g{} released {:?} after the last VM of g{} arrived",
                g,
                next.saturating_sub(*done),
                g - 1
            );
        }
    }
}

#[tokio::test]
async fn a_restarted_controller_resumes_the_plan_from_its_status() {
    let mut env = Env::new("restart").await;
    env.vm("db-1", "", "").await;
    env.vm("web-1", "", "").await;
    env.apply(&plan_yaml(
        "app",
        "  groups:\n  - name: db\n    vms: [db-1]\n  - name: web\n    vms: [web-1]\n",
    ));
    let fp = env
        .wait("app", "db released", |fp| {
            vm_state(fp, "db-1") == planner::VM_RELEASED
        })
        .await;
    let job = newest_job(&fp).unwrap().name.clone();
    env._ctrl.0.abort();
    // The VM arrives while no controller runs.
    env.vm_moved("db-1", "secondary", "Succeeded").await;
    env.restart_controller().await;
    let fp = env
        .wait("app", "web released after the restart", |fp| {
            vm_state(fp, "web-1") == planner::VM_RELEASED
        })
        .await;
    let jobs = &fp.status.as_ref().unwrap().jobs;
    assert_eq!(jobs.len(), 1, "the same job goes on");
    assert_eq!(jobs[0].name, job);
}

#[tokio::test]
async fn a_webhook_that_does_not_answer_in_time_fails() {
    let env = Env::new("hookslow").await;
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            open.push(sock);
        }
    });
    struct Abort(JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _silent = Abort(silent);
    env.vm("db-1", "", "").await;
    env.apply(&plan_yaml(
        "app",
        &format!(
            "  groups:\n  - name: db\n    vms: [db-1]\n    preActions:\n    - name: check\n      \
             webhook: {{url: \"http://{addr}/hook\", timeoutSeconds: 1}}\n"
        ),
    ));
    let fp = env
        .wait("app", "the plan failed", |fp| phase(fp) == "Failed")
        .await;
    let msg = step(&fp, "pre:db/check")
        .message
        .clone()
        .unwrap_or_default();
    assert!(msg.contains("no answer within 1s"), "{msg}");
    assert_eq!(vm_state(&fp, "db-1"), planner::VM_PENDING);
}

/// A plan with one pre-action webhook to `url` in group db (VM db-1).
fn pre_hook_plan(url: &str) -> String {
    plan_yaml(
        "app",
        &format!(
            "  groups:\n  - name: db\n    vms: [db-1]\n    preActions:\n    - name: check\n      \
             webhook: {{url: \"{url}\", timeoutSeconds: 10}}\n"
        ),
    )
}

/// Messages of the Events published for plan `name`.
async fn event_messages(env: &Env, name: &str) -> Vec<String> {
    env.events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.note)
        .collect()
}

#[tokio::test]
async fn a_signed_webhook_carries_an_hmac_the_receiver_verifies() {
    let env = Env::with_settings("hooksigned", |ns| webhook::Settings {
        allowed_hosts: webhook::AllowedHosts::new(&["127.0.0.1"]),
        signing_secret: Some(webhook::SigningSecretRef {
            namespace: ns.to_string(),
            name: "hook-key".into(),
            key: "key".into(),
        }),
    })
    .await;
    let hook = hook(204).await;
    env.vm("db-1", "", "").await;
    env.apply(&pre_hook_plan(&hook.url));

    // The key's Secret does not exist yet: the call is not made unsigned, the plan stops.
    let fp = env
        .wait("app", "the plan failed", |fp| phase(fp) == "Failed")
        .await;
    let msg = step(&fp, "pre:db/check")
        .message
        .clone()
        .unwrap_or_default();
    assert!(msg.contains("signing key cannot be read"), "{msg}");
    assert!(msg.contains("hook-key"), "{msg}");
    assert!(hook.raw.lock().unwrap().is_empty(), "called unsigned");

    // With the key in place, a retry calls the hook with a signature over the exact body.
    let key = b"a key only the controller and the receiver know";
    env.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: hook-key\nstringData:\n  key: \"{}\"\n",
        String::from_utf8_lossy(key)
    ));
    let failed = newest_job(&fp).unwrap().name.clone();
    env.kubectl(&[
        "annotate",
        "fp",
        "app",
        &format!("twinsite.io/retry={failed}"),
    ]);
    let fp = env
        .wait("app", "db released after the signed call", |fp| {
            vm_state(fp, "db-1") == planner::VM_RELEASED
        })
        .await;
    assert_eq!(step(&fp, "pre:db/check").state, StepState::Succeeded);
    let raw = hook.raw.lock().unwrap().clone();
    assert_eq!(raw.len(), 1);
    let (body, sig) = &raw[0];
    let sig = sig.as_deref().expect("no X-Twinsite-Signature header");
    let mac = hex::decode(sig.strip_prefix("sha256=").expect("sha256= prefix")).unwrap();
    let verify = |k: &[u8], body: &[u8]| {
        ring::hmac::verify(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k),
            body,
            &mac,
        )
        .is_ok()
    };
    assert!(verify(key, body), "the signature does not verify");
    assert!(!verify(b"another key", body), "another key verifies");
    let mut changed = body.clone();
    changed.push(b' ');
    assert!(!verify(key, &changed), "a changed body verifies");
    let b: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(b["plan"], "app");
    assert!(
        b["sentAt"]
            .as_str()
            .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok())
    );
}

#[tokio::test]
async fn a_host_off_the_allow_list_is_refused_and_not_called() {
    let env = Env::with_settings("hookallow", |_| webhook::Settings {
        allowed_hosts: webhook::AllowedHosts::new(&["hooks.example.com", "*.ops.example.com"]),
        signing_secret: None,
    })
    .await;
    let hook = hook(204).await;
    env.vm("db-1", "", "").await;
    env.apply(&pre_hook_plan(&hook.url));
    let fp = env
        .wait("app", "the plan failed", |fp| phase(fp) == "Failed")
        .await;
    let msg = step(&fp, "pre:db/check")
        .message
        .clone()
        .unwrap_or_default();
    assert!(
        msg.contains("webhook host 127.0.0.1 is not allowed")
            && msg.contains("--webhook-allowed-hosts"),
        "{msg}"
    );
    assert!(hook.raw.lock().unwrap().is_empty(), "the hook was called");
    assert_eq!(vm_state(&fp, "db-1"), planner::VM_PENDING);
    let events = event_messages(&env, "app").await;
    assert!(
        events
            .iter()
            .any(|m| m.contains("webhook host 127.0.0.1 is not allowed")),
        "{events:?}"
    );
}

/// A controller started without an allow-list calls no webhook: the action fails with a
/// message that says how to turn webhooks on, and the receiver hears nothing.
#[tokio::test]
async fn webhooks_are_off_until_the_allow_list_names_a_host() {
    let env = Env::with_settings("hookoff", |_| webhook::Settings::default()).await;
    let hook = hook(204).await;
    env.vm("db-1", "", "").await;
    env.apply(&pre_hook_plan(&hook.url));
    let fp = env
        .wait("app", "the plan failed", |fp| phase(fp) == "Failed")
        .await;
    let msg = step(&fp, "pre:db/check")
        .message
        .clone()
        .unwrap_or_default();
    assert!(
        msg.contains("webhooks are off") && msg.contains("--webhook-allowed-hosts"),
        "{msg}"
    );
    assert!(hook.raw.lock().unwrap().is_empty(), "the hook was called");
    assert_eq!(vm_state(&fp, "db-1"), planner::VM_PENDING);
}

/// A name on the allow-list that resolves to this machine (as a rebound DNS name would) is not
/// called: only an address the allow-list names itself reaches loopback.
#[tokio::test]
async fn an_allowed_name_that_resolves_to_loopback_is_not_called() {
    let env = Env::with_settings("hookrebind", |_| webhook::Settings {
        allowed_hosts: webhook::AllowedHosts::new(&["localhost"]),
        signing_secret: None,
    })
    .await;
    let hook = hook(204).await;
    env.vm("db-1", "", "").await;
    env.apply(&pre_hook_plan(&hook.url.replace("127.0.0.1", "localhost")));
    let fp = env
        .wait("app", "the plan failed", |fp| phase(fp) == "Failed")
        .await;
    let msg = step(&fp, "pre:db/check")
        .message
        .clone()
        .unwrap_or_default();
    assert!(
        msg.contains("webhook host localhost resolves to") && msg.contains("may not reach"),
        "{msg}"
    );
    assert!(hook.raw.lock().unwrap().is_empty(), "the hook was called");
}

#[tokio::test]
async fn a_huge_answer_is_not_read_and_the_url_query_is_never_shown() {
    use std::sync::atomic::{AtomicBool, AtomicU64};
    const TOTAL: u64 = 256 << 20;
    const CHUNK: usize = 64 << 10;
    /// Counts what the receiver's body stream handed to the connection; set when dropped.
    struct Counted {
        sent: Arc<AtomicU64>,
        dropped: Arc<AtomicBool>,
    }
    impl Drop for Counted {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }
    let sent = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let app = {
        let (sent, dropped, calls) = (sent.clone(), dropped.clone(), calls.clone());
        axum::Router::new().route(
            "/hook",
            post(move || {
                let (sent, dropped) = (sent.clone(), dropped.clone());
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    let c = Counted { sent, dropped };
                    let chunk = bytes::Bytes::from(vec![b'x'; CHUNK]);
                    let stream = futures::stream::unfold(c, move |c| {
                        let chunk = chunk.clone();
                        async move {
                            let n = c.sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
                            (n < TOTAL).then_some((Ok::<_, std::io::Error>(chunk), c))
                        }
                    });
                    let body = b"refused: ".to_vec();
                    (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        axum::body::Body::from_stream(futures::StreamExt::chain(
                            futures::stream::once(async move {
                                Ok::<_, std::io::Error>(bytes::Bytes::from(body))
                            }),
                            stream,
                        )),
                    )
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    struct Abort(JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _server = Abort(server);

    let env = Env::new("hookhuge").await;
    env.vm("db-1", "", "").await;
    env.apply(&pre_hook_plan(&format!(
        "http://{addr}/hook?token=s3cr3t-in-query"
    )));
    let fp = env
        .wait("app", "the plan failed", |fp| phase(fp) == "Failed")
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let msg = step(&fp, "pre:db/check")
        .message
        .clone()
        .unwrap_or_default();
    assert!(
        msg.contains("HTTP 500") && msg.contains("refused: xxx"),
        "{msg}"
    );
    assert!(msg.chars().count() < 400, "{msg}");
    // The controller dropped the answer: the receiver's stream ends long before its end.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dropped.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the answer is still being read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n = sent.load(Ordering::SeqCst);
    assert!(
        n < 32 << 20,
        "{n} bytes of a {TOTAL}-byte answer were taken"
    );

    // The URL's query (a token) is in no status message and no Event.
    let status = serde_json::to_string(&fp.status).unwrap();
    assert!(!status.contains("s3cr3t"), "{status}");
    assert!(status.contains(&format!("http://{addr}/hook")), "{status}");
    let events = event_messages(&env, "app").await;
    assert!(!events.is_empty());
    assert!(events.iter().all(|m| !m.contains("s3cr3t")), "{events:?}");
}

#[tokio::test]
async fn a_webhook_url_with_credentials_is_refused_by_the_api_server() {
    let env = Env::new("hookcreds").await;
    let mut child = env
        .cp
        .kubectl()
        .args(["apply", "-n", &env.ns, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(pre_hook_plan("https://ops:s3cr3t-pass@hooks.example.com/warm").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted");
    assert!(
        err.contains("spec.groups[0].preActions[0].webhook.url")
            && err.contains("webhook.url must not carry credentials"),
        "{err}"
    );
    assert!(
        !err.contains("s3cr3t-pass"),
        "the error repeats the password: {err}"
    );
    assert!(env.plans.get_opt("app").await.unwrap().is_none());
}

#[tokio::test]
async fn an_https_webhook_is_checked_against_its_ca_bundle() {
    // An https receiver whose certificate a CA of the test's own signed.
    let dir = tempfile::tempdir().unwrap();
    let ca = envtest::agent_certificates(dir.path(), &["hook"]).unwrap();
    std::fs::create_dir(dir.path().join("other")).unwrap();
    let other_ca = envtest::agent_certificates(&dir.path().join("other"), &[]).unwrap();
    twinsite::init_crypto();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(
        dir.path().join("hook.crt"),
        dir.path().join("hook.key"),
    )
    .await
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let app = {
        let calls = calls.clone();
        axum::Router::new().route(
            "/hook",
            post(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { StatusCode::NO_CONTENT }
            }),
        )
    };
    let port = envtest::free_port().unwrap();
    let server = tokio::spawn(async move {
        axum_server::bind_rustls(std::net::SocketAddr::from(([127, 0, 0, 1], port)), tls)
            .serve(app.into_make_service())
            .await
            .unwrap();
    });
    struct Abort(JoinHandle<()>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _server = Abort(server);

    let env = Env::new("hooktls").await;
    env.vm("db-1", "", "").await;
    let url = format!("https://127.0.0.1:{port}/hook");
    // Unplanned: a failed action is recorded and the plan goes on to the next one.
    let plan = json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": "app"},
        "spec": {"targetSite": "secondary", "failover": {"type": "Unplanned"}, "groups": [{
            "name": "db", "vms": ["db-1"], "preActions": [
                {"name": "system-roots", "webhook": {"url": url, "timeoutSeconds": 10}},
                {"name": "other-ca", "webhook": {"url": url, "timeoutSeconds": 10, "caBundle": other_ca}},
                {"name": "its-ca", "webhook": {"url": url, "timeoutSeconds": 10, "caBundle": ca}},
            ]}]},
    });
    env.apply(&plan.to_string());
    let fp = env
        .wait("app", "db released", |fp| {
            vm_state(fp, "db-1") == planner::VM_RELEASED
        })
        .await;
    for name in ["pre:db/system-roots", "pre:db/other-ca"] {
        let s = step(&fp, name);
        assert_eq!(s.state, StepState::Failed, "{name}: {:?}", s.message);
    }
    let s = step(&fp, "pre:db/its-ca");
    assert_eq!(s.state, StepState::Succeeded, "{:?}", s.message);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the trusted call got through"
    );
}
