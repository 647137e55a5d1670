//! An unplanned failover of a VM without integration services: a failover to an app-consistent
//! point (it has none) fails before the source is touched; then the graceful shutdown fails,
//! the failover goes on, the source is powered off (fenced) before the VM starts at the target.
//! A VM powered off at its active site is shown not Ready and not Healthy, and stays off.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;
use twinsite::api::{ReplicatedVM, Site};
use twinsite::site::{PowerAction, SiteProvider};

fn site_ready(s: &Site) -> Option<(String, String)> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

async fn wait_site(w: &World, name: &str, want: (&str, &str)) -> Site {
    let api: Api<Site> = Api::all(w.client.clone());
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let s = api.get(name).await.unwrap();
        if site_ready(&s)
            .as_ref()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            == Some(want)
        {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "site {name}: {:?}",
            s.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_fails_and_the_unplanned_failover_goes_on() {
    let _serial = one_at_a_time().await;
    let w = World::start("noint").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "app-01";
    w.primary.create_vm(vm, false).await;
    w.create_rvm(
        vm,
        json!({"type": "Unplanned", "shutdownSource": true, "commit": "Automatic"}),
    )
    .await;
    w.wait_protected(vm, &p, &s).await;

    // Site health: connected with its VM count; a wrong token is reported as such.
    let site = wait_site(&w, &p, ("True", "Connected")).await;
    let st = site.status.unwrap();
    assert_eq!(st.vm_count, Some(1));
    assert!(st.last_heartbeat_time.is_some());
    let bad = format!("{p}-badtoken");
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), &w.ns);
    let sec: Secret = serde_json::from_value(json!({
        "metadata": {"name": "wrong", "labels": {"twinsite.io/site": bad}},
        "stringData": {"token": "not-the-token"}}))
    .unwrap();
    secrets.create(&PostParams::default(), &sec).await.unwrap();
    let sites: Api<Site> = Api::all(w.client.clone());
    let obj: Site = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "Site", "metadata": {"name": bad},
        "spec": {"agent": {"url": w.primary.url, "insecure": true,
            "tokenSecretRef": {"namespace": w.ns, "name": "wrong", "key": "token"}}}}))
    .unwrap();
    sites.create(&PostParams::default(), &obj).await.unwrap();
    wait_site(&w, &bad, ("False", "Unauthorized")).await;

    let data = pattern("before-disaster", 4096);
    w.primary.write(vm, 0, &data).await;

    // Without integration services the VM has no app-consistent recovery point: the failover
    // is refused before the source is shut down, and says what the replica holds.
    w.patch_spec(
        vm,
        json!({"activeSite": s, "failover": {"recoveryPoint": "LatestAppConsistent"}}),
    )
    .await;
    let r = w
        .wait_for(vm, "the failover to a missing point failed", |r| {
            jobs(r).last() == Some(&("UnplannedFailover".into(), "Failed".into()))
        })
        .await;
    assert!(
        steps(&r, "UnplannedFailover")
            .iter()
            .all(|s| s.1 == "Skipped"),
        "{:?}",
        steps(&r, "UnplannedFailover")
    );
    let st = r.status.as_ref().unwrap();
    let msg = st
        .jobs
        .last()
        .and_then(|j| j.message.clone())
        .unwrap_or_default();
    assert!(
        msg.contains("LatestAppConsistent") && msg.contains("none app-consistent"),
        "{msg}"
    );
    assert_eq!(st.active_site.as_deref(), Some(p.as_str()));
    assert_eq!(
        w.primary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );

    w.patch_spec(vm, json!({"failover": {"recoveryPoint": "Latest"}}))
        .await;
    let r = w.wait_protected(vm, &s, &p).await;
    let st = steps(&r, "UnplannedFailover");
    assert_eq!(st[0].0, "ShutdownSource");
    assert_eq!(st[0].1, "Failed", "{st:?}");
    assert_eq!(
        &st[1..],
        [
            ("FenceSource".into(), "Succeeded".into()),
            ("SyncRemaining".into(), "Succeeded".into()),
            ("StopReplication".into(), "Succeeded".into()),
            ("StartAtTarget".into(), "Succeeded".into()),
        ]
    );
    let job = r
        .status
        .as_ref()
        .unwrap()
        .jobs
        .iter()
        .rev()
        .find(|j| format!("{:?}", j.type_) == "UnplannedFailover")
        .unwrap()
        .clone();
    assert_eq!(format!("{:?}", job.state), "Succeeded");
    let msg = job.steps[0].message.clone().unwrap_or_default();
    assert!(msg.contains("continues"), "{msg}");
    // The VM runs at one site only, with the data (fenced, then synced).
    assert_eq!(
        w.primary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Off
    );
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    assert_eq!(w.secondary.read(vm, 0, data.len() as u64).await, data);
    let events = w.events(vm).await;
    assert!(
        events
            .iter()
            .any(|e| e.0 == "StepFailed" && e.1.contains("ShutdownSource")),
        "{events:?}"
    );

    // Powered off at its active site by someone: not Ready, not Healthy, and left off.
    w.secondary
        .client
        .power(vm, PowerAction::PowerOff, "test-power-off")
        .await
        .unwrap();
    let r = w
        .wait_for(vm, "VMNotRunning", |r| {
            r.status.as_ref().is_some_and(|st| {
                st.conditions.iter().any(|c| {
                    c.type_ == "Ready" && c.status == "False" && c.reason == "VMNotRunning"
                })
            })
        })
        .await;
    let st = r.status.as_ref().unwrap();
    let ready = st.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert!(ready.message.contains(s.as_str()), "{}", ready.message);
    let health = st.replication.as_ref().and_then(|x| x.health);
    assert!(
        health.is_some_and(|h| h != twinsite::api::ReplicationHealth::Healthy),
        "{health:?}"
    );
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Off
    );
}

