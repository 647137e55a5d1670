//! The three custom resources of twinsite (API group `twinsite.io`, version `v1alpha1`).
//!
//! The shapes follow the API contract: field names, phases and step states are fixed.

mod common;
mod failover_plan;
mod replicated_vm;
mod site;

pub use common::*;
pub use failover_plan::*;
pub use replicated_vm::*;
pub use site::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// API group of every twinsite kind.
pub const GROUP: &str = "twinsite.io";
/// Annotation that commits a failover job waiting for a manual commit.
pub const COMMIT_ANNOTATION: &str = "twinsite.io/commit";
/// Annotation that runs a failed job again, from its first step that did not succeed:
/// `<job name>` (attempt 2) or `<job name>/<attempt>`. On a FailoverPlan it names a failed plan
/// job, and the new run retries the failover jobs of its VMs that failed. The controller never
/// edits it.
pub const RETRY_ANNOTATION: &str = "twinsite.io/retry";
/// Annotation (`"true"`) that lets the deletion of a ReplicatedVM delete a replica that is the
/// only copy of a VM that runs nowhere; without it the deletion waits.
pub const DELETE_LAST_COPY_ANNOTATION: &str = "twinsite.io/delete-last-copy";
/// Annotation that approves a manual-approval action of a plan (`<group>/<action>`).
pub const APPROVE_ANNOTATION: &str = "twinsite.io/approve";

/// All CRDs in the order they are printed and installed.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Site::crd(), ReplicatedVM::crd(), FailoverPlan::crd()]
}

/// The CRDs as one multi-document YAML stream (what `twinsite crds` prints).
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
