//! The controller's routes: each handler checks its input, then calls the store, the driver
//! or a cut. The agent-to-agent routes are in [`peer`].

pub(crate) mod credentials;
mod domain;
pub(crate) mod peer;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::input::{self, Params, Tenant};
use super::{
    ApiError, ApiResult, ErrorKind, Shared, Store, driver, guest, meta, read_vm, replica, store,
    with_store, with_vm,
};
use crate::site::{CreateVm, PowerRequest};

/// Body parsing whose every failure is a 400 with the reason (413 for a body over the limit).
pub(super) fn parse<T: DeserializeOwned>(body: Result<Json<T>, JsonRejection>) -> ApiResult<T> {
    body.map(|Json(b)| b).map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(input::JSON_BODY_LIMIT)
        } else {
            ApiError::bad(format!("malformed body: {}", e.body_text()))
        }
    })
}

/// A raw body (guest data, a block batch); 413 over the limit.
pub(super) fn raw_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(input::DATA_BODY_LIMIT)
        } else {
            ApiError::bad(e.body_text())
        }
    })
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!("body larger than {limit} bytes"),
    )
}

/// Refuses, before anything is done, a call for namespace `ns` about a VM (or the grant of a
/// VM not here yet) that another namespace owns: 409 naming the owner.
async fn check_tenant(st: &Shared, vm: &str, ns: &Option<String>) -> ApiResult<()> {
    let Some(ns) = ns.clone() else {
        return Ok(());
    };
    let vm = vm.to_string();
    with_store(st, move |s| {
        s.check_grant_owner(&vm, Some(&ns))?;
        if s.exists(&vm) {
            s.read_vm(&vm, |r| r.meta.check_owner(Some(&ns)))?;
        }
        Ok(())
    })
    .await
}

/// The store's VMs, and the hypervisor's domains that are not (yet) in it.
pub(crate) async fn list_vms(State(st): State<Shared>) -> ApiResult<Response> {
    let mut list = with_store(&st, |s| Ok(s.list())).await?;
    for d in domain::all(&st).await? {
        match list.vms.iter_mut().find(|v| v.name == d.name) {
            Some(v) => domain::overlay(v, &d),
            None => list.vms.push(domain::view(&d)),
        }
    }
    list.vms.sort_by(|a, b| a.name.cmp(&b.name));
    list.accelerator = st.runtime.accelerator().map(str::to_string);
    for v in &mut list.vms {
        v.replication.progress = driver::progress(&st, &v.name);
    }
    Ok(Json(list).into_response())
}

/// `GET /metrics`: the agent's counters, and the store's VMs as gauges.
pub(crate) async fn metrics(State(st): State<Shared>) -> ApiResult<Response> {
    let list = with_store(&st, |s| Ok(s.list())).await?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.encode(&list),
    )
        .into_response())
}

pub(crate) async fn get_vm(
    State(st): State<Shared>,
    Params(vm): Params<String>,
) -> ApiResult<Response> {
    let vm2 = vm.clone();
    match with_store(&st, move |s| s.vm(&vm2)).await {
        Err(e) if e.kind == ErrorKind::NotFound => match domain::find(&st, &vm).await? {
            Some(d) => Ok(Json(domain::view(&d)).into_response()),
            None => Err(e),
        },
        Ok(mut v) => {
            if let Some(d) = domain::find(&st, &vm).await? {
                domain::overlay(&mut v, &d);
            }
            v.replication.progress = driver::progress(&st, &vm);
            Ok(Json(v).into_response())
        }
        Err(e) => Err(e),
    }
}