/// A planned failover of a VM without integration services fails at ShutdownSource with a clear
/// reason and stalls (Stalled True, the retry named in its message). The operator powers the VM
/// off through the agent and annotates `twinsite.io/retry=<job>`: the job runs again from
/// ShutdownSource as attempt 2 and moves the VM. The controller leaves the annotation as it
/// is, and the kept annotation does not run the job a third time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_planned_failover_runs_again_on_the_retry_annotation() {
    let _serial = one_at_a_time().await;
    let w = World::start("retry").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "legacy-01";
    w.primary.create_vm(vm, false).await;
    w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
        .await;
    w.wait_protected(vm, &p, &s).await;

    w.patch_spec(vm, json!({"activeSite": s})).await;
    let r = w
        .wait_for(vm, "the planned failover failed and stalled", |r| {
            cond(r, "Stalled")
                && jobs(r).last().map(|(t, st)| (t.as_str(), st.as_str()))
                    == Some(("PlannedFailover", "Failed"))
        })
        .await;
    let st = r.status.clone().unwrap();
    let job = st.jobs.last().unwrap().clone();
    assert_eq!(job.attempt, Some(1));
    let shutdown = job
        .steps
        .iter()
        .find(|x| x.name == "ShutdownSource")
        .unwrap();
    assert_eq!(format!("{:?}", shutdown.state), "Failed");
    assert!(
        shutdown
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("integration services"),
        "{shutdown:?}"
    );
    let stalled = st.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
    assert!(
        stalled
            .message
            .contains(&format!("twinsite.io/retry={}", job.name)),
        "{stalled:?}"
    );
    assert_eq!(cond_status(&r, "Reconciling").as_deref(), Some("False"));
    assert_eq!(cond_status(&r, "Ready").as_deref(), Some("False"));
    // Nothing moves on its own: the VM still runs at the primary site.
    assert_eq!(
        w.primary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );

    // The operator powers it off through the agent's route and asks for a retry.
    w.primary
        .client
        .power(vm, PowerAction::PowerOff, "operator-power-off")
        .await
        .unwrap();
    annotate(&w, "rvm", vm, "twinsite.io/retry", &job.name);

    let r = w
        .wait_for(vm, "the retried failover succeeded", |r| {
            r.status.as_ref().is_some_and(|st| {
                st.jobs.iter().any(|j| {
                    j.name == job.name
                        && format!("{:?}", j.state) == "Succeeded"
                        && j.attempt == Some(2)
                })
            })
        })
        .await;
    let retried = r
        .status
        .as_ref()
        .unwrap()
        .jobs
        .iter()
        .find(|j| j.name == job.name)
        .unwrap()
        .clone();
    let shutdown = retried
        .steps
        .iter()
        .find(|x| x.name == "ShutdownSource")
        .unwrap();
    assert_eq!(format!("{:?}", shutdown.state), "Succeeded", "{retried:?}");
    assert!(
        shutdown
            .operation_id
            .as_deref()
            .unwrap_or_default()
            .contains("-a2-"),
        "a retried step has an operation id of its own: {shutdown:?}"
    );
    w.wait_protected(vm, &s, &p).await;
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    // The controller never edits the annotation (no drift for a GitOps tool), and the kept
    // annotation names a job that was retried already: nothing runs again.
    let r = w.get(vm).await;
    assert_eq!(
        r.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("twinsite.io/retry"))
            .map(String::as_str),
        Some(job.name.as_str())
    );
    let n = r
        .status
        .as_ref()
        .unwrap()
        .jobs
        .iter()
        .filter(|j| j.name == job.name)
        .count();
    assert_eq!(n, 1);
    let events = w.events(vm).await;
    assert!(
        events.iter().any(|(reason, _)| reason == "JobRetried"),
        "{events:?}"
    );
}

