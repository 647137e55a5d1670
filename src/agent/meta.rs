//! What a VM's `vm.json` holds: power, role, disks, outbound replication (at a source),
//! inbound replication and recovery points (at a replica), intents, operation answers; and the
//! views of them the agent's listing shows. No I/O here.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::site::{
    Direction, DiskSpec, Power, RecoveryPoint, RecoveryPointKind, RecoveryPointsSummary,
    ReplicationInfo, ReplicationMode, ReplicationState, Role, TestCopyInfo,
};

/// Answers of the last operations of a VM kept in its `vm.json` (older ones are dropped).
const OPS_KEPT: usize = 32;

/// Persisted part of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct VmMeta {
    pub(super) name: String,
    pub(super) power: Power,
    pub(super) role: Role,
    pub(super) integration_services: bool,
    pub(super) disks: Vec<DiskSpec>,
    #[serde(default)]
    pub(super) network: Option<String>,
    /// Outbound replication (at the source).
    #[serde(default)]
    pub(super) outbound: Option<Outbound>,
    /// Inbound replication and recovery points (at the replica).
    #[serde(default)]
    pub(super) inbound: Option<Inbound>,
    /// Id of the cycle (as the peer committed it) since whose state the change tracker holds
    /// every change of the disks: the last cycle acknowledged (a source), or the last cycle
    /// committed before a failover (a replica that became primary). Reverse resync sends only
    /// tracked blocks when both sides name the same cycle. `None`: unknown.
    #[serde(default)]
    pub(super) journal_base: Option<String>,
    /// The controller allowed this site to replicate into this VM (`replication/accept`): the
    /// next bulk transfer from it may turn the VM into its replica. Nothing else does.
    #[serde(default)]
    pub(super) accept_from: Option<String>,
    /// The source's hypervisor definition of the VM (at a replica of a libvirt domain): what a
    /// failover defines here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) definition: Option<String>,
    /// Set when the VM is a hypervisor domain: its disks are the domain's images, not files of
    /// the agent's, and the hypervisor tracks their changes.
    #[serde(default)]
    pub(super) domain: Option<DomainLink>,
    /// Answers of operations on this VM, saved in the same write as their effect, so a retry
    /// after a crash answers the first result instead of doing (or refusing) it again.
    #[serde(default)]
    pub(super) ops: Vec<OpDone>,
    /// Namespace of the ReplicatedVM that protects this VM (recorded by the controller's
    /// `enable` at a source and `accept` at a replica): calls from another namespace are
    /// refused. `None`: no namespace claimed it yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) owner: Option<String>,
}

/// What the agent keeps of a VM that is a hypervisor domain.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DomainLink {
    /// The checkpoint since which the hypervisor tracks every change of the disks: started
    /// by the last transfer the peer acknowledged. `None`: no transfer yet (a full copy next).
    pub(super) checkpoint: Option<String>,
}

/// A finished operation of a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct OpDone {
    pub(super) id: String,
    pub(super) answer: serde_json::Value,
}

impl VmMeta {
    /// A new VM's metadata.
    pub(super) fn new(name: &str, power: Power, role: Role, spec: (&[DiskSpec], bool)) -> Self {
        Self {
            name: name.to_string(),
            power,
            role,
            integration_services: spec.1,
            disks: spec.0.to_vec(),
            network: None,
            outbound: None,
            inbound: None,
            journal_base: None,
            accept_from: None,
            domain: None,
            definition: None,
            ops: Vec::new(),
            owner: None,
        }
    }

    /// Refuses a call from namespace `caller` when another namespace owns the VM. A call that
    /// names no namespace (an operator's, or an older controller's) is not refused.
    pub(super) fn check_owner(&self, caller: Option<&str>) -> Result<(), super::ApiError> {
        owner_check(&self.name, self.owner.as_deref(), caller)
    }

