//! The ReplicatedVM reconciler: observe (the shared site listings), plan (the pure planner),
//! act (one step), write status; repeat until the planner has nothing to do right now.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event as Finalizer};
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;

use super::planner::{self, Input, Plan, StepName, Update};
use super::{deletion, exec, tenancy};
use crate::api::{
    COMMIT_ANNOTATION, DELETE_LAST_COPY_ANNOTATION, FailoverPlan, RETRY_ANNOTATION, ReplicatedVM,
    ReplicatedVMSpec, ReplicatedVMStatus,
};
use crate::controller::error::Error;
use crate::controller::failover_plan::{self, Hold};
use crate::controller::metrics::{JobKind, KindLabels, Metrics, VmLabels};
use crate::controller::observe::SiteView;
use crate::controller::sites::Sites;
use crate::controller::writes;
use crate::site::SiteError;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub sites: Arc<Sites>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Site listing period.
    pub poll: Duration,
    /// How long a Site may be not Ready before it is Stalled.
    pub site_stall: Duration,
    /// When this process began leading.
    pub started: std::time::Instant,
    /// Status this process wrote last, per ReplicatedVM.
    pub written: Written,
    /// Power offs that failed lately, per ReplicatedVM (backoff).
    pub fences: Fences,
    /// The FailoverPlans, from the watch cache: a reconcile reads them here instead of
    /// listing them.
    pub plans: Store<FailoverPlan>,
    /// The ReplicatedVMs, from the reconciler's watch cache: a plan's cut reads its members'
    /// VM names here (not from a list per VM), and tenancy which namespace holds a site VM.
    pub rvms: Store<ReplicatedVM>,
    /// The Site objects, from the Site reconciler's watch cache: a site whose object is gone
    /// leaves the registry.
    pub site_objects: Store<crate::api::Site>,
    /// The only namespace whose Secrets are read.
    pub secret_namespace: String,
}

pub const FINALIZER: &str = "twinsite.io/cleanup";
/// Plans acted on in one reconcile before handing the VM back to the queue (fairness).
const MAX_ACTIONS: usize = 24;

/// The last status this process wrote per object (by uid), with the resourceVersion the API
/// server gave it.
#[derive(Default)]
pub struct Written(std::sync::Mutex<std::collections::HashMap<String, (u64, ReplicatedVMStatus)>>);

impl Written {
    fn get(&self, uid: &str) -> Option<(u64, ReplicatedVMStatus)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(uid).cloned()
    }

    fn put(&self, uid: &str, rv: u64, st: &ReplicatedVMStatus) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(uid.to_string(), (rv, st.clone()));
    }

    fn forget(&self, uid: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(uid);
    }
}

/// Power offs (fences) that failed in a row, per object (by uid), and when the next may be
/// tried ([`planner::fence_backoff`]). Kept in memory: a restarted controller tries once more
/// at once and backs off again from there.
#[derive(Default)]
pub struct Fences(std::sync::Mutex<std::collections::HashMap<String, (u32, Timestamp)>>);

impl Fences {
    fn not_before(&self, uid: &str) -> Option<Timestamp> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(uid).map(|(_, t)| *t)
    }

    /// Records the outcome of a power off; after a failure, how long to back off.
    fn record(&self, uid: &str, outcome: &planner::Outcome) -> Option<Duration> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(outcome, planner::Outcome::Succeeded { .. }) {
            m.remove(uid);
            return None;
        }
        let failures = m.get(uid).map_or(0, |(n, _)| *n).saturating_add(1);
        let wait = planner::fence_backoff(failures);
        let next = now()
            .checked_add(jiff::SignedDuration::try_from(wait).unwrap_or_default())
            .unwrap_or_else(|_| now());
        m.insert(uid.to_string(), (failures, next));
        Some(wait)
    }

    fn forget(&self, uid: &str) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(uid);
    }
}

/// Seconds-precision now: status times are whole seconds, so comparisons stay exact.
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now())
}

