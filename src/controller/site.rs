//! The Site reconciler: reads the token Secret, lists the site's VMs once per period (the
//! listing every ReplicatedVM reconcile reads), installs the peer credentials of the site's
//! pairs at its agent ([`super::peers`]) and reports the agent's health in status.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{debug, warn};

use super::conditions::{self, Cond, READY};
use super::error::Error;
use super::metrics::{KindLabels, SiteLabels};
use super::rvm::{Context, now};
use super::sites::ListError;
use super::writes;
use crate::api::{SecretKeyRef, Site};

/// lastHeartbeatTime is rewritten at most this often while nothing else changes.
const HEARTBEAT_WRITE: Duration = Duration::from_secs(60);

async fn secret_value(ctx: &Context, r: &SecretKeyRef) -> Result<String, String> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &r.namespace);
    let s = api
        .get_opt(&r.name)
        .await
        .map_err(|e| format!("reading Secret {}/{}: {e}", r.namespace, r.name))?
        .ok_or_else(|| format!("Secret {}/{} not found", r.namespace, r.name))?;
    let bytes = s
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .or_else(|| {
            s.string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .map(|v| v.clone().into_bytes())
        })
        .ok_or_else(|| format!("Secret {}/{} has no key {}", r.namespace, r.name, r.key))?;
    String::from_utf8(bytes)
        .map(|s| s.trim().to_string())
        .map_err(|_| {
            format!(
                "Secret {}/{} key {} is not UTF-8",
                r.namespace, r.name, r.key
            )
        })
}

/// The controller reads Secrets in one namespace only (`--secret-namespace`); a reference
/// elsewhere is refused without a read, with the field and the namespace to use.
fn check_namespace(ctx: &Context, field: &str, r: &SecretKeyRef) -> Result<(), Cond> {
    if r.namespace == ctx.secret_namespace {
        return Ok(());
    }
    Err(Cond::new(
        READY,
        false,
        "SecretNamespace",
        format!(
            "spec.agent.{field}.namespace is {}, but the controller reads Secrets only in \
             namespace {}: create Secret {} there and set spec.agent.{field}.namespace to {}",
            r.namespace, ctx.secret_namespace, r.name, ctx.secret_namespace
        ),
    ))
}

/// The agent's token and CA bundle, or the Ready=False condition that says why not.
async fn credentials(
    ctx: &Context,
    agent: &crate::api::AgentEndpoint,
) -> Result<(String, Option<String>), Cond> {
    check_namespace(ctx, "tokenSecretRef", &agent.token_secret_ref)?;
    if let Some(r) = &agent.ca_secret_ref {
        check_namespace(ctx, "caSecretRef", r)?;
    }
    let token = secret_value(ctx, &agent.token_secret_ref)
        .await
        .map_err(|m| Cond::new(READY, false, "Unauthorized", m))?;
    let ca = match &agent.ca_secret_ref {
        None => None,
        // Never the system roots instead: the Site named the CA its agent's certificate is
        // checked against.
        Some(r) => Some(secret_value(ctx, r).await.map_err(|m| {
            Cond::new(
                READY,
                false,
                "CAUnavailable",
                format!("spec.agent.caSecretRef: {m}; the agent is not called without its CA"),
            )
        })?),
    };
    Ok((token, ca))
}

pub async fn reconcile(site: Arc<Site>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = site.name_any();
    let agent = &site.spec.agent;
    let t0 = now();
    ctx.sites
        .set_network_mappings(&name, &site.spec.network_mappings);
    let mut accelerator = None;
    let (cond, count) = match credentials(&ctx, agent).await {
        Err(cond) => {
            if cond.reason == "SecretNamespace" {
                // Credentials from a namespace the controller may not read are not used, not
                // even the ones read before the Site changed.
                ctx.sites.remove(&name);
            }
            debug!(site = %name, reason = %cond.reason, "{}", cond.message);
            (cond, None)
        }
        Ok((token, ca)) => {
            match ctx.sites.upsert(&name, &agent.url, &token, ca) {
                Err(e) => (Cond::new(READY, false, "Unreachable", e.to_string()), None),
                Ok(()) => {
                    ctx.metrics
                        .site_listings
                        .get_or_create(&SiteLabels { site: name.clone() })
                        .inc();
                    // A listing another reconcile took since this one began is as good.
                    match ctx.sites.refresh(&name, Some(t0)).await {
                        None => (
                            Cond::new(READY, false, "Unreachable", "site not registered"),
                            None,
                        ),
                        Some(o) => match o.result {
                            Ok(n) => {
                                accelerator = o.accelerator;
                                (
                                    Cond::new(
                                        READY,
                                        true,
                                        "Connected",
                                        format!("agent at {} answers", agent.url),
                                    ),
                                    Some(n),
                                )
                            }
                            Err(ListError::Unauthorized(m)) => (
                                Cond::new(
                                    READY,
                                    false,
                                    "Unauthorized",
                                    format!("token refused: {m}"),
                                ),
                                None,
                            ),
                            Err(ListError::Unreachable(m)) | Err(ListError::Other(m)) => {
                                (Cond::new(READY, false, "Unreachable", m), None)
                            }
                        },
                    }
                }
            }
        }
    };
    let cond = if cond.status {
        // The agent answers: it gets the credentials of its pairs with the other sites.
        match super::peers::sync(&ctx, &name).await {
            Ok(()) => cond,
            Err(m) => {
                warn!(site = %name, "peer credentials: {m}");
                Cond::new(READY, false, "PeerCredentials", m)
            }
        }
    } else {
        // It may come back without what it held (a new data directory): install again then.
        ctx.sites.pairs.forget(&name);
        cond
    };
    write_status(&site, &ctx, &cond, count.map(|n| (n, accelerator)), t0).await?;
    Ok(Action::requeue(ctx.poll))
}

async fn write_status(
    site: &Site,
    ctx: &Context,
    cond: &Cond,
    listed: Option<(usize, Option<String>)>,
    t: Timestamp,
) -> Result<(), Error> {
    let old = site.status.clone().unwrap_or_default();
    let mut new = old.clone();
    new.observed_generation = site.meta().generation;
    conditions::set_all(
        &mut new.conditions,
        std::slice::from_ref(cond),
        new.observed_generation,
        t,
    );
    if let Some((n, accelerator)) = listed {
        new.vm_count = Some(i64::try_from(n).unwrap_or(i64::MAX));
        new.accelerator = accelerator;
        let stale = old
            .last_heartbeat_time
            .as_ref()
            .is_none_or(|h| (t - h.0).get_seconds() >= HEARTBEAT_WRITE.as_secs() as i64);
        if stale || new != old {
            new.last_heartbeat_time = Some(Time(t));
        }
    }
    let api: Api<Site> = Api::all(ctx.client.clone());
    // The Site reconciler is the only writer of Site status: no resourceVersion guard.
    if !writes::write_status::<_, _, Error>(&api, &site.name_any(), &old, &new, None)
        .await?
        .written
    {
        return Ok(());
    }
    ctx.metrics
        .status_writes
        .get_or_create(&KindLabels {
            kind: "Site".into(),
        })
        .inc();
    debug!(site = %site.name_any(), ready = cond.status, "site status written");
    Ok(())
}

pub fn error_policy(site: Arc<Site>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&KindLabels {
            kind: "Site".into(),
        })
        .inc();
    warn!(site = %site.name_any(), error = %err, "site reconcile failed");
    Action::requeue(ctx.poll)
}
