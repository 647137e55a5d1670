//! The seed's procedure end to end against a real API server, two agent processes and the
//! controller process: protect, write, unplanned failover with shutdown, commit, reverse
//! replication, write at the secondary, failback (planned although the spec still says Unplanned)
//! with no data lost (digests prove it),
//! replication from primary to secondary again. `walkthrough`: docs/walkthrough.md, run with the
//! kubectl plugin.

#[path = "controller_common/mod.rs"]
mod common;
#[path = "controller_procedure/walkthrough.rs"]
mod walkthrough;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protect_fail_over_commit_reprotect_write_fail_back_replicate_again() {
    let _serial = one_at_a_time().await;
    let w = World::start("proc").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "web-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(
        vm,
        json!({"type": "Unplanned", "shutdownSource": true, "commit": "Automatic"}),
    )
    .await;

    // Protect.
    let r = w.wait_protected(vm, &p, &s).await;
    assert_eq!(jobs(&r), [("EnableReplication".into(), "Succeeded".into())]);
    assert!(
        w.secondary.vm(vm).await.is_some(),
        "replica at the secondary"
    );

    // Write data at the primary; the unplanned failover with shutdown syncs it.
    let first = pattern("first-write", 8192);
    w.primary.write(vm, 0, &first).await;

    w.patch_spec(vm, json!({"activeSite": s})).await;
    let r = w.wait_protected(vm, &s, &p).await;
    let types: Vec<String> = jobs(&r).into_iter().map(|j| j.0).collect();
    assert_eq!(
        types,
        [
            "EnableReplication",
            "UnplannedFailover",
            "Commit",
            "ReverseReplicate"
        ]
    );
    assert!(
        jobs(&r).iter().all(|j| j.1 == "Succeeded"),
        "{:?}",
        jobs(&r)
    );
    assert_eq!(
        steps(&r, "UnplannedFailover"),
        [
            ("ShutdownSource".into(), "Succeeded".into()),
            ("FenceSource".into(), "Skipped".into()),
            ("SyncRemaining".into(), "Succeeded".into()),
            ("StopReplication".into(), "Succeeded".into()),
            ("StartAtTarget".into(), "Succeeded".into()),
        ]
    );
    let st = r.status.as_ref().unwrap();
    let f = st
        .jobs
        .iter()
        .find(|j| format!("{:?}", j.type_) == "UnplannedFailover")
        .unwrap();
    assert!(f.recovery_point.as_deref().unwrap_or("").starts_with("rp-"));
    assert!(f.recovery_point_age_seconds.is_some());
    // Runs at the secondary only, with the data written before the failover.
    assert_eq!(
        w.primary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Off
    );
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    assert_eq!(w.secondary.read(vm, 0, first.len() as u64).await, first);

    // Events at job start, end.
    // (published right after the status write that ends a job: poll a little)
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let events = w.events(vm).await;
        let started = events.iter().filter(|e| e.0 == "JobStarted").count();
        let ended = events.iter().filter(|e| e.0 == "JobSucceeded").count();
        if (started, ended) == (4, 4) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && started <= 4 && ended <= 4,
            "{events:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }

    // Write at the secondary, then fail back, planned: nothing may be lost.
    let second = pattern("second-write", 4096);
    w.secondary.write(vm, 65536, &second).await;
    let want = expected_digest(&[(0, &first), (65536, &second)]);
    assert_eq!(w.secondary.digest(vm).await, want);

    // Only activeSite changes: spec.failover.type still says Unplanned from the move away,
    // but a failback is planned unless the move itself asks otherwise.
    w.patch_spec(vm, json!({"activeSite": p})).await;
    let r = w.wait_protected(vm, &p, &s).await;
    let types: Vec<String> = jobs(&r).into_iter().map(|j| j.0).collect();
    assert_eq!(
        &types[4..],
        ["PlannedFailover", "Commit", "ReverseReplicate"]
    );
    assert_eq!(
        steps(&r, "PlannedFailover"),
        [
            ("ShutdownSource".into(), "Succeeded".into()),
            ("SyncRemaining".into(), "Succeeded".into()),
            ("VerifyDigests".into(), "Succeeded".into()),
            ("StopReplication".into(), "Succeeded".into()),
            ("StartAtTarget".into(), "Succeeded".into()),
        ]
    );
    // No data lost: the primary's disk is exactly what the secondary held.
    assert_eq!(w.primary.digest(vm).await, want);
    assert_eq!(w.primary.read(vm, 65536, second.len() as u64).await, second);
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Off
    );

    // Replication from primary to secondary again: a new write reaches the replica.
    let third = pattern("third-write", 4096);
    w.primary.write(vm, 131072, &third).await;
    let want = expected_digest(&[(0, &first), (65536, &second), (131072, &third)]);
    let deadline = std::time::Instant::now() + LONG;
    loop {
        if w.secondary.digest(vm).await == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never caught up with the primary"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    let r = w.get(vm).await;
    assert!(ready(&r));
    assert!(!cond(&r, "Stalled"));
    assert!(!cond(&r, "Reconciling"));

    // Metrics: jobs by type and outcome, RPO per VM.
    let m = reqwest::get(w.controller.metrics_url())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "twinsite_jobs_total{type=\"UnplannedFailover\",outcome=\"Succeeded\"} 1",
        "twinsite_jobs_total{type=\"PlannedFailover\",outcome=\"Succeeded\"} 1",
        "twinsite_jobs_total{type=\"Commit\",outcome=\"Succeeded\"} 2",
    ] {
        assert!(m.contains(line), "{line} missing from:\n{m}");
    }
    assert!(m.contains("twinsite_rpo_seconds{"), "{m}");
}

