//! Prometheus metrics of the controller (served on /metrics).
//!
//! Besides what the reconcilers count, the leader exports what the status of every
//! ReplicatedVM, FailoverPlan and Site says (`status_gauges`): conditions, phases, replication
//! state and interval. The chart's PrometheusRule and dashboard are built on these.

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

/// One condition of one object: 1 when True, 0 when False or Unknown.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabels {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub condition: String,
    pub reason: String,
}

/// The phase of one object: 1 for the phase it is in (no series for the others).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub phase: String,
}

/// The replication state of one ReplicatedVM: 1 for the state it is in.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub namespace: String,
    pub name: String,
    pub state: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub rpo_seconds: Family<VmLabels, Gauge>,
    pub bytes_replicated: Family<VmLabels, Gauge>,
    pub jobs: Family<JobKind, Counter>,
    pub reconcile_errors: Family<KindLabels, Counter>,
    pub status_writes: Family<KindLabels, Counter>,
    pub site_listings: Family<SiteLabels, Counter>,
    pub replication_enabled: Family<VmLabels, Gauge>,
    pub replication_interval: Family<VmLabels, Gauge>,
    pub replica_divergences: Family<VmLabels, Gauge>,
    pub replication_state: Family<StateLabels, Gauge>,
    pub condition: Family<ConditionLabels, Gauge>,
    pub phase: Family<PhaseLabels, Gauge>,
    /// ReplicatedVMs whose condition SplitBrain is True (found running at both sites).
    pub split_brain_vms: Gauge,
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
        let replication_enabled = Family::<VmLabels, Gauge>::default();
        registry.register(
            "replication_enabled",
            "1 when the ReplicatedVM's spec asks for replication, 0 otherwise",
            replication_enabled.clone(),
        );
        let replication_interval = Family::<VmLabels, Gauge>::default();
        registry.register(
            "replication_interval_seconds",
            "Replication interval the RPO health is judged against (the source's, else the spec's), while replication is asked for",
            replication_interval.clone(),
        );
        let replica_divergences = Family::<VmLabels, Gauge>::default();
        registry.register(
            "replica_divergences",
            "Comparisons of the replica with the source that found it different since replication began in this direction (status.replication.divergences), while replication runs",
            replica_divergences.clone(),
        );
        let replication_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "replication_state",
            "1 for the replication state status.replication shows (Disabled, InitialReplication, Replicating, Resynchronizing, Paused, Error)",
            replication_state.clone(),
        );
        let condition = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "condition",
            "Status conditions of ReplicatedVMs, FailoverPlans and Sites, with their reason: 1 True, 0 False or Unknown",
            condition.clone(),
        );
        let phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "phase",
            "1 for the phase a ReplicatedVM or FailoverPlan is in",
            phase.clone(),
        );
        let split_brain_vms = Gauge::default();
        registry.register(
            "split_brain_vms",
            "ReplicatedVMs found running at both sites (condition SplitBrain True): the controller powers neither copy off until a person says which to keep",
            split_brain_vms.clone(),
        );
        Metrics {
            registry,
            split_brain_vms,
            rpo_seconds,
            bytes_replicated,
            jobs,
            reconcile_errors,
            status_writes,
            site_listings,
            replication_enabled,
            replication_interval,
            replica_divergences,
            replication_state,
            condition,
            phase,
        }
    }

    /// Removes every status gauge series (a controller that stops leading exports none).
    pub fn clear_status(&self) {
        self.replication_enabled.clear();
        self.replication_interval.clear();
        self.replica_divergences.clear();
        self.replication_state.clear();
        self.condition.clear();
        self.phase.clear();
        self.split_brain_vms.set(0);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// What the status gauges show of one object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// (type, reason, True)
    pub conditions: Vec<(String, String, bool)>,
    pub phase: Option<String>,
    /// ReplicatedVMs only: spec.replication.enabled.
    pub replication_enabled: Option<bool>,
    /// ReplicatedVMs only: the interval health is judged against, while replication is asked for.
    pub replication_interval: Option<i64>,
    /// ReplicatedVMs only: status.replication.state.
    pub replication_state: Option<String>,
    /// ReplicatedVMs only: status.replication.divergences (0 when absent), while replication
    /// runs.
    pub replica_divergences: Option<i64>,
}

