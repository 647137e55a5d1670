//! Scale run of a FailoverPlan through real agents (not part of the default suite):
//!
//! ```text
//! TWINSITE_BENCH_VMS=500 cargo test --release --test plan_bench -- --ignored --nocapture
//! ```
//!
//! Creates N VMs with small disks at the primary agent, protects them, puts them in one
//! FailoverPlan of 5 groups (by label), changes the plan's targetSite and measures the time until
//! the plan is Completed, and per group when the test saw it start and finish (polled every
//! 200 ms): the gap between one group finishing and the next starting is the plan's
//! orchestration overhead per group.

#[path = "controller_common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use twinsite::api::{FailoverPlan, PlanPhase, ReplicatedVM, VmPhase};

const GROUPS: usize = 5;

async fn protected_count(w: &World, site: &str) -> usize {
    let list = w.rvms().list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|r| {
            r.status.as_ref().is_some_and(|st| {
                st.phase == Some(VmPhase::Protected) && st.active_site.as_deref() == Some(site)
            })
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale run: minutes of work; run with --ignored"]
async fn five_hundred_vms_in_five_groups_planned_failover() {
    let n: usize = std::env::var("TWINSITE_BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let w = World::start_with("planbench", &["--concurrency", "64"]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let names: Vec<String> = (0..n).map(|i| format!("vm-{i:04}")).collect();
    for (i, name) in names.iter().enumerate() {
        w.primary.create_vm_of(name, 64 * 1024, true).await;
        let rvm: ReplicatedVM = serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
            "metadata": {"name": name, "labels": {"tier": format!("g{}", i * GROUPS / n)}},
            "spec": {"primarySite": p, "recoverySite": s,
                     "replication": {"intervalSeconds": 300},
                     "failover": {"type": "Planned"}},
        }))
        .unwrap();
        w.rvms().create(&PostParams::default(), &rvm).await.unwrap();
    }
    let t0 = Instant::now();
    loop {
        let c = protected_count(&w, &p).await;
        eprintln!("  protected: {c}/{n}");
        if c == n {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(3600),
            "only {c} protected"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    println!(
        "VMs: {n}; all Protected after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    let groups: Vec<serde_json::Value> = (0..GROUPS)
        .map(|g| json!({"name": format!("g{g}"), "selector": {"matchLabels": {"tier": format!("g{g}")}}}))
        .collect();
    let plans: Api<FailoverPlan> = Api::namespaced(w.client.clone(), &w.ns);
    let fp: FailoverPlan = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
        "metadata": {"name": "bench"},
        "spec": {"targetSite": p, "failover": {"type": "Planned", "commit": "Automatic"},
                 "groups": groups},
    }))
    .unwrap();
    plans.create(&PostParams::default(), &fp).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let t1 = Instant::now();
    let generation = plans
        .patch(
            "bench",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"targetSite": s}})),
        )
        .await
        .unwrap()
        .metadata
        .generation;
    // Group name -> (first seen Running or later, first seen Succeeded), seconds after t1.
    let mut seen: BTreeMap<String, (Option<f64>, Option<f64>)> = BTreeMap::new();
    let mut last_print = Instant::now();
    let total = loop {
        let fp = plans.get("bench").await.unwrap();
        let st = fp.status.unwrap_or_default();
        let now = t1.elapsed().as_secs_f64();
        for g in &st.groups {
            let e = seen.entry(g.name.clone()).or_default();
            if g.state != "Pending" && e.0.is_none() {
                e.0 = Some(now);
            }
            if g.state == "Succeeded" && e.1.is_none() {
                e.1 = Some(now);
            }
        }
        // Completed for the new targetSite: the plan job that moved the VMs to it is done.
        let moved = st
            .jobs
            .last()
            .is_some_and(|j| j.target_site.as_deref() == Some(s.as_str()));
        if st.observed_generation >= generation && moved && st.phase == Some(PlanPhase::Completed) {
            break now;
        }
        assert!(
            st.phase != Some(PlanPhase::Failed),
            "plan failed: {:?}",
            st.conditions
        );
        assert!(
            t1.elapsed() < Duration::from_secs(3600),
            "plan never completed"
        );
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!("  plan: {:?} groups {:?}", st.phase, st.groups_summary);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("targetSite change -> plan Completed: {total:.1}s");
    while protected_count(&w, &s).await < n {
        assert!(
            t1.elapsed() < Duration::from_secs(3600),
            "not all Protected at the target"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "targetSite change -> all Protected at the target (commit and reprotect done): {:.1}s",
        t1.elapsed().as_secs_f64()
    );
    let mut prev_end: Option<f64> = None;
    for (name, (start, end)) in &seen {
        let (start, end) = (start.unwrap_or(f64::NAN), end.unwrap_or(f64::NAN));
        let gap = prev_end.map(|p| start - p);
        println!(
            "group {name}: start {start:.1}s, end {end:.1}s, took {:.1}s{}",
            end - start,
            gap.map(|g| format!(", started {g:.2}s after the previous group ended"))
                .unwrap_or_default()
        );
        prev_end = Some(end);
    }
    let rss = w.controller.pid().and_then(peak_rss_kib);
    println!(
        "controller peak RSS: {:.1} MiB",
        rss.unwrap_or(0) as f64 / 1024.0
    );
}
