pub mod conditions;
pub mod failover_plan;
pub mod metrics;
pub mod observe;
pub mod planner;
