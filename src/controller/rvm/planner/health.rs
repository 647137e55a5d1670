//! Replication health: what the sites' listings say of the replication (state, RPO, recovery
//! points, progress, settings) and how it goes into status.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::input::{Input, Note, SettingsCall};
use crate::api::{
    RecoveryPointRef, RecoveryPointSummary, ReplicatedVMStatus, ReplicationHealth,
    ReplicationProgress, ReplicationSettings, ReplicationState, ReplicationStatus,
};
use crate::controller::conditions::{Cond, REPLICA_VERIFIED, REPLICATION_ERROR};
use crate::controller::observe::{
    Direction, ObservedRecoveryPoint, ObservedReplicationState, Power, Role,
};
use crate::controller::vm_jobs::{newest_job_end, replication_on, resync_due, running_job};

/// A steady VM's replication figures (RPO, last sync, recovery points) are rewritten in status
/// at most this often; live RPO is in the metrics.
pub const STATUS_REFRESH: Duration = Duration::from_secs(300);

/// Ready's and Reconciling's reason while the source replicates with other settings than the
/// spec's (until the settings call has changed them).
pub const SETTINGS_NOT_APPLIED: &str = "SettingsNotApplied";

/// The settings call due: no job runs, the spec replicates, and the source, listed after the
/// newest job ended, replicates outbound with other settings than the spec's.
pub(super) fn settings_call(input: &Input, st: &ReplicatedVMStatus) -> Option<SettingsCall> {
    if running_job(st).is_some() || !input.spec.replication.enabled {
        return None;
    }
    if !matches!(settings_state(input, st), Settings::NotApplied(_)) {
        return None;
    }
    let source = replication_on(st)?.source_site.clone()?;
    input
        .view(&source)
        .vm_since(newest_job_end(st))?
        .replication
        .as_ref()
        .filter(|r| r.direction == Some(Direction::Outbound))?;
    let r = &input.spec.replication;
    Some(SettingsCall {
        op_id: format!(
            "{}-settings-g{}-{}-{}-{}",
            input.uid,
            input.generation.unwrap_or(0),
            r.interval_seconds,
            r.recovery_point_retention_hours,
            r.app_consistent_frequency_hours
        ),
        site: source,
        vm: input.vm_name.to_string(),
        replication: r.clone(),
    })
}

/// The source lists all its settings (after the newest job ended): `status.replication.settings`
/// says the same, also when the controller stopped between a settings call and its record.
pub(super) fn record_listed_settings(input: &Input, st: &mut ReplicatedVMStatus) {
    let Some(source) = replication_on(st).and_then(|r| r.source_site.clone()) else {
        return;
    };
    let Some(l) = input
        .view(&source)
        .vm_since(newest_job_end(st))
        .and_then(|v| v.replication.as_ref())
        .filter(|r| r.direction == Some(Direction::Outbound))
    else {
        return;
    };
    let (Some(i), Some(r), Some(a)) = (
        l.interval_seconds,
        l.retention_hours,
        l.app_consistent_hours,
    ) else {
        return;
    };
    let listed = ReplicationSettings {
        interval_seconds: i,
        recovery_point_retention_hours: r,
        app_consistent_frequency_hours: a,
    };
    if let Some(rep) = st.replication.as_mut()
        && rep.settings.as_ref() != Some(&listed)
    {
        rep.settings = Some(listed);
    }
}

/// Why replication is not yet what the spec asks when the source is still copying or
/// resynchronizing (a resync the source agent started on its own after the replica refused a
/// cycle, or one the controller started): Ready's reason and message.
pub(super) fn replication_in_progress(
    input: &Input,
    st: &ReplicatedVMStatus,
) -> Option<(&'static str, String)> {
    let r = replication_on(st)?;
    let (source, target) = (r.source_site.as_deref()?, r.target_site.as_deref()?);
    let why = input
        .view(source)
        .vm()
        .and_then(|v| v.replication.as_ref()?.last_error.clone())
        .map(|e| format!(" ({e})"))
        .unwrap_or_default();
    match r.state {
        ReplicationState::Resynchronizing => Some((
            "Resynchronizing",
            format!(
                "replication {source} -> {target} is resynchronizing: {source} compares block \
                 hashes with the replica and sends the blocks that differ{why}"
            ),
        )),
        ReplicationState::InitialReplication => Some((
            "InitialReplication",
            format!("replication {source} -> {target}: the initial copy is running{why}"),
        )),
        _ => None,
    }
}

