//! FailoverPlan: recovery plans that move many ReplicatedVMs group after group.
//!
//! - [`planner`]: the pure planner (next action from spec, status and members).
//! - [`members`]: membership, conflicts, and [`members::hold`], which tells the ReplicatedVM
//!   reconciler what a plan wants of a VM.
//! - [`run`]: the controller (watches plans and ReplicatedVMs, calls webhooks, writes status).

pub mod members;
pub mod planner;
mod reconcile;
pub mod webhook;

pub use members::{Hold, hold};

/// Names a failed plan job to run again: `kubectl annotate fp NAME twinsite.io/retry=<job>`.
pub use crate::api::RETRY_ANNOTATION;
pub use reconcile::{Error, approvals, cache_ready, in_namespace, run, run_in_namespace, run_with};
