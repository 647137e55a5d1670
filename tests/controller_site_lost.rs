//! A site that does not answer is never taken as off, and a site declared lost is failed over
//! and failed back without: the API server, two agent processes and the controller process.
//!
//! - The primary's token Secret is changed to a token its agent does not know (a rotation the
//!   agent has not learned): an unplanned failover does not start the VM at the secondary while
//!   it runs at the primary; status says it waits and how to go on. Declared lost, the primary
//!   is failed over without; with the token back and the declaration removed, its copy is
//!   powered off before reverse replication starts.
//! - After a failover and reverse replication, the recovery site dies and the VM is sent back:
//!   the failback waits and says why (Stalled); declared lost, the recovery site is left out and
//!   the VM runs at the primary from its newest recovery point.

#[path = "controller_common/mod.rs"]
mod common;

use common::*;
use serde_json::json;
use twinsite::api::ReplicatedVM;
use twinsite::site::Power;

async fn runs(a: &Agent, vm: &str) -> bool {
    a.vm(vm).await.is_some_and(|v| v.power == Power::Running)
}

/// Polls the object until `f` holds, checking at every poll that the VM never runs at both
/// sites at once.
async fn wait_never_twice(
    w: &World,
    vm: &str,
    what: &str,
    f: impl Fn(&ReplicatedVM) -> bool,
) -> ReplicatedVM {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let both = runs(&w.primary, vm).await && runs(&w.secondary, vm).await;
        assert!(
            !both,
            "VM {vm} runs at both sites while waiting for {what}: {:?}",
            w.get(vm).await.status
        );
        let r = w.get(vm).await;
        if f(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {}\n{}",
            serde_json::to_string_pretty(&r.status).unwrap(),
            w.controller.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

/// Polls the controller's /metrics until `twinsite_split_brain_vms` is `n`.
async fn wait_split_brain_gauge(w: &World, n: u32) {
    let want = format!("twinsite_split_brain_vms {n}\n");
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let text = match reqwest::get(w.controller.metrics_url()).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains(&want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{want:?} never shown: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

fn newest_job(r: &ReplicatedVM, t: &str) -> Option<twinsite::api::Job> {
    r.status
        .as_ref()?
        .jobs
        .iter()
        .rev()
        .find(|j| format!("{:?}", j.type_) == t)
        .cloned()
}

fn step_of(j: &twinsite::api::Job, n: &str) -> twinsite::api::JobStep {
    j.steps.iter().find(|s| s.name == n).cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_never_starts_the_vm_twice_and_a_declared_loss_fails_over() {
    let _serial = one_at_a_time().await;
    let w = World::start("tokenrot").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "app-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(
        vm,
        json!({"type": "Unplanned", "shutdownSource": true, "commit": "Automatic",
               "stepTimeoutSeconds": 10}),
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

    // The token is rotated in the Secret, but the primary's agent still has the old one.
    set_site_token(&w, &p, "rotated-but-not-at-the-agent").await;
    wait_site_ready(&w, &p, "False", "Unauthorized").await;
    w.patch_spec(vm, json!({"activeSite": s})).await;

    // The failover waits for the primary to confirm the VM off, and says how to go on; past
    // the step deadline it is Stalled.
    let r = wait_never_twice(&w, vm, "the failover stalled at FenceSource", |r| {
        condition(r, "Stalled").is_some_and(|c| c.status == "True" && c.reason == "SourceNotFenced")
    })
    .await;
    let ready = condition(&r, "Ready").unwrap();
    assert_eq!(ready.reason, "SourceNotFenced", "{ready:?}");
    assert!(
        ready.message.contains("declare it lost") && ready.message.contains(&p),
        "{ready:?}"
    );
    let job = newest_job(&r, "UnplannedFailover").unwrap();
    assert_eq!(format!("{:?}", job.state), "Running");
    assert_eq!(
        format!("{:?}", step_of(&job, "StartAtTarget").state),
        "Pending"
    );
    assert!(runs(&w.primary, vm).await);
    assert!(!runs(&w.secondary, vm).await);

    // Declared lost: the failover goes on without the primary, fencing done by declaration.
    declare_lost(&w, &p, true).await;
    let site = wait_site_ready(&w, &p, "False", "DeclaredLost").await;
    // Who declared it and since when (read as JSON: the declaration as a user sees it).
    let fence = serde_json::to_value(&site).unwrap()["status"]["fence"].clone();
    assert!(
        fence["state"] == "Lost" && fence["since"].is_string() && fence["declaredBy"].is_string(),
        "{fence}"
    );
    let r = w
        .wait_for(vm, "the failover without the lost primary", |r| {
            newest_job(r, "UnplannedFailover")
                .is_some_and(|j| format!("{:?}", j.state) == "Succeeded")
        })
        .await;
    let job = newest_job(&r, "UnplannedFailover").unwrap();
    let fs = step_of(&job, "FenceSource");
    assert_eq!(format!("{:?}", fs.state), "Skipped", "{fs:?}");
    assert!(
        fs.message
            .as_deref()
            .unwrap_or("")
            .contains("declared lost"),
        "{fs:?}"
    );
    assert!(runs(&w.secondary, vm).await);
    // Nothing is replicated toward a lost site.
    let r = w
        .wait_for(vm, "waiting for the lost site", |r| {
            condition(r, "Ready").is_some_and(|c| c.reason == "SiteLost")
        })
        .await;
    assert!(newest_job(&r, "ReverseReplicate").is_none());

    // The site is back with its token, and the declaration is removed: its copy is powered
    // off before reverse replication starts.
    set_site_token(&w, &p, &w.primary.token.clone()).await;
    declare_lost(&w, &p, false).await;
    let r = w.wait_protected(vm, &s, &p).await;
    assert!(!runs(&w.primary, vm).await);
    assert!(runs(&w.secondary, vm).await);
    let job = newest_job(&r, "UnplannedFailover").unwrap();
    let fs = step_of(&job, "FenceSource");
    assert_eq!(format!("{:?}", fs.state), "Succeeded", "{fs:?}");
    let rr = newest_job(&r, "ReverseReplicate").unwrap();
    assert!(
        fs.end_time.as_ref().unwrap().0 <= rr.start_time.as_ref().unwrap().0,
        "fenced {:?}, reverse replication started {:?}",
        fs.end_time,
        rr.start_time
    );
    let events = w.events(vm).await;
    assert!(events.iter().any(|e| e.0 == "Fenced"), "{events:?}");
    let site = wait_site_ready(&w, &p, "True", "Connected").await;
    let fence = serde_json::to_value(&site).unwrap()["status"]["fence"].clone();
    assert!(fence.is_null(), "{fence}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_while_the_recovery_site_is_down_waits_and_goes_on_once_declared_lost() {
    let _serial = one_at_a_time().await;
    let mut w = World::start("failbacklost").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "db-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(
        vm,
        json!({"type": "Unplanned", "shutdownSource": true, "commit": "Automatic",
               "stepTimeoutSeconds": 10}),
    )
    .await;
    w.wait_protected(vm, &p, &s).await;
    w.patch_spec(vm, json!({"activeSite": s})).await;
    w.wait_protected(vm, &s, &p).await;
    w.wait_for(vm, "a recovery point back at the primary", |r| {
        r.status
            .as_ref()
            .and_then(|s| s.recovery_points.as_ref())
            .is_some_and(|rp| rp.count > 0)
    })
    .await;

    // The recovery site dies; the VM is sent back to the primary.
    w.secondary.stop();
    wait_site_ready(&w, &s, "False", "Unreachable").await;
    w.patch_spec(vm, json!({"activeSite": p})).await;
    let r = w
        .wait_for(vm, "the failback stalled on the dead recovery site", |r| {
            condition(r, "Stalled")
                .is_some_and(|c| c.status == "True" && c.reason == "SiteUnreachable")
        })
        .await;
    let stalled = condition(&r, "Stalled").unwrap();
    assert_eq!(stalled.reason, "SiteUnreachable", "{stalled:?}");
    assert!(
        stalled.message.contains(&s) && stalled.message.contains("declare it lost"),
        "{stalled:?}"
    );
    assert_eq!(
        r.status.as_ref().unwrap().active_site.as_deref(),
        Some(s.as_str())
    );

    // Declared lost: an unplanned failover to the primary from its newest recovery point.
    declare_lost(&w, &s, true).await;
    let r = w
        .wait_for(vm, "the failback without the lost site", |r| {
            r.status
                .as_ref()
                .is_some_and(|st| st.active_site.as_deref() == Some(p.as_str()))
                && newest_job(r, "UnplannedFailover").is_some_and(|j| {
                    format!("{:?}", j.state) == "Succeeded"
                        && j.target_site.as_deref() == Some(p.as_str())
                })
        })
        .await;
    let job = newest_job(&r, "UnplannedFailover").unwrap();
    for n in ["ShutdownSource", "FenceSource", "SyncRemaining"] {
        let x = step_of(&job, n);
        assert_eq!(format!("{:?}", x.state), "Skipped", "{x:?}");
        assert!(
            x.message.as_deref().unwrap_or("").contains("declared lost"),
            "{x:?}"
        );
    }
    assert!(runs(&w.primary, vm).await);

    // The recovery site returns and the declaration is removed: its copy is powered off, then
    // protected again from the primary.
    w.secondary.restart().await;
    declare_lost(&w, &s, false).await;
    w.wait_protected(vm, &p, &s).await;
    assert!(!runs(&w.secondary, vm).await);
    assert!(runs(&w.primary, vm).await);
}

/// The VM is started at the recovery site by hand while it runs at the primary, then the
/// management cluster is rebuilt from Git without status, with spec.activeSite naming the
/// recovery site. The controller follows the spec, reports the split brain (condition and
/// Event) and powers off neither copy, since the primary's may hold writes the other lacks;
/// once the operator powers that copy off, the VM is protected again from the one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_running_at_both_sites_with_status_wiped_is_reported_and_neither_copy_is_fenced() {
    use kube::api::{Patch, PatchParams};
    use twinsite::site::{PowerAction, RecoveryPointSelector, SiteProvider};
    let _serial = one_at_a_time().await;
    let mut w = World::start("splitbrain").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "web-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(vm, json!({"type": "Unplanned", "commit": "Automatic"}))
        .await;
    w.wait_protected(vm, &p, &s).await;
    w.wait_for(vm, "a recovery point at the target", |r| {
        r.status
            .as_ref()
            .and_then(|s| s.recovery_points.as_ref())
            .is_some_and(|rp| rp.count > 0)
    })
    .await;

    // Started at the recovery site by hand, while it runs at the primary, which goes on
    // writing.
    w.secondary
        .client
        .stop_replication(vm, "by-hand-stop")
        .await
        .unwrap();
    w.secondary
        .client
        .failover(vm, &RecoveryPointSelector::Latest, "by-hand")
        .await
        .unwrap();
    w.primary
        .write(vm, 0, &pattern("after-the-split", 4096))
        .await;
    assert!(runs(&w.primary, vm).await && runs(&w.secondary, vm).await);

    // Rebuilt from Git: spec.activeSite names the recovery site, status is gone.
    w.controller.kill();
    w.patch_spec(vm, json!({"activeSite": s})).await;
    w.rvms()
        .patch_status(
            vm,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": null})),
        )
        .await
        .unwrap();
    assert!(w.get(vm).await.status.is_none());
    w.controller.restart();

    let r = w
        .wait_for(vm, "the split brain reported", |r| cond(r, "SplitBrain"))
        .await;
    let st = r.status.as_ref().unwrap();
    assert_eq!(st.active_site.as_deref(), Some(s.as_str()));
    let split = condition(&r, "SplitBrain").unwrap();
    assert!(
        split.message.contains(&p) && split.message.contains("power it off"),
        "{split:?}"
    );
    assert!(cond(&r, "Stalled"));
    // Neither copy was powered off, and nothing started.
    assert!(runs(&w.primary, vm).await && runs(&w.secondary, vm).await);
    assert!(st.jobs.is_empty(), "{:?}", jobs(&r));
    let events = w.events(vm).await;
    assert!(events.iter().any(|e| e.0 == "SplitBrain"), "{events:?}");
    // The gauge the TwinsiteSplitBrain alert reads counts it.
    wait_split_brain_gauge(&w, 1).await;

    // The operator keeps the recovery site's copy: the primary's is powered off by hand, and
    // the VM is protected again from the recovery site.
    w.primary
        .client
        .power(vm, PowerAction::PowerOff, "by-hand-off")
        .await
        .unwrap();
    let r = w.wait_protected(vm, &s, &p).await;
    assert_eq!(condition(&r, "SplitBrain").unwrap().status, "False");
    wait_split_brain_gauge(&w, 0).await;
    assert!(runs(&w.secondary, vm).await);
}

/// A planned failover whose StartAtTarget answer is lost (the proxy in front of the target
/// forwards the failover, the agent does it, and the proxy answers 502): the target is asked
/// again with the same operation id, its record answers, and the source is not started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_start_answer_is_asked_again_and_the_source_is_not_restarted() {
    let _serial = one_at_a_time().await;
    let w = World::start("lostanswer").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let proxy = FaultProxy::start(&w.secondary.url).await;
    let sites: kube::api::Api<twinsite::api::Site> = kube::api::Api::all(w.client.clone());
    sites
        .patch(
            &s,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"agent": {"url": proxy.url}}})),
        )
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let site = sites.get(&s).await.unwrap();
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
    let vm = "web-02";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(vm, json!({"type": "Planned", "commit": "Automatic"}))
        .await;
    w.wait_protected(vm, &p, &s).await;

    proxy
        .lose_failover_answer
        .store(true, std::sync::atomic::Ordering::SeqCst);
    w.patch_spec(vm, json!({"activeSite": s})).await;
    let r = wait_never_twice(&w, vm, "the planned failover ended", |r| {
        newest_job(r, "PlannedFailover").is_some_and(|j| format!("{:?}", j.state) != "Running")
    })
    .await;
    let job = newest_job(&r, "PlannedFailover").unwrap();
    assert_eq!(format!("{:?}", job.state), "Succeeded", "{job:?}");
    assert!(
        !job.steps.iter().any(|x| x.name == "RestartSource"),
        "{job:?}"
    );
    assert!(
        !proxy
            .lose_failover_answer
            .load(std::sync::atomic::Ordering::SeqCst),
        "the fault was not hit"
    );
    assert!(runs(&w.secondary, vm).await);
    assert!(!runs(&w.primary, vm).await);
}