    /// Records `caller` as the VM's owner (checked first); saved with the next `save`.
    pub(super) fn claim(&mut self, caller: Option<&str>) -> Result<(), super::ApiError> {
        self.check_owner(caller)?;
        if let Some(ns) = caller {
            self.owner = Some(ns.to_string());
        }
        Ok(())
    }

    /// Records the answer of operation `id`; saved with the next `save`.
    pub(super) fn note_op(&mut self, id: Option<&str>, answer: &serde_json::Value) {
        let Some(id) = id else { return };
        if self.ops.iter().any(|o| o.id == id) {
            return;
        }
        self.ops.push(OpDone {
            id: id.to_string(),
            answer: answer.clone(),
        });
        let extra = self.ops.len().saturating_sub(OPS_KEPT);
        self.ops.drain(..extra);
    }

    pub(super) fn op_answer(&self, id: &str) -> Option<serde_json::Value> {
        self.ops
            .iter()
            .find(|o| o.id == id)
            .map(|o| o.answer.clone())
    }
}

/// The refusal of a call from namespace `caller` for VM `vm` that namespace `owner` owns.
pub(super) fn owner_check(
    vm: &str,
    owner: Option<&str>,
    caller: Option<&str>,
) -> Result<(), super::ApiError> {
    match (owner, caller) {
        (Some(owner), Some(caller)) if owner != caller => Err(super::ApiError {
            reason: Some(crate::site::VM_OWNED_BY_OTHER_NAMESPACE),
            ..super::ApiError::conflict(format!(
                "VM {vm} at this site belongs to a ReplicatedVM of namespace {owner}; namespace \
                 {caller} may not change it (name another VM, or delete the ReplicatedVM of \
                 namespace {owner} first)"
            ))
        }),
        _ => Ok(()),
    }
}

/// Outbound replication settings and progress (at the source).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outbound {
    pub peer_site: String,
    pub peer_url: String,
    /// Bearer token of the peer agent (kept in vm.json, never printed by `Debug`).
    pub peer_token: crate::secret::Secret,
    /// CA of an https peer.
    #[serde(default)]
    pub peer_ca_pem: Option<String>,
    pub interval_seconds: u64,
    pub retention_hours: u64,
    pub app_consistent_hours: u64,
    pub state: ReplicationState,
    /// Set until the bulk transfer (whole disk or resync) is acknowledged.
    pub bulk: Option<ReplicationMode>,
    pub stopped: bool,
    pub last_sync_time: Option<Timestamp>,
    pub last_app_consistent: Option<Timestamp>,
    pub bytes_sent: u64,
    pub blocks_resent: u64,
    pub last_error: Option<String>,
    /// A cycle whose commit was sent and never answered: the replica may hold it, so the next
    /// cycle names it beside the journal base as a parent the replica may be at.
    #[serde(default)]
    pub in_doubt: Option<String>,
    /// Cycles in doubt before `in_doubt`, oldest first, since the last acknowledgement: the
    /// replica may hold any of them (a commit that committed but did not answer, then one that
    /// failed before it committed). Every block of them is still unacknowledged, so the next
    /// cycle applies onto each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_doubt_earlier: Vec<String>,
    /// The newest freeze of the guest's filesystems for an app-consistent point.
    #[serde(default)]
    pub last_quiesce: Option<crate::site::Quiesce>,
    /// The newest block-by-block comparison of the replica with this source.
    #[serde(default)]
    pub last_verification: Option<crate::site::Verification>,
    /// Verifications that found the replica different (each started a resync).
    #[serde(default)]
    pub divergences: u64,
    /// The newest verification that found the replica different.
    #[serde(default)]
    pub last_divergence: Option<crate::site::Verification>,
}

