//! FailoverPlan: a recovery plan moving many ReplicatedVMs group after group.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{FailoverSpec, Job, TestFailoverSpec};
use super::replicated_vm::DrillRecord;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "twinsite.io",
    version = "v1alpha1",
    kind = "FailoverPlan",
    shortname = "fp",
    namespaced,
    status = "FailoverPlanStatus",
    printcolumn = r#"{"name":"TARGET","type":"string","jsonPath":".spec.targetSite"}"#,
    printcolumn = r#"{"name":"PHASE","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"GROUPS","type":"string","jsonPath":".status.groupsSummary"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FailoverPlanSpec {
    /// Where every VM of the plan should run.
    pub target_site: String,
    #[serde(default)]
    pub failover: FailoverSpec,
    #[serde(default)]
    pub test_failover: TestFailoverSpec,
    /// In order: a group starts when every VM of the one before runs at the target.
    pub groups: Vec<PlanGroup>,
    /// How many VMs of a group fail over at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallel: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanGroup {
    pub name: String,
    /// ReplicatedVM names in the plan's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_actions: Vec<PlanAction>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_actions: Vec<PlanAction>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanAction {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_approval: Option<ManualApproval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManualApproval {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    pub url: String,
    #[serde(default = "default_webhook_timeout")]
    pub timeout_seconds: i64,
}

fn default_webhook_timeout() -> i64 {
    60
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum PlanPhase {
    Pending,
    InProgress,
    Completed,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverPlanStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PlanPhase>,
    /// "done/total" groups, for the GROUPS column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups_summary: Option<String>,
    #[serde(default)]
    pub groups: Vec<GroupStatus>,
    #[serde(default)]
    pub jobs: Vec<Job>,
    /// The newest drill, recorded once its cleanup is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill: Option<DrillRecord>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    pub name: String,
    pub state: String,
    #[serde(default)]
    pub vms: Vec<GroupVmStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupVmStatus {
    pub name: String,
    pub state: String,
}