/// A wave of planned failovers while the recovery site's agent hangs on one VM's digest
/// (it accepts the connection and never answers): that VM's failover fails by its step
/// deadline with a message naming the site, is not taken for a digest mismatch (no resync
/// toward the hung site), and the VM runs again at its source; the other VM's failover
/// succeeds meanwhile. Neither VM ever runs at both sites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_agent_fails_the_step_by_its_deadline_and_pins_nothing() {
    let _serial = one_at_a_time().await;
    let w = World::start("hung").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let (hung, free) = ("hung-01", "free-01");
    let digest_of_hung = format!("/v1/vms/{hung}/disks/");
    let agent = HangingAgent::start(&w.secondary.url, &[&digest_of_hung, "/digest"]).await;
    move_site(&w, &s, &agent.url).await;
    for vm in [hung, free] {
        w.primary.create_vm(vm, true).await;
        w.create_rvm(
            vm,
            json!({"type": "Planned", "commit": "Automatic", "stepTimeoutSeconds": 15}),
        )
        .await;
    }
    for vm in [hung, free] {
        w.wait_protected(vm, &p, &s).await;
    }
    for vm in [hung, free] {
        w.patch_spec(vm, json!({"activeSite": s})).await;
    }
    let r = wait_never_twice(&w, hung, "the failover of the hung VM ended", |r| {
        newest_job(r, "PlannedFailover").is_some_and(|j| format!("{:?}", j.state) != "Running")
    })
    .await;
    assert!(
        agent.held.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the fault was not hit"
    );
    let job = newest_job(&r, "PlannedFailover").unwrap();
    assert_eq!(format!("{:?}", job.state), "Failed", "{job:?}");
    let vd = step_of(&job, "VerifyDigests");
    let msg = vd.message.clone().unwrap_or_default();
    assert!(
        msg.contains(&s) && msg.contains("deadline") && !msg.contains("differs"),
        "{vd:?}"
    );
    let stalled = condition(&r, "Stalled").unwrap();
    assert_eq!(stalled.status, "True", "{stalled:?}");
    assert!(stalled.message.contains(&s), "{stalled:?}");
    // The other VM's failover went on while this one's call hung.
    let f = wait_never_twice(&w, free, "the other failover succeeded", |r| {
        newest_job(r, "PlannedFailover").is_some_and(|j| format!("{:?}", j.state) == "Succeeded")
    })
    .await;
    assert!(runs(&w.secondary, free).await, "{:?}", jobs(&f));
    // Not a digest mismatch: nothing is resynchronized toward the hung site, and the VM runs
    // at its source again.
    let r = wait_never_twice(&w, hung, "the VM back at its source", |r| {
        newest_job(r, "PlannedFailover")
            .is_some_and(|j| j.steps.iter().any(|x| x.name == "RestartSource"))
    })
    .await;
    assert!(
        newest_job(&r, "ReverseReplicate").is_none(),
        "{:?}",
        jobs(&r)
    );
    assert!(runs(&w.primary, hung).await);
    assert!(!runs(&w.secondary, hung).await);
}