fn conditions_of(
    c: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
) -> Vec<(String, String, bool)> {
    c.iter()
        .map(|c| (c.type_.clone(), c.reason.clone(), c.status == "True"))
        .collect()
}

impl Snapshot {
    pub fn of_rvm(r: &crate::api::ReplicatedVM) -> Self {
        use kube::ResourceExt;
        let st = r.status.clone().unwrap_or_default();
        let enabled = r.spec.replication.enabled;
        let rep = st.replication.as_ref();
        Snapshot {
            kind: "ReplicatedVM",
            namespace: r.namespace().unwrap_or_default(),
            name: r.name_any(),
            conditions: conditions_of(&st.conditions),
            phase: st.phase.map(|p| format!("{p:?}")),
            replication_enabled: Some(enabled),
            replication_interval: enabled.then(|| {
                rep.and_then(|r| r.settings.as_ref())
                    .map(|s| s.interval_seconds)
                    .unwrap_or(r.spec.replication.interval_seconds)
            }),
            replication_state: Some(
                rep.map(|r| format!("{:?}", r.state))
                    .unwrap_or_else(|| "Disabled".to_string()),
            ),
            replica_divergences: rep
                .filter(|r| r.state != crate::api::ReplicationState::Disabled)
                .map(|r| r.divergences.unwrap_or(0)),
        }
    }

    pub fn of_plan(p: &crate::api::FailoverPlan) -> Self {
        use kube::ResourceExt;
        let st = p.status.clone().unwrap_or_default();
        Snapshot {
            kind: "FailoverPlan",
            namespace: p.namespace().unwrap_or_default(),
            name: p.name_any(),
            conditions: conditions_of(&st.conditions),
            phase: st.phase.map(|p| format!("{p:?}")),
            ..Default::default()
        }
    }

    pub fn of_site(s: &crate::api::Site) -> Self {
        use kube::ResourceExt;
        let st = s.status.clone().unwrap_or_default();
        Snapshot {
            kind: "Site",
            namespace: String::new(),
            name: s.name_any(),
            conditions: conditions_of(&st.conditions),
            ..Default::default()
        }
    }

    /// A ReplicatedVM whose condition SplitBrain is True.
    fn split_brain(&self) -> bool {
        self.kind == "ReplicatedVM"
            && self
                .conditions
                .iter()
                .any(|(t, _, on)| t == "SplitBrain" && *on)
    }

    fn key(&self) -> (&'static str, String, String) {
        (self.kind, self.namespace.clone(), self.name.clone())
    }