/// A Warning Event when the listing shows the source resynchronizing on its own (the replica
/// refused a cycle: its copy was lost or is not the one the source built on).
pub(super) fn note_source_resync(
    input: &Input,
    st: &ReplicatedVMStatus,
    before: Option<ReplicationState>,
    events: &mut Vec<Note>,
) {
    if before != Some(ReplicationState::Replicating) {
        return;
    }
    let Some(r) = replication_on(st).filter(|r| r.state == ReplicationState::Resynchronizing)
    else {
        return;
    };
    if let Some((_, msg)) = replication_in_progress(input, st) {
        events.push(Note {
            warning: true,
            action: "Resynchronize",
            subject: format!(
                "resync {} -> {}",
                r.source_site.as_deref().unwrap_or_default(),
                r.target_site.as_deref().unwrap_or_default()
            ),
            reason: "Resynchronizing",
            message: msg,
        });
    }
}

pub(super) fn disabled_replication() -> ReplicationStatus {
    ReplicationStatus {
        state: ReplicationState::Disabled,
        source_site: None,
        target_site: None,
        health: None,
        last_sync_time: None,
        rpo_seconds: None,
        settings: None,
        progress: None,
        divergences: None,
    }
}

/// Live RPO: age of the newest recovery point at the replication target.
pub fn live_rpo(input: &Input, st: &ReplicatedVMStatus) -> Option<i64> {
    let r = replication_on(st)?;
    let target = r.target_site.as_deref()?;
    let source = r.source_site.as_deref()?;
    let t = input
        .view(target)
        .vm()
        .and_then(|v| v.recovery_points.as_ref()?.latest.as_ref()?.time)
        .or_else(|| {
            input
                .view(source)
                .vm()?
                .replication
                .as_ref()?
                .last_sync_time
        })?;
    Some((input.now - t).get_seconds().max(0))
}

/// Health from RPO: Warning over 2x the interval, Critical at 3x or more.
pub fn health_of(rpo: i64, interval: i64) -> ReplicationHealth {
    let interval = interval.max(1);
    if rpo >= 3 * interval {
        ReplicationHealth::Critical
    } else if rpo > 2 * interval {
        ReplicationHealth::Warning
    } else {
        ReplicationHealth::Healthy
    }
}

pub(super) fn observed_state(s: ObservedReplicationState) -> Option<ReplicationState> {
    Some(match s {
        ObservedReplicationState::Disabled => ReplicationState::Disabled,
        ObservedReplicationState::InitialReplication => ReplicationState::InitialReplication,
        ObservedReplicationState::Replicating => ReplicationState::Replicating,
        ObservedReplicationState::Resynchronizing => ReplicationState::Resynchronizing,
        ObservedReplicationState::Error => ReplicationState::Error,
        ObservedReplicationState::Other => return None,
    })
}