/// An unplanned failover whose source site hangs (its agent stopped with SIGSTOP: connections
/// are accepted, nothing answers). A site that does not answer may still run the VM: the
/// failover waits at FenceSource and says how to go on. Once the site is declared lost, the
/// failover skips the source steps (Skipped, naming the declaration) instead of calling it, and
/// the VM runs at the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplanned_failover_from_a_hung_source_skips_its_steps() {
    let _serial = one_at_a_time().await;
    let w = World::start("hung").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "app-02";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(
        vm,
        json!({"type": "Unplanned", "shutdownSource": true, "commit": "Automatic"}),
    )
    .await;
    w.wait_protected(vm, &p, &s).await;
    // Wait for a recovery point at the target, then hang the source.
    w.wait_for(vm, "a recovery point at the target", |r| {
        r.status
            .as_ref()
            .and_then(|s| s.recovery_points.as_ref())
            .is_some_and(|rp| rp.count > 0)
    })
    .await;
    let pid = w.primary.pid().unwrap() as i32;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    struct Cont(i32);
    impl Drop for Cont {
        fn drop(&mut self) {
            // SAFETY: as above.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let _cont = Cont(pid);
    wait_site(&w, &p, ("False", "Unreachable")).await;

    w.patch_spec(vm, json!({"activeSite": s})).await;
    let r = w
        .wait_for(vm, "the failover waits for the source", |r| {
            condition(r, "Ready").is_some_and(|c| c.reason == "SourceNotFenced")
        })
        .await;
    let ready = condition(&r, "Ready").unwrap();
    assert!(ready.message.contains("declare it lost"), "{ready:?}");
    assert_ne!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    declare_lost(&w, &p, true).await;
    let r = w
        .wait_for(vm, "the VM runs at the target", |r| {
            r.status.as_ref().is_some_and(|st| {
                st.active_site.as_deref() == Some(s.as_str())
                    && st.jobs.iter().any(|j| {
                        format!("{:?}", j.type_) == "UnplannedFailover"
                            && format!("{:?}", j.state) == "Succeeded"
                    })
            })
        })
        .await;
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    let st = steps(&r, "UnplannedFailover");
    for step in ["ShutdownSource", "FenceSource", "SyncRemaining"] {
        assert!(
            st.contains(&(step.to_string(), "Skipped".to_string())),
            "{step} not skipped: {st:?}"
        );
    }
    let fence = job_step(&r, "FenceSource");
    assert!(
        fence
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("declared lost"),
        "{fence:?}"
    );
    let job = r
        .status
        .as_ref()
        .unwrap()
        .jobs
        .iter()
        .rev()
        .find(|j| format!("{:?}", j.type_) == "UnplannedFailover")
        .unwrap()
        .clone();
    let shutdown = job
        .steps
        .iter()
        .find(|x| x.name == "ShutdownSource")
        .unwrap();
    // Not called: skipped because the site could not be listed (before the declaration).
    assert!(
        shutdown
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("cannot be listed"),
        "{shutdown:?}"
    );
}

fn job_step(r: &ReplicatedVM, n: &str) -> twinsite::api::JobStep {
    r.status
        .as_ref()
        .and_then(|st| {
            st.jobs
                .iter()
                .rev()
                .find(|j| format!("{:?}", j.type_) == "UnplannedFailover")
        })
        .and_then(|j| j.steps.iter().find(|s| s.name == n))
        .cloned()
        .unwrap()
}

/// The source dies in the middle of a planned failover, after it shut the VM down (its agent
/// is stopped while SyncRemaining waits for the replica, which holds the cycle's blocks
/// unanswered). SyncRemaining, then RestartSource, cannot reach it: each is retried until the
/// step deadline (`spec.failover.stepTimeoutSeconds`) and then fails, naming the step and the
/// site. The job fails and stalls with the ways on; the operator sets `spec.failover.type` to
/// Unplanned and the VM runs at the target from its newest recovery point (the write the source
/// never got to send is lost, as the documentation says).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_failover_whose_source_dies_fails_at_the_deadline_and_goes_on_unplanned() {
    let _serial = one_at_a_time().await;
    let mut w = World::start("deadline").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    w.secondary
        .restart_with_env(&[("TWINSITE_FAULT_HANG_BLOCKS", "1")])
        .await;
    let vm = "db-07";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(
        vm,
        json!({"type": "Planned", "commit": "Automatic", "stepTimeoutSeconds": 10}),
    )
    .await;
    w.wait_protected(vm, &p, &s).await;
    w.wait_for(vm, "a recovery point at the target", |r| {
        r.status
            .as_ref()
            .and_then(|s| s.recovery_points.as_ref())
            .is_some_and(|rp| rp.count > 0)
    })
    .await;
    // From here the replica stages every cycle's blocks and never answers.
    std::fs::write(w.secondary.dir.join("data").join("hang-blocks"), b"").unwrap();
    let lost = pattern("never-sent", 4096);
    w.primary.write(vm, 0, &lost).await;

    w.patch_spec(vm, json!({"activeSite": s})).await;
    w.wait_for(vm, "SyncRemaining runs", |r| {
        r.status.as_ref().is_some_and(|st| {
            st.jobs.last().is_some_and(|j| {
                j.steps
                    .iter()
                    .any(|x| x.name == "SyncRemaining" && format!("{:?}", x.state) == "Running")
            })
        })
    })
    .await;
    w.primary.stop();

    let r = w
        .wait_for(vm, "the planned failover failed and stalled", |r| {
            cond(r, "Stalled")
                && jobs(r).last().map(|(t, st)| (t.as_str(), st.as_str()))
                    == Some(("PlannedFailover", "Failed"))
        })
        .await;
    let st = r.status.clone().unwrap();
    let job = st.jobs.last().unwrap().clone();
    let step = |n: &str| job.steps.iter().find(|x| x.name == n).unwrap().clone();
    assert_eq!(format!("{:?}", step("ShutdownSource").state), "Succeeded");
    for n in ["SyncRemaining", "RestartSource"] {
        let x = step(n);
        assert_eq!(format!("{:?}", x.state), "Failed", "{x:?}");
        let m = x.message.unwrap_or_default();
        assert!(
            m.contains("deadline passed") && m.contains(&p) && m.contains("stepTimeoutSeconds"),
            "{n}: {m}"
        );
    }
    let jm = job.message.clone().unwrap_or_default();
    assert!(jm.starts_with("SyncRemaining failed"), "{jm}");
    let stalled = st.conditions.iter().find(|c| c.type_ == "Stalled").unwrap();
    assert!(
        stalled
            .message
            .contains("set spec.failover.type to Unplanned"),
        "{stalled:?}"
    );
    assert_eq!(cond_status(&r, "Reconciling").as_deref(), Some("False"));

    assert!(stalled.message.contains("declare it lost"), "{stalled:?}");

    // The way on: the source site is declared lost, and an unplanned failover starts from the
    // newest recovery point at the target.
    std::fs::remove_file(w.secondary.dir.join("data").join("hang-blocks")).unwrap();
    declare_lost(&w, &p, true).await;
    w.patch_spec(vm, json!({"failover": {"type": "Unplanned"}}))
        .await;
    let r = w
        .wait_for(vm, "the VM runs at the target", |r| {
            r.status.as_ref().is_some_and(|st| {
                st.active_site.as_deref() == Some(s.as_str())
                    && st.jobs.iter().any(|j| {
                        format!("{:?}", j.type_) == "UnplannedFailover"
                            && format!("{:?}", j.state) == "Succeeded"
                    })
            })
        })
        .await;
    assert!(!cond(&r, "Stalled"));
    assert_eq!(
        w.secondary.vm(vm).await.unwrap().power,
        twinsite::site::Power::Running
    );
    // Written after the newest recovery point and never sent: not at the target.
    assert_ne!(w.secondary.read(vm, 0, lost.len() as u64).await, lost);
}

