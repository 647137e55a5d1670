//! Carries out one planned step against the sites. Every call carries the step's operation id,
//! so a repeat after a crash is answered from the site's record instead of done twice.

use std::time::Duration;

use jiff::Timestamp;

use super::planner::{EnableMode, FenceCall, Outcome, SettingsCall, StepCall, StepName};
use crate::controller::observe::ObservedRecoveryPoint;
use crate::controller::sites::TenantSites;
use crate::site::{
    AcceptReplication, CutRequest, EnableReplication, PowerAction, RecoveryPoint,
    RecoveryPointSelector, ReplicationMode, ReplicationSettingsRequest, SiteError, SiteProvider,
};

fn with_rp(p: &RecoveryPoint) -> Outcome {
    Outcome::Succeeded {
        message: None,
        recovery_point: Some(ObservedRecoveryPoint::from(p)),
        test_vm: None,
    }
}

/// A site error as a step outcome: a site that does not answer (or refuses the token, which a
/// person fixes in the Secret) is retried; anything else is the step's failure.
fn failed(site: &str, e: SiteError) -> Outcome {
    match e {
        SiteError::Unreachable(m) => Outcome::Unreachable(format!("site {site} unreachable: {m}")),
        SiteError::Unauthorized(m) => {
            Outcome::Unreachable(format!("site {site} refused the token: {m}"))
        }
        other => Outcome::Failed(format!("site {site}: {other}")),
    }
}

/// As [`failed`], and a 5xx (a proxy's 502 or 504, an agent that failed to read its disk) is
/// no answer either: asked again.
fn unanswered(site: &str, e: SiteError) -> Outcome {
    match e {
        SiteError::Other(code, m) if code >= 500 => {
            Outcome::Unreachable(format!("site {site} answered {code}: {m}"))
        }
        e => failed(site, e),
    }
}

fn provider(
    sites: &TenantSites<'_>,
    site: &str,
) -> Result<std::sync::Arc<dyn SiteProvider>, Outcome> {
    sites
        .provider(site)
        .ok_or_else(|| Outcome::Unreachable(format!("site {site} is not known (no Site object)")))
}

/// A step retried past its deadline (a fence that waits for its site to come back) still gives
/// each call this long to be answered.
const MIN_ATTEMPT: Duration = Duration::from_secs(10);

/// How long the calls of one step may still wait: until the step's deadline (at least
/// [`MIN_ATTEMPT`]). A site call is bounded by it whatever the client's own timeout, so a site
/// that accepts a call and never answers holds a reconcile slot no longer than the step may
/// take, and is reported as not answering (a retry, then Stalled at the deadline).
struct Budget {
    until: tokio::time::Instant,
    secs: u64,
}

impl Budget {
    fn until(deadline: Timestamp) -> Self {
        let left = Duration::try_from(Timestamp::now().duration_until(deadline))
            .unwrap_or(Duration::ZERO)
            .max(MIN_ATTEMPT);
        Self {
            until: tokio::time::Instant::now() + left,
            secs: left.as_secs(),
        }
    }

    async fn call<T>(&self, f: impl Future<Output = Result<T, SiteError>>) -> Result<T, SiteError> {
        tokio::time::timeout_at(self.until, f)
            .await
            .unwrap_or_else(|_| {
                Err(SiteError::Unreachable(format!(
                    "no answer within {} s, the time left before the step's deadline",
                    self.secs
                )))
            })
    }
}

/// Runs the step's site calls.
pub async fn run(sites: &TenantSites<'_>, c: &StepCall) -> Outcome {
    let b = Budget::until(c.deadline);
    match run_inner(sites, c, &b).await {
        Ok(o) | Err(o) => o,
    }
}

