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
    /// Bytes written since the last cycle the peer acknowledged (at the source): 0 means
    /// everything this copy wrote is in a recovery point at the peer.
    pub pending_bytes: u64,
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
    /// The newest comparison of the replica with the source, block by block (at the source).
    pub verification: Option<crate::site::Verification>,
    /// Comparisons that found the replica different since replication began (at the source).
    pub divergences: u64,
    /// The newest comparison that found the replica different (at the source).
    pub last_divergence: Option<crate::site::Verification>,
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
    /// The last listing failed: the site may still run the VM (a refused token, a 5xx, a
    /// timeout say nothing about what runs there).
    Unreachable { since: Timestamp, reason: String },
    /// The site is declared lost (its Site's `spec.fence: Lost`, seen at `since`): it is never
    /// called and nothing it lists is believed; fencing it is done by that declaration.
    Lost { since: Timestamp },
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

    /// Declared lost: the one view on which a site may be taken as off without its answer.
    pub fn lost(&self) -> bool {
        matches!(self, SiteView::Lost { .. })
    }

    /// Why the site cannot be listed now, for messages.
    pub fn why_not(&self) -> String {
        match self {
            SiteView::Reachable { .. } => "it answers".into(),
            SiteView::Unknown => "it has not been listed since the controller started or its \
                                  URL or token changed"
                .into(),
            SiteView::Unreachable { reason, .. } => reason.clone(),
            SiteView::Lost { .. } => "it is declared lost (spec.fence: Lost)".into(),
        }
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