/// The replication block and recovery point summary as the listings show them now.
pub(super) fn observed_replication(
    input: &Input,
    st: &ReplicatedVMStatus,
) -> Option<(ReplicationStatus, Option<RecoveryPointSummary>)> {
    let r = replication_on(st)?;
    let source = r.source_site.as_deref()?;
    let target = r.target_site.as_deref()?;
    let rps = input
        .view(target)
        .vm()
        .and_then(|v| v.recovery_points.as_ref())
        .map(|p| RecoveryPointSummary {
            count: p.count,
            latest: p.latest.as_ref().map(rp_ref),
            latest_app_consistent: p.latest_app_consistent.as_ref().map(rp_ref),
        });
    // The source, listed after the newest job ended, replicates no more (its replication was
    // stopped, or disabled at the site): the status says so, with no stale health, RPO or
    // direction.
    let src_view = input.view(source);
    if src_view.fetched_since(newest_job_end(st))
        && src_view.vm().is_some_and(|v| {
            v.replication
                .as_ref()
                .is_none_or(|rep| rep.state == ObservedReplicationState::Disabled)
        })
    {
        return Some((
            disabled_replication(),
            rps.or_else(|| st.recovery_points.clone()),
        ));
    }
    let mut new = r.clone();
    let src = src_view.vm();
    if let Some(state) = src
        .and_then(|v| v.replication.as_ref())
        .and_then(|rep| observed_state(rep.state))
        && state != ReplicationState::Disabled
    {
        new.state = state;
    }
    if let Some(t) = src.and_then(|v| v.replication.as_ref()?.last_sync_time) {
        new.last_sync_time = Some(Time(t));
    }
    if let Some(rep) = src
        .and_then(|v| v.replication.as_ref())
        .filter(|r| r.direction != Some(Direction::Inbound))
    {
        new.divergences =
            (rep.divergences > 0).then(|| i64::try_from(rep.divergences).unwrap_or(i64::MAX));
    }
    if new.last_sync_time.is_none()
        && let Some(t) = rps.as_ref().and_then(|p| p.latest.as_ref()?.time.clone())
    {
        new.last_sync_time = Some(t);
    }
    new.rpo_seconds = live_rpo(input, st);
    // Health against the copy frequency the source runs with: a spec change it has not taken
    // is shown as such (SettingsApplied), not as an RPO the site was never asked to meet.
    let interval = src
        .and_then(|v| v.replication.as_ref()?.interval_seconds)
        .unwrap_or(input.spec.replication.interval_seconds);
    new.health = match (new.state, new.rpo_seconds) {
        (
            ReplicationState::Replicating | ReplicationState::Error | ReplicationState::Paused,
            Some(rpo),
        ) => Some(health_of(rpo, interval)),
        (ReplicationState::Error, None) => Some(ReplicationHealth::Critical),
        // The target holds no replica a failover can trust until the copy or resync ends:
        // Warning at best, Critical once the RPO says so.
        (ReplicationState::InitialReplication | ReplicationState::Resynchronizing, rpo) => {
            Some(match rpo.map(|r| health_of(r, interval)) {
                Some(ReplicationHealth::Critical) => ReplicationHealth::Critical,
                _ => ReplicationHealth::Warning,
            })
        }
        _ => new.health,
    };
    // The target, listed after the newest job ended, holds no recovery point of the VM (its
    // copy was lost, or a resync is filling a new one): nothing a failover could start from,
    // whatever the source still reports.
    let target_view = input.view(target);
    let no_point = target_view.fetched_since(newest_job_end(st))
        && target_view.vm().is_none_or(|v| v.recovery_points.is_none());
    if no_point
        && matches!(
            new.state,
            ReplicationState::Replicating | ReplicationState::Error | ReplicationState::Paused
        )
    {
        new.health = Some(ReplicationHealth::Critical);
    }
    if resync_due(st).is_some() {
        // A failed digest verification: the replica differs until the resync has run.
        new.health = Some(ReplicationHealth::Critical);
    }
    // A VM that is off makes no new data, but it does not run either: not Healthy.
    if vm_off(input, st).is_some() && new.health == Some(ReplicationHealth::Healthy) {
        new.health = Some(ReplicationHealth::Warning);
    }
    Some((new, rps.or_else(|| st.recovery_points.clone())))
}

/// The VM is off at the site where it runs (a listing taken after the newest job ended): the
/// Ready message. The controller never starts it on its own; a person does.
pub(super) fn vm_off(input: &Input, st: &ReplicatedVMStatus) -> Option<String> {
    let active = st.active_site.as_deref()?;
    let vm = input.view(active).vm_since(newest_job_end(st))?;
    (vm.power == Power::Off && vm.role == Role::Primary).then(|| {
        format!(
            "VM {} is off at {active}, where it should run; twinsite does not start it on its \
             own: start it at {active}",
            input.vm_name
        )
    })
}

pub(super) fn rp_ref(p: &ObservedRecoveryPoint) -> RecoveryPointRef {
    RecoveryPointRef {
        id: p.id.clone(),
        time: p.time.map(Time),
        app_consistent: p.app_consistent,
    }
}

/// Brings the replication figures up to date, but only at a coarse period: at once when the
/// state, direction or health changes, otherwise when the recorded last sync is at least
/// [`STATUS_REFRESH`] older than the observed one. A steady VM writes its status rarely.
pub(super) fn refresh_replication(input: &Input, st: &mut ReplicatedVMStatus) {
    let Some((new, rps)) = observed_replication(input, st) else {
        return;
    };
    let Some(old) = st.replication.as_ref() else {
        return;
    };
    let significant = old.state != new.state
        || old.health != new.health
        || old.source_site != new.source_site
        || old.target_site != new.target_site
        || old.rpo_seconds.is_none() && new.rpo_seconds.is_some()
        || old.divergences != new.divergences;
    let stale = match (&old.last_sync_time, &new.last_sync_time) {
        (None, Some(_)) => true,
        (Some(o), Some(n)) => (n.0 - o.0).get_seconds() >= STATUS_REFRESH.as_secs() as i64,
        _ => false,
    };
    if significant || stale {
        st.replication = Some(new);
        st.recovery_points = rps;
    }
}

