pub mod conditions;
pub mod metrics;
pub mod observe;
pub mod planner;
