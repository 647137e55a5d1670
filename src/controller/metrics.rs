//! Prometheus metrics of the controller (served on /metrics).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobKind {
    pub r#type: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabels {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub rpo_seconds: Family<VmLabels, Gauge>,
    pub bytes_replicated: Family<VmLabels, Gauge>,
    pub jobs: Family<JobKind, Counter>,
    pub reconcile_errors: Family<KindLabels, Counter>,
    pub status_writes: Family<KindLabels, Counter>,
    pub site_listings: Family<SiteLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("twinsite");
        let rpo_seconds = Family::<VmLabels, Gauge>::default();
        registry.register(
            "rpo_seconds",
            "Age of the newest recovery point at the replication target",
            rpo_seconds.clone(),
        );
        let bytes_replicated = Family::<VmLabels, Gauge>::default();
        registry.register(
            "replicated_bytes",
            "Bytes the source has sent to the target since replication was enabled",
            bytes_replicated.clone(),
        );
        let jobs = Family::<JobKind, Counter>::default();
        registry.register("jobs", "Jobs ended, by type and outcome", jobs.clone());
        let reconcile_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that ended in an error, by kind",
            reconcile_errors.clone(),
        );
        let status_writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "status_writes",
            "Status patches sent to the API server, by kind",
            status_writes.clone(),
        );
        let site_listings = Family::<SiteLabels, Counter>::default();
        registry.register(
            "site_listings",
            "VM listings requested from the sites, by site",
            site_listings.clone(),
        );
        Metrics {
            registry,
            rpo_seconds,
            bytes_replicated,
            jobs,
            reconcile_errors,
            status_writes,
            site_listings,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