/// The initial copy cannot finish: the replica's agent dies as it commits the copy (a
/// failpoint), so the source keeps reporting an error. The source's error reaches the
/// ReplicatedVM as condition ReplicationError with the agent's message; the InitialReplication
/// wait fails its job at `spec.replication.copyTimeoutSeconds` and the VM stalls. Once the
/// replica's agent runs again the source's next attempt succeeds and the condition clears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_copy_that_keeps_failing_fails_at_its_deadline_with_the_agents_error() {
    let _serial = one_at_a_time().await;
    let mut w = World::start("copyfail").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    w.secondary
        .restart_with_env(&[("TWINSITE_FAILPOINT", "replica.bulk-commit")])
        .await;
    let vm = "files-01";
    w.primary.create_vm(vm, true).await;
    let rvm: twinsite::api::ReplicatedVM = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
        "metadata": {"name": vm},
        "spec": {
            "primarySite": p, "recoverySite": s,
            "replication": {"enabled": true, "intervalSeconds": 30, "copyTimeoutSeconds": 15},
        },
    }))
    .unwrap();
    w.rvms()
        .create(&kube::api::PostParams::default(), &rvm)
        .await
        .unwrap();

    let r = w
        .wait_for(vm, "the initial copy failed its job", |r| {
            cond(r, "Stalled")
                && jobs(r).last().map(|(t, st)| (t.as_str(), st.as_str()))
                    == Some(("EnableReplication", "Failed"))
        })
        .await;
    let st = r.status.clone().unwrap();
    let job = st.jobs.last().unwrap().clone();
    let wait = job
        .steps
        .iter()
        .find(|x| x.name == "InitialReplication")
        .unwrap();
    assert_eq!(format!("{:?}", wait.state), "Failed", "{wait:?}");
    let m = wait.message.clone().unwrap_or_default();
    assert!(
        m.contains("copyTimeoutSeconds") && m.contains("replication error at"),
        "{m}"
    );
    // The source's agent reports the error itself; the condition carries its message.
    let agent = w.primary.vm(vm).await.unwrap().replication;
    assert_eq!(format!("{:?}", agent.state), "InitialReplication");
    let agent_error = agent.last_error.expect("the source reports its error");
    let c = st
        .conditions
        .iter()
        .find(|c| c.type_ == "ReplicationError")
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "AgentError")
    );
    assert!(c.message.contains(&p), "{c:?}");
    // The agent's message, up to details that change between attempts (ports, errno).
    let head: String = agent_error.chars().take(20).collect();
    assert!(c.message.contains(&head), "{c:?} vs {agent_error}");
    assert_eq!(format!("{:?}", st.phase), "Some(Failed)");

    // The replica's agent runs again: the source's next attempt goes through and the
    // condition follows the agent.
    w.secondary.restart_with_env(&[]).await;
    w.wait_for(vm, "ReplicationError False", |r| {
        cond_status(r, "ReplicationError").as_deref() == Some("False")
    })
    .await;
}