/// A job runs with the spec it started with: an unplanned failover whose source shutdown is
/// slow (the guest ignores it) has its spec changed meanwhile (another recovery point, no
/// source shutdown); it still syncs the remaining writes and starts the VM from the point it
/// started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_changed_mid_job_does_not_change_the_running_job() {
    let _serial = one_at_a_time().await;
    let vm = "frozen-01";
    let args = ["--shutdown-timeout-seconds".to_string(), "8".to_string()];
    let mut w = World::start_full("frozen", &[], false, [&args, &[]]).await;
    w.primary
        .restart_with_env(&[("TWINSITE_FAULT_GUEST_IGNORES_SHUTDOWN", vm)])
        .await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    w.primary.create_vm(vm, true).await;
    w.create_rvm(
        vm,
        json!({"type": "Unplanned", "shutdownSource": true, "recoveryPoint": "Latest",
               "commit": "Automatic"}),
    )
    .await;
    w.wait_protected(vm, &p, &s).await;
    w.patch_spec(vm, json!({"activeSite": s})).await;
    w.wait_for(vm, "ShutdownSource running", |r| {
        steps(r, "UnplannedFailover").contains(&("ShutdownSource".into(), "Running".into()))
    })
    .await;
    // Changed while the job runs: a point that does not exist, and no shutdown or sync.
    w.patch_spec(
        vm,
        json!({"failover": {"type": "Unplanned", "shutdownSource": false,
                             "recoveryPoint": "rp-missing", "commit": "Automatic"}}),
    )
    .await;
    let r = wait_never_twice(&w, vm, "the failover ended", |r| {
        newest_job(r, "UnplannedFailover").is_some_and(|j| format!("{:?}", j.state) != "Running")
    })
    .await;
    let job = newest_job(&r, "UnplannedFailover").unwrap();
    assert_eq!(format!("{:?}", job.state), "Succeeded", "{job:#?}");
    let sync = step_of(&job, "SyncRemaining");
    assert_eq!(format!("{:?}", sync.state), "Succeeded", "{sync:?}");
    let params = serde_json::to_value(&job).unwrap()["parameters"].clone();
    assert!(
        params["recoveryPoint"] == "Latest" && params["shutdownSource"] == true,
        "{params}"
    );
    assert!(runs(&w.secondary, vm).await);
    assert!(!runs(&w.primary, vm).await);
}

