//! What the planner reads (the spec, status and what the sites show) and what it answers: a
//! status to write, a step to call at a site, a fence, a settings call, or a wait.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::steps::StepName;
use crate::api::{JobState, JobType, ReplicatedVMSpec, ReplicatedVMStatus, ReplicationSpec};
use crate::controller::observe::{ObservedRecoveryPoint, SiteView};
use crate::controller::vm_jobs::{Cut, standing_job};

pub use crate::controller::notes::Note;

/// How long to wait before retrying a step whose site did not answer.
pub const RETRY_UNREACHABLE: Duration = Duration::from_secs(5);

/// Everything the planner looks at.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    pub name: &'a str,
    /// metadata.uid (or the name when there is none): prefixes operation ids.
    pub uid: &'a str,
    pub generation: Option<i64>,
    pub vm_name: &'a str,
    pub spec: &'a ReplicatedVMSpec,
    /// Value of the `twinsite.io/commit` annotation.
    pub commit_annotation: Option<&'a str>,
    pub status: &'a ReplicatedVMStatus,
    /// What spec.primarySite and spec.recoverySite show of this VM.
    pub primary: &'a SiteView,
    pub recovery: &'a SiteView,
    pub now: Timestamp,
    /// How often the sites are listed: how soon a waiting step can see progress.
    pub poll: Duration,
    /// A FailoverPlan conflict: the VM stays where it runs and shows condition Conflict.
    pub conflict: Option<&'a Conflict>,
    /// The consistent cut a plan failover of this VM starts from (Unplanned, LatestProcessed).
    pub cut: Option<&'a Cut>,
    /// Value of the `twinsite.io/retry` annotation: `<job>` runs that failed job a second
    /// time, `<job>/<n>` runs its attempt `n` (see [`retry_due`](super::next_job::retry_due)).
    pub retry: Option<&'a str>,
    /// When the running FailoverPlan job that moves this VM started: a failover of the VM to
    /// the plan's target that failed before it is run again (a plan retry).
    pub plan_started: Option<Timestamp>,
    /// The object is being deleted: the running job is driven to its end (deletion waits for
    /// it, and the conditions say so), and no job starts or is retried.
    pub deleting: bool,
    /// A power off of this VM failed lately: no fence (FenceSource, or powering off a VM that
    /// runs where it must not) is tried before then
    /// ([`fence_backoff`](super::fencing::fence_backoff)).
    pub fence_not_before: Option<Timestamp>,
}

/// Why the FailoverPlans of the VM's namespace hold it where it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Conflict {
    /// Condition reason (`SelectedByTwoPlans`, `ActiveSiteDisagrees`, ...).
    pub reason: String,
    /// The cause and what to do about it.
    pub message: String,
}

pub(super) static UNKNOWN: SiteView = SiteView::Unknown;

impl Input<'_> {
    pub fn view(&self, site: &str) -> &SiteView {
        if site == self.spec.primary_site {
            self.primary
        } else if site == self.spec.recovery_site {
            self.recovery
        } else {
            &UNKNOWN
        }
    }

    pub fn other(&self, site: &str) -> &str {
        if site == self.spec.primary_site {
            &self.spec.recovery_site
        } else {
            &self.spec.primary_site
        }
    }

    pub fn desired(&self) -> &str {
        self.spec
            .active_site
            .as_deref()
            .unwrap_or(&self.spec.primary_site)
    }

    pub(super) fn now(&self) -> Time {
        Time(self.now)
    }

    /// How long a fence must still wait (backing off after failures), if it must.
    pub(super) fn fence_wait(&self) -> Option<Duration> {
        let nb = self.fence_not_before?;
        let left = (nb - self.now).get_seconds();
        (left > 0).then(|| Duration::from_secs(left.unsigned_abs()))
    }

    /// The newest job failed (the resync after a digest mismatch aside, see
    /// [`standing_job`](crate::controller::vm_jobs::standing_job)) and nobody changed the spec
    /// since: a person has to look.
    pub(super) fn stalled(&self) -> bool {
        standing_job(self.status).is_some_and(|j| j.state == JobState::Failed)
            && self.status.observed_generation == self.generation
    }
}

/// A status to write, with what it says happened.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub status: ReplicatedVMStatus,
    pub events: Vec<Note>,
    /// Jobs that ended in this update (for metrics).
    pub finished: Vec<(JobType, JobState)>,
}

/// How replication is enabled at the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnableMode {
    /// Send the whole disk.
    Initial,
    /// Compare block hashes with the peer's copy and send only what differs.
    Resync,
}

/// A site call for the Running step `step` of job `job` (already persisted as Running).
#[derive(Clone, Debug, PartialEq)]
pub struct StepCall {
    pub job: usize,
    pub step: usize,
    pub job_name: String,
    pub job_type: JobType,
    pub step_name: StepName,
    pub vm: String,
    pub source: String,
    pub target: String,
    pub op_id: String,
    pub recovery_point: String,
    pub network: String,
    pub mode: EnableMode,
    pub replication: ReplicationSpec,
    pub optional: bool,
    /// Name of the drill copy (cleanup).
    pub test_vm: Option<String>,
    /// ConsistentCut: the VMs the cut is asked for (the plan's members, this VM among them).
    /// The cut id is the step's operation id.
    pub cut_vms: Vec<String>,
    /// The source site's listing fails: a best-effort call there (StopReplication's source
    /// side in an unplanned failover) is not made, as it would only wait for its timeout.
    pub source_unreachable: bool,
    /// The step's deadline (its start plus `spec.failover.stepTimeoutSeconds`): no site call
    /// of the step waits past it, so a site that never answers cannot hold a reconcile slot.
    pub deadline: Timestamp,
}

/// Power the VM off at `site`, where it runs although it must not.
#[derive(Clone, Debug, PartialEq)]
pub struct FenceCall {
    pub site: String,
    pub vm: String,
    pub op_id: String,
}

/// Send the spec's replication settings to the source's running replication (a change of
/// `spec.replication`), then [`record_settings`](super::record_settings). Not a job: the
/// replication goes on as it is.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingsCall {
    pub site: String,
    pub vm: String,
    /// Names the settings and the spec generation asking for them: a repeat is answered from
    /// the site's record, a later change is a new operation.
    pub op_id: String,
    pub replication: ReplicationSpec,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Write this status, publish its events, then plan again.
    Write(Box<Update>),
    /// Call a site for a step already written as Running, then
    /// [`record_outcome`](super::record_outcome).
    Execute(Box<StepCall>),
    /// Power off a VM that runs where it must not, then [`record_fence`](super::record_fence).
    Fence(FenceCall),
    /// Apply changed replication settings at the source, then
    /// [`record_settings`](super::record_settings).
    Settings(SettingsCall),
    /// Nothing to do now; plan again after this long.
    Idle(Duration),
}

/// What a site call gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Succeeded {
        message: Option<String>,
        recovery_point: Option<ObservedRecoveryPoint>,
        test_vm: Option<String>,
    },
    Failed(String),
    /// The site did not answer: a required step is retried with the same operation id.
    Unreachable(String),
}

impl Outcome {
    pub fn ok() -> Self {
        Outcome::Succeeded {
            message: None,
            recovery_point: None,
            test_vm: None,
        }
    }
}

/// Why no job can start yet (shown in the Ready condition).
pub(super) struct Wait {
    pub(super) reason: &'static str,
    pub(super) message: String,
    /// Only a person moves it on (a site down that blocks a failover): Stalled, not
    /// Reconciling.
    pub(super) stalls: bool,
}
