//! The FailoverPlan reconciler: observe (the plans and ReplicatedVMs of the namespace), plan
//! (the pure planner), act (write status, or call a webhook and record it); repeat until the
//! planner has nothing to do right now.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::members::{self, now};
use super::planner::{self, Input};
use super::webhook::{self, Payload};
use crate::api::RETRY_ANNOTATION;
use crate::api::Site;
use crate::api::{APPROVE_ANNOTATION, FailoverPlan, ReplicatedVM};
use crate::controller::conditions::{Cond, READY, STALLED};
use crate::controller::rvm::tenancy;
use crate::controller::writes;

/// Actions taken in one reconcile before handing the plan back to the queue (fairness).
const MAX_ACTIONS: usize = 32;
/// The name plan Events are reported under.
const REPORTER: &str = "twinsite-failoverplan";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serializing status: {0}")]
    Json(#[from] serde_json::Error),
}

/// Shared by every reconcile of the plan controller.
pub struct Context {
    client: Client,
    recorder: Recorder,
    settings: webhook::Settings,
    /// Resolves when the controller shuts down: a webhook call in flight is abandoned (its
    /// step stays Running, and the next controller calls again).
    shutdown: Shared<BoxFuture<'static, ()>>,
    /// Consecutive failed reconciles per plan (by uid), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The plans and ReplicatedVMs, from watch caches: a reconcile reads them here instead of
    /// listing them.
    plans: Store<FailoverPlan>,
    rvms: Store<ReplicatedVM>,
}

impl Context {
    fn failed(&self, uid: &str) -> u32 {
        let mut m = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(uid.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn succeeded(&self, uid: &str) {
        let mut m = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        m.remove(uid);
    }
}

/// Runs the FailoverPlan controller until `shutdown` resolves (then waits for reconciles in
/// flight; webhook calls in flight are abandoned). It watches FailoverPlans and ReplicatedVMs
/// in every namespace: a change of a VM wakes every plan of its namespace, a change of a plan
/// wakes the other plans of its namespace (a conflict between two plans shows on both).
///
/// Run it beside the ReplicatedVM controller, under the same leader election.
pub async fn run(
    client: Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_with(client, None, webhook::Settings::default(), shutdown).await
}

/// [`run`] for the plans and ReplicatedVMs of one namespace only (an install scoped to a
/// namespace; tests, which give each case a namespace and a controller of its own).
pub async fn run_in_namespace(
    client: Client,
    namespace: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_with(
        client,
        Some(namespace),
        webhook::Settings::default(),
        shutdown,
    )
    .await
}

/// [`run`] (all namespaces) or [`run_in_namespace`] (one), with the controller's webhook
/// settings (allow-list, signing key).
pub async fn run_with(
    client: Client,
    namespace: Option<&str>,
    settings: webhook::Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let shutdown: Shared<BoxFuture<'static, ()>> = shutdown.boxed().shared();
    let (plans, rvms): (Api<FailoverPlan>, Api<ReplicatedVM>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let ctrl = Controller::new(plans.clone(), watcher::Config::default());
    let store = ctrl.store();
    let (rvm_store, rvm_writer) = reflector::store::<ReplicatedVM>();
    // Managed fields are most of an object's bytes and no plan reads them. The same stream
    // triggers the plans' reconciles, so a VM's change reaches the cache before the reconcile
    // it wakes reads it.
    let rvm_cache = watcher(rvms, watcher::Config::default())
        .default_backoff()
        .modify(|r| r.managed_fields_mut().clear())
        .reflect(rvm_writer)
        .touched_objects();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        settings,
        shutdown: shutdown.clone(),
        failures: Mutex::default(),
        client: client.clone(),
        plans: store.clone(),
        rvms: rvm_store,
    });
    let by_vm = store.clone();
    let by_plan = store;
    let run = ctrl
        .watches_stream(rvm_cache, move |rvm| {
            plans_of(&by_vm, rvm.namespace().as_deref(), None)
        })
        .watches(plans, watcher::Config::default(), move |fp| {
            plans_of(&by_plan, fp.namespace().as_deref(), Some(&fp.name_any()))
        })
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => debug!(plan = %obj.name, "reconciled"),
                Err(e) => debug!(error = %e, "plan reconcile failed"),
            }
        });
    run.await;
    info!("FailoverPlan controller stopped");
    Ok(())
}

/// Whether a watch cache has its first picture (waiting a little for it).
pub async fn cache_ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    matches!(
        tokio::time::timeout(Duration::from_secs(10), store.wait_until_ready()).await,
        Ok(Ok(()))
    )
}

/// The objects of namespace `ns` in a watch cache.
pub fn in_namespace<K>(store: &Store<K>, ns: &str) -> Vec<K>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .state()
        .iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(ns))
        .map(|o| o.as_ref().clone())
        .collect()
}

