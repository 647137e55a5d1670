//! ReplicatedVM: one VM protected between two sites.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{FailoverSpec, Job, TestFailoverSpec, default_true};

/// Most jobs kept in `status.jobs` (newest last); the schema refuses more.
pub const MAX_JOBS: usize = 10;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "twinsite.io",
    version = "v1alpha1",
    kind = "ReplicatedVM",
    plural = "replicatedvms",
    shortname = "rvm",
    namespaced,
    status = "ReplicatedVMStatus",
    printcolumn = r#"{"name":"ACTIVE","type":"string","jsonPath":".status.activeSite"}"#,
    printcolumn = r#"{"name":"DESIRED","type":"string","jsonPath":".spec.activeSite"}"#,
    printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"REPLICATION","type":"string","jsonPath":".status.replication.state"}"#,
    printcolumn = r#"{"name":"HEALTH","type":"string","jsonPath":".status.replication.health"}"#,
    printcolumn = r#"{"name":"RPO","type":"integer","jsonPath":".status.replication.rpoSeconds"}"#,
    printcolumn = r#"{"name":"PROGRESS","type":"string","jsonPath":".status.replication.progress.summary"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "One VM protected between two sites: where it should run and how it is replicated.",
    // A root rule: only here can the new spec be compared with the old status.
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.jobs) || \
         !oldSelf.status.jobs.exists(j, (j.type == 'PlannedFailover' || j.type == 'UnplannedFailover') && j.state == 'Running') || \
         (has(self.spec.activeSite) ? self.spec.activeSite : self.spec.primarySite) == \
         (has(oldSelf.spec.activeSite) ? oldSelf.spec.activeSite : oldSelf.spec.primarySite)"
    )
    .message(
        "spec.activeSite cannot change while a failover of this VM is running \
         (status.jobs has a Running PlannedFailover or UnplannedFailover job): \
         a failover in progress cannot be cancelled, and a cancelled failover would leave the VM unreplicated; \
         change spec.activeSite again once the job has ended"
    )
    .reason(Reason::FieldValueForbidden)
    .field_path(".spec.activeSite"),
    // Root too: unset means metadata.name, which only the root can see.
    validation = Rule::new(
        "(has(self.spec.vmName) ? self.spec.vmName : self.metadata.name) == \
         (has(oldSelf.spec.vmName) ? oldSelf.spec.vmName : oldSelf.metadata.name)"
    )
    .message(
        "spec.vmName is immutable: a ReplicatedVM protects the VM it was created for \
         (unset means metadata.name); delete and re-create it to protect another VM"
    )
    .field_path(".spec.vmName")
)]
#[x_kube(
    validation = Rule::new("self.recoverySite != self.primarySite")
        .message("spec.recoverySite must differ from spec.primarySite: a VM is replicated between two different sites")
        .field_path(".recoverySite"),
    validation = Rule::new(
        "!has(self.activeSite) || self.activeSite == self.primarySite || self.activeSite == self.recoverySite"
    )
    .message("spec.activeSite must be spec.primarySite or spec.recoverySite (or unset, which means spec.primarySite)")
    .field_path(".activeSite")
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedVMSpec {
    /// Name of the VM at the sites; defaults to metadata.name. Immutable.
    /// Letters, digits, '-', '_' and '.', starting and ending with a letter or digit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub vm_name: Option<String>,
    /// Site where the VM is first protected from; immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "spec.primarySite is immutable: it cannot change after creation (delete and re-create the ReplicatedVM to protect from another site)"
    ))]
    pub primary_site: String,
    /// Site that holds the replica; immutable, differs from primarySite.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message(
        "spec.recoverySite is immutable: it cannot change after creation (delete and re-create the ReplicatedVM to replicate to another site)"
    ))]
    pub recovery_site: String,
    /// Where the VM should run; primarySite or recoverySite. Defaults to primarySite.
    /// Changing it is a failover; changing it back is a failback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub active_site: Option<String>,
    /// How the VM is replicated from the site where it runs to the other site.
    #[serde(default)]
    pub replication: ReplicationSpec,
    /// How a change of activeSite is carried out.
    #[serde(default)]
    pub failover: FailoverSpec,
    /// A drill: a copy of the VM started at the other site on an isolated network.
    #[serde(default)]
    pub test_failover: TestFailoverSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationSpec {
    /// Replicate from the active site to the other site.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Copy frequency: 30, 300 or 900 seconds.
    #[serde(default = "default_interval")]
    #[x_kube(validation = Rule::new("self in [30, 300, 900]")
        .message("spec.replication.intervalSeconds must be 30, 300 or 900 (seconds)"))]
    pub interval_seconds: i64,
    /// Additional hourly recovery points kept, 0..24.
    #[serde(default = "default_retention")]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 24")
        .message("spec.replication.recoveryPointRetentionHours must be between 0 and 24 (hours)"))]
    pub recovery_point_retention_hours: i64,
    /// App-consistent recovery point frequency in hours, 0..12 (0 = none).
    #[serde(default)]
    #[x_kube(validation = Rule::new("self >= 0 && self <= 12")
        .message("spec.replication.appConsistentFrequencyHours must be between 0 and 12 (hours; 0 = no app-consistent points)"))]
    pub app_consistent_frequency_hours: i64,
    /// Deadline in seconds of the initial copy and of a resync (the InitialReplication and
    /// Resynchronize steps), default 86400: a copy that has not finished by then (the agent
    /// reports a persistent error, for example) fails its job, which stalls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 604800))]
    pub copy_timeout_seconds: Option<i64>,
}

