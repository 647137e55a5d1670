//! A Protected VM with nothing changing costs at most one status write per five minutes:
//! counted as the API server's watch events on the object over several sync intervals.

#[path = "controller_common/mod.rs"]
mod common;

use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use kube::runtime::watcher::{self, Event};
use serde_json::json;

async fn newest_rp(w: &World, vm: &str) -> Option<String> {
    w.secondary
        .vm(vm)
        .await?
        .recovery_points
        .latest
        .map(|p| p.id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_protected_vm_writes_status_rarely() {
    let w = World::start("quiet").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "quiet-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(vm, json!({"type": "Planned"})).await;
    w.wait_protected(vm, &p, &s).await;
    // Let the job's own follow-up writes settle (first figures after protection).
    tokio::time::sleep(Duration::from_secs(10)).await;

    // Watch the object for three replication intervals (30 s each) and more; the replica keeps
    // receiving recovery points all along.
    let cfg = watcher::Config::default().fields(&format!("metadata.name={vm}"));
    let stream = watcher::watcher(w.rvms(), cfg);
    let mut writes = 0;
    let mut rvs = std::collections::HashSet::new();
    let window = tokio::time::sleep(Duration::from_secs(100));
    tokio::pin!(window);
    let mut stream = stream.boxed();
    let mut first = true;
    // Guest writes all along, so every cycle carries data and makes a recovery point.
    let rp_before = newest_rp(&w, vm).await;
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = &mut window => break,
            _ = tick.tick() => {
                n += 1;
                w.primary.write(vm, 4096 * (n % 64), &pattern(&format!("w{n}"), 4096)).await;
            }
            ev = stream.try_next() => match ev {
                Ok(Some(Event::Apply(o))) | Ok(Some(Event::InitApply(o))) => {
                    let rv = o.metadata.resource_version.clone().unwrap_or_default();
                    if rvs.insert(rv) && !first {
                        writes += 1;
                    }
                    first = false;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => panic!("watch failed: {e}"),
            }
        }
    }
    let rp_after = newest_rp(&w, vm).await;
    assert!(
        rp_after > rp_before,
        "replication went on during the window: {rp_before:?} -> {rp_after:?}"
    );
    assert!(
        writes <= 1,
        "{writes} writes to a steady Protected VM in 100 seconds"
    );
    let r = w.get(vm).await;
    assert!(ready(&r));
}