/// Why namespace `ns` may not use Site `site` ([`tenancy::not_allowed`]); a Site that does
/// not exist refuses nothing here (the VMs' reconciles report it).
async fn site_refusal(client: &Client, ns: &str, site: &str) -> Result<Option<String>, Error> {
    let Some(s) = Api::<Site>::all(client.clone()).get_opt(site).await? else {
        return Ok(None);
    };
    Ok(tenancy::not_allowed(ns, site, &s.spec.allowed_namespaces))
}

/// Every plan of namespace `ns` but `except`.
fn plans_of(
    store: &Store<FailoverPlan>,
    ns: Option<&str>,
    except: Option<&str>,
) -> Vec<ObjectRef<FailoverPlan>> {
    store
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == ns)
        .filter(|p| except.is_none_or(|e| p.name_any() != e))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

pub fn error_policy(fp: Arc<FailoverPlan>, err: &Error, ctx: Arc<Context>) -> Action {
    if let Error::Kube(kube::Error::Api(s)) = err
        && s.code == 409
    {
        // Someone (often our own previous write, seen late) moved the plan on: plan again.
        debug!(plan = %fp.name_any(), "plan moved on meanwhile; planning again");
        return Action::requeue(Duration::from_millis(200));
    }
    let n = ctx.failed(&fp.uid().unwrap_or_else(|| fp.name_any()));
    let delay =
        Duration::from_millis(500u64.saturating_mul(1 << n.min(7))).min(Duration::from_secs(60));
    warn!(plan = %fp.name_any(), error = %err, retry_in = ?delay, "plan reconcile failed");
    Action::requeue(delay)
}