async fn run_inner(sites: &TenantSites<'_>, c: &StepCall, b: &Budget) -> Result<Outcome, Outcome> {
    let vm = c.vm.as_str();
    let op = c.op_id.as_str();
    let (src, tgt) = (c.source.as_str(), c.target.as_str());
    Ok(match c.step_name {
        StepName::EnableReplication => {
            let p = provider(sites, src)?;
            if !sites.known(tgt) {
                return Err(Outcome::Unreachable(format!(
                    "site {tgt} is not known (no Site object)"
                )));
            }
            // The pair's own credential, never the target's token: the source can reach
            // nothing at the target but the replicas of its own VMs.
            let peer = sites.peer(src, tgt).ok_or_else(|| {
                Outcome::Unreachable(format!(
                    "the peer credential of {src} -> {tgt} is not installed at {tgt} yet"
                ))
            })?;
            // The target first: the data path never makes a VM a replica on its own, so the
            // target is told to accept this source before the source starts sending (an
            // initial copy and a resync alike). Its own operation id keeps a repeat idempotent.
            let accept = AcceptReplication {
                operation_id: format!("{op}-accept"),
                source_site: src.to_string(),
            };
            if let Err(e) = b
                .call(provider(sites, tgt)?.accept_replication(vm, &accept))
                .await
            {
                return Ok(failed(tgt, e));
            }
            let params = EnableReplication {
                operation_id: op.to_string(),
                peer_site: tgt.to_string(),
                peer_url: peer.url,
                peer_token: peer.token,
                peer_ca_pem: peer.ca_pem,
                interval_seconds: u64::try_from(c.replication.interval_seconds).unwrap_or(300),
                recovery_point_retention_hours: u64::try_from(
                    c.replication.recovery_point_retention_hours,
                )
                .unwrap_or(0),
                app_consistent_frequency_hours: u64::try_from(
                    c.replication.app_consistent_frequency_hours,
                )
                .unwrap_or(0),
                mode: match c.mode {
                    EnableMode::Initial => ReplicationMode::Initial,
                    EnableMode::Resync => ReplicationMode::Resync,
                },
            };
            match b.call(p.enable_replication(vm, &params)).await {
                Ok(_) => Outcome::ok(),
                Err(e) => failed(src, e),
            }
        }
        StepName::ConsistentCut => consistent_cut(sites, c, b).await?,
        StepName::InitialReplication | StepName::Resynchronize => Outcome::ok(),
        StepName::ShutdownSource => power(sites, b, src, vm, PowerAction::Shutdown, op).await?,
        StepName::FenceSource => power(sites, b, src, vm, PowerAction::PowerOff, op).await?,
        StepName::RestartSource => power(sites, b, src, vm, PowerAction::Start, op).await?,
        StepName::SyncRemaining => match b.call(provider(sites, src)?.sync(vm, op)).await {
            Ok(r) => with_rp(&r.recovery_point),
            Err(e) => failed(src, e),
        },
        StepName::VerifyDigests => verify_digests(sites, b, src, tgt, vm).await?,
        StepName::StopReplication => {
            // The source side is best effort (it may be gone); the target must stop accepting.
            let mut notes = Vec::new();
            if c.source_unreachable {
                notes.push(format!("not stopped at {src}: the site is unreachable"));
            } else if let Some(p) = sites.provider(src)
                && let Err(e) = b
                    .call(p.stop_replication(vm, &format!("{op}-source")))
                    .await
            {
                notes.push(format!("at {src}: {e}"));
            }
            match b
                .call(provider(sites, tgt)?.stop_replication(vm, &format!("{op}-target")))
                .await
            {
                Ok(_) | Err(SiteError::Conflict(_)) | Err(SiteError::NotFound(_)) => {
                    Outcome::Succeeded {
                        message: (!notes.is_empty()).then(|| notes.join("; ")),
                        recovery_point: None,
                        test_vm: None,
                    }
                }
                Err(e) => failed(tgt, e),
            }
        }
        StepName::StartAtTarget => {
            let sel = RecoveryPointSelector::from(c.recovery_point.clone());
            // The target Site's mappings of the source's networks; a drill copy never takes
            // them (it goes to its isolated network).
            let networks = sites.network_mappings(tgt, src);
            match b
                .call(provider(sites, tgt)?.failover_mapped(vm, &sel, &networks, op))
                .await
            {
                Ok(r) => with_rp(&r.recovery_point),
                // A 5xx may come after the target started the VM (a proxy's 502 or 504, an
                // error after the role flipped): not a refusal. The target is asked again with
                // the same operation id (its record answers) until the step's deadline, before
                // anything starts the source again.
                Err(SiteError::Other(code, m)) if code >= 500 => Outcome::Unreachable(format!(
                    "site {tgt} gave no clear answer ({code}: {m}); asking again with the same \
                     operation id"
                )),
                Err(e) => failed(tgt, e),
            }
        }
        StepName::Commit => match b.call(provider(sites, tgt)?.commit(vm, op)).await {
            Ok(r) => Outcome::Succeeded {
                message: Some(format!(
                    "{} recovery points deleted",
                    r.deleted_recovery_points
                )),
                recovery_point: None,
                test_vm: None,
            },
            Err(e) => failed(tgt, e),
        },
        StepName::CreateTestCopy => {
            let sel = RecoveryPointSelector::from(c.recovery_point.clone());
            match b
                .call(provider(sites, tgt)?.test_failover(vm, &sel, &c.network, op))
                .await
            {
                Ok(r) => Outcome::Succeeded {
                    message: Some(format!("drill copy {} on network {}", r.vm_name, c.network)),
                    recovery_point: Some(ObservedRecoveryPoint::from(&r.recovery_point)),
                    test_vm: Some(r.vm_name),
                },
                Err(e) => failed(tgt, e),
            }
        }
        StepName::DeleteTestCopy => {
            match b
                .call(provider(sites, tgt)?.test_failover_cleanup(vm, op))
                .await
            {
                Ok(_) | Err(SiteError::NotFound(_)) => Outcome::ok(),
                Err(e) => failed(tgt, e),
            }
        }
        StepName::RemoveReplica => {
            let p = provider(sites, tgt)?;
            match b.call(p.get_vm(vm)).await {
                Err(SiteError::NotFound(_)) => Outcome::ok(),
                Err(e) => failed(tgt, e),
                // Never touch a VM that runs.
                Ok(v) if v.power == crate::site::Power::Running => Outcome::Failed(format!(
                    "VM {vm} runs at {tgt}; a running VM is never removed"
                )),
                Ok(_) => match b.call(p.delete_vm(vm, op)).await {
                    Ok(()) | Err(SiteError::NotFound(_)) => Outcome::ok(),
                    Err(e) => failed(tgt, e),
                },
            }
        }
    })
}

