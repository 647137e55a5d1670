//! The shared site registry: one provider per Site and the newest VM listing of each site.
//!
//! The Site reconciler lists every site once per period (`GET /v1/vms`, one call for all its
//! VMs) and stores the answer here; ReplicatedVM reconciles read it. No reconcile polls a
//! site for one VM, so a thousand protected VMs cost one call per site per period.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use jiff::Timestamp;

use super::observe::{
    Direction, ObservedRecoveryPoint, ObservedRecoveryPoints, ObservedReplication,
    ObservedReplicationState, ObservedVm, Power, Role, SiteView,
};
use crate::secret::Secret;
use crate::site::{self, AgentClient, SiteError, SiteProvider, Vm};

/// [`Sites`] for the objects of one namespace ([`Sites::tenant`]).
pub struct TenantSites<'a> {
    sites: &'a Sites,
    namespace: &'a str,
}

impl TenantSites<'_> {
    /// Site `name`'s provider, naming the namespace on every call.
    pub fn provider(&self, name: &str) -> Option<Arc<dyn SiteProvider>> {
        let p = self.sites.provider(name)?;
        Some(p.for_namespace(self.namespace).unwrap_or(p))
    }

    pub fn known(&self, name: &str) -> bool {
        self.sites.known(name)
    }

    pub fn peer(&self, source: &str, target: &str) -> Option<PeerInfo> {
        self.sites.peer(source, target)
    }

    pub fn network_mappings(&self, to: &str, from: &str) -> Vec<site::NetworkMap> {
        self.sites.network_mappings(to, from)
    }
}

/// How to reach a site and what it showed last.
struct Entry {
    url: String,
    token: Secret,
    ca_pem: Option<String>,
    provider: Arc<dyn SiteProvider>,
    listing: Option<Listing>,
    /// Serializes listings of this site, so concurrent refreshes coalesce into one call.
    refresh: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Clone)]
struct Listing {
    fetched_at: Timestamp,
    result: Result<Arc<HashMap<String, Vm>>, ListError>,
    /// The accelerator the site's replicas boot under, as the agent reported it.
    accelerator: Option<String>,
}

/// Why a listing failed.
#[derive(Clone, Debug, PartialEq)]
pub enum ListError {
    Unreachable(String),
    Unauthorized(String),
    Other(String),
}

impl ListError {
    fn message(&self) -> &str {
        match self {
            ListError::Unreachable(m) | ListError::Unauthorized(m) | ListError::Other(m) => m,
        }
    }
}

/// What a peer agent needs to reach a site.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub url: String,
    pub token: Secret,
    pub ca_pem: Option<String>,
}

/// The result of one listing, for the Site's status.
#[derive(Clone, Debug)]
pub struct ListOutcome {
    pub at: Timestamp,
    pub result: Result<usize, ListError>,
    /// `kvm` or `tcg` from a libvirt agent's listing.
    pub accelerator: Option<String>,
}

#[derive(Default)]
pub struct Sites {
    inner: RwLock<HashMap<String, Entry>>,
    /// Sites declared lost (`spec.fence: Lost`), with when the controller first saw it.
    lost: RwLock<HashMap<String, Timestamp>>,
    /// When a declaration was removed, per site: listings taken before are not believed.
    trusted_since: RwLock<HashMap<String, Timestamp>>,
    /// Each Site's `spec.networkMappings`, as its reconciler last read them.
    networks: RwLock<HashMap<String, Vec<crate::api::NetworkMapping>>>,
    /// Each Site's `spec.allowedNamespaces` (absent: every namespace), as its reconciler last
    /// read them.
    allowed: RwLock<HashMap<String, Vec<String>>>,
    /// The peer credentials of each pair of sites (super::peers).
    pub pairs: super::peers::Pairs,
}

