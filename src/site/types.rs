//! JSON of the site agent API (docs/agent-api.md).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Request header the controller sends with every call that changes a VM: the namespace of
/// the ReplicatedVM (or FailoverPlan) it acts for. A site VM belongs to the namespace that
/// protected it; a call from another namespace is refused (409, reason
/// [`VM_OWNED_BY_OTHER_NAMESPACE`]) and changes nothing.
pub const NAMESPACE_HEADER: &str = "twinsite-namespace";

/// `reason` of a 409 for a VM that belongs to another namespace's ReplicatedVM.
pub const VM_OWNED_BY_OTHER_NAMESPACE: &str = "VMOwnedByOtherNamespace";

/// Power state of a VM at a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Power {
    Running,
    Off,
}

/// What a VM is at a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Runs or may run here.
    Primary,
    /// Holds recovery points received from a peer.
    Replica,
    /// A drill copy made by a test failover.
    TestCopy,
}

/// One virtual disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    pub name: String,
    pub size_bytes: u64,
    /// Image format of a hypervisor's disk (`qcow2`, `raw`); absent on builtin VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// Replication state of a VM at one site.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationState {
    #[default]
    Disabled,
    InitialReplication,
    Replicating,
    Resynchronizing,
    Error,
}

/// Which way the VM's replication flows, seen from this site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// The `replication` block of a VM. `state` is `Disabled` when replication was never enabled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationInfo {
    pub state: ReplicationState,
    #[serde(default)]
    pub direction: Option<Direction>,
    #[serde(default)]
    pub peer_site: Option<String>,
    #[serde(default)]
    pub interval_seconds: u64,
    #[serde(default)]
    pub last_sync_time: Option<Timestamp>,
    /// Bytes written since the last acknowledged cycle (at the source).
    #[serde(default)]
    pub pending_bytes: u64,
    /// Payload bytes sent to the peer since replication was enabled (at the source).
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Blocks refused for a bad checksum (at the replica) or sent again (at the source).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub blocks_refused: u64,
    /// Hours of hourly recovery points kept: what the source sends with its cycles (at the
    /// source), or what the replica applies (at the replica, from the last cycle begun).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_retention_hours: Option<u64>,
    /// How often an app-consistent point is taken, in hours, 0 = never (at the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_consistent_frequency_hours: Option<u64>,
    /// The bulk transfer (initial replication or resync) under way, at the source; absent when
    /// none runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TransferProgress>,
    /// The newest app-consistent point taken with the guest's filesystems frozen (a libvirt
    /// domain's guest agent), at the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_quiesce: Option<Quiesce>,
    /// The newest comparison of the replica's newest point with the source's disks at the same
    /// instant, block by block (at the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<Verification>,
    /// Verifications that found the replica different from the source, each followed by a
    /// resync (at the source).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub divergences: u64,
    /// The newest comparison that found the replica different (at the source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_divergence: Option<Verification>,
}

/// A comparison of every block of a replica's newest point with the source's disks at the
/// instant of that point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    /// The instant compared (the cycle's cut).
    pub time: Timestamp,
    /// Blocks that differed, over every disk (0: the replica held the source's data).
    pub differing_blocks: u64,
    /// The first disk that differed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// A freeze of a guest's filesystems around the checkpoint of an app-consistent point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quiesce {
    pub time: Timestamp,
    /// How long the filesystems stayed frozen (freeze asked to thaw answered).
    pub frozen_millis: u64,
    /// How many filesystems the guest agent froze.
    pub filesystems: u64,
}

/// How far a bulk transfer has come: of the `totalBytes` it reads and compares or sends, the
/// `doneBytes` the peer has acknowledged (or that needed no sending). `doneBytes` reaches
/// `totalBytes` when the last batch is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Kind of a recovery point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryPointKind {
    /// Made by a replication cycle.
    CrashConsistent,
    /// Made after the VM's writes were quiesced (needs integration services).
    AppConsistent,
    /// The last point of an hour, kept for `recoveryPointRetentionHours`.
    Hourly,
}

/// A recovery point at the replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPoint {
    /// `rp-NNNNNN`, increasing per VM.
    pub id: String,
    pub time: Timestamp,
    pub app_consistent: bool,
    pub kind: RecoveryPointKind,
    /// Id of the consistent cut that made this point, when a cut made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_id: Option<String>,
}

/// The `recoveryPoints` block of a VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointsSummary {
    pub count: u64,
    #[serde(default)]
    pub latest: Option<RecoveryPoint>,
    #[serde(default)]
    pub latest_app_consistent: Option<RecoveryPoint>,
}

/// The `testCopy` block of a replica VM whose drill copy exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestCopyInfo {
    pub vm_name: String,
    pub network: String,
    pub recovery_point: RecoveryPoint,
}

