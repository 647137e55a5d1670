//! Conditions in one place: kstatus-compatible Ready / Reconciling / Stalled and the
//! ReplicatedVM's CommitPending, and Conflict (ReplicatedVM and FailoverPlan). A condition's lastTransitionTime only moves when its status
//! does, so rewriting the same conditions is a no-op and costs no API write.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

pub const READY: &str = "Ready";
pub const RECONCILING: &str = "Reconciling";
pub const STALLED: &str = "Stalled";
pub const COMMIT_PENDING: &str = "CommitPending";
/// A FailoverPlan conflict (two plans, or a VM's own settings disagree with its plan): True on
/// the plans concerned and on the VM, False ("NoConflict") otherwise.
pub const CONFLICT: &str = "Conflict";
/// The replication source's agent reports an error for the VM (its `lastError`): True with the
/// agent's message, False (`NoError`) otherwise.
pub const REPLICATION_ERROR: &str = "ReplicationError";
/// The replication source runs with the spec's replication settings: True (`Applied`), False
/// (`SettingsNotApplied`) with what it runs with, or True (`NoReplication`) when nothing
/// replicates.
pub const SETTINGS_APPLIED: &str = "SettingsApplied";

/// The VM runs at both sites and the copy status.activeSite does not name may hold writes the
/// other lacks: True with what to do (nothing starts meanwhile), False (`OneCopyRuns`)
/// otherwise.
pub const SPLIT_BRAIN: &str = "SplitBrain";

/// The replica's newest point was compared block by block with the source's disks at the same
/// instant: True (`Matched`), False (`Diverged`, the source resynchronizes by block hashes)
/// until a later comparison finds them equal. Absent before the first comparison.
pub const REPLICA_VERIFIED: &str = "ReplicaVerified";

/// A Site's agent is called over plain http (`spec.agent.insecure: true`): True (`PlainHTTP`)
/// with what crosses the network unencrypted, False (`HTTPS`) otherwise.
pub const INSECURE: &str = "Insecure";

/// A condition to set, before times and generations are filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

fn status_str(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// Sets `c` in `conds`, keeping lastTransitionTime when the status is unchanged.
pub fn set(conds: &mut Vec<Condition>, c: &Cond, generation: Option<i64>, now: Timestamp) {
    let status = status_str(c.status);
    match conds.iter_mut().find(|x| x.type_ == c.type_) {
        Some(x) => {
            if x.status != status {
                x.last_transition_time = Time(now);
            }
            x.status = status.to_string();
            x.reason = c.reason.clone();
            x.message = c.message.clone();
            x.observed_generation = generation;
        }
        None => conds.push(Condition {
            type_: c.type_.to_string(),
            status: status.to_string(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            observed_generation: generation,
            last_transition_time: Time(now),
        }),
    }
}

/// Sets every condition of `want` and keeps the conditions in a stable order.
pub fn set_all(conds: &mut Vec<Condition>, want: &[Cond], generation: Option<i64>, now: Timestamp) {
    for c in want {
        set(conds, c, generation, now);
    }
    let order = |t: &str| {
        [
            READY,
            RECONCILING,
            STALLED,
            COMMIT_PENDING,
            CONFLICT,
            REPLICATION_ERROR,
            SETTINGS_APPLIED,
            REPLICA_VERIFIED,
            SPLIT_BRAIN,
        ]
        .iter()
        .position(|x| *x == t)
        .unwrap_or(usize::MAX)
    };
    conds.sort_by_key(|c| order(&c.type_));
}

/// Whether the condition `type_` is True.
pub fn is_true(conds: &[Condition], type_: &str) -> bool {
    conds.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn transition_time_moves_only_on_status_change() {
        let mut conds = Vec::new();
        set(
            &mut conds,
            &Cond::new(READY, false, "A", "a"),
            Some(1),
            t(0),
        );
        assert_eq!(conds[0].last_transition_time, Time(t(0)));
        set(
            &mut conds,
            &Cond::new(READY, false, "B", "b"),
            Some(2),
            t(10),
        );
        assert_eq!(conds[0].last_transition_time, Time(t(0)));
        assert_eq!(conds[0].reason, "B");
        assert_eq!(conds[0].observed_generation, Some(2));
        set(
            &mut conds,
            &Cond::new(READY, true, "C", "c"),
            Some(2),
            t(20),
        );
        assert_eq!(conds[0].last_transition_time, Time(t(20)));
        assert!(is_true(&conds, READY));
    }

    #[test]
    fn stable_order() {
        let mut conds = Vec::new();
        set_all(
            &mut conds,
            &[
                Cond::new(STALLED, false, "x", ""),
                Cond::new(READY, true, "x", ""),
                Cond::new(RECONCILING, false, "x", ""),
            ],
            None,
            t(0),
        );
        let types: Vec<_> = conds.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [READY, RECONCILING, STALLED]);
    }
}
