//! The ReplicatedVM controller: one VM replicated between two sites, moved by jobs.
//!
//! - [`reconcile`]: the reconciler: observe (the shared site listings), plan, act (one
//!   step), write status; repeat.
//! - [`planner`]: the pure planner, every rule of the procedure (no I/O).
//! - [`exec`]: carries out one planned step against the sites.
//! - [`deletion`]: what the deletion of a ReplicatedVM may do (waits for a running job, keeps
//!   the only copy of a VM unless asked).
//! - [`tenancy`]: which namespace's ReplicatedVM holds a site VM, and the Sites' allowed
//!   namespaces (no I/O).
//!
//! The VM as a site shows it ([`super::observe`]) and the site listings ([`super::sites`]) are
//! shared with the Site reconciler and stay one level up.

pub mod deletion;
pub mod exec;
pub mod planner;
pub mod reconcile;
pub mod tenancy;

pub use reconcile::{Context, FINALIZER, Fences, Written, error_policy, now, reconcile};