/// kstatus (Flux, Argo CD, `kubectl wait`) reads Ready, Reconciling and Stalled. Sampled all
/// through protection, a planned failover, its commit and the reprotect: Ready is never True
/// while a job runs or the phase is not settled (Protected or Unprotected), and a VM that is
/// not Ready is always either Reconciling or Stalled, never neither (kstatus would read that
/// as Current, done). Events name what was done with a verb (`action`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kstatus_conditions_hold_through_every_phase_of_a_planned_failover() {
    let _serial = one_at_a_time().await;
    let w = World::start("kstatus").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "ks-01";
    w.primary.create_vm(vm, true).await;

    let api = w.rvms();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seen = std::collections::BTreeSet::new();
            let mut samples = 0u32;
            let mut violations = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(r) = api.get(vm).await
                    && let Some(st) = &r.status
                    && !st.conditions.is_empty()
                {
                    samples += 1;
                    let phase = st.phase.map(|p| format!("{p:?}")).unwrap_or_default();
                    seen.insert(phase.clone());
                    let c = |t: &str| cond_status(&r, t).unwrap_or_default();
                    let (ready, rec, stalled) = (c("Ready"), c("Reconciling"), c("Stalled"));
                    let running = st
                        .jobs
                        .iter()
                        .any(|j| format!("{:?}", j.state) == "Running");
                    let settled = matches!(phase.as_str(), "Protected" | "Unprotected");
                    if ready == "True" && (!settled || running) {
                        violations.push(format!(
                            "Ready=True in phase {phase} (job running: {running})"
                        ));
                    }
                    if ready == "False" && rec == "False" && stalled == "False" {
                        let why = st
                            .conditions
                            .iter()
                            .find(|c| c.type_ == "Ready")
                            .map(|c| c.reason.clone());
                        violations.push(format!(
                            "Ready, Reconciling, Stalled all False in phase {phase} ({why:?})"
                        ));
                    }
                    if running && rec != "True" {
                        violations
                            .push(format!("a job runs but Reconciling={rec} in phase {phase}"));
                    }
                    if stalled == "True" {
                        violations
                            .push(format!("Stalled=True in phase {phase} with no failed job"));
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            (seen, samples, violations)
        })
    };

    w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
        .await;
    w.wait_protected(vm, &p, &s).await;
    w.patch_spec(vm, json!({"activeSite": s})).await;
    w.wait_protected(vm, &s, &p).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (seen, samples, violations) = sampler.await.unwrap();
    assert!(
        violations.is_empty(),
        "kstatus invariants broken: {violations:#?}"
    );
    assert!(samples > 20, "too few samples: {samples}");
    for phase in ["InitialReplication", "Protected"] {
        assert!(
            seen.contains(phase),
            "phase {phase} never sampled: {seen:?}"
        );
    }
    // The failover's own phases can pass between two samples on a loaded machine; one of them
    // must have been seen, so the invariants were checked while the failover ran.
    assert!(
        ["FailingOver", "FailedOver", "Reprotecting"]
            .iter()
            .any(|p| seen.contains(*p)),
        "no phase of the failover sampled: {seen:?}"
    );

    // Events: the action is a verb; a job's events are told apart by the part of the object
    // they concern (regarding.fieldPath), so different jobs never fold into one series.
    let events: kube::api::Api<k8s_openapi::api::events::v1::Event> =
        kube::api::Api::namespaced(w.client.clone(), &w.ns);
    let list = events.list(&Default::default()).await.unwrap();
    let mine: Vec<_> = list
        .items
        .iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(vm))
        .collect();
    let actions: std::collections::BTreeSet<&str> =
        mine.iter().filter_map(|e| e.action.as_deref()).collect();
    for a in ["Replicate", "Failover"] {
        assert!(actions.contains(a), "no {a} action: {actions:?}");
    }
    for a in &actions {
        assert!(
            !a.contains('-') && !a.contains(' '),
            "action is not a verb: {a}"
        );
    }
    let started: Vec<_> = mine
        .iter()
        .filter(|e| e.reason.as_deref() == Some("JobStarted"))
        .collect();
    assert!(
        started.len() >= 3,
        "JobStarted events folded together: {started:?}"
    );
}
