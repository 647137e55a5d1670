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
use tracing::{debug, info, warn};

use super::conditions::{self, Cond, INSECURE, READY, RECONCILING, STALLED};
use super::error::Error;
use super::metrics::{KindLabels, SiteLabels};
use super::rvm::{Context, now};
use super::sites::ListError;
use super::writes;
use crate::api::{SecretKeyRef, Site, SiteFence, SiteFenceStatus};

/// lastHeartbeatTime is rewritten at most this often while nothing else changes.
const HEARTBEAT_WRITE: Duration = Duration::from_secs(60);

/// The label that binds a Secret to the one Site whose credentials it holds: the controller
/// reads a Secret for Site S only when it carries `twinsite.io/site: S`.
pub const SITE_LABEL: &str = "twinsite.io/site";

/// Why a Secret a Site names was not used.
enum Unread {
    /// Not labelled for this Site: its content was never fetched.
    NotForSite(Cond),
    /// Missing, no such key, or the API server did not answer.
    Unreadable(String),
}

fn labelled_for(labels: Option<&std::collections::BTreeMap<String, String>>, site: &str) -> bool {
    labels.and_then(|l| l.get(SITE_LABEL)).map(String::as_str) == Some(site)
}

fn not_for_site(site: &str, field: &str, r: &SecretKeyRef) -> Cond {
    Cond::new(
        READY,
        false,
        "SecretNotForSite",
        format!(
            "spec.agent.{field} names Secret {ns}/{name}, which is not labelled \
             {SITE_LABEL}={site}: the controller reads only Secrets labelled for their Site, and \
             did not read this one; if it holds this Site's credentials, label it \
             (kubectl -n {ns} label secret {name} {SITE_LABEL}={site})",
            ns = r.namespace,
            name = r.name,
        ),
    )
}

/// Key `r.key` of the Secret `r`, read only when the Secret is labelled for `site`: its
/// metadata is fetched first, so the content of a Secret that is not is never fetched.
async fn secret_value(
    ctx: &Context,
    site: &str,
    field: &str,
    r: &SecretKeyRef,
) -> Result<String, Unread> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &r.namespace);
    let unreadable = |e: kube::Error| {
        Unread::Unreadable(format!("reading Secret {}/{}: {e}", r.namespace, r.name))
    };
    let missing = || Unread::Unreadable(format!("Secret {}/{} not found", r.namespace, r.name));
    let meta = api
        .get_metadata_opt(&r.name)
        .await
        .map_err(unreadable)?
        .ok_or_else(missing)?;
    if !labelled_for(meta.metadata.labels.as_ref(), site) {
        return Err(Unread::NotForSite(not_for_site(site, field, r)));
    }
    let s = api
        .get_opt(&r.name)
        .await
        .map_err(unreadable)?
        .ok_or_else(missing)?;
    // The label may have been removed in between: the object read decides.
    if !labelled_for(s.metadata.labels.as_ref(), site) {
        return Err(Unread::NotForSite(not_for_site(site, field, r)));
    }
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
        .ok_or_else(|| {
            Unread::Unreadable(format!(
                "Secret {}/{} has no key {}",
                r.namespace, r.name, r.key
            ))
        })?;
    String::from_utf8(bytes)
        .map(|s| s.trim().to_string())
        .map_err(|_| {
            Unread::Unreadable(format!(
                "Secret {}/{} key {} is not UTF-8",
                r.namespace, r.name, r.key
            ))
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

/// The `Insecure` condition of a Site's agent URL, or the Ready=False condition of an http://
/// URL without `spec.agent.insecure: true` (the API server refuses one; a Site stored before
/// that rule is refused here, and its agent is not called).
fn url_scheme(agent: &crate::api::AgentEndpoint) -> Result<Cond, Cond> {
    if agent.url.starts_with("https://") {
        return Ok(Cond::new(
            INSECURE,
            false,
            "HTTPS",
            "the agent is called over https",
        ));
    }
    if agent.insecure {
        return Ok(Cond::new(
            INSECURE,
            true,
            "PlainHTTP",
            "spec.agent.insecure is true: the agent's token and the VMs' blocks replicated to \
             this site cross the network unencrypted; use an https:// URL",
        ));
    }
    Err(Cond::new(
        READY,
        false,
        "InsecureURL",
        "spec.agent.url is http://: use an https:// URL, or set spec.agent.insecure: true to \
         send the agent's token and the VMs' blocks unencrypted; the agent is not called",
    ))
}

/// The agent's token and CA bundle, or the Ready=False condition that says why not.
async fn credentials(
    ctx: &Context,
    site: &str,
    agent: &crate::api::AgentEndpoint,
) -> Result<(String, Option<String>), Cond> {
    check_namespace(ctx, "tokenSecretRef", &agent.token_secret_ref)?;
    if let Some(r) = &agent.ca_secret_ref {
        check_namespace(ctx, "caSecretRef", r)?;
    }
    let token = secret_value(ctx, site, "tokenSecretRef", &agent.token_secret_ref)
        .await
        .map_err(|e| match e {
            Unread::NotForSite(c) => c,
            Unread::Unreadable(m) => Cond::new(READY, false, "Unauthorized", m),
        })?;
    let ca =
        match &agent.ca_secret_ref {
            None => None,
            // Never the system roots instead: the Site named the CA its agent's certificate is
            // checked against.
            Some(r) => Some(secret_value(ctx, site, "caSecretRef", r).await.map_err(
                |e| match e {
                    Unread::NotForSite(c) => c,
                    Unread::Unreadable(m) => Cond::new(
                        READY,
                        false,
                        "CAUnavailable",
                        format!(
                            "spec.agent.caSecretRef: {m}; the agent is not called without its CA"
                        ),
                    ),
                },
            )?),
        };
    Ok((token, ca))
}

/// Who declared the site lost and when: the field manager of `spec.fence` (managedFields).
fn declared_by(site: &Site) -> (Option<String>, Option<Time>) {
    site.meta()
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|s| s.get("f:fence"))
                .is_some()
        })
        .max_by_key(|m| m.time.as_ref().map(|t| t.0))
        .map(|m| (m.manager.clone(), m.time.clone()))
        .unwrap_or_default()
}