/// Default of `replication.copyTimeoutSeconds`.
pub const DEFAULT_COPY_TIMEOUT_SECONDS: i64 = 86_400;

impl ReplicationSpec {
    /// The deadline of an initial copy or resync in seconds.
    pub fn copy_timeout(&self) -> i64 {
        self.copy_timeout_seconds
            .unwrap_or(DEFAULT_COPY_TIMEOUT_SECONDS)
    }
}

fn default_interval() -> i64 {
    300
}
fn default_retention() -> i64 {
    24
}

impl Default for ReplicationSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_seconds: default_interval(),
            recovery_point_retention_hours: default_retention(),
            app_consistent_frequency_hours: 0,
            copy_timeout_seconds: None,
        }
    }
}

impl ReplicatedVM {
    /// The VM's name at the sites.
    pub fn vm_name(&self) -> String {
        self.spec
            .vm_name
            .clone()
            .or_else(|| self.metadata.name.clone())
            .unwrap_or_default()
    }

    /// Where the spec wants the VM to run.
    pub fn desired_site(&self) -> &str {
        self.spec
            .active_site
            .as_deref()
            .unwrap_or(&self.spec.primary_site)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum VmPhase {
    Pending,
    InitialReplication,
    Protected,
    Unprotected,
    FailingOver,
    FailedOver,
    Reprotecting,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ReplicationState {
    Disabled,
    InitialReplication,
    Replicating,
    Resynchronizing,
    Paused,
    Error,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum ReplicationHealth {
    Healthy,
    Warning,
    Critical,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedVMStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<VmPhase>,
    /// Where the VM runs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_points: Option<RecoveryPointSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<TestFailoverStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill: Option<DrillRecord>,
    /// Newest last, at most 10 kept (bounded so the API server can price the CEL rule that reads it).
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub jobs: Vec<Job>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationStatus {
    pub state: ReplicationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<ReplicationHealth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_seconds: Option<i64>,
    /// The settings last sent to the source: at protect or reprotect, or to its running
    /// replication when the spec's changed. A spec that differs from what the source runs with
    /// is shown by condition SettingsApplied until the source has taken it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<ReplicationSettings>,
    /// The initial copy or resync under way at the source, as of the last site poll; absent
    /// when none runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<ReplicationProgress>,
    /// Block-by-block comparisons of the replica with the source that found it different
    /// since replication began in this direction (each started a resync); condition
    /// ReplicaVerified tells the newest comparison's outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub divergences: Option<i64>,
}

/// How far the source's initial copy or resync has come: of the `totalBytes` of disk it reads
/// and compares or sends, `doneBytes` are acknowledged by the target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationProgress {
    pub done_bytes: i64,
    pub total_bytes: i64,
    /// `doneBytes` as a whole percentage of `totalBytes`, rounded down (100 only when done).
    pub percent: i64,
    /// `percent` for people and the PROGRESS column, e.g. `42%`.
    pub summary: String,
}

/// Replication settings as sent to the source site.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationSettings {
    pub interval_seconds: i64,
    pub recovery_point_retention_hours: i64,
    pub app_consistent_frequency_hours: i64,
}

impl From<&ReplicationSpec> for ReplicationSettings {
    fn from(r: &ReplicationSpec) -> Self {
        Self {
            interval_seconds: r.interval_seconds,
            recovery_point_retention_hours: r.recovery_point_retention_hours,
            app_consistent_frequency_hours: r.app_consistent_frequency_hours,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointRef {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    #[serde(default)]
    pub app_consistent: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPointSummary {
    pub count: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<RecoveryPointRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_app_consistent: Option<RecoveryPointRef>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverStatus {
    pub state: String,
    pub vm_name: String,
    pub site: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillRecord {
    pub job: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    pub result: String,
}
