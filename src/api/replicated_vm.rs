//! ReplicatedVM: one VM protected between two sites.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{FailoverSpec, Job, TestFailoverSpec, default_true};

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
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedVMSpec {
    /// Name of the VM at the sites; defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Site where the VM is first protected from; immutable.
    pub primary_site: String,
    /// Site that holds the replica; immutable, differs from primarySite.
    pub recovery_site: String,
    /// Where the VM should run; primarySite or recoverySite. Defaults to primarySite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_site: Option<String>,
    #[serde(default)]
    pub replication: ReplicationSpec,
    #[serde(default)]
    pub failover: FailoverSpec,
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
    pub interval_seconds: i64,
    /// Additional hourly recovery points kept, 0..24.
    #[serde(default = "default_retention")]
    pub recovery_point_retention_hours: i64,
    /// App-consistent recovery point frequency in hours, 0..12 (0 = none).
    #[serde(default)]
    pub app_consistent_frequency_hours: i64,
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
    /// Newest last, at most 10 kept.
    #[serde(default)]
    pub jobs: Vec<Job>,
    #[serde(default)]
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