/// This VM's point of the plan's consistent cut, asked of the source site (the cut id is the
/// step's operation id: the site cuts once per id and answers every repeat the same). The point
/// must still be at the target for the failover to start from it.
async fn consistent_cut(
    sites: &TenantSites<'_>,
    c: &StepCall,
    b: &Budget,
) -> Result<Outcome, Outcome> {
    let (vm, cut_id, src, tgt) = (
        c.vm.as_str(),
        c.op_id.as_str(),
        c.source.as_str(),
        c.target.as_str(),
    );
    let req = CutRequest {
        cut_id: cut_id.to_string(),
        vms: c.cut_vms.clone(),
    };
    let answer = match b.call(provider(sites, src)?.cut(&req)).await {
        Ok(a) => a,
        Err(e) => return Ok(failed(src, e)),
    };
    let Some(point) = answer.points.iter().find(|p| p.vm == vm) else {
        return Ok(Outcome::Failed(format!(
            "VM {vm} is not in cut {cut_id} at {src} (it did not replicate outbound from \
             there when the cut was taken); the failover starts from {} without a cut",
            c.recovery_point
        )));
    };
    let rp_id = &point.recovery_point.id;
    // Retention at the target may have merged the point away since the cut was taken (a later
    // group fails over long after it): then it cannot be started from.
    if let Some(t) = sites.provider(tgt)
        && let Ok(points) = b.call(t.recovery_points(vm)).await
        && !points.iter().any(|p| &p.id == rp_id)
    {
        return Ok(Outcome::Failed(format!(
            "recovery point {rp_id} of cut {cut_id} is no longer at {tgt}; the failover starts \
             from {} without a cut",
            c.recovery_point
        )));
    }
    Ok(Outcome::Succeeded {
        message: Some(format!(
            "recovery point {rp_id} of cut {cut_id} (cut at {}, {} VMs at {src})",
            answer.time,
            answer.points.len()
        )),
        recovery_point: Some(ObservedRecoveryPoint::from(&point.recovery_point)),
        test_vm: None,
    })
}