pub async fn reconcile(rvm: Arc<ReplicatedVM>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = rvm.namespace().unwrap_or_default();
    let api: Api<ReplicatedVM> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer::finalizer(&api, FINALIZER, rvm, |ev| async {
        match ev {
            Finalizer::Apply(rvm) => apply(&rvm, &ctx, &api, false).await,
            Finalizer::Cleanup(rvm) => cleanup(&rvm, &ctx, &api).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(rvm: Arc<ReplicatedVM>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Some(retry) = deletion_waits(err) {
        debug!(rvm = %rvm.name_any(), "{err}");
        return Action::requeue(retry);
    }
    let conflict = is_conflict(err);
    let kind = if conflict { "conflict" } else { "other" };
    ctx.metrics
        .reconcile_errors
        .get_or_create(&KindLabels {
            kind: format!("ReplicatedVM/{kind}"),
        })
        .inc();
    if conflict {
        debug!(rvm = %rvm.name_any(), "status moved on meanwhile; planning again");
        Action::requeue(Duration::from_millis(200))
    } else {
        warn!(rvm = %rvm.name_any(), error = %err, "reconcile failed");
        Action::requeue(Duration::from_secs(5))
    }
}

/// A deletion that cannot finish yet (not a failure), however deep it is wrapped: when to look
/// again.
fn deletion_waits(err: &Error) -> Option<Duration> {
    use kube::runtime::finalizer::Error as F;
    match err {
        Error::DeletionWaits { retry, .. } => Some(*retry),
        Error::Finalizer(f) => match f.as_ref() {
            F::CleanupFailed(e) => deletion_waits(e),
            _ => None,
        },
        _ => None,
    }
}

/// A write refused because the object moved on (409), however deep it is wrapped.
fn is_conflict(err: &Error) -> bool {
    use kube::runtime::finalizer::Error as F;
    match err {
        Error::Kube(kube::Error::Api(s)) => s.code == 409,
        Error::Finalizer(f) => match f.as_ref() {
            F::ApplyFailed(e) | F::CleanupFailed(e) => is_conflict(e),
            F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s)) => {
                s.code == 409
            }
            _ => false,
        },
        _ => false,
    }
}

/// Plans and acts until there is nothing to do right now. `deleting`: the object is being
/// deleted, so the running job is driven to its end and nothing new starts.
async fn apply(
    rvm: &ReplicatedVM,
    ctx: &Context,
    api: &Api<ReplicatedVM>,
    deleting: bool,
) -> Result<Action, Error> {
    let name = rvm.name_any();
    let ns = rvm.namespace().unwrap_or_default();
    let uid = rvm.uid().unwrap_or_else(|| name.clone());
    let vm_name = rvm.vm_name();
    let mut status = rvm.status.clone().unwrap_or_default();
    let mut rv = rvm.resource_version();
    // The watch cache may not have our own last write yet (its event is in flight): plan from
    // what we wrote rather than from an older picture, which would only end in a conflict.
    if let Some((wrv, wst)) = ctx.written.get(&uid)
        && let Some(orv) = rv.as_deref().and_then(|v| v.parse::<u64>().ok())
        && orv < wrv
    {
        status = wst;
        rv = Some(wrv.to_string());
    }
    // A VM of another namespace, or a Site that does not allow this namespace: nothing is
    // done at the sites, the status says why.
    if let Some((reason, message)) = tenancy_refusal(rvm, ctx).await? {
        let new = tenancy::refused(&status, reason, &message, rvm.meta().generation, now());
        let w =
            writes::write_status::<_, _, Error>(api, &name, &status, &new, rv.as_deref()).await?;
        if w.written {
            warn!(rvm = %name, namespace = %ns, "{message}");
            let note = writes::Note {
                warning: true,
                action: "Refuse",
                subject: format!("tenancy-{vm_name}"),
                reason,
                message,
            };
            writes::publish(&ctx.recorder, &rvm.object_ref(&()), &[note]).await;
        }
        return Ok(Action::requeue(ctx.poll));
    }
    // A FailoverPlan that selects the VM decides where it should be and when.
    // Until the cache has its first picture (a VM would look free of every plan), the
    // namespace's plans are listed.
    let plans = if failover_plan::cache_ready(&ctx.plans).await {
        failover_plan::in_namespace(&ctx.plans, &ns)
    } else {
        warn!(rvm = %name, "FailoverPlan cache not ready; listing the namespace");
        Api::<FailoverPlan>::namespaced(ctx.client.clone(), &ns)
            .list(&Default::default())
            .await?
            .items
    };
    let hold = failover_plan::hold(rvm, &plans);
    let effective = plan_spec(rvm, &status, &hold);
    let spec = &effective;
    let (conflict, cut, plan_started) = match &hold {
        Hold::Conflict { reason, message } => (
            Some(planner::Conflict {
                reason: reason.to_string(),
                message: message.clone(),
            }),
            None,
            None,
        ),
        Hold::Failover { cut, started, .. } => (None, cut.clone(), *started),
        _ => (None, None, None),
    };
    let commit = rvm.annotations().get(COMMIT_ANNOTATION).cloned();
    let retry = rvm.annotations().get(RETRY_ANNOTATION).cloned();
    let labels = VmLabels {
        namespace: ns.clone(),
        name: name.clone(),
    };

    let mut fresh = false;
    for _ in 0..MAX_ACTIONS {
        let primary = ctx.sites.view(&spec.primary_site, &vm_name);
        let recovery = ctx.sites.view(&spec.recovery_site, &vm_name);
        if (primary == SiteView::Unknown || recovery == SiteView::Unknown)
            && ctx.started.elapsed() < ctx.poll * 2 + Duration::from_secs(10)
        {
            // Just started: the sites have not been listed yet. Planning now would report
            // them unreachable (and fail optional steps) for nothing.
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let input = Input {
            name: &name,
            uid: &uid,
            generation: rvm.meta().generation,
            vm_name: &vm_name,
            spec,
            commit_annotation: commit.as_deref(),
            status: &status,
            primary: &primary,
            recovery: &recovery,
            now: now(),
            poll: ctx.poll,
            conflict: conflict.as_ref(),
            cut: cut.as_ref(),
            retry: retry.as_deref(),
            plan_started,
            deleting,
            fence_not_before: ctx.fences.not_before(&uid),
        };
        let update = match planner::plan(&input) {
            Plan::Idle(d) => {
                record_gauges(ctx, &input, &labels);
                return Ok(Action::requeue(d));
            }
            Plan::Write(u) => u,
            Plan::Execute(mut call) => {
                info!(rvm = %name, job = %call.job_name, step = call.step_name.as_str(), op = %call.op_id, "step starts");
                if call.step_name == StepName::ConsistentCut {
                    // An empty cache (before its first listing) would name each member by
                    // its object name: the cut waits for it instead.
                    if !failover_plan::cache_ready(&ctx.rvms).await {
                        return Ok(Action::requeue(Duration::from_secs(1)));
                    }
                    call.cut_vms = vm_names(&ctx.rvms, &ns, &call.cut_vms);
                }
                let outcome = exec::run(&ctx.sites.tenant(&ns), &call).await;
                if call.step_name == StepName::FenceSource {
                    ctx.fences.record(&uid, &outcome);
                }
                let input = Input {
                    now: now(),
                    ..input
                };
                match planner::record_outcome(&input, &call, outcome) {
                    Plan::Write(u) => u,
                    Plan::Idle(d) => return Ok(Action::requeue(d)),
                    _ => return Ok(Action::requeue(Duration::ZERO)),
                }
            }
            Plan::Fence(_) if !fresh => {
                // Powering a VM off is the one action never taken on a cached picture: read
                // the object from the API server and plan again.
                let cur = api.get_status(&name).await?;
                status = cur.status.clone().unwrap_or_default();
                rv = cur.resource_version();
                fresh = true;
                continue;
            }
            Plan::Settings(c) => {
                info!(rvm = %name, site = %c.site, op = %c.op_id, "sending replication settings");
                let outcome = exec::settings(&ctx.sites.tenant(&ns), &c).await;
                let ok = matches!(outcome, planner::Outcome::Succeeded { .. });
                if ok {
                    // The next plan needs a listing that shows the new settings.
                    ctx.sites.refresh(&c.site, Some(Timestamp::now())).await;
                }
                let input = Input {
                    now: now(),
                    ..input
                };
                match planner::record_settings(&input, &c, outcome) {
                    Plan::Write(u) if ok => u,
                    Plan::Write(u) => {
                        // Tried again at the next poll, not at once.
                        writes::publish(&ctx.recorder, &rvm.object_ref(&()), &u.events).await;
                        return Ok(Action::requeue(ctx.poll));
                    }
                    _ => return Ok(Action::requeue(ctx.poll)),
                }
            }
            Plan::Fence(f) => {
                info!(rvm = %name, site = %f.site, "VM runs where it must not; powering it off");
                let outcome = exec::fence(&ctx.sites.tenant(&ns), &f).await;
                if let Some(wait) = ctx.fences.record(&uid, &outcome) {
                    warn!(rvm = %name, site = %f.site, "power off failed; trying again in {} s", wait.as_secs());
                }
                let input = Input {
                    now: now(),
                    ..input
                };
                match planner::record_fence(&input, &f, outcome) {
                    Plan::Write(u) => u,
                    _ => return Ok(Action::requeue(ctx.poll)),
                }
            }
        };
        let Update {
            status: new,
            events,
            finished,
        } = *update;
        let w =
            writes::write_status::<_, _, Error>(api, &name, &status, &new, rv.as_deref()).await?;
        if w.written {
            ctx.metrics
                .status_writes
                .get_or_create(&KindLabels {
                    kind: "ReplicatedVM".into(),
                })
                .inc();
        }
        rv = w.resource_version;
        if let Some(v) = rv.as_deref().and_then(|v| v.parse::<u64>().ok()) {
            ctx.written.put(&uid, v, &new);
        }
        writes::publish(&ctx.recorder, &rvm.object_ref(&()), &events).await;
        for (t, s) in &finished {
            ctx.metrics
                .jobs
                .get_or_create(&JobKind {
                    r#type: planner::job_type_str(*t).to_string(),
                    outcome: format!("{s:?}"),
                })
                .inc();
        }
        if !finished.is_empty() {
            // The next decision needs a picture newer than the job that just ended.
            let t = Some(Timestamp::now());
            let _ = tokio::join!(
                ctx.sites.refresh(&spec.primary_site, t),
                ctx.sites.refresh(&spec.recovery_site, t)
            );
        }
        status = new;
    }
    Ok(Action::requeue(Duration::ZERO))
}

/// Why tenancy refuses `rvm`, if it does ([`tenancy::refusal`]): from the watch cache of every
/// ReplicatedVM, or a listing until the cache has its first picture.
async fn tenancy_refusal(
    rvm: &ReplicatedVM,
    ctx: &Context,
) -> Result<Option<(&'static str, String)>, Error> {
    let all: Vec<tenancy::Claim> = if failover_plan::cache_ready(&ctx.rvms).await {
        ctx.rvms
            .state()
            .iter()
            .map(|r| tenancy::Claim::of(r))
            .collect()
    } else {
        warn!(rvm = %rvm.name_any(), "ReplicatedVM cache not ready; listing them");
        Api::<ReplicatedVM>::all(ctx.client.clone())
            .list(&Default::default())
            .await?
            .items
            .iter()
            .map(tenancy::Claim::of)
            .collect()
    };
    let vm = rvm.vm_name();
    Ok(tenancy::refusal(
        &tenancy::Claim::of(rvm),
        &all,
        |s| ctx.sites.allowed_namespaces(s),
        |s| ctx.sites.owner(s, &vm),
    ))
}

/// The names of the VMs at the sites (`spec.vmName`) of the ReplicatedVMs `names` of namespace
/// `ns`, from the watch cache; a name without a ReplicatedVM stands for itself.
fn vm_names(rvms: &Store<ReplicatedVM>, ns: &str, names: &[String]) -> Vec<String> {
    names
        .iter()
        .map(|n| {
            rvms.get(&kube::runtime::reflector::ObjectRef::new(n).within(ns))
                .map_or_else(|| n.clone(), |r| r.vm_name())
        })
        .collect()
}

/// The spec the planner follows: the VM's own, or the one its FailoverPlan gives it. A VM that a
/// plan holds but has not released stays where it runs, drill copy included.
fn plan_spec(rvm: &ReplicatedVM, status: &ReplicatedVMStatus, hold: &Hold) -> ReplicatedVMSpec {
    let mut spec = rvm.spec.clone();
    let here = status
        .active_site
        .clone()
        .or_else(|| rvm.spec.active_site.clone());
    let drilling = status.test_failover.is_some();
    match hold {
        Hold::Free => {}
        // A conflict holds the VM where it runs too (and shows as condition Conflict).
        Hold::Held { .. } | Hold::Conflict { .. } => {
            spec.active_site = here;
            spec.test_failover.enabled = drilling;
        }
        Hold::Failover {
            target, failover, ..
        } => {
            spec.active_site = Some(target.clone());
            // The VM's own step deadline holds unless the plan sets one.
            let own = spec.failover.step_timeout_seconds;
            spec.failover = failover.clone();
            spec.failover.step_timeout_seconds = failover.step_timeout_seconds.or(own);
            spec.test_failover.enabled = drilling;
        }
        Hold::Drill { network, .. } => {
            spec.active_site = here;
            spec.test_failover.enabled = true;
            spec.test_failover.network = network.clone();
        }
        Hold::DrillCleanup { .. } => {
            spec.active_site = here;
            spec.test_failover.enabled = false;
        }
    }
    spec
}

fn record_gauges(ctx: &Context, input: &Input, labels: &VmLabels) {
    if let Some(rpo) = planner::live_rpo(input, input.status) {
        ctx.metrics.rpo_seconds.get_or_create(labels).set(rpo);
    }
    if let Some(r) = &input.status.replication
        && let Some(src) = &r.source_site
        && let Some(b) = ctx.sites.bytes_sent(src, input.vm_name)
    {
        ctx.metrics
            .bytes_replicated
            .get_or_create(labels)
            .set(i64::try_from(b).unwrap_or(i64::MAX));
    }
}

/// Deleting a ReplicatedVM stops replication and removes the replica and any drill copy. The
/// VM where it runs is never touched: only replication is stopped there. A job that runs is
/// never cut off: the deletion drives it to its end first (starting nothing after it). A
/// replica that is the only copy of a VM that runs nowhere is kept until the
/// `twinsite.io/delete-last-copy: "true"` annotation asks for its deletion.
async fn cleanup(
    rvm: &ReplicatedVM,
    ctx: &Context,
    api: &Api<ReplicatedVM>,
) -> Result<Action, Error> {
    let name = rvm.name_any();
    let ns = rvm.namespace().unwrap_or_default();
    let tenant = ctx.sites.tenant(&ns);
    let uid = rvm.uid().unwrap_or_else(|| name.clone());
    let vm = rvm.vm_name();
    // A refused ReplicatedVM never touched a site: its deletion does not either (the VM and
    // its replica are another namespace's, or at a Site that does not allow this one).
    if let Some((_, message)) = tenancy_refusal(rvm, ctx).await? {
        info!(rvm = %name, "deleted without any site call: {message}");
        ctx.written.forget(&uid);
        ctx.fences.forget(&uid);
        return Ok(Action::await_change());
    }
    let mut status = rvm.status.clone().unwrap_or_default();
    let mut rv = rvm.resource_version();
    if let Some(job) = deletion::running_job(&status) {
        info!(rvm = %name, job = %job.name, "deletion waits for the running job to end");
        apply(rvm, ctx, api, true).await?;
        let cur = api.get_status(&name).await?;
        status = cur.status.clone().unwrap_or_default();
        rv = cur.resource_version();
        if let Some(job) = deletion::running_job(&status) {
            // Not done: an Ok here would remove the finalizer.
            return Err(Error::DeletionWaits {
                reason: format!("job {} runs", job.name),
                retry: ctx.poll,
            });
        }
    }
    let spec = &rvm.spec;
    let active = status
        .active_site
        .clone()
        .unwrap_or_else(|| spec.primary_site.clone());
    let other = if active == spec.primary_site {
        spec.recovery_site.clone()
    } else {
        spec.primary_site.clone()
    };
    // A site whose Site object exists but whose listing has not been registered yet (the
    // controller just started) is waited for; a site whose Site object is gone is skipped.
    let sites_api: Api<crate::api::Site> = Api::all(ctx.client.clone());
    let mut gone = Vec::new();
    for site in [&active, &other] {
        match sites_api.get_opt(site).await? {
            Some(_) if !ctx.sites.known(site) => {
                return Err(Error::DeletionWaits {
                    reason: format!("site {site} is not registered yet"),
                    retry: ctx.poll,
                });
            }
            Some(_) => {}
            None => gone.push(site.clone()),
        }
    }
    // The only copy of a VM that runs nowhere is deleted only when asked for.
    let allowed = deletion::last_copy_allowed(
        rvm.annotations()
            .get(DELETE_LAST_COPY_ANNOTATION)
            .map(String::as_str),
    );
    if !allowed {
        let at_active = copy_at(ctx, &gone, &active, &vm).await?;
        let at_other = copy_at(ctx, &gone, &other, &vm).await?;
        if let Some(msg) =
            deletion::keep_last_copy(&vm, &active, at_active, &other, at_other, allowed)
        {
            let new = deletion::held(&status, &msg, rvm.meta().generation, now());
            let w = writes::write_status::<_, _, Error>(api, &name, &status, &new, rv.as_deref())
                .await?;
            if w.written {
                warn!(rvm = %name, site = %other, "{msg}");
                let note = writes::Note {
                    warning: true,
                    action: "Delete",
                    subject: format!("last-copy-{other}"),
                    reason: deletion::LAST_COPY,
                    message: msg,
                };
                writes::publish(&ctx.recorder, &rvm.object_ref(&()), &[note]).await;
            }
            return Err(Error::DeletionWaits {
                reason: format!("the replica at {other} is the only copy of VM {vm}"),
                retry: ctx.poll,
            });
        }
    }
    let ok = |r: Result<(), SiteError>| match r {
        Ok(()) | Err(SiteError::NotFound(_)) | Err(SiteError::Conflict(_)) => Ok(()),
        Err(e) => Err(Error::Site(e)),
    };
    for site in [&active, &other] {
        if let Some(p) = tenant.provider(site).filter(|_| !gone.contains(site)) {
            ok(
                p.stop_replication(&vm, &format!("{uid}-delete-stop-{site}"))
                    .await
                    .map(|_| ()),
            )?;
        }
    }
    if let Some(p) = tenant.provider(&other).filter(|_| !gone.contains(&other)) {
        if let Some(tf) = &status.test_failover {
            let p = tenant.provider(&tf.site).unwrap_or_else(|| p.clone());
            ok(p.test_failover_cleanup(&vm, &format!("{uid}-delete-drill"))
                .await
                .map(|_| ()))?;
        }
        match p.get_vm(&vm).await {
            Ok(v) if v.power == crate::site::Power::Running => {
                warn!(rvm = %name, site = %other, "VM runs at the replica site; left alone");
            }
            Ok(_) => ok(p.delete_vm(&vm, &format!("{uid}-delete-replica")).await)?,
            Err(e) => ok(Err(e))?,
        }
    }
    ctx.metrics.rpo_seconds.remove(&VmLabels {
        namespace: rvm.namespace().unwrap_or_default(),
        name: name.clone(),
    });
    ctx.written.forget(&uid);
    ctx.fences.forget(&uid);
    info!(rvm = %name, "replication stopped and replica removed");
    Ok(Action::await_change())
}

/// What `site` holds of VM `vm` for the deletion: a site without a Site object holds nothing
/// the controller can reach; a site that does not answer is an error (the deletion retries).
async fn copy_at(
    ctx: &Context,
    gone: &[String],
    site: &str,
    vm: &str,
) -> Result<deletion::Copy, Error> {
    let Some(p) = ctx
        .sites
        .provider(site)
        .filter(|_| !gone.iter().any(|g| g == site))
    else {
        return Ok(deletion::Copy::Absent);
    };
    match p.get_vm(vm).await {
        Ok(v) if v.power == crate::site::Power::Running => Ok(deletion::Copy::Running),
        Ok(_) => Ok(deletion::Copy::Off),
        Err(SiteError::NotFound(_)) => Ok(deletion::Copy::Absent),
        Err(e) => Err(Error::Site(e)),
    }
}