/// The source's bulk transfer (initial copy or resync) as the newest listing of the source
/// shows it: copied into status while one runs, removed once the listing shows none. Kept as
/// it was while the source cannot be listed. A listing changes once per site poll, so this
/// changes status at most that often.
pub(super) fn refresh_progress(input: &Input, st: &mut ReplicatedVMStatus) {
    let Some(r) = st.replication.as_mut() else {
        return;
    };
    let observed = match (r.state, r.source_site.as_deref()) {
        (ReplicationState::Disabled, _) | (_, None) => None,
        (_, Some(source)) => {
            let view = input.view(source);
            if !view.reachable() {
                return;
            }
            view.vm()
                .and_then(|v| v.replication.as_ref())
                .filter(|rep| {
                    rep.direction != Some(Direction::Inbound)
                        && rep
                            .peer_site
                            .as_deref()
                            .is_none_or(|p| Some(p) == r.target_site.as_deref())
                })
                .and_then(|rep| rep.progress)
        }
    };
    r.progress = observed.map(|(done, total)| progress_of(done, total));
}

/// Bytes done of a total as status shows them (done never past total).
pub fn progress_of(done: u64, total: u64) -> ReplicationProgress {
    let done = done.min(total);
    let percent = if total == 0 {
        100
    } else {
        (u128::from(done) * 100 / u128::from(total)) as i64
    };
    ReplicationProgress {
        done_bytes: i64::try_from(done).unwrap_or(i64::MAX),
        total_bytes: i64::try_from(total).unwrap_or(i64::MAX),
        percent,
        summary: format!("{percent}%"),
    }
}

pub(super) fn refresh_replication_now(input: &Input, st: &mut ReplicatedVMStatus) {
    if let Some((new, rps)) = observed_replication(input, st) {
        st.replication = Some(new);
        st.recovery_points = rps;
    }
}

/// Whether the replication source runs with the spec's settings.
pub(super) enum Settings {
    /// The source has not been listed since the newest job ended, or does not say.
    Unknown,
    Applied,
    NoReplication,
    /// Ready's message: what the source runs with, and the ways on.
    NotApplied(String),
}

/// The source's listing (taken after the newest job ended) against the spec's settings. A
/// settings change is sent to the running replication ([`settings_call`]); until the source
/// shows it, it is not applied.
pub(super) fn settings_state(input: &Input, st: &ReplicatedVMStatus) -> Settings {
    let Some(r) = replication_on(st) else {
        return Settings::NoReplication;
    };
    let Some(source) = r.source_site.as_deref() else {
        return Settings::NoReplication;
    };
    let spec = &input.spec.replication;
    // What the source runs with: its listing, else what was last sent to it (an older site
    // does not list retention and app-consistent frequency).
    let listed = input
        .view(source)
        .vm_since(newest_job_end(st))
        .and_then(|v| v.replication.as_ref());
    let sent = r.settings.as_ref();
    let interval = listed
        .and_then(|l| l.interval_seconds)
        .or(sent.map(|s| s.interval_seconds));
    let retention = listed
        .and_then(|l| l.retention_hours)
        .or(sent.map(|s| s.recovery_point_retention_hours));
    let app_consistent = listed
        .and_then(|l| l.app_consistent_hours)
        .or(sent.map(|s| s.app_consistent_frequency_hours));
    let mut differ = Vec::new();
    let mut check = |field: &str, runs: Option<i64>, asked: i64| {
        if let Some(runs) = runs.filter(|r| *r != asked) {
            differ.push(format!("{field} {runs} (spec: {asked})"));
        }
    };
    check("intervalSeconds", interval, spec.interval_seconds);
    check(
        "recoveryPointRetentionHours",
        retention,
        spec.recovery_point_retention_hours,
    );
    check(
        "appConsistentFrequencyHours",
        app_consistent,
        spec.app_consistent_frequency_hours,
    );
    if differ.is_empty() {
        return if interval.is_some() {
            Settings::Applied
        } else {
            Settings::Unknown
        };
    }
    Settings::NotApplied(format!(
        "site {source} replicates VM {} with {}; the spec's settings are being sent to its \
         running replication (no new copy, the recovery points stay)",
        input.vm_name,
        differ.join(", ")
    ))
}

