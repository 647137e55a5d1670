//! Routes on a VM that is a hypervisor domain (the `libvirt` runtime): listed and powered
//! through the runtime; its guest writes for itself. Runtime calls block, so they run off the
//! async threads.

use std::time::Duration;

use super::super::runtime::{Domain, RuntimeKind};
use super::super::{ApiError, ApiResult, Shared};
use crate::site::{PowerAction, Role, Vm};

/// Runs a runtime call off the async threads.
async fn blocking<T: Send + 'static>(
    st: &Shared,
    f: impl FnOnce(&dyn super::super::runtime::Runtime) -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || f(st.runtime.as_ref()))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

/// The domain `vm`, if the site's hypervisor has one.
pub(super) async fn find(st: &Shared, vm: &str) -> ApiResult<Option<Domain>> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        // No hypervisor to ask: the hot paths (guest writes) skip the blocking pool.
        return Ok(None);
    }
    let vm = vm.to_string();
    blocking(st, move |rt| rt.domain(&vm)).await
}

/// Every domain of the site.
pub(super) async fn all(st: &Shared) -> ApiResult<Vec<Domain>> {
    if st.runtime.kind() == RuntimeKind::Builtin {
        return Ok(Vec::new());
    }
    blocking(st, |rt| rt.domains()).await
}

/// A domain as the agent's VM listing shows it.
pub(super) fn view(d: &Domain) -> Vm {
    Vm {
        name: d.name.clone(),
        runtime: Some("libvirt".into()),
        power: d.power,
        role: Role::Primary,
        integration_services: d.guest_agent,
        disks: d.disks.iter().map(|x| x.spec()).collect(),
        replication: Default::default(),
        recovery_points: Default::default(),
        test_copy: None,
        network: None,
    }
}

/// Start, graceful shutdown (ACPI, within the agent's shutdown timeout) or hard stop.
pub(super) async fn power(st: &Shared, d: &Domain, action: PowerAction) -> ApiResult<Vm> {
    let name = d.name.clone();
    let timeout: Duration = st.shutdown_timeout;
    blocking(st, move |rt| match action {
        PowerAction::Start => rt.start(&name),
        PowerAction::Shutdown => rt.shutdown(&name, timeout),
        PowerAction::PowerOff => rt.power_off(&name),
    })
    .await?;
    let now = find(st, &d.name).await?;
    Ok(view(now.as_ref().unwrap_or(d)))
}

/// A domain's guest writes for itself: the agent never writes into its disks.
pub(super) fn no_guest_writes(d: &Domain) -> ApiError {
    ApiError::conflict(format!(
        "VM {} is a libvirt domain: its guest writes to its disks itself",
        d.name
    ))
}

/// Why `PUT /v1/vms/{vm}` cannot define a VM over an existing domain.
pub(super) fn exists(d: &Domain) -> ApiError {
    ApiError::conflict(format!(
        "VM {} exists already as a libvirt domain at this site; protect it instead",
        d.name
    ))
}

/// Whether replication can be enabled on `d`: change tracking needs qcow2 disks (QEMU keeps
/// its dirty bitmaps in them). A refusal says how to convert.
pub(super) fn check_protectable(d: &Domain) -> ApiResult<()> {
    if let Some(raw) = d.disks.iter().find(|x| x.format != "qcow2") {
        return Err(ApiError::conflict(format!(
            "disk {} of VM {} is {} at {}: change tracking needs qcow2. Shut the VM down, run \
             `qemu-img convert -O qcow2 {} {}.qcow2`, point the domain's disk at the new \
             file (virsh edit {}), then protect it again",
            raw.name,
            d.name,
            raw.format,
            raw.path.display(),
            raw.path.display(),
            raw.path.with_extension("").display(),
            d.name,
        )));
    }
    Ok(())
}
