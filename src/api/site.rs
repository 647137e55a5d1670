//! Site: a place that runs VMs and holds replicas, served by a site agent.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "twinsite.io",
    version = "v1alpha1",
    kind = "Site",
    shortname = "site",
    status = "SiteStatus",
    printcolumn = r#"{"name":"READY","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.agent.url"}"#,
    printcolumn = r#"{"name":"VMS","type":"integer","jsonPath":".status.vmCount"}"#,
    printcolumn = r#"{"name":"AGE","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A place that runs VMs and holds replicas, served by a twinsite site agent."
)]
#[serde(rename_all = "camelCase")]
pub struct SiteSpec {
    /// Free text, e.g. "Primary VMM cloud".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The site agent that serves this site.
    pub agent: AgentEndpoint,
    /// How networks of other sites map to this site's: a VM failing over to this site has
    /// each NIC on network `from` of `site` attached to network `to` here. A network without
    /// a mapping keeps its name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(m, self.exists_one(n, n.site == m.site && n.from == m.from))")
        .message("spec.networkMappings must map each (site, from) network once: two mappings share a site and from"))]
    pub network_mappings: Vec<NetworkMapping>,
    /// `Lost` declares the site lost (a person or GitOps decides it, the controller never
    /// does): VMs fail over and fail back without it, fencing it counts as done by this
    /// declaration, and nothing it says is trusted until the field is removed. Its VMs that must
    /// not run there are powered off once it answers again without the declaration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<SiteFence>,
    /// The namespaces whose ReplicatedVMs and FailoverPlans may use this site; empty or absent:
    /// every namespace. An object of another namespace naming the site is refused (its Ready
    /// condition says so) and nothing is done at the site for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 63)),
        extend("x-kubernetes-list-type" = "set")
    )]
    #[x_kube(validation = Rule::new("self.all(n, n.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))")
        .message("spec.allowedNamespaces must hold namespace names: 1 to 63 of a-z 0-9 -, starting and ending with a letter or digit"))]
    pub allowed_namespaces: Vec<String>,
}

/// What a Site's `spec.fence` declares.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum SiteFence {
    /// The site is gone: never called, never waited for, never believed.
    Lost,
}

/// One network of another site and the network of this site that replaces it at failover.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMapping {
    /// The other site (a Site's name).
    #[schemars(length(min = 1, max = 253))]
    pub site: String,
    /// The network's name at that site.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub from: String,
    /// The network's name at this site.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub to: String,
}

/// How the controller reaches a site agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.caSecretRef) || self.url.startsWith('https://')")
    .message("spec.agent.caSecretRef is only for an https:// agent URL")
    .field_path(".caSecretRef"))]
#[x_kube(validation = Rule::new("self.url.startsWith('https://') || (has(self.insecure) && self.insecure)")
    .message("spec.agent.url is http://: use an https:// URL, or set spec.agent.insecure: true to send the agent's token and the VMs' blocks unencrypted")
    .field_path(".url"))]
#[serde(rename_all = "camelCase")]
pub struct AgentEndpoint {
    /// https:// URL of the agent; http:// only with `insecure: true`.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^/?#[:space:]]+')")
        .message("spec.agent.url must be an http:// or https:// URL, e.g. https://site-a.example:7101"))]
    pub url: String,
    /// Allows an http:// URL: the agent's token, and the blocks replicated to this site, then
    /// cross the network unencrypted. The Site shows condition `Insecure` True while it is set
    /// with such a URL. For tests and a demo on one machine.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// The agent's bearer token.
    pub token_secret_ref: SecretKeyRef,
    /// CA bundle for an https agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

/// A key of a Secret in a namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_count: Option<i64>,
    /// What the site's replicas of libvirt domains boot under: `kvm` or `tcg` (QEMU's
    /// emulator), as the agent chose at its start; absent for the builtin runtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<String>,
    /// While `spec.fence` is `Lost`: since when the controller holds the site lost, and who
    /// declared it (the field manager that set `spec.fence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<SiteFenceStatus>,
}

/// The declaration of a lost site, as the controller recorded it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteFenceStatus {
    /// What `spec.fence` declares (`Lost`).
    pub state: SiteFence,
    /// When the controller first saw the declaration: from then on nothing the site says is
    /// trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// The field manager that set `spec.fence` (`kubectl-patch`, a GitOps controller, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_by: Option<String>,
    /// When that manager wrote it, as the API server recorded (its managedFields time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub declared_at: Option<Time>,
}
