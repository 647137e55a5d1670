//! SIGKILL of the controller in the middle of every job type of the procedure: after each
//! restart it resumes where it was, and every job ends exactly once.

#[path = "controller_common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures::{StreamExt, TryStreamExt};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_job_resumes_and_every_job_ends_once() {
    let w = Arc::new(tokio::sync::Mutex::new(World::start("crash").await));
    let (p, s, rvms) = {
        let w = w.lock().await;
        (w.primary.site.clone(), w.secondary.site.clone(), w.rvms())
    };
    let vm = "crash-01";
    {
        let w = w.lock().await;
        w.primary.create_vm(vm, true).await;
    }

    // A killer: whenever a (job, step) it has not seen yet is Running, SIGKILL the controller
    // and start it again.
    let killed: Arc<Mutex<HashSet<(String, String)>>> = Default::default();
    let stop = Arc::new(tokio::sync::Notify::new());
    let killer = {
        let w = w.clone();
        let killed = killed.clone();
        let stop = stop.clone();
        let rvms = rvms.clone();
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields(&format!("metadata.name={vm}"));
            let mut objs = watcher::watcher(rvms, cfg).applied_objects().boxed();
            loop {
                let r = tokio::select! {
                    _ = stop.notified() => return,
                    r = objs.try_next() => r,
                };
                let r = match r {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(_) => continue,
                };
                let Some(st) = &r.status else { continue };
                let Some(job) = st
                    .jobs
                    .iter()
                    .find(|j| format!("{:?}", j.state) == "Running")
                else {
                    continue;
                };
                let Some(step) = job
                    .steps
                    .iter()
                    .find(|s| format!("{:?}", s.state) == "Running")
                else {
                    continue;
                };
                let key = (job.name.clone(), step.name.clone());
                let new = killed.lock().unwrap().insert(key);
                if new {
                    w.lock().await.controller.restart();
                }
            }
        })
    };

    {
        let w = w.lock().await;
        w.create_rvm(vm, json!({"type": "Unplanned", "shutdownSource": true}))
            .await;
        w.wait_protected(vm, &p, &s).await;
        w.patch_spec(vm, json!({"activeSite": s})).await;
    }
    // Waiting without holding the lock, so the killer can restart the controller.
    let wait = |site: String, to: String| {
        let w = w.clone();
        async move {
            let deadline = std::time::Instant::now() + LONG;
            loop {
                let done = {
                    let w = w.lock().await;
                    let r = w.get(vm).await;
                    r.status.as_ref().is_some_and(|st| {
                        st.phase == Some(twinsite::api::VmPhase::Protected)
                            && st.active_site.as_deref() == Some(site.as_str())
                            && st
                                .replication
                                .as_ref()
                                .is_some_and(|x| x.target_site.as_deref() == Some(to.as_str()))
                    }) && ready(&r)
                };
                if done {
                    return;
                }
                if std::time::Instant::now() > deadline {
                    let w = w.lock().await;
                    let r = w.get(vm).await;
                    panic!(
                        "not protected at {site}: {}\n{}",
                        serde_json::to_string_pretty(&r.status).unwrap(),
                        w.controller.log()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    wait(s.clone(), p.clone()).await;
    {
        let w = w.lock().await;
        w.patch_spec(
            vm,
            json!({"activeSite": p, "failover": {"type": "Planned"}}),
        )
        .await;
    }
    wait(p.clone(), s.clone()).await;
    {
        let w = w.lock().await;
        w.patch_spec(vm, json!({"testFailover": {"enabled": true}}))
            .await;
    }
    {
        let w2 = w.clone();
        let deadline = std::time::Instant::now() + LONG;
        loop {
            let r = w2.lock().await.get(vm).await;
            if r.status.as_ref().is_some_and(|s| s.test_failover.is_some()) && ready(&r) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "drill did not start");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        w2.lock()
            .await
            .patch_spec(vm, json!({"testFailover": {"enabled": false}}))
            .await;
        loop {
            let r = w2.lock().await.get(vm).await;
            if r.status.as_ref().is_some_and(|s| s.test_failover.is_none()) && ready(&r) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "drill not cleaned up");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    stop.notify_waiters();
    let _ = killer.await;

    let w = w.lock().await;
    let r = w.get(vm).await;
    let st = r.status.clone().unwrap();
    let types: Vec<String> = st.jobs.iter().map(|j| format!("{:?}", j.type_)).collect();
    assert_eq!(
        types,
        [
            "EnableReplication",
            "UnplannedFailover",
            "Commit",
            "ReverseReplicate",
            "PlannedFailover",
            "Commit",
            "ReverseReplicate",
            "TestFailover",
            "TestFailoverCleanup"
        ]
    );
    assert!(
        st.jobs
            .iter()
            .all(|j| format!("{:?}", j.state) == "Succeeded"),
        "{:#?}",
        st.jobs
    );
    let names: HashSet<&str> = st.jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names.len(), st.jobs.len(), "job names unique");
    // Killed in the middle of every job type at least once.
    let killed = killed.lock().unwrap().clone();
    let killed_jobs: HashSet<&str> = killed.iter().map(|k| k.0.as_str()).collect();
    for j in &st.jobs {
        assert!(
            killed_jobs.contains(j.name.as_str()),
            "never killed during {} ({:?})",
            j.name,
            killed
        );
    }
    assert!(w.controller.starts as usize > st.jobs.len());
    // Each job ended once: one end event per job at most, and a start event per job at most.
    let events = w.events(vm).await;
    let mut ends: HashMap<String, usize> = HashMap::new();
    for (reason, note) in &events {
        if reason == "JobSucceeded" || reason == "JobFailed" {
            for j in &st.jobs {
                if note.split_whitespace().nth(1) == Some(j.name.as_str()) {
                    *ends.entry(j.name.clone()).or_default() += 1;
                }
            }
        }
    }
    assert!(ends.values().all(|n| *n == 1), "{ends:?}");
    // The VM runs at the primary only, and the data path is whole.
    assert_eq!(
        w.primary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Off
    );
}