impl Outbound {
    /// Outbound replication as `enable` starts it: the bulk transfer of `mode` first.
    pub fn from_enable(req: &crate::site::EnableReplication) -> Self {
        Self {
            peer_site: req.peer_site.clone(),
            peer_url: req.peer_url.clone(),
            peer_token: req.peer_token.clone(),
            peer_ca_pem: req.peer_ca_pem.clone(),
            interval_seconds: req.interval_seconds,
            retention_hours: req.recovery_point_retention_hours,
            app_consistent_hours: req.app_consistent_frequency_hours,
            state: match req.mode {
                ReplicationMode::Initial => ReplicationState::InitialReplication,
                ReplicationMode::Resync => ReplicationState::Resynchronizing,
            },
            bulk: Some(req.mode),
            stopped: false,
            last_sync_time: None,
            last_app_consistent: None,
            bytes_sent: 0,
            blocks_resent: 0,
            last_error: None,
            in_doubt: None,
            in_doubt_earlier: Vec::new(),
            last_quiesce: None,
            last_verification: None,
            divergences: 0,
            last_divergence: None,
        }
    }
}

/// New settings of a running outbound replication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboundSettings {
    pub interval_seconds: u64,
    pub retention_hours: u64,
    pub app_consistent_hours: u64,
}

impl Outbound {
    /// Takes new settings; the replication goes on where it is (the bulk transfer under way,
    /// the journal base, the replica's points all stay). The replica takes the retention with
    /// the next cycle's `begin`.
    pub fn apply_settings(&mut self, s: OutboundSettings) {
        self.interval_seconds = s.interval_seconds;
        self.retention_hours = s.retention_hours;
        self.app_consistent_hours = s.app_consistent_hours;
    }
}

/// One recovery point at the replica.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RpMeta {
    pub seq: u64,
    pub time: Timestamp,
    pub kind: RecoveryPointKind,
    /// Undo segments (applied in order) that take the image from this point to the previous.
    pub undo: Vec<String>,
    /// Staging file still to be applied to the image: a crash between commit and apply, or a
    /// point received while a drill copy runs on the image (applied when the drill ends).
    #[serde(default)]
    pub staged: Option<String>,
    /// The undo segment is still to be written: it is read from the image just before the
    /// staged blocks are applied, when the image holds the previous point (a deferred point).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub undo_at_apply: bool,
    /// Id of the consistent cut that made this point.
    #[serde(default)]
    pub cut_id: Option<String>,
}

impl RpMeta {
    pub(super) fn view(&self) -> RecoveryPoint {
        RecoveryPoint {
            id: format!("rp-{:06}", self.seq),
            time: self.time,
            app_consistent: self.kind == RecoveryPointKind::AppConsistent,
            kind: self.kind,
            cut_id: self.cut_id.clone(),
        }
    }
}

/// Inbound replication and recovery points (at the replica).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Inbound {
    pub source_site: String,
    pub accepting: bool,
    pub retention_hours: u64,
    pub next_seq: u64,
    pub rps: Vec<RpMeta>,
    /// Cycle id and point of the last commit, so a repeated commit answers the same point.
    pub last_cycle: Option<(String, Option<RecoveryPoint>)>,
    /// The cycle `begin` opened and that has not committed: blocks and a commit of any other
    /// cycle are refused (a second `begin` discarded that cycle's staged blocks).
    #[serde(default)]
    pub open_cycle: Option<String>,
    /// The open transfer writes straight into the image: an initial copy that emptied it.
    /// Every other transfer is staged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open_direct: bool,
    /// A resync committed and not yet applied: its blocks wait in a staging file and land with
    /// the next cycle, as that cycle's point (a resync alone is no state the source had: it
    /// reads the source's disk while the guest writes). Until then the image stays the newest
    /// point. `last_cycle` names the resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<StagedResync>,
    pub last_sync_time: Option<Timestamp>,
    pub blocks_refused: u64,
    /// Recovery points are history of the replica only until the VM runs here.
    #[serde(default)]
    pub failed_over: bool,
    #[serde(default)]
    pub test_copy: Option<(String, String, RecoveryPoint)>,
    /// A failover under way: the image is being rolled back to point `to_seq`. Recorded before
    /// the image changes, so a crash mid-rollback is finished at the next start.
    #[serde(default)]
    pub rollback: Option<Rollback>,
}