/// A deleted Site leaves the controller's site registry: a failover toward it waits for the
/// site (its agent, still up, is not called on the strength of a Site that is gone), and a Site
/// created again under that name is used afresh: the failover then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_site_leaves_the_registry() {
    use kube::api::{Api, DeleteParams, PostParams};
    use twinsite::api::Site;
    let _serial = one_at_a_time().await;
    let w = World::start("sitegone").await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    let vm = "gone-01";
    w.primary.create_vm(vm, true).await;
    w.create_rvm(vm, json!({"type": "Unplanned", "commit": "Automatic"}))
        .await;
    w.wait_protected(vm, &p, &s).await;

    let sites: Api<Site> = Api::all(w.client.clone());
    let before = sites.get(&s).await.unwrap();
    sites.delete(&s, &DeleteParams::default()).await.unwrap();
    // Forgotten within a site poll; the controller says so.
    let deadline = std::time::Instant::now() + LONG;
    while !w.controller.log().contains(&format!(
        "Site deleted: its agent is no longer called site={s}"
    )) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            w.controller.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    w.patch_spec(vm, json!({"activeSite": s})).await;
    let r = w
        .wait_for(vm, "the failover waiting for the deleted site", |r| {
            condition(r, "Ready").is_some_and(|c| c.reason == "SiteUnreachable")
        })
        .await;
    let ready = condition(&r, "Ready").unwrap();
    assert!(ready.message.contains(&s), "{ready:?}");
    assert!(
        newest_job(&r, "UnplannedFailover").is_none(),
        "{:?}",
        jobs(&r)
    );
    assert!(runs(&w.primary, vm).await);
    assert!(!runs(&w.secondary, vm).await);

    // Created again: the failover runs.
    let mut again: Site = serde_json::from_value(json!({
        "apiVersion": "twinsite.io/v1alpha1", "kind": "Site",
        "metadata": {"name": s},
        "spec": {"agent": {"url": "http://127.0.0.1:1",
                           "tokenSecretRef": {"namespace": "x", "name": "x", "key": "x"}}},
    }))
    .unwrap();
    again.spec = before.spec.clone();
    sites.create(&PostParams::default(), &again).await.unwrap();
    wait_never_twice(&w, vm, "the failover after the Site is back", |r| {
        newest_job(r, "UnplannedFailover").is_some_and(|j| format!("{:?}", j.state) == "Succeeded")
    })
    .await;
    assert!(runs(&w.secondary, vm).await);
}