/// A VM at a site.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vm {
    pub name: String,
    /// `libvirt` on a VM that is a libvirt domain; absent on builtin VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    pub power: Power,
    pub role: Role,
    pub integration_services: bool,
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub replication: ReplicationInfo,
    #[serde(default)]
    pub recovery_points: RecoveryPointsSummary,
    #[serde(default)]
    pub test_copy: Option<TestCopyInfo>,
    /// Network of a drill copy (TestCopy role only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Namespace of the ReplicatedVM that protects the VM, as the controller's `enable` or
    /// `accept` recorded it ([`NAMESPACE_HEADER`]); absent when none did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// `GET /v1/vms`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmList {
    pub site: String,
    /// The accelerator the site's replicas of hypervisor domains boot under (`kvm` or `tcg`);
    /// absent without a hypervisor (the builtin runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    pub vms: Vec<Vm>,
    /// VMs whose state on disk could not be loaded (the others serve): name and reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub broken: Vec<BrokenVm>,
}

/// A VM the agent could not load: its data needs a person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokenVm {
    pub name: String,
    pub error: String,
}

/// `PUT /v1/vms/{vm}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateVm {
    pub disks: Vec<DiskSpec>,
    #[serde(default = "default_power")]
    pub power: Power,
    #[serde(default)]
    pub integration_services: bool,
}

fn default_power() -> Power {
    Power::Running
}

/// `POST /v1/vms/{vm}/power` actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PowerAction {
    Start,
    /// Graceful; fails without integration services.
    Shutdown,
    PowerOff,
}

/// `POST /v1/vms/{vm}/power`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PowerRequest {
    pub action: PowerAction,
    #[serde(default)]
    pub operation_id: Option<String>,
}

/// How replication starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationMode {
    /// Send the whole disk.
    #[default]
    Initial,
    /// Send only the blocks that differ from the peer's copy (reprotect, failback).
    Resync,
}

/// `POST /v1/vms/{vm}/replication/enable`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnableReplication {
    pub operation_id: String,
    pub peer_site: String,
    pub peer_url: String,
    /// Bearer token the source presents to the peer agent (never printed by `Debug`).
    pub peer_token: crate::secret::Secret,
    /// PEM of the CA that signed the peer agent's certificate, for https peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_ca_pem: Option<String>,
    pub interval_seconds: u64,
    #[serde(default)]
    pub recovery_point_retention_hours: u64,
    #[serde(default)]
    pub app_consistent_frequency_hours: u64,
    #[serde(default)]
    pub mode: ReplicationMode,
}

/// `POST /v1/vms/{vm}/replication/settings`, at the source: new settings for a running
/// replication, in force from its next cycle (no bulk transfer, no recovery point dropped but
/// those the new retention drops at the replica).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationSettingsRequest {
    pub operation_id: String,
    pub interval_seconds: u64,
    pub recovery_point_retention_hours: u64,
    pub app_consistent_frequency_hours: u64,
}

/// Body of `POST /v1/vms/{vm}/replication/accept`, at the target of replication: the VM here
/// may become (or stay) a replica of `sourceSite`. The data path never turns a VM that is not a
/// replica into one on its own; this call, from the controller, is the only way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptReplication {
    pub operation_id: String,
    pub source_site: String,
}

/// Body of `PUT /v1/peer-credentials/{site}` (the controller only): the credentials of the
/// pair of this site and `site`. Each is optional; the other one is left as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerCredentials {
    /// What `site`'s agent presents here: from now on the only credential of that site,
    /// reaching the replica routes of the VMs that replicate from it (the one before stops
    /// working at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<crate::secret::Secret>,
    /// What this agent presents to `site`'s agent: replaces the peer token of every VM here
    /// that replicates to `site`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<crate::secret::Secret>,
}

/// Answer of `PUT /v1/peer-credentials/{site}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerCredentialsResult {
    pub site: String,
    /// The inbound credential was new here (`false`: it was installed already, or not given).
    pub inbound_changed: bool,
    /// VMs replicating to `site` whose peer token was replaced.
    pub outbound_vms: u64,
}

/// Answer of `POST /v1/vms/{vm}/replication/accept`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AcceptResult {
    pub source_site: String,
}

/// Body of calls that carry only an operation id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationRequest {
    pub operation_id: String,
}

/// Which recovery point a failover uses: `Latest`, `LatestProcessed`, `LatestAppConsistent` or
/// an id (`rp-...`). On the wire it is that string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RecoveryPointSelector {
    Latest,
    LatestProcessed,
    LatestAppConsistent,
    Id(String),
}

impl From<String> for RecoveryPointSelector {
    fn from(s: String) -> Self {
        match s.as_str() {
            "Latest" => Self::Latest,
            "LatestProcessed" => Self::LatestProcessed,
            "LatestAppConsistent" => Self::LatestAppConsistent,
            _ => Self::Id(s),
        }
    }
}

impl From<RecoveryPointSelector> for String {
    fn from(s: RecoveryPointSelector) -> Self {
        match s {
            RecoveryPointSelector::Latest => "Latest".into(),
            RecoveryPointSelector::LatestProcessed => "LatestProcessed".into(),
            RecoveryPointSelector::LatestAppConsistent => "LatestAppConsistent".into(),
            RecoveryPointSelector::Id(id) => id,
        }
    }
}

impl std::fmt::Display for RecoveryPointSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from(self.clone()))
    }
}