/// A committed resync's staging file, `len` bytes long at its commit: a cycle that appended
/// to it and did not commit is cut away by the next cycle's `begin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StagedResync {
    pub file: String,
    pub len: u64,
}

/// The intent of a failover, recorded before its rollback rewrites the image.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rollback {
    pub to_seq: u64,
    pub operation_id: Option<String>,
}

pub(super) fn replication_info(meta: &VmMeta, pending_bytes: u64) -> ReplicationInfo {
    if let Some(o) = &meta.outbound {
        return ReplicationInfo {
            state: if o.stopped {
                ReplicationState::Disabled
            } else {
                o.state
            },
            direction: Some(Direction::Outbound),
            peer_site: Some(o.peer_site.clone()),
            interval_seconds: o.interval_seconds,
            last_sync_time: o.last_sync_time,
            pending_bytes,
            bytes_sent: o.bytes_sent,
            last_error: o.last_error.clone(),
            blocks_refused: o.blocks_resent,
            recovery_point_retention_hours: Some(o.retention_hours),
            app_consistent_frequency_hours: Some(o.app_consistent_hours),
            // Held in memory by the transfer's task; the listing routes add it.
            progress: None,
            last_quiesce: o.last_quiesce,
            last_verification: o.last_verification.clone(),
            divergences: o.divergences,
            last_divergence: o.last_divergence.clone(),
        };
    }
    if let Some(i) = &meta.inbound
        && meta.role == Role::Replica
    {
        return ReplicationInfo {
            state: if i.accepting {
                ReplicationState::Replicating
            } else {
                ReplicationState::Disabled
            },
            direction: Some(Direction::Inbound),
            peer_site: Some(i.source_site.clone()),
            last_sync_time: i.last_sync_time,
            blocks_refused: i.blocks_refused,
            recovery_point_retention_hours: Some(i.retention_hours),
            ..Default::default()
        };
    }
    ReplicationInfo::default()
}

pub(super) fn rp_summary(meta: &VmMeta) -> RecoveryPointsSummary {
    let Some(i) = &meta.inbound else {
        return RecoveryPointsSummary::default();
    };
    RecoveryPointsSummary {
        count: i.rps.len() as u64,
        latest: i.rps.last().map(RpMeta::view),
        latest_app_consistent: i
            .rps
            .iter()
            .rev()
            .find(|p| p.kind == RecoveryPointKind::AppConsistent)
            .map(RpMeta::view),
    }
}

pub(super) fn test_copy_of(meta: &VmMeta) -> Option<TestCopyInfo> {
    let (name, network, rp) = meta.inbound.as_ref()?.test_copy.clone()?;
    Some(TestCopyInfo {
        vm_name: name,
        network,
        recovery_point: rp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::ReplicationMode;

    #[test]
    fn debug_of_outbound_hides_the_peer_token() {
        let o = Outbound::from_enable(&crate::site::EnableReplication {
            operation_id: "en-1".into(),
            peer_site: "secondary".into(),
            peer_url: "https://secondary:7101".into(),
            peer_token: "s3cr3t-peer-token".into(),
            peer_ca_pem: None,
            interval_seconds: 30,
            recovery_point_retention_hours: 1,
            app_consistent_frequency_hours: 0,
            mode: ReplicationMode::Initial,
        });
        let dbg = format!("{o:?} {o:#?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("secondary"), "{dbg}");
        // vm.json keeps the token (the agent needs it after a restart), in the same format.
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["peerToken"], "s3cr3t-peer-token");
        let back: Outbound = serde_json::from_value(json).unwrap();
        assert_eq!(format!("{back:?}"), format!("{o:?}"));
    }
}