/// A site's agent killed in the middle of a failover and never started again: the recovery
/// site's agent dies while the source is being shut down. The failover does not hang: the step
/// that needs the dead site (StopReplication) fails at its deadline naming it, the job fails,
/// the source is started again (RestartSource) and the VM stalls saying so (Ready False,
/// Stalled True, reason JobFailed, with the step's message); it never runs at both sites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_failover_stalls_the_job_naming_the_site() {
    let _serial = one_at_a_time().await;
    let vm = "killed-01";
    let args = ["--shutdown-timeout-seconds".to_string(), "8".to_string()];
    let mut w = World::start_full("killed", &[], false, [&args, &[]]).await;
    w.primary
        .restart_with_env(&[("TWINSITE_FAULT_GUEST_IGNORES_SHUTDOWN", vm)])
        .await;
    let (p, s) = (w.primary.site.clone(), w.secondary.site.clone());
    w.primary.create_vm(vm, true).await;
    w.create_rvm(
        vm,
        json!({"type": "Unplanned", "shutdownSource": true, "commit": "Automatic",
               "stepTimeoutSeconds": 15}),
    )
    .await;
    w.wait_protected(vm, &p, &s).await;
    w.patch_spec(vm, json!({"activeSite": s})).await;
    w.wait_for(vm, "ShutdownSource running", |r| {
        steps(r, "UnplannedFailover").contains(&("ShutdownSource".into(), "Running".into()))
    })
    .await;
    // SIGKILL, as a crash or a power cut: no answer, no cleanup, never started again.
    let pid = w.secondary.pid().unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let r = wait_never_twice(&w, vm, "the failover ended", |r| {
        newest_job(r, "UnplannedFailover").is_some_and(|j| format!("{:?}", j.state) != "Running")
    })
    .await;
    let job = newest_job(&r, "UnplannedFailover").unwrap();
    assert_eq!(format!("{:?}", job.state), "Failed", "{job:#?}");
    // The step that failed the job (the optional source steps before it may have failed too:
    // the source's sync could not reach the dead site either).
    let failed = job
        .steps
        .iter()
        .rev()
        .find(|x| format!("{:?}", x.state) == "Failed")
        .cloned()
        .unwrap_or_else(|| panic!("no failed step: {job:#?}"));
    let msg = failed.message.clone().unwrap_or_default();
    assert!(msg.contains(&s) && msg.contains("deadline"), "{failed:?}");
    let stalled = condition(&r, "Stalled").unwrap();
    assert_eq!(stalled.status, "True", "{stalled:?}");
    assert!(stalled.message.contains(&failed.name), "{stalled:?}");
    let ready = condition(&r, "Ready").unwrap();
    assert_eq!(ready.status, "False", "{ready:?}");
    // The source it had fenced runs the VM again; the dead site never started it.
    let restart = step_of(&job, "RestartSource");
    assert_eq!(format!("{:?}", restart.state), "Succeeded", "{restart:?}");
    assert_eq!(
        r.status.as_ref().unwrap().active_site.as_deref(),
        Some(p.as_str())
    );
    assert!(runs(&w.primary, vm).await);
    assert!(!runs(&w.secondary, vm).await);
}