/// `status.fence` of a Site declared lost since `since` (None when it is not).
fn fence_status(site: &Site, since: Option<Timestamp>) -> Option<SiteFenceStatus> {
    let since = since?;
    let state = site.spec.fence?;
    let (by, at) = declared_by(site);
    Some(SiteFenceStatus {
        state,
        since: Some(Time(since)),
        declared_by: by,
        declared_at: at,
    })
}

/// Sites whose object is gone leave the registry: no reconcile runs for a deleted object, so
/// every Site's reconcile (each poll) looks for them. ReplicatedVMs then see the site as not
/// known instead of going on with its last listing and client.
///
/// Only once the Site cache holds the first full listing: before that it is empty, and every
/// site (with its peer credentials and declaration) would be forgotten.
async fn forget_deleted(ctx: &Context) {
    if !crate::controller::failover_plan::cache_ready(&ctx.site_objects).await {
        return;
    }
    for gone in ctx.sites.names().into_iter().filter(|n| {
        ctx.site_objects
            .get(&kube::runtime::reflector::ObjectRef::new(n))
            .is_none()
    }) {
        info!(site = %gone, "Site deleted: its agent is no longer called");
        ctx.sites.forget(&gone);
    }
}

pub async fn reconcile(site: Arc<Site>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = site.name_any();
    let agent = &site.spec.agent;
    let t0 = now();
    forget_deleted(&ctx).await;
    ctx.sites
        .set_network_mappings(&name, &site.spec.network_mappings);
    ctx.sites
        .set_allowed_namespaces(&name, &site.spec.allowed_namespaces);
    // A declaration seen for the first time is held from now on; the listing below still runs
    // (the Site shows what its agent answers) but nothing the planners read comes from it.
    let lost = site.spec.fence == Some(SiteFence::Lost);
    let was_lost = ctx.sites.lost_since(&name).is_some();
    let first_seen = site
        .status
        .as_ref()
        .and_then(|s| s.fence.as_ref())
        .and_then(|f| f.since.as_ref())
        .map_or(t0, |t| t.0);
    let lost_since = ctx
        .sites
        .set_lost(&name, lost, if lost { first_seen } else { t0 });
    if lost != was_lost {
        let (by, _) = declared_by(&site);
        if lost {
            warn!(site = %name, declared_by = by.as_deref().unwrap_or("unknown"), "site declared lost: failovers go on without it and nothing it says is trusted");
        } else {
            info!(site = %name, "site no longer declared lost: its VMs that must not run there are powered off before replication resumes");
        }
    }
    let fence = fence_status(&site, lost_since);
    let mut accelerator = None;
    let scheme = url_scheme(agent);
    let insecure = match &scheme {
        Ok(c) => c.clone(),
        Err(_) => Cond::new(INSECURE, false, "NotCalled", "the agent is not called"),
    };
    let creds = match scheme {
        Err(cond) => Err(cond),
        Ok(_) => credentials(&ctx, &name, agent).await,
    };
    let (cond, count) = match creds {
        Err(cond) => {
            if ["SecretNamespace", "SecretNotForSite", "InsecureURL"]
                .contains(&cond.reason.as_str())
            {
                // Credentials the controller may not read are not used, not even the ones read
                // before the Site or the Secret changed.
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
    let cond = if fence.is_some() {
        // A site declared lost is not called: its credentials are installed again once the
        // declaration is removed.
        ctx.sites.pairs.forget(&name);
        cond
    } else if cond.status {
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
    let cond = match &fence {
        Some(f) => Cond::new(
            READY,
            false,
            "DeclaredLost",
            format!(
                "declared lost (spec.fence: Lost) by {} since {}: VMs fail over and fail back \
                 without it and nothing it says is trusted; remove spec.fence once it is back \
                 (its agent {})",
                f.declared_by.as_deref().unwrap_or("an unknown manager"),
                f.since
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
                if cond.status {
                    "answers now"
                } else {
                    "does not answer"
                }
            ),
        ),
        None => cond,
    };
    write_status(
        &site,
        &ctx,
        &[cond, insecure],
        count.map(|n| (n, accelerator)),
        fence,
        t0,
    )
    .await?;
    Ok(Action::requeue(ctx.poll))
}

/// Reconciling and Stalled as kstatus (Flux, `kubectl wait`) reads them, from Ready: a site
/// that answers is neither; one that does not (unreachable, token refused, credentials
/// missing) is Reconciling while the controller keeps trying, and Stalled, with Ready's reason
/// and message, once it has not been Ready for `limit`. A site declared lost is neither: it is
/// where the operator put it.
fn kstatus(ready: &Cond, not_ready_since: Timestamp, now: Timestamp, limit: Duration) -> [Cond; 2] {
    let idle = || Cond::new(RECONCILING, false, "Idle", "");
    let not_stalled = || Cond::new(STALLED, false, "NotStalled", "");
    if ready.status || ready.reason == "DeclaredLost" {
        return [idle(), not_stalled()];
    }
    let for_s = (now - not_ready_since).get_seconds().max(0);
    let limit_s = i64::try_from(limit.as_secs()).unwrap_or(i64::MAX);
    if for_s >= limit_s {
        // The time it stopped being Ready, not a count of seconds: a message that changed at
        // every poll would rewrite the status of every stalled Site at every poll.
        let msg = format!(
            "not ready since {not_ready_since} (limit {limit_s} s, --site-stall-seconds): {}",
            ready.message
        );
        [idle(), Cond::new(STALLED, true, ready.reason.clone(), msg)]
    } else {
        let msg = format!("retrying every poll: {}", ready.message);
        [
            Cond::new(RECONCILING, true, ready.reason.clone(), msg),
            not_stalled(),
        ]
    }
}

async fn write_status(
    site: &Site,
    ctx: &Context,
    conds: &[Cond],
    listed: Option<(usize, Option<String>)>,
    fence: Option<SiteFenceStatus>,
    t: Timestamp,
) -> Result<(), Error> {
    let old = site.status.clone().unwrap_or_default();
    let mut new = old.clone();
    new.observed_generation = site.meta().generation;
    // A controller restarted while the site is lost keeps the time the declaration was first
    // seen.
    new.fence = fence.map(|mut f| {
        if let Some(s) = old.fence.as_ref().and_then(|o| o.since.clone()) {
            f.since = Some(s);
        }
        f
    });
    // Not Ready since: Ready's last transition when it was already False, else now.
    let since = old
        .conditions
        .iter()
        .find(|c| c.type_ == READY && c.status == "False")
        .map_or(t, |c| c.last_transition_time.0);
    let mut all = conds.to_vec();
    if let Some(ready) = conds.iter().find(|c| c.type_ == READY) {
        all.extend(kstatus(ready, since, t, ctx.site_stall));
    }
    conditions::set_all(&mut new.conditions, &all, new.observed_generation, t);
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
    debug!(site = %site.name_any(), ready = conds.first().is_some_and(|c| c.status), "site status written");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn a_site_not_ready_reconciles_then_stalls_past_the_limit() {
        let limit = Duration::from_secs(300);
        let ok = Cond::new(READY, true, "Connected", "agent answers");
        let [r, s] = kstatus(&ok, at(0), at(1000), limit);
        assert!(!r.status && !s.status, "{r:?} {s:?}");
        let down = Cond::new(READY, false, "Unreachable", "connection refused");
        let [r, s] = kstatus(&down, at(0), at(299), limit);
        assert!(r.status && !s.status, "{r:?} {s:?}");
        assert_eq!(r.reason, "Unreachable");
        let [r, s] = kstatus(&down, at(0), at(300), limit);
        assert!(!r.status && s.status, "{r:?} {s:?}");
        assert_eq!(s.reason, "Unreachable");
        assert!(s.message.contains("connection refused"), "{s:?}");
        let lost = Cond::new(READY, false, "DeclaredLost", "declared lost");
        let [r, s] = kstatus(&lost, at(0), at(1000), limit);
        assert!(!r.status && !s.status, "{r:?} {s:?}");
    }
}
