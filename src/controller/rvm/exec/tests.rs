//! Step execution against fake sites that record every call.

use std::sync::{Arc, Mutex};

use super::*;
use crate::api::{JobType, ReplicationSpec};
use crate::controller::sites::Sites;
use crate::site::{
    AcceptReplication, AcceptResult, CleanupResult, CommitResult, CreateVm, CutRequest, CutResult,
    FailoverResult, RecoveryPoint, RecoveryPointSelector, ReplicationInfo, SiteFuture, SyncResult,
    TestFailoverResult, Vm, VmList,
};

const P: &str = "primary";
const S: &str = "secondary";
const OP: &str = "uid1-web-01-enable-1-EnableReplication";
/// The credential of the pair primary -> secondary.
const PAIR: &str = "pair-credential-of-primary-to-secondary";

type Log = Arc<Mutex<Vec<String>>>;

/// A site that records the calls the step makes; `accept` is its answer to an accept.
struct Fake {
    site: &'static str,
    log: Log,
    accept: fn() -> Result<(), SiteError>,
}

impl Fake {
    fn note(&self, s: String) {
        self.log.lock().expect("log").push(s);
    }
}

fn unused<'a, T: Send + 'a>() -> SiteFuture<'a, T> {
    Box::pin(async { Err(SiteError::Other(501, "not used by this test".into())) })
}

impl SiteProvider for Fake {
    fn health(&self) -> SiteFuture<'_, ()> {
        unused()
    }
    fn list_vms(&self) -> SiteFuture<'_, VmList> {
        unused()
    }
    fn get_vm<'a>(&'a self, _: &'a str) -> SiteFuture<'a, Vm> {
        unused()
    }
    fn create_vm<'a>(&'a self, _: &'a str, _: &'a CreateVm) -> SiteFuture<'a, Vm> {
        unused()
    }
    fn delete_vm<'a>(&'a self, _: &'a str, _: &'a str) -> SiteFuture<'a, ()> {
        unused()
    }
    fn power<'a>(&'a self, _: &'a str, _: PowerAction, _: &'a str) -> SiteFuture<'a, Vm> {
        unused()
    }
    fn enable_replication<'a>(
        &'a self,
        vm: &'a str,
        p: &'a EnableReplication,
    ) -> SiteFuture<'a, ReplicationInfo> {
        self.note(format!(
            "enable at {} {vm} {} to {} {:?} with {}",
            self.site,
            p.operation_id,
            p.peer_site,
            p.mode,
            p.peer_token.expose()
        ));
        Box::pin(async { Ok(ReplicationInfo::default()) })
    }
    fn update_replication_settings<'a>(
        &'a self,
        vm: &'a str,
        p: &'a crate::site::ReplicationSettingsRequest,
    ) -> SiteFuture<'a, ReplicationInfo> {
        self.note(format!(
            "settings at {} {vm} {} {} {} {}",
            self.site,
            p.operation_id,
            p.interval_seconds,
            p.recovery_point_retention_hours,
            p.app_consistent_frequency_hours
        ));
        Box::pin(async { Ok(ReplicationInfo::default()) })
    }
    fn accept_replication<'a>(
        &'a self,
        vm: &'a str,
        p: &'a AcceptReplication,
    ) -> SiteFuture<'a, AcceptResult> {
        self.note(format!(
            "accept at {} {vm} {} from {}",
            self.site, p.operation_id, p.source_site
        ));
        let answer = (self.accept)().map(|()| AcceptResult {
            source_site: p.source_site.clone(),
        });
        Box::pin(async move { answer })
    }
    fn sync<'a>(&'a self, _: &'a str, _: &'a str) -> SiteFuture<'a, SyncResult> {
        unused()
    }
    fn cut<'a>(&'a self, _: &'a CutRequest) -> SiteFuture<'a, CutResult> {
        unused()
    }
    fn stop_replication<'a>(&'a self, _: &'a str, _: &'a str) -> SiteFuture<'a, ReplicationInfo> {
        unused()
    }
    fn recovery_points<'a>(&'a self, _: &'a str) -> SiteFuture<'a, Vec<RecoveryPoint>> {
        unused()
    }
    fn failover<'a>(
        &'a self,
        _: &'a str,
        _: &'a RecoveryPointSelector,
        _: &'a str,
    ) -> SiteFuture<'a, FailoverResult> {
        unused()
    }
    fn test_failover<'a>(
        &'a self,
        _: &'a str,
        _: &'a RecoveryPointSelector,
        _: &'a str,
        _: &'a str,
    ) -> SiteFuture<'a, TestFailoverResult> {
        unused()
    }
    fn test_failover_cleanup<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
    ) -> SiteFuture<'a, CleanupResult> {
        unused()
    }
    fn commit<'a>(&'a self, _: &'a str, _: &'a str) -> SiteFuture<'a, CommitResult> {
        unused()
    }
    fn digest<'a>(&'a self, _: &'a str, _: &'a str) -> SiteFuture<'a, String> {
        unused()
    }
}

/// Both sites, the target answering an accept with `accept`.
fn sites(accept: fn() -> Result<(), SiteError>) -> (Sites, Log) {
    let log = Log::default();
    let sites = Sites::new();
    for site in [P, S] {
        let fake = Fake {
            site,
            log: log.clone(),
            accept,
        };
        sites.insert_provider(site, &format!("http://{site}.invalid"), Arc::new(fake));
    }
    sites.pairs.installed_at_target(P, S, PAIR.into());
    (sites, log)
}