impl Sites {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a site or updates how to reach it (a new URL or token makes a new client).
    pub fn upsert(
        &self,
        name: &str,
        url: &str,
        token: &str,
        ca_pem: Option<String>,
    ) -> Result<(), SiteError> {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get(name)
            && e.url == url
            && e.token.expose() == token
            && e.ca_pem == ca_pem
        {
            return Ok(());
        }
        let client = AgentClient::new(url, token, ca_pem.as_deref().map(str::as_bytes))?;
        let refresh = map.get(name).map(|e| e.refresh.clone()).unwrap_or_default();
        map.insert(
            name.to_string(),
            Entry {
                url: url.to_string(),
                token: token.into(),
                ca_pem,
                provider: Arc::new(client),
                listing: None,
                refresh,
            },
        );
        Ok(())
    }

    /// Registers a site served by any provider (tests of the registry itself).
    pub fn insert_provider(&self, name: &str, url: &str, provider: Arc<dyn SiteProvider>) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.insert(
            name.to_string(),
            Entry {
                url: url.to_string(),
                token: Secret::default(),
                ca_pem: None,
                provider,
                listing: None,
                refresh: Default::default(),
            },
        );
    }

    /// Records whether Site `name` is declared lost, and since when (the first time seen).
    /// Returns that time while it is lost. A removed declaration makes every listing taken
    /// before the removal unbelieved: only what the site says afterwards counts.
    pub fn set_lost(&self, name: &str, lost: bool, now: Timestamp) -> Option<Timestamp> {
        let mut map = self.lost.write().unwrap_or_else(|e| e.into_inner());
        if lost {
            return Some(*map.entry(name.to_string()).or_insert(now));
        }
        if map.remove(name).is_some() {
            let mut t = self
                .trusted_since
                .write()
                .unwrap_or_else(|e| e.into_inner());
            t.insert(name.to_string(), now);
        }
        None
    }

    /// Since when site `name` is declared lost, if it is.
    pub fn lost_since(&self, name: &str) -> Option<Timestamp> {
        let map = self.lost.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).copied()
    }

    /// Records Site `name`'s network mappings (its `spec.networkMappings`).
    pub fn set_network_mappings(&self, name: &str, maps: &[crate::api::NetworkMapping]) {
        let mut map = self.networks.write().unwrap_or_else(|e| e.into_inner());
        if maps.is_empty() {
            map.remove(name);
        } else {
            map.insert(name.to_string(), maps.to_vec());
        }
    }

    /// Records Site `name`'s `spec.allowedNamespaces` (empty: every namespace).
    pub fn set_allowed_namespaces(&self, name: &str, namespaces: &[String]) {
        let mut map = self.allowed.write().unwrap_or_else(|e| e.into_inner());
        if namespaces.is_empty() {
            map.remove(name);
        } else {
            map.insert(name.to_string(), namespaces.to_vec());
        }
    }

    /// The namespaces Site `name` allows (empty: every namespace).
    pub fn allowed_namespaces(&self, name: &str) -> Vec<String> {
        let map = self.allowed.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).cloned().unwrap_or_default()
    }

    /// How networks of site `from` map to site `to`'s, for a failover from `from` to `to`.
    pub fn network_mappings(&self, to: &str, from: &str) -> Vec<site::NetworkMap> {
        let map = self.networks.read().unwrap_or_else(|e| e.into_inner());
        map.get(to)
            .into_iter()
            .flatten()
            .filter(|m| m.site == from)
            .map(|m| site::NetworkMap {
                from: m.from.clone(),
                to: m.to.clone(),
            })
            .collect()
    }

    pub fn remove(&self, name: &str) {
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        map.remove(name);
        self.pairs.forget(name);
    }

    /// Forgets everything about site `name`: its Site object is gone. Its declaration, network
    /// mappings and peer credentials go with it, so a Site created again under that name
    /// starts afresh.
    pub fn forget(&self, name: &str) {
        self.remove(name);
        for m in [&self.lost, &self.trusted_since] {
            m.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        }
        let mut n = self.networks.write().unwrap_or_else(|e| e.into_inner());
        n.remove(name);
    }

    pub fn known(&self, name: &str) -> bool {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.contains_key(name)
    }

    pub fn provider(&self, name: &str) -> Option<Arc<dyn SiteProvider>> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.get(name).map(|e| e.provider.clone())
    }

    /// The sites as the objects of `namespace` reach them: every call names the namespace, so
    /// a site refuses it for a VM another namespace owns.
    pub fn tenant<'a>(&'a self, namespace: &'a str) -> TenantSites<'a> {
        TenantSites {
            sites: self,
            namespace,
        }
    }

    /// The names of the registered sites.
    pub fn names(&self) -> Vec<String> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.keys().cloned().collect()
    }

    /// How `source`'s agent reaches `target`'s: its URL and CA, and the pair's own credential
    /// (never `target`'s controller token). `None` until `target` holds that credential.
    pub fn peer(&self, source: &str, target: &str) -> Option<PeerInfo> {
        let token = self.pairs.credential(source, target)?;
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.get(target).map(|e| PeerInfo {
            url: e.url.clone(),
            token,
            ca_pem: e.ca_pem.clone(),
        })
    }

    /// Lists the site's VMs unless a listing taken at or after `not_before` is already there
    /// (callers asking at once share one call).
    pub async fn refresh(&self, name: &str, not_before: Option<Timestamp>) -> Option<ListOutcome> {
        let (provider, lock) = {
            let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
            let e = map.get(name)?;
            (e.provider.clone(), e.refresh.clone())
        };
        let _guard = lock.lock().await;
        if let Some(nb) = not_before
            && let Some(l) = self.listing(name)
            && l.fetched_at >= nb
        {
            return Some(outcome(&l));
        }
        let started = Timestamp::now();
        let mut accelerator = None;
        let result = match provider.list_vms().await {
            Ok(list) => Ok(Arc::new({
                accelerator = list.accelerator;
                list.vms
                    .into_iter()
                    .map(|vm| (vm.name.clone(), vm))
                    .collect::<HashMap<_, _>>()
            })),
            Err(SiteError::Unreachable(m)) => Err(ListError::Unreachable(m)),
            Err(SiteError::Unauthorized(m)) => Err(ListError::Unauthorized(m)),
            Err(e) => Err(ListError::Other(e.to_string())),
        };
        // The listing is as old as the moment it was asked for.
        let listing = Listing {
            fetched_at: started,
            result,
            accelerator,
        };
        let out = outcome(&listing);
        let mut map = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(name) {
            e.listing = Some(listing);
        }
        Some(out)
    }

    fn listing(&self, name: &str) -> Option<Listing> {
        let map = self.inner.read().unwrap_or_else(|e| e.into_inner());
        map.get(name)?.listing.clone()
    }

    /// The namespace that owns VM `vm` at `site`, as its newest listing shows (the agent
    /// records it at `enable` and `accept`); `None` when unknown or unowned.
    pub fn owner(&self, site: &str, vm: &str) -> Option<String> {
        match self.listing(site)?.result {
            Ok(vms) => vms.get(vm)?.owner.clone(),
            Err(_) => None,
        }
    }

    /// The site's view of one VM, from the newest listing. A site declared lost is Lost
    /// whatever it lists; a listing older than the removal of such a declaration is none.
    pub fn view(&self, site: &str, vm: &str) -> SiteView {
        if let Some(since) = self.lost_since(site) {
            return SiteView::Lost { since };
        }
        let trusted = {
            let t = self.trusted_since.read().unwrap_or_else(|e| e.into_inner());
            t.get(site).copied()
        };
        let listing = self
            .listing(site)
            .filter(|l| trusted.is_none_or(|t| l.fetched_at >= t));
        match listing {
            None => SiteView::Unknown,
            Some(Listing {
                fetched_at,
                result: Ok(vms),
                ..
            }) => SiteView::Reachable {
                fetched_at,
                vm: vms.get(vm).map(observed),
            },
            Some(Listing {
                fetched_at,
                result: Err(e),
                ..
            }) => SiteView::Unreachable {
                since: fetched_at,
                reason: e.message().to_string(),
            },
        }
    }

    /// Bytes the VM's source has sent to its peer, from the newest listing.
    pub fn bytes_sent(&self, site: &str, vm: &str) -> Option<u64> {
        match self.listing(site)?.result {
            Ok(vms) => vms.get(vm).map(|v| v.replication.bytes_sent),
            Err(_) => None,
        }
    }
}