/// The `<group>/<action>` values of the approve annotation (comma-separated).
pub fn approvals(fp: &FailoverPlan) -> Vec<String> {
    fp.annotations()
        .get(APPROVE_ANNOTATION)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

pub async fn reconcile(trigger: Arc<FailoverPlan>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = trigger.namespace().unwrap_or_default();
    let name = trigger.name_any();
    // The caches may lag our own last write: a status written from an older picture is
    // refused (409, resourceVersion) and the plan is planned again. Until both caches have
    // their first picture (members would look missing), the namespace is listed.
    let plans_api: Api<FailoverPlan> = Api::namespaced(ctx.client.clone(), &ns);
    let (plans, rvms) = if cache_ready(&ctx.plans).await && cache_ready(&ctx.rvms).await {
        (in_namespace(&ctx.plans, &ns), in_namespace(&ctx.rvms, &ns))
    } else {
        warn!(plan = %name, "watch caches not ready; listing the namespace");
        let rvm_api: Api<ReplicatedVM> = Api::namespaced(ctx.client.clone(), &ns);
        let lp = ListParams::default();
        let (p, r) = tokio::try_join!(plans_api.list(&lp), rvm_api.list(&lp))?;
        (p.items, r.items)
    };
    let Some(fp) = plans
        .iter()
        .find(|p| p.name_any() == name && p.uid() == trigger.uid())
    else {
        return Ok(Action::await_change());
    };
    if fp.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // A target Site that does not allow the namespace: the plan does nothing, its status says
    // why (its VMs are refused by their own reconciles too).
    if let Some(message) = site_refusal(&ctx.client, &ns, &fp.spec.target_site).await? {
        let mut new = fp.status.clone().unwrap_or_default();
        crate::controller::conditions::set_all(
            &mut new.conditions,
            &[
                Cond::new(READY, false, tenancy::NAMESPACE_NOT_ALLOWED, &message),
                Cond::new(STALLED, true, tenancy::NAMESPACE_NOT_ALLOWED, &message),
            ],
            fp.meta().generation,
            now(),
        );
        let old = fp.status.clone().unwrap_or_default();
        let w = writes::write_status::<_, _, Error>(
            &plans_api,
            &name,
            &old,
            &new,
            fp.resource_version().as_deref(),
        )
        .await?;
        if w.written {
            warn!(plan = %name, namespace = %ns, "{message}");
        }
        // Site changes do not wake plans: look again later.
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    let uid = fp.uid().unwrap_or_else(|| name.clone());
    let resolved = members::resolve(fp, &plans, &rvms);
    let approvals = approvals(fp);
    let mut status = fp.status.clone().unwrap_or_default();
    let mut rv = fp.resource_version();

    for _ in 0..MAX_ACTIONS {
        let input = Input {
            name: &name,
            generation: fp.meta().generation,
            spec: &fp.spec,
            status: &status,
            approvals: approvals.clone(),
            retry: fp
                .annotations()
                .get(RETRY_ANNOTATION)
                .map(|s| s.trim().to_string()),
            groups: resolved.groups.clone(),
            conflicts: resolved.conflicts.clone(),
            missing: resolved.missing.clone(),
            now: now(),
        };
        let (new, notes) = match planner::plan(&input) {
            planner::Action::Idle(d) => {
                ctx.succeeded(&uid);
                return Ok(Action::requeue(d));
            }
            planner::Action::Write(st, notes) => (*st, notes),
            planner::Action::CallWebhook(call) => {
                let payload = Payload {
                    plan: name.clone(),
                    namespace: ns.clone(),
                    group: call.group.clone(),
                    action: call.action.clone(),
                    stage: call.stage.clone(),
                    direction: call.direction.clone(),
                    target_site: call.target_site.clone(),
                    failover_type: format!("{:?}", fp.spec.failover.type_),
                    job: status
                        .jobs
                        .get(call.job)
                        .map(|j| j.name.clone())
                        .unwrap_or_default(),
                    sent_at: now().to_string(),
                };
                let outcome = match prepare(&ctx, &call).await? {
                    Err(refused) => Err(refused),
                    Ok((target, http, key)) => {
                        info!(plan = %name, group = %call.group, action = %call.action, host = %target.origin(), signed = key.is_some(), "calling webhook");
                        tokio::select! {
                            r = webhook::call(&http, &target, &payload, key.as_ref(), call.timeout) => r,
                            _ = ctx.shutdown.clone() => return Ok(Action::await_change()),
                        }
                    }
                };
                if let Err(e) = &outcome {
                    warn!(plan = %name, group = %call.group, action = %call.action, error = %e, "webhook failed");
                }
                planner::record_webhook(&status, &call, outcome, now())
            }
        };
        rv = writes::write_status::<_, _, Error>(&plans_api, &name, &status, &new, rv.as_deref())
            .await?
            .resource_version;
        let notes: Vec<writes::Note> = notes.iter().map(Into::into).collect();
        writes::publish(&ctx.recorder, &fp.object_ref(&()), &notes).await;
        status = new;
    }
    ctx.succeeded(&uid);
    Ok(Action::requeue(Duration::ZERO))
}

/// What a webhook call needs: its checked URL, a client (one of its own for a CA bundle) and
/// the signing key. The inner Err is a refusal to record on the step (nothing is sent); the
/// outer one an API error to retry.
async fn prepare(
    ctx: &Context,
    call: &planner::WebhookCall,
) -> Result<
    Result<
        (
            webhook::Target,
            reqwest::Client,
            Option<webhook::SigningKey>,
        ),
        String,
    >,
    Error,
> {
    let target = match webhook::check(&call.url, &ctx.settings.allowed_hosts) {
        Ok(t) => t,
        Err(refused) => return Ok(Err(refused)),
    };
    if call.ca_bundle.is_some() && !target.shown().starts_with("https://") {
        return Ok(Err(
            "webhook.caBundle is only for an https:// webhook.url".into()
        ));
    }
    // Resolved and checked now; the call connects to these addresses and no others.
    let addrs = match target.resolve(&ctx.settings.allowed_hosts).await {
        Ok(a) => a,
        Err(refused) => return Ok(Err(refused)),
    };
    let pin = target.host_name().map(|h| (h, addrs.as_slice()));
    let http = match webhook::client(call.ca_bundle.as_deref().map(str::as_bytes), pin) {
        Ok(c) => c,
        Err(refused) => return Ok(Err(refused)),
    };
    let key = match &ctx.settings.signing_secret {
        None => None,
        Some(r) => match signing_key(&ctx.client, r).await? {
            Ok(k) => Some(k),
            Err(refused) => return Ok(Err(refused)),
        },
    };
    Ok(Ok((target, http, key)))
}

/// The signing key from its Secret, read when it is needed (no Secret cache). A missing
/// Secret or key is a refusal: a webhook is never called unsigned when a key is configured.
async fn signing_key(
    client: &Client,
    r: &webhook::SigningSecretRef,
) -> Result<Result<webhook::SigningKey, String>, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
    let missing = |why: &str| {
        format!(
            "the webhook signing key cannot be read: {why} (--webhook-signing-secret); \
             the webhook is not called unsigned"
        )
    };
    match api.get_opt(&r.name).await {
        Ok(Some(secret)) => Ok(match secret.data.as_ref().and_then(|d| d.get(&r.key)) {
            Some(v) if !v.0.is_empty() => Ok(webhook::SigningKey::new(&v.0)),
            _ => Err(missing(&format!(
                "Secret {}/{} has no key {}",
                r.namespace, r.name, r.key
            ))),
        }),
        Ok(None) => Ok(Err(missing(&format!(
            "Secret {}/{} does not exist",
            r.namespace, r.name
        )))),
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(Err(missing(&format!(
            "reading Secret {}/{} is forbidden",
            r.namespace, r.name
        )))),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approvals_are_comma_separated() {
        let mut fp = FailoverPlan::new(
            "p",
            crate::api::FailoverPlanSpec {
                target_site: "s".into(),
                failover: Default::default(),
                test_failover: Default::default(),
                groups: vec![],
                max_parallel: None,
            },
        );
        assert!(approvals(&fp).is_empty());
        fp.annotations_mut()
            .insert(APPROVE_ANNOTATION.into(), " db/fenced, web/smoke ,".into());
        assert_eq!(approvals(&fp), vec!["db/fenced", "web/smoke"]);
    }
}
