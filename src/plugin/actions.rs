//! What each action changes: a merge patch of a spec field or an annotation, exactly what a
//! user would write by hand (or in Git). Pure functions of the object, so the patch printed by
//! `--dry-run` is the patch applied.

use serde_json::{Value, json};

use crate::api::{
    APPROVE_ANNOTATION, COMMIT_ANNOTATION, FailoverPlan, Job, JobState, JobType, RETRY_ANNOTATION,
    ReplicatedVM,
};

/// Why an action cannot be carried out on the object as it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("site {site} is neither {primary} nor {recovery}, the sites of {vm}")]
    UnknownSite {
        vm: String,
        site: String,
        primary: String,
        recovery: String,
    },
    #[error("{0} has no failover job to commit (status.jobs)")]
    NothingToCommit(String),
    #[error("{vm} has no job {job} (status.jobs)")]
    NoSuchJob { vm: String, job: String },
    #[error("job {job} of {vm} is {state}: only a failed job can be retried")]
    NotFailed {
        vm: String,
        job: String,
        state: String,
    },
    #[error("{0:?} is not GROUP/ACTION")]
    BadApproval(String),
}

/// The spec change of a failover to `site`.
pub fn failover(
    vm: &ReplicatedVM,
    site: &str,
    unplanned: bool,
    recovery_point: Option<&str>,
) -> Result<Value, ActionError> {
    if site != vm.spec.primary_site && site != vm.spec.recovery_site {
        return Err(ActionError::UnknownSite {
            vm: vm.metadata.name.clone().unwrap_or_default(),
            site: site.into(),
            primary: vm.spec.primary_site.clone(),
            recovery: vm.spec.recovery_site.clone(),
        });
    }
    let mut f = json!({"type": if unplanned { "Unplanned" } else { "Planned" }});
    if let Some(rp) = recovery_point {
        f["recoveryPoint"] = rp.into();
    }
    Ok(json!({"spec": {"activeSite": site, "failover": f}}))
}

/// A planned failover back to the primary site.
pub fn failback(vm: &ReplicatedVM) -> Result<Value, ActionError> {
    failover(vm, &vm.spec.primary_site, false, None)
}

/// Starts (`true`) or cleans up (`false`) a drill.
pub fn drill(enabled: bool, network: Option<&str>) -> Value {
    let mut t = json!({"enabled": enabled});
    if let Some(n) = network {
        t["network"] = n.into();
    }
    json!({"spec": {"testFailover": t}})
}

fn annotation(key: &str, value: &str) -> Value {
    json!({"metadata": {"annotations": {key: value}}})
}

fn name_of(vm: &ReplicatedVM) -> String {
    vm.metadata.name.clone().unwrap_or_default()
}

/// Commits `job`, or the newest failover job.
pub fn commit(vm: &ReplicatedVM, job: Option<&str>) -> Result<Value, ActionError> {
    let jobs = vm.status.as_ref().map(|s| s.jobs.as_slice()).unwrap_or(&[]);
    let job = match job {
        Some(j) => find(vm, jobs, j)?.name.clone(),
        None => jobs
            .iter()
            .rev()
            .find(|j| {
                matches!(
                    j.type_,
                    JobType::PlannedFailover | JobType::UnplannedFailover
                )
            })
            .map(|j| j.name.clone())
            .ok_or_else(|| ActionError::NothingToCommit(name_of(vm)))?,
    };
    Ok(annotation(COMMIT_ANNOTATION, &job))
}

fn find<'a>(vm: &ReplicatedVM, jobs: &'a [Job], job: &str) -> Result<&'a Job, ActionError> {
    jobs.iter()
        .find(|j| j.name == job)
        .ok_or_else(|| ActionError::NoSuchJob {
            vm: name_of(vm),
            job: job.into(),
        })
}

/// Runs the failed `job` again: its next attempt (`<job>` for the second, `<job>/<n>` after).
pub fn retry(vm: &ReplicatedVM, job: &str) -> Result<Value, ActionError> {
    let jobs = vm.status.as_ref().map(|s| s.jobs.as_slice()).unwrap_or(&[]);
    let j = find(vm, jobs, job)?;
    if j.state != JobState::Failed {
        return Err(ActionError::NotFailed {
            vm: name_of(vm),
            job: job.into(),
            state: format!("{:?}", j.state),
        });
    }
    let next = j.attempt.unwrap_or(1) + 1;
    let value = if next == 2 {
        job.to_string()
    } else {
        format!("{job}/{next}")
    };
    Ok(annotation(RETRY_ANNOTATION, &value))
}