async fn power(
    sites: &TenantSites<'_>,
    b: &Budget,
    site: &str,
    vm: &str,
    action: PowerAction,
    op: &str,
) -> Result<Outcome, Outcome> {
    Ok(
        match b.call(provider(sites, site)?.power(vm, action, op)).await {
            Ok(_) => Outcome::ok(),
            // A VM the site does not hold does not run there: stopped as asked.
            Err(SiteError::NotFound(m)) if action != PowerAction::Start => Outcome::Succeeded {
                message: Some(format!("VM {vm} is not at {site}: {m}")),
                recovery_point: None,
                test_vm: None,
            },
            Err(e) => failed(site, e),
        },
    )
}

/// Zero data loss, proven: every disk's digest at the source equals the digest of the target's
/// newest recovery point.
async fn verify_digests(
    sites: &TenantSites<'_>,
    b: &Budget,
    src: &str,
    tgt: &str,
    vm: &str,
) -> Result<Outcome, Outcome> {
    let s = provider(sites, src)?;
    let t = provider(sites, tgt)?;
    let disks = match b.call(s.get_vm(vm)).await {
        Ok(v) => v.disks,
        Err(e) => return Ok(failed(src, e)),
    };
    let mut checked = Vec::new();
    for d in &disks {
        // Each site hashes its whole disk: both at once, so the step takes one hash's time.
        let (a, z) = tokio::join!(b.call(s.digest(vm, &d.name)), b.call(t.digest(vm, &d.name)));
        // Only two digests compared make a mismatch: a site that cannot be asked (no answer,
        // a refused token, a 5xx) is asked again, and at the deadline the failover fails
        // without a word about the replica (no resync toward a site that did not answer).
        let a = match a {
            Ok(x) => x,
            Err(e) => return Ok(unanswered(src, e)),
        };
        let z = match z {
            Ok(x) => x,
            Err(e) => return Ok(unanswered(tgt, e)),
        };
        if a != z {
            return Ok(Outcome::Failed(format!(
                "disk {} differs: {src} {a}, {tgt} {z}",
                d.name
            )));
        }
        checked.push(format!("{} sha256 {}", d.name, short(&a)));
    }
    Ok(Outcome::Succeeded {
        message: Some(format!("digests match: {}", checked.join(", "))),
        recovery_point: None,
        test_vm: None,
    })
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Powers a VM off where it must not run.
pub async fn fence(sites: &TenantSites<'_>, f: &FenceCall) -> Outcome {
    match sites.provider(&f.site) {
        None => Outcome::Unreachable(format!("site {} is not known", f.site)),
        Some(p) => match p.power(&f.vm, PowerAction::PowerOff, &f.op_id).await {
            Ok(_) => Outcome::ok(),
            Err(e) => failed(&f.site, e),
        },
    }
}

/// Sends changed replication settings to the source's running replication.
pub async fn settings(sites: &TenantSites<'_>, c: &SettingsCall) -> Outcome {
    let Some(p) = sites.provider(&c.site) else {
        return Outcome::Unreachable(format!("site {} is not known", c.site));
    };
    let hours = |h: i64| u64::try_from(h).unwrap_or(0);
    let req = ReplicationSettingsRequest {
        operation_id: c.op_id.clone(),
        interval_seconds: u64::try_from(c.replication.interval_seconds).unwrap_or(300),
        recovery_point_retention_hours: hours(c.replication.recovery_point_retention_hours),
        app_consistent_frequency_hours: hours(c.replication.app_consistent_frequency_hours),
    };
    match p.update_replication_settings(&c.vm, &req).await {
        Ok(_) => Outcome::ok(),
        Err(e) => failed(&c.site, e),
    }
}

#[cfg(test)]
mod tests;