/// Condition ReplicaVerified from the replication source's listing: how its newest block-by-block
/// comparison of the replica came out. `Keep` while the source cannot be listed; `Remove` when
/// nothing replicates or the source has not compared yet in this direction.
pub(super) enum Verified {
    Keep,
    Remove,
    Set(Cond),
}

pub(super) fn replica_verified(input: &Input, st: &ReplicatedVMStatus) -> Verified {
    let Some((source, target)) = replication_on(st)
        .and_then(|r| Some((r.source_site.as_deref()?, r.target_site.as_deref()?)))
    else {
        return Verified::Remove;
    };
    let view = input.view(source);
    if !view.reachable() {
        return Verified::Keep;
    }
    let Some(rep) = view
        .vm()
        .and_then(|v| v.replication.as_ref())
        .filter(|r| r.direction != Some(Direction::Inbound))
    else {
        return Verified::Remove;
    };
    let Some(v) = rep.verification.as_ref() else {
        return Verified::Remove;
    };
    let earlier = match (&rep.last_divergence, rep.divergences) {
        (Some(d), n) if n > 0 => format!(
            "; {n} divergence(s) found and resynchronized since replication began, the newest \
             at {}: {}",
            d.time,
            diverged_blocks(d)
        ),
        _ => String::new(),
    };
    Verified::Set(if v.differing_blocks == 0 {
        Cond::new(
            REPLICA_VERIFIED,
            true,
            "Matched",
            format!(
                "every block of the newest recovery point at {target} matched {source}'s disks \
                 at {}{earlier}",
                v.time
            ),
        )
    } else {
        Cond::new(
            REPLICA_VERIFIED,
            false,
            "Diverged",
            divergence(v, source, target),
        )
    })
}

/// What the source says of the newest comparison that found its replica different.
pub(super) fn newest_divergence(input: &Input, st: &ReplicatedVMStatus) -> Option<String> {
    let r = replication_on(st)?;
    let (source, target) = (r.source_site.as_deref()?, r.target_site.as_deref()?);
    let d = input
        .view(source)
        .vm()?
        .replication
        .as_ref()?
        .last_divergence
        .clone()?;
    Some(divergence(&d, source, target))
}

/// What a comparison that found the replica at `target` different from `source` says.
fn divergence(v: &crate::site::Verification, source: &str, target: &str) -> String {
    format!(
        "{} of the newest recovery point at {target} differed from {source}'s disks at {}: \
         {source} resynchronizes by block hashes and compares again; if this recurs, check the \
         storage of site {target}",
        diverged_blocks(v),
        v.time
    )
}

/// "3 block(s) of disk vda"
pub(super) fn diverged_blocks(v: &crate::site::Verification) -> String {
    format!(
        "{} block(s){}",
        v.differing_blocks,
        v.disk
            .as_deref()
            .map(|d| format!(" of disk {d}"))
            .unwrap_or_default()
    )
}

/// Condition ReplicationError from the replication source's listing: True with the agent's
/// own message while it reports an error for the VM's outbound replication (a copy or cycle
/// that keeps failing: the peer refuses it, a disk is full, the peer does not answer). None
/// when the source cannot be listed now.
pub(super) fn replication_error(input: &Input, st: &ReplicatedVMStatus) -> Option<Cond> {
    let no_error = || Some(Cond::new(REPLICATION_ERROR, false, "NoError", ""));
    let Some(source) = replication_on(st).and_then(|r| r.source_site.as_deref()) else {
        return no_error();
    };
    let view = input.view(source);
    if !view.reachable() {
        return None;
    }
    let error = view
        .vm()
        .and_then(|v| v.replication.as_ref())
        .filter(|r| r.direction != Some(Direction::Inbound))
        .and_then(|r| r.last_error.as_deref());
    match error {
        Some(e) => Some(Cond::new(
            REPLICATION_ERROR,
            true,
            "AgentError",
            format!(
                "site {source} reports an error replicating VM {}: {e}",
                input.vm_name
            ),
        )),
        None => no_error(),
    }
}