/// Approves `group/action` of a plan: added to the values already there (comma-separated), and
/// bound to the plan job that runs, if one does, so it cannot approve a later run.
pub fn approve(plan: &FailoverPlan, what: &str) -> Result<Value, ActionError> {
    let Some((group, action)) = what.split_once('/') else {
        return Err(ActionError::BadApproval(what.into()));
    };
    if group.is_empty() || action.is_empty() || action.contains('/') {
        return Err(ActionError::BadApproval(what.into()));
    }
    let running = plan
        .status
        .as_ref()
        .and_then(|s| s.jobs.iter().rev().find(|j| j.state == JobState::Running));
    let value = match running {
        Some(j) => format!("{what}@{}", j.name),
        None => what.to_string(),
    };
    let old = plan
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(APPROVE_ANNOTATION))
        .cloned()
        .unwrap_or_default();
    let mut values: Vec<&str> = old.split(',').filter(|v| !v.trim().is_empty()).collect();
    if !values.contains(&value.as_str()) {
        values.push(&value);
    }
    Ok(annotation(APPROVE_ANNOTATION, &values.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(jobs: Value) -> ReplicatedVM {
        serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "ReplicatedVM",
            "metadata": {"name": "web-01"},
            "spec": {"primarySite": "primary", "recoverySite": "secondary"},
            "status": {"jobs": jobs},
        }))
        .unwrap()
    }

    #[test]
    fn failover_sets_the_active_site_and_type() {
        let v = vm(json!([]));
        assert_eq!(
            failover(&v, "secondary", true, Some("rp-000001")).unwrap(),
            json!({"spec": {"activeSite": "secondary", "failover": {"type": "Unplanned", "recoveryPoint": "rp-000001"}}})
        );
        assert_eq!(
            failback(&v).unwrap(),
            json!({"spec": {"activeSite": "primary", "failover": {"type": "Planned"}}})
        );
        assert!(matches!(
            failover(&v, "elsewhere", false, None),
            Err(ActionError::UnknownSite { .. })
        ));
    }

    #[test]
    fn commit_names_the_newest_failover_and_retry_the_next_attempt() {
        let v = vm(json!([
            {"name": "web-01-failover-1", "type": "PlannedFailover", "state": "Succeeded"},
            {"name": "web-01-failover-2", "type": "UnplannedFailover", "state": "Failed", "attempt": 2},
            {"name": "web-01-testfailover-3", "type": "TestFailover", "state": "Failed"},
        ]));
        assert_eq!(
            commit(&v, None).unwrap(),
            json!({"metadata": {"annotations": {"twinsite.io/commit": "web-01-failover-2"}}})
        );
        assert_eq!(
            retry(&v, "web-01-failover-2").unwrap(),
            json!({"metadata": {"annotations": {"twinsite.io/retry": "web-01-failover-2/3"}}})
        );
        assert_eq!(
            retry(&v, "web-01-testfailover-3").unwrap(),
            json!({"metadata": {"annotations": {"twinsite.io/retry": "web-01-testfailover-3"}}})
        );
        assert!(matches!(
            retry(&v, "web-01-failover-1"),
            Err(ActionError::NotFailed { .. })
        ));
        assert!(matches!(
            retry(&v, "nope"),
            Err(ActionError::NoSuchJob { .. })
        ));
    }

    #[test]
    fn approval_is_added_and_bound_to_the_running_plan_job() {
        let plan: FailoverPlan = serde_json::from_value(json!({
            "apiVersion": "twinsite.io/v1alpha1", "kind": "FailoverPlan",
            "metadata": {"name": "dr", "annotations": {"twinsite.io/approve": "a/b"}},
            "spec": {"targetSite": "secondary", "groups": [{"name": "a", "vms": ["x"]}]},
            "status": {"jobs": [{"name": "dr-failover-2", "type": "PlanFailover", "state": "Running"}]},
        }))
        .unwrap();
        assert_eq!(
            approve(&plan, "db/confirm").unwrap(),
            json!({"metadata": {"annotations": {"twinsite.io/approve": "a/b,db/confirm@dr-failover-2"}}})
        );
        assert!(approve(&plan, "nogroup").is_err());
    }
}