/// A changed `spec.replication` is sent to the running replication, without a job and without
/// a new copy: the source lists the new settings, the replica keeps its recovery points,
/// SettingsApplied turns True and nothing stalls. A later cycle runs at the interval set after
/// that and carries the retention to the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_interval_and_retention_are_applied_to_the_running_replication() {
    let _serial = one_at_a_time().await;
    let w = World::start("settings").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "web-09";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(vm, json!({"type": "Planned"})).await;
    let r = w.wait_protected(vm, &p, &s).await;
    assert_eq!(cond_status(&r, "SettingsApplied").as_deref(), Some("True"));
    let jobs_before = jobs(&r);
    let point_ids = || async {
        w.secondary
            .client
            .recovery_points(vm)
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect::<Vec<_>>()
    };
    let before = point_ids().await;
    assert!(!before.is_empty());
    let settings_are = |r: &ReplicatedVM, want: (i64, i64, i64)| {
        r.status
            .as_ref()
            .and_then(|st| st.replication.as_ref()?.settings.as_ref())
            .is_some_and(|x| {
                (
                    x.interval_seconds,
                    x.recovery_point_retention_hours,
                    x.app_consistent_frequency_hours,
                ) == want
            })
            && r.status.as_ref().and_then(|st| st.observed_generation) == r.metadata.generation
            && cond_status(r, "SettingsApplied").as_deref() == Some("True")
            && ready(r)
    };

    w.patch_spec(
        vm,
        json!({"replication": {"intervalSeconds": 300, "recoveryPointRetentionHours": 2}}),
    )
    .await;
    let r = w
        .wait_for(vm, "settings 300 s / 2 h applied", |r| {
            settings_are(r, (300, 2, 0))
        })
        .await;
    assert!(!cond(&r, "Stalled"));
    assert_eq!(cond_status(&r, "Reconciling").as_deref(), Some("False"));
    // No job, no new copy: the replication goes on where it was.
    assert_eq!(jobs(&r), jobs_before);
    let agent = w.primary.vm(vm).await.unwrap().replication;
    assert_eq!(
        (
            agent.interval_seconds,
            agent.recovery_point_retention_hours,
            agent.app_consistent_frequency_hours
        ),
        (300, Some(2), Some(0))
    );
    assert_eq!(agent.state, twinsite::site::ReplicationState::Replicating);
    let now = point_ids().await;
    assert!(before.iter().all(|p| now.contains(p)), "{before:?} {now:?}");
    assert!(
        w.events(vm)
            .await
            .iter()
            .any(|(reason, note)| reason == "SettingsChanged"
                && note.contains("intervalSeconds 300")),
        "{:?}",
        w.events(vm).await
    );

    // Back to 30 s: the source's cycle loop takes it (its next cycle was 300 s away), and that
    // cycle carries the retention of 2 h to the replica.
    w.patch_spec(vm, json!({"replication": {"intervalSeconds": 30}}))
        .await;
    w.wait_for(vm, "settings 30 s / 2 h applied", |r| {
        settings_are(r, (30, 2, 0))
    })
    .await;
    assert_eq!(
        w.primary.vm(vm).await.unwrap().replication.interval_seconds,
        30
    );
    let latest = point_ids().await;
    w.primary.write(vm, 0, b"after the settings change").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        let replica = w.secondary.vm(vm).await.unwrap().replication;
        let now = point_ids().await;
        if replica.recovery_point_retention_hours == Some(2)
            && now.iter().any(|p| !latest.contains(p))
        {
            assert!(before.iter().all(|p| now.contains(p)), "{before:?} {now:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cycle at the new interval: {replica:?} {now:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let r = w.wait_protected(vm, &p, &s).await;
    assert!(!cond(&r, "Stalled"));
    assert_eq!(jobs(&r), jobs_before);
}

/// Polls until ReplicatedVM `vm` is gone; returns every Ready message seen meanwhile.
async fn wait_deleted(w: &World, vm: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + LONG;
    let mut seen = Vec::new();
    while let Some(r) = w.rvms().get_opt(vm).await.unwrap() {
        let msg = r
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.message.clone())
            .unwrap_or_default();
        if seen.last() != Some(&msg) {
            seen.push(msg);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{vm} was never deleted: {:?}\n{}",
            r.status,
            w.controller.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    seen
}

/// Deleting a ReplicatedVM is no way to cancel a failover: while a planned failover's graceful
/// shutdown hangs, the deletion waits for the job to end (Ready says so), and only then stops
/// replication and removes the replica; the VM keeps running where it ran. A replica that is the
/// only copy of a VM that runs nowhere (the VM was deleted at its active site) is kept, the
/// deletion waits with Stalled True, until `twinsite.io/delete-last-copy: "true"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_waits_for_the_running_job_and_keeps_the_last_copy() {
    let _serial = one_at_a_time().await;
    let args = ["--shutdown-timeout-seconds".to_string(), "6".to_string()];
    let mut w = World::start_full("delete", &[], false, [&args, &[]]).await;
    w.primary
        .restart_with_env(&[("TWINSITE_FAULT_GUEST_IGNORES_SHUTDOWN", "mid")])
        .await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    for vm in ["mid", "last"] {
        w.primary.create_vm(vm, true).await;
        w.create_rvm(vm, json!({"type": "Planned"})).await;
    }
    for vm in ["mid", "last"] {
        w.wait_protected(vm, &p, &s).await;
    }

    // A planned failover whose shutdown hangs; the ReplicatedVM is deleted meanwhile.
    w.patch_spec("mid", json!({"activeSite": s})).await;
    let r = w
        .wait_for("mid", "ShutdownSource running", |r| {
            steps(r, "PlannedFailover").contains(&("ShutdownSource".into(), "Running".into()))
        })
        .await;
    let job = r.status.unwrap().jobs.last().unwrap().name.clone();
    w.rvms().delete("mid", &Default::default()).await.unwrap();
    let seen = wait_deleted(&w, "mid").await;
    assert!(
        seen.iter()
            .any(|m| m.starts_with(&format!("deletion waits for job {job} to end"))),
        "the deletion never waited for {job}: {seen:?}"
    );
    // The job ended (its Event), the VM runs at the source, and the replica is gone.
    let events = w.events("mid").await;
    assert!(
        events
            .iter()
            .any(|(reason, note)| reason == "JobFailed" && note.contains(&job)),
        "{events:?}"
    );
    let vm = w.primary.vm("mid").await.expect("the VM at the source");
    assert_eq!(vm.power, twinsite::site::Power::Running);
    assert!(w.secondary.vm("mid").await.is_none(), "replica left behind");

    // The VM is gone at its active site: its replica is the only copy and is kept.
    w.primary
        .client
        .power("last", PowerAction::PowerOff, "test-last-off")
        .await
        .unwrap();
    w.primary
        .client
        .delete_vm("last", "test-last-delete")
        .await
        .unwrap();
    w.rvms().delete("last", &Default::default()).await.unwrap();
    let r = w
        .wait_for("last", "the deletion keeps the last copy", |r| {
            cond(r, "Stalled")
                && r.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Stalled" && c.reason == "LastCopy")
                })
        })
        .await;
    assert!(r.metadata.deletion_timestamp.is_some());
    assert!(
        w.secondary.vm("last").await.is_some(),
        "the last copy was deleted"
    );
    annotate(&w, "rvm", "last", "twinsite.io/delete-last-copy", "true");
    wait_deleted(&w, "last").await;
    assert!(w.secondary.vm("last").await.is_none());
}

