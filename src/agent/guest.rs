//! What a running guest is to the agent between requests: guest writes in flight, and a
//! graceful shutdown that waits for them and refuses new ones.

use super::{ApiError, ApiResult, Shared};

/// A graceful shutdown of the guest: new guest writes are refused, the ones in flight finish,
/// the guest stops. Fails (the VM keeps running and takes writes again) when that does not
/// happen within the agent's shutdown timeout.
pub(super) async fn shutdown(st: &Shared, vm: &str) -> ApiResult<ShuttingDown> {
    let limit = st.shutdown_timeout;
    let ignores = guest_ignores_shutdown(vm);
    set_shutting_down(st, vm, true);
    let quiet = ShuttingDown {
        st: st.clone(),
        vm: vm.to_string(),
    };
    let wait = async {
        loop {
            let idle = st
                .guests
                .lock()
                .map(|g| g.get(vm).is_none_or(|g| g.in_flight == 0))
                .unwrap_or(false);
            if idle && !ignores {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(limit, wait).await.is_err() {
        // `quiet` is dropped: the guest takes writes again.
        return Err(ApiError::conflict(format!(
            "guest did not shut down within {}s; use PowerOff",
            limit.as_secs()
        )));
    }
    Ok(quiet)
}

/// New guest writes of a VM are refused while this lives (a shutdown under way).
pub(super) struct ShuttingDown {
    st: Shared,
    vm: String,
}

impl Drop for ShuttingDown {
    fn drop(&mut self) {
        set_shutting_down(&self.st, &self.vm, false);
    }
}

fn set_shutting_down(st: &Shared, vm: &str, on: bool) {
    if let Ok(mut g) = st.guests.lock() {
        g.entry(vm.to_string()).or_default().shutting_down = on;
    }
}

/// Test-only fault injection: `TWINSITE_FAULT_GUEST_IGNORES_SHUTDOWN=vm1,vm2` makes those
/// guests ignore a graceful shutdown (feature `failpoints` only).
fn guest_ignores_shutdown(vm: &str) -> bool {
    crate::fault::switch("TWINSITE_FAULT_GUEST_IGNORES_SHUTDOWN")
        .is_some_and(|v| v.split(',').any(|n| n.trim() == vm))
}

/// A guest write accepted: counted until dropped.
pub(super) struct InFlight {
    st: Shared,
    vm: String,
}

impl InFlight {
    pub(super) fn start(st: &Shared, vm: &str) -> ApiResult<Self> {
        let mut g = st
            .guests
            .lock()
            .map_err(|_| ApiError::internal("guests poisoned"))?;
        let e = g.entry(vm.to_string()).or_default();
        if e.shutting_down {
            return Err(ApiError::conflict(format!("VM {vm} is shutting down")));
        }
        e.in_flight += 1;
        Ok(Self {
            st: st.clone(),
            vm: vm.to_string(),
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut g) = self.st.guests.lock()
            && let Some(e) = g.get_mut(&self.vm)
        {
            e.in_flight = e.in_flight.saturating_sub(1);
        }
    }
}
