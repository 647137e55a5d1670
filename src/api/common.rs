//! Types shared by the kinds: jobs, steps, failover settings, conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// How a change of the desired site is carried out.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default,
)]
pub enum FailoverType {
    /// Source shut down, remaining data synced, no data lost.
    #[default]
    Planned,
    /// From a recovery point; tries to shut the source down first and goes on if that fails.
    Unplanned,
}

/// When a failover is committed.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default,
)]
pub enum CommitMode {
    #[default]
    Automatic,
    /// Waits for the `twinsite.io/commit` annotation naming the job.
    Manual,
}

/// Failover settings of a ReplicatedVM or a FailoverPlan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    #[serde(default, rename = "type")]
    pub type_: FailoverType,
    /// Unplanned only: try to shut the source down and sync before failing over.
    #[serde(default = "default_true")]
    pub shutdown_source: bool,
    /// Latest | LatestProcessed | LatestAppConsistent | an id (`rp-...`) from status.recoveryPoints.
    #[serde(default = "default_recovery_point")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new(
        "self in ['Latest', 'LatestProcessed', 'LatestAppConsistent'] || self.matches('^rp-[A-Za-z0-9][A-Za-z0-9-]*$')"
    )
    .message("failover.recoveryPoint must be Latest, LatestProcessed, LatestAppConsistent or a recovery point id rp-<id> (from status.recoveryPoints)"))]
    pub recovery_point: String,
    #[serde(default)]
    pub commit: CommitMode,
    /// Deadline of each step of a job, in seconds (default 600): a step whose site does not
    /// answer (or refuses the token) is retried until then, and then fails its job, which
    /// stalls. A call in flight at the deadline ends at its own timeout first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub step_timeout_seconds: Option<i64>,
}

/// Default of `failover.stepTimeoutSeconds`.
pub const DEFAULT_STEP_TIMEOUT_SECONDS: i64 = 600;

impl FailoverSpec {
    /// The step deadline in seconds.
    pub fn step_timeout(&self) -> i64 {
        self.step_timeout_seconds
            .unwrap_or(DEFAULT_STEP_TIMEOUT_SECONDS)
    }
}

impl Default for FailoverSpec {
    fn default() -> Self {
        Self {
            type_: FailoverType::Planned,
            shutdown_source: true,
            recovery_point: default_recovery_point(),
            commit: CommitMode::Automatic,
            step_timeout_seconds: None,
        }
    }
}

/// Test failover (drill) settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestFailoverSpec {
    /// true: run a drill copy at the other site; false: clean it up.
    #[serde(default)]
    pub enabled: bool,
    /// Network name for the drill copy.
    #[serde(default = "default_network")]
    #[schemars(length(min = 1, max = 253))]
    pub network: String,
}

impl Default for TestFailoverSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            network: default_network(),
        }
    }
}

pub(crate) fn default_true() -> bool {
    true
}
pub(crate) fn default_recovery_point() -> String {
    "Latest".into()
}
pub(crate) fn default_network() -> String {
    "isolated".into()
}

/// Kinds of job, as on the jobs page of Site Recovery.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum JobType {
    EnableReplication,
    PlannedFailover,
    UnplannedFailover,
    Commit,
    ReverseReplicate,
    TestFailover,
    TestFailoverCleanup,
    DisableReplication,
    /// A FailoverPlan's own job (one step per group).
    PlanFailover,
    PlanTestFailover,
    PlanTestFailoverCleanup,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum StepState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

/// One step of a job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobStep {
    pub name: String,
    pub state: StepState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Idempotency key passed to the site for this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
}

/// A job and its steps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: JobType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_site: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_site: Option<String>,
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<Time>,
    /// The recovery point a failover used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<String>,
    /// Age in seconds of that recovery point when the failover used it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point_age_seconds: Option<i64>,
    /// Id of the consistent cut a plan failover used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Which run of the job this is: 1 for the first, one more per retry (the
    /// `twinsite.io/retry` annotation). Absent means 1 (jobs written before retries existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub attempt: Option<i64>,
    /// What the job was started with, from the spec at its start. The job reads these and
    /// never the spec as it is changed meanwhile. Absent in jobs written before they were
    /// recorded (those read the spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<JobParameters>,
    #[serde(default)]
    pub steps: Vec<JobStep>,
}

/// The spec fields a job acts on, as they were when it started.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobParameters {
    /// `spec.failover.recoveryPoint`: the point an unplanned failover starts from (unless the
    /// plan's cut gives one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<String>,
    /// `spec.failover.shutdownSource`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_source: Option<bool>,
    /// `spec.failover.stepTimeoutSeconds`, or its default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_timeout_seconds: Option<i64>,
    /// `spec.testFailover.network`: the network a drill copy is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// Conditions as `metav1.Condition`, so kstatus and `kubectl wait` understand them.
pub type Conditions = Vec<Condition>;