/// `POST /v1/vms/{vm}/failover`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRequest {
    pub operation_id: String,
    pub recovery_point: RecoveryPointSelector,
    /// Networks of the source site that have another name here: each NIC of the VM on a
    /// `from` network is attached to its `to` network (a domain's; other VMs have no NICs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_mappings: Vec<NetworkMap>,
}

/// A network of the source site and the network of the target that replaces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMap {
    pub from: String,
    pub to: String,
}

/// `POST /v1/vms/{vm}/test-failover`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverRequest {
    pub operation_id: String,
    pub recovery_point: RecoveryPointSelector,
    pub network: String,
}

/// `POST /v1/cuts` at a source site: one recovery point for each listed VM that replicates
/// outbound from this site, all cut at the same instant (writes to every one of them are held
/// off while the cut is taken). Idempotent by `cutId`: a repeated call answers the first cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CutRequest {
    pub cut_id: String,
    /// Candidate VMs; those that do not replicate outbound from this site are left out.
    pub vms: Vec<String>,
}

/// One VM's point of a cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CutPoint {
    pub vm: String,
    /// The acknowledged point at the replica; its `cutId` is the cut's id.
    pub recovery_point: RecoveryPoint,
}

/// Answer of `POST /v1/cuts`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CutResult {
    pub cut_id: String,
    /// The instant of the cut.
    pub time: Timestamp,
    pub points: Vec<CutPoint>,
    /// How long the cut's running hypervisor domains stayed paused while their checkpoints
    /// were taken; absent when the cut had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_millis: Option<u64>,
}

/// Answer of `replication/sync`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncResult {
    pub recovery_point: RecoveryPoint,
}

/// Answer of `failover`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverResult {
    pub recovery_point: RecoveryPoint,
}

/// Answer of `test-failover`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverResult {
    pub vm_name: String,
    pub recovery_point: RecoveryPoint,
}

/// Answer of `test-failover/cleanup`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CleanupResult {
    /// Name of the drill copy that was (or would have been) deleted.
    pub vm_name: String,
    /// False when there was no copy to delete.
    pub deleted: bool,
}

/// Answer of `commit`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitResult {
    /// How many recovery points were deleted.
    pub deleted_recovery_points: u64,
}

/// Answer of `delete`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteResult {
    pub deleted: bool,
}

/// Answer of `GET /v1/vms/{vm}/recovery-points`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointList {
    pub recovery_points: Vec<RecoveryPoint>,
}

/// Answer of the digest route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestResponse {
    pub sha256: String,
}

/// Error body of every refused call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// A machine-readable reason where the caller acts on it (`ResyncRequired`: the replica
    /// does not hold the parent the cycle names; the source must resynchronize).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_round_trips_as_string() {
        for s in [
            "Latest",
            "LatestProcessed",
            "LatestAppConsistent",
            "rp-000003",
        ] {
            let sel: RecoveryPointSelector = serde_json::from_value(s.into()).unwrap();
            assert_eq!(serde_json::to_value(&sel).unwrap(), serde_json::json!(s));
        }
        let sel: RecoveryPointSelector = serde_json::from_str("\"rp-000001\"").unwrap();
        assert_eq!(sel, RecoveryPointSelector::Id("rp-000001".into()));
    }

    #[test]
    fn vm_matches_documented_json() {
        let doc = serde_json::json!({"name": "web-01", "power": "Running", "role": "Primary", "integrationServices": true,
         "disks": [{"name": "disk0", "sizeBytes": 1048576}],
         "replication": {"state": "Replicating", "direction": "Outbound", "peerSite": "secondary",
                         "intervalSeconds": 300, "lastSyncTime": "2026-01-02T03:04:05Z", "pendingBytes": 0,
                         "bytesSent": 123, "lastError": null},
         "recoveryPoints": {"count": 3, "latest": {"id": "rp-000003", "time": "2026-01-02T03:04:05Z", "appConsistent": false, "kind": "CrashConsistent"},
                            "latestAppConsistent": null},
         "testCopy": null});
        let vm: Vm = serde_json::from_value(doc.clone()).unwrap();
        assert_eq!(vm.replication.state, ReplicationState::Replicating);
        assert_eq!(vm.recovery_points.count, 3);
        assert_eq!(serde_json::to_value(&vm).unwrap(), doc);
    }

    #[test]
    fn debug_of_enable_replication_hides_the_peer_token() {
        let e = EnableReplication {
            operation_id: "op-1".into(),
            peer_site: "secondary".into(),
            peer_url: "https://secondary:7101".into(),
            peer_token: "s3cr3t-peer-token".into(),
            peer_ca_pem: None,
            interval_seconds: 30,
            recovery_point_retention_hours: 1,
            app_consistent_frequency_hours: 0,
            mode: ReplicationMode::Initial,
        };
        let dbg = format!("{e:?} {e:#?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(
            dbg.contains("secondary"),
            "the other fields stay visible: {dbg}"
        );
        // On the wire the token is still sent as it is.
        assert_eq!(
            serde_json::to_value(&e).unwrap()["peerToken"],
            "s3cr3t-peer-token"
        );
    }
}