fn enable_call(job_type: JobType, mode: EnableMode) -> StepCall {
    StepCall {
        job: 0,
        step: 0,
        job_name: "web-01-enable-1".into(),
        job_type,
        step_name: StepName::EnableReplication,
        vm: "web-01".into(),
        source: P.into(),
        target: S.into(),
        op_id: OP.into(),
        recovery_point: "Latest".into(),
        network: "isolated".into(),
        mode,
        replication: ReplicationSpec::default(),
        optional: false,
        test_vm: None,
        cut_vms: vec![],
        source_unreachable: false,
        deadline: jiff::Timestamp::now() + jiff::SignedDuration::from_secs(600),
    }
}

fn calls(log: &Log) -> Vec<String> {
    log.lock().expect("log").clone()
}

#[tokio::test]
async fn enable_replication_accepts_at_the_target_before_enabling_at_the_source() {
    for (t, mode, wire) in [
        (JobType::EnableReplication, EnableMode::Initial, "Initial"),
        (JobType::ReverseReplicate, EnableMode::Resync, "Resync"),
    ] {
        let (sites, log) = sites(|| Ok(()));
        let o = run(&sites.tenant("team"), &enable_call(t, mode)).await;
        assert_eq!(o, Outcome::ok());
        assert_eq!(
            calls(&log),
            [
                format!("accept at {S} web-01 {OP}-accept from {P}"),
                format!("enable at {P} web-01 {OP} to {S} {wire} with {PAIR}"),
            ]
        );
    }
}

/// Until the target holds the pair's credential, nothing is called: the source never gets a
/// credential the target would refuse, nor the target's own token.
#[tokio::test]
async fn without_the_pairs_credential_at_the_target_nothing_is_enabled() {
    let log = Log::default();
    let sites = Sites::new();
    for site in [P, S] {
        let fake = Fake {
            site,
            log: log.clone(),
            accept: || Ok(()),
        };
        sites.insert_provider(site, &format!("http://{site}.invalid"), Arc::new(fake));
    }
    // The reverse pair does not do.
    sites.pairs.installed_at_target(S, P, PAIR.into());
    let o = run(
        &sites.tenant("team"),
        &enable_call(JobType::EnableReplication, EnableMode::Initial),
    )
    .await;
    assert!(
        matches!(&o, Outcome::Unreachable(m) if m.contains("peer credential")),
        "{o:?}"
    );
    assert!(calls(&log).is_empty());
}

#[tokio::test]
async fn a_target_that_does_not_answer_the_accept_is_retried_and_nothing_is_enabled() {
    let (sites, log) = sites(|| Err(SiteError::Unreachable("connection refused".into())));
    let o = run(
        &sites.tenant("team"),
        &enable_call(JobType::EnableReplication, EnableMode::Initial),
    )
    .await;
    assert!(
        matches!(&o, Outcome::Unreachable(m) if m.contains(S) && m.contains("connection refused")),
        "{o:?}"
    );
    assert_eq!(
        calls(&log),
        [format!("accept at {S} web-01 {OP}-accept from {P}")]
    );
}

#[tokio::test]
async fn a_target_that_refuses_the_accept_fails_the_step_and_nothing_is_enabled() {
    let (sites, log) = sites(|| Err(SiteError::Conflict("VM web-01 runs here".into())));
    let o = run(
        &sites.tenant("team"),
        &enable_call(JobType::ReverseReplicate, EnableMode::Resync),
    )
    .await;
    assert!(
        matches!(&o, Outcome::Failed(m) if m.contains(S) && m.contains("runs here")),
        "{o:?}"
    );
    assert_eq!(
        calls(&log),
        [format!("accept at {S} web-01 {OP}-accept from {P}")]
    );
}

#[tokio::test]
async fn an_unknown_target_is_retried_and_nothing_is_called() {
    let (sites, log) = sites(|| Ok(()));
    sites.remove(S);
    let o = run(
        &sites.tenant("team"),
        &enable_call(JobType::EnableReplication, EnableMode::Initial),
    )
    .await;
    assert!(
        matches!(&o, Outcome::Unreachable(m) if m.contains(S)),
        "{o:?}"
    );
    assert!(calls(&log).is_empty());
}

/// A refused token is a site a person has to fix (its Secret): retried like a site that does not
/// answer, so the step's deadline ends it, with the reason in the message.
#[tokio::test]
async fn a_target_that_refuses_the_token_is_retried_until_the_deadline() {
    let (sites, log) = sites(|| Err(SiteError::Unauthorized("401".into())));
    let o = run(
        &sites.tenant("team"),
        &enable_call(JobType::EnableReplication, EnableMode::Initial),
    )
    .await;
    assert!(
        matches!(&o, Outcome::Unreachable(m) if m.contains(S) && m.contains("refused the token")),
        "{o:?}"
    );
    assert_eq!(
        calls(&log),
        [format!("accept at {S} web-01 {OP}-accept from {P}")]
    );
}

#[tokio::test]
async fn a_settings_change_goes_to_the_source_with_the_specs_numbers() {
    let (sites, log) = sites(|| Ok(()));
    let mut call = super::super::planner::SettingsCall {
        site: P.into(),
        vm: "web-01".into(),
        op_id: "uid1-settings-g3-300-2-1".into(),
        replication: ReplicationSpec {
            interval_seconds: 300,
            recovery_point_retention_hours: 2,
            app_consistent_frequency_hours: 1,
            ..ReplicationSpec::default()
        },
    };
    assert_eq!(settings(&sites.tenant("team"), &call).await, Outcome::ok());
    assert_eq!(
        calls(&log),
        [format!(
            "settings at {P} web-01 uid1-settings-g3-300-2-1 300 2 1"
        )]
    );
    // A site without a Site object is not called: retried later.
    call.site = "elsewhere".into();
    assert!(matches!(
        settings(&sites.tenant("team"), &call).await,
        Outcome::Unreachable(_)
    ));
    assert_eq!(calls(&log).len(), 1);
}
