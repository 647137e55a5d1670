//! The agent-to-agent routes (`/v1/replica/...`): a source site's agent opens cycles, sends
//! blocks and commits them into recovery points here. A peer's credential is bound to its site
//! and reaches only the VMs that replicate from that site.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::super::auth::Caller;
use super::super::input::Params;
use super::super::runtime::domspec;
use super::super::{
    ApiError, ApiResult, ErrorKind, Shared, driver, read_vm, replica, store, with_store, with_vm,
};
use super::{parse, raw_body};
use crate::replication::frame;

/// A peer's credential reaches only the VMs that replicate from its site: its replicas here,
/// and a VM the controller let it replicate into (`accept`). Not a VM that replicates to it, nor
/// one that ran here since (403).
fn peer_may_use(caller: &Caller, r: &store::VmRec) -> ApiResult<()> {
    let Some(site) = caller.bound_site() else {
        return Ok(());
    };
    let m = &r.meta;
    let replica_of_site = m.role == crate::site::Role::Replica
        && m.inbound.as_ref().is_some_and(|i| i.source_site == site);
    if replica_of_site || m.accept_from.as_deref() == Some(site) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorKind::Forbidden,
        format!("VM {} does not replicate from site {site}", m.name),
    ))
}

pub(crate) async fn begin(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params(vm): Params<String>,
    body: Result<Json<replica::BeginCycle>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    req.check()?;
    // A bound token speaks for its own site only (the replica's rules then apply to that site).
    if let Some(site) = caller.bound_site()
        && site != req.source_site
    {
        return Err(ApiError::new(
            ErrorKind::Forbidden,
            format!(
                "a token of site {site} cannot begin replication as site {}",
                req.source_site
            ),
        ));
    }
    st.limits.check_begin(&req)?;
    check_definition(&st, &vm, &req)?;
    let bulk = req.bulk;
    if bulk {
        super::domain::take_images(&st, &vm, &req.source_site).await?;
    }
    let vm2 = vm.clone();
    let answer = with_store(&st, move |s| s.begin(&vm2, &req)).await?;
    // This VM follows the peer now: a replication task of its own (an old source's) must end.
    driver::stop(&st, &vm);
    if bulk {
        // Nothing here may start the domain into the replica's images.
        super::domain::demote(&st, &vm).await;
    }
    Ok(Json(answer).into_response())
}

/// A peer's domain definition is read through the allowlist where it arrives: one the
/// replica would not boot as it is is refused before anything is stored (400 naming it).
fn check_definition(st: &Shared, vm: &str, req: &replica::BeginCycle) -> ApiResult<()> {
    let Some(def) = &req.definition else {
        return Ok(());
    };
    let disks: Vec<&str> = req.disks.iter().map(|d| d.name.as_str()).collect();
    domspec::check(def, vm, &disks, &st.boot_file_dirs)
        .map(|_| ())
        .map_err(|e| ApiError::bad(format!("definition: {e}")))
}

pub(crate) async fn hashes(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params((vm, index)): Params<(String, usize)>,
) -> ApiResult<Response> {
    read_vm(&st, &vm, move |r| {
        peer_may_use(&caller, r)?;
        Ok(r.block_hashes(index)?.into_response())
    })
    .await
}

pub(crate) async fn dirty(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params(vm): Params<String>,
) -> ApiResult<Response> {
    read_vm(&st, &vm, move |r| {
        peer_may_use(&caller, r)?;
        Ok(Json(r.dirty_set()?).into_response())
    })
    .await
}

#[derive(Deserialize)]
pub(crate) struct BulkQuery {
    #[serde(default)]
    bulk: bool,
}

pub(crate) async fn blocks(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params((vm, cycle)): Params<(String, String)>,
    Query(q): Query<BulkQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = raw_body(body)?;
    let len = body.len() as u64;
    let bulk = q.bulk;
    // Checksums are verified before the store lock is taken, so batches in flight verify in
    // parallel with the writes of the one before.
    let (body, verified) = tokio::task::spawn_blocking(move || {
        let verified = frame::verify_batch(&body);
        (body, verified)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let verified = verified.ok_or_else(|| ApiError::bad("malformed block batch"))?;
    let res = with_vm(&st, &vm.clone(), move |r| {
        peer_may_use(&caller, r)?;
        r.check_staging(&cycle, bulk, len)?;
        r.receive(&cycle, bulk, &body, &verified)
    })
    .await?;
    st.metrics.received(&vm, len);
    if !bulk && crate::fault::switch("TWINSITE_FAULT_HANG_BLOCKS").is_some() {
        hang_if_marked(&st).await;
    }
    Ok(Json(res).into_response())
}

/// Test-only fault injection (`TWINSITE_FAULT_HANG_BLOCKS`, feature `failpoints` only): while
/// `hang-blocks` exists in the data dir, a cycle's block batch is staged but never answered, so
/// a test can kill the agent mid-cycle.
async fn hang_if_marked(st: &Shared) {
    let dir = st.data_dir.clone();
    if dir.join("hang-blocks").exists() {
        let _ = std::fs::write(dir.join("hang-reached"), b"");
        std::future::pending::<()>().await;
    }
}

pub(crate) async fn commit(
    State(st): State<Shared>,
    Extension(caller): Extension<Caller>,
    Params(vm): Params<String>,
    body: Result<Json<replica::CommitCycle>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    req.check()?;
    st.limits.check_commit_time(&req, jiff::Timestamp::now())?;
    let max_points = st.limits.max_points;
    with_vm(&st, &vm.clone(), move |r| {
        peer_may_use(&caller, r)?;
        r.check_points(&req, max_points, jiff::Timestamp::now())?;
        Ok(Json(r.commit_cycle(&req)?).into_response())
    })
    .await
}
