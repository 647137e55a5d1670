//! The controller: reconcilers that drive the sites toward the resources.

pub mod conditions;
pub mod failover_plan;
