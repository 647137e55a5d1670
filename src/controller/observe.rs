//! What the controller knows about a VM at a site: a provider-neutral view that the planner
//! reads. It is filled from the shared per-site VM listing (one batched call per site per
//! period), never from one call per VM.

use jiff::Timestamp;

/// Power state of a VM at a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    Running,
    Off,
    Other,
}

/// What a site holds for a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs or may run here.
    Primary,
    /// Holds recovery points received from the peer.
    Replica,
    /// A drill copy.
    TestCopy,
    Other,
}

/// Replication as one side sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// Replication state reported by a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObservedReplicationState {
    Disabled,
    InitialReplication,
    Replicating,
    Resynchronizing,
    Error,
    Other,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ObservedReplication {
    pub state: ObservedReplicationState,
    pub direction: Option<Direction>,
    pub peer_site: Option<String>,
    pub last_sync_time: Option<Timestamp>,
    pub bytes_sent: u64,
    pub last_error: Option<String>,
    /// The copy frequency the source runs with (its `intervalSeconds`); None where the site
    /// does not say (a replica).
    pub interval_seconds: Option<i64>,
    /// The recovery point retention the source sends with its cycles; None where the site
    /// does not say.
    pub retention_hours: Option<i64>,
    /// The app-consistent frequency the source runs with; None where the site does not say.
    pub app_consistent_hours: Option<i64>,
    /// The bulk transfer (initial copy or resync) the source runs now: bytes done and total.
    pub progress: Option<(u64, u64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ObservedRecoveryPoint {
    pub id: String,
    pub time: Option<Timestamp>,
    pub app_consistent: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct ObservedRecoveryPoints {
    pub count: i64,
    pub latest: Option<ObservedRecoveryPoint>,
    pub latest_app_consistent: Option<ObservedRecoveryPoint>,
}

/// One VM at one site.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedVm {
    pub power: Power,
    pub role: Role,
    pub replication: Option<ObservedReplication>,
    pub recovery_points: Option<ObservedRecoveryPoints>,
    /// Name of the drill copy at this site, when one exists.
    pub test_copy: Option<String>,
}

impl ObservedVm {
    /// Whether the VM runs here as the real VM (a drill copy is a separate VM).
    pub fn runs(&self) -> bool {
        self.power == Power::Running && self.role == Role::Primary
    }
}

/// A site's view of one VM, as the planner gets it.
#[allow(clippy::large_enum_variant)] // short-lived, built per plan
#[derive(Clone, Debug, PartialEq)]
pub enum SiteView {
    /// Never listed yet (controller just started, or the Site is unknown).
    Unknown,
    /// The last listing failed.
    Unreachable { since: Timestamp, reason: String },
    /// Listed at `fetched_at`; `vm` is None when the site has no VM of that name.
    Reachable {
        fetched_at: Timestamp,
        vm: Option<ObservedVm>,
    },
}

impl SiteView {
    pub fn reachable(&self) -> bool {
        matches!(self, SiteView::Reachable { .. })
    }

    pub fn vm(&self) -> Option<&ObservedVm> {
        match self {
            SiteView::Reachable { vm, .. } => vm.as_ref(),
            _ => None,
        }
    }

    /// The VM, if the listing was taken at or after `t` (older listings may predate our own
    /// last action and must not drive decisions about it).
    pub fn vm_since(&self, t: Option<Timestamp>) -> Option<&ObservedVm> {
        match self {
            SiteView::Reachable { fetched_at, vm } if t.is_none_or(|t| *fetched_at >= t) => {
                vm.as_ref()
            }
            _ => None,
        }
    }

    pub fn fetched_since(&self, t: Option<Timestamp>) -> bool {
        match self {
            SiteView::Reachable { fetched_at, .. } => t.is_none_or(|t| *fetched_at >= t),
            _ => false,
        }
    }
}