/// A Site speaks kstatus: while its agent answers it is neither Reconciling nor Stalled; once
/// it stops answering it is Reconciling (the controller keeps trying), and past
/// `--site-stall-seconds` Stalled with the reason and message of Ready (so Flux reports it
/// failed instead of Current); back, it is neither again. observedGeneration follows the spec.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_site_is_reconciling_then_stalled() {
    use kube::api::Api;
    use twinsite::api::Site;
    let _serial = one_at_a_time().await;
    let mut w = World::start_with("sitestall", &["--site-stall-seconds", "20"]).await;
    let s = w.secondary.site.clone();
    let sites: Api<Site> = Api::all(w.client.clone());
    let cond_of = |site: &Site, t: &str| {
        site.status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == t).cloned())
    };
    let wait_site = |what: &'static str, f: Box<dyn Fn(&Site) -> bool + Send>| {
        let sites = sites.clone();
        let s = s.clone();
        async move {
            let deadline = std::time::Instant::now() + LONG;
            loop {
                let site = sites.get(&s).await.unwrap();
                if f(&site) {
                    return site;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "site {s}: timed out waiting for {what}: {:?}",
                    site.status
                );
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            }
        }
    };
    let is = |site: &Site, t: &str, status: &str| {
        site.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == t && c.status == status)
        })
    };

    let site = wait_site(
        "Ready, neither Reconciling nor Stalled",
        Box::new(move |x| {
            is(x, "Ready", "True") && is(x, "Reconciling", "False") && is(x, "Stalled", "False")
        }),
    )
    .await;
    assert_eq!(
        site.status.as_ref().unwrap().observed_generation,
        site.metadata.generation
    );

    w.secondary.stop();
    let site = wait_site(
        "Reconciling while it does not answer",
        Box::new(move |x| is(x, "Reconciling", "True")),
    )
    .await;
    let r = cond_of(&site, "Reconciling").unwrap();
    assert_eq!(r.reason, "Unreachable", "{r:?}");
    assert_eq!(cond_of(&site, "Stalled").unwrap().status, "False");

    let site = wait_site(
        "Stalled past the limit",
        Box::new(move |x| is(x, "Stalled", "True")),
    )
    .await;
    let st = cond_of(&site, "Stalled").unwrap();
    assert_eq!(st.reason, "Unreachable", "{st:?}");
    assert!(st.message.contains("--site-stall-seconds"), "{st:?}");
    assert_eq!(cond_of(&site, "Reconciling").unwrap().status, "False");
    assert_eq!(cond_of(&site, "Ready").unwrap().status, "False");
    assert_eq!(
        site.status.as_ref().unwrap().observed_generation,
        site.metadata.generation
    );

    w.secondary.restart().await;
    wait_site(
        "Ready again, neither Reconciling nor Stalled",
        Box::new(move |x| {
            is(x, "Ready", "True") && is(x, "Reconciling", "False") && is(x, "Stalled", "False")
        }),
    )
    .await;
}
