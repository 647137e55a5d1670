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
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A recovery plan: ReplicatedVMs of its namespace moved together to one site, group after group."
)]
#[serde(rename_all = "camelCase")]
pub struct FailoverPlanSpec {
    /// Where every VM of the plan should run.
    #[schemars(length(min = 1, max = 253))]
    pub target_site: String,
    /// How the plan's VMs fail over.
    #[serde(default)]
    pub failover: FailoverSpec,
    /// A drill of the whole plan: copies at the other site on an isolated network.
    #[serde(default)]
    pub test_failover: TestFailoverSpec,
    /// In order: a group starts when every VM of the one before runs at the target.
    #[schemars(length(min = 1, max = 100))]
    #[x_kube(validation = Rule::new("self.all(g, self.exists_one(h, h.name == g.name))")
        // No reason Duplicate: the API server would print "Duplicate value" without this message.
        .message("spec.groups must have unique names: two groups share a name"))]
    pub groups: Vec<PlanGroup>,
    /// How many VMs of a group fail over at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_parallel: Option<i32>,
}

/// A step of a plan: the VMs named in `vms`, or those matched by `selector`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("(has(self.vms) && size(self.vms) > 0) != has(self.selector)")
    .message("spec.groups[] needs exactly one of vms (ReplicatedVM names) or selector (a label selector)"))]
#[serde(rename_all = "camelCase")]
pub struct PlanGroup {
    /// Unique in the plan; used in approvals as `<group>/<action>`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// ReplicatedVM names in the plan's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(length(min = 1, max = 253)))]
    pub vms: Vec<String>,
    /// ReplicatedVMs of the plan's namespace with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// Run before the group's VMs fail over, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub pre_actions: Vec<PlanAction>,
    /// Run after the group's VMs run at the target, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub post_actions: Vec<PlanAction>,
}

/// A manual approval or a webhook call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.manualApproval) != has(self.webhook)")
    .message("an action of spec.groups[] needs exactly one of manualApproval or webhook"))]
#[serde(rename_all = "camelCase")]
pub struct PlanAction {
    /// Unique in the group; approved with the annotation `twinsite.io/approve=<group>/<name>`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Pause the plan until a person approves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manual_approval: Option<ManualApproval>,
    /// Call an HTTP endpoint and wait for a 2xx answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<Webhook>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManualApproval {
    /// Shown to the person who approves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// An HTTP POST of the plan's name, group and direction; a 2xx answer in time is success.
#[derive(Serialize, Deserialize, Clone, PartialEq, KubeSchema)]
#[x_kube(
    validation = Rule::new("!has(self.caBundle) || self.url.startsWith('https://')")
        .message("webhook.caBundle is only for an https:// webhook.url")
        .field_path(".caBundle"),
    // On the object rather than on url itself, so that the API server's answer does not
    // repeat the URL (and its password) as the invalid value.
    validation = Rule::new("!self.url.matches('^[^/?#]*//[^/?#]*@')")
        .message("webhook.url must not carry credentials (user:password@): remove them; a receiver can check the X-Twinsite-Signature header instead")
        .field_path(".url")
)]
#[serde(rename_all = "camelCase")]
pub struct Webhook {
    /// http:// or https:// URL to POST to, without credentials (user:password@): a receiver
    /// can check the request's X-Twinsite-Signature header instead.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#[:space:]]+')")
        .message("webhook.url must be an http:// or https:// URL"))]
    pub url: String,
    /// Seconds to wait for a 2xx answer, 1..3600.
    #[serde(default = "default_webhook_timeout")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 3600")
        .message("webhook.timeoutSeconds must be between 1 and 3600"))]
    pub timeout_seconds: i64,
    /// PEM CA certificates an https receiver's certificate must chain to (and no other CA);
    /// unset: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub ca_bundle: Option<String>,
}

/// The URL without its user info and query: a URL may carry a token.
impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &crate::redact::redact(&self.url))
            .field("timeout_seconds", &self.timeout_seconds)
            .field("ca_bundle", &self.ca_bundle.as_ref().map(|b| b.len()))
            .finish()
    }
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
    /// Newest last, at most 10 kept, as for a ReplicatedVM.
    #[serde(default)]
    #[schemars(length(max = 10))]
    pub jobs: Vec<Job>,
    /// The newest drill, recorded once its cleanup is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill: Option<DrillRecord>,
    /// Plain values (`<group>/<action>`) of the `twinsite.io/approve` annotation that approved
    /// a step of a plan job, oldest first (at most 2000, one per approval a spec can hold). A
    /// value counts once: the annotation is never removed by the controller, so a value kept in
    /// Git does not approve the next run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2000))]
    pub consumed_approvals: Vec<String>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
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