fn outcome(l: &Listing) -> ListOutcome {
    ListOutcome {
        at: l.fetched_at,
        result: l.result.as_ref().map(|m| m.len()).map_err(Clone::clone),
        accelerator: l.accelerator.clone(),
    }
}

/// The agent's VM as the planner sees it.
pub fn observed(vm: &Vm) -> ObservedVm {
    let r = &vm.replication;
    let outbound = r.direction == Some(site::Direction::Outbound);
    let replication = (r.state != site::ReplicationState::Disabled).then(|| ObservedReplication {
        state: match r.state {
            site::ReplicationState::Disabled => ObservedReplicationState::Disabled,
            site::ReplicationState::InitialReplication => {
                ObservedReplicationState::InitialReplication
            }
            site::ReplicationState::Replicating => ObservedReplicationState::Replicating,
            site::ReplicationState::Resynchronizing => ObservedReplicationState::Resynchronizing,
            site::ReplicationState::Error => ObservedReplicationState::Error,
        },
        direction: r.direction.map(|d| match d {
            site::Direction::Outbound => Direction::Outbound,
            site::Direction::Inbound => Direction::Inbound,
        }),
        peer_site: r.peer_site.clone(),
        last_sync_time: r.last_sync_time,
        bytes_sent: r.bytes_sent,
        pending_bytes: r.pending_bytes,
        last_error: r.last_error.clone(),
        interval_seconds: (outbound && r.interval_seconds > 0)
            .then(|| i64::try_from(r.interval_seconds).ok())
            .flatten(),
        retention_hours: r
            .recovery_point_retention_hours
            .filter(|_| outbound)
            .and_then(|h| i64::try_from(h).ok()),
        app_consistent_hours: r
            .app_consistent_frequency_hours
            .filter(|_| outbound)
            .and_then(|h| i64::try_from(h).ok()),
        progress: r
            .progress
            .filter(|_| outbound)
            .map(|p| (p.done_bytes, p.total_bytes)),
        verification: r.last_verification.clone().filter(|_| outbound),
        divergences: if outbound { r.divergences } else { 0 },
        last_divergence: r.last_divergence.clone().filter(|_| outbound),
    });
    let rps = &vm.recovery_points;
    ObservedVm {
        power: match vm.power {
            site::Power::Running => Power::Running,
            site::Power::Off => Power::Off,
        },
        role: match vm.role {
            site::Role::Primary => Role::Primary,
            site::Role::Replica => Role::Replica,
            site::Role::TestCopy => Role::TestCopy,
        },
        replication,
        recovery_points: (rps.count > 0).then(|| ObservedRecoveryPoints {
            count: i64::try_from(rps.count).unwrap_or(i64::MAX),
            latest: rps.latest.as_ref().map(ObservedRecoveryPoint::from),
            latest_app_consistent: rps
                .latest_app_consistent
                .as_ref()
                .map(ObservedRecoveryPoint::from),
        }),
        test_copy: vm.test_copy.as_ref().map(|t| t.vm_name.clone()),
    }
}

/// A recovery point as a site names it, in the planner's terms: the one place that maps one
/// shape to the other (listings and step answers alike).
impl From<&site::RecoveryPoint> for ObservedRecoveryPoint {
    fn from(p: &site::RecoveryPoint) -> Self {
        ObservedRecoveryPoint {
            id: p.id.clone(),
            time: Some(p.time),
            app_consistent: p.app_consistent,
        }
    }
}

#[cfg(test)]
mod debug_tests {
    use super::*;

    #[test]
    fn debug_of_peer_info_hides_the_token() {
        let p = PeerInfo {
            url: "https://secondary:7101".into(),
            token: "s3cr3t-site-token".into(),
            ca_pem: None,
        };
        let dbg = format!("{p:?} {p:#?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("secondary"), "{dbg}");
    }
}
