//! What happened, as the reconcilers publish it in Events: the planners say it, [`super::writes`]
//! publishes it.

/// An Event to publish for an object.
#[derive(Clone, Debug, PartialEq)]
pub struct Note {
    pub warning: bool,
    /// What was done, as a verb (`Failover`, `Replicate`, `Fence`): the Event's `action`.
    pub action: &'static str,
    /// What the event is about (a job, a job's step, a fence, a conflict), published as the
    /// `fieldPath` of the Event's `regarding` reference (the part of the object concerned):
    /// the recorder folds events with the same action, reason and regarding into one series,
    /// so repeats of one subject fold together and different jobs never do.
    pub subject: String,
    pub reason: &'static str,
    pub message: String,
}
