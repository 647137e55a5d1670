//! Scale run (not part of the default suite; run it on purpose):
//!
//! ```text
//! TWINSITE_BENCH_VMS=1000 cargo test --release --test controller_bench -- --ignored --nocapture
//! ```
//!
//! Creates N VMs with small disks at the primary agent and N ReplicatedVMs, measures the time
//! to all Protected, then fails all of them over to the secondary and measures the time until
//! all run there (and until all are Protected again in the new direction). Prints the
//! controller's peak RSS and the controller's writes per VM as the API server counted them.

#[path = "controller_common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use twinsite::api::{ReplicatedVM, VmPhase};

/// Sum of apiserver_request_total for a resource (and subresource) and verbs.
fn requests(w: &World, resource: &str, subresource: &str, verbs: &[&str]) -> f64 {
    let out =
        w.cp.kubectl()
            .args(["get", "--raw", "/metrics"])
            .output()
            .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains(&format!("resource=\"{resource}\"")))
        .filter(|l| l.contains(&format!("subresource=\"{subresource}\"")))
        .filter(|l| verbs.iter().any(|v| l.contains(&format!("verb=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn count(w: &World, f: &impl Fn(&ReplicatedVM) -> bool) -> usize {
    let list = w.rvms().list(&ListParams::default()).await.unwrap();
    list.items.iter().filter(|r| f(r)).count()
}

async fn wait_all(w: &World, n: usize, what: &str, f: impl Fn(&ReplicatedVM) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let c = count(w, &f).await;
        eprintln!("  {what}: {c}/{n}");
        if c == n {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: only {c} of {n}");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "scale run: minutes of work; run with --ignored"]
async fn thousand_vms_protect_and_fail_over() {
    let n: usize = std::env::var("TWINSITE_BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let w = World::start_with("bench", &["--concurrency", "64"]).await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let names: Vec<String> = (0..n).map(|i| format!("vm-{i:04}")).collect();
    for name in &names {
        w.primary.create_vm_of(name, 64 * 1024, true).await;
    }
    let writes0 = requests(&w, "replicatedvms", "status", &["PATCH", "UPDATE"]);
    let t0 = Instant::now();
    for name in &names {
        let rvm: ReplicatedVM = serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
            "metadata": {"name": name},
            "spec": {"primarySite": p, "recoverySite": s,
                     "replication": {"intervalSeconds": 300},
                     "failover": {"type": "Planned"}},
        }))
        .unwrap();
        w.rvms().create(&PostParams::default(), &rvm).await.unwrap();
    }
    let protected = |site: String| {
        move |r: &ReplicatedVM| {
            r.status.as_ref().is_some_and(|st| {
                st.phase == Some(VmPhase::Protected) && st.active_site.as_deref() == Some(&site)
            })
        }
    };
    let pp = protected(p.clone());
    wait_all(&w, n, "protected", pp).await;
    let protect_time = t0.elapsed();
    let writes1 = requests(&w, "replicatedvms", "status", &["PATCH", "UPDATE"]);

    let t1 = Instant::now();
    for name in &names {
        w.rvms()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"activeSite": s}})),
            )
            .await
            .unwrap();
    }
    let ss = s.clone();
    wait_all(&w, n, "running at the secondary", move |r| {
        r.status
            .as_ref()
            .is_some_and(|st| st.active_site.as_deref() == Some(ss.as_str()))
    })
    .await;
    let failover_time = t1.elapsed();
    let ps = protected(s.clone());
    wait_all(&w, n, "protected again", ps).await;
    let reprotect_time = t1.elapsed();
    let writes2 = requests(&w, "replicatedvms", "status", &["PATCH", "UPDATE"]);
    let rss = w.controller.pid().and_then(peak_rss_kib).unwrap_or(0);
    let events = requests(&w, "events", "", &["POST", "CREATE", "PATCH"]);
    println!("VMs: {n}");
    println!("apply -> all Protected: {:.1}s", protect_time.as_secs_f64());
    println!(
        "failover -> all running at the target: {:.1}s",
        failover_time.as_secs_f64()
    );
    println!(
        "failover -> all Protected again (commit + reprotect): {:.1}s",
        reprotect_time.as_secs_f64()
    );
    println!("controller peak RSS: {:.1} MiB", rss as f64 / 1024.0);
    println!(
        "status writes per VM: protect {:.1}, failover+commit+reprotect {:.1}; events per VM {:.1}",
        (writes1 - writes0) / n as f64,
        (writes2 - writes1) / n as f64,
        events / n as f64
    );
}