/// An unplanned failover whose FenceSource fails while the source answers (its power off is
/// refused with an error, the VM without integration services could not be shut down either):
/// the VM is known to run at the source, so it is never started at the target. The fence is
/// retried, backing off, until the step's deadline; then the job fails with the VM running at
/// the source, Stalled. Once the source can power it off, the retry annotation moves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_the_source_refuses_never_starts_the_vm_at_the_target() {
    let _serial = one_at_a_time().await;
    let w = World::start("fencefail").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    // The controller reaches the primary site through a proxy that can refuse power offs.
    let proxy = FaultProxy::start(&w.primary.url).await;
    let sites: Api<Site> = Api::all(w.client.clone());
    sites
        .patch(
            &p,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"agent": {"url": proxy.url}}})),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let site = sites.get(&p).await.unwrap();
        let through_proxy = site.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True" && c.message.contains(&proxy.url))
        });
        if through_proxy {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "site never used the proxy"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    w.primary.create_vm("web-01", false).await;
    w.create_rvm(
        "web-01",
        json!({"type": "Unplanned", "shutdownSource": true, "stepTimeoutSeconds": 10}),
    )
    .await;
    w.wait_protected("web-01", &p, &s).await;

    proxy
        .fail_power_off
        .store(true, std::sync::atomic::Ordering::SeqCst);
    w.patch_spec("web-01", json!({"activeSite": s})).await;
    let r = w
        .wait_for("web-01", "the unplanned failover ended", |r| {
            r.status.as_ref().is_some_and(|st| {
                st.jobs
                    .iter()
                    .rev()
                    .find(|j| format!("{:?}", j.type_) == "UnplannedFailover")
                    .is_some_and(|j| format!("{:?}", j.state) != "Running")
            })
        })
        .await;
    let st = r.status.clone().unwrap();
    let job = st
        .jobs
        .iter()
        .rev()
        .find(|j| format!("{:?}", j.type_) == "UnplannedFailover")
        .unwrap()
        .clone();
    assert_eq!(format!("{:?}", job.state), "Failed", "{job:?}");
    let step = |n: &str| job.steps.iter().find(|x| x.name == n).unwrap().clone();
    assert_eq!(format!("{:?}", step("FenceSource").state), "Failed");
    assert!(
        step("FenceSource")
            .message
            .unwrap_or_default()
            .contains("injected fault"),
        "{job:?}"
    );
    assert_eq!(format!("{:?}", step("StartAtTarget").state), "Skipped");
    assert_eq!(st.active_site.as_deref(), Some(p.as_str()));
    assert!(cond(&r, "Stalled"));
    assert!(
        proxy
            .power_offs_refused
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 1
    );
    // The VM never ran at the target: it runs at the source only.
    assert_eq!(
        w.primary.vm("web-01").await.map(|v| v.power),
        Some(twinsite::site::Power::Running)
    );
    assert_ne!(
        w.secondary.vm("web-01").await.map(|v| v.power),
        Some(twinsite::site::Power::Running),
        "the VM was started at the target while it ran at the source"
    );

    // The source can power it off again: the retry moves the VM.
    proxy
        .fail_power_off
        .store(false, std::sync::atomic::Ordering::SeqCst);
    annotate(&w, "rvm", "web-01", "twinsite.io/retry", &job.name);
    w.wait_for("web-01", "the VM at the target after the retry", |r| {
        r.status
            .as_ref()
            .is_some_and(|st| st.active_site.as_deref() == Some(s.as_str()))
    })
    .await;
    assert_ne!(
        w.primary.vm("web-01").await.map(|v| v.power),
        Some(twinsite::site::Power::Running)
    );
}