    fn vm(&self) -> VmLabels {
        VmLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    fn condition_labels(&self) -> Vec<(ConditionLabels, bool)> {
        self.conditions
            .iter()
            .map(|(t, r, v)| {
                (
                    ConditionLabels {
                        kind: self.kind.to_string(),
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                        condition: t.clone(),
                        reason: r.clone(),
                    },
                    *v,
                )
            })
            .collect()
    }

    fn phase_labels(&self) -> Option<PhaseLabels> {
        self.phase.as_ref().map(|p| PhaseLabels {
            kind: self.kind.to_string(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            phase: p.clone(),
        })
    }

    fn state_labels(&self) -> Option<StateLabels> {
        self.replication_state.as_ref().map(|s| StateLabels {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            state: s.clone(),
        })
    }
}

/// The status gauges: the series of each object follow its newest snapshot, and go when it
/// goes. New series are set before old ones are removed, so a scrape never sees an object
/// without its series.
#[derive(Default)]
pub struct StatusGauges {
    shown: std::collections::HashMap<(&'static str, String, String), Snapshot>,
}

impl StatusGauges {
    pub fn show(&mut self, m: &Metrics, s: Snapshot) {
        let old = self.shown.remove(&s.key());
        match (
            old.as_ref().is_some_and(Snapshot::split_brain),
            s.split_brain(),
        ) {
            (false, true) => {
                m.split_brain_vms.inc();
            }
            (true, false) => {
                m.split_brain_vms.dec();
            }
            _ => {}
        }
        for (l, v) in s.condition_labels() {
            m.condition.get_or_create(&l).set(i64::from(v));
        }
        if let Some(l) = s.phase_labels() {
            m.phase.get_or_create(&l).set(1);
        }
        if let Some(l) = s.state_labels() {
            m.replication_state.get_or_create(&l).set(1);
        }
        if let Some(e) = s.replication_enabled {
            m.replication_enabled
                .get_or_create(&s.vm())
                .set(i64::from(e));
        }
        if let Some(i) = s.replication_interval {
            m.replication_interval.get_or_create(&s.vm()).set(i);
        }
        if let Some(n) = s.replica_divergences {
            m.replica_divergences.get_or_create(&s.vm()).set(n);
        }
        if let Some(old) = old {
            let new_conds: Vec<ConditionLabels> =
                s.condition_labels().into_iter().map(|(l, _)| l).collect();
            for (l, _) in old.condition_labels() {
                if !new_conds.contains(&l) {
                    m.condition.remove(&l);
                }
            }
            if old.phase_labels() != s.phase_labels()
                && let Some(l) = old.phase_labels()
            {
                m.phase.remove(&l);
            }
            if old.state_labels() != s.state_labels()
                && let Some(l) = old.state_labels()
            {
                m.replication_state.remove(&l);
            }
            if s.replication_interval.is_none() && old.replication_interval.is_some() {
                m.replication_interval.remove(&s.vm());
            }
            if s.replica_divergences.is_none() && old.replica_divergences.is_some() {
                m.replica_divergences.remove(&s.vm());
            }
        }
        self.shown.insert(s.key(), s);
    }

    pub fn forget(&mut self, m: &Metrics, kind: &'static str, namespace: &str, name: &str) {
        let Some(old) = self
            .shown
            .remove(&(kind, namespace.to_string(), name.to_string()))
        else {
            return;
        };
        if old.split_brain() {
            m.split_brain_vms.dec();
        }
        for (l, _) in old.condition_labels() {
            m.condition.remove(&l);
        }
        if let Some(l) = old.phase_labels() {
            m.phase.remove(&l);
        }
        if let Some(l) = old.state_labels() {
            m.replication_state.remove(&l);
        }
        if old.replication_enabled.is_some() {
            m.replication_enabled.remove(&old.vm());
            m.replication_interval.remove(&old.vm());
            m.replica_divergences.remove(&old.vm());
        }
    }
}

/// Keeps the status gauges in step with the API server until the future is dropped: one watch
/// per kind. Objects gone from a relist are forgotten.
pub async fn status_gauges(client: kube::Client, metrics: std::sync::Arc<Metrics>) {
    use futures::StreamExt;
    use kube::api::Api;
    use kube::runtime::{WatchStreamExt, watcher};

    enum Ev {
        Seen(Snapshot),
        Gone(&'static str, String, String),
        Relist(&'static str),
        RelistDone(&'static str),
    }
    fn events<K>(
        api: Api<K>,
        kind: &'static str,
        snap: fn(&K) -> Snapshot,
    ) -> futures::stream::BoxStream<'static, Ev>
    where
        K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    {
        watcher(api, watcher::Config::default())
            .default_backoff()
            .filter_map(move |e| async move {
                match e {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        Some(Ev::Seen(snap(&o)))
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        let s = snap(&o);
                        Some(Ev::Gone(kind, s.namespace, s.name))
                    }
                    Ok(watcher::Event::Init) => Some(Ev::Relist(kind)),
                    Ok(watcher::Event::InitDone) => Some(Ev::RelistDone(kind)),
                    Err(_) => None,
                }
            })
            .boxed()
    }
    let mut stream = futures::stream::select_all([
        events(
            Api::<crate::api::ReplicatedVM>::all(client.clone()),
            "ReplicatedVM",
            Snapshot::of_rvm,
        ),
        events(
            Api::<crate::api::FailoverPlan>::all(client.clone()),
            "FailoverPlan",
            Snapshot::of_plan,
        ),
        events(
            Api::<crate::api::Site>::all(client),
            "Site",
            Snapshot::of_site,
        ),
    ]);
    let mut gauges = StatusGauges::default();
    let mut relisted: std::collections::HashMap<
        &'static str,
        std::collections::HashSet<(String, String)>,
    > = Default::default();
    while let Some(e) = stream.next().await {
        match e {
            Ev::Seen(s) => {
                if let Some(seen) = relisted.get_mut(s.kind) {
                    seen.insert((s.namespace.clone(), s.name.clone()));
                }
                gauges.show(&metrics, s);
            }
            Ev::Gone(kind, ns, name) => gauges.forget(&metrics, kind, &ns, &name),
            Ev::Relist(kind) => {
                relisted.insert(kind, Default::default());
            }
            Ev::RelistDone(kind) => {
                let seen = relisted.remove(kind).unwrap_or_default();
                let stale: Vec<_> = gauges
                    .shown
                    .keys()
                    .filter(|(k, ns, n)| *k == kind && !seen.contains(&(ns.clone(), n.clone())))
                    .cloned()
                    .collect();
                for (k, ns, n) in stale {
                    gauges.forget(&metrics, k, &ns, &n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(phase: &str, ready: (&str, bool), state: &str, enabled: bool) -> Snapshot {
        Snapshot {
            kind: "ReplicatedVM",
            namespace: "finance".into(),
            name: "web-01".into(),
            conditions: vec![
                ("Ready".into(), ready.0.into(), ready.1),
                ("Stalled".into(), "NotStalled".into(), false),
            ],
            phase: Some(phase.into()),
            replication_enabled: Some(enabled),
            replication_interval: enabled.then_some(300),
            replication_state: Some(state.into()),
            replica_divergences: enabled.then_some(0),
        }
    }

    #[test]
    fn split_brain_vms_counts_the_vms_whose_split_brain_is_true() {
        let m = Metrics::new();
        let mut g = StatusGauges::default();
        let split = |name: &str, on: bool| {
            let mut s = vm("Protected", ("SplitBrain", !on), "Replicating", true);
            s.name = name.into();
            s.conditions
                .push(("SplitBrain".into(), "SplitBrain".into(), on));
            s
        };
        g.show(&m, split("a", true));
        g.show(&m, split("b", true));
        g.show(&m, split("a", true));
        assert_eq!(m.split_brain_vms.get(), 2);
        assert!(
            m.encode().contains("twinsite_split_brain_vms 2"),
            "{}",
            m.encode()
        );
        g.show(&m, split("a", false));
        assert_eq!(m.split_brain_vms.get(), 1);
        g.forget(&m, "ReplicatedVM", "finance", "b");
        assert_eq!(m.split_brain_vms.get(), 0);
        // Another kind's condition of that name is not a VM in split brain.
        let mut site = split("c", true);
        site.kind = "Site";
        g.show(&m, site);
        assert_eq!(m.split_brain_vms.get(), 0);
    }

    #[test]
    fn status_gauges_follow_the_newest_status_and_go_with_the_object() {
        let m = Metrics::new();
        let mut g = StatusGauges::default();
        g.show(
            &m,
            vm("FailingOver", ("JobRunning", false), "Replicating", true),
        );
        g.show(
            &m,
            vm("Protected", ("Protected", true), "Replicating", true),
        );
        let text = m.encode();
        for want in [
            r#"twinsite_phase{kind="ReplicatedVM",namespace="finance",name="web-01",phase="Protected"} 1"#,
            r#"twinsite_condition{kind="ReplicatedVM",namespace="finance",name="web-01",condition="Ready",reason="Protected"} 1"#,
            r#"twinsite_condition{kind="ReplicatedVM",namespace="finance",name="web-01",condition="Stalled",reason="NotStalled"} 0"#,
            r#"twinsite_replication_state{namespace="finance",name="web-01",state="Replicating"} 1"#,
            r#"twinsite_replication_interval_seconds{namespace="finance",name="web-01"} 300"#,
            r#"twinsite_replication_enabled{namespace="finance",name="web-01"} 1"#,
            r#"twinsite_replica_divergences{namespace="finance",name="web-01"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == want), "{want} missing:\n{text}");
        }
        assert!(
            !text.contains("FailingOver") && !text.contains("JobRunning"),
            "{text}"
        );

        // Replication turned off: no interval, the state Disabled only.
        g.show(
            &m,
            vm("Unprotected", ("Unprotected", true), "Disabled", false),
        );
        let text = m.encode();
        assert!(
            !text.contains("twinsite_replication_interval_seconds{"),
            "{text}"
        );
        assert!(!text.contains("twinsite_replica_divergences{"), "{text}");
        assert!(!text.contains(r#"state="Replicating""#), "{text}");
        assert!(
            text.contains(r#"twinsite_replication_enabled{namespace="finance",name="web-01"} 0"#)
        );

        g.forget(&m, "ReplicatedVM", "finance", "web-01");
        let text = m.encode();
        assert!(!text.contains("web-01"), "{text}");
    }
}