pub(crate) async fn create_vm(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    body: Result<Json<CreateVm>, JsonRejection>,
) -> ApiResult<Response> {
    let spec = parse(body)?;
    if let Some(d) = domain::find(&st, &vm).await? {
        return Err(domain::exists(&d));
    }
    with_store(
        &st,
        move |s| Ok(Json(s.create(&vm, &spec)?).into_response()),
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OpQuery {
    operation_id: Option<String>,
}

pub(crate) async fn delete_vm(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    Query(q): Query<OpQuery>,
) -> ApiResult<Response> {
    input::opt_op_id("operationId", q.operation_id.as_deref())?;
    check_tenant(&st, &vm, &ns).await?;
    let vm2 = vm.clone();
    let running = with_store(&st, move |s| {
        Ok(s.vm(&vm2)?.power == crate::site::Power::Running)
    })
    .await
    .unwrap_or(false);
    if !running {
        // A deleted VM must not keep a replication task alive.
        driver::stop(&st, &vm);
    }
    with_store(&st, move |s| {
        // No peer creates it again (nor creates it, where it is not here).
        s.set_grant(&vm, None)?;
        let v = s.idempotent(&vm, q.operation_id.as_deref(), |s, r| {
            r.meta.check_owner(ns.as_deref())?;
            s.delete_locked(&vm, r)
        })?;
        Ok(Json(v).into_response())
    })
    .await
}

pub(crate) async fn power(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<PowerRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::power(&req)?;
    check_tenant(&st, &vm, &ns).await?;
    if let Some(d) = domain::find(&st, &vm).await? {
        let mut v = domain::power(&st, &d, req.action).await?;
        // The store's copy of the power state follows (a replica must be off to receive).
        let (name, power) = (vm.clone(), v.power);
        if let Ok(stored) = with_vm(&st, &vm, move |r| {
            if r.meta.power != power {
                r.meta.power = power;
                r.save()?;
            }
            Ok(r.view())
        })
        .await
        {
            v = stored;
            domain::overlay(&mut v, &d);
            v.power = power;
        }
        let _ = name;
        return Ok(Json(v).into_response());
    }
    if req.action != crate::site::PowerAction::Shutdown {
        return with_store(&st, move |s| {
            let v = s.idempotent(&vm, req.operation_id.as_deref(), |_, r| {
                r.meta.check_owner(ns.as_deref())?;
                r.power(req.action)
            })?;
            Ok(Json(v).into_response())
        })
        .await;
    }
    if let Some(id) = req.operation_id.clone()
        && let Some(v) = read_vm(&st, &vm, move |r| Ok(r.meta.op_answer(&id))).await?
    {
        return Ok(Json(v).into_response());
    }
    let vm2 = vm.clone();
    let running = read_vm(&st, &vm.clone(), move |r| {
        if r.meta.power == crate::site::Power::Running && !r.meta.integration_services {
            return Err(ApiError::conflict(format!(
                "VM {vm2} has no integration services: it cannot be shut down gracefully"
            )));
        }
        Ok(r.meta.power == crate::site::Power::Running)
    })
    .await?;
    // Held until the VM is Off: no guest write slips in between.
    let _quiet = if running {
        Some(guest::shutdown(&st, &vm).await?)
    } else {
        None
    };
    with_store(&st, move |s| {
        let v = s.idempotent(&vm, req.operation_id.as_deref(), |_, r| {
            r.meta.check_owner(ns.as_deref())?;
            r.power(req.action)
        })?;
        Ok(Json(v).into_response())
    })
    .await
}

#[derive(Deserialize)]
pub(crate) struct IoQuery {
    offset: Option<String>,
    length: Option<String>,
}

fn number(v: Option<String>, name: &str) -> ApiResult<u64> {
    let v = v.ok_or_else(|| ApiError::bad(format!("query parameter {name} is required")))?;
    v.parse()
        .map_err(|_| ApiError::bad(format!("{name} must be a non-negative integer, got {v:?}")))
}

pub(crate) async fn write_disk(
    State(st): State<Shared>,
    Params((vm, disk)): Params<(String, String)>,
    Query(q): Query<IoQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let body = raw_body(body)?;
    let offset = number(q.offset, "offset")?;
    if let Some(d) = domain::find(&st, &vm).await? {
        return Err(domain::no_guest_writes(&d));
    }
    let in_flight = guest::InFlight::start(&st, &vm)?;
    with_vm(&st, &vm.clone(), move |r| {
        let _in_flight = in_flight;
        r.write(&disk, offset, &body)?;
        Ok(Json(serde_json::json!({"written": body.len()})).into_response())
    })
    .await
}

pub(crate) async fn read_disk(
    State(st): State<Shared>,
    Params((vm, disk)): Params<(String, String)>,
    Query(q): Query<IoQuery>,
) -> ApiResult<Response> {
    let offset = number(q.offset, "offset")?;
    let length = number(q.length, "length")?;
    let data = match domain::read(&st, &vm, &disk, offset, length).await? {
        Some(data) => data,
        None => read_vm(&st, &vm, move |r| r.read(&disk, offset, length)).await?,
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

pub(crate) async fn digest(
    State(st): State<Shared>,
    Params((vm, disk)): Params<(String, String)>,
) -> ApiResult<Response> {
    let sha256 = match domain::digest(&st, &vm, &disk).await? {
        Some(d) => d,
        None => read_vm(&st, &vm, move |r| r.digest(&disk)).await?,
    };
    Ok(Json(crate::site::DigestResponse { sha256 }).into_response())
}

pub(super) fn to_json<T: serde::Serialize>(v: T) -> ApiResult<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| ApiError::io(e.into()))
}

pub(crate) async fn recovery_points(
    State(st): State<Shared>,
    Params(vm): Params<String>,
) -> ApiResult<Response> {
    read_vm(&st, &vm, move |r| {
        Ok(Json(crate::site::RecoveryPointList {
            recovery_points: r.recovery_points()?,
        })
        .into_response())
    })
    .await
}

pub(crate) async fn enable(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::EnableReplication>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::enable(&req)?;
    check_tenant(&st, &vm, &ns).await?;
    if let Some(d) = domain::find(&st, &vm).await? {
        // A domain joins the store when it is first protected; its disks stay its own.
        domain::check_protectable(&d)?;
        // The store keeps sizes; formats are the hypervisor's and are shown from it.
        let disks: Vec<_> = d
            .disks
            .iter()
            .map(|x| crate::site::DiskSpec {
                format: None,
                ..x.spec()
            })
            .collect();
        let name = vm.clone();
        let guest_agent = d.guest_agent;
        with_store(&st, move |s| s.adopt(&name, &disks, guest_agent)).await?;
    }
    let vm2 = vm.clone();
    let resp = with_store(&st, move |s| {
        let op = req.operation_id.clone();
        s.idempotent(&vm2.clone(), Some(&op), |_, r| {
            if r.meta.role != crate::site::Role::Primary {
                return Err(ApiError::conflict(format!(
                    "VM {vm2} is not a primary here"
                )));
            }
            // The VM belongs to the enabling namespace from now on (saved below, with the
            // settings).
            r.meta.claim(ns.as_deref())?;
            r.meta.inbound = None;
            r.meta.outbound = Some(meta::Outbound::from_enable(&req));
            // The answer is saved with the settings: a retry after a crash never starts the
            // initial transfer again (which would drop the replica's points).
            let answer = to_json(r.view().replication)?;
            r.meta.note_op(Some(&op), &answer);
            r.save()?;
            Ok(answer)
        })
    })
    .await?;
    driver::spawn(&st, &vm);
    Ok((StatusCode::ACCEPTED, Json(resp)).into_response())
}

/// `POST /v1/vms/{vm}/replication/settings`: new settings for the outbound replication of
/// `vm`, checked like `enable`'s and saved with the operation's answer. The cycle loop takes
/// the interval from its next cycle; the retention reaches the replica with that cycle's
/// `begin`. Nothing is sent again and no recovery point is dropped (but those the new
/// retention drops).
pub(crate) async fn settings(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::ReplicationSettingsRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::settings(&req)?;
    let new = meta::OutboundSettings {
        interval_seconds: req.interval_seconds,
        retention_hours: req.recovery_point_retention_hours,
        app_consistent_hours: req.app_consistent_frequency_hours,
    };
    let vm2 = vm.clone();
    let resp = store_op(&st, &vm, &ns, req.operation_id.clone(), move |_, r| {
        if r.meta.role != crate::site::Role::Primary {
            return Err(ApiError::conflict(format!(
                "VM {vm2} is not a primary here: its replication settings are its source's"
            )));
        }
        match r.meta.outbound.as_mut() {
            Some(o) if !o.stopped => o.apply_settings(new),
            _ => {
                return Err(ApiError::conflict(format!(
                    "VM {vm2} does not replicate from this site: enable replication first"
                )));
            }
        }
        // Saved once, with the operation's answer.
        to_json(r.view().replication)
    })
    .await?;
    tracing::info!(
        vm,
        interval_seconds = new.interval_seconds,
        retention_hours = new.retention_hours,
        app_consistent_hours = new.app_consistent_hours,
        "replication settings changed"
    );
    driver::settings_changed(&st, &vm);
    Ok(resp)
}

/// `POST /v1/vms/{vm}/replication/accept`: the controller lets a source replicate into `vm`.
pub(crate) async fn accept(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::AcceptReplication>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::accept(&req)?;
    let op = req.operation_id.clone();
    let v = with_store(&st, move |s| {
        if !s.exists(&vm) {
            // Nothing here to protect: the first bulk transfer creates the replica.
            return to_json(s.accept_missing(&vm, &req.source_site, ns.as_deref())?);
        }
        // Once per operation id: a retry must not grant again what a transfer used up.
        s.idempotent(&vm, Some(&op), |s, r| {
            let answer = to_json(r.accept(&req.source_site, ns.as_deref(), Some(&op))?)?;
            // Should the replica's files be lost later, the source may create it again.
            let grant = store::Grant::new(&req.source_site, r.meta.owner.as_deref());
            s.set_grant(&vm, Some(grant))?;
            Ok(answer)
        })
    })
    .await?;
    Ok(Json(v).into_response())
}

/// Runs storage work once per operation id (checked here): a repeated id answers the first
/// call's result.
/// A VM another namespace owns is refused (409) before `f` runs.
async fn store_op(
    st: &Shared,
    vm: &str,
    ns: &Option<String>,
    op_id: String,
    f: impl FnOnce(&Store, &mut store::VmRec) -> ApiResult<serde_json::Value> + Send + 'static,
) -> ApiResult<Response> {
    input::op_id("operationId", &op_id)?;
    let vm = vm.to_string();
    let ns = ns.clone();
    let v = with_store(st, move |s| {
        s.idempotent(&vm, Some(&op_id), |s, r| {
            r.meta.check_owner(ns.as_deref())?;
            f(s, r)
        })
    })
    .await?;
    Ok(Json(v).into_response())
}

/// Runs an async operation once per id, storing its answer.
async fn once(
    st: &Shared,
    op: &str,
    f: impl std::future::Future<Output = ApiResult<serde_json::Value>>,
) -> ApiResult<Response> {
    let id = op.to_string();
    if let Some(v) = with_store(st, move |s| Ok(s.op_lookup(&id))).await? {
        return Ok(Json(v).into_response());
    }
    let v = f.await?;
    let id = op.to_string();
    let v2 = v.clone();
    with_store(st, move |s| s.op_save(&id, &v2)).await?;
    Ok(Json(v).into_response())
}

pub(crate) async fn sync(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::OperationRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::operation(&req)?;
    let vm2 = vm.clone();
    read_vm(&st, &vm2, |_| Ok(())).await?;
    check_tenant(&st, &vm, &ns).await?;
    once(&st, &req.operation_id, async {
        let rp = driver::sync_now(&st, &vm).await?;
        to_json(crate::site::SyncResult { recovery_point: rp })
    })
    .await
}

/// `POST /v1/cuts`: one recovery point per listed outbound VM, all cut at the same instant.
pub(crate) async fn cut(
    State(st): State<Shared>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::CutRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::cut(&req)?;
    // A cut makes a point of every VM it lists: none of them may be another namespace's.
    for vm in &req.vms {
        check_tenant(&st, vm, &ns).await?;
    }
    Ok(Json(super::cut::run(&st, req).await?).into_response())
}

pub(crate) async fn stop(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::OperationRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    check_tenant(&st, &vm, &ns).await?;
    driver::stop(&st, &vm);
    store_op(&st, &vm, &ns, req.operation_id.clone(), move |s, r| {
        r.stop_inbound()?;
        s.set_grant(&r.meta.name, None)?;
        to_json(r.view().replication)
    })
    .await
}

pub(crate) async fn failover(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::FailoverRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::failover(&req)?;
    let networks: Vec<(String, String)> = req
        .network_mappings
        .iter()
        .map(|m| (m.from.clone(), m.to.clone()))
        .collect();
    check_tenant(&st, &vm, &ns).await?;
    // A replica of a domain whose networks are missing here is refused before anything changes.
    domain::check_networks(&st, &vm, &networks).await?;
    let answer = store_op(&st, &vm, &ns, req.operation_id.clone(), move |s, r| {
        let rp = r.failover(&req.recovery_point, Some(&req.operation_id))?;
        // The VM runs here now: no peer may create it again.
        s.set_grant(&r.meta.name, None)?;
        to_json(crate::site::FailoverResult { recovery_point: rp })
    })
    .await?;
    // A replica of a domain boots as one; on a retry (the answer replayed) too, in case the
    // boot is what failed.
    domain::boot_failed_over(&st, &vm, networks).await?;
    Ok(answer)
}

pub(crate) async fn test_failover(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::TestFailoverRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    input::test_failover(&req)?;
    // The drill copy is a VM like any other: its name must be valid too.
    let copy = replica::drill_copy_name(&vm);
    if !input::valid_name(&copy) {
        return Err(ApiError::bad(format!(
            "VM {vm} cannot have a drill copy: its name {copy} would be longer than 63 \
             characters (VM names of at most 58 characters can be tested)"
        )));
    }
    check_tenant(&st, &vm, &ns).await?;
    let network = req.network.clone();
    let st2 = st.clone();
    let answer = store_op(&st, &vm, &ns, req.operation_id.clone(), move |s, r| {
        // A replica of a domain drills on copy-on-write overlays of its images.
        let runtime = &st2.runtime;
        let overlay: crate::agent::runtime::MakeOverlay<'_> = &|d| runtime.make_overlay(d);
        let domain = st2.runtime.kind() != crate::agent::runtime::RuntimeKind::Builtin
            && r.meta.definition.is_some();
        to_json(s.test_failover(
            r,
            &req.recovery_point,
            &req.network,
            Some(&req.operation_id),
            domain.then_some(overlay),
        )?)
    })
    .await?;
    // A replica of a domain: the copy boots as a domain on the isolated network (on a retry
    // too, in case the boot is what failed).
    domain::boot_drill(&st, &vm, &copy, &network).await?;
    Ok(answer)
}

pub(crate) async fn test_cleanup(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::OperationRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    check_tenant(&st, &vm, &ns).await?;
    // The drill copy's domain goes first: its images are deleted next.
    domain::remove(&st, &vm, &replica::drill_copy_name(&vm)).await?;
    store_op(&st, &vm, &ns, req.operation_id.clone(), move |s, r| {
        let (vm_name, deleted) = s.test_cleanup(r)?;
        to_json(crate::site::CleanupResult { vm_name, deleted })
    })
    .await
}

pub(crate) async fn commit(
    State(st): State<Shared>,
    Params(vm): Params<String>,
    Tenant(ns): Tenant,
    body: Result<Json<crate::site::OperationRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let req = parse(body)?;
    store_op(&st, &vm, &ns, req.operation_id.clone(), move |_, r| {
        to_json(r.commit_points(Some(&req.operation_id))?)
    })
    .await
}
