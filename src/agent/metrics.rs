//! Prometheus metrics of the agent (`GET /metrics`, no token: docs/security.md says why).
//!
//! Counters and the cycle histogram are fed where the numbers are known: the replication
//! driver (bytes sent, cycles, errors) and the agent-to-agent block route (bytes received).
//! Pending bytes and recovery points are read from the store when Prometheus scrapes, so they
//! are never stale and a deleted VM's series go away.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::site::VmList;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmLabels {
    pub vm: String,
}

/// Upper bounds of the cycle duration buckets, in seconds: a small VM's cycle takes
/// milliseconds, an initial copy of a large disk hours.
const CYCLE_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0,
];

pub struct Metrics {
    registry: Registry,
    sent_bytes: Family<VmLabels, Counter>,
    received_bytes: Family<VmLabels, Counter>,
    cycle_seconds: Family<VmLabels, Histogram>,
    cycle_errors: Family<VmLabels, Counter>,
    pending_bytes: Family<VmLabels, Gauge>,
    recovery_points: Family<VmLabels, Gauge>,
    verifications: Family<VmLabels, Counter>,
    diverged_blocks: Family<VmLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("twinsite_agent");
        let sent_bytes = Family::<VmLabels, Counter>::default();
        registry.register(
            "replication_sent_bytes",
            "Bytes of block batches sent to the peer site (resends included), per VM",
            sent_bytes.clone(),
        );
        let received_bytes = Family::<VmLabels, Counter>::default();
        registry.register(
            "replication_received_bytes",
            "Bytes of block batches received from the source site, per replica",
            received_bytes.clone(),
        );
        let cycle_seconds =
            Family::<VmLabels, Histogram>::new_with_constructor(|| Histogram::new(CYCLE_BUCKETS));
        registry.register(
            "replication_cycle_duration_seconds",
            "Duration of replication runs that ended in a recovery point (a cycle, with the initial copy or resync before it if one was due)",
            cycle_seconds.clone(),
        );
        let cycle_errors = Family::<VmLabels, Counter>::default();
        registry.register(
            "replication_errors",
            "Replication runs that failed, per VM",
            cycle_errors.clone(),
        );
        let pending_bytes = Family::<VmLabels, Gauge>::default();
        registry.register(
            "replication_pending_bytes",
            "Bytes written at the source since the last acknowledged cycle, per VM",
            pending_bytes.clone(),
        );
        let recovery_points = Family::<VmLabels, Gauge>::default();
        registry.register(
            "recovery_points",
            "Recovery points held at this site, per replica",
            recovery_points.clone(),
        );
        let verifications = Family::<VmLabels, Counter>::default();
        registry.register(
            "replica_verifications",
            "Block-by-block comparisons of a replica with this source, per VM",
            verifications.clone(),
        );
        let diverged_blocks = Family::<VmLabels, Counter>::default();
        registry.register(
            "replica_diverged_blocks",
            "Blocks a verification found different at the replica (each starts a resync), per VM",
            diverged_blocks.clone(),
        );
        Self {
            registry,
            sent_bytes,
            received_bytes,
            cycle_seconds,
            cycle_errors,
            pending_bytes,
            recovery_points,
            verifications,
            diverged_blocks,
        }
    }

    fn labels(vm: &str) -> VmLabels {
        VmLabels { vm: vm.to_string() }
    }

    pub fn sent(&self, vm: &str, bytes: u64) {
        self.sent_bytes
            .get_or_create(&Self::labels(vm))
            .inc_by(bytes);
    }

    pub fn received(&self, vm: &str, bytes: u64) {
        self.received_bytes
            .get_or_create(&Self::labels(vm))
            .inc_by(bytes);
    }

    /// One replication run of `vm` ended: a recovery point after `seconds`, or an error.
    pub fn cycle(&self, vm: &str, seconds: f64, ok: bool) {
        if ok {
            self.cycle_seconds
                .get_or_create(&Self::labels(vm))
                .observe(seconds);
        } else {
            self.cycle_errors.get_or_create(&Self::labels(vm)).inc();
        }
    }

    /// A verification of `vm`'s replica found `differing` blocks different.
    pub fn verified(&self, vm: &str, differing: u64) {
        self.verifications.get_or_create(&Self::labels(vm)).inc();
        self.diverged_blocks
            .get_or_create(&Self::labels(vm))
            .inc_by(differing);
    }

    /// The text Prometheus scrapes, with the gauges set from the store's listing.
    pub fn encode(&self, list: &VmList) -> String {
        self.pending_bytes.clear();
        self.recovery_points.clear();
        for v in &list.vms {
            if v.replication.pending_bytes > 0 || v.replication.peer_site.is_some() {
                self.pending_bytes
                    .get_or_create(&Self::labels(&v.name))
                    .set(i64::try_from(v.replication.pending_bytes).unwrap_or(i64::MAX));
            }
            if v.recovery_points.count > 0 {
                self.recovery_points
                    .get_or_create(&Self::labels(&v.name))
                    .set(i64::try_from(v.recovery_points.count).unwrap_or(i64::MAX));
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_metric_with_its_vm() {
        let m = Metrics::new();
        m.sent("web-01", 100);
        m.received("db-01", 50);
        m.cycle("web-01", 0.2, true);
        m.cycle("web-01", 0.0, false);
        let text = m.encode(&VmList {
            site: "primary".into(),
            accelerator: None,
            vms: vec![],
            broken: vec![],
        });
        for name in [
            "twinsite_agent_replication_sent_bytes_total{vm=\"web-01\"} 100",
            "twinsite_agent_replication_received_bytes_total{vm=\"db-01\"} 50",
            "twinsite_agent_replication_cycle_duration_seconds_count{vm=\"web-01\"} 1",
            "twinsite_agent_replication_errors_total{vm=\"web-01\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
