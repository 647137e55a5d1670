//! FailoverPlan: recovery plans that move many ReplicatedVMs group after group.

pub mod planner;
